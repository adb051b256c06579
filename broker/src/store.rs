//! The embedded store: one SQLite file (WAL, `synchronous=FULL`,
//! `secure_delete=ON`), a versioned schema, a few read-only connections, and
//! one writer thread that batches concurrent writes into one transaction
//! (group commit): it drains whatever is queued, applies each job (most in
//! their own savepoint, the lease hot path without), commits once, and only
//! then answers each caller.
//!
//! Services speak to the store in domain operations; no rusqlite type
//! leaves this module and its siblings in `store/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{self, Entry, Head};
use crate::error::{Error, Result};
use crate::keys::SymmetricKey;

/// The schema, one migration per version; `PRAGMA user_version` records how
/// many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: secrets, agents, leases, audit.
    "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        current_version INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE secret_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        wrapped_key BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT;
    CREATE TABLE agents (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash BLOB NOT NULL UNIQUE,
        allow TEXT NOT NULL,
        max_ttl INTEGER NOT NULL,
        max_lifetime INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    ) STRICT;
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        agent_id INTEGER NOT NULL,
        secret TEXT NOT NULL,
        version INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        renewable_until INTEGER NOT NULL,
        state INTEGER NOT NULL DEFAULT 0,
        ended_at INTEGER
    ) STRICT;
    CREATE INDEX leases_active_expiry ON leases(expires_at) WHERE state = 0;
    CREATE INDEX leases_active_agent ON leases(agent_id) WHERE state = 0;
    CREATE INDEX leases_active_secret ON leases(secret) WHERE state = 0;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        request_id TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    ) STRICT;
    CREATE INDEX audit_time ON audit(time);
    ",
    // 2: key holders, retention classes, legal holds, shred ceremonies.
    "
    CREATE TABLE holders (
        role TEXT PRIMARY KEY,
        age_recipient TEXT NOT NULL,
        signing_key BLOB NOT NULL,
        enrolled_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE holder_keys_retired (
        role TEXT NOT NULL,
        signing_key BLOB NOT NULL,
        retired_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE classes (
        name TEXT PRIMARY KEY,
        retain_secs INTEGER NOT NULL,
        deadline INTEGER NOT NULL,
        holders TEXT NOT NULL,
        threshold INTEGER NOT NULL,
        early_threshold INTEGER NOT NULL,
        key_fingerprint BLOB NOT NULL,
        generation INTEGER NOT NULL,
        wrapped_key BLOB,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        shredded_at INTEGER,
        certificate TEXT
    ) STRICT;
    CREATE TABLE class_shares (
        class TEXT NOT NULL,
        role TEXT NOT NULL,
        sealed TEXT NOT NULL,
        PRIMARY KEY (class, role)
    ) STRICT;
    CREATE TABLE class_data_keys (
        class TEXT NOT NULL,
        id INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        context_digest BLOB NOT NULL,
        wrapped BLOB NOT NULL,
        PRIMARY KEY (class, id)
    ) STRICT;
    CREATE TABLE holds (
        id INTEGER PRIMARY KEY,
        class TEXT NOT NULL,
        reason TEXT NOT NULL,
        placed_at INTEGER NOT NULL,
        released_at INTEGER,
        release_reason TEXT
    ) STRICT;
    CREATE INDEX holds_class ON holds(class);
    CREATE TABLE ceremonies (
        id TEXT PRIMARY KEY,
        class TEXT NOT NULL,
        statement TEXT NOT NULL,
        action TEXT NOT NULL,
        required INTEGER NOT NULL,
        opened_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        opened_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        state TEXT NOT NULL
    ) STRICT;
    CREATE INDEX ceremonies_class ON ceremonies(class);
    CREATE TABLE ceremony_joins (
        ceremony TEXT NOT NULL,
        role TEXT NOT NULL,
        signature BLOB NOT NULL,
        joined_at INTEGER NOT NULL,
        PRIMARY KEY (ceremony, role)
    ) STRICT;
    CREATE TABLE confirmations (
        class TEXT NOT NULL,
        role TEXT NOT NULL,
        signature BLOB NOT NULL,
        confirmed_at INTEGER NOT NULL,
        PRIMARY KEY (class, role)
    ) STRICT;
    ",
    // 3: rotation (version states, overlap, schedules, locks) and durable
    // events for Watch.
    "
    ALTER TABLE secret_versions ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
    ALTER TABLE secret_versions ADD COLUMN source TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE secret_versions ADD COLUMN retire_at INTEGER;
    ALTER TABLE secret_versions ADD COLUMN due_at INTEGER;
    ALTER TABLE secret_versions ADD COLUMN archived_class TEXT;
    ALTER TABLE secret_versions ADD COLUMN archived_key INTEGER;
    UPDATE secret_versions SET state = 'retired'
     WHERE version < (SELECT current_version FROM secrets s WHERE s.name = secret_versions.name);
    CREATE UNIQUE INDEX secret_versions_due ON secret_versions(name, due_at)
     WHERE due_at IS NOT NULL;
    CREATE INDEX secret_versions_retire ON secret_versions(retire_at)
     WHERE state = 'overlapping';
    ALTER TABLE secrets ADD COLUMN overlap_secs INTEGER NOT NULL DEFAULT 3600;
    ALTER TABLE secrets ADD COLUMN class TEXT;
    ALTER TABLE secrets ADD COLUMN generator TEXT;
    ALTER TABLE secrets ADD COLUMN rotate_cmd TEXT;
    ALTER TABLE secrets ADD COLUMN verify_cmd TEXT;
    ALTER TABLE secrets ADD COLUMN value_via TEXT NOT NULL DEFAULT 'stdin';
    ALTER TABLE secrets ADD COLUMN cmd_timeout INTEGER NOT NULL DEFAULT 30;
    ALTER TABLE secrets ADD COLUMN schedule TEXT;
    ALTER TABLE secrets ADD COLUMN schedule_tz TEXT;
    ALTER TABLE secrets ADD COLUMN jitter_secs INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE secrets ADD COLUMN next_due INTEGER;
    ALTER TABLE secrets ADD COLUMN last_result TEXT;
    ALTER TABLE secrets ADD COLUMN last_run_at INTEGER;
    ALTER TABLE secrets ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX secrets_next_due ON secrets(next_due) WHERE next_due IS NOT NULL;
    CREATE TABLE rotation_locks (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        kind TEXT NOT NULL,
        secret TEXT NOT NULL DEFAULT '',
        version INTEGER NOT NULL DEFAULT 0,
        lease_id TEXT NOT NULL DEFAULT '',
        agent_id INTEGER,
        expires_at INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT ''
    ) STRICT;
    ALTER TABLE leases ADD COLUMN warned INTEGER NOT NULL DEFAULT 0;
    ",
    // 4: agent tokens that expire.
    "
    ALTER TABLE agents ADD COLUMN expires_at INTEGER;
    ",
    // 5: ended leases, by when they ended, for deleting old ones.
    "
    CREATE INDEX leases_ended ON leases(ended_at) WHERE state != 0;
    ",
    // 6: MACs on agent and secret rows (see `rowmac`).
    "
    ALTER TABLE agents ADD COLUMN mac BLOB;
    ALTER TABLE secrets ADD COLUMN mac BLOB;
    ",
    // 7: agent tokens bound to a Unix peer uid.
    "
    ALTER TABLE agents ADD COLUMN peer_uid INTEGER;
    ",
    // 8: MACs on holder and class rows (see `rowmac`).
    "
    ALTER TABLE holders ADD COLUMN mac BLOB;
    ALTER TABLE classes ADD COLUMN mac BLOB;
    ",
    // 9: an agent's active leases by expiry, for the cap on them (a count
    // from the index alone); it serves revokes by agent as before.
    "
    DROP INDEX leases_active_agent;
    CREATE INDEX leases_active_agent ON leases(agent_id, expires_at) WHERE state = 0;
    ",
];

/// Lease states as stored.
pub mod lease_state {
    /// Usable until `expires_at`.
    pub const ACTIVE: i64 = 0;
    /// Passed `expires_at`; swept.
    pub const EXPIRED: i64 = 1;
    /// Ended early by the agent or an admin.
    pub const REVOKED: i64 = 2;

    /// The word for a stored state.
    pub fn name(s: i64) -> &'static str {
        match s {
            ACTIVE => "active",
            EXPIRED => "expired",
            _ => "revoked",
        }
    }
}

