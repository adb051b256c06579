//! The quorum shred ceremony: opened by an admin (or by the broker when a
//! class's deadline passes), joined by holders who sign its statement, and
//! completed when enough distinct roles have joined: the broker destroys
//! the wrapped class key, every sealed share and every envelope data key in
//! one transaction together with a signed destruction certificate, then
//! checkpoints and compacts the store so no page of the database or WAL
//! still holds them.
//!
//! Crash safety: joins commit on their own; destruction and certificate
//! commit together (so a destroyed key without a certificate cannot
//! exist); compaction is flagged in the same transaction and resumed at the
//! next start. An open ceremony that reached its quorum before a crash is
//! completed by the next tick.

use rusqlite::{Connection, OptionalExtension, params};
use tessera_shred::ceremony::{self as rules, Action, OpenRefusal, Statement};
use tessera_shred::certificate::{self, Certificate};

use crate::audit::{ACTOR_SYSTEM, Entry};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::fault;
use crate::init::{now, rfc3339};
use crate::keys::SymmetricKey;
use crate::keys::{fill_random, hex, random_id};
use crate::proto;
use crate::retention::ClassRow;
use crate::retention::{
    HolderCaller, class_state, judge_role_signature, load_class, no_class, shredded_error,
    signed_part, standing_holds,
};
use crate::rowmac;
use crate::store::{meta_get, meta_set};
use std::sync::Arc;

/// Ceremony states as stored.
pub mod state {
    /// Holders may join.
    pub const OPEN: &str = "open";
    /// The key was destroyed.
    pub const DONE: &str = "done";
    /// It expired before enough holders joined.
    pub const EXPIRED: &str = "expired";
    /// A legal hold, a re-key of its class (its statement names the old
    /// key) or, past the deadline, a normal ceremony replacing an early one
    /// cancelled it.
    pub const CANCELLED: &str = "cancelled";
}

/// Longest a ceremony may stay open (30 days).
pub const MAX_EXPIRY_SECS: u64 = 30 * 24 * 3600;

struct CeremonyRow {
    id: String,
    class: String,
    statement: String,
    action: String,
    required: u32,
    opened_by: String,
    reason: String,
    opened_at: i64,
    expires_at: i64,
    state: String,
}

fn load_ceremony(conn: &Connection, id: &str) -> Result<Option<CeremonyRow>> {
    Ok(conn
        .query_row(
            "SELECT id, class, statement, action, required, opened_by, reason, opened_at,
                    expires_at, state FROM ceremonies WHERE id = ?1",
            [id],
            |r| {
                Ok(CeremonyRow {
                    id: r.get(0)?,
                    class: r.get(1)?,
                    statement: r.get(2)?,
                    action: r.get(3)?,
                    required: r.get::<_, i64>(4)? as u32,
                    opened_by: r.get(5)?,
                    reason: r.get(6)?,
                    opened_at: r.get(7)?,
                    expires_at: r.get(8)?,
                    state: r.get(9)?,
                })
            },
        )
        .optional()?)
}

/// The quorum a ceremony needs, judged from its class's record (which
/// carries a MAC) rather than from the ceremony's own row (which does not):
/// its statement must be of this class and key, a normal shred needs the
/// deadline passed and the class threshold, an early one the early
/// threshold. A row that asks for less, or a statement of another class or
/// key, was written outside tessera.
fn quorum_of(c: &CeremonyRow, class: &ClassRow, statement: &Statement, t: i64) -> Result<u32> {
    let tampered = |what: &str| {
        Err(Error::Tampered(format!(
            "ceremony {} failed authentication: {what} (it was changed outside tessera); \
             nothing was destroyed. Find out who can write the database file",
            c.id
        )))
    };
    if statement.ceremony != c.id
        || statement.class != c.class
        || statement.key_fingerprint != class.key_fingerprint
        || statement.deadline != class.deadline
        || statement.action.name() != c.action
    {
        return tampered("its statement does not match the ceremony or its class's key");
    }
    let least = match statement.action {
        Action::Shred if t < class.deadline => {
            return tampered("a shred at the deadline, before the deadline");
        }
        Action::Shred => class.threshold,
        Action::ShredEarly => class.early_threshold,
    };
    Ok(c.required.max(u32::from(least)))
}

