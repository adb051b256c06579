//! Backups: a consistent copy of a live store, and its restore into a data
//! directory while no broker serves it.
//!
//! A backup is the store as it stood at one instant: the same encrypted
//! file, so it is as safe as the store and opens only with the root key in
//! effect when it was taken. A restore puts it back into place, keeping the
//! store it replaces beside it, and refuses a copy that would bring back
//! the key of a class the store has shredded since.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// This broker's one place for a backup, held until the copy is gone.
    pub slot: tokio::sync::OwnedSemaphorePermit,
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
        let slot = Arc::clone(&self.backup_slot)
            .try_acquire_owned()
            .map_err(|_| {
                Error::FailedPrecondition(
                    "another backup is being taken; try again when it has finished".into(),
                )
            })?;
        self.audit(admin_entry(
            "store.backup",
            "store",
            true,
            "a copy of the store streamed to the caller".into(),
            request_id,
        ))
        .await?;
        let db = self.store.path().to_path_buf();
        let (file, size, about) = tokio::task::spawn_blocking(move || snapshot(&db))
            .await
            .map_err(|e| Error::Internal(format!("the backup task failed: {e}")))??;
        Ok(Snapshot {
            file,
            slot,
            size,
            about,
        })
    }
}

/// Removes copies a backup or a restore left behind when its process was
/// killed (`.backup-*.db`, `tessera.db.restoring`): they hold every key the
/// store held, which a later shred would not reach. Called where no other
/// backup or restore can be under way.
pub(crate) fn remove_stale_copies(db: &Path) {
    let dir = db.parent().unwrap_or(Path::new("."));
    let staged = db.with_extension("db.restoring");
    let staged = [staged.clone(), side(&staged, "-wal"), side(&staged, "-shm")];
    let stale = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string());
            // (With the `-journal` SQLite may leave beside one.)
            name.is_some_and(|n| n.starts_with(".backup-") && n.contains(".db"))
                || staged.contains(p)
        });
    for p in stale {
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::info!(file = %p.display(), "removed a copy of the store an interrupted backup or restore left")
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a copy of the store an interrupted backup or restore left; delete it")
            }
        }
    }
}

fn snapshot(db: &Path) -> Result<(tempfile::NamedTempFile, u64, About)> {
    remove_stale_copies(db);
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
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let target = file.path().to_string_lossy().to_string();
    conn.execute("VACUUM INTO ?1", [&target]).map_err(|e| {
        Error::Unavailable(format!(
            "the store could not be copied ({e}); is the disk holding {} full?",
            dir.display()
        ))
    })?;
    let about = about(file.path())?;
    let size = file.as_file().metadata()?.len();
    Ok((file, size, about))
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

/// Puts the backup `from` in place as the store of `dir`, which no process
/// may have open (no broker, no offline `rotate --due`). The store there,
/// if any, must be the same store (same id), under the same root key, and
/// must not have shredded a class whose key the backup still holds.
///
/// The backup is first copied (with SQLite, so that a WAL beside it counts)
/// to a private staging file beside the store and checked there; only then
/// is the store in place checkpointed and moved aside (never deleted) and
/// the staged copy renamed into place, so a failure or a crash at any step
/// leaves a whole store at `tessera.db` or, between the two renames, at the
/// kept path the error names. The next `serve` records the restore in the
/// audit trail.
pub fn restore(dir: &DataDir, from: &Path) -> Result<Restored> {
    let from = std::fs::canonicalize(from).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!(
            "{} does not exist; give the file `tessera backup` wrote",
            from.display()
        )),
        _ => Error::Io(format!("cannot read {}: {e}", from.display())),
    })?;
    if !dir.root().exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.root())
            .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.root().display())))?;
    }
    let _serving = dir.lock_for_serving().map_err(|e| match e {
        Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
            "a broker is serving the store in {}; stop it before restoring a backup",
            dir.root().display()
        )),
        e => e,
    })?;
    let _alone = dir.lock_open(true)?.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "another process has the store in {} open (`tessera rotate --due` from its timer or \
             cron?); stop it, and the timer, before restoring a backup",
            dir.root().display()
        ))
    })?;
    let db = dir.db();
    let staged = db.with_extension("db.restoring");
    let sides = |p: &Path| [side(p, "-wal"), side(p, "-shm")];
    for own in [db.clone(), staged.clone()]
        .into_iter()
        .chain(sides(&db))
        .chain(sides(&staged))
    {
        if std::fs::canonicalize(&own).is_ok_and(|p| p == from) {
            return Err(Error::invalid(
                "backup",
                format!(
                    "{} is the store itself (or a file of it), not a backup; give the file \
                     `tessera backup` wrote",
                    own.display()
                ),
            ));
        }
    }
    // What a broken earlier restore left; never a store anyone uses.
    for p in std::iter::once(staged.clone()).chain(sides(&staged)) {
        let _ = std::fs::remove_file(p);
    }
    let checked = stage(&from, &staged, dir.root()).and_then(|()| {
        let about = about(&staged)?;
        if db.exists() {
            check_replaceable(&db, &from, &staged, &about)?;
        } else {
            refuse_orphans(&db)?;
        }
        mark_restored(&staged, &from, &about)?;
        Ok(about)
    });
    let about = checked.inspect_err(|_| {
        let _ = std::fs::remove_file(&staged);
    })?;
    let kept = if db.exists() {
        Some(move_aside(&db).inspect_err(|_| {
            let _ = std::fs::remove_file(&staged);
        })?)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&staged, &db) {
        let back = kept.as_ref().map(|k| std::fs::rename(k, &db));
        return Err(Error::Io(match (back, &kept) {
            (Some(Err(_)), Some(k)) => format!(
                "cannot put the backup in place ({e}); the store that was there is at {}: move \
                 it back to {}",
                k.display(),
                db.display()
            ),
            _ => format!("cannot put the backup in place ({e}); the store is unchanged"),
        }));
    }
    std::fs::File::open(dir.root())?.sync_all()?;
    Ok(Restored { about, kept })
}

