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
//! done. A store that carries MACs, or whose audit trail records the
//! adoption, but has the old check value (written back from an older copy)
//! is refused, not adopted again; one stripped of every MAC and of that
//! record as well is adopted again, and `audit verify` then fails at the
//! deleted record (a `rekey root` retires the old check value for good).
//! Holder and class rows, which got MACs later, are adopted the same way
//! from the intermediate check value.
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

/// Whether a check found its row tampered with; other errors pass on.
pub(crate) fn failed(check: Result<()>) -> Result<bool> {
    match check {
        Err(Error::Tampered(_)) => Ok(true),
        other => other.map(|()| false),
    }
}

/// Every row that fails its MAC, for `tessera status`: `agent:NAME`,
/// `secret:NAME`, `holder:ROLE`, `class:NAME` and `admin-credential`.
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
    for (t, check, kind) in [
        (
            &HOLDERS,
            check_holder as fn(&Connection, &SymmetricKey, &str) -> Result<()>,
            "holder",
        ),
        (&CLASSES, check_class, "class"),
    ] {
        for id in row_ids(conn, t)? {
            if check(conn, key, &id).is_err() {
                out.push(format!("{kind}:{id}"));
            }
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
             OR EXISTS (SELECT 1 FROM meta WHERE key = 'admin_token_mac')
             OR EXISTS (SELECT 1 FROM holders WHERE mac IS NOT NULL)
             OR EXISTS (SELECT 1 FROM classes WHERE mac IS NOT NULL)",
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
    let retention = seal_retention_rows(conn, key)?;
    ctx.audit(&Entry {
        time: crate::init::now(),
        actor: crate::audit::ACTOR_SYSTEM.into(),
        action: "store.upgrade".into(),
        target: "row-macs".into(),
        allowed: true,
        reason: format!(
            "{} agent rows, {} secret rows, {retention} holder and class rows and the admin \
             credential adopted as they stood; from now on they carry MACs under the root key",
            ids.len(),
            secrets.len()
        ),
        request_id: crate::keys::request_id(),
    })?;
    Ok(ids.len())
}

/// A table whose rows carry a MAC over some of their columns, read as
/// SQLite values (so a NULL, an empty text and a number's text all differ).
struct Covered {
    table: &'static str,
    /// The primary key column.
    key: &'static str,
    /// The covered columns, in MAC order.
    columns: &'static str,
    /// Domain separation between tables.
    tag: &'static [u8],
}

/// A secret's row: what decides which version agents get and what the
/// broker runs to rotate it (not the scheduler's bookkeeping: next due
/// time, last result, failures).
const SECRETS: Covered = Covered {
    table: "secrets",
    key: "name",
    columns: "name, current_version, created_at, overlap_secs, class, generator, rotate_cmd, \
              verify_cmd, value_via, cmd_timeout, schedule, schedule_tz, jitter_secs",
    tag: b"tessera/v1/row/secret",
};

/// A key holder's row: the keys that prove the role and that its shares
/// are sealed to.
const HOLDERS: Covered = Covered {
    table: "holders",
    key: "role",
    columns: "role, age_recipient, signing_key, enrolled_at",
    tag: b"tessera/v1/row/holder",
};

/// A retention class's row: its deadline, holders, thresholds and key (not
/// its state, which the ceremony moves along; a class's standing legal
/// holds are covered too, see [`class_values`]).
const CLASSES: Covered = Covered {
    table: "classes",
    key: "name",
    columns: "name, retain_secs, deadline, holders, threshold, early_threshold, \
              key_fingerprint, generation, created_at",
    tag: b"tessera/v1/row/class",
};

/// Every row's key in `t`, in order.
fn row_ids(conn: &Connection, t: &Covered) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {} FROM {} ORDER BY 1", t.key, t.table))?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// A row's covered values and stored MAC, if the row exists.
type CoveredRow = (Vec<rusqlite::types::Value>, Option<Vec<u8>>);

fn covered_row(conn: &Connection, t: &Covered, id: &str) -> Result<Option<CoveredRow>> {
    let n = t.columns.split(',').count();
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {}, mac FROM {} WHERE {} = ?1",
            t.columns, t.table, t.key
        ))?
        .query_row([id], |r| {
            let values = (0..n).map(|i| r.get(i)).collect::<rusqlite::Result<_>>()?;
            Ok((values, r.get(n)?))
        })
        .optional()?)
}