/// Opens (creating if asked) the database file and brings its schema up to
/// date. Used by `init`, by `serve` before unsealing, and by tests.
pub fn open_rw(path: &Path, create: bool) -> Result<Connection> {
    if create {
        create_private_file(path)?;
    } else if !path.exists() {
        return Err(Error::Store(format!(
            "no tessera store at {}; run `tessera init` first (or pass --data-dir)",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::Store(format!("cannot open the store at {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA secure_delete = ON;
         PRAGMA foreign_keys = ON;",
    )
    .map_err(|e| Error::Store(format!("cannot use the store at {}: {e}", path.display())))?;
    migrate(&conn)?;
    Ok(conn)
}

/// Creates `path` empty with mode 0600, refusing to overwrite.
fn create_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::AlreadyExists(format!(
                    "a store already exists at {}; nothing was changed",
                    path.display()
                ))
            } else {
                Error::Io(format!("cannot create {}: {e}", path.display()))
            }
        })?;
    Ok(())
}

fn migrate(conn: &Connection) -> Result<()> {
    let have: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if have > MIGRATIONS.len() {
        return Err(Error::Store(format!(
            "this store has schema version {have}, newer than this tessera understands ({}); \
             upgrade tessera",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Reads a meta value.
pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// Writes a meta value.
pub fn meta_set(conn: &Connection, key: &str, value: &[u8]) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// What the writer thread hands to each job: the open transaction and the
/// audit chain.
pub struct WriteCtx<'c> {
    /// The batch's transaction (the job may be in its own savepoint: see
    /// [`Store::write`] and [`Store::write_unguarded`]).
    pub conn: &'c Connection,
    chain: &'c mut Chain,
}

impl WriteCtx<'_> {
    /// Appends `entry` to the audit trail, in this transaction.
    pub fn audit(&mut self, entry: &Entry) -> Result<()> {
        self.chain.append(self.conn, entry)
    }

    /// The audit trail's head as of this point of the transaction: the last
    /// record's sequence number and hash.
    pub fn audit_head(&self) -> (u64, [u8; 32]) {
        (self.chain.head.seq, self.chain.head.hash)
    }

    /// The writer's count of the leases each agent holds.
    pub(crate) fn held(&mut self) -> &mut crate::lease::Held {
        &mut self.chain.held
    }

    /// Appends a durable event for `Watch`, in this transaction; watchers
    /// are woken once the transaction commits.
    pub fn event(&mut self, e: &NewEvent<'_>) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO events (time, kind, secret, version, lease_id, agent_id, expires_at,
                                     detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                e.time,
                e.kind,
                e.secret,
                e.version as i64,
                e.lease_id,
                e.agent_id,
                e.expires_at,
                e.detail
            ])?;
        self.chain.emitted = true;
        Ok(())
    }
}

/// An event to record for `Watch`.
#[derive(Debug, Default)]
pub struct NewEvent<'a> {
    /// When.
    pub time: i64,
    /// `secret.rotated`, `lease.revoked` or `lease.expiring`.
    pub kind: &'a str,
    /// The secret concerned.
    pub secret: &'a str,
    /// Its version (for rotations).
    pub version: u64,
    /// The lease concerned, if one.
    pub lease_id: &'a str,
    /// The agent whose lease it is, if one.
    pub agent_id: Option<i64>,
    /// For `lease.expiring`.
    pub expires_at: i64,
    /// A short text for people.
    pub detail: &'a str,
}

struct Chain {
    key: SymmetricKey,
    head: Head,
    /// Whether the current batch wrote an event.
    emitted: bool,
    /// SQLite's `data_version` at the writer's last batch: it changes when
    /// another connection (another process) commits.
    data_version: i64,
    /// How many leases each agent holds (for the cap on them); kept here,
    /// beside the chain, as state of the writer thread.
    held: crate::lease::Held,
}

impl Chain {
    /// Continues after what another process appended since this writer's
    /// last batch (`tessera rotate --due` opening the store itself), so
    /// sequence numbers stay unique and the chain unbroken. Called in the
    /// batch's transaction, which holds the write lock.
    fn follow_other_writers(&mut self, conn: &Connection) -> Result<()> {
        let v = data_version(conn)?;
        if v != self.data_version {
            self.data_version = v;
            self.head = current_head(conn)?;
            // It may have written events (a rotation): wake `Watch`.
            self.emitted = true;
            // And revoked leases.
            self.held.revoked(None);
        }
        Ok(())
    }

    fn append(&mut self, conn: &Connection, e: &Entry) -> Result<()> {
        let e = &*e.bounded();
        let seq = self.head.seq + 1;
        let prev = self.head.hash;
        let hash = audit::chain_hash(&self.key, seq, &prev, e);
        conn.prepare_cached(
            "INSERT INTO audit (seq, time, actor, action, target, decision, reason, request_id,
                                prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            seq as i64,
            e.time,
            e.actor,
            e.action,
            e.target,
            audit::decision(e.allowed),
            e.reason,
            e.request_id,
            &prev[..],
            &hash[..]
        ])
        .map_err(|e| {
            Error::Unavailable(format!(
                "the audit record could not be written ({e}); the request was not carried out"
            ))
        })?;
        self.head = Head { seq, hash };
        Ok(())
    }

    fn store_head(&self, conn: &Connection) -> Result<()> {
        let mac = audit::head_mac(&self.key, self.head.seq, &self.head.hash);
        let mut v = Vec::with_capacity(72);
        v.extend_from_slice(&self.head.seq.to_be_bytes());
        v.extend_from_slice(&self.head.hash);
        v.extend_from_slice(&mac);
        meta_set(conn, "audit_head", &v)
    }
}

