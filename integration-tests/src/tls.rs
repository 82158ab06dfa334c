//! TLS for tests: a private certificate authority, and a TLS terminator in
//! front of a plaintext server (tansu serves no TLS itself; production
//! deployments put the same kind of terminator — Envoy, HAProxy — in front
//! of brokers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
///
/// [`refuse`](Self::refuse) makes it a broker that refuses its clients for
/// a while: open connections are cut and new ones are offered a
/// certificate from a CA no client trusts, so their handshakes fail.
pub struct TlsTerminator {
    /// The port it accepts TLS on.
    pub port: u16,
    /// Whether it refuses, and how many times it started to: a connection
    /// accepted before the latest start is cut.
    refusing: tokio::sync::watch::Sender<(bool, u64)>,
    /// Handshakes that failed (the client did not trust the certificate,
    /// or had none to show where one is required, or hung up mid-way).
    failed_handshakes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    /// Listens on a free port; each accepted connection is relayed to
    /// `127.0.0.1:<backend>` (connected only then, so the backend may start
    /// later).
    pub async fn start(backend: u16, tls: ServerTls<'_>) -> TlsTerminator {
        let acceptor = acceptor(tls);
        // What it presents while refusing: a certificate from a stranger.
        let (certificate, key) = TestCa::new().issue(&["localhost", "127.0.0.1"]);
        let stranger = self::acceptor(ServerTls {
            certificate: &certificate,
            key: &key,
            client_ca: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let failed_handshakes = Arc::new(AtomicU64::new(0));
        let (refusing, state) = tokio::sync::watch::channel((false, 0u64));
        let task = tokio::spawn({
            let failed_handshakes = failed_handshakes.clone();
            async move {
                let mut relays = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let mut state = state.clone();
                    let (refusing, cuts) = *state.borrow_and_update();
                    let acceptor = if refusing {
                        stranger.clone()
                    } else {
                        acceptor.clone()
                    };
                    let failed_handshakes = failed_handshakes.clone();
                    relays.spawn(async move {
                        // A client that fails the handshake (it does not
                        // trust the certificate) just loses its connection.
                        let Ok(mut client) = acceptor.accept(client).await else {
                            failed_handshakes.fetch_add(1, Ordering::AcqRel);
                            return;
                        };
                        let Ok(mut server) = TcpStream::connect(("127.0.0.1", backend)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = state.wait_for(|&(_, now)| now != cuts) => {}
                        }
                    });
                }
            }
        });
        TlsTerminator {
            port,
            refusing,
            failed_handshakes,
            task,
        }
    }

    /// Starts (`true`) or stops refusing clients: on start, every open
    /// connection is cut.
    pub fn refuse(&self, refusing: bool) {
        self.refusing.send_modify(|(now, cuts)| {
            if refusing && !*now {
                *cuts += 1;
            }
            *now = refusing;
        });
    }

    /// How many clients' handshakes failed so far.
    pub fn failed_handshakes(&self) -> u64 {
        self.failed_handshakes.load(Ordering::Acquire)
    }
}

/// Presents `tls`'s certificate; asks for a client's where `tls` says so.
fn acceptor(tls: ServerTls<'_>) -> TlsAcceptor {
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
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    TlsAcceptor::from(Arc::new(builder.with_single_cert(chain, key).unwrap()))
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
