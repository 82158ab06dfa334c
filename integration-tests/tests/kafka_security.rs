//! Kafka security against a real broker: a private tansu that requires SASL
//! (`--authentication`), reached directly (`sasl_plaintext`) or through a
//! TLS terminator holding a certificate from a private CA (`ssl` with a
//! client certificate, `sasl_ssl`). Keel's admin, publisher and group
//! consumer work with SCRAM-SHA-256 and SCRAM-SHA-512 and with TLS (tansu
//! 0.6 offers no PLAIN: PLAIN is tested through a front that authenticates
//! it); a wrong password and an untrusted certificate fail
//! the publish with an error that says so, and nothing is published; a
//! member that had joined rides out a passing refusal.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_core::{Deliveries, Envelope, Publisher, Subscriber, Subscription};
use keel_integration_tests::tls::{ServerTls, TestCa};
use keel_integration_tests::{
    Scram, ScramUser, TansuUnderTest, TempDir, kafka_topic, read_acked, unique_name,
};
use keel_producers::kafka::{
    Compression, KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig, KafkaSecurity,
};

const ALICE: ScramUser<'static> = ScramUser {
    name: "alice",
    password: "alice-secret",
    mechanism: Scram::Sha256,
};
const BOB: ScramUser<'static> = ScramUser {
    name: "bob",
    password: "bob-secret",
    mechanism: Scram::Sha512,
};

/// Client settings for `tansu` with `security`.
fn client(tansu: &TansuUnderTest, security: KafkaSecurity) -> KafkaClientConfig {
    KafkaClientConfig {
        security,
        ..KafkaClientConfig::new([tansu.bootstrap.clone()])
    }
}

fn sasl(mechanism: &str, user: &str, password: &str) -> KafkaSecurity {
    KafkaSecurity {
        sasl_mechanism: Some(mechanism.to_owned()),
        sasl_username: Some(user.to_owned()),
        sasl_password: Some(password.to_owned()),
        ..KafkaSecurity::default()
    }
}

fn publisher(client: &KafkaClientConfig, compression: Compression) -> KafkaPublisher {
    KafkaPublisher::new(KafkaPublisherConfig {
        client: client.clone(),
        compression,
        // Refused credentials end the publish after this long.
        ack_timeout_ms: 5_000,
        ..KafkaPublisherConfig::default()
    })
    .unwrap()
}

/// Creates a topic, publishes 20 events and reads them back through a Keel
/// group, all as `client`.
async fn round_trip(client: &KafkaClientConfig, compression: Compression) {
    let topic = kafka_topic(client, "secure", 2).await;
    let publisher = publisher(client, compression);
    let events: Vec<Envelope> = (0..20)
        .map(|i| Envelope::new("keel.test.Secure", format!("key-{i}"), format!("event {i}")))
        .collect();
    let receipts = publisher.publish_batch(&topic, events).await.unwrap();
    assert_eq!(receipts.len(), 20);
    let mut deliveries = member(client, &topic).await;
    let mut read = read_acked(&mut deliveries, 20).await;
    read.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("event {i}")).collect();
    expected.sort();
    assert_eq!(read, expected);
    deliveries.leave().await.unwrap();
}

/// A new group's member on `topic`, as `client`, from the start.
async fn member(client: &KafkaClientConfig, topic: &str) -> Deliveries {
    KafkaGroupConsumer::new(KafkaConsumerConfig {
        client: client.clone(),
        ..KafkaConsumerConfig::default()
    })
    .unwrap()
    .subscribe(Subscription::new(topic, unique_name("secure")))
    .await
    .unwrap()
}

/// Publishes one event as `client` into `topic` and returns the error.
async fn refused(client: &KafkaClientConfig, topic: &str) -> String {
    publisher(client, Compression::None)
        .publish(topic, Envelope::new("keel.test.Secure", "k", "refused"))
        .await
        .unwrap_err()
        .to_string()
}