fn data_version(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?)
}

/// Runs `f` in one transaction on `conn`, with the audit trail keyed by
/// `audit_key`, before the writer thread owns the connection (at open).
pub(crate) fn write_before_start<T>(
    conn: &mut Connection,
    audit_key: &SymmetricKey,
    f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>,
) -> Result<T> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Read in the transaction: another process may have appended meanwhile.
    let mut chain = Chain {
        head: current_head(&tx)?,
        key: SymmetricKey::from_bytes(audit_key.expose_bytes())?,
        emitted: false,
        // Unused: this chain lives for one transaction.
        data_version: 0,
        held: Default::default(),
    };
    let out = f(&mut WriteCtx {
        conn: &tx,
        chain: &mut chain,
    })?;
    chain.store_head(&tx)?;
    tx.commit()?;
    Ok(out)
}

/// Parses the stored audit head: `seq (8) || hash (32) || mac (32)`.
pub fn parse_head(v: &[u8]) -> Option<(Head, [u8; 32])> {
    if v.len() != 72 {
        return None;
    }
    let seq = u64::from_be_bytes(v[..8].try_into().ok()?);
    Some((
        Head {
            seq,
            hash: v[8..40].try_into().ok()?,
        },
        v[40..72].try_into().ok()?,
    ))
}

