//! Backups: a consistent copy of a live store, and its restore into a data
//! directory while no broker serves it.
//!
//! A backup is the store as it stood at one instant: the same encrypted
//! file, so it is as safe as the store and opens only with the root key in
//! effect when it was taken. A restore puts it back into place, keeping the
//! store it replaces beside it, and refuses a copy that would bring back
//! the key of a class the store has shredded since.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::agent::admin_entry;
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::init::{DataDir, now, rfc3339};
use crate::store::{self, meta_get};

/// A copy of the store, in a private temporary file beside it (removed
/// when this is dropped).
pub struct Snapshot {
    /// The copy.
    pub file: tempfile::NamedTempFile,
    /// Its size in bytes.
    pub size: u64,
    /// What it holds.
    pub about: About,
}

/// What a store file is: whose, and how far its audit trail goes.
#[derive(Debug, Clone)]
pub struct About {
    /// The store's id.
    pub store_id: String,
    /// The last audit record's sequence number.
    pub audit_seq: u64,
    /// That record's time (Unix seconds): about when the copy was taken.
    pub audit_time: i64,
    /// The root key's check value (changes with every `rekey root`): a
    /// copy opens only with the key it was taken under.
    root_key: Option<Vec<u8>>,
}

/// Meta key a restore leaves in the store, for `serve` to audit.
pub(crate) const RESTORED: &str = "restored";

impl Broker {
    /// Copies the store as it stands (one read transaction: a consistent
    /// copy while writes go on), after auditing the request.
    pub async fn backup(&self, request_id: &str) -> Result<Snapshot> {
        self.audit(admin_entry(
            "store.backup",
            "store",
            true,
            "a copy of the store streamed to the caller".into(),
            request_id,
        ))
        .await?;
        let db = self.store.path().to_path_buf();
        tokio::task::spawn_blocking(move || snapshot(&db))
            .await
            .map_err(|e| Error::Internal(format!("the backup task failed: {e}")))?
    }
}

fn snapshot(db: &Path) -> Result<Snapshot> {
    let dir = db.parent().unwrap_or(Path::new("."));
    // Beside the store: as private as it (0600 in its 0700 directory).
    let file = tempfile::Builder::new()
        .prefix(".backup-")
        .suffix(".db")
        .tempfile_in(dir)
        .map_err(|e| {
            Error::Io(format!(
                "cannot make a backup file in {}: {e}",
                dir.display()
            ))
        })?;
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let target = file.path().to_string_lossy().to_string();
    conn.execute("VACUUM INTO ?1", [&target]).map_err(|e| {
        Error::Unavailable(format!(
            "the store could not be copied ({e}); is the disk holding {} full?",
            dir.display()
        ))
    })?;
    let about = about(file.path())?;
    let size = file.as_file().metadata()?.len();
    Ok(Snapshot { file, size, about })
}

/// Reads what `path` is, refusing a file that is not a whole, intact
/// tessera store.
pub fn about(path: &Path) -> Result<About> {
    let not_a_store = |why: String| {
        Error::invalid(
            "backup",
            format!("{} is not a tessera store ({why})", path.display()),
        )
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| not_a_store(e.to_string()))?;
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| not_a_store(e.to_string()))?;
    if check != "ok" {
        return Err(Error::Tampered(format!(
            "{} is damaged (SQLite's integrity check: {check}); use another backup",
            path.display()
        )));
    }
    let store_id = meta_get(&conn, "store_id")
        .map_err(|e| not_a_store(e.to_string()))?
        .map(|v| String::from_utf8_lossy(&v).to_string())
        .ok_or_else(|| not_a_store("it has no store id".into()))?;
    let (audit_seq, audit_time) = conn
        .query_row(
            "SELECT seq, time FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0));
    Ok(About {
        store_id,
        audit_seq,
        audit_time,
        root_key: meta_get(&conn, "root_key_check")?,
    })
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The backup's store and trail.
    pub about: About,
    /// Where the store it replaced was moved, if there was one.
    pub kept: Option<PathBuf>,
}

