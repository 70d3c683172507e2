//! The schema and its migrations (see the parent module for the layout).

/// The schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 10;

/// From schema version 1 to 2.
pub(super) const MIGRATE_1_TO_2: &str =
    "ALTER TABLE clients ADD COLUMN append_only INTEGER NOT NULL DEFAULT 0;";

/// From schema version 2 to 3: the key bound at a secure-mode registration.
pub(super) const MIGRATE_2_TO_3: &str = "ALTER TABLE clients ADD COLUMN secure_key BLOB \
     CHECK (secure_key IS NULL OR length(secure_key) BETWEEN 1 AND 1100);";

/// From schema version 3 to 4: small files kept in the database.
pub(super) const MIGRATE_3_TO_4: &str = INLINE_SCHEMA;

/// From schema version 4 to 5: when a client completed its registration.
/// Conservative: a client that could ever have been served is complete, so
/// that no upgrade makes an existing client's name registrable again. A
/// legacy client with a public key has completed; a secure-mode client
/// may have proved its key (that was not recorded), so every one counts as
/// complete; as does any client with a file. What is left, a legacy
/// registration that never stored a key, could never reconnect or upload.
pub(super) const MIGRATE_4_TO_5: &str = "
ALTER TABLE clients ADD COLUMN completed_at INTEGER;
UPDATE clients SET completed_at = max(registered, last_seen)
    WHERE public_key IS NOT NULL OR secure_key IS NOT NULL
       OR EXISTS (SELECT 1 FROM files WHERE files.client_id = clients.id);
";

/// From schema version 5 to 6: the repository extension.
pub(super) const MIGRATE_5_TO_6: &str = REPO_SCHEMA;

/// From schema version 6 to 7: garbage collection of the repository
/// (`docs/PROTOCOL.md` §13.7). `touched` is when an object was last stored
/// or answered "have" (milliseconds since the epoch); objects of an older
/// schema count as touched at the upgrade, so the first prune keeps them
/// for its grace period. The two indexes find an object's references and
/// stages without a scan. `pack_trash` names pack blobs that no pack row
/// holds (a removed pack, or a repacked one being written) for prune to
/// delete.
pub(super) const MIGRATE_6_TO_7: &str = "
ALTER TABLE objects ADD COLUMN touched INTEGER NOT NULL DEFAULT 0;
UPDATE objects SET touched = CAST(strftime('%s', 'now') AS INTEGER) * 1000;
CREATE INDEX snapshot_refs_by_object ON snapshot_refs (object);
CREATE INDEX repo_stage_by_object ON repo_stage (object);
CREATE TABLE pack_trash (
    blob        TEXT PRIMARY KEY,
    since       INTEGER NOT NULL
) WITHOUT ROWID;
";

/// From schema version 7 to 8: a pack that `scrub --repair` found damaged
/// (`docs/RELIABILITY.md`). `damaged` is when it was marked (milliseconds
/// since the epoch), NULL while the pack is sound. The objects of a
/// damaged pack keep their rows, so that the snapshots referencing them
/// keep their references, but are answered missing; storing the same
/// object again moves its row to the new pack, which heals those
/// snapshots.
pub(super) const MIGRATE_7_TO_8: &str = "ALTER TABLE packs ADD COLUMN damaged INTEGER;";

/// From schema version 8 to 9: a client's own quota
/// (`backup-server quota`, `docs/PROTOCOL.md` §13.9): NULL when it has
/// none of its own and the server's configuration applies, -1 for no
/// quota at all, else bytes. Every existing client starts with NULL, so an
/// upgrade changes nothing until the operator sets a quota.
pub(super) const MIGRATE_8_TO_9: &str =
    "ALTER TABLE clients ADD COLUMN quota INTEGER CHECK (quota IS NULL OR quota >= -1);";

/// From schema version 9 to 10: the plaintext bytes of each client's
/// per-file versions, charged to its quota with its packs
/// (`docs/PROTOCOL.md` §13.9). Kept by triggers, so that every path that
/// adds or removes a version (a commit, retention, a deletion, prune,
/// removing a client) keeps it true, and a commit reads it without summing
/// the client's versions. Filled from the versions already stored.
pub(super) const MIGRATE_9_TO_10: &str = "
ALTER TABLE clients ADD COLUMN version_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE clients SET version_bytes = (
    SELECT coalesce(sum(v.size), 0) FROM versions v JOIN files f ON f.id = v.file_id
    WHERE f.client_id = clients.id);
CREATE TRIGGER versions_charge AFTER INSERT ON versions
BEGIN
    UPDATE clients SET version_bytes = version_bytes + NEW.size
        WHERE id = (SELECT client_id FROM files WHERE id = NEW.file_id);