fn joins(conn: &Connection, id: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT role, signature FROM ceremony_joins WHERE ceremony = ?1 ORDER BY joined_at, role",
    )?;
    let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A ceremony as the API shows it.
pub(crate) fn ceremony_info(conn: &Connection, id: &str) -> Result<proto::CeremonyInfo> {
    let c = load_ceremony(conn, id)?.ok_or_else(|| no_ceremony(id))?;
    Ok(proto::CeremonyInfo {
        joined: joins(conn, id)?.into_iter().map(|(r, _)| r).collect(),
        id: c.id,
        class: c.class,
        statement: c.statement,
        action: c.action,
        required: c.required,
        opened_by: c.opened_by,
        reason: c.reason,
        opened_at: c.opened_at,
        expires_at: c.expires_at,
        state: c.state,
    })
}

fn no_ceremony(id: &str) -> Error {
    Error::NotFound(format!(
        "no shred ceremony {id:?}; `tessera class show CLASS` lists a class's ceremonies"
    ))
}

fn open_ceremony_of(conn: &Connection, class: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT id FROM ceremonies WHERE class = ?1 AND state = 'open'",
            [class],
            |r| r.get(0),
        )
        .optional()?)
}

/// Opens a ceremony inside a write transaction; `Ok(Err(_))` is a refusal
/// (already audited by the caller). Returns the new ceremony's id and
/// action, and the id of an early ceremony it superseded, if any.
#[allow(clippy::too_many_arguments)]
fn open_in_tx(
    conn: &Connection,
    row_key: &SymmetricKey,
    class: &str,
    opened_by: &str,
    reason: &str,
    early: bool,
    expires_secs: u64,
    t: i64,
) -> Result<Result<(String, Action, Option<String>)>> {
    let Some(c) = load_class(conn, class)? else {
        return Ok(Err(no_class(class)));
    };
    if let Err(e) = rowmac::check_class(conn, row_key, class) {
        return Ok(Err(e));
    }
    let standing = standing_holds(conn, class)?;
    let holds = named(&standing);
    let shredded = c.state == class_state::SHREDDED;
    let decided = rules::may_open(
        t,
        c.deadline,
        early,
        shredded,
        &holds,
        c.threshold,
        c.early_threshold,
    );
    let (action, required) = match decided {
        Ok(v) => v,
        Err(OpenRefusal::AlreadyShredded) => return Ok(Err(shredded_error(&c))),
        Err(OpenRefusal::Hold { .. }) => return Ok(Err(held(class, &standing))),
        Err(OpenRefusal::BeforeDeadline { deadline }) => {
            return Ok(Err(Error::FailedPrecondition(format!(
                "class {class} must be kept until {} (another {}); to shred it before then, \
                 open with --early: {} of its {} holders must join",
                rfc3339(deadline),
                humantime::format_duration(std::time::Duration::from_secs((deadline - t) as u64)),
                c.early_threshold,
                c.holders.len()
            ))));
        }
    };
    let mut superseded = None;
    if let Some(id) = open_ceremony_of(conn, class)? {
        if action != Action::Shred || !superseded_at_deadline(conn, &id)? {
            return Ok(Err(Error::AlreadyExists(format!(
                "shred ceremony {id} is already open for class {class}; holders join it with \
                 `tessera shred join {id}`"
            ))));
        }
        conn.execute(
            "UPDATE ceremonies SET state = 'cancelled' WHERE id = ?1",
            [&id],
        )?;
        superseded = Some(id);
    }
    let id = random_id("cer_")?;
    let mut nonce = [0u8; 16];
    fill_random(&mut nonce)?;
    let statement = Statement {
        ceremony: id.clone(),
        class: class.to_string(),
        key_fingerprint: c.key_fingerprint,
        deadline: c.deadline,
        nonce,
        action,
        expires: t.saturating_add(expires_secs as i64),
    };
    conn.execute(
        "INSERT INTO ceremonies (id, class, statement, action, required, opened_by, reason,
            opened_at, expires_at, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'open')",
        params![
            id,
            class,
            statement.to_text(),
            action.name(),
            required as i64,
            opened_by,
            reason,
            t,
            statement.expires
        ],
    )?;
    conn.execute(
        "UPDATE classes SET state = 'shredding' WHERE name = ?1",
        [class],
    )?;
    Ok(Ok((id, action, superseded)))
}

