//! NATS credentials from configuration, each against a private nats-server
//! started for it (the machine's binary, JetStream on): user/password, token,
//! NKey and TLS with client certificates (certificates made with `openssl`
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
    let e = client.connect().await.unwrap_err().to_string();
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