/// How a job ends once its batch committed or failed: an optional commit
/// hook (`write_then`), run with whether the job's changes were kept, and
/// the answer to its caller. The writer runs every hook of a batch before
/// it answers anyone.
struct Completion {
    hook: Option<Box<dyn FnOnce(bool) + Send>>,
    ok: bool,
    answer: Box<dyn FnOnce(Result<()>) + Send>,
}
/// A queued write. Called with `None` when its batch cannot be applied (no
/// transaction could be opened, or an earlier job failed in a way that
/// undoes the whole batch: an unguarded job's error, a savepoint that could
/// not be opened, released or rolled back), so the job fails its caller
/// instead of vanishing. Returns whether it succeeded and how to end.
type Job = Box<dyn for<'c> FnOnce(Option<&mut WriteCtx<'c>>) -> Completion + Send>;

/// A write waiting for the next batch.
struct Queued {
    job: Job,
    /// Whether the job runs in its own savepoint, so that its failure
    /// undoes only its own changes (else it undoes the whole batch).
    guarded: bool,
}

/// What the writer thread takes from its queue.
enum Cmd {
    /// A write, batched with its neighbours into one transaction.
    Write(Queued),
    /// Maintenance that must run outside any transaction (checkpoint,
    /// VACUUM), between batches.
    Maintain(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// Most jobs applied in one transaction.
const MAX_BATCH: usize = 1024;

/// How often the checkpoint thread copies committed WAL frames into the
/// database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Past this size the writer finishes the checkpoint itself between two
/// batches, so the next transaction starts the WAL over from its beginning.
/// Under steady load the checkpoint thread alone never catches up with the
/// writer (new frames land while it copies), and the WAL would grow without
/// bound: a growing file costs a block allocation and an inode write per
/// commit, and disk space. Also the size the WAL is truncated to afterwards.
const WAL_RESTART_BYTES: u64 = 8 << 20;

/// One WAL frame: a 24-byte header and a page (the store keeps SQLite's
/// default 4 KiB pages).
const WAL_FRAME_BYTES: u64 = 24 + 4096;

#[cfg(test)]
fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// What the writer has committed since it started.
#[derive(Debug, Default)]
struct WriteStats {
    /// Transactions committed (each one sync of the WAL).
    commits: AtomicU64,
    /// Requests answered by those commits.
    writes: AtomicU64,
}

/// An open, unsealed store: the writer and the readers.
pub struct Store {
    path: PathBuf,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    writer: mpsc::Sender<Cmd>,
    events: tokio::sync::watch::Receiver<u64>,
    stats: Arc<WriteStats>,
}

impl Store {
    /// Starts the writer thread on `conn` (already migrated) and opens
    /// `readers` read-only connections. `audit_key` keys the audit chain.
    pub fn start(
        path: &Path,
        conn: Connection,
        audit_key: SymmetricKey,
        readers: usize,
    ) -> Result<Self> {
        let chain = Chain {
            head: current_head(&conn)?,
            key: audit_key,
            emitted: false,
            data_version: data_version(&conn)?,
            held: Default::default(),
        };
        let mut rs = Vec::new();
        for _ in 0..readers.max(1) {
            let c = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            c.busy_timeout(std::time::Duration::from_secs(5))?;
            c.execute_batch("PRAGMA query_only = ON;")?;
            rs.push(Mutex::new(c));
        }
        // Checkpoints run on their own connection and thread so the writer
        // never stalls on one mid-batch (a PASSIVE checkpoint does not block
        // writers); the writer only appends to the WAL.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -16384;
             PRAGMA journal_size_limit = {WAL_RESTART_BYTES};"
        ))?;
        let checkpointer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        checkpointer.busy_timeout(std::time::Duration::from_secs(5))?;
        std::thread::Builder::new()
            .name("tessera-checkpoint".into())
            .spawn(move || {
                // Said once while it keeps failing (a full disk), not ten
                // times a second.
                let mut failing = false;
                loop {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    match checkpointer.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
                        Err(e) if !failing => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                            failing = true;
                        }
                        Err(_) => {}
                        Ok(()) if failing => {
                            tracing::info!("WAL checkpoint works again");
                            failing = false;
                        }
                        Ok(()) => {}
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the checkpoint thread: {e}")))?;
        let (tx, rx) = mpsc::channel::<Cmd>(8192);
        let (events_tx, events_rx) = tokio::sync::watch::channel(0u64);
        // After each commit, SQLite reports the WAL's length to this hook.
        conn.wal_hook(Some(note_wal_frames));
        let stats = Arc::new(WriteStats::default());
        let counts = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("tessera-writer".into())
            .spawn(move || writer_loop(conn, chain, rx, events_tx, &counts))
            .map_err(|e| Error::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Store {
            path: path.to_path_buf(),
            readers: rs,
            next_reader: AtomicUsize::new(0),
            writer: tx,
            events: events_rx,
            stats,
        })
    }

    /// Transactions committed since the store was opened, and the requests
    /// they carried: with concurrent requests, far fewer commits (and
    /// syncs) than requests.
    pub fn write_stats(&self) -> (u64, u64) {
        (
            self.stats.commits.load(Ordering::Relaxed),
            self.stats.writes.load(Ordering::Relaxed),
        )
    }

    /// Changes whenever a committed transaction wrote an event.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a read-only connection. Reads see the last committed
    /// state; they never block the writer.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(c) = self.readers[(start + i) % n].try_lock() {
                return f(&c);
            }
        }
        let c = self.readers[start % n]
            .lock()
            .map_err(|_| Error::Internal("a reader connection was poisoned".into()))?;
        f(&c)
    }

    /// Runs `f` in the writer's next transaction and returns its result once
    /// that transaction has committed (so an `Ok` is durable). `f` runs in
    /// its own savepoint: an `Err` from `f` rolls back only `f`'s own
    /// changes, and the other requests in the batch commit.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&mut WriteCtx<'c>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.queue(f, None::<fn(bool)>, true).await
    }

    /// Like [`Store::write`] but without `f`'s own savepoint, which costs
    /// more than the rest of a lease's write: an `Err` from `f` rolls back
    /// the whole batch and fails every request in it (UNAVAILABLE). Only for
    /// the hot path (issue, renew, revoke, denials), whose closures fail
    /// only when the store itself does (I/O, a full disk) and return every
    /// other outcome as an `Ok` value.
    pub async fn write_unguarded<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&mut WriteCtx<'c>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.queue(f, None::<fn(bool)>, false).await
    }

    /// Like [`Store::write`], and `on_commit(committed)` runs on the writer
    /// thread right after the commit (or rollback), before the next batch
    /// starts, and before any caller in the batch is answered or `Watch` is
    /// woken: for in-memory state that must change exactly when the
    /// transaction does (the root key after a rekey, cached rows a write
    /// replaced).
    /// `committed` is false when `f` failed (its savepoint was rolled back,
    /// even if the batch committed) or when the batch did not commit.
    pub async fn write_then<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&mut WriteCtx<'c>) -> Result<T> + Send + 'static,
        on_commit: impl FnOnce(bool) + Send + 'static,
    ) -> Result<T> {
        self.queue(f, Some(on_commit), true).await
    }

    async fn queue<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&mut WriteCtx<'c>) -> Result<T> + Send + 'static,
        on_commit: Option<impl FnOnce(bool) + Send + 'static>,
        guarded: bool,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |ctx: Option<&mut WriteCtx<'_>>| {
            let out = match ctx {
                Some(ctx) => f(ctx),
                None => Err(Error::Unavailable(
                    "the store could not apply this request's batch; nothing was changed, try again"
                        .into(),
                )),
            };
            let ok = out.is_ok();
            let answer = Box::new(move |committed: Result<()>| {
                // A job's own failure explains itself best; otherwise the
                // commit decides.
                let _ = tx.send(match out {
                    Err(e) => Err(e),
                    Ok(v) => committed.map(|()| v),
                });
            });
            let hook = on_commit.map(|h| Box::new(h) as Box<dyn FnOnce(bool) + Send>);
            Completion { hook, ok, answer }
        });
        self.writer
            .send(Cmd::Write(Queued { job, guarded }))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs `f` on the writer's connection outside any transaction, after
    /// everything queued before it has committed (for `wal_checkpoint` and
    /// `VACUUM`, which cannot run inside one).
    pub async fn maintain<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let cmd = Cmd::Maintain(Box::new(move |conn: &mut Connection| {
            let _ = tx.send(f(conn));
        }));
        self.writer.send(cmd).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Returns once everything queued before it has been committed.
    pub async fn flush(&self) -> Result<()> {
        self.write(|_| Ok(())).await
    }
}