END;
CREATE TRIGGER versions_refund AFTER DELETE ON versions
BEGIN
    UPDATE clients SET version_bytes = version_bytes - OLD.size
        WHERE id = (SELECT client_id FROM files WHERE id = OLD.file_id);
END;
";

/// The repository extension (`docs/PROTOCOL.md` §13; `storage/repo.rs`).
/// Object ids are unique per client, never across clients. Snapshot
/// references and staged references name objects by row id (8 bytes, not
/// 32), and carry no foreign key to `objects`, so that removing objects
/// never scans them; the code keeps them consistent (a commit re-checks
/// every staged reference). Object and snapshot row ids are never reused
/// (AUTOINCREMENT), so a stale row id can never name another object.
pub(super) const REPO_SCHEMA: &str = "
CREATE TABLE packs (
    id          INTEGER PRIMARY KEY,
    client      BLOB NOT NULL CHECK (length(client) = 16),
    blob        TEXT NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    sha256      BLOB NOT NULL CHECK (length(sha256) = 32),
    stored_at   INTEGER NOT NULL
);
CREATE INDEX packs_by_client ON packs (client);
CREATE TABLE objects (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    client      BLOB NOT NULL CHECK (length(client) = 16),
    oid         BLOB NOT NULL CHECK (length(oid) = 32),
    pack        INTEGER NOT NULL REFERENCES packs (id),
    pack_offset INTEGER NOT NULL,
    len         INTEGER NOT NULL,
    UNIQUE (client, oid)
);
CREATE INDEX objects_by_pack ON objects (pack);
CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    client       BLOB NOT NULL CHECK (length(client) = 16),
    time         INTEGER NOT NULL,
    meta         BLOB NOT NULL,
    committed_at INTEGER NOT NULL
);
CREATE INDEX snapshots_by_client ON snapshots (client, id);
CREATE TABLE snapshot_refs (
    snapshot    INTEGER NOT NULL REFERENCES snapshots (id),
    object      INTEGER NOT NULL,
    PRIMARY KEY (snapshot, object)
) WITHOUT ROWID;
CREATE TABLE repo_stage (
    stage       INTEGER NOT NULL,
    object      INTEGER NOT NULL,
    PRIMARY KEY (stage, object)
) WITHOUT ROWID;
CREATE TABLE key_envelopes (
    client      BLOB NOT NULL CHECK (length(client) = 16),
    slot        INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 7),
    envelope    BLOB NOT NULL,
    stored_at   INTEGER NOT NULL,
    PRIMARY KEY (client, slot)
) WITHOUT ROWID;
";

/// Content of small versions, stored with their row (see
/// [`crate::storage::INLINE_MAX`]); a version's content goes when its row
/// does.
pub(super) const INLINE_SCHEMA: &str = "
CREATE TABLE inline_blobs (
    id       INTEGER PRIMARY KEY,
    blob     TEXT NOT NULL UNIQUE,
    content  BLOB NOT NULL
);
CREATE TRIGGER versions_drop_inline AFTER DELETE ON versions
BEGIN
    DELETE FROM inline_blobs WHERE blob = OLD.blob;
END;
";

pub(super) const SCHEMA: &str = "
CREATE TABLE clients (
    id          BLOB PRIMARY KEY CHECK (length(id) = 16),
    name        BLOB NOT NULL UNIQUE,
    public_key  BLOB CHECK (public_key IS NULL OR length(public_key) = 160),
    registered  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    append_only INTEGER NOT NULL DEFAULT 0,
    secure_key  BLOB CHECK (secure_key IS NULL OR length(secure_key) BETWEEN 1 AND 1100),
    completed_at INTEGER
);
CREATE TABLE files (
    id         INTEGER PRIMARY KEY,
    client_id  BLOB NOT NULL REFERENCES clients (id),
    name       BLOB NOT NULL,
    UNIQUE (client_id, name)
);
CREATE TABLE versions (
    id            INTEGER PRIMARY KEY,
    file_id       INTEGER NOT NULL REFERENCES files (id),
    blob          TEXT NOT NULL UNIQUE,
    size          INTEGER NOT NULL,
    content_size  INTEGER NOT NULL,
    cksum         INTEGER NOT NULL,
    sha256        BLOB NOT NULL CHECK (length(sha256) = 32),
    verified      INTEGER NOT NULL DEFAULT 1,
    stored_at     INTEGER NOT NULL
);
CREATE INDEX versions_by_file ON versions (file_id, id);
CREATE VIEW latest_versions AS
    SELECT f.client_id, f.name, v.*
    FROM versions v JOIN files f ON f.id = v.file_id
    WHERE v.id = (SELECT max(id) FROM versions WHERE file_id = v.file_id);
";