/// Puts the backup `from` in place as the store of `dir`, which no broker
/// may be serving. The store there, if any, must be the same store (same
/// id), under the same root key, and must not have shredded a class whose
/// key the backup still holds; it is moved aside (with its WAL), never
/// deleted. The next `serve` records the restore in the audit trail.
pub fn restore(dir: &DataDir, from: &Path) -> Result<Restored> {
    let _serving = dir.lock_for_serving().map_err(|e| match e {
        Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
            "a broker is serving the store in {}; stop it before restoring a backup",
            dir.root().display()
        )),
        e => e,
    })?;
    let about = about(from)?;
    let db = dir.db();
    let kept = if db.exists() {
        check_replaceable(&db, from, &about)?;
        Some(move_aside(&db)?)
    } else {
        std::fs::create_dir_all(dir.root())?;
        None
    };
    let staged = db.with_extension("db.restoring");
    let _ = std::fs::remove_file(&staged);
    copy_private(from, &staged)?;
    {
        let conn = Connection::open(&staged)?;
        let note = serde_json::json!({
            "time": now(),
            "from": from.display().to_string(),
            "audit_seq": about.audit_seq,
            "kept": kept.as_ref().map(|p| p.display().to_string()),
        });
        store::meta_set(&conn, RESTORED, note.to_string().as_bytes())?;
    }
    std::fs::rename(&staged, &db)?;
    std::fs::File::open(dir.root())?.sync_all()?;
    Ok(Restored { about, kept })
}

/// Refuses to replace the store `db` with the backup `from` when that
/// would lose it for good or bring back a shredded key.
fn check_replaceable(db: &Path, from: &Path, backup: &About) -> Result<()> {
    let current = about(db).map_err(|e| {
        Error::FailedPrecondition(format!(
            "the store in place cannot be read ({e}); move {} away yourself if it is to be \
             replaced",
            db.display()
        ))
    })?;
    if current.store_id != backup.store_id {
        return Err(Error::FailedPrecondition(format!(
            "{} is a backup of another store ({}, not {}); restore it into its own data \
             directory (--data-dir)",
            from.display(),
            backup.store_id,
            current.store_id
        )));
    }
    if current.root_key != backup.root_key {
        return Err(Error::FailedPrecondition(format!(
            "{} was taken under another root key (before a `rekey root`); it opens only with \
             that key, which the rekey retired, so it was not restored",
            from.display()
        )));
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute("ATTACH DATABASE ?1 AS backup", [from.to_string_lossy()])?;
    let back: Vec<(String, i64)> = conn
        .prepare(
            "SELECT c.name, coalesce(c.shredded_at, 0) FROM classes c
             JOIN backup.classes b ON b.name = c.name
             WHERE c.state = 'shredded'
               AND (b.wrapped_key IS NOT NULL
                    OR EXISTS (SELECT 1 FROM backup.class_shares s WHERE s.class = b.name))",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if !back.is_empty() {
        let names: Vec<String> = back
            .iter()
            .map(|(c, t)| format!("{c} (shredded {})", rfc3339(*t)))
            .collect();
        return Err(Error::FailedPrecondition(format!(
            "{} still holds the key of {}: a restore would bring back what the shred destroyed; \
             destroy this backup and restore a later one",
            from.display(),
            names.join(", ")
        )));
    }
    Ok(())
}

/// Moves the store `db` and its WAL and shared-memory files aside, to
/// `tessera.db.before-restore-TIME`; returns that path.
fn move_aside(db: &Path) -> Result<PathBuf> {
    let stamp = now();
    let mut kept = db.with_extension(format!("db.before-restore-{stamp}"));
    let mut n = 1;
    while kept.exists() {
        kept = db.with_extension(format!("db.before-restore-{stamp}-{n}"));
        n += 1;
    }
    // The WAL goes with its database: left in place, SQLite would apply
    // the old store's frames to the restored file.
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", db.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", kept.display()))?;
        }
    }
    std::fs::rename(db, &kept)?;
    Ok(kept)
}

fn copy_private(from: &Path, to: &Path) -> Result<()> {
    let mut src = std::fs::File::open(from)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", from.display())))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", to.display())))?;
    dst.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(())
}
