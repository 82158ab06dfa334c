//! The HTTP handlers: Confluent's Schema Registry REST API for Avro.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::{ApiError, CONTENT_TYPE};
use super::store::{
    ImportRefusal, NewSchema, SchemaReference, Setting, Store, StoreError, StoredSchema,
    SubjectVersion,
};
use crate::canonical::{References, named_types, resolve};
use crate::compat::Compatibility;

type ApiResult<T = Response> = Result<T, ApiError>;

/// Shared state of the handlers.
pub(crate) struct AppState {
    pub(crate) store: Store,
    pub(crate) body_limit: usize,
    /// `Basic <base64>` expected in `Authorization`, when auth is on.
    pub(crate) basic_auth: Option<String>,
}

type AppStateRef = Arc<AppState>;

/// How deep reference chains may go (guards against cycles).
const MAX_REFERENCE_DEPTH: usize = 16;

pub(crate) fn router(state: AppStateRef) -> Router {
    Router::new()
        .route("/", get(|| async { ok(json!({})) }))
        .route("/schemas/types", get(|| async { ok(json!(["AVRO"])) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_by_id))
        .route("/schemas/ids/{id}/versions", get(versions_by_id))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(raw_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(referenced_by),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route("/mode", get(get_global_mode).put(put_global_mode))
        .route(
            "/mode/{subject}",
            get(get_subject_mode)
                .put(put_subject_mode)
                .delete(delete_subject_mode),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_version),
        )
        .fallback(|| async { ApiError::no_route() })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(confluent_errors))
        .with_state(state)
}