fn stopped() -> Error {
    Error::Unavailable("the broker is shutting down; retry against the restarted broker".into())
}

/// Where new audit records continue: the stored head when there is one.
/// (If rows run past it, after the last row.)
/// If the newest rows were deleted while the broker was down, new records
/// still follow the true head, so the gap stays visible to `audit verify`.
fn current_head(conn: &Connection) -> Result<Head> {
    let last = last_row_head(conn)?;
    match meta_get(conn, "audit_head")?.and_then(|v| parse_head(&v)) {
        Some((head, _mac)) => {
            if head != last {
                tracing::warn!(
                    head_seq = head.seq,
                    last_seq = last.seq,
                    "the audit trail does not end at its recorded head; run `tessera audit verify`"
                );
            }
            // Rows beyond the head (inserted while down): continue after
            // them so sequence numbers stay unique; verify still flags them.
            Ok(if last.seq > head.seq { last } else { head })
        }
        None => Ok(last),
    }
}

fn last_row_head(conn: &Connection) -> Result<Head> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )
        .optional()?
        .map(|(seq, hash)| Head {
            seq: seq as u64,
            hash: hash.try_into().unwrap_or([0; 32]),
        })
        .unwrap_or_default())
}

fn writer_loop(
    mut conn: Connection,
    mut chain: Chain,
    mut rx: mpsc::Receiver<Cmd>,
    events: tokio::sync::watch::Sender<u64>,
    stats: &WriteStats,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    let mut held: Option<Cmd> = None;
    loop {
        let first = match held.take() {
            Some(c) => c,
            None => match rx.blocking_recv() {
                Some(c) => c,
                None => break,
            },
        };
        match first {
            Cmd::Maintain(f) => {
                f(&mut conn);
                continue;
            }
            Cmd::Write(j) => batch.push(j),
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Cmd::Write(j)) => batch.push(j),
                Ok(m @ Cmd::Maintain(_)) => {
                    // Runs after this batch commits, keeping queue order.
                    held = Some(m);
                    break;
                }
                Err(_) => break,
            }
        }
        chain.emitted = false;
        let (mut done, committed) = run_batch(&mut conn, &mut chain, &mut batch);
        if committed.is_ok() {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(done.len() as u64, Ordering::Relaxed);
        } else {
            // The transaction rolled back, so the in-memory head is ahead
            // of the file: reload it.
            if let Ok(h) = current_head(&conn) {
                chain.head = h;
            }
            // Its counts may have seen leases that were not stored.
            chain.held.revoked(None);
        }
        // Commit hooks (`write_then`) run first, then the answers, then
        // `Watch` is woken: whoever hears of a rotation must not be served
        // the cached row it replaced.
        for d in &mut done {
            if let Some(hook) = d.hook.take() {
                hook(d.ok && committed.is_ok());
            }
        }
        for d in done {
            (d.answer)(committed.as_ref().map(|_| ()).map_err(commit_failed));
        }
        if committed.is_ok() && chain.emitted {
            events.send_modify(|n| *n += 1);
        }
        restart_wal_if_large(&conn);
    }
}

