//! `tessera backup` (a consistent copy of the live store, through the
//! broker) and `tessera restore` (put one back, with no broker serving).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use tessera_broker::proto;

use crate::client::{CliError, Exit, authed};
use crate::commands::{admin_token, check_new_file, data_dir, print_json, target, time};
use crate::{BackupArgs, Global, RestoreArgs};

/// `tessera backup --out FILE`.
pub(crate) async fn backup(g: &Global, a: BackupArgs) -> Result<(), CliError> {
    check_new_file(Some(&a.out))?;
    let token = admin_token(g)?;
    // Written beside OUT, then linked into place once whole and checked:
    // OUT never holds half a copy, and an existing OUT is never replaced.
    // Made before the broker is asked, so that a place that cannot be
    // written costs no copy of the store.
    let partial = Partial::create(&a.out)?;
    // A Ctrl-C or SIGTERM removes the partial copy (it holds every key the
    // store holds) before the command ends.
    let signal = |kind| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot watch for signals: {e}")))
    };
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let received = tokio::select! {
        r = receive(g, &token, &partial) => r,
        _ = int.recv() => Err(CliError::new(Exit::Failure, "interrupted; no backup was written")),
        _ = term.recv() => Err(CliError::new(Exit::Failure, "terminated; no backup was written")),
    };
    let first = received.and_then(|first| partial.place(&a.out).map(|()| first))?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    if g.json {
        print_json(json!({
            "file": a.out.display().to_string(),
            "bytes": first.size,
            "store_id": first.store_id,
            "audit_seq": first.audit_seq,
            "audit_time": time(first.audit_time),
        }));
    } else {
        outln!(
            "Backup of store {} written to {} ({} bytes, audit trail to record {}, {}).",
            first.store_id,
            a.out.display(),
            first.size,
            first.audit_seq,
            time(first.audit_time)
        );
        outln!(
            "It is encrypted, and opens only with the root key in effect now: keep it as \
             safe as the store; restore it with `tessera restore {}` while no broker serves.",
            a.out.display()
        );
    }
    Ok(())
}

/// The file a backup is received into, `OUT.partial` (0600); removed
/// when dropped unless it was placed.
struct Partial {
    path: PathBuf,
    file: std::fs::File,
}

impl Partial {
    fn create(out: &Path) -> Result<Self, CliError> {
        let path = PathBuf::from(format!("{}.partial", out.display()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => CliError::new(
                    Exit::Precondition,
                    format!(
                        "{} is left from an interrupted backup; delete it and try again",
                        path.display()
                    ),
                ),
                _ => CliError::new(
                    Exit::Failure,
                    format!("cannot create {}: {e}", path.display()),
                ),
            })?;
        Ok(Partial { path, file })
    }

    fn failed(&self, e: &dyn std::fmt::Display) -> CliError {
        CliError::new(
            Exit::Failure,
            format!("cannot write {}: {e}", self.path.display()),
        )
    }

    /// Moves the whole, checked copy to `out`, never over a file that
    /// exists: a hard link where the file system has them, else a rename
    /// after checking (vfat, some network file systems).
    fn place(&self, out: &Path) -> Result<(), CliError> {
        let exists = || {
            CliError::new(
                Exit::Precondition,
                format!(
                    "{} appeared while the backup was taken; give --out a new file name",
                    out.display()
                ),
            )
        };
        match std::fs::hard_link(&self.path, out) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
            Err(_) if out.symlink_metadata().is_ok() => Err(exists()),
            Err(_) => std::fs::rename(&self.path, out).map_err(|e| {
                CliError::new(
                    Exit::Failure,
                    format!("cannot write {}: {e}", out.display()),
                )
            }),
        }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asks the broker for the copy and writes it to `partial`, checked;
/// returns the first chunk (what the copy is), without its data.
async fn receive(
    g: &Global,
    token: &str,
    partial: &Partial,
) -> Result<proto::BackupChunk, CliError> {
    let mut admin = target(g).admin().await?;
    let mut stream = admin
        .backup(authed(proto::BackupRequest {}, token)?)
        .await?
        .into_inner();
    let mut file = &partial.file;
    let mut first: Option<proto::BackupChunk> = None;
    let mut n = 0u64;
    while let Some(mut c) = stream.message().await? {
        file.write_all(&c.data).map_err(|e| partial.failed(&e))?;
        n += c.data.len() as u64;
        if first.is_none() {
            c.data = Vec::new();
            first = Some(c);
        }
    }
    let first = first
        .ok_or_else(|| CliError::new(Exit::Unavailable, "the broker sent no backup; try again"))?;
    if n != first.size {
        return Err(CliError::new(
            Exit::Unavailable,
            format!(
                "the backup stream ended after {n} of {} bytes; try again",
                first.size
            ),
        ));
    }
    file.sync_all().map_err(|e| partial.failed(&e))?;
    tessera_broker::backup::about(&partial.path).map_err(|e| {
        CliError::new(
            Exit::Unavailable,
            format!("the copy received does not check ({e}); try again"),
        )
    })?;
    Ok(first)
}

/// `tessera restore FILE`.
pub(crate) fn restore(g: &Global, a: RestoreArgs) -> Result<(), CliError> {
    let dir = data_dir(g);
    let r = tessera_broker::backup::restore(&dir, &a.file)?;
    let kept = r.kept.as_deref().map(Path::display);
    if g.json {
        print_json(json!({
            "store_id": r.about.store_id,
            "audit_seq": r.about.audit_seq,
            "audit_time": time(r.about.audit_time),
            "db": dir.db().display().to_string(),
            "kept": kept.map(|p| p.to_string()),
        }));
        return Ok(());
    }
    outln!(
        "Restored store {} from {} (audit trail to record {}, {}) into {}.",
        r.about.store_id,
        a.file.display(),
        r.about.audit_seq,
        time(r.about.audit_time),
        dir.db().display()
    );
    if let Some(p) = kept {
        outln!(
            "The store it replaced is kept as {p}: it holds every key it held (no shred \
             reaches it), so delete it once the restored store serves."
        );
    }
    outln!(
        "Start `tessera serve`: it records the restore in the audit trail. Audit checkpoints \
         taken after this backup no longer verify: take a new one."
    );
    Ok(())
}
