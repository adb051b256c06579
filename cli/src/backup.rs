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
    let mut admin = target(g).admin().await?;
    let mut stream = admin
        .backup(authed(proto::BackupRequest {}, &token)?)
        .await?
        .into_inner();
    // Written beside OUT, then linked into place once whole and checked:
    // OUT never holds half a copy, and an existing OUT is never replaced.
    let partial = PathBuf::from(format!("{}.partial", a.out.display()));
    let local = |what: &str, e: &dyn std::fmt::Display| {
        CliError::new(Exit::Failure, format!("cannot {what}: {e}"))
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| local(&format!("create {}", partial.display()), &e))?;
    let written = async {
        let mut first: Option<proto::BackupChunk> = None;
        let mut n = 0u64;
        while let Some(mut c) = stream.message().await? {
            file.write_all(&c.data)
                .map_err(|e| local(&format!("write {}", partial.display()), &e))?;
            n += c.data.len() as u64;
            if first.is_none() {
                c.data = Vec::new();
                first = Some(c);
            }
        }
        let first = first.ok_or_else(|| {
            CliError::new(Exit::Unavailable, "the broker sent no backup; try again")
        })?;
        if n != first.size {
            return Err(CliError::new(
                Exit::Unavailable,
                format!(
                    "the backup stream ended after {n} of {} bytes; try again",
                    first.size
                ),
            ));
        }
        file.sync_all()
            .map_err(|e| local(&format!("write {}", partial.display()), &e))?;
        Ok(first)
    }
    .await;
    let placed = written.and_then(|first| {
        tessera_broker::backup::about(&partial)?;
        std::fs::hard_link(&partial, &a.out).map_err(|e| {
            local(
                &format!(
                    "write {} (the copy is left in {})",
                    a.out.display(),
                    partial.display()
                ),
                &e,
            )
        })?;
        Ok(first)
    });
    let _ = std::fs::remove_file(&partial);
    let first = placed?;
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
        outln!("The store it replaced is kept as {p}.");
    }
    outln!(
        "Start `tessera serve`: it records the restore in the audit trail. Audit checkpoints \
         taken after this backup no longer verify: take a new one."
    );
    Ok(())
}