/// What `topic` holds, read as `client` from the start: a marker event is
/// published first (as `client`), and everything up to and including it is
/// returned — so an empty answer cannot come from a reader that never
/// joined.
async fn stored(client: &KafkaClientConfig, topic: &str) -> Vec<String> {
    use futures::StreamExt;
    publisher(client, Compression::None)
        .publish(topic, Envelope::new("keel.test.Secure", "k", "marker"))
        .await
        .unwrap();
    let mut deliveries = member(client, topic).await;
    let mut read = Vec::new();
    while read.last().map(String::as_str) != Some("marker") {
        let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await
            .expect("the marker is read within 30 s")
            .unwrap()
            .unwrap();
        read.push(String::from_utf8_lossy(delivery.envelope().payload()).into_owned());
        delivery.ack();
    }
    deliveries.leave().await.unwrap();
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_users_publish_and_consume_and_wrong_credentials_are_refused() {
    let tansu = TansuUnderTest::start_secured(Some(&[ALICE, BOB]), None).await;
    let alice = client(&tansu, sasl("SCRAM-SHA-256", ALICE.name, ALICE.password));
    round_trip(&alice, Compression::Lz4).await;
    round_trip(
        &client(&tansu, sasl("SCRAM-SHA-512", BOB.name, BOB.password)),
        Compression::Zstd,
    )
    .await;

    let topic = kafka_topic(&alice, "refused", 1).await;
    for (security, why) in [
        (
            sasl("SCRAM-SHA-256", ALICE.name, "not-her-password"),
            "SASL authentication error",
        ),
        // Alice has SCRAM-SHA-256 credentials only.
        (
            sasl("SCRAM-SHA-512", ALICE.name, ALICE.password),
            "SASL authentication error",
        ),
        // tansu 0.6 offers no PLAIN: the handshake fails, and says so.
        (
            sasl("PLAIN", ALICE.name, ALICE.password),
            "SASL PLAIN mechanism handshake failed",
        ),
        // No credentials at all: the broker closes the connection.
        (KafkaSecurity::default(), "the client's last error"),
    ] {
        let mechanism = security.sasl_mechanism.clone();
        let error = refused(&client(&tansu, security), &topic).await;
        assert!(error.contains(&topic), "the error names the topic: {error}");
        assert!(
            error.contains(why),
            "{mechanism:?}: the error says why ({why}): {error}"
        );
    }
    let impostor = client(
        &tansu,
        sasl("SCRAM-SHA-256", ALICE.name, "not-her-password"),
    );
    let why = refused_member(&impostor, &topic).await;
    assert!(
        why.contains("SASL authentication error"),
        "the error carries librdkafka's reason: {why}"
    );
    assert_eq!(
        stored(&alice, &topic).await,
        ["marker"],
        "nothing refused was stored"
    );
}

/// SASL PLAIN, through a front that authenticates PLAIN itself (tansu 0.6
/// offers only SCRAM; see `keel_integration_tests::sasl_plain`): a user
/// publishes and consumes; a wrong password, an unoffered mechanism and a
/// client without credentials are refused with errors that say so; nothing
/// refused is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_users_publish_and_consume_and_wrong_credentials_are_refused() {
    const CAROL: (&str, &str) = ("carol", "carol-secret");
    let tansu = TansuUnderTest::start_behind_sasl_plain(&[CAROL]).await;
    let carol = client(&tansu, sasl("PLAIN", CAROL.0, CAROL.1));
    round_trip(&carol, Compression::Lz4).await;
    let topic = kafka_topic(&carol, "refused", 1).await;
    let impostor = client(&tansu, sasl("PLAIN", CAROL.0, "not-her-password"));
    let error = refused(&impostor, &topic).await;
    assert!(error.contains(&topic), "the error names the topic: {error}");
    assert!(
        error.contains("SASL authentication error")
            && error.contains("invalid username or password"),
        "the error carries the refusal's reason: {error}"
    );
    let why = refused_member(&impostor, &topic).await;
    assert!(why.contains("SASL authentication error"), "{why}");
    // A mechanism the listener does not offer.
    let error = refused(
        &client(&tansu, sasl("SCRAM-SHA-256", CAROL.0, CAROL.1)),
        &topic,
    )
    .await;
    assert!(
        error.contains("SASL SCRAM-SHA-256 mechanism handshake failed"),
        "{error}"
    );
    let error = refused(&client(&tansu, KafkaSecurity::default()), &topic).await;
    assert!(
        error.contains("the client's last error"),
        "a client without credentials is cut off, and the error says so: {error}"
    );
    assert_eq!(
        stored(&carol, &topic).await,
        ["marker"],
        "nothing refused was stored"
    );
}