/// Answers axum's own refusals (405 for a method the path does not take,
/// 400 for a query flag or path that does not parse: plain text or empty)
/// in Confluent's error shape, so clients that read `error_code` get one.
/// Their other headers are kept (axum adds a 405's `Allow` around this).
async fn confluent_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let ours = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == CONTENT_TYPE);
    if ours || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        format!(
            "HTTP {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default()
        )
    } else {
        text
    };
    let mut answer = ApiError::http(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE
            && name != header::CONTENT_LENGTH
            && !answer.headers().contains_key(name)
        {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer
}

fn ok(body: Value) -> Response {
    let mut response = (StatusCode::OK, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

async fn authenticate(State(state): State<AppStateRef>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.basic_auth {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// `Authorization` header value for `user:password`.
pub(crate) fn basic_auth_header(credentials: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// A JSON body in one of the registry's media types, within the size limit;
/// anything else is a Confluent-style error, never a panic or a 500.
struct JsonBody<T>(T);

impl<T: DeserializeOwned> FromRequest<AppStateRef> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppStateRef) -> Result<Self, ApiError> {
        if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
            let text = content_type.to_str().unwrap_or("(not text)");
            let essence = text
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            let accepted = [
                "application/vnd.schemaregistry.v1+json",
                "application/vnd.schemaregistry+json",
                "application/json",
                "application/octet-stream",
            ];
            if !accepted.contains(&essence.as_str()) {
                return Err(ApiError::unsupported_media_type(text));
            }
        }
        let limit = state.body_limit;
        let bytes = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|_| ApiError::too_large(limit))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(ApiError::unprocessable)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Flags {
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    normalize: bool,
    #[serde(default)]
    verbose: bool,
    #[serde(default)]
    default_to_global: bool,
    #[serde(default)]
    subject_prefix: String,
    #[serde(default)]
    force: bool,
}

/// `latest` (or -1) or a version number.
#[derive(Clone, Copy, Debug)]
enum VersionSpec {
    Latest,
    Number(i64),
}

fn parse_version(text: &str) -> ApiResult<VersionSpec> {
    if text == "latest" || text == "-1" {
        return Ok(VersionSpec::Latest);
    }
    match text.parse::<i64>() {
        Ok(n) if (1..=i64::from(i32::MAX)).contains(&n) => Ok(VersionSpec::Number(n)),
        _ => Err(ApiError::invalid_version(text)),
    }
}

fn parse_id(text: &str) -> ApiResult<i64> {
    text.parse::<i64>()
        .ok()
        .filter(|id| (1..=MAX_SCHEMA_ID).contains(id))
        .ok_or_else(|| ApiError::schema_id_not_found(text))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<SchemaReference>,
    /// The global id to register under (IMPORT mode only); absent or
    /// negative = assign one, as Confluent's `-1`.
    #[serde(default)]
    id: Option<i64>,
    /// The version to register as; absent or ≤ 0 = the next one.
    #[serde(default)]
    version: Option<i64>,
}

fn schema_json(schema: &StoredSchema) -> serde_json::Map<String, Value> {
    let mut body = serde_json::Map::new();
    body.insert("schema".into(), Value::String(schema.text.clone()));
    if schema.schema_type != "AVRO" {
        body.insert(
            "schemaType".into(),
            Value::String(schema.schema_type.clone()),
        );
    }
    if !schema.references.is_empty() {
        body.insert("references".into(), json!(schema.references));
    }
    body
}

fn version_json(v: &SubjectVersion) -> Value {
    let mut body = schema_json(&v.schema);
    body.insert("subject".into(), Value::String(v.subject.clone()));
    body.insert("version".into(), json!(v.version));
    body.insert("id".into(), json!(v.schema.id));
    Value::Object(body)
}

fn raw(text: &str) -> Response {
    let mut response = (StatusCode::OK, text.to_owned()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

async fn stored_schema(state: &AppState, id: &str) -> ApiResult<StoredSchema> {
    let id = parse_id(id)?;
    state
        .store
        .schema(id)
        .await?
        .ok_or_else(|| ApiError::schema_id_not_found(id))
}

async fn schema_by_id(State(state): State<AppStateRef>, Path(id): Path<String>) -> ApiResult {
    let schema = stored_schema(&state, &id).await?;
    Ok(ok(Value::Object(schema_json(&schema))))
}

async fn raw_schema_by_id(State(state): State<AppStateRef>, Path(id): Path<String>) -> ApiResult {
    Ok(raw(&stored_schema(&state, &id).await?.text))
}

async fn subjects_by_id(
    State(state): State<AppStateRef>,
    Path(id): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let schema = stored_schema(&state, &id).await?;
    let mut subjects: Vec<String> = state
        .store
        .usages(schema.id, flags.deleted)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    subjects.dedup();
    Ok(ok(json!(subjects)))
}

async fn versions_by_id(
    State(state): State<AppStateRef>,
    Path(id): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let schema = stored_schema(&state, &id).await?;
    let usages: Vec<Value> = state
        .store
        .usages(schema.id, flags.deleted)
        .await?
        .into_iter()
        .map(|(subject, version)| json!({"subject": subject, "version": version}))
        .collect();
    Ok(ok(Value::Array(usages)))
}

async fn list_subjects(State(state): State<AppStateRef>, Query(flags): Query<Flags>) -> ApiResult {
    Ok(ok(json!(
        state
            .store
            .subjects(flags.deleted, &flags.subject_prefix)
            .await?
    )))
}

/// Every version of the subject (including soft-deleted ones), or 40401.
async fn all_versions(state: &AppState, subject: &str) -> ApiResult<Vec<SubjectVersion>> {
    let all = state.store.versions(subject, true).await?;
    if all.is_empty() {
        return Err(ApiError::subject_not_found(subject));
    }
    Ok(all)
}

async fn list_versions(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let all = all_versions(&state, &subject).await?;
    let versions: Vec<i64> = all
        .iter()
        .filter(|v| flags.deleted || !v.deleted)
        .map(|v| v.version)
        .collect();
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    Ok(ok(json!(versions)))
}

/// The version `spec` names: `latest` is the newest live one; a number may
/// be soft-deleted only when `deleted` is asked for.
async fn find_version(
    state: &AppState,
    subject: &str,
    spec: &str,
    deleted: bool,
) -> ApiResult<SubjectVersion> {
    let spec = parse_version(spec)?;
    let all = all_versions(state, subject).await?;
    let found = match spec {
        VersionSpec::Latest => all.iter().rev().find(|v| !v.deleted),
        VersionSpec::Number(n) => all
            .iter()
            .find(|v| v.version == n && (deleted || !v.deleted)),
    };
    found.cloned().ok_or_else(|| match spec {
        // Every version soft-deleted: the subject is gone (as Confluent).
        VersionSpec::Number(_) if !deleted && all.iter().all(|v| v.deleted) => {
            ApiError::subject_not_found(subject)
        }
        VersionSpec::Latest => ApiError::subject_not_found(subject),
        VersionSpec::Number(n) => ApiError::version_not_found(n),
    })
}

async fn get_version(
    State(state): State<AppStateRef>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    Ok(ok(version_json(
        &find_version(&state, &subject, &version, flags.deleted).await?,
    )))
}

async fn raw_version(
    State(state): State<AppStateRef>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    Ok(raw(&find_version(
        &state,
        &subject,
        &version,
        flags.deleted,
    )
    .await?
    .schema
    .text))
}

async fn referenced_by(
    State(state): State<AppStateRef>,
    Path((subject, version)): Path<(String, String)>,
) -> ApiResult {
    let v = find_version(&state, &subject, &version, true).await?;
    Ok(ok(json!(
        state.store.referenced_by(&subject, v.version).await?
    )))
}

/// A request's schema, parsed, validated and resolved.
struct Candidate {
    stored: NewSchema,
    normal: Value,
    /// The references as the request gave them (`stored` has any latest
    /// version (-1) pinned): a schema stored before pinning existed still
    /// matches the request that registered it.
    requested_references: Vec<SchemaReference>,
}

/// The named types `references` bring (theirs and their own references',
/// transitively) and the version each one resolved to (the latest one for
/// -1). Each referenced subject version is read and walked once per
/// request, however many paths lead to it: a lattice of references (each
/// level naming every subject of the next) would otherwise cost
/// width^depth lookups.
async fn resolve_references(
    state: &AppState,
    references: &[SchemaReference],
) -> ApiResult<(References, Vec<i64>)> {
    let mut walk = ReferenceWalk::default();
    let versions = walk.resolve(state, references, 0).await?;
    Ok((walk.types, versions))
}

/// What [`resolve_references`] has gathered so far.
#[derive(Default)]
struct ReferenceWalk {
    types: References,
    /// `(subject, version as asked)` → the version it resolved to, for
    /// every reference walked to the end.
    done: std::collections::HashMap<(String, i64), i64>,
}

impl ReferenceWalk {
    async fn resolve(
        &mut self,
        state: &AppState,
        references: &[SchemaReference],
        depth: usize,
    ) -> ApiResult<Vec<i64>> {
        if depth > MAX_REFERENCE_DEPTH {
            return Err(ApiError::invalid_schema(
                "references nest too deep (a cycle?)",
            ));
        }
        let mut versions = Vec::with_capacity(references.len());
        for r in references {
            if let Some(&version) = self.done.get(&(r.subject.clone(), r.version)) {
                versions.push(version);
                continue;
            }
            let spec = if r.version == -1 {
                "latest".to_owned()
            } else {
                r.version.to_string()
            };
            let target = find_version(state, &r.subject, &spec, false)
                .await
                .map_err(|_| {
                    ApiError::invalid_schema(format!(
                        "reference `{}` points to subject `{}` version {spec}, which does not exist",
                        r.name, r.subject
                    ))
                })?;
            versions.push(target.version);
            Box::pin(self.resolve(state, &target.schema.references, depth + 1)).await?;
            let doc: Value = serde_json::from_str(&target.schema.text).map_err(|e| {
                ApiError::invalid_schema(format!("referenced schema is not JSON: {e}"))
            })?;
            self.types
                .extend(named_types(&doc).map_err(ApiError::invalid_schema)?);
            self.done
                .insert((r.subject.clone(), r.version), target.version);
        }
        Ok(versions)
    }
}

async fn candidate(
    state: &AppState,
    request: &SchemaRequest,
    normalize: bool,
) -> ApiResult<Candidate> {
    let schema_type = request
        .schema_type
        .clone()
        .unwrap_or_else(|| "AVRO".to_owned());
    if !schema_type.eq_ignore_ascii_case("AVRO") {
        return Err(ApiError::invalid_schema(format!(
            "schema type `{schema_type}` is not supported; this registry stores AVRO schemas"
        )));
    }
    let doc: Value = serde_json::from_str(&request.schema)
        .map_err(|e| ApiError::invalid_schema(format!("the schema is not JSON: {e}")))?;
    let (references, versions) = resolve_references(state, &request.references).await?;
    // A reference to the latest version (-1) is stored pinned to the version
    // it resolved to: what the id means must not change when the referenced
    // subject gets a new version, and the referenced version is protected
    // from deletion like any other.
    let pinned: Vec<SchemaReference> = request
        .references
        .iter()
        .zip(versions)
        .map(|(r, version)| SchemaReference {
            version,
            ..r.clone()
        })
        .collect();
    let normal = resolve(&doc, &references).map_err(ApiError::invalid_schema)?;
    let normal_form = normal.to_string();
    // Inlined references can nest deeper than any JSON reader here (and
    // most elsewhere) accepts: stored, the schema could never be read back.
    if let Err(e) = serde_json::from_str::<Value>(&normal_form) {
        return Err(ApiError::invalid_schema(format!(
            "the schema with its references inlined cannot be read back ({e}); nest fewer records"
        )));
    }
    let text = if normalize {
        normal_form.clone()
    } else {
        doc.to_string()
    };
    Ok(Candidate {
        stored: NewSchema {
            schema_type: "AVRO".to_owned(),
            text,
            references: pinned,
            normal_form,
        },
        normal,
        requested_references: request.references.clone(),
    })
}

fn matches(existing: &StoredSchema, candidate: &Candidate, normalize: bool) -> bool {
    if normalize {
        existing.normal_form == candidate.stored.normal_form
    } else {
        existing.text == candidate.stored.text
            && (existing.references == candidate.stored.references
                || existing.references == candidate.requested_references)
    }
}

async fn level_of(state: &AppState, subject: &str) -> ApiResult<Compatibility> {
    let stored = match state.store.setting(Setting::Compatibility, subject).await? {
        Some(level) => Some(level),
        None => state.store.setting(Setting::Compatibility, "").await?,
    };
    Ok(stored.and_then(|l| l.parse().ok()).unwrap_or_default())
}

async fn mode_of(state: &AppState, subject: &str) -> ApiResult<String> {
    Ok(match state.store.setting(Setting::Mode, subject).await? {
        Some(mode) => mode,
        None => state
            .store
            .setting(Setting::Mode, "")
            .await?
            .unwrap_or_else(|| "READWRITE".to_owned()),
    })
}

/// The subject's mode, unless it is read-only (42205).
async fn writable(state: &AppState, subject: &str) -> ApiResult<String> {
    let mode = mode_of(state, subject).await?;
    if mode == "READONLY" || mode == "READONLY_OVERRIDE" {
        return Err(ApiError::not_permitted(subject, &mode));
    }
    Ok(mode)
}

/// Why `normal` may not follow `versions` under `level` (empty: it may). A
/// stored version that cannot be read back is a problem, never skipped:
/// skipped, it would let an incompatible schema through.
fn check_against(level: Compatibility, normal: &Value, versions: &[SubjectVersion]) -> Vec<String> {
    let forms: Result<Vec<Value>, String> = level
        .compared(versions)
        .iter()
        .map(|v| {
            serde_json::from_str(&v.schema.normal_form).map_err(|e| {
                format!(
                    "version {} of `{}` cannot be read back to check against ({e})",
                    v.version, v.subject
                )
            })
        })
        .collect();
    match forms {
        Ok(forms) => level.check_each(normal, &forms),
        Err(problem) => vec![problem],
    }
}

/// The largest schema id the Confluent wire format can carry.
const MAX_SCHEMA_ID: i64 = i32::MAX as i64;

async fn register(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    JsonBody(request): JsonBody<SchemaRequest>,
) -> ApiResult {
    // Confluent's rules: an explicit id only in IMPORT mode, no id only in
    // READWRITE mode, nothing in the read-only modes.
    let mode = writable(&state, &subject).await?;
    let id = request.id.filter(|id| *id >= 0);
    let version = request.version.filter(|v| *v > 0);
    // Versions are Confluent's positive 32-bit ids: a larger one would
    // leave no room for the next version's number.
    if let Some(v) = version
        && v > i64::from(i32::MAX)
    {
        return Err(ApiError::invalid_version(&v.to_string()));
    }
    match id {
        Some(id) if mode != "IMPORT" => {
            return Err(ApiError::operation_not_permitted(format!(
                "Subject {subject} is not in import mode: schema id {id} can only be given in IMPORT mode (PUT /mode/{subject} {{\"mode\": \"IMPORT\"}})"
            )));
        }
        Some(id) => return import(&state, &subject, id, version, &request, flags).await,
        None if mode != "READWRITE" => {
            return Err(ApiError::operation_not_permitted(format!(
                "Subject {subject} is not in read-write mode: in {mode} mode every schema must be registered with its id"
            )));
        }
        None => {}
    }
    let candidate = candidate(&state, &request, flags.normalize).await?;
    let live = state.store.versions(&subject, false).await?;
    if let Some(existing) = live
        .iter()
        .find(|v| matches(&v.schema, &candidate, flags.normalize))
        .filter(|v| version.is_none_or(|wanted| wanted == v.version))
    {
        return Ok(ok(json!({"id": existing.schema.id})));
    }
    if let Some(wanted) = version {
        let next = state
            .store
            .versions(&subject, true)
            .await?
            .last()
            .map_or(1, |v| v.version.saturating_add(1));
        if wanted != next {
            return Err(ApiError::invalid_schema(format!(
                "Version is not one more than previous version: version {wanted} was given, the next version of {subject} is {next}"
            )));
        }
    }
    let level = level_of(&state, &subject).await?;
    let problems = check_against(level, &candidate.normal, &live);
    if !problems.is_empty() {
        return Err(ApiError::incompatible(&subject, &problems));
    }
    // Ids follow the highest one so far, which an import may have set near
    // the limit: past it the id no longer fits the wire format's four
    // bytes (Confluent's clients would read it as negative).
    let id = match state
        .store
        .upsert_schema(&candidate.stored, MAX_SCHEMA_ID)
        .await
    {
        Err(StoreError::IdsExhausted { next }) => {
            return Err(ApiError::ids_exhausted(next, MAX_SCHEMA_ID));
        }
        id => id?,
    };
    let normal = candidate.normal.clone();
    let added = state
        .store
        .add_version(&subject, id, |live| {
            let problems = check_against(level, &normal, live);
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems)
            }
        })
        .await?;
    match added {
        Ok(version) => {
            tracing::info!(%subject, id, version, "schema registered");
            Ok(ok(json!({"id": id})))
        }
        Err(problems) => Err(ApiError::incompatible(&subject, &problems)),
    }
}

/// A registration in IMPORT mode: the schema keeps the id (and version)
/// it has in the registry it comes from; no compatibility check.
async fn import(
    state: &AppState,
    subject: &str,
    id: i64,
    version: Option<i64>,
    request: &SchemaRequest,
    flags: Flags,
) -> ApiResult {
    // Id 0 could be stored but never fetched (`GET /schemas/ids/0` takes
    // positive ids, as Confluent's registry numbers from 1): refused here.
    if !(1..=MAX_SCHEMA_ID).contains(&id) {
        return Err(ApiError::invalid_schema(format!(
            "schema id {id} is out of range: ids are 1 to {MAX_SCHEMA_ID} (four bytes on the wire)"
        )));
    }
    let candidate = candidate(state, request, flags.normalize).await?;
    match state
        .store
        .import_version(subject, id, version, &candidate.stored)
        .await?
    {
        Ok(version) => {
            tracing::info!(%subject, id, version, "schema imported");
            Ok(ok(json!({"id": id})))
        }
        Err(ImportRefusal::IdTaken(id)) => Err(ApiError::operation_not_permitted(format!(
            "Overwrite new schema with id {id} is not permitted."
        ))),
        Err(ImportRefusal::OtherId(existing)) => Err(ApiError::id_does_not_match(existing, id)),
        Err(ImportRefusal::VersionDeleted(version)) => {
            Err(ApiError::operation_not_permitted(format!(
                "Version {version} of subject {subject} was deleted; delete it permanently \
             (DELETE /subjects/{subject}/versions/{version}?permanent=true) before importing it again"
            )))
        }
        Err(ImportRefusal::VersionTaken { version, holds }) => {
            Err(ApiError::operation_not_permitted(format!(
                "Version {version} of subject {subject} already holds schema id {holds}; \
                 delete it (permanently) before importing another schema as that version"
            )))
        }
    }
}

async fn lookup(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    JsonBody(request): JsonBody<SchemaRequest>,
) -> ApiResult {
    let all = all_versions(&state, &subject).await?;
    if !flags.deleted && all.iter().all(|v| v.deleted) {
        // Every version soft-deleted: the subject is gone (as Confluent).
        return Err(ApiError::subject_not_found(&subject));
    }
    let candidate = candidate(&state, &request, flags.normalize).await?;
    all.iter()
        .rev()
        .filter(|v| flags.deleted || !v.deleted)
        .find(|v| matches(&v.schema, &candidate, flags.normalize))
        .map(|v| ok(version_json(v)))
        .ok_or_else(ApiError::schema_not_found)
}

async fn delete_subject(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    writable(&state, &subject).await?;
    let all = all_versions(&state, &subject).await?;
    let live: Vec<i64> = all
        .iter()
        .filter(|v| !v.deleted)
        .map(|v| v.version)
        .collect();
    if flags.permanent {
        if !live.is_empty() {
            return Err(ApiError::subject_not_soft_deleted(&subject));
        }
        let every: Vec<i64> = all.iter().map(|v| v.version).collect();
        for v in &every {
            let by = state.store.referenced_by(&subject, *v).await?;
            if !by.is_empty() {
                return Err(ApiError::referenced(&subject, *v, &by));
            }
        }
        state.store.delete_versions(&subject, &every, true).await?;
        state
            .store
            .delete_setting(Setting::Compatibility, &subject)
            .await?;
        state.store.delete_setting(Setting::Mode, &subject).await?;
        return Ok(ok(json!(every)));
    }
    if live.is_empty() {
        return Err(ApiError::subject_soft_deleted(&subject));
    }
    for v in &live {
        let by = state.store.referenced_by(&subject, *v).await?;
        if !by.is_empty() {
            return Err(ApiError::referenced(&subject, *v, &by));
        }
    }
    state.store.delete_versions(&subject, &live, false).await?;
    Ok(ok(json!(live)))
}

async fn delete_version(
    State(state): State<AppStateRef>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    writable(&state, &subject).await?;
    let v = find_version(&state, &subject, &version, true).await?;
    if flags.permanent {
        if !v.deleted {
            return Err(ApiError::version_not_soft_deleted(&subject, v.version));
        }
    } else if v.deleted {
        return Err(ApiError::version_soft_deleted(&subject, v.version));
    }
    let by = state.store.referenced_by(&subject, v.version).await?;
    if !by.is_empty() {
        return Err(ApiError::referenced(&subject, v.version, &by));
    }
    state
        .store
        .delete_versions(&subject, &[v.version], flags.permanent)
        .await?;
    Ok(ok(json!(v.version)))
}

#[derive(Deserialize)]
struct ConfigRequest {
    compatibility: String,
}

fn parse_level(text: &str) -> ApiResult<Compatibility> {
    text.parse()
        .map_err(|()| ApiError::invalid_compatibility_level())
}

async fn get_global_config(State(state): State<AppStateRef>) -> ApiResult {
    let level = level_of(&state, "").await?;
    Ok(ok(json!({"compatibilityLevel": level.to_string()})))
}

async fn put_global_config(
    State(state): State<AppStateRef>,
    JsonBody(request): JsonBody<ConfigRequest>,
) -> ApiResult {
    let level = parse_level(&request.compatibility)?;
    state
        .store
        .set_setting(Setting::Compatibility, "", &level.to_string())
        .await?;
    Ok(ok(json!({"compatibility": level.to_string()})))
}

async fn get_subject_config(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    match state
        .store
        .setting(Setting::Compatibility, &subject)
        .await?
    {
        Some(level) => Ok(ok(json!({"compatibilityLevel": level}))),
        None if flags.default_to_global => {
            let level = level_of(&state, "").await?;
            Ok(ok(json!({"compatibilityLevel": level.to_string()})))
        }
        None => Err(ApiError::subject_compatibility_not_configured(&subject)),
    }
}

async fn put_subject_config(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    JsonBody(request): JsonBody<ConfigRequest>,
) -> ApiResult {
    let level = parse_level(&request.compatibility)?;
    state
        .store
        .set_setting(Setting::Compatibility, &subject, &level.to_string())
        .await?;
    Ok(ok(json!({"compatibility": level.to_string()})))
}

async fn delete_subject_config(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
) -> ApiResult {
    match state
        .store
        .delete_setting(Setting::Compatibility, &subject)
        .await?
    {
        Some(old) => Ok(ok(json!({"compatibilityLevel": old}))),
        None => Err(ApiError::subject_compatibility_not_configured(&subject)),
    }
}

#[derive(Deserialize)]
struct ModeRequest {
    mode: String,
}

const MODES: [&str; 4] = ["READWRITE", "READONLY", "READONLY_OVERRIDE", "IMPORT"];

fn parse_mode(text: &str) -> ApiResult<String> {
    let upper = text.to_ascii_uppercase();
    if MODES.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(ApiError::invalid_mode())
    }
}

/// Confluent's refusal to switch a registry (or subject) that holds
/// schemas to IMPORT mode without `?force=true`.
fn cannot_import() -> ApiError {
    ApiError::operation_not_permitted(
        "Cannot import since found existing subjects (delete them first, or PUT the mode with ?force=true)",
    )
}

async fn get_global_mode(State(state): State<AppStateRef>) -> ApiResult {
    Ok(ok(json!({"mode": mode_of(&state, "").await?})))
}

async fn put_global_mode(
    State(state): State<AppStateRef>,
    Query(flags): Query<Flags>,
    JsonBody(request): JsonBody<ModeRequest>,
) -> ApiResult {
    let mode = parse_mode(&request.mode)?;
    if mode == "IMPORT"
        && mode_of(&state, "").await? != "IMPORT"
        && !flags.force
        && !state.store.subjects(false, "").await?.is_empty()
    {
        return Err(cannot_import());
    }
    state.store.set_setting(Setting::Mode, "", &mode).await?;
    Ok(ok(json!({"mode": mode})))
}

async fn get_subject_mode(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    match state.store.setting(Setting::Mode, &subject).await? {
        Some(mode) => Ok(ok(json!({"mode": mode}))),
        None if flags.default_to_global => Ok(ok(json!({"mode": mode_of(&state, "").await?}))),
        None => Err(ApiError::subject_mode_not_configured(&subject)),
    }
}

async fn put_subject_mode(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    JsonBody(request): JsonBody<ModeRequest>,
) -> ApiResult {
    let mode = parse_mode(&request.mode)?;
    if mode == "IMPORT"
        && mode_of(&state, &subject).await? != "IMPORT"
        && !flags.force
        && !state.store.versions(&subject, false).await?.is_empty()
    {
        return Err(cannot_import());
    }
    state
        .store
        .set_setting(Setting::Mode, &subject, &mode)
        .await?;
    Ok(ok(json!({"mode": mode})))
}

async fn delete_subject_mode(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
) -> ApiResult {
    match state.store.delete_setting(Setting::Mode, &subject).await? {
        Some(old) => Ok(ok(json!({"mode": old}))),
        None => Err(ApiError::subject_mode_not_configured(&subject)),
    }
}

fn compatibility_answer(problems: &[String], verbose: bool) -> Response {
    let mut body = BTreeMap::new();
    body.insert("is_compatible", json!(problems.is_empty()));
    if verbose {
        body.insert("messages", json!(problems));
    }
    ok(json!(body))
}

async fn check_all(
    State(state): State<AppStateRef>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    JsonBody(request): JsonBody<SchemaRequest>,
) -> ApiResult {
    let candidate = candidate(&state, &request, flags.normalize).await?;
    let live = state.store.versions(&subject, false).await?;
    let level = level_of(&state, &subject).await?;
    let problems = check_against(level, &candidate.normal, &live);
    Ok(compatibility_answer(&problems, flags.verbose))
}

async fn check_version(
    State(state): State<AppStateRef>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
    JsonBody(request): JsonBody<SchemaRequest>,
) -> ApiResult {
    let spec = parse_version(&version)?;
    let candidate = candidate(&state, &request, flags.normalize).await?;
    let level = level_of(&state, &subject).await?;
    let against = match spec {
        // `latest` checks as registration would: every version the level
        // looks at.
        VersionSpec::Latest => {
            all_versions(&state, &subject).await?;
            state.store.versions(&subject, false).await?
        }
        VersionSpec::Number(_) => vec![find_version(&state, &subject, &version, false).await?],
    };
    let problems = check_against(level, &candidate.normal, &against);
    Ok(compatibility_answer(&problems, flags.verbose))
}