thread_local! {
    /// Frames in the WAL after the writer's last commit, as SQLite reported
    /// them to [`note_wal_frames`] (on the writer thread, which makes every
    /// commit).
    static WAL_FRAMES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// SQLite's WAL hook on the writer's connection: records how many frames
/// the WAL holds after each commit. The length comes from SQLite rather
/// than from a `stat` of the file: a `stat` made the kernel give the WAL's
/// next write a fine-grained timestamp (Linux 6.13+), so every `fdatasync`
/// also wrote the inode, a second disk round trip per commit.
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(u64::try_from(frames).unwrap_or(0));
    Ok(())
}

/// Copies what the checkpoint thread has not yet copied (usually the last
/// few milliseconds of commits) when the WAL holds more than
/// [`WAL_RESTART_BYTES`]; with every frame in the database file, the next
/// write transaction starts the WAL over. Runs after a batch's answers are
/// sent, so no caller waits for it. PASSIVE never waits: if readers hold
/// old snapshots, it tries again after later batches.
fn restart_wal_if_large(conn: &Connection) {
    if WAL_FRAMES.get() * WAL_FRAME_BYTES <= WAL_RESTART_BYTES {
        return;
    }
    // (busy, frames in the WAL, frames copied); busy when the checkpoint
    // thread holds the lock: the next batch tries again.
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
        Ok(0) => {}
        Ok(_) => tracing::debug!("WAL checkpoint busy; will retry"),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; will retry"),
    }
}

fn commit_failed(e: &Error) -> Error {
    match e {
        // (Already says so, with SQLite's reason.)
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        _ => Error::Unavailable(format!(
            "the store could not commit this request ({e}); nothing was changed, try again"
        )),
    }
}

