//! A client for any Confluent-compatible schema registry (Keel's own,
//! Confluent, Redpanda, Apicurio's ccompat API, Karapace).
//!
//! Answers are cached in-process — schema by id, id by (subject, schema) —
//! so once warm the codec makes no HTTP calls. Connection failures,
//! timeouts and 5xx answers are retried with exponential backoff; 4xx
//! answers are returned at once as [`SchemaError::Registry`] with
//! Confluent's error code.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use crate::canonical::{References, named_types, resolve};
use crate::error::{Result, SchemaError};
use crate::registry::Registry;
use crate::server::store::SchemaReference;

/// The media type Confluent's clients send.
const MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// How deep reference chains are followed.
const MAX_REFERENCE_DEPTH: usize = 16;

/// Client settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Per-request timeout. Default 10 s.
    pub timeout: Duration,
    /// Retries after a connection error, timeout or 5xx. Default 3.
    pub retries: u32,
    /// First retry delay; doubles each retry. Default 100 ms.
    pub backoff: Duration,
    /// `user:password` for basic auth.
    pub basic_auth: Option<String>,
    /// Extra trusted CA certificates (PEM, one or more) for `https://`
    /// registries, besides the public (webpki) roots.
    pub ca_certificate_pem: Option<Vec<u8>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            retries: 3,
            backoff: Duration::from_millis(100),
            basic_auth: None,
            ca_certificate_pem: None,
        }
    }
}

/// A registered schema as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaInfo {
    /// Schema text.
    pub schema: String,
    /// References, if any.
    #[serde(default)]
    pub references: Vec<SchemaReference>,
    /// `AVRO` when absent.
    #[serde(default)]
    pub schema_type: Option<String>,
}

/// A subject version as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct VersionInfo {
    /// Subject.
    pub subject: String,
    /// Global schema id.
    pub id: u32,
    /// Version in the subject.
    pub version: i64,
    /// Schema text.
    pub schema: String,
    /// References, if any.
    #[serde(default)]
    pub references: Vec<SchemaReference>,
}

/// The result of a compatibility check.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct CompatibilityInfo {
    /// Whether the schema may be registered.
    pub is_compatible: bool,
    /// Why not (with `verbose`).
    #[serde(default)]
    pub messages: Vec<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: i64,
    message: String,
}

/// An HTTP client of a Confluent-compatible registry, with caches.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    options: ClientOptions,
    by_id: RwLock<HashMap<u32, Arc<str>>>,
    ids: RwLock<HashMap<(String, String), u32>>,
}