/// The SQL condition on ceremonies `e` that a normal one supersedes once
/// the deadline has passed: an open early shred that needs more holders
/// than the class's threshold and is still short of them (one that reached
/// its quorum is finished, not replaced).
fn superseded_at_deadline_sql() -> String {
    format!(
        "e.state = 'open' AND e.action = '{}'
         AND e.required > (SELECT threshold FROM classes k WHERE k.name = e.class)
         AND e.required > (SELECT count(*) FROM ceremony_joins j WHERE j.ceremony = e.id)",
        Action::ShredEarly.name()
    )
}

/// Whether open ceremony `id` is one a normal ceremony supersedes at the
/// deadline ([`superseded_at_deadline_sql`]).
fn superseded_at_deadline(conn: &Connection, id: &str) -> Result<bool> {
    let n: i64 = conn.query_row(
        &format!(
            "SELECT count(*) FROM ceremonies e WHERE e.id = ?1 AND {}",
            superseded_at_deadline_sql()
        ),
        [id],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

impl Broker {
    /// Opens a shred ceremony for `class` (an admin, or the broker itself at
    /// the deadline).
    pub async fn open_shred(
        &self,
        request_id: &str,
        actor: &str,
        class: String,
        reason: String,
        early: bool,
        expires_secs: u64,
    ) -> Result<proto::CeremonyInfo> {
        let expires_secs = if expires_secs == 0 {
            rules::DEFAULT_EXPIRY_SECS as u64
        } else {
            expires_secs
        };
        if expires_secs > MAX_EXPIRY_SECS {
            let e = Error::invalid("expires", "a ceremony may stay open at most 30 days");
            return Err(self
                .deny(actor.into(), "shred.open", &class, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        let actor = actor.to_string();
        let row_key = Arc::clone(&self.row_key);
        let id = self
            .store
            .write(move |ctx| {
                let t = now();
                let out = open_in_tx(
                    ctx.conn,
                    &row_key,
                    &class,
                    &actor,
                    &reason,
                    early,
                    expires_secs,
                    t,
                )?;
                let why = match &out {
                    Ok((id, action, superseded)) => format!(
                        "ceremony {id} opened{}: {reason}{}",
                        if *action == Action::ShredEarly {
                            " (early)"
                        } else {
                            ""
                        },
                        superseded
                            .as_ref()
                            .map(|old| format!(
                                "; it supersedes early ceremony {old}, cancelled now that the \
                                 deadline has passed (its holders join the new one)"
                            ))
                            .unwrap_or_default()
                    ),
                    Err(e) => e.to_string(),
                };
                ctx.audit(&Entry {
                    time: t,
                    actor,
                    action: "shred.open".into(),
                    target: class,
                    allowed: out.is_ok(),
                    reason: why,
                    request_id: rid,
                })?;
                Ok(out.map(|(id, ..)| id))
            })
            .await??;
        self.store.read(|conn| ceremony_info(conn, &id))
    }

    /// A ceremony and its statement, for a holder about to sign it.
    pub async fn get_ceremony(
        &self,
        request_id: &str,
        holder: &HolderCaller,
        id: &str,
    ) -> Result<proto::CeremonyInfo> {
        let out = self.store.read(|conn| ceremony_info(conn, id));
        self.audit(Entry {
            time: now(),
            actor: holder.actor(),
            action: "shred.show".into(),
            target: id.into(),
            allowed: out.is_ok(),
            reason: match &out {
                Ok(c) => format!("statement of class {} shown", c.class),
                Err(e) => e.to_string(),
            },
            request_id: request_id.into(),
        })
        .await?;
        out
    }

    /// A holder joins a ceremony with a signature over its statement. When
    /// the quorum is reached the class key is destroyed before the reply.
    pub async fn join_shred(
        &self,
        request_id: &str,
        holder: &HolderCaller,
        id: String,
        signature_hex: &str,
    ) -> Result<proto::CeremonyInfo> {
        let Some(signature) = tessera_shred::unhex(signature_hex) else {
            let e = Error::invalid("signature", "the signature is not hex");
            return Err(self
                .deny(holder.actor(), "shred.join", &id, request_id, e)
                .await);
        };
        let rid = request_id.to_string();
        let role = holder.role.clone();
        let actor = holder.actor();
        let cid = id.clone();
        let row_key = Arc::clone(&self.row_key);
        let quorum = self
            .store
            .write(move |ctx| {
                let t = now();
                let out = join_in_tx(ctx.conn, &row_key, &cid, &role, &signature, t)?;
                let why = match &out {
                    Ok((n, req, fresh)) => format!(
                        "role {role} {} ({n} of {req} roles)",
                        if *fresh {
                            "joined"
                        } else {
                            "had already joined"
                        }
                    ),
                    Err(e) => e.to_string(),
                };
                ctx.audit(&Entry {
                    time: t,
                    actor,
                    action: "shred.join".into(),
                    target: cid,
                    allowed: out.is_ok(),
                    reason: why,
                    request_id: rid,
                })?;
                Ok(out.map(|(n, req, _)| n >= req))
            })
            .await??;
        if quorum {
            fault("shred-before-destroy");
            self.destroy(&id, request_id).await?;
        }
        self.store.read(|conn| ceremony_info(conn, &id))
    }

    /// Destroys the class key of a ceremony that has its quorum: one
    /// transaction deletes the wrapped key, the sealed shares and the
    /// envelope data keys and stores the signed certificate; then the store
    /// is compacted. Returns whether it destroyed anything.
    pub(crate) async fn destroy(&self, id: &str, request_id: &str) -> Result<bool> {
        crate::pause("shred-destroy").await;
        let signing_key = zeroize::Zeroizing::new(self.signing_key.to_vec());
        let broker_key = self.signing_public;
        let cid = id.to_string();
        let rid = request_id.to_string();
        let row_key = Arc::clone(&self.row_key);
        // The key in memory goes as the destruction commits, before anyone
        // hears of it.
        let forget = self.class_keys.forget_on_commit();
        let class = self
            .store
            .write_then(
                move |ctx| {
                    let t = now();
                    let Some(c) = load_ceremony(ctx.conn, &cid)? else {
                        return Ok(None);
                    };
                    if c.state != state::OPEN {
                        return Ok(None);
                    }
                    let class =
                        load_class(ctx.conn, &c.class)?.ok_or_else(|| no_class(&c.class))?;
                    // Nothing irreversible on the word of rows edited in
                    // the file: the class (deadline, holders, thresholds,
                    // holds) and holder keys must verify, and the ceremony
                    // row, which carries no MAC, is judged against them.
                    rowmac::check_class(ctx.conn, &row_key, &c.class)?;
                    let statement = Statement::parse(&c.statement)
                        .map_err(|e| Error::Tampered(format!("ceremony {cid}: {e}")))?;
                    let required = quorum_of(&c, &class, &statement, t)?;
                    // The signed expiry, not the row's: consent given to a
                    // ceremony does not outlive it (an expired one is not
                    // revived by editing its row).
                    if t >= statement.expires || !standing_holds(ctx.conn, &c.class)?.is_empty() {
                        return Ok(None);
                    }
                    let mut holders = Vec::new();
                    for role in &class.holders {
                        rowmac::check_holder(ctx.conn, &row_key, role)?;
                        let key: Option<Vec<u8>> = ctx
                            .conn
                            .query_row(
                                "SELECT signing_key FROM holders WHERE role = ?1",
                                [role],
                                |r| r.get(0),
                            )
                            .optional()?;
                        if let Some(k) = key.and_then(|k| <[u8; 32]>::try_from(k).ok()) {
                            holders.push((role.clone(), k));
                        }
                    }
                    // Each join counts only with a signature that verifies
                    // under its role's key (a row inserted in the file does
                    // not).
                    let joined = joins(ctx.conn, &cid)?;
                    let text = statement.to_text();
                    for (role, sig) in &joined {
                        let key = holders.iter().find(|(r, _)| r == role).map(|(_, k)| k);
                        if !key
                            .is_some_and(|k| tessera_shred::holder::verify(k, text.as_bytes(), sig))
                        {
                            return Err(Error::Tampered(format!(
                                "ceremony {cid}: the stored join of role {role} failed \
                                 authentication (its signature does not verify under that role's \
                                 key: it was written outside tessera); nothing was destroyed. \
                                 Find out who can write the database file; then a hold (`tessera \
                                 hold place --class {}`) cancels this ceremony, and once it is \
                                 released a new one can be opened",
                                c.class
                            )));
                        }
                    }
                    if (joined.len() as u32) < required {
                        return Ok(None);
                    }
                    let shares = ctx
                        .conn
                        .execute("DELETE FROM class_shares WHERE class = ?1", [&c.class])?;
                    let data_keys = ctx
                        .conn
                        .execute("DELETE FROM class_data_keys WHERE class = ?1", [&c.class])?;
                    let cert = Certificate {
                        statement,
                        required: required as u8,
                        key_threshold: class.threshold,
                        shares: class.holders.len() as u8,
                        destroyed_at: t,
                        destroyed: format!(
                            "wrapped class key (generation {}), {shares} sealed shares, \
                         {data_keys} envelope data keys",
                            class.generation
                        ),
                        broker_key,
                        holders,
                        joins: joined,
                    };
                    let signed = cert.sign(&signing_key).map_err(|e| {
                        Error::Internal(format!("cannot sign the certificate: {e}"))
                    })?;
                    ctx.conn.execute(
                        "UPDATE classes SET wrapped_key = NULL, state = 'shredded',
                            shredded_at = ?2, certificate = ?3 WHERE name = ?1",
                        params![c.class, t, signed],
                    )?;
                    ctx.conn
                        .execute("UPDATE ceremonies SET state = 'done' WHERE id = ?1", [&cid])?;
                    // Its shares are gone: the record says so from now on.
                    rowmac::seal_class(ctx.conn, &row_key, &c.class)?;
                    meta_set(ctx.conn, "compact_pending", b"1")?;
                    fault("shred-in-destroy");
                    ctx.audit(&Entry {
                        time: t,
                        actor: ACTOR_SYSTEM.into(),
                        action: "shred.destroy".into(),
                        target: c.class.clone(),
                        allowed: true,
                        reason: format!(
                            "ceremony {cid}: {}; certificate {}",
                            cert.destroyed,
                            hex(&certificate::digest(&signed))
                        ),
                        request_id: rid,
                    })?;
                    Ok(Some(c.class))
                },
                forget,
            )
            .await;
        let class = match class {
            // Rolled back: the refusal is audited on its own, once per
            // ceremony (the tick would try again every second).
            Err(e @ Error::Tampered(_)) => {
                let first = self
                    .tampered_logged
                    .lock()
                    .map(|mut seen| seen.insert(format!("destroy:{id}")))
                    .unwrap_or(false);
                return Err(if first {
                    self.deny(ACTOR_SYSTEM.into(), "shred.destroy", id, request_id, e)
                        .await
                } else {
                    e
                });
            }
            other => other?,
        };
        let Some(class) = class else {
            return Ok(false);
        };
        fault("shred-before-compact");
        self.compact_if_pending().await?;
        tracing::info!(class = %class, ceremony = %id, "class key shredded; certificate written");
        Ok(true)
    }

    /// Finishes a compaction flagged by a destruction: checkpoint the WAL
    /// into the database and truncate it, VACUUM (rewriting every page),
    /// then checkpoint and truncate again, so neither file keeps a page of
    /// the destroyed key material.
    pub async fn compact_if_pending(&self) -> Result<()> {
        self.store
            .maintain(|conn| {
                if meta_get(conn, "compact_pending")?.is_none() {
                    return Ok(());
                }
                checkpoint_truncate(conn)?;
                fault("shred-mid-compact");
                conn.execute_batch("VACUUM;")?;
                conn.execute("DELETE FROM meta WHERE key = 'compact_pending'", [])?;
                checkpoint_truncate(conn)?;
                Ok(())
            })
            .await
    }

    /// Periodic retention work: expire stale ceremonies, open ceremonies
    /// for classes past their deadline, complete ceremonies that reached
    /// their quorum before a crash, and finish a pending compaction.
    pub async fn retention_tick(&self) -> Result<()> {
        let (expired, due, ready, tampered) = self.store.read(|conn| {
            let t = now();
            let ids = |sql: &str| -> Result<Vec<String>> {
                let mut stmt = conn.prepare_cached(sql)?;
                let rows = stmt.query_map([t], |r| r.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            };
            let expired =
                ids("SELECT id FROM ceremonies WHERE state = 'open' AND expires_at <= ?1")?;
            // Past the deadline: a class with no ceremony, or with an early
            // one that a normal ceremony supersedes.
            let due = ids(&format!(
                "SELECT name FROM classes c WHERE deadline <= ?1
                 AND (state = 'active'
                      OR (state = 'shredding' AND EXISTS (
                          SELECT 1 FROM ceremonies e WHERE e.class = c.name
                          AND {})))
                 AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.class = c.name
                                 AND h.released_at IS NULL)",
                superseded_at_deadline_sql()
            ))?;
            let ready = ids(
                "SELECT id FROM ceremonies c WHERE state = 'open' AND expires_at > ?1
                 AND required <= (SELECT count(*) FROM ceremony_joins j WHERE j.ceremony = c.id)",
            )?;
            // A class whose record fails its MAC gets no ceremony (one
            // warning in the log, not a refusal audited at every tick).
            let (due, tampered): (Vec<_>, Vec<_>) = due
                .into_iter()
                .partition(|c| rowmac::check_class(conn, &self.row_key, c).is_ok());
            Ok((expired, due, ready, tampered))
        })?;
        for class in tampered {
            self.warn_tampered_once(
                &format!("class:{class}"),
                "its retention deadline passed, but its stored record failed authentication \
                 (changed outside tessera): no shred ceremony is opened for it",
            );
        }
        for id in expired {
            self.expire_ceremony(id).await?;
        }
        for class in due {
            match self
                .open_shred(
                    "retention",
                    ACTOR_SYSTEM,
                    class.clone(),
                    "the retention deadline passed".into(),
                    false,
                    0,
                )
                .await
            {
                Ok(c) => {
                    tracing::info!(class = %class, ceremony = %c.id, "retention deadline passed; shred ceremony opened")
                }
                Err(e) => {
                    tracing::warn!(class = %class, error = %e, "could not open the shred ceremony")
                }
            }
        }
        for id in ready {
            match self.destroy(&id, "retention").await {
                Err(Error::Tampered(m)) => self.warn_tampered_once(&format!("ceremony:{id}"), &m),
                done => {
                    done?;
                }
            }
        }
        self.compact_if_pending().await
    }

    /// Logs `what` once per `key` while the broker runs: a record that
    /// failed its MAC, which the periodic tick would otherwise report again
    /// every time.
    fn warn_tampered_once(&self, key: &str, what: &str) {
        let first = self
            .tampered_logged
            .lock()
            .map(|mut seen| seen.insert(key.to_string()))
            .unwrap_or(false);
        if first {
            tracing::warn!(record = %key, "{what}");
        }
    }

    async fn expire_ceremony(&self, id: String) -> Result<()> {
        self.store
            .write(move |ctx| {
                let t = now();
                let Some(c) = load_ceremony(ctx.conn, &id)? else {
                    return Ok(());
                };
                if c.state != state::OPEN || c.expires_at > t {
                    return Ok(());
                }
                ctx.conn.execute(
                    "UPDATE ceremonies SET state = 'expired' WHERE id = ?1",
                    [&id],
                )?;
                ctx.conn.execute(
                    "UPDATE classes SET state = 'active' WHERE name = ?1 AND state = 'shredding'",
                    [&c.class],
                )?;
                ctx.audit(&Entry {
                    time: t,
                    actor: ACTOR_SYSTEM.into(),
                    action: "shred.expire".into(),
                    target: c.class,
                    allowed: true,
                    reason: format!("ceremony {id} expired before its quorum; nothing destroyed"),
                    request_id: "retention".into(),
                })
            })
            .await
    }

    /// The certificate of a shredded class with its confirmations, and
    /// what it proves.
    pub fn certificate(&self, class: &str) -> Result<proto::CertificateResponse> {
        self.store
            .read(|conn| certificate_in(conn, class, &self.signing_public))
    }

    /// A holder confirms destroying their offline share of a shredded class.
    pub async fn confirm_shred(
        &self,
        request_id: &str,
        holder: &HolderCaller,
        class: String,
        signature_hex: &str,
    ) -> Result<proto::CertificateResponse> {
        let signature = tessera_shred::unhex(signature_hex).unwrap_or_default();
        let rid = request_id.to_string();
        let role = holder.role.clone();
        let actor = holder.actor();
        let target = class.clone();
        let broker_key = self.signing_public;
        let out = self
            .store
            .write(move |ctx| {
                let t = now();
                let out = (|| {
                    let c = load_class(ctx.conn, &class)?.ok_or_else(|| no_class(&class))?;
                    let Some(text) = c.certificate.as_deref() else {
                        return Err(Error::FailedPrecondition(format!(
                            "class {class} is not shredded; there is nothing to confirm yet"
                        )));
                    };
                    if !c.holders.contains(&role) {
                        return Err(Error::PermissionDenied(format!(
                            "role {role} held no share of class {class}"
                        )));
                    }
                    let digest = certificate::digest(signed_part(text));
                    let msg = certificate::confirmation_text(&digest, &role);
                    // Checked against the key the certificate names for the
                    // role (the one that held its share), as every reader
                    // of the certificate checks it: a confirmation by a key
                    // enrolled since would make the certificate fail to
                    // verify for good.
                    let cert =
                        certificate::verify(signed_part(text), Some(&broker_key)).map_err(|e| {
                            Error::Tampered(format!(
                                "the stored certificate of class {class} does not verify: {e}"
                            ))
                        })?;
                    let held_by = cert
                        .certificate
                        .holders
                        .iter()
                        .find(|(r, _)| *r == role)
                        .map(|(_, k)| *k)
                        .ok_or_else(|| {
                            Error::PermissionDenied(format!(
                                "role {role} held no share of class {class}"
                            ))
                        })?;
                    if !tessera_shred::holder::verify(&held_by, msg.as_bytes(), &signature) {
                        return Err(Error::Unauthenticated(format!(
                            "the confirmation does not verify under the key that held role \
                             {role}'s share of class {class} (fingerprint {}); only that \
                             holder can confirm destroying it",
                            tessera_shred::holder::fingerprint(&held_by)
                        )));
                    }
                    ctx.conn.execute(
                        "INSERT OR IGNORE INTO confirmations (class, role, signature, confirmed_at)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![class, role, signature, t],
                    )?;
                    Ok(())
                })();
                let refused = match out {
                    Ok(()) => None,
                    Err(Error::Unavailable(m)) => return Err(Error::Unavailable(m)),
                    Err(e) => Some(e),
                };
                ctx.audit(&Entry {
                    time: t,
                    actor,
                    action: "shred.confirm".into(),
                    target: class,
                    allowed: refused.is_none(),
                    reason: refused.as_ref().map_or_else(
                        || format!("role {role} confirmed its offline share destroyed"),
                        ToString::to_string,
                    ),
                    request_id: rid,
                })?;
                Ok(refused)
            })
            .await?;
        if let Some(e) = out {
            return Err(e);
        }
        self.certificate(&target)
    }
}

/// Judges a join inside the writer's transaction. Returns (roles joined,
/// roles required, whether this join was new) or the refusal.
/// The refusal for a class under the standing `holds`, naming each and
/// how to release them.
fn held(class: &str, holds: &[(i64, String)]) -> Error {
    let (which, what) = match holds.len() {
        1 => ("", "legal hold"),
        _ => (" --hold ID", "legal holds"),
    };
    Error::FailedPrecondition(format!(
        "class {class} is under {what} ({}); nothing can be shredded until `tessera hold \
         release --class {class}{which} --reason …`",
        named(holds).join("; ")
    ))
}

/// `hold ID: REASON` for each hold.
fn named(holds: &[(i64, String)]) -> Vec<String> {
    holds
        .iter()
        .map(|(id, r)| format!("hold {id}: {r}"))
        .collect()
}

fn join_in_tx(
    conn: &Connection,
    row_key: &SymmetricKey,
    id: &str,
    role: &str,
    signature: &[u8],
    t: i64,
) -> Result<Result<(u32, u32, bool)>> {
    let Some(c) = load_ceremony(conn, id)? else {
        return Ok(Err(no_ceremony(id)));
    };
    let refusal = match c.state.as_str() {
        state::OPEN if t >= c.expires_at => Some(format!(
            "shred ceremony {id} expired at {}; an admin must open a new one",
            rfc3339(c.expires_at)
        )),
        state::OPEN => None,
        state::EXPIRED => Some(format!(
            "shred ceremony {id} expired at {}; an admin must open a new one",
            rfc3339(c.expires_at)
        )),
        state::CANCELLED => Some(match open_ceremony_of(conn, &c.class)? {
            Some(open) => format!(
                "shred ceremony {id} was cancelled; ceremony {open} is open for class {} \
                 now: join that one (`tessera shred join {open}`)",
                c.class
            ),
            None => format!(
                "shred ceremony {id} was cancelled (a legal hold on class {}, or a re-key \
                 after a change of holder); `tessera class show {}` tells which",
                c.class, c.class
            ),
        }),
        _ => Some(format!("shred ceremony {id} is already complete")),
    };
    if let Some(m) = refusal {
        return Ok(Err(Error::FailedPrecondition(m)));
    }
    let class = load_class(conn, &c.class)?.ok_or_else(|| no_class(&c.class))?;
    if let Err(e) = rowmac::check_class(conn, row_key, &c.class) {
        return Ok(Err(e));
    }
    if !class.holders.iter().any(|h| h == role) {
        return Ok(Err(Error::PermissionDenied(format!(
            "role {role} holds no share of class {} (its holders are {}), so it cannot join",
            c.class,
            class.holders.join(", ")
        ))));
    }
    let holds = standing_holds(conn, &c.class)?;
    if !holds.is_empty() {
        return Ok(Err(held(&c.class, &holds)));
    }
    let statement = Statement::parse(&c.statement)
        .map_err(|e| Error::Tampered(format!("ceremony {id}: {e}")))?;
    let key = match judge_role_signature(
        conn,
        row_key,
        role,
        statement.to_text().as_bytes(),
        signature,
        "join signature over this ceremony's statement",
    ) {
        Ok(k) => k,
        Err(e) => return Ok(Err(e)),
    };
    if rules::judge_join(&statement, t, &key, signature).is_err() {
        return Ok(Err(Error::FailedPrecondition(format!(
            "shred ceremony {id} expired at {}",
            rfc3339(c.expires_at)
        ))));
    }
    let fresh = conn.execute(
        "INSERT OR IGNORE INTO ceremony_joins (ceremony, role, signature, joined_at)
         VALUES (?1, ?2, ?3, ?4)",
        params![id, role, signature, t],
    )? == 1;
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM ceremony_joins WHERE ceremony = ?1",
        [id],
        |r| r.get(0),
    )?;
    Ok(Ok((n as u32, c.required, fresh)))
}

fn certificate_in(
    conn: &Connection,
    class: &str,
    broker_key: &[u8; 32],
) -> Result<proto::CertificateResponse> {
    let c = load_class(conn, class)?.ok_or_else(|| no_class(class))?;
    let Some(signed) = c.certificate else {
        return Err(Error::FailedPrecondition(format!(
            "class {class} is {} and has no destruction certificate",
            c.state
        )));
    };
    let mut text = signed.clone();
    let mut stmt = conn.prepare_cached(
        "SELECT role, signature FROM confirmations WHERE class = ?1 ORDER BY confirmed_at, role",
    )?;
    let rows = stmt.query_map([class], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    for row in rows {
        let (role, sig) = row?;
        text.push_str(&format!("confirm: {role} {}\n", hex(&sig)));
    }
    let v = certificate::verify(&text, Some(broker_key)).map_err(|e| {
        Error::Tampered(format!(
            "the stored certificate of class {class} does not verify: {e}"
        ))
    })?;
    Ok(proto::CertificateResponse {
        certificate: text,
        outstanding: v.outstanding() as u32,
        irrecoverable: v.irrecoverable(),
        broker_key: hex(broker_key),
    })
}

/// `wal_checkpoint(TRUNCATE)`, retried while readers hold old snapshots.
fn checkpoint_truncate(conn: &Connection) -> Result<()> {
    for _ in 0..100 {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(Error::Unavailable(
        "the WAL could not be checkpointed (readers kept it busy); compaction will be retried"
            .into(),
    ))
}