/// Applies `batch` in one transaction; returns each job's answer and the
/// outcome of the commit, which every answer waits for.
///
/// A guarded job runs in its own savepoint: when it fails, its changes (and
/// its audit records) are rolled back to the savepoint and it alone answers
/// with its error. Unguarded jobs (the hot path) run without one (a
/// statement sub-journal per job cost more than everything else the writer
/// does); such a job returns `Err` only when the store itself failed (I/O,
/// a full disk, a refused audit insert), and then the whole batch is rolled
/// back and every job in it fails UNAVAILABLE, so no half-applied job is
/// ever committed. Denials are `Ok` values and commit with their audit
/// record.
fn run_batch(
    conn: &mut Connection,
    chain: &mut Chain,
    batch: &mut Vec<Queued>,
) -> (Vec<Completion>, Result<()>) {
    let mut done: Vec<Completion> = Vec::with_capacity(batch.len());
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            for q in batch.drain(..) {
                done.push((q.job)(None));
            }
            return (done, Err(Error::from(e)));
        }
    };
    if let Err(e) = chain.follow_other_writers(&tx) {
        for q in batch.drain(..) {
            done.push((q.job)(None));
        }
        return (done, Err(e));
    }
    let head_at_start = chain.head;
    let mut failed = false;
    for Queued { job, guarded } in batch.drain(..) {
        if failed {
            done.push(job(None));
            continue;
        }
        if !guarded {
            let mut ctx = WriteCtx { conn: &tx, chain };
            let completion = job(Some(&mut ctx));
            failed |= !completion.ok;
            done.push(completion);
            continue;
        }
        if tx.execute_batch("SAVEPOINT job").is_err() {
            failed = true;
            done.push(job(None));
            continue;
        }
        let (head, emitted) = (chain.head, chain.emitted);
        let mut ctx = WriteCtx { conn: &tx, chain };
        let completion = job(Some(&mut ctx));
        let closed = if completion.ok {
            tx.execute_batch("RELEASE job")
        } else {
            // Undo only this job: its rows, its audit records, its events.
            chain.head = head;
            chain.emitted = emitted;
            chain.held.revoked(None);
            tx.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        failed |= closed.is_err();
        done.push(completion);
    }
    if failed {
        chain.head = head_at_start;
        let _ = tx.rollback();
        return (
            done,
            Err(Error::Unavailable(
                "another request in the same commit failed to store".into(),
            )),
        );
    }
    let outcome = if chain.head != head_at_start {
        chain.store_head(&tx)
    } else {
        Ok(())
    }
    .and_then(|()| tx.commit().map_err(Error::from));
    (done, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(what: &str) -> crate::audit::Entry {
        crate::audit::Entry {
            time: 1,
            actor: "system".into(),
            action: "test".into(),
            target: what.into(),
            allowed: true,
            reason: String::new(),
            request_id: String::new(),
        }
    }

    /// A new store in a temporary directory (kept while the returned
    /// guard lives), its audit trail keyed by `key`; and its database path.
    fn new_store(key: SymmetricKey) -> (tempfile::TempDir, PathBuf, Arc<Store>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tessera.db");
        let conn = open_rw(&path, true).expect("new store");
        let store = Arc::new(Store::start(&path, conn, key, 1).expect("start"));
        (dir, path, store)
    }

    /// A failing guarded job undoes only its own rows and audit records;
    /// its neighbours in the same batch commit, and the chain stays whole.
    /// A failing unguarded job fails its whole batch.
    #[test]
    fn one_failing_write_does_not_fail_its_neighbours() {
        let key = SymmetricKey::generate().expect("key");
        let verify_key = SymmetricKey::from_bytes(key.expose_bytes()).expect("key copy");
        let (_dir, _, store) = new_store(key);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        // Queues `jobs` while the writer is held, so they share one batch.
        type Write = Box<dyn FnOnce(&mut WriteCtx<'_>) -> Result<()> + Send>;
        let batch = |jobs: Vec<(bool, Write)>| -> Vec<Result<()>> {
            rt.block_on(async {
                let (release, held) = std::sync::mpsc::channel::<()>();
                let s = Arc::clone(&store);
                let hold = tokio::spawn(async move {
                    s.maintain(move |_| {
                        let _ = held.recv();
                        Ok(())
                    })
                    .await
                });
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let mut calls = Vec::new();
                for (guarded, f) in jobs {
                    let s = Arc::clone(&store);
                    calls.push(tokio::spawn(async move {
                        if guarded {
                            s.write(f).await
                        } else {
                            s.write_unguarded(f).await
                        }
                    }));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                release.send(()).expect("release the writer");
                hold.await.expect("hold").expect("maintain");
                let mut out = Vec::new();
                for c in calls {
                    out.push(c.await.expect("call"));
                }
                out
            })
        };
        let put = |k: &'static str, fail: bool| -> Write {
            Box::new(move |ctx| {
                meta_set(ctx.conn, k, b"x")?;
                ctx.audit(&entry(k))?;
                if fail {
                    ctx.event(&NewEvent {
                        kind: "test",
                        ..Default::default()
                    })?;
                    return Err(Error::FailedPrecondition(format!("{k} is refused")));
                }
                Ok(())
            })
        };
        let events = store.subscribe_events();
        let got = batch(vec![
            (true, put("a", false)),
            (true, put("b", true)),
            (false, put("c", false)),
            (true, put("d", false)),
        ]);
        assert!(
            got[0].is_ok() && got[2].is_ok() && got[3].is_ok(),
            "{got:?}"
        );
        assert!(
            matches!(&got[1], Err(Error::FailedPrecondition(_))),
            "{got:?}"
        );
        assert!(
            !events.has_changed().expect("events"),
            "watchers were woken for an event that was rolled back"
        );
        let got = batch(vec![(true, put("e", false)), (false, put("f", true))]);
        assert!(got.iter().all(|r| r.is_err()), "{got:?}");

        let (present, verdict) = store
            .read(|conn| {
                let present: Vec<bool> = ["a", "b", "c", "d", "e", "f"]
                    .iter()
                    .map(|k| meta_get(conn, k).map(|v| v.is_some()))
                    .collect::<Result<_>>()?;
                Ok((present, crate::broker::walk_chain(conn, &verify_key)?))
            })
            .expect("read");
        assert_eq!(present, [true, false, true, true, false, false]);
        assert_eq!(verdict, crate::audit::Verdict::Intact { records: 3 });
        let stored_events: i64 = store
            .read(|c| Ok(c.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?))
            .expect("events");
        assert_eq!(stored_events, 0);
    }

    /// Two processes writing one store (the broker and `tessera rotate
    /// --due`) each continue the audit trail after the other's records,
    /// and a commit by the other wakes `Watch`.
    #[test]
    fn writers_follow_each_others_commits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tessera.db");
        let key = SymmetricKey::generate().expect("key");
        let copy = || SymmetricKey::from_bytes(key.expose_bytes()).expect("key copy");
        let start = |create| {
            let conn = open_rw(&path, create).expect("store");
            Store::start(&path, conn, copy(), 1).expect("start")
        };
        let (a, b) = (start(true), start(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let mut events = a.subscribe_events();
        rt.block_on(async {
            for (store, what) in [(&a, "a1"), (&b, "b1"), (&b, "b2"), (&a, "a2")] {
                store
                    .write(move |ctx| ctx.audit(&entry(what)))
                    .await
                    .expect(what);
            }
            // (The writer wakes watchers after it has answered.)
            let woken = tokio::time::timeout(std::time::Duration::from_secs(10), events.changed());
            assert!(
                woken.await.is_ok_and(|r| r.is_ok()),
                "the other writer's commits did not wake Watch"
            );
        });
        let verdict = a
            .read(|conn| crate::broker::walk_chain(conn, &copy()))
            .expect("walk");
        assert_eq!(verdict, crate::audit::Verdict::Intact { records: 4 });
    }

    /// `walk_chain` reads the records and the head from one snapshot:
    /// commits landing while it walks never make an intact trail look
    /// truncated.
    #[test]
    fn the_chain_walks_intact_while_records_are_appended() {
        let key = SymmetricKey::generate().expect("key");
        let verify_key = SymmetricKey::from_bytes(key.expose_bytes()).expect("key copy");
        let (_dir, _, store) = new_store(key);
        // A trail long enough that commits land while it is walked.
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(store.write(|ctx| (0..5000).try_for_each(|_| ctx.audit(&entry("old")))))
            .expect("fill");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writing = {
            let (store, done) = (Arc::clone(&store), Arc::clone(&done));
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    while !done.load(Ordering::Relaxed) {
                        store
                            .write(move |ctx| ctx.audit(&entry("w")))
                            .await
                            .expect("append");
                    }
                });
            })
        };
        for _ in 0..50 {
            let verdict = store
                .read(|conn| crate::broker::walk_chain(conn, &verify_key))
                .expect("walk");
            assert!(
                matches!(verdict, crate::audit::Verdict::Intact { .. }),
                "{verdict:?}"
            );
        }
        done.store(true, Ordering::Relaxed);
        writing.join().expect("writer thread");
    }

    /// A commit hook has run before the writer wakes `Watch`: a watcher
    /// told of a rotation is never served the cached row the rotation
    /// replaced.
    #[test]
    fn commit_hooks_run_before_watchers_hear_of_the_commit() {
        use std::sync::atomic::AtomicBool;
        let (_dir, _, store) = new_store(SymmetricKey::generate().expect("key"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let hooked = Arc::new(AtomicBool::new(false));
        rt.block_on(async {
            let mut events = store.subscribe_events();
            let (s, h) = (Arc::clone(&store), Arc::clone(&hooked));
            let write = tokio::spawn(async move {
                s.write_then(
                    |ctx| {
                        ctx.event(&NewEvent {
                            kind: "secret.rotated",
                            ..Default::default()
                        })
                    },
                    move |committed| {
                        // Slow, so that a wake sent before it would be seen.
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        h.store(committed, Ordering::SeqCst);
                    },
                )
                .await
            });
            events.changed().await.expect("woken");
            assert!(
                hooked.load(Ordering::SeqCst),
                "a watcher heard of the commit before its hook ran"
            );
            write.await.expect("write").expect("committed");
        });
    }

    /// Under writes that never pause, the WAL is started over once it passes
    /// its limit instead of growing with every commit.
    #[test]
    fn the_wal_stays_bounded_under_steady_writes() {
        let (_dir, path, store) = new_store(SymmetricKey::generate().expect("key"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        const VALUE: usize = 8 << 10;
        // Many writers at once, so the writer always has the next batch
        // queued: four times the limit in values alone.
        let per_writer = 4 * WAL_RESTART_BYTES as usize / VALUE / 32 + 1;
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for w in 0..32 {
                let store = Arc::clone(&store);
                set.spawn(async move {
                    for i in 0..per_writer {
                        store
                            .write(move |ctx| {
                                // A changed value: SQLite skips pages whose
                                // bytes stay the same.
                                meta_set(ctx.conn, &format!("t{w}.{}", i % 4), &[i as u8; VALUE])
                            })
                            .await
                            .expect("write");
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("writer task");
            }
        });
        let wal = std::fs::metadata(wal_path(&path)).expect("WAL").len();
        assert!(
            wal <= 2 * WAL_RESTART_BYTES,
            "the WAL grew to {wal} bytes under steady writes"
        );
    }
}