/// A class's covered values: its row's, then the ids of its standing legal
/// holds (a hold deleted or released in the file fails the MAC), then a
/// digest of each holder's sealed share (a share swapped in the file would
/// be exported as the holder's escrow).
fn class_values(conn: &Connection, name: &str) -> Result<Option<CoveredRow>> {
    use rusqlite::types::Value;
    let Some((mut values, mac)) = covered_row(conn, &CLASSES, name)? else {
        return Ok(None);
    };
    values.push(Value::Text("standing holds".into()));
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM holds WHERE class = ?1 AND released_at IS NULL ORDER BY id",
    )?;
    for id in stmt.query_map([name], |r| r.get::<_, i64>(0))? {
        values.push(Value::Integer(id?));
    }
    values.push(Value::Text("sealed shares".into()));
    let mut stmt = conn
        .prepare_cached("SELECT role, sealed FROM class_shares WHERE class = ?1 ORDER BY role")?;
    for row in stmt.query_map([name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })? {
        let (role, sealed) = row?;
        let digest = ring::digest::digest(&ring::digest::SHA256, sealed.as_bytes());
        values.push(Value::Text(role));
        values.push(Value::Blob(digest.as_ref().to_vec()));
    }
    Ok(Some((values, mac)))
}

fn values_mac(key: &SymmetricKey, tag: &[u8], values: &[rusqlite::types::Value]) -> [u8; 32] {
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
    let mut parts: Vec<&[u8]> = vec![tag];
    parts.extend(encoded.iter().map(Vec::as_slice));
    key.mac(&parts)
}

fn store_mac(conn: &Connection, t: &Covered, id: &str, mac: &[u8]) -> Result<()> {
    conn.prepare_cached(&format!(
        "UPDATE {} SET mac = ?2 WHERE {} = ?1",
        t.table, t.key
    ))?
    .execute(params![id, mac])?;
    Ok(())
}

/// Whether `row` (values and stored MAC) verifies under `key`.
fn verifies(key: &SymmetricKey, t: &Covered, row: &CoveredRow) -> bool {
    row.1
        .as_deref()
        .is_some_and(|m| ct_eq(m, &values_mac(key, t.tag, &row.0)))
}

