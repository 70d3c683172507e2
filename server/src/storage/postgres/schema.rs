//! The PostgreSQL schema and its versioned migrations.
//!
//! The same concepts as the SQLite schema (`sqlite/schema.rs`, version 10),
//! in PostgreSQL's types: ids, names, keys and digests are `bytea`; times
//! are `bigint` milliseconds since the epoch; every count and size is
//! `bigint`; blob keys are `text COLLATE "C"`, so that they sort in byte
//! order as the recovery's paging expects. Row ids come from identity
//! columns, which never hand out a number twice, so a stale row id can
//! never name another row.
//!
//! Migrations are applied in order, each in the transaction that records
//! it in `schema_migrations`, under an advisory lock, so that servers
//! starting together migrate once.

/// Each migration: its version and its SQL. Append only; never edit one
/// that has shipped.
pub(super) const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2)];

/// The newest schema version this code knows.
pub const SCHEMA_VERSION: i64 = 2;

/// The advisory lock key of the migrations ("bkp-migr").
pub(super) const MIGRATION_LOCK: i64 = 0x626b_702d_6d69_6772;

/// Made before any migration, outside the numbered list.
pub(super) const BOOTSTRAP: &str = "
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     BIGINT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

const V1: &str = r#"
CREATE TABLE repository (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
);
CREATE TABLE clients (
    id           BYTEA PRIMARY KEY CHECK (length(id) = 16),
    name         BYTEA NOT NULL UNIQUE,
    public_key   BYTEA CHECK (public_key IS NULL OR length(public_key) = 160),
    registered   BIGINT NOT NULL,
    last_seen    BIGINT NOT NULL,
    append_only  BOOLEAN NOT NULL DEFAULT false,
    secure_key   BYTEA CHECK (secure_key IS NULL OR length(secure_key) BETWEEN 1 AND 1100),
    completed_at BIGINT,
    quota        BIGINT CHECK (quota IS NULL OR quota >= -1)
);
CREATE TABLE files (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id   BYTEA NOT NULL REFERENCES clients (id),
    name        BYTEA NOT NULL,
    UNIQUE (client_id, name)
);
CREATE TABLE versions (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file_id       BIGINT NOT NULL REFERENCES files (id),
    blob          TEXT COLLATE "C" NOT NULL UNIQUE,
    size          BIGINT NOT NULL,
    content_size  BIGINT NOT NULL,
    cksum         BIGINT NOT NULL,
    sha256        BYTEA NOT NULL CHECK (length(sha256) = 32),
    verified      BOOLEAN NOT NULL DEFAULT true,
    stored_at     BIGINT NOT NULL
);
CREATE INDEX versions_by_file ON versions (file_id, id);
CREATE VIEW latest_versions AS
    SELECT f.client_id, f.name, v.*
    FROM versions v JOIN files f ON f.id = v.file_id
    WHERE v.id = (SELECT max(id) FROM versions WHERE file_id = v.file_id);
CREATE TABLE inline_blobs (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    blob     TEXT COLLATE "C" NOT NULL UNIQUE,
    content  BYTEA NOT NULL
);
CREATE FUNCTION versions_drop_inline() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM inline_blobs WHERE blob = OLD.blob;
    RETURN OLD;
END
$$;
CREATE TRIGGER versions_drop_inline AFTER DELETE ON versions
    FOR EACH ROW EXECUTE FUNCTION versions_drop_inline();

CREATE TABLE packs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client      BYTEA NOT NULL CHECK (length(client) = 16),
    blob        TEXT COLLATE "C" NOT NULL UNIQUE,
    size        BIGINT NOT NULL,
    sha256      BYTEA NOT NULL CHECK (length(sha256) = 32),
    stored_at   BIGINT NOT NULL,
    damaged     BIGINT
);
CREATE INDEX packs_by_client ON packs (client);
CREATE TABLE objects (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client      BYTEA NOT NULL CHECK (length(client) = 16),
    oid         BYTEA NOT NULL CHECK (length(oid) = 32),
    pack        BIGINT NOT NULL REFERENCES packs (id),
    pack_offset BIGINT NOT NULL,
    len         BIGINT NOT NULL,
    touched     BIGINT NOT NULL,
    UNIQUE (client, oid)
);
CREATE INDEX objects_by_pack ON objects (pack);
CREATE TABLE snapshots (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client       BYTEA NOT NULL CHECK (length(client) = 16),
    time         BIGINT NOT NULL,
    meta         BYTEA NOT NULL,
    committed_at BIGINT NOT NULL
);
CREATE INDEX snapshots_by_client ON snapshots (client, id);
CREATE TABLE snapshot_refs (
    snapshot    BIGINT NOT NULL REFERENCES snapshots (id),
    object      BIGINT NOT NULL,
    PRIMARY KEY (snapshot, object)
);
CREATE INDEX snapshot_refs_by_object ON snapshot_refs (object);
CREATE TABLE repo_stage (
    stage       BIGINT NOT NULL,
    object      BIGINT NOT NULL,
    PRIMARY KEY (stage, object)
);
CREATE INDEX repo_stage_by_object ON repo_stage (object);
CREATE TABLE key_envelopes (
    client      BYTEA NOT NULL CHECK (length(client) = 16),
    slot        BIGINT NOT NULL CHECK (slot BETWEEN 0 AND 7),
    envelope    BYTEA NOT NULL,
    stored_at   BIGINT NOT NULL,
    PRIMARY KEY (client, slot)
);
CREATE TABLE pack_trash (
    blob        TEXT COLLATE "C" PRIMARY KEY,
    since       BIGINT NOT NULL
);
"#;

/// The plaintext bytes of each client's per-file versions, charged to its
/// quota with its packs (`docs/PROTOCOL.md` §13.9), as SQLite's version
/// 10: kept by a trigger on every path that adds or removes a version,
/// and filled from the versions already stored.
const V2: &str = r#"
ALTER TABLE clients ADD COLUMN version_bytes BIGINT NOT NULL DEFAULT 0;
UPDATE clients SET version_bytes = (
    SELECT coalesce(sum(v.size), 0) FROM versions v JOIN files f ON f.id = v.file_id
    WHERE f.client_id = clients.id);
CREATE FUNCTION versions_charge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE clients SET version_bytes = version_bytes + NEW.size
            WHERE id = (SELECT client_id FROM files WHERE id = NEW.file_id);
        RETURN NEW;
    END IF;
    UPDATE clients SET version_bytes = version_bytes - OLD.size
        WHERE id = (SELECT client_id FROM files WHERE id = OLD.file_id);
    RETURN OLD;
END
$$;
CREATE TRIGGER versions_charge AFTER INSERT OR DELETE ON versions
    FOR EACH ROW EXECUTE FUNCTION versions_charge();
"#;
