//! Retention classes and their key holders: roles bound to holders' public
//! keys, class keys split k-of-n and sealed to the holders with age, legal
//! holds, and envelope encryption under a class key for agents.
//!
//! The shred ceremony that ends a class lives in `ceremony`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use tessera_shred::envelope::ShareEnvelope;
use tessera_shred::holder::{HolderPublicKey, REQUEST_SKEW_SECS, request_text, verify};
use zeroize::Zeroizing;

use crate::agent::{Agent, admin_entry};
use crate::audit::Entry;
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::init::now;
use crate::keys::{
    SymmetricKey, class_data_key_aad, class_key_aad, context_digest, envelope_aad, hex,
};
use crate::names;
use crate::proto;
use crate::rowmac;

/// Longest retention a class may have (100 years).
pub const MAX_RETAIN_SECS: u64 = 100 * 366 * 24 * 3600;

/// Class states as stored.
pub mod class_state {
    /// The key is live.
    pub const ACTIVE: &str = "active";
    /// A ceremony is open.
    pub const SHREDDING: &str = "shredding";
    /// The key is destroyed.
    pub const SHREDDED: &str = "shredded";
}

/// An unwrapped class key and the generation it belongs to.
pub struct ClassKey {
    pub(crate) generation: u64,
    pub(crate) key: SymmetricKey,
}

/// A role and its holder's age recipient.
type RoleRecipient = (String, String);

/// The OS random source, for the pure `shred` crate.
pub(crate) struct OsRandom;

impl tessera_shred::Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        // The trait is infallible: a failing OS CSPRNG is not something to
        // carry on from.
        crate::keys::fill_random(buf).expect("the operating system's random source failed");
    }
}

/// A holder who proved their role with a signed request.
#[derive(Debug, Clone)]
pub struct HolderCaller {
    /// The role.
    pub role: String,
    /// Its current Ed25519 key.
    pub signing_key: [u8; 32],
}

impl HolderCaller {
    /// How the audit trail names the holder.
    pub fn actor(&self) -> String {
        format!("holder:{}", self.role)
    }
}

/// The stored row of a class, as the ceremony code needs it.
pub(crate) struct ClassRow {
    pub name: String,
    pub deadline: i64,
    pub holders: Vec<String>,
    pub threshold: u8,
    pub early_threshold: u8,
    pub key_fingerprint: [u8; 32],
    pub generation: u64,
    pub state: String,
    pub shredded_at: Option<i64>,
    pub certificate: Option<String>,
    pub retain_secs: u64,
    pub created_at: i64,
}

pub(crate) fn load_class(conn: &Connection, name: &str) -> Result<Option<ClassRow>> {
    Ok(conn
        .query_row(
            "SELECT name, deadline, holders, threshold, early_threshold, key_fingerprint,
                    generation, state, shredded_at, certificate, retain_secs, created_at
             FROM classes WHERE name = ?1",
            [name],
            |r| {
                Ok(ClassRow {
                    name: r.get(0)?,
                    deadline: r.get(1)?,
                    holders: r
                        .get::<_, String>(2)?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                    threshold: r.get::<_, i64>(3)? as u8,
                    early_threshold: r.get::<_, i64>(4)? as u8,
                    key_fingerprint: r.get::<_, Vec<u8>>(5)?.try_into().unwrap_or([0; 32]),
                    generation: r.get::<_, i64>(6)? as u64,
                    state: r.get(7)?,
                    shredded_at: r.get(8)?,
                    certificate: r.get(9)?,
                    retain_secs: r.get::<_, i64>(10)? as u64,
                    created_at: r.get(11)?,
                })
            },
        )
        .optional()?)
}

pub(crate) fn no_class(name: &str) -> Error {
    Error::NotFound(format!(
        "no retention class named {name:?}; `tessera class list` shows the classes"
    ))
}

/// The error for any use of a shredded class's key: names the certificate.
pub(crate) fn shredded_error(c: &ClassRow) -> Error {
    let digest = c
        .certificate
        .as_deref()
        .map(|t| hex(&tessera_shred::certificate::digest(signed_part(t)))[..16].to_string())
        .unwrap_or_default();
    Error::FailedPrecondition(format!(
        "class {} was shredded at {} (destruction certificate {digest}); its key no longer \
         exists, so nothing encrypted under it can be decrypted. `tessera shred certificate \
         show --class {}` prints the certificate",
        c.name,
        crate::init::rfc3339(c.shredded_at.unwrap_or_default()),
        c.name
    ))
}

/// The broker-signed part of a stored certificate (without confirmations).
pub(crate) fn signed_part(text: &str) -> &str {
    tessera_shred::certificate::split_file(text)
        .map(|(s, _)| s)
        .unwrap_or(text)
}

