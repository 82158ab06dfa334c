-- Keel schema registry (PostgreSQL).
CREATE TABLE IF NOT EXISTS registry_schemas (
    id BIGSERIAL PRIMARY KEY,
    schema_type TEXT NOT NULL,
    -- The schema as stored (compact JSON; normalized when registered with normalize=true).
    schema_text TEXT NOT NULL,
    -- JSON array of {"name","subject","version"} references.
    references_json TEXT NOT NULL,
    -- sha256 of (type, schema_text, references): one id per distinct schema.
    identity TEXT NOT NULL UNIQUE,
    -- The resolved normal form (references inlined, docs dropped) and its sha256.
    normal_form TEXT NOT NULL,
    normal_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_schemas_normal_hash ON registry_schemas (normal_hash);

CREATE TABLE IF NOT EXISTS registry_subject_versions (
    subject TEXT NOT NULL,
    version BIGINT NOT NULL,
    schema_id BIGINT NOT NULL REFERENCES registry_schemas (id),
    deleted BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, version)
);
CREATE INDEX IF NOT EXISTS registry_subject_versions_schema ON registry_subject_versions (schema_id);

-- Which (subject, version) each schema references, for /referencedby and
-- to refuse deleting a referenced version.
CREATE TABLE IF NOT EXISTS registry_references (
    schema_id BIGINT NOT NULL REFERENCES registry_schemas (id),
    name TEXT NOT NULL,
    subject TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (schema_id, name)
);
CREATE INDEX IF NOT EXISTS registry_references_target ON registry_references (subject, version);

-- Compatibility level per subject; the empty subject is the global level.
CREATE TABLE IF NOT EXISTS registry_config (
    subject TEXT PRIMARY KEY,
    compatibility TEXT NOT NULL
);

-- Mode per subject; the empty subject is the global mode.
CREATE TABLE IF NOT EXISTS registry_mode (
    subject TEXT PRIMARY KEY,
    mode TEXT NOT NULL
);
