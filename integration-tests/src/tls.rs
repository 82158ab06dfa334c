//! TLS for tests: a private certificate authority, and a TLS terminator in
//! front of a plaintext server (tansu serves no TLS itself; production
//! deployments put the same kind of terminator — Envoy, HAProxy — in front
//! of brokers).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// A private certificate authority that issues server certificates.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new self-signed CA.
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // A name of its own: OpenSSL takes a certificate whose issuer and
        // subject names are equal (rcgen's default for both) as
        // self-signed and refuses it.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            crate::unique_name("keel-test-ca"),
        );
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        TestCa { issuer }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (host names or IP addresses) signed by this
    /// CA, and its private key: `(certificate PEM, key PEM)`.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(name) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *name);
        }
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// What a [`TlsTerminator`] presents and asks for.
#[derive(Clone, Copy, Debug)]
pub struct ServerTls<'a> {
    /// Its certificate (chain), PEM.
    pub certificate: &'a str,
    /// The certificate's private key, PEM.
    pub key: &'a str,
    /// When set: clients must present a certificate signed by this CA
    /// (PEM) — mutual TLS.
    pub client_ca: Option<&'a str>,
}

/// Accepts TLS on `127.0.0.1:<port>` and relays each connection, decrypted,
/// to a plaintext backend. Stops when dropped.
pub struct TlsTerminator {
    /// The port it accepts TLS on.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    /// Listens on a free port; each accepted connection is relayed to
    /// `127.0.0.1:<backend>` (connected only then, so the backend may start
    /// later).
    pub async fn start(backend: u16, tls: ServerTls<'_>) -> TlsTerminator {
        let chain = certificates(tls.certificate);
        let key = PrivateKeyDer::from_pem_slice(tls.key.as_bytes()).unwrap();
        let provider = Arc::new(ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match tls.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for certificate in certificates(ca) {
                    roots.add(certificate).unwrap();
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                relays.spawn(async move {
                    // A client that fails the handshake (it does not trust
                    // the certificate) just loses its connection.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", backend)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        TlsTerminator { port, task }
    }
}

fn certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
