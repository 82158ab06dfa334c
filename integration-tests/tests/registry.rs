//! Keel's schema registry against real PostgreSQL and SQLite: every
//! endpoint with Confluent's exact error codes, every compatibility level
//! over the spec-derived pairs, concurrent registration, restarts, IMPORT
//! mode (copying another registry's schemas with their ids), and the
//! codec working through the HTTP client.
#![allow(clippy::unwrap_used)] // test bodies live in helpers: a panic is the failure report

use std::sync::Arc;

use keel_integration_tests::{RegistryBackend, RegistryUnderTest};
use keel_schemas::server::{ServerOptions, ServerTls};
use reqwest::StatusCode;
use serde_json::{Value, json};

const V1: &str = "application/vnd.schemaregistry.v1+json";

/// One test per backend.
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(keel_integration_tests::RegistryBackend::Postgres).await;
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(keel_integration_tests::RegistryBackend::Sqlite).await;
                }
            )+
        }
    };
}

on_both_backends!(
    every_endpoint_answers_as_confluent_documents,
    every_compatibility_level_over_the_spec_pairs,
    transitive_levels_check_every_version,
    concurrent_registrations_agree,
    ids_survive_a_restart,
    new_ids_stop_at_the_wire_formats_limit,
    references_and_the_codec_through_the_client,
    bad_requests_get_codes_not_500s,
    a_lattice_of_references_is_read_once_per_subject,
    import_mode_keeps_ids_and_versions,
    the_client_speaks_tls_to_an_https_registry,
);

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(registry: &RegistryUnderTest) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: registry.url.clone(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.header("content-type", V1).body(body.to_string());
        }
        let response = request.send().await.expect("registry answers");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.expect("body");
        assert_eq!(content_type, V1, "{path}: content type");
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// Registers `schema` (a JSON value) and returns its id.
    async fn register(&self, subject: &str, schema: &Value) -> u64 {
        let (status, body) = self
            .post(
                &format!("/subjects/{subject}/versions"),
                json!({"schema": schema.to_string()}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "register {subject}: {body}");
        body["id"].as_u64().expect("id")
    }
}

