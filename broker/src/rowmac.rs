//! MACs on the rows that decide who may do what: each agent row (token
//! hash, allow list, limits, expiry, revocation), the admin credential's
//! hash, and each secret's row (its current version and its rotation
//! settings, including the commands the broker runs). They are HMAC-SHA256
//! under a key that only the root key opens, so a person who can write the
//! database file but lacks the root key (a passphrase- or share-sealed
//! store, a tampered backup) cannot add an agent, widen an allow list, lift
//! a revocation, swap in their own admin credential, point a secret back to
//! an older version or make the broker run their command: the broker
//! refuses such a row with DATA_LOSS.
//!
//! Stores made before these MACs existed get them once, at the first start
//! with the root key (the rows as they stand are adopted, and an audit
//! record says so). The store's key check value then records that this was
//! done. A store that carries MACs but the old check value (written back
//! from an older copy) is refused, not adopted again; one stripped of every
//! MAC as well is adopted again, with another audit record, until a `rekey
//! root` retires the old check value.
//!
//! What MACs cannot catch is a row put back as tessera itself once wrote
//! it, with its own MAC, from an older copy of the file (a revoked agent's
//! earlier row, say): that is a rollback, like restoring a whole older file.

use rusqlite::{Connection, OptionalExtension, params};

use crate::audit::Entry;
use crate::error::{Error, Result};
use crate::keys::{SymmetricKey, ct_eq};
use crate::store::{WriteCtx, meta_get, meta_set};

/// An agent row as stored, every column its MAC covers.
#[derive(Debug)]
pub(crate) struct AgentRow {
    pub id: i64,
    pub name: String,
    pub token_hash: Vec<u8>,
    pub allow: String,
    pub max_ttl: i64,
    pub max_lifetime: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub peer_uid: Option<i64>,
}

/// The columns [`AgentRow::from_row`] reads, in its order, then `mac`.
pub(crate) const AGENT_COLUMNS: &str = "id, name, token_hash, allow, max_ttl, max_lifetime, created_at, expires_at, revoked_at, \
     peer_uid, mac";

impl AgentRow {
    /// Reads a row selected with [`AGENT_COLUMNS`]; also returns its MAC.
    pub fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Self, Option<Vec<u8>>)> {
        Ok((
            AgentRow {
                id: r.get(0)?,
                name: r.get(1)?,
                token_hash: r.get(2)?,
                allow: r.get(3)?,
                max_ttl: r.get(4)?,
                max_lifetime: r.get(5)?,
                created_at: r.get(6)?,
                expires_at: r.get(7)?,
                revoked_at: r.get(8)?,
                peer_uid: r.get(9)?,
            },
            r.get(10)?,
        ))
    }

    fn mac(&self, key: &SymmetricKey) -> [u8; 32] {
        let opt = |v: Option<i64>| v.map(i64::to_be_bytes);
        let (expires, revoked) = (opt(self.expires_at), opt(self.revoked_at));
        let uid = opt(self.peer_uid);
        let (id, ttl) = (self.id.to_be_bytes(), self.max_ttl.to_be_bytes());
        let (life, created) = (
            self.max_lifetime.to_be_bytes(),
            self.created_at.to_be_bytes(),
        );
        let mut parts: Vec<&[u8]> = vec![
            b"tessera/v1/row/agent",
            &id,
            self.name.as_bytes(),
            &self.token_hash,
            self.allow.as_bytes(),
            &ttl,
            &life,
            &created,
            expires.as_ref().map_or(&[][..], |b| &b[..]),
            revoked.as_ref().map_or(&[][..], |b| &b[..]),
        ];
        // Added with the column: a row without a binding keeps the MAC it
        // had before, and a binding removed in the file fails it (parts
        // are length-prefixed, so the two forms cannot be confused).
        if let Some(uid) = &uid {
            parts.extend([&b"peer_uid"[..], &uid[..]]);
        }
        key.mac(&parts)
    }

    /// Whether `mac` is this row's MAC under `key`.
    pub fn verify(&self, key: &SymmetricKey, mac: Option<&[u8]>) -> bool {
        mac.is_some_and(|m| ct_eq(m, &self.mac(key)))
    }

    /// The error for a row whose MAC does not verify.
    pub fn tampered(&self) -> Error {
        agent_tampered(&self.name)
    }
}

