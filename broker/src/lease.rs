//! Leases: a time-boxed grant of one secret version to one agent. Issue,
//! renew and revoke are durable (with their audit record) before the reply;
//! expiry is an indexed range scan in bounded batches, so nothing holds all
//! leases in memory.

use std::sync::Arc;

use rusqlite::{OptionalExtension, params};

use crate::agent::{Agent, admin_entry};
use crate::audit::{ACTOR_ADMIN, ACTOR_SYSTEM, Entry};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::init::now;
use crate::keys::lease_id;
use crate::names;
use crate::proto::{Lease, LeaseInfo};
use crate::store::{NewEvent, WriteCtx, lease_state};

/// Leases expired per sweep transaction.
pub const SWEEP_BATCH: usize = 1000;
/// Most leases returned by one list call.
pub const LIST_MAX: u32 = 10_000;

/// Which leases an admin revokes.
#[derive(Debug, Clone)]
pub enum Selector {
    /// One lease.
    Id(String),
    /// Every active lease of an agent.
    Agent(String),
    /// Every active lease on a secret.
    Secret(String),
    /// Every active lease.
    All,
}

pub(crate) fn agent_entry(
    agent: &Agent,
    action: &str,
    target: &str,
    allowed: bool,
    reason: String,
    rid: &str,
) -> Entry {
    Entry {
        time: now(),
        actor: agent.actor(),
        action: action.into(),
        target: target.into(),
        allowed,
        reason,
        request_id: rid.into(),
    }
}