fn error_code(body: &Value) -> i64 {
    body["error_code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

fn record(name: &str, fields: Value) -> Value {
    json!({"type": "record", "name": name, "namespace": "test", "fields": fields})
}

async fn every_endpoint_answers_as_confluent_documents(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let v1 = record("User", json!([{"name": "id", "type": "string"}]));
    let v2 = record(
        "User",
        json!([{"name": "id", "type": "string"}, {"name": "email", "type": ["null", "string"], "default": null}]),
    );

    assert_eq!(api.get("/").await, (StatusCode::OK, json!({})));
    assert_eq!(
        api.get("/schemas/types").await,
        (StatusCode::OK, json!(["AVRO"]))
    );
    assert_eq!(api.get("/subjects").await, (StatusCode::OK, json!([])));

    // Register, idempotently.
    let id1 = api.register("users-value", &v1).await;
    assert_eq!(
        api.register("users-value", &v1).await,
        id1,
        "same schema, same id"
    );
    let id2 = api.register("users-value", &v2).await;
    assert_ne!(id1, id2);
    // The same schema under another subject keeps its global id.
    assert_eq!(api.register("people-value", &v1).await, id1);

    assert_eq!(
        api.get("/subjects").await.1,
        json!(["people-value", "users-value"])
    );
    assert_eq!(
        api.get("/subjects?subjectPrefix=us").await.1,
        json!(["users-value"])
    );
    assert_eq!(
        api.get("/subjects/users-value/versions").await.1,
        json!([1, 2])
    );
    let (status, latest) = api.get("/subjects/users-value/versions/latest").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(latest["subject"], "users-value");
    assert_eq!(latest["version"], 2);
    assert_eq!(latest["id"].as_u64(), Some(id2));
    assert_eq!(
        serde_json::from_str::<Value>(latest["schema"].as_str().unwrap()).unwrap(),
        v2
    );
    assert_eq!(
        api.get("/subjects/users-value/versions/-1").await.1["version"],
        2
    );
    assert_eq!(
        api.get("/subjects/users-value/versions/1/schema").await.1,
        v1
    );
    assert_eq!(
        api.get(&format!("/schemas/ids/{id1}")).await.1,
        json!({"schema": v1.to_string()})
    );
    assert_eq!(api.get(&format!("/schemas/ids/{id1}/schema")).await.1, v1);
    assert_eq!(
        api.get(&format!("/schemas/ids/{id1}/subjects")).await.1,
        json!(["people-value", "users-value"])
    );
    assert_eq!(
        api.get(&format!("/schemas/ids/{id1}/versions")).await.1,
        json!([{"subject": "people-value", "version": 1}, {"subject": "users-value", "version": 1}])
    );

    // Lookup.
    let (status, found) = api
        .post("/subjects/users-value", json!({"schema": v1.to_string()}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (found["id"].as_u64(), found["version"].as_i64()),
        (Some(id1), Some(1))
    );
    // Whitespace and docs differ: found only with normalize=true.
    let v1_doc = record(
        "User",
        json!([{"name": "id", "type": "string", "doc": "the id"}]),
    );
    let pretty = serde_json::to_string_pretty(&v1_doc).unwrap();
    let (status, body) = api
        .post("/subjects/users-value", json!({"schema": pretty}))
        .await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, 40403));
    let (status, found) = api
        .post(
            "/subjects/users-value?normalize=true",
            json!({"schema": pretty}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["id"].as_u64(), Some(id1));
    let (_, body) = api
        .post("/subjects/nobody", json!({"schema": v1.to_string()}))
        .await;
    assert_eq!(error_code(&body), 40401);

    // Compatibility endpoint, default BACKWARD.
    let breaking = record("User", json!([{"name": "id", "type": "long"}]));
    let (status, answer) = api
        .post(
            "/compatibility/subjects/users-value/versions/latest",
            json!({"schema": breaking.to_string()}),
        )
        .await;
    assert_eq!(
        (status, answer),
        (StatusCode::OK, json!({"is_compatible": false}))
    );
    let (_, answer) = api
        .post(
            "/compatibility/subjects/users-value/versions/latest?verbose=true",
            json!({"schema": breaking.to_string()}),
        )
        .await;
    assert_eq!(answer["is_compatible"], false);
    assert!(
        answer["messages"][0]
            .as_str()
            .unwrap()
            .contains("/fields/0/type"),
        "{answer}"
    );
    let (_, answer) = api
        .post(
            "/compatibility/subjects/users-value/versions/1",
            json!({"schema": v2.to_string()}),
        )
        .await;
    assert_eq!(answer, json!({"is_compatible": true}));
    let (_, answer) = api
        .post(
            "/compatibility/subjects/users-value/versions",
            json!({"schema": v2.to_string()}),
        )
        .await;
    assert_eq!(answer, json!({"is_compatible": true}));
    let (status, body) = api
        .post(
            "/subjects/users-value/versions",
            json!({"schema": breaking.to_string()}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (StatusCode::CONFLICT, 409));
    assert!(
        body["message"].as_str().unwrap().contains("incompatible"),
        "{body}"
    );
    let (_, body) = api
        .post(
            "/compatibility/subjects/users-value/versions/9",
            json!({"schema": v2.to_string()}),
        )
        .await;
    assert_eq!(error_code(&body), 40402);

    // Config: global and per subject.
    assert_eq!(
        api.get("/config").await.1,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    assert_eq!(
        api.put("/config", json!({"compatibility": "full_transitive"}))
            .await
            .1,
        json!({"compatibility": "FULL_TRANSITIVE"})
    );
    assert_eq!(
        api.get("/config").await.1,
        json!({"compatibilityLevel": "FULL_TRANSITIVE"})
    );
    let (status, body) = api
        .put("/config", json!({"compatibility": "SIDEWAYS"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42203)
    );
    let (_, body) = api.get("/config/users-value").await;
    assert_eq!(error_code(&body), 40408);
    assert_eq!(
        api.get("/config/users-value?defaultToGlobal=true").await.1,
        json!({"compatibilityLevel": "FULL_TRANSITIVE"})
    );
    assert_eq!(
        api.put("/config/users-value", json!({"compatibility": "NONE"}))
            .await
            .1,
        json!({"compatibility": "NONE"})
    );
    assert_eq!(
        api.get("/config/users-value").await.1,
        json!({"compatibilityLevel": "NONE"})
    );
    // NONE lets the breaking schema in.
    let id3 = api.register("users-value", &breaking).await;
    assert_eq!(
        api.delete("/config/users-value").await.1,
        json!({"compatibilityLevel": "NONE"})
    );
    assert_eq!(
        error_code(&api.delete("/config/users-value").await.1),
        40408
    );
    api.put("/config", json!({"compatibility": "BACKWARD"}))
        .await;

    // Mode.
    assert_eq!(api.get("/mode").await.1, json!({"mode": "READWRITE"}));
    assert_eq!(
        api.put("/mode", json!({"mode": "READONLY"})).await.1,
        json!({"mode": "READONLY"})
    );
    let (status, body) = api
        .post(
            "/subjects/users-value/versions",
            json!({"schema": v2.to_string()}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42205)
    );
    let (_, body) = api.put("/mode", json!({"mode": "SOMETIMES"})).await;
    assert_eq!(error_code(&body), 42204);
    assert_eq!(error_code(&api.get("/mode/users-value").await.1), 40409);
    assert_eq!(
        api.put("/mode/users-value", json!({"mode": "READWRITE"}))
            .await
            .1,
        json!({"mode": "READWRITE"})
    );
    // The subject's own mode overrides the global one.
    assert_eq!(api.register("users-value", &v2).await, id2);
    assert_eq!(
        api.delete("/mode/users-value").await.1,
        json!({"mode": "READWRITE"})
    );
    api.put("/mode", json!({"mode": "READWRITE"})).await;

    // Versions: soft delete, then permanent; the codes in between.
    assert_eq!(
        api.get("/subjects/users-value/versions").await.1,
        json!([1, 2, 3])
    );
    let (_, body) = api
        .delete("/subjects/users-value/versions/3?permanent=true")
        .await;
    assert_eq!(error_code(&body), 40407);
    assert_eq!(
        api.delete("/subjects/users-value/versions/3").await.1,
        json!(3)
    );
    assert_eq!(
        error_code(&api.delete("/subjects/users-value/versions/3").await.1),
        40406
    );
    assert_eq!(
        api.get("/subjects/users-value/versions").await.1,
        json!([1, 2])
    );
    assert_eq!(
        api.get("/subjects/users-value/versions?deleted=true")
            .await
            .1,
        json!([1, 2, 3])
    );
    assert_eq!(
        error_code(&api.get("/subjects/users-value/versions/3").await.1),
        40402
    );
    assert_eq!(
        api.get("/subjects/users-value/versions/3?deleted=true")
            .await
            .1["id"]
            .as_u64(),
        Some(id3)
    );
    // A soft-deleted version's schema is still served by id (consumers of
    // older events need it); a permanently deleted one is gone, as in
    // Confluent's registry.
    let by_id = format!("/schemas/ids/{id3}");
    assert_eq!(api.get(&by_id).await.0, StatusCode::OK);
    assert_eq!(
        api.delete("/subjects/users-value/versions/3?permanent=true")
            .await
            .1,
        json!(3)
    );
    assert_eq!(error_code(&api.get(&by_id).await.1), 40403);
    assert_eq!(
        error_code(&api.get(&format!("{by_id}/schema")).await.1),
        40403
    );
    assert_eq!(
        api.get("/subjects/users-value/versions?deleted=true")
            .await
            .1,
        json!([1, 2])
    );
    assert_eq!(
        error_code(&api.get("/subjects/users-value/versions/7").await.1),
        40402
    );
    assert_eq!(
        error_code(&api.get("/subjects/nobody/versions/1").await.1),
        40401
    );
    let (status, body) = api.get("/subjects/users-value/versions/0").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42202)
    );
    assert_eq!(
        error_code(&api.get("/subjects/users-value/versions/abc").await.1),
        42202
    );
    assert_eq!(error_code(&api.get("/schemas/ids/999999").await.1), 40403);

    // Subjects: soft, then permanent.
    assert_eq!(
        error_code(&api.delete("/subjects/people-value?permanent=true").await.1),
        40405
    );
    assert_eq!(api.delete("/subjects/people-value").await.1, json!([1]));
    assert_eq!(
        error_code(&api.delete("/subjects/people-value").await.1),
        40404
    );
    assert_eq!(api.get("/subjects").await.1, json!(["users-value"]));
    // A subject whose every version is soft-deleted is not found (40401),
    // by version and by lookup, as Confluent answers.
    assert_eq!(
        error_code(&api.get("/subjects/people-value/versions/1").await.1),
        40401
    );
    let (_, people_v1) = api
        .get("/subjects/people-value/versions/1?deleted=true")
        .await;
    let (_, body) = api
        .post(
            "/subjects/people-value",
            json!({"schema": people_v1["schema"]}),
        )
        .await;
    assert_eq!(error_code(&body), 40401, "{body}");
    assert_eq!(
        api.get("/subjects?deleted=true").await.1,
        json!(["people-value", "users-value"])
    );
    assert_eq!(
        api.delete("/subjects/people-value?permanent=true").await.1,
        json!([1])
    );
    assert_eq!(
        api.get("/subjects?deleted=true").await.1,
        json!(["users-value"])
    );
    assert_eq!(
        error_code(&api.delete("/subjects/people-value").await.1),
        40401
    );

    // References: a type registered in one subject used from another.
    let money = json!({"type": "record", "name": "Money", "namespace": "shop", "fields": [
        {"name": "cents", "type": "long"}, {"name": "currency", "type": "string"}]});
    let money_id = api.register("shop.Money", &money).await;
    let invoice = json!({"type": "record", "name": "Invoice", "namespace": "shop", "fields": [
        {"name": "total", "type": "shop.Money"}]});
    let (status, body) = api
        .post(
            "/subjects/invoices-value/versions",
            json!({"schema": invoice.to_string(),
                   "references": [{"name": "shop.Money", "subject": "shop.Money", "version": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let invoice_id = body["id"].as_u64().unwrap();
    assert_ne!(invoice_id, money_id);
    let (_, fetched) = api.get(&format!("/schemas/ids/{invoice_id}")).await;
    assert_eq!(
        fetched["references"],
        json!([{"name": "shop.Money", "subject": "shop.Money", "version": 1}])
    );
    assert_eq!(
        api.get("/subjects/shop.Money/versions/1/referencedby")
            .await
            .1,
        json!([invoice_id])
    );
    let (status, body) = api.delete("/subjects/shop.Money/versions/1").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42206)
    );
    // A reference to the latest version (-1) is stored pinned to the
    // version it resolved to, so it is protected the same way and keeps
    // its meaning when the referenced subject moves on.
    let receipt = json!({"type": "record", "name": "Receipt", "namespace": "shop", "fields": [
        {"name": "paid", "type": "shop.Money"}]});
    let (status, body) = api
        .post(
            "/subjects/receipts-value/versions",
            json!({"schema": receipt.to_string(),
                   "references": [{"name": "shop.Money", "subject": "shop.Money", "version": -1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let receipt_id = body["id"].as_u64().unwrap();
    let (_, fetched) = api.get(&format!("/schemas/ids/{receipt_id}")).await;
    assert_eq!(
        fetched["references"],
        json!([{"name": "shop.Money", "subject": "shop.Money", "version": 1}])
    );
    assert_eq!(
        api.get("/subjects/shop.Money/versions/1/referencedby")
            .await
            .1,
        json!([invoice_id, receipt_id])
    );
    // Without the reference the type is unknown.
    let (_, body) = api
        .post(
            "/subjects/invoices2-value/versions",
            json!({"schema": invoice.to_string()}),
        )
        .await;
    assert_eq!(error_code(&body), 42201);
    assert!(
        body["message"].as_str().unwrap().contains("shop.Money"),
        "{body}"
    );
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    writer: Value,
    reader: Value,
    compatible: bool,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(include_str!("../../schemas/tests/data/compatibility.json"))
        .expect("cases")
}

/// Registers `old` under a fresh subject at `level`, then asks whether
/// `new` may follow it.
async fn admits(api: &Api, level: &str, old: &Value, new: &Value, subject: &str) -> bool {
    api.register(subject, old).await;
    let (status, _) = api
        .put(
            &format!("/config/{subject}"),
            json!({"compatibility": level}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = api
        .post(
            &format!("/compatibility/subjects/{subject}/versions/latest"),
            json!({"schema": new.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{subject}: {answer}");
    answer["is_compatible"].as_bool().expect("is_compatible")
}

async fn every_compatibility_level_over_the_spec_pairs(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let cases = cases();
    assert!(cases.len() >= 40);
    let (mut positive, mut negative) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        // BACKWARD: registering the reader after the writer asks whether
        // the new (reader) schema reads old (writer) data.
        let backward = admits(
            &api,
            "BACKWARD",
            &case.writer,
            &case.reader,
            &format!("b{i}"),
        )
        .await;
        assert_eq!(backward, case.compatible, "BACKWARD {}", case.name);
        // FORWARD: registering the writer after the reader asks whether the
        // old (reader) schema reads new (writer) data.
        let forward = admits(
            &api,
            "FORWARD",
            &case.reader,
            &case.writer,
            &format!("f{i}"),
        )
        .await;
        assert_eq!(forward, case.compatible, "FORWARD {}", case.name);
        // FULL needs both directions; the reverse direction is what
        // BACKWARD answers with the roles swapped.
        let reverse = admits(
            &api,
            "BACKWARD",
            &case.reader,
            &case.writer,
            &format!("r{i}"),
        )
        .await;
        let full = admits(&api, "FULL", &case.writer, &case.reader, &format!("u{i}")).await;
        assert_eq!(full, case.compatible && reverse, "FULL {}", case.name);
        // With a single earlier version, transitive levels agree with the
        // plain ones, and NONE admits everything.
        assert_eq!(
            admits(
                &api,
                "BACKWARD_TRANSITIVE",
                &case.writer,
                &case.reader,
                &format!("bt{i}")
            )
            .await,
            backward,
            "BACKWARD_TRANSITIVE {}",
            case.name
        );
        assert_eq!(
            admits(
                &api,
                "FORWARD_TRANSITIVE",
                &case.reader,
                &case.writer,
                &format!("ft{i}")
            )
            .await,
            forward,
            "FORWARD_TRANSITIVE {}",
            case.name
        );
        assert_eq!(
            admits(
                &api,
                "FULL_TRANSITIVE",
                &case.writer,
                &case.reader,
                &format!("ut{i}")
            )
            .await,
            full,
            "FULL_TRANSITIVE {}",
            case.name
        );
        assert!(admits(&api, "NONE", &case.writer, &case.reader, &format!("n{i}")).await);
        if case.compatible {
            positive += 1;
        } else {
            negative += 1;
        }
    }
    assert!(
        positive >= 20 && negative >= 20,
        "{positive} positive, {negative} negative"
    );
}

async fn transitive_levels_check_every_version(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let v1 = record("E", json!([{"name": "a", "type": "int"}]));
    let v2 = record(
        "E",
        json!([{"name": "a", "type": "int", "default": 0}, {"name": "b", "type": "string", "default": ""}]),
    );
    // Drops `a`: v2 (with a default for it) reads the new data, v1 cannot.
    let v3 = record("E", json!([{"name": "b", "type": "string", "default": ""}]));
    for (level, expected) in [
        ("FORWARD", true),
        ("FORWARD_TRANSITIVE", false),
        ("FULL", true),
        ("FULL_TRANSITIVE", false),
    ] {
        let subject = format!("t-{level}");
        api.put(
            &format!("/config/{subject}"),
            json!({"compatibility": "NONE"}),
        )
        .await;
        api.register(&subject, &v1).await;
        api.register(&subject, &v2).await;
        api.put(
            &format!("/config/{subject}"),
            json!({"compatibility": level}),
        )
        .await;
        let (status, body) = api
            .post(
                &format!("/subjects/{subject}/versions"),
                json!({"schema": v3.to_string()}),
            )
            .await;
        assert_eq!(status == StatusCode::OK, expected, "{level}: {body}");
        if !expected {
            assert_eq!(error_code(&body), 409, "{level}");
        }
    }
    // BACKWARD_TRANSITIVE: a new field without default fails against v1
    // even when the latest has it.
    let w1 = record("F", json!([{"name": "a", "type": "int"}]));
    let w2 = record(
        "F",
        json!([{"name": "a", "type": "int"}, {"name": "b", "type": "int"}]),
    );
    let w3 = record(
        "F",
        json!([{"name": "a", "type": "int"}, {"name": "b", "type": "int"}, {"name": "c", "type": "int", "default": 1}]),
    );
    api.put("/config/bt", json!({"compatibility": "NONE"}))
        .await;
    api.register("bt", &w1).await;
    api.register("bt", &w2).await;
    api.put("/config/bt", json!({"compatibility": "BACKWARD"}))
        .await;
    let (_, ok) = api
        .post(
            "/compatibility/subjects/bt/versions/latest",
            json!({"schema": w3.to_string()}),
        )
        .await;
    assert_eq!(ok, json!({"is_compatible": true}));
    api.put(
        "/config/bt",
        json!({"compatibility": "BACKWARD_TRANSITIVE"}),
    )
    .await;
    let (_, not) = api
        .post(
            "/compatibility/subjects/bt/versions/latest",
            json!({"schema": w3.to_string()}),
        )
        .await;
    assert_eq!(not, json!({"is_compatible": false}));
}

async fn concurrent_registrations_agree(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Arc::new(Api::new(&registry));
    let schema = record("Shared", json!([{"name": "x", "type": "string"}]));
    // Many clients register the same schema at once: one id, one version.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (api, schema) = (api.clone(), schema.clone());
        let subject = if i % 2 == 0 { "same-a" } else { "same-b" };
        tasks.push(tokio::spawn(
            async move { api.register(subject, &schema).await },
        ));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "ids differ: {ids:?}");
    assert_eq!(api.get("/subjects/same-a/versions").await.1, json!([1]));
    assert_eq!(api.get("/subjects/same-b/versions").await.1, json!([1]));
    // Different compatible schemas at once: distinct, gapless versions.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let api = api.clone();
        let schema = record(
            "Grow",
            json!([{"name": "x", "type": "string"}, {"name": format!("f{i}"), "type": "int", "default": i}]),
        );
        tasks.push(tokio::spawn(
            async move { api.register("grow", &schema).await },
        ));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 8);
    assert_eq!(
        api.get("/subjects/grow/versions").await.1,
        json!([1, 2, 3, 4, 5, 6, 7, 8])
    );
}

async fn ids_survive_a_restart(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let a = record("A", json!([{"name": "x", "type": "int"}]));
    let b = record("B", json!([{"name": "y", "type": "int"}]));
    let id_a = api.register("a", &a).await;
    let id_b = api.register("b", &b).await;
    api.put("/config/a", json!({"compatibility": "FULL"})).await;
    let stopped = registry.stop().await;

    let registry = stopped.restart(ServerOptions::default()).await;
    let api = Api::new(&registry);
    assert_eq!(api.get(&format!("/schemas/ids/{id_a}/schema")).await.1, a);
    assert_eq!(api.get(&format!("/schemas/ids/{id_b}/schema")).await.1, b);
    assert_eq!(
        api.register("a", &a).await,
        id_a,
        "re-registering after a restart keeps the id"
    );
    assert_eq!(
        api.get("/config/a").await.1,
        json!({"compatibilityLevel": "FULL"})
    );
    let c = record("C", json!([{"name": "z", "type": "int"}]));
    let id_c = api.register("c", &c).await;
    assert!(
        id_c > id_b,
        "ids keep growing after a restart: {id_c} after {id_b}"
    );
}

async fn references_and_the_codec_through_the_client(backend: RegistryBackend) {
    use keel_schemas::domain::avsc;
    use keel_schemas::events::{Address, ShipmentDispatched, Timestamp};
    use keel_schemas::server::store::SchemaReference;
    use keel_schemas::{
        AvroCodec, ClientOptions, CodecOptions, RegistryClient, SubjectNameStrategy,
    };

    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let client =
        Arc::new(RegistryClient::new(&registry.url, ClientOptions::default()).expect("client"));
    // Register the .avsc files as CI would: Address first, then the event
    // that references it.
    client
        .register_schema(
            "shop.common.Address",
            avsc("shop.common.Address.avsc").unwrap(),
            &[],
            false,
        )
        .await
        .expect("address");
    let reference = SchemaReference {
        name: "shop.common.Address".into(),
        subject: "shop.common.Address".into(),
        version: 1,
    };
    let id = client
        .register_schema(
            "shipments-value",
            avsc("shop.shipping.ShipmentDispatched.avsc").unwrap(),
            std::slice::from_ref(&reference),
            false,
        )
        .await
        .expect("shipment");

    // The codec's derived schema (address inline, no docs) is the same
    // schema: lookup finds the registered id, so nothing is re-registered.
    let codec = AvroCodec::new(
        client.clone(),
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: false,
        },
    );
    let event = ShipmentDispatched {
        shipment_id: uuid::Uuid::now_v7(),
        order_id: uuid::Uuid::now_v7(),
        dispatched_at: Timestamp::from_millis(1_764_300_000_000).unwrap(),
        carrier: "DHL".into(),
        tracking_number: "JD014600003".into(),
        address: Address {
            line1: "2 Harbour Road".into(),
            line2: Some("Unit 4".into()),
            city: "Bristol".into(),
            postal_code: "BS1 5LL".into(),
            country: "GB".into(),
        },
    };
    let bytes = codec.encode("shipments", &event).await.expect("encode");
    assert_eq!(
        u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
        id
    );
    // A fresh codec decodes by fetching the schema and its reference.
    let reader = AvroCodec::new(
        Arc::new(RegistryClient::new(&registry.url, ClientOptions::default()).expect("client")),
        CodecOptions::default(),
    );
    assert_eq!(
        reader
            .decode::<ShipmentDispatched>(&bytes)
            .await
            .expect("decode"),
        event
    );
    let warm = codec.registry_calls() + reader.registry_calls();
    for _ in 0..100 {
        let bytes = codec.encode("shipments", &event).await.unwrap();
        reader.decode::<ShipmentDispatched>(&bytes).await.unwrap();
    }
    assert_eq!(
        codec.registry_calls() + reader.registry_calls(),
        warm,
        "no registry calls once warm"
    );

    // A stopped registry is a retriable error, not a hang or a panic.
    let url = registry.url.clone();
    drop(registry.stop().await);
    let cold = RegistryClient::new(
        &url,
        ClientOptions {
            retries: 1,
            backoff: std::time::Duration::from_millis(10),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let err = cold.schema(id).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
}

/// Levels of subjects where every subject references every subject of the
/// level below: a registration that followed each path anew would read
/// 8^7 (two million) referenced versions for a top subject; read once each,
/// it is a few dozen, and each registration answers at once.
async fn a_lattice_of_references_is_read_once_per_subject(backend: RegistryBackend) {
    const WIDTH: usize = 8;
    const LEVELS: usize = 8;
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let name = |level: usize, j: usize| format!("L{level}x{j}");
    for level in (0..LEVELS).rev() {
        for j in 0..WIDTH {
            let below = level + 1 < LEVELS;
            let fields: Vec<Value> = if below {
                (0..WIDTH)
                    .map(|k| json!({"name": format!("f{k}"), "type": format!("test.{}", name(level + 1, k))}))
                    .collect()
            } else {
                vec![json!({"name": "v", "type": "int"})]
            };
            let references: Vec<Value> = if below {
                (0..WIDTH)
                    .map(|k| json!({"name": format!("test.{}", name(level + 1, k)), "subject": name(level + 1, k), "version": -1}))
                    .collect()
            } else {
                Vec::new()
            };
            let registered = tokio::time::timeout(
                std::time::Duration::from_secs(60),
                api.post(
                    &format!("/subjects/{}/versions", name(level, j)),
                    json!({"schema": record(&name(level, j), json!(fields)).to_string(), "references": references}),
                ),
            )
            .await;
            let Ok((status, body)) = registered else {
                panic!("registering {} took over 60 s", name(level, j));
            };
            assert_eq!(status, StatusCode::OK, "{}: {body}", name(level, j));
        }
    }
    // What was stored pins every reference to the version it resolved to.
    let (status, body) = api
        .get(&format!("/subjects/{}/versions/1", name(0, 0)))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let references = body["references"].as_array().unwrap();
    assert_eq!(references.len(), WIDTH);
    assert!(references.iter().all(|r| r["version"] == 1), "{body}");
    // A client resolving it (a consumer meeting its id) reads each
    // referenced version once too.
    let id = u32::try_from(body["id"].as_i64().unwrap()).unwrap();
    let client = keel_schemas::RegistryClient::new(&registry.url, Default::default()).unwrap();
    let resolved = tokio::time::timeout(std::time::Duration::from_secs(60), client.resolved(id))
        .await
        .expect("resolved in under 60 s")
        .expect("resolved");
    assert!(
        resolved.contains(&name(LEVELS - 1, WIDTH - 1)),
        "{resolved}"
    );
}

async fn bad_requests_get_codes_not_500s(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(
        backend,
        ServerOptions {
            body_limit: 64 * 1024,
            ..ServerOptions::default()
        },
    )
    .await;
    let api = Api::new(&registry);
    let http = reqwest::Client::new();
    let url = format!("{}/subjects/s/versions", registry.url);
    let schema = json!({"schema": "\"string\""}).to_string();
    // The three media types Confluent accepts.
    for media in [
        V1,
        "application/vnd.schemaregistry+json",
        "application/json",
    ] {
        let response = http
            .post(&url)
            .header("content-type", media)
            .body(schema.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{media}");
    }
    let response = http
        .post(&url)
        .header("content-type", "text/plain")
        .body(schema)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let cases: Vec<(&str, String, i64)> = vec![
        ("malformed JSON", "{\"schema\": ".into(), 422),
        ("missing schema", "{}".into(), 422),
        ("schema not JSON", json!({"schema": "{nope"}).to_string(), 42201),
        ("not an Avro schema", json!({"schema": "{\"type\": \"nope\"}"}).to_string(), 42201),
        ("bad default", json!({"schema": record("D", json!([{"name": "a", "type": "int", "default": "x"}])).to_string()}).to_string(), 42201),
        ("protobuf", json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}).to_string(), 42201),
        ("missing reference", json!({"schema": "\"x.Y\"", "references": [{"name": "x.Y", "subject": "nope", "version": 1}]}).to_string(), 42201),
        ("too deep", json!({"schema": deep(200).to_string()}).to_string(), 42201),
    ];
    for (what, body, code) in cases {
        let response = http
            .post(&url)
            .header("content-type", V1)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {answer}");
        assert_eq!(error_code(&answer), code, "{what}: {answer}");
    }
    // Each schema within the depth limit, but with its reference inlined
    // nested deeper than a stored schema can be read back: refused, never
    // stored (stored, it would drop out of every later compatibility
    // check and no codec could parse it).
    let (status, body) = api
        .post(
            "/subjects/nested-a/versions",
            json!({"schema": nested_records("a", 25, json!("int")).to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .post(
            "/subjects/nested-b/versions",
            json!({"schema": nested_records("b", 25, json!("a.L0")).to_string(),
                   "references": [{"name": "a.L0", "subject": "nested-a", "version": 1}]}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, 42201),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("read back"),
        "{body}"
    );
    let huge = json!({"schema": format!("\"{}\"", "x".repeat(100 * 1024))}).to_string();
    let response = http
        .post(&url)
        .header("content-type", V1)
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&api.get("/no/such/path").await.1), 404);
    // What the HTTP layer itself refuses (a method the path does not take,
    // a flag that is not a boolean) answers in Confluent's shape too.
    let (status, body) = api.put("/subjects", json!({})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, 405),
        "{body}"
    );
    let response = http
        .put(format!("{}/subjects", registry.url))
        .send()
        .await
        .unwrap();
    let allow = response
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        allow.as_deref().is_some_and(|a| a.contains("GET")),
        "{allow:?}"
    );
    let (status, body) = api.get("/subjects?deleted=maybe").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, 400),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("deleted"),
        "{body}"
    );

    // A failing store is a 50001 with the store's message, not a crash.
    sqlx::any::install_default_drivers();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&registry.database_url)
        .await
        .expect("connect to the registry's database");
    sqlx::query("DROP TABLE registry_mode")
        .execute(&mut admin)
        .await
        .expect("drop");
    let (status, body) = api.get("/mode").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::INTERNAL_SERVER_ERROR, 50001)
    );
    assert!(
        body["message"].as_str().unwrap().contains("registry_mode"),
        "{body}"
    );
    drop(registry);

    // Basic auth.
    let registry = RegistryUnderTest::start(
        backend,
        ServerOptions {
            basic_auth: Some("keel:s3cret".into()),
            ..ServerOptions::default()
        },
    )
    .await;
    let response = http
        .get(format!("{}/subjects", registry.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
    let response = http
        .get(format!("{}/subjects", registry.url))
        .basic_auth("keel", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let client = keel_schemas::RegistryClient::new(
        &registry.url,
        keel_schemas::ClientOptions {
            basic_auth: Some("keel:s3cret".into()),
            ..keel_schemas::ClientOptions::default()
        },
    )
    .unwrap();
    assert_eq!(client.subjects().await.unwrap(), Vec::<String>::new());
}

/// IMPORT mode, as Confluent defines it: schemas copied from another
/// registry keep their ids and versions; ids assigned afterwards continue
/// above them; nothing already stored is overwritten.
async fn import_mode_keeps_ids_and_versions(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let v1 = record("Imported", json!([{"name": "a", "type": "string"}]));
    // Incompatible with v1 under BACKWARD: imports skip the check.
    let v2 = record("Imported", json!([{"name": "a", "type": "int"}]));
    let other = record("Other", json!([{"name": "b", "type": "long"}]));
    let import = |subject: &str, schema: &Value, id: i64, version: Option<i64>| {
        let mut body = json!({"schema": schema.to_string(), "id": id});
        if let Some(version) = version {
            body["version"] = json!(version);
        }
        (format!("/subjects/{subject}/versions"), body)
    };
    let refused = |(status, body): (StatusCode, Value)| {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        error_code(&body)
    };

    // READWRITE: an explicit id is refused.
    let (path, body) = import("orders-value", &v1, 5000, None);
    assert_eq!(refused(api.post(&path, body).await), 42205);

    // A registry holding subjects switches to IMPORT only when forced.
    let plain_id = api.register("plain", &other).await;
    assert_eq!(
        refused(api.put("/mode", json!({"mode": "IMPORT"})).await),
        42205
    );
    assert_eq!(api.get("/mode").await.1, json!({"mode": "READWRITE"}));
    // An empty subject may switch on its own.
    assert_eq!(
        api.put("/mode/orders-value", json!({"mode": "IMPORT"}))
            .await
            .1,
        json!({"mode": "IMPORT"})
    );
    // …but one holding versions not without force.
    assert_eq!(
        refused(api.put("/mode/plain", json!({"mode": "IMPORT"})).await),
        42205
    );

    // IMPORT: no id is refused; ids and versions are kept, out of order,
    // with gaps, without compatibility checks.
    assert_eq!(
        refused(
            api.post(
                "/subjects/orders-value/versions",
                json!({"schema": v1.to_string()})
            )
            .await
        ),
        42205
    );
    // A version past 2^31-1 is refused (no next version could follow).
    let (path, body) = import("orders-value", &v2, 5009, Some(i64::MAX));
    assert_eq!(refused(api.post(&path, body).await), 42202);
    let (path, body) = import("orders-value", &v2, 5003, Some(3));
    assert_eq!(
        api.post(&path, body).await,
        (StatusCode::OK, json!({"id": 5003}))
    );
    let (path, body) = import("orders-value", &v1, 5001, Some(1));
    assert_eq!(
        api.post(&path, body).await,
        (StatusCode::OK, json!({"id": 5001}))
    );
    // Again: idempotent.
    let (path, body) = import("orders-value", &v1, 5001, Some(1));
    assert_eq!(
        api.post(&path, body).await,
        (StatusCode::OK, json!({"id": 5001}))
    );
    assert_eq!(
        api.get("/subjects/orders-value/versions").await.1,
        json!([1, 3])
    );
    let (_, got) = api.get("/subjects/orders-value/versions/3").await;
    assert_eq!(
        (got["id"].clone(), got["version"].clone()),
        (json!(5003), json!(3))
    );
    assert_eq!(api.get("/schemas/ids/5001/schema").await.1, v1);

    // Nothing is overwritten: an id holding another schema (42205), a
    // schema stored under another id (42207), a version holding another
    // schema (42205).
    let (path, body) = import("orders-value", &other, 5001, None);
    assert_eq!(refused(api.post(&path, body).await), 42205);
    let (path, body) = import("orders-value", &v1, 5009, None);
    assert_eq!(refused(api.post(&path, body).await), 42207);
    let third = record("Third", json!([{"name": "c", "type": "double"}]));
    let (path, body) = import("orders-value", &third, 5004, Some(3));
    assert_eq!(refused(api.post(&path, body).await), 42205);
    assert_eq!(api.get("/schemas/ids/5004").await.0, StatusCode::NOT_FOUND);
    // No version given: the next one after the highest.
    let (path, body) = import("orders-value", &third, 5004, None);
    assert_eq!(
        api.post(&path, body).await,
        (StatusCode::OK, json!({"id": 5004}))
    );
    assert_eq!(
        api.get("/subjects/orders-value/versions").await.1,
        json!([1, 3, 4])
    );
    // Ids beyond what the wire format carries are refused, and id 0, which
    // `GET /schemas/ids/0` could never answer.
    let (path, body) = import("orders-value", &third, 1 << 40, None);
    assert_eq!(refused(api.post(&path, body).await), 42201);
    let (path, body) = import("orders-value", &third, 0, None);
    assert_eq!(refused(api.post(&path, body).await), 42201);
    // The last version number taken: there is no next one (no version
    // past 2^31-1, which clients could not name).
    api.put("/mode/edge-value", json!({"mode": "IMPORT"})).await;
    let edge = |field: &str| record("Edge", json!([{"name": field, "type": "string"}]));
    let (path, body) = import("edge-value", &edge("x"), 5101, Some(i64::from(i32::MAX)));
    assert_eq!(
        api.post(&path, body).await,
        (StatusCode::OK, json!({"id": 5101}))
    );
    let (path, body) = import("edge-value", &edge("y"), 5102, None);
    let (status, body) = api.post(&path, body).await;
    assert_ne!(status, StatusCode::OK, "{body}");
    assert!(
        body.to_string().contains("no version number left"),
        "{body}"
    );
    assert_eq!(
        api.get("/subjects/edge-value/versions").await.1,
        json!([i32::MAX])
    );

    // Back to READWRITE: new ids continue above every imported one, and
    // normal registration checks compatibility against the imported
    // versions again.
    api.put("/mode/orders-value", json!({"mode": "READWRITE"}))
        .await;
    let fresh = record("Fresh", json!([{"name": "d", "type": "string"}]));
    let fresh_id = api.register("fresh", &fresh).await;
    assert!(
        fresh_id > 5004,
        "new ids continue above imported ones: {fresh_id} (plain was {plain_id})"
    );
    let v5 = record(
        "Third",
        json!([{"name": "c", "type": "double"}, {"name": "e", "type": "int"}]),
    );
    let (status, body) = api
        .post(
            "/subjects/orders-value/versions",
            json!({"schema": v5.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), 409);

    // Forced, the whole registry switches; READWRITE afterwards refuses ids.
    assert_eq!(
        api.put("/mode?force=true", json!({"mode": "IMPORT"}))
            .await
            .1,
        json!({"mode": "IMPORT"})
    );
    let (path, body) = import("plain", &v2, 5003, None);
    assert_eq!(
        api.post(&path, body).await,
        (StatusCode::OK, json!({"id": 5003}))
    );
    api.put("/mode", json!({"mode": "READWRITE"})).await;
    let (path, body) = import("plain", &v1, 5001, None);
    assert_eq!(refused(api.post(&path, body).await), 42205);
}

/// An import that takes the largest id the wire format carries leaves no
/// id for a new schema: registering one is refused (naming why), not given
/// an id past four bytes; schemas already stored still register.
async fn new_ids_stop_at_the_wire_formats_limit(backend: RegistryBackend) {
    let registry = RegistryUnderTest::start(backend, ServerOptions::default()).await;
    let api = Api::new(&registry);
    let first = record("First", json!([{"name": "a", "type": "string"}]));
    let last = record("Last", json!([{"name": "b", "type": "string"}]));
    let first_id = api.register("first-value", &first).await;
    api.put("/mode/last-value", json!({"mode": "IMPORT"})).await;
    let max = i64::from(i32::MAX);
    assert_eq!(
        api.post(
            "/subjects/last-value/versions",
            json!({"schema": last.to_string(), "id": max}),
        )
        .await,
        (StatusCode::OK, json!({"id": max}))
    );
    api.put("/mode/last-value", json!({"mode": "READWRITE"}))
        .await;
    let (status, body) = api
        .post(
            "/subjects/next-value/versions",
            json!({"schema": record("Next", json!([{"name": "c", "type": "long"}])).to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(error_code(&body), 50001, "{body}");
    assert!(body.to_string().contains("No schema id left"), "{body}");
    assert_eq!(
        api.get("/subjects/next-value/versions").await.0,
        StatusCode::NOT_FOUND
    );
    // Nothing of the refused schema was kept: it imports under a free id.
    api.put("/mode/next-value", json!({"mode": "IMPORT"})).await;
    assert_eq!(
        api.post(
            "/subjects/next-value/versions",
            json!({"schema": record("Next", json!([{"name": "c", "type": "long"}])).to_string(), "id": 77}),
        )
        .await,
        (StatusCode::OK, json!({"id": 77}))
    );
    // Schemas the registry holds keep their ids.
    assert_eq!(api.register("other-value", &first).await, first_id);
    assert_eq!(api.register("last-value", &last).await, max as u64);
}

/// The registry served over HTTPS with a private CA's certificate: the
/// client trusting that CA registers, looks up and fetches (with basic
/// auth over TLS); a client that does not trust it, or speaks plain HTTP to
/// the port, gets an error naming the registry and registers nothing.
async fn the_client_speaks_tls_to_an_https_registry(backend: RegistryBackend) {
    use keel_schemas::{ClientOptions, Registry, RegistryClient, SchemaError};
    let dir = keel_integration_tests::TempDir::new();
    // A private CA and the registry's certificate, signed by it.
    let ca = keel_integration_tests::tls::TestCa::new();
    let (registry_cert, registry_key) = ca.issue(&["127.0.0.1", "localhost"]);
    // The trusted file is a bundle: another CA first, then the right one.
    let other = keel_integration_tests::tls::TestCa::new();
    let ca_pem = format!("{}{}", other.pem(), ca.pem()).into_bytes();
    let certificate_chain = dir.path().join("registry.pem");
    let private_key = dir.path().join("registry.key");
    std::fs::write(&certificate_chain, registry_cert).unwrap();
    std::fs::write(&private_key, registry_key).unwrap();
    let auth = "keel:s3cret".to_owned();
    let registry = RegistryUnderTest::start(
        backend,
        ServerOptions {
            basic_auth: Some(auth.clone()),
            tls: Some(ServerTls {
                certificate_chain,
                private_key,
            }),
            ..ServerOptions::default()
        },
    )
    .await;
    assert!(registry.url.starts_with("https://"), "{}", registry.url);
    let options = |ca: Option<Vec<u8>>| ClientOptions {
        basic_auth: Some(auth.clone()),
        ca_certificate_pem: ca,
        retries: 0,
        ..ClientOptions::default()
    };
    let schema = record("Secure", json!([{"name": "a", "type": "string"}])).to_string();

    let trusting = RegistryClient::new(&registry.url, options(Some(ca_pem.clone()))).unwrap();
    let id = trusting.register("secure-value", &schema).await.unwrap();
    assert_eq!(
        trusting.lookup("secure-value", &schema).await.unwrap(),
        Some(id)
    );
    let fresh = RegistryClient::new(&registry.url, options(Some(ca_pem.clone()))).unwrap();
    let fetched: Value = serde_json::from_str(&fresh.schema_by_id(id).await.unwrap()).unwrap();
    assert_eq!(
        (&fetched["name"], &fetched["fields"]),
        (
            &json!("test.Secure"),
            &json!([{"name": "a", "type": "string"}])
        )
    );

    let stranger = RegistryClient::new(&registry.url, options(None)).unwrap();
    let refused = stranger.register("other-value", &schema).await.unwrap_err();
    assert!(
        matches!(&refused, SchemaError::Unreachable { url, .. } if url.starts_with(&registry.url)),
        "untrusted certificate: {refused}"
    );
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "the error says why: {refused}"
    );
    let plain_url = registry.url.replacen("https://", "http://", 1);
    let plain = RegistryClient::new(&plain_url, options(None)).unwrap();
    let refused = plain.register("other-value", &schema).await.unwrap_err();
    assert!(
        refused.to_string().contains(&plain_url),
        "the error names the registry: {refused}"
    );
    assert_eq!(
        trusting.lookup("other-value", &schema).await.unwrap(),
        None,
        "nothing registered by the refused clients"
    );
}

/// `levels` records nested one in another's only field, in namespace `ns`,
/// the innermost holding `last`.
fn nested_records(ns: &str, levels: usize, last: Value) -> Value {
    let mut v = last;
    for level in (0..levels).rev() {
        v = json!({"type": "record", "namespace": ns, "name": format!("L{level}"),
                   "fields": [{"name": "f", "type": v}]});
    }
    v
}

fn deep(levels: usize) -> Value {
    let mut v = json!("int");
    for _ in 0..levels {
        v = json!({"type": "array", "items": v});
    }
    v
}