/// The error for agent `name`'s row, changed outside tessera.
pub(crate) fn agent_tampered(name: &str) -> Error {
    Error::Tampered(format!(
        "the stored record of agent {name:?} failed authentication: it was changed outside \
         tessera, so it is not trusted; revoke it (`tessera agent revoke {name}`) and find out \
         who can write the database file"
    ))
}

/// Recomputes and stores the MAC of agent `id` as its row now stands (after
/// tessera itself wrote it).
pub(crate) fn seal_agent(conn: &Connection, key: &SymmetricKey, id: i64) -> Result<()> {
    let row = conn
        .prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"))?
        .query_row([id], AgentRow::from_row)
        .optional()?;
    if let Some((row, _)) = row {
        conn.prepare_cached("UPDATE agents SET mac = ?2 WHERE id = ?1")?
            .execute(params![id, &row.mac(key)[..]])?;
    }
    Ok(())
}

fn admin_mac(key: &SymmetricKey, store_id: &str, hash: &[u8]) -> [u8; 32] {
    key.mac(&[b"tessera/v1/row/admin-token", store_id.as_bytes(), hash])
}

/// Stores the admin credential's hash with its MAC.
pub(crate) fn set_admin_hash(
    conn: &Connection,
    key: &SymmetricKey,
    store_id: &str,
    hash: &[u8; 32],
) -> Result<()> {
    meta_set(conn, "admin_token_hash", hash)?;
    meta_set(conn, "admin_token_mac", &admin_mac(key, store_id, hash))
}

/// The admin credential's hash, checked against its MAC.
pub(crate) fn admin_hash(
    conn: &Connection,
    key: &SymmetricKey,
    store_id: &str,
) -> Result<[u8; 32]> {
    let hash: [u8; 32] = meta_get(conn, "admin_token_hash")?
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Store("the store has no admin credential".into()))?;
    let mac = meta_get(conn, "admin_token_mac")?.unwrap_or_default();
    if !ct_eq(&mac, &admin_mac(key, store_id, &hash)) {
        return Err(Error::Tampered(
            "the stored admin credential failed authentication: it was changed outside \
             tessera; the broker will not start on it. Restore the store from a backup and find \
             out who can write the database file"
                .into(),
        ));
    }
    Ok(hash)
}

/// Every row that fails its MAC, for `tessera status`: `agent:NAME`,
/// `secret:NAME`, and `admin-credential`.
pub(crate) fn tampered_rows(
    conn: &Connection,
    key: &SymmetricKey,
    store_id: &str,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut agents =
        conn.prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name"))?;
    for row in agents.query_map([], AgentRow::from_row)? {
        let (row, mac) = row?;
        if !row.verify(key, mac.as_deref()) {
            out.push(format!("agent:{}", row.name));
        }
    }
    let names: Vec<String> = conn
        .prepare_cached("SELECT name FROM secrets ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for name in names {
        if check_secret(conn, key, &name).is_err() {
            out.push(format!("secret:{name}"));
        }
    }
    if admin_hash(conn, key, store_id).is_err() {
        out.push("admin-credential".into());
    }
    Ok(out)
}

/// Whether any row or the admin credential carries a MAC already.
pub(crate) fn any_macs(conn: &Connection) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM agents WHERE mac IS NOT NULL)
             OR EXISTS (SELECT 1 FROM secrets WHERE mac IS NOT NULL)
             OR EXISTS (SELECT 1 FROM meta WHERE key = 'admin_token_mac')",
        [],
        |r| r.get(0),
    )?)
}

/// Gives every agent row, secret row and the admin credential a MAC, in one
/// transaction with an audit record saying how many rows were adopted as
/// they stood. For stores made before row MACs.
pub(crate) fn adopt(ctx: &mut WriteCtx<'_>, key: &SymmetricKey, store_id: &str) -> Result<usize> {
    let conn = ctx.conn;
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM agents ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in &ids {
        seal_agent(conn, key, *id)?;
    }
    let secrets: Vec<String> = conn
        .prepare("SELECT name FROM secrets ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for name in &secrets {
        seal_secret(conn, key, name)?;
    }
    let hash: [u8; 32] = meta_get(conn, "admin_token_hash")?
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Store("the store has no admin credential".into()))?;
    set_admin_hash(conn, key, store_id, &hash)?;
    ctx.audit(&Entry {
        time: crate::init::now(),
        actor: crate::audit::ACTOR_SYSTEM.into(),
        action: "store.upgrade".into(),
        target: "row-macs".into(),
        allowed: true,
        reason: format!(
            "{} agent rows, {} secret rows and the admin credential adopted as they \
             stood; from now on they carry MACs under the root key",
            ids.len(),
            secrets.len()
        ),
        request_id: crate::keys::request_id(),
    })?;
    Ok(ids.len())
}

