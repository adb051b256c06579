//! Secrets and their versions: each version encrypted under its own data
//! key, the data key wrapped by the root key, both bound to (name, version).

use std::sync::Arc;

use rusqlite::{OptionalExtension, params};
use zeroize::Zeroizing;

use crate::audit::{ACTOR_ADMIN, Entry};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::init::now;
use crate::keys::{SymmetricKey, data_key_aad, value_aad};

use crate::agent::admin_entry;
use crate::lease::{Scope, revoke_active};

/// What `secret rm` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Versions deleted (all but the archived ones).
    pub versions: u64,
    /// Active leases revoked.
    pub leases: u64,
    /// Archived versions left for their retention class's shred ceremony.
    pub archived_kept: u64,
}
use crate::names;
use crate::proto::SecretInfo;
use crate::rowmac;

/// The current version of a secret, decrypted.
pub struct CurrentValue {
    /// Its version number.
    pub version: u64,
    /// The plaintext; zeroized on drop.
    pub value: Zeroizing<Vec<u8>>,
    /// The stored ciphertext it came from: unique to this version's row (a
    /// fresh nonce each time), so a delete and a new put of the same name
    /// and version number do not look like the same row.
    pub(crate) ciphertext: Vec<u8>,
}

impl Broker {
    /// Stores `value` as the new current version of `name`.
    pub async fn put_secret(
        &self,
        request_id: &str,
        name: String,
        value: Zeroizing<Vec<u8>>,
    ) -> Result<SecretInfo> {
        let check = names::secret(&name, "name").and_then(|()| {
            if value.is_empty() {
                Err(Error::invalid("value", "the secret value is empty"))
            } else if value.len() > self.limits.max_value_size {
                Err(Error::invalid(
                    "value",
                    format!(
                        "the secret value is {} bytes, over the limit of {} bytes \
                         (serve --max-value-size)",
                        value.len(),
                        self.limits.max_value_size
                    ),
                ))
            } else {
                Ok(())
            }
        });
        if let Err(e) = check {
            return Err(self
                .deny(ACTOR_ADMIN.into(), "secret.put", &name, request_id, e)
                .await);
        }
        // Encrypt outside the writer; the version number is only known in
        // the transaction, so data key and value are sealed there (AES-GCM
        // of a few KiB is microseconds).
        let dk = SymmetricKey::generate()?;
        let rk_wrap = std::sync::Arc::clone(&self.root_key);
        let row_key = std::sync::Arc::clone(&self.row_key);
        let rid = request_id.to_string();
        let forget = self.current_rows.forget_on_commit();
        self.store
            .write_then(move |ctx| {
                let t = now();
                let current: Option<i64> = ctx
                    .conn
                    .query_row(
                        "SELECT max(version) FROM secret_versions WHERE name = ?1",
                        [&name],
                        |r| r.get(0),
                    )
                    .optional()?
                    .flatten();
                let version = current.map_or(1, |v| v as u64 + 1);
                let wrapped = rk_wrap.seal(ctx.conn, &data_key_aad(&name, version), dk.expose_bytes())?;
                let ct = dk.seal(&value_aad(&name, version), &value)?;
                let created = ctx.conn.execute(
                    "INSERT INTO secrets (name, current_version, created_at, updated_at)
                     VALUES (?1, 0, ?2, ?2)
                     ON CONFLICT (name) DO NOTHING",
                    params![name, t],
                )?;
                if created == 1 {
                    rowmac::seal_secret(ctx.conn, &row_key, &name)?;
                } else if let Err(e) = rowmac::check_secret(ctx.conn, &row_key, &name) {
                    ctx.audit(&admin_entry("secret.put", &name, false, e.to_string(), &rid))?;
                    return Ok(Err(e));
                }
                ctx.conn.execute(
                    "INSERT INTO secret_versions (name, version, created_at, wrapped_key, ciphertext,
                        state, source)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 'admin')",
                    params![name, version as i64, t, wrapped, ct],
                )?;
                crate::rotation::activate_version(ctx, &row_key, &name, version, t)?;
                ctx.audit(&Entry {
                    time: t,
                    actor: ACTOR_ADMIN.into(),
                    action: "secret.put".into(),
                    target: name.clone(),
                    allowed: true,
                    reason: format!("version {version} stored"),
                    request_id: rid,
                })?;
                Ok(secret_info(ctx.conn, &name))
            }, forget)
            .await
            .and_then(|r| r)
    }

    /// Every secret's name, versions and times; never a value.
    pub async fn list_secrets(&self, request_id: &str) -> Result<Vec<SecretInfo>> {
        let out = self.store.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT s.name, s.current_version, count(v.version), s.created_at, s.updated_at
                 FROM secrets s LEFT JOIN secret_versions v ON v.name = s.name
                 GROUP BY s.name ORDER BY s.name",
            )?;
            let rows = stmt.query_map([], row_to_info)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        let n = out.len();
        self.audit(Entry {
            time: now(),
            actor: ACTOR_ADMIN.into(),
            action: "secret.list".into(),
            target: "*".into(),
            allowed: true,
            reason: format!("{n} secrets listed"),
            request_id: request_id.into(),
        })
        .await?;
        Ok(out)
    }

    /// Deletes `name` and its versions, and revokes its leases, in one
    /// transaction. Archived versions stay: they are retention data under
    /// their class, which only a shred ceremony destroys (an admin's
    /// delete must not do what takes a quorum, or get round a legal hold).
    pub async fn delete_secret(&self, request_id: &str, name: String) -> Result<Deleted> {
        if let Err(e) = names::secret(&name, "name") {
            return Err(self
                .deny(ACTOR_ADMIN.into(), "secret.delete", &name, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        if let Ok(mut seen) = self.tampered_logged.lock() {
            // Stored again and edited again, it is warned about again.
            seen.remove(&name);
        }
        let forget = self.current_rows.forget_on_commit();
        let row_key = std::sync::Arc::clone(&self.row_key);
        self.store
            .write_then(
                move |ctx| {
                    let t = now();
                    // None: no such secret; Some(None): one without a class.
                    let class: Option<Option<String>> = ctx
                        .conn
                        .query_row("SELECT class FROM secrets WHERE name = ?1", [&name], |r| {
                            r.get(0)
                        })
                        .optional()?;
                    let refusal = match &class {
                        None => Some(Error::NotFound(format!(
                            "no secret named {name:?}; `tessera secret list` shows what exists"
                        ))),
                        Some(class) => held(ctx.conn, &row_key, &name, class.as_deref())?,
                    };
                    if let Some(e) = refusal {
                        ctx.audit(&admin_entry(
                            "secret.delete",
                            &name,
                            false,
                            e.to_string(),
                            &rid,
                        ))?;
                        return Ok(Err(e));
                    }
                    let versions = ctx.conn.execute(
                        "DELETE FROM secret_versions WHERE name = ?1 AND state != 'archived'",
                        [&name],
                    )? as u64;
                    let archived_kept = ctx.conn.query_row(
                        "SELECT count(*) FROM secret_versions WHERE name = ?1",
                        [&name],
                        |r| r.get::<_, i64>(0),
                    )? as u64;
                    ctx.conn
                        .execute("DELETE FROM secrets WHERE name = ?1", [&name])?;
                    let leases = revoke_active(ctx, Scope::Secret(&name), t)?;
                    ctx.audit(&Entry {
                        time: t,
                        actor: ACTOR_ADMIN.into(),
                        action: "secret.delete".into(),
                        target: name.clone(),
                        allowed: true,
                        reason: format!(
                            "{versions} versions deleted, {leases} leases revoked, \
                             {archived_kept} archived versions kept"
                        ),
                        request_id: rid,
                    })?;
                    Ok(Ok(Deleted {
                        versions,
                        leases,
                        archived_kept,
                    }))
                },
                forget,
            )
            .await?
    }

    /// The current version of `name`, decrypted. The encrypted row is
    /// cached (never the plaintext); a put, delete, rotation or re-key
    /// clears the cache as it commits (`CommitCache`).
    pub fn read_current(&self, name: &str) -> Result<CurrentValue> {
        let row = match self.current_rows.get(name) {
            Some(row) => row,
            None => {
                let generation = self.current_rows.generation();
                let row = self.store.read(|conn| {
                    rowmac::check_secret(conn, &self.row_key, name)?;
                    let found = conn
                        .prepare_cached(
                            "SELECT s.current_version, v.wrapped_key, v.ciphertext
                             FROM secrets s LEFT JOIN secret_versions v
                               ON v.name = s.name AND v.version = s.current_version
                             WHERE s.name = ?1",
                        )?
                        .query_row([name], |r| {
                            let version = r.get::<_, i64>(0)? as u64;
                            let stored = r.get::<_, Option<Vec<u8>>>(1)?.zip(r.get(2)?);
                            Ok((version, stored))
                        })
                        .optional()?;
                    match found {
                        None => Ok(None),
                        Some((version, Some((wrapped_key, ciphertext)))) => {
                            Ok(Some(StoredVersion {
                                version,
                                wrapped_key,
                                ciphertext,
                            }))
                        }
                        // The secret's row (its MAC checked above) names a
                        // version that is not there: deleted in the file.
                        Some((version, None)) => Err(Error::Tampered(format!(
                            "version {version} of secret {name:?}, its current one, is missing \
                             from the store (deleted outside tessera); no older value is \
                             served. Store a new value (`tessera secret put {name}`) and find \
                             out who can write the database file"
                        ))),
                    }
                })?;
                let row = Arc::new(row.ok_or_else(|| {
                    Error::NotFound(format!(
                        "no secret named {name:?}; ask an admin to store it (`tessera secret put {name}`)"
                    ))
                })?);
                self.current_rows.insert(generation, name.to_string(), &row);
                row
            }
        };
        // A row that fails to decrypt is not kept: once the file is put
        // right, the next read sees it.
        let value = self
            .open_value(name, row.version, &row.wrapped_key, &row.ciphertext)
            .inspect_err(|_| self.current_rows.forget(name))?;
        Ok(CurrentValue {
            version: row.version,
            value,
            ciphertext: row.ciphertext.clone(),
        })
    }
}

/// Why a legal hold keeps secret `name` (of `class`, as its row says) from
/// being deleted, if one does: a hold keeps what its class holds, live
/// values included, until it is released. Holds are read only from a class
/// record that verifies (a hold deleted in the file is not released), and
/// the class only from a secret row that verifies: of one that does not,
/// any standing hold keeps it.
fn held(
    conn: &rusqlite::Connection,
    row_key: &crate::keys::SymmetricKey,
    name: &str,
    class: Option<&str>,
) -> Result<Option<Error>> {
    if rowmac::check_secret(conn, row_key, name).is_err() {
        // Nor are the holds to be read from a class record that fails (a
        // hold deleted along with the secret's class).
        let classes: Vec<String> = conn
            .prepare_cached("SELECT name FROM classes ORDER BY name")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for c in &classes {
            if let Err(e) = rowmac::check_class(conn, row_key, c) {
                return Ok(Some(e));
            }
        }
        let any: Option<(String, i64, String)> = conn
            .query_row(
                "SELECT class, id, reason FROM holds WHERE released_at IS NULL ORDER BY id LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        return Ok(any.map(|(c, id, reason)| {
            Error::FailedPrecondition(format!(
                "the stored settings of secret {name:?} failed authentication, so its class is \
                 not known, and class {c} is under legal hold {id} ({reason}): it is not deleted \
                 while a legal hold stands; restore the store from a backup, or delete it once \
                 the holds are released"
            ))
        }));
    }
    let Some(class) = class else {
        return Ok(None);
    };
    if crate::retention::load_class(conn, class)?.is_none() {
        return Ok(Some(Error::Tampered(format!(
            "secret {name:?} belongs to class {class}, which is missing from the store \
             (deleted outside tessera); it is not deleted. Restore the store from a backup and \
             find out who can write the database file"
        ))));
    }
    if let Err(e) = rowmac::check_class(conn, row_key, class) {
        return Ok(Some(e));
    }
    Ok(crate::retention::standing_holds(conn, class)?
        .first()
        .map(|(id, reason)| {
            Error::FailedPrecondition(format!(
                "secret {name:?} belongs to class {class}, which is under legal hold {id} \
                 ({reason}); it can be deleted once the hold is released"
            ))
        }))
}

/// A secret version as stored: encrypted value and wrapped data key.
pub struct StoredVersion {
    version: u64,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

fn secret_info(conn: &rusqlite::Connection, name: &str) -> Result<SecretInfo> {
    Ok(conn.query_row(
        "SELECT s.name, s.current_version, count(v.version), s.created_at, s.updated_at
         FROM secrets s LEFT JOIN secret_versions v ON v.name = s.name
         WHERE s.name = ?1 GROUP BY s.name",
        [name],
        row_to_info,
    )?)
}

fn row_to_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<SecretInfo> {
    Ok(SecretInfo {
        name: r.get(0)?,
        current_version: r.get::<_, i64>(1)? as u64,
        versions: r.get::<_, i64>(2)? as u64,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
    })
}
