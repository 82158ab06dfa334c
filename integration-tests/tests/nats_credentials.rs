//! NATS credentials from configuration, each against a private nats-server
//! started for it (the machine's binary, JetStream on): user/password, token,
//! NKey, a `.creds` file in operator mode (JWTs signed here with NKeys, as
//! `nsc` would) and TLS with client certificates (certificates made with `openssl`
//! for the test). A publish and a group read prove the whole path works; a
//! wrong secret is refused with a message that names the server and not the
//! secret.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use keel_consumers::nats::JetStreamGroupConsumer;
use keel_core::config::NatsAuth;
use keel_core::{Envelope, Publisher, Subscriber, Subscription, TopicSpec};
use keel_integration_tests::{NatsUnderTest, TempDir, nats_consumer_config, unique_name};
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig, StreamSettings,
};

/// A nats-server with `auth` (a config fragment) on a free port.
fn server(auth: &str, scheme: &str, dir: TempDir) -> NatsUnderTest {
    NatsUnderTest::start_in(dir, auth, scheme)
}

/// Creates a topic, publishes an event and reads it back through a group.
async fn round_trip(client: NatsClientConfig) {
    let admin = JetStreamAdmin::connect(&client).await.unwrap();
    let topic = unique_name("creds");
    admin
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions: 2,
            },
            &StreamSettings::default(),
        )
        .await
        .unwrap();
    let publisher = JetStreamPublisher::connect(JetStreamPublisherConfig::new(client.clone()))
        .await
        .unwrap();
    publisher
        .publish(&topic, Envelope::new("keel.test.Hello", "k", "hello"))
        .await
        .unwrap();
    let mut member = JetStreamGroupConsumer::connect(nats_consumer_config(client))
        .await
        .unwrap()
        .subscribe(Subscription::new(&topic, unique_name("creds-g")))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), member.next())
        .await
        .expect("delivered within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(&d.envelope().payload()[..], b"hello");
    d.ack();
    member.leave().await.unwrap();
}

async fn refused(client: NatsClientConfig, secret: &str) {
    let e = client.connect().await.unwrap_err();
    // Refused credentials are not tried again (a relay would wait for ever).
    assert!(!e.is_retriable(), "{e}");
    let e = e.to_string();
    assert!(e.contains("cannot connect to NATS"), "{e}");
    assert!(!e.contains(secret), "the error shows the secret: {e}");
}

fn with(url: &str, auth: NatsAuth) -> NatsClientConfig {
    NatsClientConfig {
        auth,
        ..NatsClientConfig::new(url)
    }
}

#[tokio::test]
async fn user_and_password() {
    let s = server(
        "authorization { users = [ { user: app, password: \"s3cret-pw\" } ] }",
        "nats",
        TempDir::new(),
    );
    let auth = |password: &str| NatsAuth {
        user: Some("app".into()),
        password: Some(password.into()),
        ..NatsAuth::default()
    };
    round_trip(with(&s.url, auth("s3cret-pw"))).await;
    refused(with(&s.url, auth("wrong-pw")), "wrong-pw").await;
}

#[tokio::test]
async fn token() {
    let s = server(
        "authorization { token: \"t0ken-value\" }",
        "nats",
        TempDir::new(),
    );
    let auth = |token: &str| NatsAuth {
        token: Some(token.into()),
        ..NatsAuth::default()
    };
    round_trip(with(&s.url, auth("t0ken-value"))).await;
    refused(with(&s.url, auth("other-token")), "other-token").await;
}

#[tokio::test]
async fn nkey() {
    let user = nkeys::KeyPair::new_user();
    let s = server(
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}",
            user.public_key()
        ),
        "nats",
        TempDir::new(),
    );
    let auth = |seed: String| NatsAuth {
        nkey_seed: Some(seed),
        ..NatsAuth::default()
    };
    round_trip(with(&s.url, auth(user.seed().unwrap()))).await;
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    refused(with(&s.url, auth(stranger.clone())), &stranger).await;
}

/// A NATS JWT (`ed25519-nkey`): `subject`'s claims, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = serde_json::json!({
        "jti": unique_name("jti"),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// A `.creds` file as `nsc` writes it: the user's JWT and NKey seed.
fn creds_file(dir: &Path, name: &str, user_jwt: &str, seed: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        ),
    )
    .unwrap();
    path
}

/// Decentralised auth (operator mode, as `nsc` sets up): the server trusts
/// an operator, which signs an account (JetStream enabled), which signs a
/// user; the client holds the user's `.creds` file. A user signed by
/// another account's key is refused.
#[tokio::test]
async fn creds_file_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = |key: &nkeys::KeyPair, name: &str, limits: serde_json::Value| {
        jwt(
            &operator,
            &key.public_key(),
            name,
            serde_json::json!({"type": "account", "version": 2, "limits": limits}),
        )
    };
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "keel-test",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let system_jwt = account_jwt(&system, "SYS", serde_json::json!({}));
    let app_jwt = account_jwt(&account, "APP", unlimited);
    let dir = TempDir::new();
    let s = server(
        &format!(
            "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: {system_jwt}\n  {}: {app_jwt}\n}}",
            system.public_key(),
            system.public_key(),
            account.public_key(),
        ),
        "nats",
        TempDir::new(),
    );
    let user_creds = |signer: &nkeys::KeyPair, file: &str| {
        let user = nkeys::KeyPair::new_user();
        let claims = serde_json::json!({
            "type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        });
        let user_jwt = jwt(signer, &user.public_key(), file, claims);
        let seed = user.seed().unwrap();
        (creds_file(dir.path(), file, &user_jwt, &seed), seed)
    };
    let auth = |creds_file: std::path::PathBuf| NatsAuth {
        creds_file: Some(creds_file),
        ..NatsAuth::default()
    };
    round_trip(with(&s.url, auth(user_creds(&account, "app.creds").0))).await;
    // Signed by an account the operator never signed.
    let (stranger, seed) = user_creds(&nkeys::KeyPair::new_account(), "stranger.creds");
    refused(with(&s.url, auth(stranger)), &seed).await;
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=keel-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=keel-test-{name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate() {
    let dir = TempDir::new();
    certificates(dir.path());
    let d = dir.path().to_path_buf();
    let s = server(
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
            d.join("server.pem").display(),
            d.join("server.key").display(),
            d.join("ca.pem").display()
        ),
        "tls",
        dir,
    );
    let mut auth = NatsAuth::default();
    auth.tls.required = true;
    auth.tls.ca_file = Some(d.join("ca.pem"));
    auth.tls.cert_file = Some(d.join("client.pem"));
    auth.tls.key_file = Some(d.join("client.key"));
    round_trip(with(&s.url, auth.clone())).await;
    // Without the client certificate the server refuses the handshake.
    auth.tls.cert_file = None;
    auth.tls.key_file = None;
    let e = with(&s.url, auth).connect().await.unwrap_err().to_string();
    assert!(e.contains("cannot connect to NATS"), "{e}");
}