/// The columns of a secret's row that its MAC covers: what decides which
/// version agents get and what the broker runs to rotate it (not the
/// scheduler's bookkeeping: next due time, last result, failures).
const SECRET_COLUMNS: &str = "name, current_version, created_at, overlap_secs, class, generator, \
     rotate_cmd, verify_cmd, value_via, cmd_timeout, schedule, schedule_tz, jitter_secs";

/// A secret row's covered values and stored MAC, if the secret exists.
type SecretRow = (Vec<rusqlite::types::Value>, Option<Vec<u8>>);

fn secret_row(conn: &Connection, name: &str) -> Result<Option<SecretRow>> {
    let n = SECRET_COLUMNS.split(',').count();
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {SECRET_COLUMNS}, mac FROM secrets WHERE name = ?1"
        ))?
        .query_row([name], |r| {
            let values = (0..n).map(|i| r.get(i)).collect::<rusqlite::Result<_>>()?;
            Ok((values, r.get(n)?))
        })
        .optional()?)
}

fn secret_mac(key: &SymmetricKey, values: &[rusqlite::types::Value]) -> [u8; 32] {
    use rusqlite::types::Value;
    let encoded: Vec<Vec<u8>> = values
        .iter()
        .map(|v| match v {
            Value::Null => vec![0],
            Value::Integer(i) => [&[1][..], &i.to_be_bytes()].concat(),
            Value::Real(f) => [&[2][..], &f.to_bits().to_be_bytes()].concat(),
            Value::Text(t) => [&[3][..], t.as_bytes()].concat(),
            Value::Blob(b) => [&[4][..], b].concat(),
        })
        .collect();
    let mut parts: Vec<&[u8]> = vec![b"tessera/v1/row/secret"];
    parts.extend(encoded.iter().map(Vec::as_slice));
    key.mac(&parts)
}

/// Recomputes and stores the MAC of secret `name` as its row now stands
/// (after tessera itself wrote it).
pub(crate) fn seal_secret(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<()> {
    if let Some((values, _)) = secret_row(conn, name)? {
        conn.prepare_cached("UPDATE secrets SET mac = ?2 WHERE name = ?1")?
            .execute(params![name, &secret_mac(key, &values)[..]])?;
    }
    Ok(())
}

/// Checks the MAC of secret `name`'s row: `Ok` when it verifies or there is
/// no such secret, DATA_LOSS when the row was changed outside tessera.
pub(crate) fn check_secret(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<()> {
    match secret_row(conn, name)? {
        Some((values, mac))
            if !mac
                .as_deref()
                .is_some_and(|m| ct_eq(m, &secret_mac(key, &values))) =>
        {
            Err(Error::Tampered(format!(
                "the stored settings of secret {name:?} failed authentication: they were \
                 changed outside tessera, so tessera will not use them (no value is issued and \
                 no rotation command runs); delete it (`tessera secret rm {name}`), store it \
                 again, and find out who can write the database file"
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

    /// A NULL, an empty text and an empty blob are different settings (a
    /// cleared rotate command is not an empty one), and so are a number and
    /// its text: each must give a different MAC.
    #[test]
    fn secret_mac_tells_column_types_apart() {
        let key = SymmetricKey::from_bytes(&[7; 32]).expect("key");
        let rows = [
            vec![Value::Text("a".into()), Value::Null],
            vec![Value::Text("a".into()), Value::Text(String::new())],
            vec![Value::Text("a".into()), Value::Blob(Vec::new())],
            vec![Value::Text("a".into()), Value::Integer(1)],
            vec![Value::Text("a".into()), Value::Text("1".into())],
            vec![Value::Text("a".into())],
        ];
        let macs: std::collections::HashSet<[u8; 32]> =
            rows.iter().map(|r| secret_mac(&key, r)).collect();
        assert_eq!(macs.len(), rows.len());
    }
}