/// Recomputes and stores the MAC of secret `name` as its row now stands
/// (after tessera itself wrote it).
pub(crate) fn seal_secret(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<()> {
    if let Some((values, _)) = covered_row(conn, &SECRETS, name)? {
        store_mac(conn, &SECRETS, name, &values_mac(key, SECRETS.tag, &values))?;
    }
    Ok(())
}

/// Checks the MAC of secret `name`'s row: `Ok` when it verifies or there is
/// no such secret, DATA_LOSS when the row was changed outside tessera.
pub(crate) fn check_secret(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<()> {
    match covered_row(conn, &SECRETS, name)? {
        Some(row) if !verifies(key, &SECRETS, &row) => Err(Error::Tampered(format!(
            "the stored settings of secret {name:?} failed authentication: they were \
             changed outside tessera, so tessera will not use them (no value is issued and \
             no rotation command runs); delete it (`tessera secret rm {name}`), store it \
             again, and find out who can write the database file"
        ))),
        _ => Ok(()),
    }
}

/// Recomputes and stores the MAC of holder `role` (after tessera wrote it).
pub(crate) fn seal_holder(conn: &Connection, key: &SymmetricKey, role: &str) -> Result<()> {
    if let Some((values, _)) = covered_row(conn, &HOLDERS, role)? {
        store_mac(conn, &HOLDERS, role, &values_mac(key, HOLDERS.tag, &values))?;
    }
    Ok(())
}

/// Checks holder `role`'s row (`Ok` when it verifies or there is none):
/// a key swapped in the file would let its owner act for the role, or
/// receive the role's shares.
pub(crate) fn check_holder(conn: &Connection, key: &SymmetricKey, role: &str) -> Result<()> {
    match covered_row(conn, &HOLDERS, role)? {
        Some(row) if !verifies(key, &HOLDERS, &row) => Err(Error::Tampered(format!(
            "the stored holder key of role {role:?} failed authentication: it was changed \
             outside tessera, so tessera will not use it (nothing is signed, sealed or \
             destroyed on its word); find out who can write the database file, restore the \
             store from a backup, or hand the role to its holder again (`tessera holder \
             replace`)"
        ))),
        _ => Ok(()),
    }
}

/// Recomputes and stores the MAC of class `name` with its standing holds
/// (after tessera wrote the class or placed or released a hold).
pub(crate) fn seal_class(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<()> {
    if let Some((values, _)) = class_values(conn, name)? {
        store_mac(conn, &CLASSES, name, &values_mac(key, CLASSES.tag, &values))?;
    }
    Ok(())
}

/// Checks class `name`'s row and standing holds (`Ok` when they verify or
/// there is no such class): an edited deadline, threshold or holder list,
/// or a legal hold deleted in the file, must not let a shred through.
pub(crate) fn check_class(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<()> {
    // Holder rows are never deleted by tessera: one missing for a role the
    // class names was deleted in the file (and its role could be enrolled
    // again for someone else).
    let holders: Option<String> = conn
        .query_row(
            "SELECT c.holders FROM classes c WHERE c.name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let mut orphaned = None;
    for role in holders.iter().flat_map(|h| h.split(',')) {
        let found = conn
            .prepare_cached("SELECT 1 FROM holders WHERE role = ?1")?
            .query_row([role], |_| Ok(()))
            .optional()?;
        if found.is_none() {
            orphaned = Some(role.to_string());
            break;
        }
    }
    if let Some(role) = orphaned {
        return Err(Error::Tampered(format!(
            "the stored record of retention class {name:?} failed authentication: it names \
             role {role:?}, whose holder record is missing (deleted outside tessera), so no \
             ceremony of it proceeds; restore the store from a backup and find out who can \
             write the database file"
        )));
    }
    match class_values(conn, name)? {
        Some(row) if !verifies(key, &CLASSES, &row) => Err(Error::Tampered(format!(
            "the stored record of retention class {name:?} (its deadline, holders, \
             thresholds or legal holds) failed authentication: it was changed outside \
             tessera, so no ceremony of it proceeds; restore the store from a backup and find \
             out who can write the database file"
        ))),
        _ => Ok(()),
    }
}

/// Gives every holder and class row a MAC, in one transaction with an
/// audit record, for a store whose other rows carry MACs already (made
/// before holder and class rows had them). Refuses a store where some do:
/// its check value was written back from an older copy.
pub(crate) fn adopt_retention(ctx: &mut WriteCtx<'_>, key: &SymmetricKey) -> Result<usize> {
    let some: bool = ctx.conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM holders WHERE mac IS NOT NULL)
             OR EXISTS (SELECT 1 FROM classes WHERE mac IS NOT NULL)",
        [],
        |r| r.get(0),
    )?;
    if some || adopted_before(ctx.conn, "retention-macs")? {
        return Err(written_back());
    }
    let n = seal_retention_rows(ctx.conn, key)?;
    ctx.audit(&Entry {
        time: crate::init::now(),
        actor: crate::audit::ACTOR_SYSTEM.into(),
        action: "store.upgrade".into(),
        target: "retention-macs".into(),
        allowed: true,
        reason: format!(
            "{n} holder and class rows adopted as they stood; from now on they carry MACs \
             under the root key"
        ),
        request_id: crate::keys::request_id(),
    })?;
    Ok(n)
}

/// Whether the audit trail records an adoption of `what` already: a store
/// that adopted its rows once never needs to again, so an older check value
/// (with the MACs stripped as well) was written back. (The trail's chain
/// keeps the record from being removed unnoticed.)
pub(crate) fn adopted_before(conn: &Connection, what: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM audit WHERE action = 'store.upgrade' AND target = ?1)",
        [what],
        |r| r.get(0),
    )?)
}

/// The refusal of a store whose key check value is older than its MACs.
pub(crate) fn written_back() -> Error {
    Error::Tampered(
        "the store's key check value is the one of a store without row MACs, yet its rows \
         carry MACs: the check value was written back from an older copy of the file. The \
         broker will not start on it; restore the store from a backup and find out who can \
         write the database file"
            .into(),
    )
}

/// Gives every holder and class row a MAC as it stands (stores made before
/// these MACs); returns how many rows.
pub(crate) fn seal_retention_rows(conn: &Connection, key: &SymmetricKey) -> Result<usize> {
    let mut n = 0;
    for (t, seal) in [
        (
            &HOLDERS,
            seal_holder as fn(&Connection, &SymmetricKey, &str) -> Result<()>,
        ),
        (&CLASSES, seal_class),
    ] {
        let ids = row_ids(conn, t)?;
        for id in &ids {
            seal(conn, key, id)?;
        }
        n += ids.len();
    }
    Ok(n)
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
        let macs: std::collections::HashSet<[u8; 32]> = rows
            .iter()
            .map(|r| values_mac(&key, SECRETS.tag, r))
            .collect();
        assert_eq!(macs.len(), rows.len());
    }
}