impl RegistryClient {
    /// A client for the registry at `url` (`http://host:8081`).
    pub fn new(url: &str, mut options: ClientOptions) -> Result<Self> {
        // Never a password in a message or a log line.
        let shown = keel_core::config::redact(url);
        let mut base = Url::parse(url).map_err(|e| {
            SchemaError::Settings(format!("registry URL `{shown}` is not a URL: {e}"))
        })?;
        // Paths are appended to it: `registry:8081` (scheme `registry`)
        // would fail at every request instead of here.
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(SchemaError::Settings(format!(
                "registry URL `{shown}` is not an http:// or https:// URL"
            )));
        }
        // `http://user:password@host`: sent as basic auth, and kept out of
        // the URL every message and log line quotes.
        if !base.username().is_empty() || base.password().is_some() {
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .map(|p| p.into_owned())
                    .map_err(|_| {
                        SchemaError::Settings(format!(
                            "registry URL `{shown}`: its credentials are not UTF-8 once decoded"
                        ))
                    })
            };
            let credentials = format!(
                "{}:{}",
                decode(base.username())?,
                decode(base.password().unwrap_or_default())?
            );
            if options
                .basic_auth
                .as_ref()
                .is_some_and(|given| *given != credentials)
            {
                return Err(SchemaError::Settings(format!(
                    "registry URL `{shown}` carries credentials and basic auth gives others; \
                     give them once"
                )));
            }
            options.basic_auth = Some(credentials);
            // Only fails for URLs that cannot be a base, refused above.
            let _ = base.set_username("");
            let _ = base.set_password(None);
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        // Sent as `user:password`: without the colon nothing could be sent,
        // and the registry's 401 would not say why.
        if options
            .basic_auth
            .as_deref()
            .is_some_and(|c| !c.contains(':'))
        {
            return Err(SchemaError::Settings(
                "basic auth: give it as user:password (the colon is missing)".to_owned(),
            ));
        }
        let mut builder = reqwest::Client::builder().timeout(options.timeout);
        if let Some(pem) = &options.ca_certificate_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SchemaError::Settings(format!("registry CA certificate: {e}")))?;
            if certs.is_empty() {
                return Err(SchemaError::Settings(
                    "registry CA certificate: no PEM certificate found".to_owned(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| SchemaError::Unreachable {
            url: self::shown(&base),
            cause: chain(&e).into(),
        })?;
        Ok(RegistryClient {
            http,
            base,
            options,
            by_id: RwLock::default(),
            ids: RwLock::default(),
        })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &Url {
        &self.base
    }

    fn endpoint(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| {
                SchemaError::Settings(format!(
                    "registry URL `{}` cannot have a path",
                    shown(&self.base)
                ))
            })?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// Sends a request, retrying transient failures; decodes the JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<T> {
        let mut delay = self.options.backoff;
        let mut attempt = 0;
        // For messages: no key or token of the query.
        let shown_url = shown(&url);
        loop {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .header(reqwest::header::ACCEPT, MEDIA_TYPE);
            if let Some((user, password)) = self
                .options
                .basic_auth
                .as_deref()
                .and_then(|c| c.split_once(':'))
            {
                request = request.basic_auth(user, Some(password));
            }
            if let Some(body) = body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, MEDIA_TYPE)
                    .body(body.to_string());
            }
            let outcome = match request.send().await {
                Ok(response) => 'answer: {
                    let status = response.status();
                    let text = match read_capped(response, MAX_ANSWER_BYTES).await {
                        Ok(text) => text,
                        Err(Some(e)) => {
                            break 'answer SchemaError::Unreachable {
                                url: shown(&self.base),
                                cause: format!(
                                    "the answer from {shown_url} broke off: {}",
                                    chain(&e.without_url())
                                )
                                .into(),
                            };
                        }
                        Err(None) => {
                            return Err(SchemaError::Registry {
                                status: status.as_u16(),
                                code: 0,
                                message: format!(
                                    "the answer from {shown_url} is larger than {} MiB; \
                                     is this URL a schema registry?",
                                    MAX_ANSWER_BYTES >> 20
                                ),
                            });
                        }
                    };
                    if status.is_success() {
                        return serde_json::from_str(&text).map_err(|e| SchemaError::Registry {
                            status: status.as_u16(),
                            code: 0,
                            message: format!("unexpected answer from {shown_url}: {e}"),
                        });
                    }
                    let error = match serde_json::from_str::<ErrorBody>(&text) {
                        Ok(body) => SchemaError::Registry {
                            status: status.as_u16(),
                            code: body.error_code,
                            message: body.message,
                        },
                        Err(_) => SchemaError::Registry {
                            status: status.as_u16(),
                            code: i64::from(status.as_u16()),
                            message: if text.trim().is_empty() {
                                format!(
                                    "{} from {shown_url} with no error body (is this URL a \
                                     Confluent-compatible schema registry?)",
                                    status.canonical_reason().unwrap_or("no answer")
                                )
                            } else {
                                text.chars().take(500).collect()
                            },
                        },
                    };
                    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                        error
                    } else {
                        return Err(error);
                    }
                }
                Err(e) => SchemaError::Unreachable {
                    url: shown(&self.base),
                    cause: chain(&e.without_url()).into(),
                },
            };
            if attempt >= self.options.retries {
                return Err(outcome);
            }
            attempt += 1;
            tracing::warn!(error = %outcome, attempt, "schema registry call failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
    }

    /// `POST /subjects/{subject}/versions`: registers and returns the id.
    pub async fn register_schema(
        &self,
        subject: &str,
        schema: &str,
        references: &[SchemaReference],
        normalize: bool,
    ) -> Result<u32> {
        let url = self.endpoint(
            &["subjects", subject, "versions"],
            &normalize_query(normalize),
        )?;
        let body = request_body(schema, references);
        let answer: Value = self.call(Method::POST, url, Some(&body)).await?;
        id_of(&answer)
    }

    /// `POST /subjects/{subject}`: the version holding `schema`, if any.
    pub async fn lookup_schema(
        &self,
        subject: &str,
        schema: &str,
        references: &[SchemaReference],
        normalize: bool,
    ) -> Result<Option<VersionInfo>> {
        let url = self.endpoint(&["subjects", subject], &normalize_query(normalize))?;
        let body = request_body(schema, references);
        match self.call(Method::POST, url, Some(&body)).await {
            Ok(found) => Ok(Some(found)),
            Err(SchemaError::Registry {
                code: 40401 | 40403,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /schemas/ids/{id}`.
    pub async fn schema(&self, id: u32) -> Result<SchemaInfo> {
        let url = self.endpoint(&["schemas", "ids", &id.to_string()], &[])?;
        match self.call(Method::GET, url, None).await {
            Err(SchemaError::Registry { code: 40403, .. }) => Err(SchemaError::UnknownSchemaId(id)),
            other => other,
        }
    }

    /// `GET /subjects`.
    pub async fn subjects(&self) -> Result<Vec<String>> {
        self.call(Method::GET, self.endpoint(&["subjects"], &[])?, None)
            .await
    }

    /// `GET /subjects/{subject}/versions`.
    pub async fn versions(&self, subject: &str) -> Result<Vec<i64>> {
        self.call(
            Method::GET,
            self.endpoint(&["subjects", subject, "versions"], &[])?,
            None,
        )
        .await
    }

    /// `GET /subjects/{subject}/versions/{version}` (`"latest"` allowed).
    pub async fn version(&self, subject: &str, version: &str) -> Result<VersionInfo> {
        let url = self.endpoint(&["subjects", subject, "versions", version], &[])?;
        self.call(Method::GET, url, None).await
    }

    /// `POST /compatibility/subjects/{subject}/versions/{version}?verbose=true`.
    pub async fn check_compatibility(
        &self,
        subject: &str,
        version: &str,
        schema: &str,
        references: &[SchemaReference],
    ) -> Result<CompatibilityInfo> {
        let url = self.endpoint(
            &["compatibility", "subjects", subject, "versions", version],
            &[("verbose", "true")],
        )?;
        self.call(Method::POST, url, Some(&request_body(schema, references)))
            .await
    }

    /// `GET /config` or `GET /config/{subject}?defaultToGlobal=true`.
    pub async fn compatibility_level(&self, subject: Option<&str>) -> Result<String> {
        let url = match subject {
            Some(s) => self.endpoint(&["config", s], &[("defaultToGlobal", "true")])?,
            None => self.endpoint(&["config"], &[])?,
        };
        let answer: Value = self.call(Method::GET, url, None).await?;
        Ok(answer["compatibilityLevel"]
            .as_str()
            .unwrap_or("BACKWARD")
            .to_owned())
    }

    /// `PUT /config` or `PUT /config/{subject}`.
    pub async fn set_compatibility_level(&self, subject: Option<&str>, level: &str) -> Result<()> {
        let url = match subject {
            Some(s) => self.endpoint(&["config", s], &[])?,
            None => self.endpoint(&["config"], &[])?,
        };
        let _: Value = self
            .call(Method::PUT, url, Some(&json!({"compatibility": level})))
            .await?;
        Ok(())
    }

    /// The self-contained normal form of schema `id`, references resolved.
    pub async fn resolved(&self, id: u32) -> Result<String> {
        let info = self.schema(id).await?;
        let mut references = References::new();
        let mut done = std::collections::HashSet::new();
        self.references(&info.references, 0, &mut references, &mut done)
            .await?;
        let doc: Value = serde_json::from_str(&info.schema)
            .map_err(|e| SchemaError::InvalidSchema(format!("schema {id} is not JSON: {e}")))?;
        Ok(resolve(&doc, &references)?.to_string())
    }

    /// Adds the named types of `references` (and of theirs) to `out`.
    /// Each subject version is fetched once (`done`): references that
    /// share theirs (a lattice) would otherwise cost a call per path.
    async fn references(
        &self,
        references: &[SchemaReference],
        depth: usize,
        out: &mut References,
        done: &mut std::collections::HashSet<(String, String)>,
    ) -> Result<()> {
        if depth > MAX_REFERENCE_DEPTH {
            return Err(SchemaError::InvalidSchema(
                "schema references nest too deep (a cycle?)".into(),
            ));
        }
        for r in references {
            let version = if r.version == -1 {
                "latest".to_owned()
            } else {
                r.version.to_string()
            };
            // Marked done once walked, not before: a cycle still runs
            // into the depth limit and is named.
            let key = (r.subject.clone(), version);
            if done.contains(&key) {
                continue;
            }
            let target = self.version(&key.0, &key.1).await?;
            Box::pin(self.references(&target.references, depth + 1, out, done)).await?;
            let doc: Value = serde_json::from_str(&target.schema).map_err(|e| {
                SchemaError::InvalidSchema(format!("referenced schema is not JSON: {e}"))
            })?;
            out.extend(named_types(&doc)?);
            done.insert(key);
        }
        Ok(())
    }
}

/// `url` for a message: credentials and secret query parameters (an API
/// key, a token) masked.
fn shown(url: &Url) -> String {
    keel_core::config::redact(url.as_str())
}

/// An error and its causes on one line (reqwest's own message omits the
/// cause, e.g. "connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

fn normalize_query(normalize: bool) -> Vec<(&'static str, &'static str)> {
    if normalize {
        vec![("normalize", "true")]
    } else {
        Vec::new()
    }
}

fn request_body(schema: &str, references: &[SchemaReference]) -> Value {
    let mut body = json!({"schema": schema});
    if !references.is_empty() {
        body["references"] = json!(references);
    }
    body
}

fn id_of(answer: &Value) -> Result<u32> {
    answer["id"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| SchemaError::Registry {
            status: 200,
            code: 0,
            message: format!("answer has no schema id: {answer}"),
        })
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Registry for RegistryClient {
    async fn schema_by_id(&self, id: u32) -> Result<Arc<str>> {
        if let Some(s) = read(&self.by_id).get(&id) {
            return Ok(s.clone());
        }
        let resolved: Arc<str> = Arc::from(self.resolved(id).await?);
        write(&self.by_id).insert(id, resolved.clone());
        Ok(resolved)
    }

    async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>> {
        let key = (subject.to_owned(), schema.to_owned());
        if let Some(id) = read(&self.ids).get(&key) {
            return Ok(Some(*id));
        }
        let found = self.lookup_schema(subject, schema, &[], true).await?;
        if let Some(v) = &found {
            write(&self.ids).insert(key, v.id);
        }
        Ok(found.map(|v| v.id))
    }

    async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let key = (subject.to_owned(), schema.to_owned());
        if let Some(id) = read(&self.ids).get(&key) {
            return Ok(*id);
        }
        let id = self.register_schema(subject, schema, &[], true).await?;
        write(&self.ids).insert(key, id);
        Ok(id)
    }
}

/// The largest registry answer read (a listing of every schema of a large
/// registry stays far below it; anything bigger is not a registry's).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The body of `response` as text, read chunk by chunk up to `cap` bytes:
/// `Err(None)` past it, `Err(Some(_))` when reading failed.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> std::result::Result<String, Option<reqwest::Error>> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Some)? {
        if body.len() + chunk.len() > cap {
            return Err(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode as Status;
    use axum::routing::get;

    #[test]
    fn credentials_without_a_colon_are_refused_not_dropped() {
        let options = |auth: &str| ClientOptions {
            basic_auth: Some(auth.to_owned()),
            ..ClientOptions::default()
        };
        let err = RegistryClient::new("http://127.0.0.1:1", options("keel")).expect_err("refused");
        assert!(matches!(err, SchemaError::Settings(_)), "{err}");
        assert!(err.to_string().contains("user:password"), "{err}");
        assert!(RegistryClient::new("http://127.0.0.1:1", options("keel:")).is_ok());
        let err =
            RegistryClient::new("registry:8081", ClientOptions::default()).expect_err("not http");
        assert!(matches!(err, SchemaError::Settings(_)), "{err}");
    }

    /// `http://user:password@host`: the credentials go out as basic auth
    /// (percent-decoded) and never into a message.
    #[tokio::test]
    async fn credentials_in_the_url_are_sent_as_basic_auth_and_never_shown() {
        let app = axum::Router::new().route(
            "/subjects",
            get(|headers: axum::http::HeaderMap| async move {
                use base64::Engine as _;
                let expected = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("nu:S3cret/x")
                );
                if headers
                    .get(axum::http::header::AUTHORIZATION)
                    .is_some_and(|v| *v == *expected)
                {
                    (Status::OK, "[\"s\"]")
                } else {
                    (
                        Status::UNAUTHORIZED,
                        "{\"error_code\":40101,\"message\":\"no\"}",
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = RegistryClient::new(
            &format!("http://nu:S3cret%2Fx@{address}"),
            ClientOptions::default(),
        )
        .expect("client");
        assert!(
            !client.url().as_str().contains("S3cret"),
            "{}",
            client.url()
        );
        assert_eq!(client.subjects().await.expect("authorised"), ["s"]);

        let quick = ClientOptions {
            retries: 0,
            ..ClientOptions::default()
        };
        let unreachable = RegistryClient::new("http://nu:S3cret@127.0.0.1:1", quick.clone())
            .expect("client")
            .subjects()
            .await
            .expect_err("nothing listens there");
        assert!(!unreachable.to_string().contains("S3cret"), "{unreachable}");
        // An API key or token in the query (for a proxy in front of the
        // registry) is sent along but never shown either.
        let unreachable = RegistryClient::new("http://127.0.0.1:1/?apikey=RegKey", quick.clone())
            .expect("client")
            .subjects()
            .await
            .expect_err("nothing listens there")
            .to_string();
        assert!(
            !unreachable.contains("RegKey") && unreachable.contains("apikey=***"),
            "{unreachable}"
        );
        for bad in ["ftp://nu:S3cret@h", "ht!tp://nu:S3cret@h"] {
            let e = RegistryClient::new(bad, quick.clone()).expect_err("refused");
            assert!(!e.to_string().contains("S3cret"), "{e}");
        }
        let other = ClientOptions {
            basic_auth: Some("someone:else".into()),
            ..quick
        };
        let e = RegistryClient::new("http://nu:S3cret@127.0.0.1:1", other).expect_err("twice");
        assert!(e.to_string().contains("give them once"), "{e}");
    }

    #[tokio::test]
    async fn oversized_and_empty_answers_are_named_errors() {
        let chunks = || {
            futures::stream::iter(
                (0..65).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1 << 20]))),
            )
        };
        let app = axum::Router::new()
            .route(
                "/subjects/sized/versions/latest",
                get(|| async { vec![b' '; MAX_ANSWER_BYTES + 1] }),
            )
            .route(
                "/subjects/streamed/versions/latest",
                get(move || async move { axum::body::Body::from_stream(chunks()) }),
            )
            .route(
                "/subjects/empty/versions/latest",
                get(|| async { Status::NOT_FOUND }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = RegistryClient::new(&url, ClientOptions::default()).expect("client");
        for subject in ["sized", "streamed"] {
            let e = client
                .version(subject, "latest")
                .await
                .expect_err("too large")
                .to_string();
            assert!(e.contains("is larger than 64 MiB"), "{subject}: {e}");
        }
        let e = client
            .version("empty", "latest")
            .await
            .expect_err("404")
            .to_string();
        assert!(
            e.contains("Not Found from http://") && e.contains("no error body"),
            "{e}"
        );
    }
}