/// Standing holds of a class: (id, reason).
pub(crate) fn standing_holds(conn: &Connection, class: &str) -> Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, reason FROM holds WHERE class = ?1 AND released_at IS NULL ORDER BY id",
    )?;
    let rows = stmt.query_map([class], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Seals `text` to an age X25519 recipient, ASCII-armored, so that
/// `age -d -i IDENTITY` opens it.
pub fn seal_to_holder(recipient: &str, text: &[u8]) -> Result<String> {
    let r = parse_recipient(recipient, "pubkey")?;
    let fail = |e: &dyn std::fmt::Display| Error::Internal(format!("age encryption failed: {e}"));
    let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
        .map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    let armored = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(|e| fail(&e))?;
    let mut w = enc.wrap_output(armored).map_err(|e| fail(&e))?;
    w.write_all(text).map_err(|e| fail(&e))?;
    w.finish().and_then(|a| a.finish()).map_err(|e| fail(&e))?;
    String::from_utf8(out).map_err(|e| fail(&e))
}

/// `recipient` as an age X25519 recipient; `field` names it in the error.
pub fn parse_recipient(recipient: &str, field: &'static str) -> Result<age::x25519::Recipient> {
    recipient.parse().map_err(|_| {
        Error::invalid(
            field,
            "the age recipient is not a valid X25519 recipient (age1…)",
        )
    })
}

/// Why `key` cannot be `role`'s holder key: it is another role's (one
/// person holding two roles would meet a quorum alone, and get two shares
/// of each class), or it was retired from a role (its old shares are
/// destroyed; it is never enrolled again).
fn key_taken(conn: &Connection, key: &HolderPublicKey, role: &str) -> Result<Option<Error>> {
    let other: Option<String> = conn
        .query_row(
            "SELECT role FROM holders
             WHERE (signing_key = ?1 OR age_recipient = ?2) AND role != ?3",
            params![&key.signing_key[..], key.age_recipient, role],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(other) = other {
        return Ok(Some(Error::AlreadyExists(format!(
            "this key is already the holder key of role {other:?}; each role needs a holder of \
             its own, with a key of its own (`tessera holder init` makes one)"
        ))));
    }
    let retired: Option<String> = conn
        .query_row(
            "SELECT role FROM holder_keys_retired WHERE signing_key = ?1",
            [&key.signing_key[..]],
            |r| r.get(0),
        )
        .optional()?;
    Ok(retired.map(|r| {
        Error::invalid(
            "pubkey",
            format!(
                "this key was replaced as the holder key of role {r:?} and is never enrolled \
                 again; the holder makes a new one with `tessera holder init`"
            ),
        )
    }))
}

/// An Ed25519 public key.
type SigningKey = [u8; 32];

/// A holder's current signing key and any replaced ones.
fn holder_keys(conn: &Connection, role: &str) -> Result<(Option<SigningKey>, Vec<SigningKey>)> {
    let current: Option<Vec<u8>> = conn
        .query_row(
            "SELECT signing_key FROM holders WHERE role = ?1",
            [role],
            |r| r.get(0),
        )
        .optional()?;
    let mut stmt =
        conn.prepare_cached("SELECT signing_key FROM holder_keys_retired WHERE role = ?1")?;
    let retired = stmt
        .query_map([role], |r| r.get::<_, Vec<u8>>(0))?
        .filter_map(|k| k.ok().and_then(|k| k.try_into().ok()))
        .collect();
    Ok((current.and_then(|k| k.try_into().ok()), retired))
}

/// Checks a role name and parses a holder's public key (`holder enroll` and
/// `holder replace`), including its age recipient.
fn parse_holder_key(role: &str, pubkey: &str) -> Result<HolderPublicKey> {
    names::role(role, "role")?;
    let k = HolderPublicKey::parse(pubkey).map_err(|e| Error::invalid("pubkey", e.to_string()))?;
    k.age_recipient
        .parse::<age::x25519::Recipient>()
        .map_err(|_| Error::invalid("pubkey", "its age part is not a valid X25519 recipient"))?;
    Ok(k)
}

/// Why shares sealed to `recipients` (role, age recipient) as read before
/// a write may not be stored in it: a holder row that fails its MAC, or a
/// role handed to another holder meanwhile.
fn holders_changed(
    conn: &Connection,
    row_key: &SymmetricKey,
    recipients: &[RoleRecipient],
) -> Result<Option<Error>> {
    for (role, recipient) in recipients {
        if let Err(e) = rowmac::check_holder(conn, row_key, role) {
            return Ok(Some(e));
        }
        let now: Option<String> = conn
            .query_row(
                "SELECT age_recipient FROM holders WHERE role = ?1",
                [role],
                |r| r.get(0),
            )
            .optional()?;
        if now.as_ref() != Some(recipient) {
            return Ok(Some(Error::FailedPrecondition(format!(
                "the holder of role {role} changed while the class was being made; nothing was \
                 changed, run the command again"
            ))));
        }
    }
    Ok(None)
}

/// Judges a signature by a role: Ok with the current key, or the precise
/// reason it is refused (unenrolled role, replaced key, bad signature).
pub(crate) fn judge_role_signature(
    conn: &Connection,
    row_key: &SymmetricKey,
    role: &str,
    message: &[u8],
    signature: &[u8],
    what: &str,
) -> Result<[u8; 32]> {
    rowmac::check_holder(conn, row_key, role)?;
    let (current, retired) = holder_keys(conn, role)?;
    let Some(current) = current else {
        return Err(Error::Unauthenticated(format!(
            "role {role:?} has no enrolled holder; an admin enrols one with `tessera holder \
             enroll --role {role} --pubkey …`"
        )));
    };
    if verify(&current, message, signature) {
        return Ok(current);
    }
    if retired.iter().any(|k| verify(k, message, signature)) {
        return Err(Error::Unauthenticated(format!(
            "the {what} was signed by a replaced key of role {role}; that holder was replaced, \
             so only the current holder's key counts"
        )));
    }
    Err(Error::Unauthenticated(format!(
        "the {what} does not verify under the enrolled key of role {role} (fingerprint {}); \
         sign with that holder's key, over exactly this request",
        tessera_shred::holder::fingerprint(&current)
    )))
}

impl Broker {
    /// Checks a holder's signed request (role, time, signature over the
    /// request text naming the gRPC `method`). A failure is audited under
    /// `action`, the name the trail gives the operation once it is allowed.
    pub async fn authenticate_holder(
        &self,
        role: Option<&str>,
        time: Option<&str>,
        signature: Option<&str>,
        (method, action): (&str, &str),
        target: &str,
        request_id: &str,
    ) -> Result<HolderCaller> {
        let actor = role.map_or_else(|| "anonymous".to_string(), |r| format!("holder:{r}"));
        let (Some(role), Some(time), Some(signature)) = (role, time, signature) else {
            let e = Error::Unauthenticated(
                "holder requests must be signed: send x-tessera-holder, x-tessera-holder-time \
                 and x-tessera-holder-signature (the tessera CLI does this with the holder's key)"
                    .into(),
            );
            return Err(self.deny(actor, action, target, request_id, e).await);
        };
        let checked = (|| {
            let t: i64 = time.parse().map_err(|_| {
                Error::Unauthenticated("x-tessera-holder-time is not Unix seconds".into())
            })?;
            if (now() - t).abs() > REQUEST_SKEW_SECS {
                return Err(Error::Unauthenticated(format!(
                    "the holder request was signed at {}, more than {REQUEST_SKEW_SECS}s from \
                     the broker's clock ({}); check the clock and retry",
                    crate::init::rfc3339(t),
                    crate::init::rfc3339(now())
                )));
            }
            let sig = tessera_shred::unhex(signature).ok_or_else(|| {
                Error::Unauthenticated("x-tessera-holder-signature is not hex".into())
            })?;
            let text = request_text(role, method, target, t);
            self.store.read(|conn| {
                judge_role_signature(
                    conn,
                    &self.row_key,
                    role,
                    text.as_bytes(),
                    &sig,
                    "request signature",
                )
            })
        })();
        match checked {
            Ok(signing_key) => Ok(HolderCaller {
                role: role.to_string(),
                signing_key,
            }),
            Err(e) => Err(self.deny(actor, action, target, request_id, e).await),
        }
    }

    /// Binds `role` to a holder's public keys (first enrolment only; a
    /// change of holder is `holder replace`).
    pub async fn enroll_holder(
        &self,
        request_id: &str,
        role: String,
        pubkey: String,
    ) -> Result<proto::HolderInfo> {
        let key = match parse_holder_key(&role, &pubkey) {
            Ok(k) => k,
            Err(e) => {
                return Err(self
                    .deny("admin".into(), "holder.enroll", &role, request_id, e)
                    .await);
            }
        };
        let rid = request_id.to_string();
        let row_key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                let t = now();
                let exists: Option<String> = ctx
                    .conn
                    .query_row("SELECT role FROM holders WHERE role = ?1", [&role], |r| {
                        r.get(0)
                    })
                    .optional()?;
                // A role that classes name but that has no holder row had
                // its row deleted in the file: enrolling someone else for
                // it would hand them the role without a re-key.
                let named_by: Option<String> = ctx
                    .conn
                    .query_row(
                        "SELECT name FROM classes
                         WHERE instr(',' || holders || ',', ',' || ?1 || ',') > 0 LIMIT 1",
                        [&role],
                        |r| r.get(0),
                    )
                    .optional()?;
                let refusal = if exists.is_some() {
                    Some(Error::AlreadyExists(format!(
                        "role {role:?} already has a holder; to hand it to someone else use \
                         `tessera holder replace --role {role} --pubkey …`"
                    )))
                } else if let Some(class) = named_by {
                    Some(Error::Tampered(format!(
                        "the holder record of role {role:?} failed authentication: class \
                         {class} names the role but its record is missing (deleted outside \
                         tessera), so it is not enrolled again. Restore the store from a backup \
                         and find out who can write the database file"
                    )))
                } else {
                    key_taken(ctx.conn, &key, &role)?
                };
                if let Some(e) = refusal {
                    ctx.audit(&admin_entry(
                        "holder.enroll",
                        &role,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    return Ok(Err(e));
                }
                ctx.conn.execute(
                    "INSERT INTO holders (role, age_recipient, signing_key, enrolled_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![role, key.age_recipient, &key.signing_key[..], t],
                )?;
                rowmac::seal_holder(ctx.conn, &row_key, &role)?;
                ctx.audit(&admin_entry(
                    "holder.enroll",
                    &role,
                    true,
                    format!("key {}", key.fingerprint()),
                    &rid,
                ))?;
                Ok(Ok(proto::HolderInfo {
                    role,
                    age_recipient: key.age_recipient.clone(),
                    key_fingerprint: key.fingerprint(),
                    enrolled_at: t,
                    classes: Vec::new(),
                    tampered: false,
                }))
            })
            .await?
    }

    /// Hands a role to a new holder: every live class the role holds is
    /// re-keyed (a new class key, split for the new holder set, envelope
    /// data keys re-wrapped, the old key destroyed and the store compacted),
    /// so shares of the old key are worthless. One transaction.
    pub async fn replace_holder(
        &self,
        request_id: &str,
        role: String,
        pubkey: String,
    ) -> Result<(proto::HolderInfo, Vec<String>, Vec<String>)> {
        let key = match parse_holder_key(&role, &pubkey) {
            Ok(k) => k,
            Err(e) => {
                return Err(self
                    .deny("admin".into(), "holder.replace", &role, request_id, e)
                    .await);
            }
        };
        let role_name = role.clone();
        let rid = request_id.to_string();
        let rk = Arc::clone(&self.root_key);
        let row_key = Arc::clone(&self.row_key);
        // The re-keyed classes' old keys are forgotten as the re-key commits.
        let forget = self.class_keys.forget_on_commit();
        let out = self
            .store
            .write_then(move |ctx| {
                let t = now();
                let refuse = |ctx: &mut crate::store::WriteCtx<'_>, e: Error| -> Result<_> {
                    ctx.audit(&admin_entry(
                        "holder.replace",
                        &role,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    Ok(Err(e))
                };
                let (current, _) = holder_keys(ctx.conn, &role)?;
                let Some(current) = current else {
                    let e = Error::NotFound(format!(
                        "role {role:?} has no holder to replace; enrol one with `tessera holder \
                         enroll`"
                    ));
                    return refuse(ctx, e);
                };
                if current == key.signing_key {
                    let e = Error::invalid(
                        "pubkey",
                        "this is the role's current key; a replacement needs the new holder's key",
                    );
                    return refuse(ctx, e);
                }
                if let Some(e) = key_taken(ctx.conn, &key, &role)? {
                    return refuse(ctx, e);
                }
                ctx.conn.execute(
                    "INSERT INTO holder_keys_retired (role, signing_key, retired_at)
                     VALUES (?1, ?2, ?3)",
                    params![role, &current[..], t],
                )?;
                ctx.conn.execute(
                    "UPDATE holders SET age_recipient = ?2, signing_key = ?3, enrolled_at = ?4
                     WHERE role = ?1",
                    params![role, key.age_recipient, &key.signing_key[..], t],
                )?;
                rowmac::seal_holder(ctx.conn, &row_key, &role)?;
                let classes: Vec<String> = ctx
                    .conn
                    .prepare(
                        "SELECT c.name FROM classes c JOIN class_shares s ON s.class = c.name
                         WHERE s.role = ?1 AND c.state != 'shredded' ORDER BY c.name",
                    )?
                    .query_map([&role], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut cancelled = Vec::new();
                for class in &classes {
                    let (summary, ids) = rekey_class(ctx.conn, &rk, &row_key, class)?;
                    ctx.audit(&admin_entry("class.rekey", class, true, summary, &rid))?;
                    cancelled.extend(ids);
                }
                if !classes.is_empty() {
                    crate::store::meta_set(ctx.conn, "compact_pending", b"1")?;
                }
                ctx.audit(&admin_entry(
                    "holder.replace",
                    &role,
                    true,
                    format!(
                        "key {} replaced by {}; {} classes re-keyed",
                        tessera_shred::holder::fingerprint(&current),
                        key.fingerprint(),
                        classes.len()
                    ),
                    &rid,
                ))?;
                Ok(Ok((
                    proto::HolderInfo {
                        role: role.clone(),
                        age_recipient: key.age_recipient.clone(),
                        key_fingerprint: key.fingerprint(),
                        enrolled_at: t,
                        classes: classes.clone(),
                        tampered: false,
                    },
                    classes,
                    cancelled,
                )))
            }, forget)
            .await;
        let out = match out {
            // Rolled back (a class or holder record failed its MAC): the
            // refusal is audited on its own.
            Err(e @ Error::Tampered(_)) => {
                return Err(self
                    .deny("admin".into(), "holder.replace", &role_name, request_id, e)
                    .await);
            }
            other => other??,
        };
        self.compact_if_pending().await?;
        Ok(out)
    }

    /// Restores a class from an old store's rows and a quorum of decrypted
    /// holder shares: the shares must combine to the class key named by the
    /// rows, every data key must open under it, and the class must be new
    /// to this store. The key is then wrapped by this store's root key.
    pub async fn recover_class(
        &self,
        request_id: &str,
        req: proto::RecoverClassRequest,
    ) -> Result<proto::ClassInfo> {
        let name = req.name.clone();
        let key = match recover_key(&req) {
            Ok(k) => k,
            Err(e) => {
                return Err(self
                    .deny("admin".into(), "class.recover", &name, request_id, e)
                    .await);
            }
        };
        let rk = Arc::clone(&self.root_key);
        let row_key = Arc::clone(&self.row_key);
        let rid = request_id.to_string();
        let fingerprint = tessera_shred::unhex(&req.key_fingerprint).unwrap_or_default();
        self.store
            .write(move |ctx| {
                let t = now();
                if load_class(ctx.conn, &req.name)?.is_some() {
                    let e = Error::AlreadyExists(format!(
                        "class {:?} already exists in this store; recovery restores a class \
                         into a store that lacks it",
                        req.name
                    ));
                    ctx.audit(&admin_entry("class.recover", &req.name, false, e.to_string(), &rid))?;
                    return Ok(Err(e));
                }
                // Every role the class names needs a holder: enrolled here
                // already, or brought from the old store.
                for role in &req.holders {
                    let here = ctx
                        .conn
                        .query_row("SELECT 1 FROM holders WHERE role = ?1", [role], |_| Ok(()))
                        .optional()?
                        .is_some();
                    if !here && !req.holder_keys.iter().any(|h| &h.role == role) {
                        let e = Error::invalid(
                            "holder_keys",
                            format!(
                                "class {} is held by role {role}, which has no holder in this \
                                 store and none in the old one; enrol it first (`tessera holder \
                                 enroll --role {role}`)",
                                req.name
                            ),
                        );
                        ctx.audit(&admin_entry("class.recover", &req.name, false, e.to_string(), &rid))?;
                        return Ok(Err(e));
                    }
                }
                // Roles enrolled here under another key than in the old
                // file: the shares copied from it are sealed to the old keys,
                // so the class is re-keyed for the holders enrolled here.
                let mut moved = Vec::new();
                for h in &req.holder_keys {
                    let here: Option<(String, Vec<u8>)> = ctx
                        .conn
                        .query_row(
                            "SELECT age_recipient, signing_key FROM holders WHERE role = ?1",
                            [&h.role],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    if here.is_some_and(|(age, sig)| age != h.age_recipient || sig != h.signing_key) {
                        moved.push(h.role.clone());
                    }
                }
                let mut enrolled = Vec::new();
                for h in &req.holder_keys {
                    let n = ctx.conn.execute(
                        "INSERT OR IGNORE INTO holders (role, age_recipient, signing_key, enrolled_at)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![h.role, h.age_recipient, h.signing_key, t],
                    )?;
                    if n == 1 {
                        rowmac::seal_holder(ctx.conn, &row_key, &h.role)?;
                        enrolled.push(h.role.clone());
                    }
                }
                let wrapped =
                    rk.seal(ctx.conn, &class_key_aad(&req.name, req.generation), key.expose_bytes())?;
                ctx.conn.execute(
                    "INSERT INTO classes (name, retain_secs, deadline, holders, threshold,
                        early_threshold, key_fingerprint, generation, wrapped_key, state, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'active', ?10)",
                    params![
                        req.name,
                        req.retain_seconds as i64,
                        req.deadline,
                        req.holders.join(","),
                        req.threshold as i64,
                        req.early_threshold as i64,
                        fingerprint,
                        req.generation as i64,
                        wrapped,
                        req.created_at
                    ],
                )?;
                for s in &req.sealed_shares {
                    ctx.conn.execute(
                        "INSERT INTO class_shares (class, role, sealed) VALUES (?1, ?2, ?3)",
                        params![req.name, s.role, s.sealed],
                    )?;
                }
                for d in &req.data_keys {
                    ctx.conn.execute(
                        "INSERT INTO class_data_keys (class, id, created_at, context_digest, wrapped)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![req.name, d.id as i64, d.created_at, d.context_digest, d.wrapped],
                    )?;
                }
                for h in req.holds.iter().filter(|h| h.released_at == 0) {
                    ctx.conn.execute(
                        "INSERT INTO holds (class, reason, placed_at) VALUES (?1, ?2, ?3)",
                        params![req.name, h.reason, h.placed_at],
                    )?;
                }
                rowmac::seal_class(ctx.conn, &row_key, &req.name)?;
                let rekeyed = if moved.is_empty() {
                    String::new()
                } else {
                    let (summary, _) = rekey_class(ctx.conn, &rk, &row_key, &req.name)?;
                    format!(
                        "; re-keyed, as roles {} are enrolled here with other keys than in the \
                         old store: {summary}",
                        moved.join(",")
                    )
                };
                ctx.audit(&admin_entry(
                    "class.recover",
                    &req.name,
                    true,
                    format!(
                        "class key {} restored from {} holder shares; {} data keys, {} standing \
                         holds; roles enrolled from the old store: {}{rekeyed}",
                        &req.key_fingerprint[..16.min(req.key_fingerprint.len())],
                        req.shares.len(),
                        req.data_keys.len(),
                        req.holds.iter().filter(|h| h.released_at == 0).count(),
                        if enrolled.is_empty() { "none".into() } else { enrolled.join(",") }
                    ),
                    &rid,
                ))?;
                Ok(Ok(()))
            })
            .await??;
        self.class_info(&name)
    }

    /// Every enrolled role with its key fingerprint and classes.
    pub async fn list_holders(&self, request_id: &str) -> Result<Vec<proto::HolderInfo>> {
        let out = self.store.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT role, age_recipient, signing_key, enrolled_at FROM holders ORDER BY role",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(proto::HolderInfo {
                    role: r.get(0)?,
                    age_recipient: r.get(1)?,
                    key_fingerprint: tessera_shred::holder::fingerprint(&r.get::<_, Vec<u8>>(2)?),
                    enrolled_at: r.get(3)?,
                    classes: Vec::new(),
                    tampered: false,
                })
            })?;
            let mut holders: Vec<proto::HolderInfo> = rows.collect::<rusqlite::Result<_>>()?;
            for h in &mut holders {
                h.tampered = rowmac::failed(rowmac::check_holder(conn, &self.row_key, &h.role))?;
            }
            let mut stmt =
                conn.prepare("SELECT class FROM class_shares WHERE role = ?1 ORDER BY class")?;
            for h in &mut holders {
                h.classes = stmt
                    .query_map([&h.role], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            Ok(holders)
        })?;
        self.audit(admin_entry(
            "holder.list",
            "*",
            true,
            format!("{} holders listed", out.len()),
            request_id,
        ))
        .await?;
        Ok(out)
    }

    /// Creates a retention class: a fresh class key wrapped by the root
    /// key, split k-of-n among `holders`, each share sealed to its holder.
    pub async fn create_class(
        &self,
        request_id: &str,
        req: proto::CreateClassRequest,
    ) -> Result<proto::ClassInfo> {
        let name = req.name.clone();
        let checked = self.check_class_request(&req);
        let (recipients, k, early) = match checked {
            Ok(v) => v,
            Err(e) => {
                return Err(self
                    .deny("admin".into(), "class.create", &name, request_id, e)
                    .await);
            }
        };
        let n = recipients.len();
        let class_key = SymmetricKey::generate()?;
        let fingerprint = tessera_shred::key_check(class_key.expose_bytes());
        let shares = tessera_shred::split(class_key.expose_bytes(), k, n, &mut OsRandom)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut sealed = Vec::with_capacity(n);
        for ((role, recipient), share) in recipients.iter().zip(shares) {
            let envelope = ShareEnvelope {
                class: name.clone(),
                key_fingerprint: fingerprint,
                threshold: k as u8,
                shares: n as u8,
                role: role.clone(),
                share,
            };
            sealed.push((
                role.clone(),
                seal_to_holder(recipient, envelope.to_text().as_bytes())?,
            ));
        }
        let rk = Arc::clone(&self.root_key);
        let row_key = Arc::clone(&self.row_key);
        let roles: Vec<String> = recipients.iter().map(|(r, _)| r.clone()).collect();
        let rid = request_id.to_string();
        let retain = req.retain_seconds;
        let created = self
            .store
            .write(move |ctx| {
                let t = now();
                let refusal = if load_class(ctx.conn, &name)?.is_some() {
                    Some(Error::AlreadyExists(format!(
                        "a retention class named {name:?} already exists (class names are never \
                         reused, even after a shred); choose another name"
                    )))
                } else {
                    // The shares were sealed to the holders read before
                    // this transaction: one replaced since would hold a
                    // share of a class its re-key never saw.
                    holders_changed(ctx.conn, &row_key, &recipients)?
                };
                if let Some(e) = refusal {
                    ctx.audit(&admin_entry("class.create", &name, false, e.to_string(), &rid))?;
                    return Ok(Err(e));
                }
                let wrapped = rk.seal(ctx.conn, &class_key_aad(&name, 1), class_key.expose_bytes())?;
                ctx.conn.execute(
                    "INSERT INTO classes (name, retain_secs, deadline, holders, threshold,
                        early_threshold, key_fingerprint, generation, wrapped_key, state, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, 'active', ?9)",
                    params![
                        name,
                        retain as i64,
                        t.saturating_add(retain as i64),
                        roles.join(","),
                        k as i64,
                        early as i64,
                        &fingerprint[..],
                        wrapped,
                        t
                    ],
                )?;
                for (role, s) in &sealed {
                    ctx.conn.execute(
                        "INSERT INTO class_shares (class, role, sealed) VALUES (?1, ?2, ?3)",
                        params![name, role, s],
                    )?;
                }
                rowmac::seal_class(ctx.conn, &row_key, &name)?;
                ctx.audit(&admin_entry(
                    "class.create",
                    &name,
                    true,
                    format!(
                        "retain {retain}s; {k} of {} holders ({}); early shred needs {early}; key {}",
                        roles.len(),
                        roles.join(","),
                        &hex(&fingerprint)[..16]
                    ),
                    &rid,
                ))?;
                Ok(Ok(()))
            })
            .await?;
        created?;
        self.class_info(&req.name)
    }

    /// Validates a create request; returns (role, age recipient) pairs, k
    /// and the early threshold.
    fn check_class_request(
        &self,
        req: &proto::CreateClassRequest,
    ) -> Result<(Vec<RoleRecipient>, usize, usize)> {
        names::class(&req.name, "name")?;
        if req.retain_seconds == 0 || req.retain_seconds > MAX_RETAIN_SECS {
            return Err(Error::invalid(
                "retain",
                "the retention must be more than 0 and at most 100 years, e.g. --retain 7y",
            ));
        }
        if req.holders.is_empty() {
            return Err(Error::invalid(
                "holders",
                "name the holder roles, e.g. --holders legal,compliance,ciso",
            ));
        }
        for (i, r) in req.holders.iter().enumerate() {
            names::role(r, "holders")?;
            if req.holders[..i].contains(r) {
                return Err(Error::invalid(
                    "holders",
                    format!("role {r:?} is listed twice; each role holds one share"),
                ));
            }
        }
        let n = req.holders.len();
        let k = req.threshold as usize;
        tessera_shred::shamir::check_threshold(k, n)
            .map_err(|e| Error::invalid("threshold", e.to_string()))?;
        let early = if req.early_threshold == 0 {
            n
        } else {
            req.early_threshold as usize
        };
        if early < k || early > n {
            return Err(Error::invalid(
                "early_threshold",
                format!("an early shred needs between the threshold ({k}) and all {n} holders"),
            ));
        }
        let recipients = self.store.read(|conn| {
            let mut out = Vec::new();
            for r in &req.holders {
                // A recipient swapped in the file would get the share.
                rowmac::check_holder(conn, &self.row_key, r)?;
                let rec: Option<String> = conn
                    .query_row(
                        "SELECT age_recipient FROM holders WHERE role = ?1",
                        [r],
                        |row| row.get(0),
                    )
                    .optional()?;
                match rec {
                    Some(a) => out.push((r.clone(), a)),
                    None => {
                        return Err(Error::FailedPrecondition(format!(
                            "role {r:?} has no enrolled holder; enrol one first with `tessera \
                             holder enroll --role {r} --pubkey …`"
                        )));
                    }
                }
            }
            Ok(out)
        })?;
        Ok((recipients, k, early))
    }

    /// One class with its holds and ceremonies.
    pub fn class_info(&self, name: &str) -> Result<proto::ClassInfo> {
        self.store.read(|conn| {
            let c = load_class(conn, name)?.ok_or_else(|| no_class(name))?;
            class_info_of(conn, c, Some(&self.row_key))
        })
    }

    /// Every class.
    pub async fn list_classes(&self, request_id: &str) -> Result<Vec<proto::ClassInfo>> {
        let out = self.store.read(|conn| {
            let names: Vec<String> = conn
                .prepare("SELECT name FROM classes ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            names
                .iter()
                .map(|n| {
                    let c = load_class(conn, n)?.ok_or_else(|| no_class(n))?;
                    class_info_of(conn, c, Some(&self.row_key))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        self.audit(admin_entry(
            "class.list",
            "*",
            true,
            format!("{} classes listed", out.len()),
            request_id,
        ))
        .await?;
        Ok(out)
    }

    /// Places a legal hold: no shred of the class can open or complete
    /// while it stands; an open ceremony is cancelled.
    pub async fn place_hold(
        &self,
        request_id: &str,
        class: String,
        reason: String,
    ) -> Result<proto::HoldInfo> {
        if reason.trim().is_empty() {
            let e = Error::invalid(
                "reason",
                "say why the data must be kept, e.g. --reason 'litigation 2026-17'",
            );
            return Err(self
                .deny("admin".into(), "hold.place", &class, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        let row_key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                let t = now();
                // Not on a record that fails its MAC: sealing it again with
                // the new hold would hide the edit, and a hold not sealed
                // with it could be lifted unseen.
                let c = match load_class(ctx.conn, &class)? {
                    Some(c) if c.state == class_state::SHREDDED => Err(shredded_error(&c)),
                    Some(c) => rowmac::check_class(ctx.conn, &row_key, &class).map(|()| c),
                    None => Err(no_class(&class)),
                };
                let c = match c {
                    Ok(c) => c,
                    Err(e) => {
                        ctx.audit(&admin_entry(
                            "hold.place",
                            &class,
                            false,
                            e.to_string(),
                            &rid,
                        ))?;
                        return Ok(Err(e));
                    }
                };
                ctx.conn.execute(
                    "INSERT INTO holds (class, reason, placed_at) VALUES (?1, ?2, ?3)",
                    params![c.name, reason, t],
                )?;
                let id = ctx.conn.last_insert_rowid();
                rowmac::seal_class(ctx.conn, &row_key, &c.name)?;
                let cancelled = ctx.conn.execute(
                    "UPDATE ceremonies SET state = 'cancelled' WHERE class = ?1 AND state = 'open'",
                    [&c.name],
                )?;
                if cancelled > 0 {
                    ctx.conn.execute(
                        "UPDATE classes SET state = 'active' WHERE name = ?1",
                        [&c.name],
                    )?;
                }
                ctx.audit(&admin_entry(
                    "hold.place",
                    &c.name,
                    true,
                    format!("hold {id}: {reason}; {cancelled} open ceremony cancelled"),
                    &rid,
                ))?;
                Ok(Ok(proto::HoldInfo {
                    id: id as u64,
                    class: c.name,
                    reason,
                    placed_at: t,
                    released_at: 0,
                    release_reason: String::new(),
                }))
            })
            .await?
    }

    /// Releases every standing hold on `class`.
    pub async fn release_hold(
        &self,
        request_id: &str,
        class: String,
        hold: u64,
        reason: String,
    ) -> Result<proto::HoldInfo> {
        if reason.trim().is_empty() {
            let e = Error::invalid(
                "reason",
                "say why the hold ends, e.g. --reason 'case closed'",
            );
            return Err(self
                .deny("admin".into(), "hold.release", &class, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        let row_key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                let t = now();
                let holds = if load_class(ctx.conn, &class)?.is_none() {
                    Err(no_class(&class))
                } else if let Err(e) = rowmac::check_class(ctx.conn, &row_key, &class) {
                    Err(e)
                } else {
                    let h = standing_holds(ctx.conn, &class)?;
                    let ids = || {
                        h.iter()
                            .map(|(id, _)| id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    match (h.len(), hold) {
                        (0, _) => Err(Error::FailedPrecondition(format!(
                            "class {class} has no standing legal hold to release"
                        ))),
                        (1, 0) => Ok(h[0].clone()),
                        (_, 0) => Err(Error::FailedPrecondition(format!(
                            "class {class} has {} standing holds (ids {}); release one at a \
                             time with --hold ID",
                            h.len(),
                            ids()
                        ))),
                        _ => h
                            .iter()
                            .find(|(id, _)| *id as u64 == hold)
                            .cloned()
                            .ok_or_else(|| {
                                Error::NotFound(format!(
                                    "class {class} has no standing hold {hold} (standing: {})",
                                    ids()
                                ))
                            }),
                    }
                };
                let (id, placed_reason) = match holds {
                    Ok(h) => h,
                    Err(e) => {
                        ctx.audit(&admin_entry(
                            "hold.release",
                            &class,
                            false,
                            e.to_string(),
                            &rid,
                        ))?;
                        return Ok(Err(e));
                    }
                };
                ctx.conn.execute(
                    "UPDATE holds SET released_at = ?2, release_reason = ?3 WHERE id = ?1",
                    params![id, t, reason],
                )?;
                rowmac::seal_class(ctx.conn, &row_key, &class)?;
                let placed_at: i64 =
                    ctx.conn
                        .query_row("SELECT placed_at FROM holds WHERE id = ?1", [id], |r| {
                            r.get(0)
                        })?;
                ctx.audit(&admin_entry(
                    "hold.release",
                    &class,
                    true,
                    format!("hold {id} released: {reason}"),
                    &rid,
                ))?;
                Ok(Ok(proto::HoldInfo {
                    id: id as u64,
                    class,
                    reason: placed_reason,
                    placed_at,
                    released_at: t,
                    release_reason: reason,
                }))
            })
            .await?
    }

    /// The caller's sealed share of `class`.
    pub async fn export_share(
        &self,
        request_id: &str,
        holder: &HolderCaller,
        class: String,
    ) -> Result<proto::ExportShareResponse> {
        let found = self.store.read(|conn| {
            let c = load_class(conn, &class)?.ok_or_else(|| no_class(&class))?;
            if c.state == class_state::SHREDDED {
                return Err(shredded_error(&c));
            }
            rowmac::check_class(conn, &self.row_key, &class)?;
            conn.query_row(
                "SELECT sealed FROM class_shares WHERE class = ?1 AND role = ?2",
                params![class, holder.role],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "role {} holds no share of class {class} (its holders are {})",
                    holder.role,
                    c.holders.join(", ")
                ))
            })
        });
        let (allowed, reason) = match &found {
            Ok(_) => (true, "sealed share exported".to_string()),
            Err(e) => (false, e.to_string()),
        };
        self.audit(Entry {
            time: now(),
            actor: holder.actor(),
            action: "share.export".into(),
            target: class.clone(),
            allowed,
            reason,
            request_id: request_id.into(),
        })
        .await?;
        Ok(proto::ExportShareResponse {
            sealed_share: found?,
            class,
            role: holder.role.clone(),
        })
    }

    /// The unwrapped key of a live class (cached).
    pub(crate) fn class_key(&self, name: &str) -> Result<Arc<ClassKey>> {
        if let Some(k) = self.class_keys.get(name) {
            return Ok(k);
        }
        let forgets = self.class_keys.generation();
        let (row, wrapped) = self.store.read(|conn| {
            let c = load_class(conn, name)?.ok_or_else(|| no_class(name))?;
            let w: Option<Vec<u8>> = conn.query_row(
                "SELECT wrapped_key FROM classes WHERE name = ?1",
                [name],
                |r| r.get(0),
            )?;
            Ok((c, w))
        })?;
        let Some(wrapped) = wrapped else {
            return Err(shredded_error(&row));
        };
        let raw = self
            .root_key
            .open(&class_key_aad(name, row.generation), &wrapped)
            .ok_or_else(|| {
                self.unopened(Error::Tampered(format!(
                    "the stored key of class {name} failed authentication: the row was altered \
                     or moved; restore the store from a backup or recover the class from its \
                     holders' shares"
                )))
            })?;
        let key = Arc::new(ClassKey {
            generation: row.generation,
            key: SymmetricKey::from_bytes(&raw)?,
        });
        // A shred or re-key that committed meanwhile forgot this key: use
        // it for this call only.
        self.class_keys.insert(forgets, name.to_string(), &key);
        Ok(key)
    }

    /// Checks the agent may use `class`; a refusal is audited.
    async fn envelope_allowed(
        &self,
        agent: &Agent,
        action: &str,
        class: &str,
        request_id: &str,
    ) -> Result<String> {
        let checked = names::class(class, "class").and_then(|()| {
            agent
                .rule_for_class(class)
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::PermissionDenied(format!(
                        "agent {:?} may not use class {class:?}: no allow rule `class:{class}` \
                     (its rules: {})",
                        agent.name,
                        agent.rules_text()
                    ))
                })
        });
        match checked {
            Ok(rule) => Ok(rule),
            Err(e) => Err(self.deny(agent.actor(), action, class, request_id, e).await),
        }
    }

    /// Makes a data key under `class`, stored wrapped by the class key and
    /// bound to `context`; returns (id, data key).
    async fn new_class_data_key(
        &self,
        agent: &Agent,
        action: &str,
        class: &str,
        context: &HashMap<String, String>,
        request_id: &str,
    ) -> Result<(u64, SymmetricKey)> {
        let rule = self
            .envelope_allowed(agent, action, class, request_id)
            .await?;
        let ck = match self.class_key(class) {
            Ok(k) => k,
            Err(e) => {
                return Err(self.deny(agent.actor(), action, class, request_id, e).await);
            }
        };
        let dk = SymmetricKey::generate()?;
        let dk_bytes = Zeroizing::new(dk.expose_bytes().to_vec());
        let ctx_bytes = context_digest(context);
        let class = class.to_string();
        let who = agent.clone();
        let actor = agent.actor();
        let action = action.to_string();
        let rid = request_id.to_string();
        let id = self
            .store
            .write(move |ctx| {
                let t = now();
                // The agent may have been revoked, and the class shredded or
                // re-keyed, since they were read: the writer's view decides.
                let live = load_class(ctx.conn, &class)?;
                let revoked = who.refused_in(ctx.conn, t)?;
                let refusal = match &live {
                    _ if revoked.is_some() => revoked,
                    None => Some(no_class(&class)),
                    Some(c) if c.state == class_state::SHREDDED => Some(shredded_error(c)),
                    Some(c) if c.generation != ck.generation => Some(Error::Unavailable(
                        "the class key was just rotated; retry".into(),
                    )),
                    _ => None,
                };
                if let Some(e) = refusal {
                    ctx.audit(&Entry {
                        time: t,
                        actor,
                        action,
                        target: class,
                        allowed: false,
                        reason: e.to_string(),
                        request_id: rid,
                    })?;
                    return Ok(Err(e));
                }
                let id: i64 = ctx.conn.query_row(
                    "SELECT coalesce(max(id), 0) + 1 FROM class_data_keys WHERE class = ?1",
                    [&class],
                    |r| r.get(0),
                )?;
                let id = id as u64;
                let wrapped = ck
                    .key
                    .seal(&class_data_key_aad(&class, id, &ctx_bytes), &dk_bytes)?;
                ctx.conn.execute(
                    "INSERT INTO class_data_keys (class, id, created_at, context_digest, wrapped)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![class, id as i64, t, &ctx_bytes[..], wrapped],
                )?;
                ctx.audit(&Entry {
                    time: t,
                    actor,
                    action,
                    target: class,
                    allowed: true,
                    reason: format!("data key {id} made (rule {rule})"),
                    request_id: rid,
                })?;
                Ok(Ok(id))
            })
            .await?;
        let id = id.inspect_err(|e| self.forget_agent_refused(agent.id, e))?;
        Ok((id, dk))
    }

    /// Envelope-encrypts `plaintext` under `class`, bound to `context`.
    pub async fn encrypt(
        &self,
        request_id: &str,
        agent: &Agent,
        mut req: proto::EncryptRequest,
    ) -> Result<proto::EncryptResponse> {
        if req.plaintext.len() > self.limits.max_value_size {
            let e = Error::invalid(
                "plaintext",
                format!(
                    "{} bytes is over the limit of {} bytes; encrypt a data key from \
                     GenerateDataKey locally instead",
                    req.plaintext.len(),
                    self.limits.max_value_size
                ),
            );
            return Err(self
                .deny(agent.actor(), "envelope.encrypt", &req.class, request_id, e)
                .await);
        }
        let plaintext = Zeroizing::new(std::mem::take(&mut req.plaintext));
        let (id, dk) = self
            .new_class_data_key(
                agent,
                "envelope.encrypt",
                &req.class,
                &req.context,
                request_id,
            )
            .await?;
        let sealed = dk.seal(
            &envelope_aad(&req.class, id, &context_digest(&req.context)),
            &plaintext,
        )?;
        let mut ciphertext = Vec::with_capacity(12 + sealed.len());
        ciphertext.extend_from_slice(ENVELOPE_MAGIC);
        ciphertext.extend_from_slice(&id.to_be_bytes());
        ciphertext.extend_from_slice(&sealed);
        Ok(proto::EncryptResponse {
            ciphertext,
            key_id: format!("{}/{id}", req.class),
        })
    }

    /// A fresh data key under `class`: plaintext, and a reference that
    /// `Decrypt` turns back into it.
    pub async fn generate_data_key(
        &self,
        request_id: &str,
        agent: &Agent,
        req: proto::GenerateDataKeyRequest,
    ) -> Result<proto::GenerateDataKeyResponse> {
        let (id, dk) = self
            .new_class_data_key(
                agent,
                "envelope.datakey",
                &req.class,
                &req.context,
                request_id,
            )
            .await?;
        let mut ciphertext = Vec::with_capacity(12);
        ciphertext.extend_from_slice(DATA_KEY_MAGIC);
        ciphertext.extend_from_slice(&id.to_be_bytes());
        Ok(proto::GenerateDataKeyResponse {
            plaintext_key: dk.expose_bytes().to_vec(),
            ciphertext,
        })
    }

    /// Decrypts a ciphertext from `Encrypt` or a data-key reference from
    /// `GenerateDataKey`, with the same context.
    pub async fn decrypt(
        &self,
        request_id: &str,
        agent: &Agent,
        req: proto::DecryptRequest,
    ) -> Result<proto::DecryptResponse> {
        let action = "envelope.decrypt";
        self.envelope_allowed(agent, action, &req.class, request_id)
            .await?;
        let out = self.decrypt_inner(&req);
        let (allowed, reason) = match &out {
            Ok((id, _)) => (true, format!("data key {id} used")),
            Err(e) => (false, e.to_string()),
        };
        let who = agent.clone();
        let mut entry = Entry {
            time: now(),
            actor: agent.actor(),
            action: action.into(),
            target: req.class.clone(),
            allowed,
            reason,
            request_id: request_id.into(),
        };
        // Nothing is returned to an agent whose revoke was acknowledged
        // before this record is written.
        let refused = self
            .store
            .write(move |ctx| {
                let refused = who.refused_in(ctx.conn, entry.time)?;
                if let Some(e) = &refused {
                    entry.allowed = false;
                    entry.reason = e.to_string();
                }
                ctx.audit(&entry)?;
                Ok(refused)
            })
            .await?;
        if let Some(e) = refused {
            self.forget_agent_id(agent.id);
            return Err(e);
        }
        let (_, plaintext) = out?;
        Ok(proto::DecryptResponse {
            plaintext: plaintext.to_vec(),
        })
    }

    fn decrypt_inner(&self, req: &proto::DecryptRequest) -> Result<(u64, Zeroizing<Vec<u8>>)> {
        let ct = &req.ciphertext;
        let malformed = || {
            Error::invalid(
                "ciphertext",
                "this is not a tessera envelope ciphertext or data-key reference (it must come \
                 from Encrypt or GenerateDataKey)",
            )
        };
        if ct.len() < 12 {
            return Err(malformed());
        }
        let (magic, rest) = ct.split_at(4);
        let id = u64::from_be_bytes(rest[..8].try_into().map_err(|_| malformed())?);
        let is_data_key = match magic {
            m if m == DATA_KEY_MAGIC && rest.len() == 8 => true,
            m if m == ENVELOPE_MAGIC => false,
            _ => return Err(malformed()),
        };
        let (row, wrapped) = self.store.read(|conn| {
            let c = load_class(conn, &req.class)?.ok_or_else(|| no_class(&req.class))?;
            let w: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT wrapped FROM class_data_keys WHERE id = ?1 AND class = ?2",
                    params![id as i64, req.class],
                    |r| r.get(0),
                )
                .optional()?;
            Ok((c, w))
        })?;
        if row.state == class_state::SHREDDED {
            return Err(shredded_error(&row));
        }
        let wrapped = wrapped.ok_or_else(|| {
            Error::invalid(
                "ciphertext",
                format!(
                    "its data key does not belong to class {} (wrong class, or the ciphertext \
                     was altered)",
                    req.class
                ),
            )
        })?;
        let ck = self.class_key(&req.class)?;
        let ctx_bytes = context_digest(&req.context);
        let wrong = || {
            Error::invalid(
                "context",
                format!(
                    "the ciphertext does not decrypt under class {} with this encryption \
                     context: give exactly the context used to encrypt (or the ciphertext was \
                     altered)",
                    req.class
                ),
            )
        };
        let dk_raw = ck
            .key
            .open(&class_data_key_aad(&req.class, id, &ctx_bytes), &wrapped)
            .ok_or_else(wrong)?;
        if is_data_key {
            return Ok((id, dk_raw));
        }
        let dk = SymmetricKey::from_bytes(&dk_raw)?;
        let pt = dk
            .open(&envelope_aad(&req.class, id, &ctx_bytes), &rest[8..])
            .ok_or_else(wrong)?;
        Ok((id, pt))
    }
}

/// Combines the shares of a recovery request and checks the key against
/// the class rows: same class, the fingerprint the rows name, and every data
/// key opening under it.
fn recover_key(req: &proto::RecoverClassRequest) -> Result<SymmetricKey> {
    names::class(&req.name, "name")?;
    let envelopes = req
        .shares
        .iter()
        .map(|t| {
            ShareEnvelope::parse(t.as_bytes()).map_err(|e| Error::invalid("shares", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(e) = envelopes.iter().find(|e| e.class != req.name) {
        return Err(Error::invalid(
            "shares",
            format!(
                "the share of role {} belongs to class {}, not {}",
                e.role, e.class, req.name
            ),
        ));
    }
    if let Some(e) = envelopes
        .iter()
        .find(|e| hex(&e.key_fingerprint) != req.key_fingerprint)
    {
        return Err(Error::invalid(
            "shares",
            format!(
                "the share of role {} is of another key of class {} (key {}, the store names \
                 key {}): it predates a holder handover or comes from another store",
                e.role,
                req.name,
                &hex(&e.key_fingerprint)[..16],
                &req.key_fingerprint[..16.min(req.key_fingerprint.len())]
            ),
        ));
    }
    // The class rows must agree with the shares and with themselves: an
    // altered row could otherwise restore a class that fewer holders can
    // shred than were chosen, or that no quorum ever can.
    let n = req.holders.len();
    let k = req.threshold as usize;
    let early = match req.early_threshold {
        0 => n,
        e => e as usize,
    };
    let made = envelopes
        .first()
        .map_or((k, n), |e| (e.threshold as usize, e.shares as usize));
    if made != (k, n) || k == 0 || early < k || early > n {
        return Err(Error::invalid(
            "threshold",
            format!(
                "the class rows ask for {k} of {n} holders (an early shred {early}), but the \
                 shares were made {} of {}; the old store's class row was altered",
                made.0, made.1
            ),
        ));
    }
    let mut holders = std::collections::HashSet::new();
    if let Some(h) = req.holders.iter().find(|h| !holders.insert(h.as_str())) {
        return Err(Error::invalid(
            "holders",
            format!("holder {h} is named twice; the old store's class row was altered"),
        ));
    }
    let mut roles = std::collections::HashSet::new();
    if let Some(s) = req
        .sealed_shares
        .iter()
        .find(|s| !roles.insert(s.role.as_str()) || !holders.contains(s.role.as_str()))
    {
        return Err(Error::invalid(
            "sealed_shares",
            format!(
                "role {} has a second sealed share or is not a holder of the class; the old \
                 store's rows were altered",
                s.role
            ),
        ));
    }
    let mut ids = std::collections::HashSet::new();
    if let Some(d) = req.data_keys.iter().find(|d| !ids.insert(d.id)) {
        return Err(Error::invalid(
            "data_keys",
            format!(
                "data key {} appears twice; the old store's rows were altered",
                d.id
            ),
        ));
    }
    let raw = tessera_shred::envelope::combine_envelopes(&envelopes)
        .map_err(|e| Error::invalid("shares", e.to_string()))?;
    let key = SymmetricKey::from_bytes(&raw)?;
    for d in &req.data_keys {
        let aad = class_data_key_aad(&req.name, d.id, &d.context_digest);
        if key.open(&aad, &d.wrapped).is_none() {
            return Err(Error::Tampered(format!(
                "data key {} of class {} does not open under the recovered key: the old \
                 store's row was altered; nothing was restored",
                d.id, req.name
            )));
        }
    }
    Ok(key)
}

/// Reads what `class recover` needs from an old store file, without its
/// root key: the class row (minus the root-wrapped key), sealed shares,
/// envelope data keys, holder public keys and holds. None of it is secret
/// without a quorum of shares.
pub fn export_class(old_db: &std::path::Path, class: &str) -> Result<proto::RecoverClassRequest> {
    // The old file is the caller's argument: a path that cannot be read
    // or is no store is INVALID_ARGUMENT, not a broker that is down.
    if !old_db.is_file() {
        return Err(Error::invalid(
            "from",
            format!(
                "{} is not a file; give the old store's tessera.db",
                old_db.display()
            ),
        ));
    }
    let conn = Connection::open_with_flags(old_db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| Error::invalid("from", format!("cannot open {}: {e}", old_db.display())))?;
    let c = load_class(&conn, class)
        .map_err(|_| {
            Error::invalid(
                "from",
                format!("{} is not a tessera store with classes", old_db.display()),
            )
        })?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "the store {} has no class {class:?}",
                old_db.display()
            ))
        })?;
    if c.state == class_state::SHREDDED {
        return Err(shredded_error(&c));
    }
    let sealed_shares = conn
        .prepare("SELECT role, sealed FROM class_shares WHERE class = ?1 ORDER BY role")?
        .query_map([class], |r| {
            Ok(proto::SealedShare {
                role: r.get(0)?,
                sealed: r.get(1)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let data_keys = conn
        .prepare(
            "SELECT id, created_at, context_digest, wrapped FROM class_data_keys
             WHERE class = ?1 ORDER BY id",
        )?
        .query_map([class], |r| {
            Ok(proto::WrappedDataKey {
                id: r.get::<_, i64>(0)? as u64,
                created_at: r.get(1)?,
                context_digest: r.get(2)?,
                wrapped: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut holder_keys = Vec::new();
    for role in &c.holders {
        if let Some(h) = conn
            .query_row(
                "SELECT role, age_recipient, signing_key FROM holders WHERE role = ?1",
                [role],
                |r| {
                    Ok(proto::HolderKey {
                        role: r.get(0)?,
                        age_recipient: r.get(1)?,
                        signing_key: r.get(2)?,
                    })
                },
            )
            .optional()?
        {
            holder_keys.push(h);
        }
    }
    let info = class_info_of(
        &conn,
        load_class(&conn, class)?.ok_or_else(|| no_class(class))?,
        None,
    )?;
    Ok(proto::RecoverClassRequest {
        name: c.name,
        retain_seconds: c.retain_secs,
        deadline: c.deadline,
        holders: c.holders,
        threshold: c.threshold as u32,
        early_threshold: c.early_threshold as u32,
        key_fingerprint: hex(&c.key_fingerprint),
        generation: c.generation,
        created_at: c.created_at,
        sealed_shares,
        data_keys,
        holder_keys,
        holds: info.holds,
        shares: Vec::new(),
    })
}

/// Re-keys `class` inside a write transaction: a new class key (the next
/// generation), its shares sealed to the current holders, every envelope
/// data key re-wrapped, open ceremonies cancelled (their statements name
/// the old key). Returns a summary for the audit and the cancelled
/// ceremonies' ids.
fn rekey_class(
    conn: &Connection,
    rk: &crate::broker::RootKeys,
    row_key: &SymmetricKey,
    class: &str,
) -> Result<(String, Vec<String>)> {
    rowmac::check_class(conn, row_key, class)?;
    let c = load_class(conn, class)?.ok_or_else(|| no_class(class))?;
    let wrapped: Vec<u8> = conn
        .query_row(
            "SELECT wrapped_key FROM classes WHERE name = ?1",
            [class],
            |r| r.get::<_, Option<Vec<u8>>>(0),
        )?
        .ok_or_else(|| shredded_error(&c))?;
    let tampered = || {
        Error::Tampered(format!(
            "class {class}'s stored keys failed authentication; nothing was changed"
        ))
    };
    let old = SymmetricKey::from_bytes(
        &rk.open(&class_key_aad(class, c.generation), &wrapped)
            .ok_or_else(tampered)?,
    )?;
    let new = SymmetricKey::generate()?;
    let generation = c.generation + 1;
    let fingerprint = tessera_shred::key_check(new.expose_bytes());
    let n = c.holders.len();
    let shares = tessera_shred::split(new.expose_bytes(), c.threshold as usize, n, &mut OsRandom)
        .map_err(|e| Error::Internal(e.to_string()))?;
    conn.execute("DELETE FROM class_shares WHERE class = ?1", [class])?;
    for (role, share) in c.holders.iter().zip(shares) {
        rowmac::check_holder(conn, row_key, role)?;
        let recipient: String = conn.query_row(
            "SELECT age_recipient FROM holders WHERE role = ?1",
            [role],
            |r| r.get(0),
        )?;
        let envelope = ShareEnvelope {
            class: class.to_string(),
            key_fingerprint: fingerprint,
            threshold: c.threshold,
            shares: n as u8,
            role: role.clone(),
            share,
        };
        let sealed = seal_to_holder(&recipient, envelope.to_text().as_bytes())?;
        conn.execute(
            "INSERT INTO class_shares (class, role, sealed) VALUES (?1, ?2, ?3)",
            params![class, role, sealed],
        )?;
    }
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = conn
        .prepare("SELECT id, context_digest, wrapped FROM class_data_keys WHERE class = ?1")?
        .query_map([class], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, digest, w) in &rows {
        let aad = class_data_key_aad(class, *id as u64, digest);
        let dk = old.open(&aad, w).ok_or_else(tampered)?;
        conn.execute(
            "UPDATE class_data_keys SET wrapped = ?3 WHERE class = ?1 AND id = ?2",
            params![class, id, new.seal(&aad, &dk)?],
        )?;
    }
    let cancelled: Vec<String> = conn
        .prepare("SELECT id FROM ceremonies WHERE class = ?1 AND state = 'open' ORDER BY id")?
        .query_map([class], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    conn.execute(
        "UPDATE ceremonies SET state = 'cancelled' WHERE class = ?1 AND state = 'open'",
        [class],
    )?;
    conn.execute(
        "UPDATE classes SET wrapped_key = ?2, generation = ?3, key_fingerprint = ?4,
            state = 'active' WHERE name = ?1",
        params![
            class,
            rk.seal(conn, &class_key_aad(class, generation), new.expose_bytes())?,
            generation as i64,
            &fingerprint[..]
        ],
    )?;
    rowmac::seal_class(conn, row_key, class)?;
    let summary = format!(
        "key {} replaced by {} (generation {generation}); {} data keys re-wrapped; open \
         ceremonies cancelled: {}",
        &hex(&c.key_fingerprint)[..16],
        &hex(&fingerprint)[..16],
        rows.len(),
        if cancelled.is_empty() {
            "none".to_string()
        } else {
            cancelled.join(", ")
        }
    );
    Ok((summary, cancelled))
}

/// Leading bytes of an `Encrypt` ciphertext.
pub const ENVELOPE_MAGIC: &[u8; 4] = b"tse1";
/// Leading bytes of a `GenerateDataKey` reference.
pub const DATA_KEY_MAGIC: &[u8; 4] = b"tsk1";

/// `key` checks the row's MAC (none for an old store file being recovered).
fn class_info_of(
    conn: &Connection,
    c: ClassRow,
    key: Option<&SymmetricKey>,
) -> Result<proto::ClassInfo> {
    let tampered = match key {
        Some(k) => rowmac::failed(rowmac::check_class(conn, k, &c.name))?,
        None => false,
    };
    let mut holds_stmt = conn.prepare_cached(
        "SELECT id, reason, placed_at, released_at, release_reason FROM holds
         WHERE class = ?1 ORDER BY id",
    )?;
    let holds = holds_stmt
        .query_map([&c.name], |r| {
            Ok(proto::HoldInfo {
                id: r.get::<_, i64>(0)? as u64,
                class: c.name.clone(),
                reason: r.get(1)?,
                placed_at: r.get(2)?,
                released_at: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                release_reason: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let ids: Vec<String> = conn
        .prepare_cached("SELECT id FROM ceremonies WHERE class = ?1 ORDER BY opened_at, id")?
        .query_map([&c.name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let ceremonies = ids
        .iter()
        .map(|id| crate::ceremony::ceremony_info(conn, id))
        .collect::<Result<Vec<_>>>()?;
    let data_keys: i64 = conn.query_row(
        "SELECT count(*) FROM class_data_keys WHERE class = ?1",
        [&c.name],
        |r| r.get(0),
    )?;
    Ok(proto::ClassInfo {
        certificate: c
            .certificate
            .as_deref()
            .map(|t| hex(&tessera_shred::certificate::digest(signed_part(t))))
            .unwrap_or_default(),
        name: c.name,
        retain_seconds: c.retain_secs,
        deadline: c.deadline,
        holders: c.holders,
        threshold: c.threshold as u32,
        early_threshold: c.early_threshold as u32,
        state: c.state,
        key_fingerprint: hex(&c.key_fingerprint),
        created_at: c.created_at,
        holds,
        ceremonies,
        data_keys: data_keys as u64,
        tampered,
    })
}