/// Subscribes a group member as `client`, whose credentials the brokers
/// refuse: its stream must end with an error saying so (not wait
/// silently). Returns the error's text.
async fn refused_member(client: &KafkaClientConfig, topic: &str) -> String {
    use futures::StreamExt;
    let mut deliveries = member(client, topic).await;
    let item = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
        .await
        .expect("a refused member reports it within 30 s");
    let error = match item {
        Some(Err(e)) => e,
        Some(Ok(d)) => panic!("a refused member got event {}", d.envelope().id()),
        None => panic!("a refused member's stream ended without an error"),
    };
    let text = error.to_string();
    assert!(!error.is_retriable(), "{text}");
    assert!(
        text.contains(topic) && text.contains("refused this member before it joined"),
        "{text}"
    );
    assert!(text.contains("sasl_password"), "names the settings: {text}");
    let _ = deliveries.leave().await;
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_sasl_over_tls_with_a_private_ca() {
    let ca = TestCa::new();
    // The terminator is advertised as `localhost`: librdkafka checks DNS
    // names.
    let (certificate, key) = ca.issue(&["localhost"]);
    let (client_certificate, client_key) = ca.issue(&["keel-client"]);
    let dir = TempDir::new();
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        Some(path.display().to_string())
    };
    let trusted = file("ca.pem", &ca.pem());
    let stranger = file("other-ca.pem", &TestCa::new().pem());
    let certificate_location = file("client.pem", &client_certificate);
    let key_location = file("client.key", &client_key);
    let mutual = KafkaSecurity {
        tls: true,
        ca_location: trusted.clone(),
        certificate_location,
        key_location,
        ..KafkaSecurity::default()
    };

    // Mutual TLS: the broker's terminator asks for a client certificate
    // from the same CA.
    let tansu = TansuUnderTest::start_secured(
        None,
        Some(ServerTls {
            certificate: &certificate,
            key: &key,
            client_ca: Some(&ca.pem()),
        }),
    )
    .await;
    let trusting = client(&tansu, mutual.clone());
    round_trip(&trusting, Compression::Lz4).await;
    let topic = kafka_topic(&trusting, "refused", 1).await;
    let distrusting = client(
        &tansu,
        KafkaSecurity {
            ca_location: stranger,
            ..mutual.clone()
        },
    );
    let error = refused(&distrusting, &topic).await;
    assert!(
        error.contains("certificate verify failed"),
        "the error says the broker's certificate is not trusted: {error}"
    );
    let why = refused_member(&distrusting, &topic).await;
    assert!(why.contains("certificate verify failed"), "{why}");
    let anonymous = KafkaSecurity {
        certificate_location: None,
        key_location: None,
        ..mutual.clone()
    };
    let error = refused(&client(&tansu, anonymous), &topic).await;
    assert!(error.contains(&topic), "{error}");
    assert!(
        error.contains("the client's last error"),
        "the error carries the connection's failure: {error}"
    );
    assert_eq!(
        stored(&trusting, &topic).await,
        ["marker"],
        "nothing refused was stored"
    );
    drop(tansu);

    // SASL over (one-way) TLS.
    let tansu = TansuUnderTest::start_secured(
        Some(&[ALICE]),
        Some(ServerTls {
            certificate: &certificate,
            key: &key,
            client_ca: None,
        }),
    )
    .await;
    round_trip(
        &client(
            &tansu,
            KafkaSecurity {
                tls: true,
                ca_location: trusted,
                ..sasl("SCRAM-SHA-256", ALICE.name, ALICE.password)
            },
        ),
        Compression::Zstd,
    )
    .await;
}

/// A member that has joined rides out a passing refusal (certificates or
/// credentials being rotated, a terminator misconfigured for a while): its
/// connections are cut and every reconnect fails the TLS handshake, yet its
/// stream neither ends nor errors, and once the brokers accept it again it
/// reads on. (Refused before it ever joined, it ends with an error instead:
/// see `refused_member`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_member_rides_out_a_passing_refusal() {
    use futures::StreamExt;
    let ca = TestCa::new();
    let (certificate, key) = ca.issue(&["localhost"]);
    let dir = TempDir::new();
    let ca_location = dir.path().join("ca.pem");
    std::fs::write(&ca_location, ca.pem()).unwrap();
    let tansu = TansuUnderTest::start_secured(
        None,
        Some(ServerTls {
            certificate: &certificate,
            key: &key,
            client_ca: None,
        }),
    )
    .await;
    let client = client(
        &tansu,
        KafkaSecurity {
            tls: true,
            ca_location: Some(ca_location.display().to_string()),
            ..KafkaSecurity::default()
        },
    );
    let topic = kafka_topic(&client, "rides-out", 1).await;
    let events = |label: &str| -> Vec<Envelope> {
        (0..10)
            .map(|i| {
                Envelope::new(
                    "keel.test.Secure",
                    format!("key-{i}"),
                    format!("{label} {i}"),
                )
            })
            .collect()
    };
    let texts = |label: &str| -> Vec<String> { (0..10).map(|i| format!("{label} {i}")).collect() };
    // A publisher for each side of the refusal, each dropped at once:
    // during it the member is the only client, so every refused handshake
    // counted is the member's.
    publisher(&client, Compression::None)
        .publish_batch(&topic, events("before"))
        .await
        .unwrap();
    let mut deliveries = member(&client, &topic).await;
    assert_eq!(read_acked(&mut deliveries, 10).await, texts("before"));

    let terminator = tansu.tls().unwrap();
    let before = terminator.failed_handshakes();
    terminator.refuse(true);
    let refused_a_while = async {
        while terminator.failed_handshakes() < before + 5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        item = deliveries.next() => match item {
            Some(Err(e)) => panic!("a joined member gave up on a passing refusal: {e}"),
            Some(Ok(d)) => panic!("nothing was published, yet event {} came", d.envelope().id()),
            None => panic!("a joined member's stream ended on a passing refusal"),
        },
        () = refused_a_while => {}
        () = tokio::time::sleep(Duration::from_secs(60)) => {
            panic!("the clients did not reconnect into the refusal within 60 s")
        }
    }
    terminator.refuse(false);

    publisher(&client, Compression::None)
        .publish_batch(&topic, events("after"))
        .await
        .unwrap();
    assert_eq!(read_acked(&mut deliveries, 10).await, texts("after"));
    deliveries.leave().await.unwrap();
}