/// `path` with `suffix` (`-wal`, `-shm`) appended, as SQLite names them.
fn side(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// Copies the backup `from` (with its WAL, if it has one) to `staged`, a
/// new 0600 file in `dir`, owned like `dir`.
fn stage(from: &Path, staged: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // `about` first: a file that is no store gets that error, not SQLite's.
    about(from)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(staged)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", staged.display())))?;
    let src = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.execute("VACUUM INTO ?1", [staged.to_string_lossy()])
        .map_err(|e| {
            Error::Io(format!(
                "cannot copy {} into {} ({e}); is the disk full?",
                from.display(),
                staged.display()
            ))
        })?;
    // Run as root for a broker that runs as its own user, the file must
    // stay the broker's.
    let owner = std::fs::metadata(dir)?;
    if nix::unistd::geteuid().is_root() && owner.uid() != 0 {
        std::os::unix::fs::chown(staged, Some(owner.uid()), Some(owner.gid()))?;
    }
    Ok(())
}

/// Leaves a note in the staged copy for the next `serve` to audit, and
/// puts it in WAL mode as `init` does.
fn mark_restored(staged: &Path, from: &Path, about: &About) -> Result<()> {
    let conn = Connection::open(staged)?;
    let note = serde_json::json!({
        "time": now(),
        "from": from.display().to_string(),
        "audit_seq": about.audit_seq,
    });
    store::meta_set(&conn, RESTORED, note.to_string().as_bytes())?;
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    drop(conn);
    std::fs::File::open(staged)?.sync_all()?;
    Ok(())
}

/// Refuses a WAL left without its database: SQLite would apply it to the
/// restored file.
fn refuse_orphans(db: &Path) -> Result<()> {
    let wal = side(db, "-wal");
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Err(Error::FailedPrecondition(format!(
            "{} is there without {}: it holds commits of a store that was moved away; move it \
             to that store (or delete it if that store is gone) before restoring",
            wal.display(),
            db.display()
        )));
    }
    let _ = std::fs::remove_file(side(db, "-shm"));
    let _ = std::fs::remove_file(&wal);
    Ok(())
}

/// Refuses to replace the store `db` with the backup `from` when that
/// would lose it for good or bring back a shredded key.
fn check_replaceable(db: &Path, from: &Path, staged: &Path, backup: &About) -> Result<()> {
    let current = about(db).map_err(|e| {
        Error::FailedPrecondition(format!(
            "the store in place cannot be read ({e}); move {} (with its -wal and -shm files) \
             away yourself if it is to be replaced",
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
    conn.execute("ATTACH DATABASE ?1 AS backup", [staged.to_string_lossy()])?;
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

/// Folds the WAL of the store `db` into it, then moves it (and its emptied
/// WAL and shared-memory files) aside, to `tessera.db.before-restore-TIME`;
/// returns that path.
fn move_aside(db: &Path) -> Result<PathBuf> {
    {
        let conn = Connection::open(db)?;
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy != 0 {
            return Err(Error::FailedPrecondition(format!(
                "{} is in use by another process; stop it before restoring",
                db.display()
            )));
        }
    }
    let stamp = now();
    let mut kept = db.with_extension(format!("db.before-restore-{stamp}"));
    let mut n = 1;
    while kept.exists() {
        kept = db.with_extension(format!("db.before-restore-{stamp}-{n}"));
        n += 1;
    }
    std::fs::rename(db, &kept)?;
    // (Empty now: neither order of these renames can lose a commit.)
    for suffix in ["-wal", "-shm"] {
        let from = side(db, suffix);
        if from.exists() {
            std::fs::rename(&from, side(&kept, suffix))?;
        }
    }
    Ok(kept)
}