impl Broker {
    /// Issues a lease on the current version of `secret` to `agent`.
    /// `ttl` 0 means the agent's maximum; longer requests are capped.
    pub async fn issue(
        &self,
        request_id: &str,
        agent: &Arc<Agent>,
        secret: String,
        ttl: u64,
    ) -> Result<Lease> {
        const ACTION: &str = "lease.issue";
        let rule = names::secret(&secret, "secret").and_then(|()| {
            agent.rule_for(&secret).map(str::to_owned).ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "agent {:?} may not read {secret:?}: it matches none of the agent's allow \
                     rules ({}); ask an admin to extend them",
                    agent.name,
                    agent.rules_text()
                ))
            })
        });
        let rule = match rule {
            Ok(rule) => rule,
            Err(e) => {
                return Err(self
                    .deny(agent.actor(), ACTION, &secret, request_id, e)
                    .await);
            }
        };
        let ttl = if ttl == 0 {
            agent.max_ttl
        } else {
            ttl.min(agent.max_ttl)
        };
        // A version that stopped being current after it was read (from the
        // cache, or before another process rotated the secret) is read
        // again once; the second time it is taken: the rotation raced this
        // very request, and the version stays valid for its overlap.
        let mut last_try = false;
        loop {
            let mut current = match self.read_current(&secret) {
                Ok(c) => c,
                Err(e) => {
                    return Err(self
                        .deny(agent.actor(), ACTION, &secret, request_id, e)
                        .await);
                }
            };
            let wanted = Wanted {
                secret: &secret,
                rule: &rule,
                ttl,
                version: current.version,
                read_from: std::mem::take(&mut current.ciphertext),
            };
            match self
                .write_lease(request_id, agent, wanted, last_try)
                .await?
            {
                Issued::Lease {
                    lease_id,
                    issued_at,
                    expires_at,
                    renewable_until,
                } => {
                    return Ok(Lease {
                        lease_id,
                        secret,
                        version: current.version,
                        value: current.value.to_vec(),
                        issued_at,
                        expires_at,
                        renewable_until,
                    });
                }
                Issued::Reread => {
                    self.current_rows.forget(&secret);
                    last_try = true;
                }
                Issued::Refused(e) => {
                    self.forget_agent_refused(agent.id, &e);
                    return Err(e);
                }
            }
        }
    }

    /// Stores a lease and its audit record, re-checking in the transaction
    /// what was read before it: the agent's revocation and the version.
    /// Unless `last_try`, a version that is no longer current writes
    /// nothing and comes back `Reread`: the row may have come from a cache
    /// that another process's rotation left behind (and that this broker
    /// has retired since). On the last try a superseded version, still in
    /// its overlap, is issued, and a retired or deleted one refused.
    async fn write_lease(
        &self,
        request_id: &str,
        agent: &Arc<Agent>,
        wanted: Wanted<'_>,
        last_try: bool,
    ) -> Result<Issued> {
        const ACTION: &str = "lease.issue";
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let lease_id = lease_id(now_ms)?;
        let agent_id = agent.id;
        let actor = Arc::clone(agent);
        let rid = request_id.to_string();
        let name = wanted.secret.to_string();
        let rule = wanted.rule.to_string();
        let (ttl, version, ciphertext) = (wanted.ttl, wanted.version, wanted.read_from);
        let cap = self.limits.max_leases_per_agent;
        self.store
            .write_unguarded(move |ctx| {
                let t = now();
                // The token check above may have used the cache: re-check
                // in the transaction so a concurrent revoke always wins.
                let refused = actor.refused_in(ctx.conn, t)?;
                // The value was read before this transaction: a delete that
                // committed since (and revoked the secret's leases) wins.
                let refused = match refused {
                    Some(e) => Some(e),
                    None => match check_version(ctx.conn, &name, version, &ciphertext)? {
                        VersionCheck::Current => None,
                        _ if !last_try => return Ok(Issued::Reread),
                        VersionCheck::Superseded => None,
                        VersionCheck::Gone(e) => Some(e),
                    },
                };
                let refused = match refused {
                    Some(e) => Some(e),
                    None => {
                        let conn = ctx.conn;
                        ctx.held().refusal(conn, &actor, cap, t)?
                    }
                };
                if let Some(e) = refused {
                    ctx.audit(&agent_entry(
                        &actor,
                        ACTION,
                        &name,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    return Ok(Issued::Refused(e));
                }
                let renewable_until = actor.lease_limit(t);
                let expires_at = (t + ttl as i64).min(renewable_until);
                ctx.conn
                    .prepare_cached(
                        "INSERT INTO leases (id, agent_id, secret, version, issued_at, expires_at,
                                             renewable_until)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?
                    .execute(params![
                        lease_id,
                        agent_id,
                        name,
                        version as i64,
                        t,
                        expires_at,
                        renewable_until
                    ])?;
                ctx.held().issued(agent_id);
                ctx.audit(&agent_entry(
                    &actor,
                    ACTION,
                    &name,
                    true,
                    format!(
                        "lease {lease_id} on version {version} for {}s (rule {rule})",
                        expires_at - t
                    ),
                    &rid,
                ))?;
                Ok(Issued::Lease {
                    lease_id,
                    issued_at: t,
                    expires_at,
                    renewable_until,
                })
            })
            .await
    }

    /// Extends one of `agent`'s leases by `ttl` from now (0 = the agent's
    /// maximum), never past its `renewable_until`.
    pub async fn renew(
        &self,
        request_id: &str,
        agent: &Arc<Agent>,
        lease_id: String,
        ttl: u64,
    ) -> Result<Lease> {
        const ACTION: &str = "lease.renew";
        if let Err(e) = names::lease_id(&lease_id, "lease_id") {
            return Err(self
                .deny(agent.actor(), ACTION, &lease_id, request_id, e)
                .await);
        }
        let ttl = if ttl == 0 {
            agent.max_ttl
        } else {
            ttl.min(agent.max_ttl)
        };
        let actor = Arc::clone(agent);
        let rid = request_id.to_string();
        let renewed = self
            .store
            .write_unguarded(move |ctx| {
                let t = now();
                // As for `Issue`: the agent may have been authenticated from
                // the cache, so its row is checked in the transaction (an
                // edit outside tessera must not keep its old limits).
                let outcome = match actor.refused_in(ctx.conn, t)? {
                    Some(e) => Err(e),
                    None => renewable(own_lease(ctx.conn, &lease_id, actor.id)?, &lease_id, t),
                };
                let mut l = match outcome {
                    Ok(l) => l,
                    Err(e) => {
                        ctx.audit(&agent_entry(
                            &actor,
                            ACTION,
                            &lease_id,
                            false,
                            e.to_string(),
                            &rid,
                        ))?;
                        return Ok(Err(e));
                    }
                };
                l.expires_at = (t + ttl as i64).min(l.renewable_until);
                ctx.conn.execute(
                    "UPDATE leases SET expires_at = ?1, warned = 0 WHERE id = ?2",
                    params![l.expires_at, lease_id],
                )?;
                ctx.audit(&agent_entry(
                    &actor,
                    ACTION,
                    &lease_id,
                    true,
                    format!("extended to {}s from now", l.expires_at - t),
                    &rid,
                ))?;
                Ok(Ok(Lease {
                    lease_id,
                    secret: l.secret,
                    version: l.version,
                    value: Vec::new(),
                    issued_at: l.issued_at,
                    expires_at: l.expires_at,
                    renewable_until: l.renewable_until,
                }))
            })
            .await?;
        renewed.inspect_err(|e| self.forget_agent_refused(agent.id, e))
    }

    /// Ends one of `agent`'s own leases now. Revoking an already ended
    /// lease is not an error (returns 0).
    pub async fn revoke_own(
        &self,
        request_id: &str,
        agent: &Arc<Agent>,
        lease_id: String,
    ) -> Result<u64> {
        const ACTION: &str = "lease.revoke";
        if let Err(e) = names::lease_id(&lease_id, "lease_id") {
            return Err(self
                .deny(agent.actor(), ACTION, &lease_id, request_id, e)
                .await);
        }
        let actor = Arc::clone(agent);
        let rid = request_id.to_string();
        self.store
            .write_unguarded(move |ctx| {
                let t = now();
                if own_lease(ctx.conn, &lease_id, actor.id)?.is_none() {
                    let e = not_found(&lease_id);
                    ctx.audit(&agent_entry(
                        &actor,
                        ACTION,
                        &lease_id,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    return Ok(Err(e));
                }
                let n = revoke_active(ctx, Scope::Id(&lease_id), t)?;
                ctx.audit(&agent_entry(
                    &actor,
                    ACTION,
                    &lease_id,
                    true,
                    format!("{n} revoked"),
                    &rid,
                ))?;
                Ok(Ok(n))
            })
            .await?
    }

    /// Lists leases, newest first within the filter, paged by lease id.
    pub async fn list_leases(
        &self,
        request_id: &str,
        agent: &str,
        secret: &str,
        all: bool,
        limit: u32,
        after: &str,
    ) -> Result<Vec<LeaseInfo>> {
        let checked = if agent.is_empty() {
            Ok(())
        } else {
            names::agent(agent, "agent")
        }
        .and_then(|()| {
            if secret.is_empty() {
                Ok(())
            } else {
                names::secret(secret, "secret")
            }
        });
        // A mistyped agent name is not "no leases".
        let checked = checked.and_then(|()| {
            let known = agent.is_empty()
                || self.store.read(|conn| {
                    Ok(conn.query_row(
                        "SELECT EXISTS (SELECT 1 FROM agents WHERE name = ?1)",
                        [agent],
                        |r| r.get::<_, bool>(0),
                    )?)
                })?;
            if known {
                Ok(())
            } else {
                Err(Error::NotFound(format!(
                    "no agent named {agent:?}; `tessera agent list` shows them"
                )))
            }
        });
        if let Err(e) = checked {
            return Err(self
                .deny(ACTOR_ADMIN.into(), "lease.list", "*", request_id, e)
                .await);
        }
        let limit = if limit == 0 {
            1000
        } else {
            limit.min(LIST_MAX)
        };
        // A lease past its expiry is expired, swept or not.
        let t = now();
        let out = self.store.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT l.id, a.name, l.secret, l.version, l.issued_at, l.expires_at,
                        l.renewable_until, l.state
                 FROM leases l JOIN agents a ON a.id = l.agent_id
                 WHERE (?1 = '' OR a.name = ?1) AND (?2 = '' OR l.secret = ?2)
                   AND (?3 OR (l.state = 0 AND l.expires_at > ?6)) AND l.id > ?4
                 ORDER BY l.id LIMIT ?5",
            )?;
            let rows = stmt.query_map(params![agent, secret, all, after, limit, t], |r| {
                let expires_at: i64 = r.get(5)?;
                let state = match r.get(7)? {
                    lease_state::ACTIVE if expires_at <= t => lease_state::EXPIRED,
                    s => s,
                };
                Ok(LeaseInfo {
                    lease_id: r.get(0)?,
                    agent: r.get(1)?,
                    secret: r.get(2)?,
                    version: r.get::<_, i64>(3)? as u64,
                    issued_at: r.get(4)?,
                    expires_at: r.get(5)?,
                    renewable_until: r.get(6)?,
                    state: lease_state::name(state).into(),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        self.audit(admin_entry(
            "lease.list",
            "*",
            true,
            format!("{} leases listed", out.len()),
            request_id,
        ))
        .await?;
        Ok(out)
    }

    /// Revokes the selected active leases in one transaction.
    pub async fn revoke_leases(&self, request_id: &str, sel: Selector) -> Result<u64> {
        const ACTION: &str = "lease.revoke";
        let checked = match &sel {
            Selector::Agent(name) => names::agent(name, "agent").map_err(|e| (name, e)),
            Selector::Secret(name) => names::secret(name, "secret").map_err(|e| (name, e)),
            Selector::Id(id) => names::lease_id(id, "lease_id").map_err(|e| (id, e)),
            Selector::All => Ok(()),
        };
        if let Err((target, e)) = checked {
            return Err(self
                .deny(ACTOR_ADMIN.into(), ACTION, target, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        self.store
            .write(move |ctx| {
                let t = now();
                let (target, scope) = match &sel {
                    Selector::Id(id) => {
                        let exists: Option<i64> = ctx
                            .conn
                            .query_row("SELECT 1 FROM leases WHERE id = ?1", [id], |r| r.get(0))
                            .optional()?;
                        if exists.is_none() {
                            let e = not_found(id);
                            ctx.audit(&admin_entry(ACTION, id, false, e.to_string(), &rid))?;
                            return Ok(Err(e));
                        }
                        (id.clone(), Scope::Id(id))
                    }
                    Selector::Agent(name) => {
                        let id: Option<i64> = ctx
                            .conn
                            .query_row("SELECT id FROM agents WHERE name = ?1", [name], |r| {
                                r.get(0)
                            })
                            .optional()?;
                        let Some(id) = id else {
                            let e = Error::NotFound(format!(
                                "no agent named {name:?}; `tessera agent list` shows them"
                            ));
                            ctx.audit(&admin_entry(ACTION, name, false, e.to_string(), &rid))?;
                            return Ok(Err(e));
                        };
                        (format!("agent:{name}"), Scope::Agent(id))
                    }
                    Selector::Secret(name) => {
                        // A deleted secret's leases were revoked with it, so
                        // a name with neither a secret nor an active lease is
                        // most likely mistyped.
                        let known: bool = ctx.conn.query_row(
                            "SELECT EXISTS (SELECT 1 FROM secrets WHERE name = ?1)
                                 OR EXISTS (SELECT 1 FROM leases WHERE secret = ?1 AND state = 0)",
                            [name],
                            |r| r.get(0),
                        )?;
                        if !known {
                            let e = Error::NotFound(format!(
                                "no secret named {name:?} and no active lease on it; \
                                 `tessera secret list` shows the secrets"
                            ));
                            ctx.audit(&admin_entry(ACTION, name, false, e.to_string(), &rid))?;
                            return Ok(Err(e));
                        }
                        (format!("secret:{name}"), Scope::Secret(name))
                    }
                    Selector::All => ("*".to_string(), Scope::All),
                };
                let n = revoke_active(ctx, scope, t)?;
                ctx.audit(&admin_entry(
                    ACTION,
                    &target,
                    true,
                    format!("{n} leases revoked"),
                    &rid,
                ))?;
                Ok(Ok(n))
            })
            .await?
    }

    /// Marks leases past `expires_at` as expired, at most `SWEEP_BATCH` per
    /// transaction, until none are left. Returns how many were expired.
    pub async fn sweep_expired(&self) -> Result<u64> {
        self.in_batches(
            "lease.expire",
            |ctx, t| {
                let conn = ctx.conn;
                let mut stmt = conn.prepare_cached(SWEEP_SQL)?;
                let ended = stmt
                    .query_map(params![lease_state::EXPIRED, t, SWEEP_BATCH as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                    })?;
                let mut n = 0;
                for row in ended {
                    let (agent, expires_at) = row?;
                    ctx.held().expired(agent, expires_at);
                    n += 1;
                }
                Ok(n)
            },
            |n| format!("{n} leases passed their expiry"),
        )
        .await
    }

    /// Deletes leases that ended (expired or revoked) more than `history`
    /// ago, at most `SWEEP_BATCH` per transaction; their audit records
    /// stay. Returns how many were deleted.
    pub async fn purge_ended(&self, history: std::time::Duration) -> Result<u64> {
        let keep = i64::try_from(history.as_secs()).unwrap_or(i64::MAX);
        self.in_batches(
            "lease.purge",
            move |ctx, t| {
                Ok(ctx
                    .conn
                    .prepare_cached(PURGE_SQL)?
                    .execute(params![t.saturating_sub(keep), SWEEP_BATCH as i64])?)
            },
            move |n| {
                format!(
                    "{n} leases that ended over {}s ago deleted (their audit records stay)",
                    history.as_secs()
                )
            },
        )
        .await
    }

    /// Deletes `Watch` events (rotations, revocations, expiry warnings: one
    /// per lease) older than `history`, oldest first, at most `SWEEP_BATCH`
    /// per transaction. A watcher away for longer resumes from the oldest
    /// event kept. Returns how many were deleted.
    pub async fn purge_events(&self, history: std::time::Duration) -> Result<u64> {
        let keep = i64::try_from(history.as_secs()).unwrap_or(i64::MAX);
        self.in_batches(
            "event.purge",
            move |ctx, t| {
                Ok(ctx
                    .conn
                    .prepare_cached(PURGE_EVENTS_SQL)?
                    .execute(params![t.saturating_sub(keep), SWEEP_BATCH as i64])?)
            },
            move |n| format!("{n} watch events older than {}s deleted", history.as_secs()),
        )
        .await
    }

    /// Runs `batch` (given the time; changes at most `SWEEP_BATCH` rows and
    /// says how many) in one transaction after another until one comes up
    /// short, recording each batch that changed something as a system audit
    /// record `action` with `reason(n)`. Returns the total.
    async fn in_batches(
        &self,
        action: &'static str,
        batch: impl Fn(&mut WriteCtx<'_>, i64) -> Result<usize> + Copy + Send + 'static,
        reason: impl Fn(usize) -> String + Copy + Send + 'static,
    ) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self
                .store
                .write(move |ctx| {
                    let t = now();
                    let n = batch(ctx, t)?;
                    if n > 0 {
                        ctx.audit(&Entry {
                            time: t,
                            actor: ACTOR_SYSTEM.into(),
                            action: action.into(),
                            target: "*".into(),
                            allowed: true,
                            reason: reason(n),
                            request_id: String::new(),
                        })?;
                    }
                    Ok(n as u64)
                })
                .await?;
            total += n;
            if n < SWEEP_BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

/// What the writer knows of how many unexpired leases each agent holds, so
/// that the cap on them (`Limits::max_leases_per_agent`) costs no count per
/// `Issue`. Lives on the writer thread and changes only in write
/// transactions.
///
/// For each agent that asked since the broker started: how many unexpired
/// leases it held when they were last counted (`since`), plus those issued
/// since, less those the sweep expired since. That is exact but for the
/// leases that passed their expiry since `since` and are not swept yet;
/// at the cap, those are counted (a short range of the index on the
/// agent's active leases by expiry) and taken off. A revoke of the agent's
/// leases, another process's commit or a rollback makes the figure only an
/// upper bound (`stale`): at the cap it is counted again in full. And once
/// a count finds the agent at the cap, it stays refused without counting
/// until its first lease's expiry (`full_until`), unless a revoke comes
/// first.
#[derive(Debug, Default)]
pub(crate) struct Held {
    agents: std::collections::HashMap<i64, HeldCount>,
}

#[derive(Debug)]
struct HeldCount {
    held: u64,
    since: i64,
    stale: bool,
    full_until: Option<i64>,
}

impl Held {
    /// Why `agent` may not take another lease at `t` with at most `cap`, if
    /// it may not.
    fn refusal(
        &mut self,
        conn: &rusqlite::Connection,
        agent: &Agent,
        cap: u64,
        t: i64,
    ) -> Result<Option<Error>> {
        let count = |from: i64, to: i64| -> Result<u64> {
            let n: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM leases
                     WHERE agent_id = ?1 AND state = 0 AND expires_at > ?2 AND expires_at <= ?3",
                )?
                .query_row(params![agent.id, from, to], |r| r.get(0))?;
            Ok(n as u64)
        };
        let c = match self.agents.entry(agent.id) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(HeldCount {
                held: count(t, i64::MAX)?,
                since: t,
                stale: false,
                full_until: None,
            }),
        };
        if c.held < cap {
            return Ok(None);
        }
        if c.full_until.is_some_and(|until| t < until) {
            return Ok(Some(c.refusal(agent, cap, t)));
        }
        if c.stale {
            c.held = count(t, i64::MAX)?;
            c.stale = false;
        } else {
            c.held = c.held.saturating_sub(count(c.since, t)?);
        }
        c.since = t;
        if c.held < cap {
            c.full_until = None;
            return Ok(None);
        }
        let first_end: Option<i64> = conn
            .prepare_cached(
                "SELECT min(expires_at) FROM leases
                 WHERE agent_id = ?1 AND state = 0 AND expires_at > ?2",
            )?
            .query_row(params![agent.id, t], |r| r.get(0))?;
        c.full_until = first_end;
        Ok(Some(c.refusal(agent, cap, t)))
    }

    /// Counts a lease just issued to `agent`.
    fn issued(&mut self, agent: i64) {
        if let Some(c) = self.agents.get_mut(&agent) {
            c.held += 1;
        }
    }

    /// The sweep marked `agent`'s lease expired (it ended at `expires_at`).
    fn expired(&mut self, agent: i64, expires_at: i64) {
        if let Some(c) = self.agents.get_mut(&agent) {
            // Ended before the last count: not in `held`.
            if expires_at > c.since {
                c.held = c.held.saturating_sub(1);
            }
        }
    }

    /// Leases were revoked: of `agent`, or of anyone (`None`); or something
    /// else may have changed them (another process, a rollback).
    pub(crate) fn revoked(&mut self, agent: Option<i64>) {
        let lift = |c: &mut HeldCount| {
            c.stale = true;
            c.full_until = None;
        };
        match agent {
            Some(id) => self.agents.get_mut(&id).into_iter().for_each(lift),
            None => self.agents.values_mut().for_each(lift),
        }
    }
}

impl HeldCount {
    fn refusal(&self, agent: &Agent, cap: u64, t: i64) -> Error {
        Error::ResourceExhausted(format!(
            "agent {:?} holds {} unexpired leases, and one agent may hold {cap} at most (serve \
             --max-leases-per-agent); the first of them ends in {}s: revoke those it no longer \
             needs, or ask an admin to raise the limit",
            agent.name,
            self.held,
            self.full_until.map_or(1, |u| (u - t).max(1))
        ))
    }
}

/// Which active leases a revoke ends.
pub(crate) enum Scope<'a> {
    /// One lease.
    Id(&'a str),
    /// Every active lease of the agent with this row id.
    Agent(i64),
    /// Every active lease on this secret.
    Secret(&'a str),
    /// Every active lease on one version of a secret (it was retired).
    Version(&'a str, u64),
    /// Every active lease.
    All,
}

/// Expires the next `?3` active leases past their expiry (`?2`, now),
/// found through the partial index on active leases' expiry: the sweep
/// never reads the whole table.
const SWEEP_SQL: &str = "UPDATE leases SET state = ?1, ended_at = ?2 WHERE id IN (
    SELECT id FROM leases WHERE state = 0 AND expires_at <= ?2 ORDER BY expires_at LIMIT ?3)
    RETURNING agent_id, expires_at";
/// Deletes the next `?2` ended leases (expired or revoked) that ended before
/// `?1`, oldest first, through the partial index on ended leases.
const PURGE_SQL: &str = "DELETE FROM leases WHERE id IN (
    SELECT id FROM leases WHERE state != 0 AND ended_at < ?1 ORDER BY ended_at LIMIT ?2)";
/// Deletes those of the `?2` oldest events (by id, which grows with time)
/// that are older than `?1`: no index on time is needed, and a batch with
/// fewer deletions than `?2` ends the purge.
const PURGE_EVENTS_SQL: &str = "DELETE FROM events WHERE id IN (
    SELECT id FROM events ORDER BY id LIMIT ?2) AND time < ?1";
/// Revokes an agent's active leases (through `leases_active_agent`).
const REVOKE_AGENT_SQL: &str =
    "UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 0 AND agent_id = ?3";
/// Revokes a secret's active leases (through `leases_active_secret`).
const REVOKE_SECRET_SQL: &str =
    "UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 0 AND secret = ?3";
/// Revokes the active leases on one version (through `leases_active_secret`).
const REVOKE_VERSION_SQL: &str = "UPDATE leases SET state = ?1, ended_at = ?2
     WHERE state = 0 AND secret = ?3 AND version = ?4";

/// Marks the active leases in `scope` revoked at `t`, in the caller's
/// transaction, and records one `lease.revoked` event for watchers;
/// returns how many. The one place a revoke is written.
pub(crate) fn revoke_active(ctx: &mut WriteCtx<'_>, scope: Scope<'_>, t: i64) -> Result<u64> {
    let r = lease_state::REVOKED;
    let conn = ctx.conn;
    let (n, ev) = match scope {
        Scope::Id(id) => {
            // One statement: revoke, and learn whose lease it was for the event.
            let owner: Option<(i64, String)> = conn
                .prepare_cached(
                    "UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 0 AND id = ?3
                     RETURNING agent_id, secret",
                )?
                .query_row(params![r, t, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let n = usize::from(owner.is_some());
            let (agent, secret) = owner.unzip();
            (n, (agent, secret.unwrap_or_default(), 0, id.to_string()))
        }
        Scope::Agent(id) => (
            conn.prepare_cached(REVOKE_AGENT_SQL)?
                .execute(params![r, t, id])?,
            (Some(id), String::new(), 0, String::new()),
        ),
        Scope::Secret(name) => (
            conn.prepare_cached(REVOKE_SECRET_SQL)?
                .execute(params![r, t, name])?,
            (None, name.to_string(), 0, String::new()),
        ),
        Scope::Version(name, version) => (
            conn.prepare_cached(REVOKE_VERSION_SQL)?.execute(params![
                r,
                t,
                name,
                version as i64
            ])?,
            (None, name.to_string(), version, String::new()),
        ),
        Scope::All => (
            conn.prepare_cached("UPDATE leases SET state = ?1, ended_at = ?2 WHERE state = 0")?
                .execute(params![r, t])?,
            (None, String::new(), 0, String::new()),
        ),
    };
    if n > 0 {
        let (agent_id, secret, version, lease_id) = ev;
        ctx.held().revoked(agent_id);
        let detail = format!("{n} lease(s) revoked");
        ctx.event(&NewEvent {
            time: t,
            kind: "lease.revoked",
            secret: &secret,
            version,
            lease_id: &lease_id,
            agent_id,
            expires_at: 0,
            detail: &detail,
        })?;
    }
    Ok(n as u64)
}

struct LeaseRow {
    secret: String,
    version: u64,
    issued_at: i64,
    expires_at: i64,
    renewable_until: i64,
    state: i64,
}
/// The lease `row` (of the agent renewing it) if it can still be renewed
/// at `t`, else why not.
fn renewable(row: Option<LeaseRow>, lease_id: &str, t: i64) -> Result<LeaseRow> {
    match row {
        None => Err(not_found(lease_id)),
        Some(l) if l.state == lease_state::REVOKED => Err(Error::FailedPrecondition(format!(
            "lease {lease_id} was revoked and cannot be renewed; issue a new lease"
        ))),
        Some(l) if l.state == lease_state::EXPIRED || l.expires_at <= t => {
            Err(Error::FailedPrecondition(format!(
                "lease {lease_id} expired and cannot be renewed; issue a new lease"
            )))
        }
        Some(l) if l.renewable_until <= t => Err(Error::FailedPrecondition(format!(
            "lease {lease_id} reached its maximum lifetime; issue a new lease"
        ))),
        Some(l) => Ok(l),
    }
}

fn own_lease(conn: &rusqlite::Connection, id: &str, agent_id: i64) -> Result<Option<LeaseRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT secret, version, issued_at, expires_at, renewable_until, state
             FROM leases WHERE id = ?1 AND agent_id = ?2",
        )?
        .query_row(params![id, agent_id], |r| {
            Ok(LeaseRow {
                secret: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                issued_at: r.get(2)?,
                expires_at: r.get(3)?,
                renewable_until: r.get(4)?,
                state: r.get(5)?,
            })
        })
        .optional()?)
}

fn not_found(lease_id: &str) -> Error {
    Error::NotFound(format!(
        "no lease {lease_id:?} held by this caller; `tessera lease list` shows active leases"
    ))
}

/// The lease an `Issue` asks the writer to store.
struct Wanted<'a> {
    secret: &'a str,
    /// The allow rule that let the agent ask.
    rule: &'a str,
    ttl: u64,
    version: u64,
    /// The ciphertext of the row the value came from.
    read_from: Vec<u8>,
}

/// What a write found of the version an `Issue` read before it.
#[derive(Debug)]
enum VersionCheck {
    /// Still the current version.
    Current,
    /// Replaced by a newer one, in its overlap: still valid.
    Superseded,
    /// Retired or deleted since: refused.
    Gone(Error),
}

/// What an `Issue`'s write did.
enum Issued {
    /// Stored.
    Lease {
        lease_id: String,
        issued_at: i64,
        expires_at: i64,
        renewable_until: i64,
    },
    /// Nothing written: the version read is no longer the current one
    /// (from a stale cache, or replaced since); read it again.
    Reread,
    /// Refused (and audited).
    Refused(Error),
}

/// Finds the row `version` of `name` was read from (the same ciphertext: a
/// delete and a later put can make a row with the same name and version).
fn check_version(
    conn: &rusqlite::Connection,
    name: &str,
    version: u64,
    ciphertext: &[u8],
) -> Result<VersionCheck> {
    let state: Option<String> = conn
        .prepare_cached(
            "SELECT state FROM secret_versions
             WHERE name = ?1 AND version = ?2 AND ciphertext = ?3",
        )?
        .query_row(params![name, version as i64, ciphertext], |r| r.get(0))
        .optional()?;
    Ok(match state.as_deref() {
        Some(crate::rotation::version_state::ACTIVE) => VersionCheck::Current,
        Some(crate::rotation::version_state::OVERLAPPING) => VersionCheck::Superseded,
        Some(_) => VersionCheck::Gone(Error::Unavailable(format!(
            "version {version} of secret {name:?} was retired while this lease was being \
             issued; ask again for the current version"
        ))),
        None => VersionCheck::Gone(Error::NotFound(format!(
            "secret {name:?} was deleted while this lease was being issued; ask an admin \
             whether it should exist"
        ))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Issue's re-check tells the row its value came from from a row of
    /// the same name and version made by a later put (after a delete), from
    /// a retired one, and from one a rotation superseded.
    #[test]
    fn check_version_needs_the_same_current_row() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = crate::store::open_rw(&dir.path().join("t.db"), true).expect("new store");
        conn.execute(
            "INSERT INTO secret_versions (name, version, created_at, wrapped_key, ciphertext,
                 state)
             VALUES ('a/b', 1, 0, x'00', x'0102', 'active')",
            [],
        )
        .expect("row");
        let check = |version, ciphertext: &[u8]| {
            check_version(&conn, "a/b", version, ciphertext).expect("check")
        };
        assert!(matches!(check(1, &[1, 2]), VersionCheck::Current));
        let other = check(1, &[9, 9]);
        assert!(
            matches!(other, VersionCheck::Gone(Error::NotFound(_))),
            "{other:?}"
        );
        let missing = check(2, &[1, 2]);
        assert!(
            matches!(missing, VersionCheck::Gone(Error::NotFound(_))),
            "{missing:?}"
        );
        conn.execute("UPDATE secret_versions SET state = 'overlapping'", [])
            .expect("supersede");
        assert!(matches!(check(1, &[1, 2]), VersionCheck::Superseded));
        conn.execute("UPDATE secret_versions SET state = 'retired'", [])
            .expect("retire");
        let retired = check(1, &[1, 2]);
        assert!(
            matches!(retired, VersionCheck::Gone(Error::Unavailable(_))),
            "{retired:?}"
        );
    }

    /// The sweep and the bulk revokes go through the partial indexes on
    /// active leases, so their cost follows the leases they touch, not the
    /// size of the table.
    #[test]
    fn sweep_and_bulk_revokes_use_the_active_lease_indexes() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = crate::store::open_rw(&dir.path().join("t.db"), true).expect("new store");
        for (sql, index) in [
            (SWEEP_SQL, "leases_active_expiry"),
            (PURGE_SQL, "leases_ended"),
            (REVOKE_AGENT_SQL, "leases_active_agent"),
            (REVOKE_SECRET_SQL, "leases_active_secret"),
            (REVOKE_VERSION_SQL, "leases_active_secret"),
        ] {
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain");
            let args = [1, 2, 3, 4];
            let n = stmt.parameter_count();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(&args[..n]), |r| {
                    r.get::<_, String>(3)
                })
                .expect("plan")
                .collect::<rusqlite::Result<_>>()
                .expect("rows");
            assert!(
                plan.iter().any(|l| l.contains(index)),
                "{sql}: plan {plan:?} does not use {index}"
            );
            assert!(
                !plan.iter().any(|l| l.starts_with("SCAN leases")),
                "{sql}: plan {plan:?} scans the lease table"
            );
        }
    }
}
