//! Agents: registered non-human identities with a bearer token (`tsr_…`,
//! shown once, stored as a hash), an allow list of secret patterns and TTL
//! limits. Token checks go through a small cache that a revoke clears as
//! it commits.

use std::sync::Arc;

use rusqlite::{OptionalExtension, params};

use crate::audit::{ACTOR_ADMIN, Entry};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::init::now;
use crate::keys::{Token, ct_eq, token_hash};
use crate::lease::{Scope, revoke_active};
use crate::names;
use crate::proto::{AgentInfo, CreateAgentRequest};
use crate::rowmac::{self, AgentRow};

/// Shortest and longest lease TTL an agent may be given.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=30 * 24 * 3600;
/// Most allow patterns one agent may have.
pub const ALLOW_MAX: usize = 256;
/// Default total life of a lease across renewals.
pub const DEFAULT_MAX_LIFETIME: u64 = 24 * 3600;

/// An authenticated agent, as the hot path needs it.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Row id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Secret patterns it may read.
    pub allow: Vec<String>,
    /// Longest lease (and renewal) in seconds.
    pub max_ttl: u64,
    /// Longest total life of a lease, in seconds.
    pub max_lifetime: u64,
    /// When its token stops working (Unix seconds), if ever.
    pub expires_at: Option<i64>,
    /// The Unix uid its token is bound to, if any.
    pub peer_uid: Option<u32>,
    token_hash: [u8; 32],
}

impl Agent {
    /// How the audit trail names it.
    pub fn actor(&self) -> String {
        format!("agent:{}", self.name)
    }

    /// The error for a token used at or after its expiry, if it has one.
    pub fn expired(&self, at: i64) -> Option<Error> {
        let exp = self.expires_at.filter(|e| at >= *e)?;
        Some(Error::Unauthenticated(format!(
            "the token of agent {:?} expired at {}; ask an admin for a new agent token",
            self.name,
            crate::init::rfc3339(exp)
        )))
    }

    /// The error for a token presented by `peer` (the Unix uid of the
    /// process on the other end of the broker's Unix socket; `None` over
    /// TCP) when the token is bound to another uid.
    pub fn wrong_peer(&self, peer: Option<u32>) -> Option<Error> {
        let uid = self.peer_uid.filter(|u| peer != Some(*u))?;
        let came = match peer {
            Some(p) => format!("from uid {p}"),
            None => "over TCP".to_string(),
        };
        Some(Error::Unauthenticated(format!(
            "the token of agent {:?} is bound to Unix uid {uid}, but this request came {came}; \
             run the agent as that user over the broker's Unix socket",
            self.name
        )))
    }

    /// Why this agent, authenticated from the cache before the write, may
    /// no longer act, as the writer's transaction at `at` sees it: a revoke
    /// acknowledged before this write always wins.
    ///
    /// The row is also compared with this agent as it was authenticated:
    /// tessera never changes an agent's token, allow list, limits, expiry
    /// or uid binding, so a difference is an edit made outside tessera since (the
    /// row's MAC was checked when it was loaded), and it is refused as
    /// such rather than served from the cache.
    pub(crate) fn refused_in(&self, conn: &rusqlite::Connection, at: i64) -> Result<Option<Error>> {
        let row: Option<(Option<i64>, bool)> = conn
            .prepare_cached(
                "SELECT revoked_at, token_hash, allow, max_ttl, max_lifetime, expires_at,
                        peer_uid
                 FROM agents WHERE id = ?1",
            )?
            .query_row([self.id], |r| {
                let same = r.get_ref(1)?.as_blob()? == &self.token_hash[..]
                    && r.get_ref(2)?
                        .as_str()?
                        .split('\n')
                        .filter(|p| !p.is_empty())
                        .eq(self.allow.iter().map(String::as_str))
                    && r.get::<_, i64>(3)? == self.max_ttl as i64
                    && r.get::<_, i64>(4)? == self.max_lifetime as i64
                    && r.get::<_, Option<i64>>(5)? == self.expires_at
                    && r.get::<_, Option<i64>>(6)? == self.peer_uid.map(i64::from);
                Ok((r.get(0)?, same))
            })
            .optional()?;
        Ok(match row {
            Some((_, false)) => Some(crate::rowmac::agent_tampered(&self.name)),
            Some((None, true)) => self.expired(at),
            _ => Some(Error::Unauthenticated(format!(
                "the token of agent {:?} was revoked; ask an admin for a new agent token",
                self.name
            ))),
        })
    }

    /// The latest a lease issued now may end: `max_lifetime` from `at`,
    /// and never after the token expires.
    pub fn lease_limit(&self, at: i64) -> i64 {
        (at + self.max_lifetime as i64).min(self.expires_at.unwrap_or(i64::MAX))
    }

    /// The agent's allow rules for a refusal's message: the first few, and
    /// how many more (a message must fit in a gRPC status).
    pub fn rules_text(&self) -> String {
        const SHOWN: usize = 8;
        let mut text = self
            .allow
            .iter()
            .take(SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if self.allow.len() > SHOWN {
            text.push_str(&format!(
                " and {} more: `tessera agent list` shows them",
                self.allow.len() - SHOWN
            ));
        }
        text
    }

    /// The first `class:` rule that covers retention class `class`, if any.
    /// (`*` alone never grants a class: class access is always explicit.)
    pub fn rule_for_class(&self, class: &str) -> Option<&str> {
        self.allow
            .iter()
            .find(|p| {
                p.strip_prefix(names::CLASS_RULE)
                    .is_some_and(|c| names::matches(c, class))
            })
            .map(String::as_str)
    }

    /// The first allow rule that covers `secret`, if any.
    pub fn rule_for(&self, secret: &str) -> Option<&str> {
        self.allow
            .iter()
            .find(|p| names::matches(p, secret))
            .map(String::as_str)
    }
}

impl Broker {
    /// Registers an agent and returns it with its token (shown once).
    pub async fn create_agent(
        &self,
        request_id: &str,
        req: CreateAgentRequest,
    ) -> Result<(AgentInfo, Token)> {
        let CreateAgentRequest {
            name,
            allow,
            max_ttl_seconds: max_ttl,
            max_lifetime_seconds: max_lifetime,
            expires_in_seconds: expires_in,
            peer_uid,
        } = req;
        let max_lifetime = if max_lifetime == 0 {
            DEFAULT_MAX_LIFETIME.max(max_ttl)
        } else {
            max_lifetime
        };
        let check = names::agent(&name, "name")
            .and_then(|()| {
                if allow.is_empty() {
                    return Err(Error::invalid(
                        "allow",
                        "give at least one secret pattern the agent may read, e.g. --allow 'openai/*'",
                    ));
                }
                if allow.len() > ALLOW_MAX {
                    return Err(Error::invalid(
                        "allow",
                        format!(
                            "{} patterns is more than the {ALLOW_MAX} an agent may have; use \
                             wildcards (e.g. 'openai/*') rather than listing every secret",
                            allow.len()
                        ),
                    ));
                }
                allow.iter().try_for_each(|p| names::pattern(p))
            })
            .and_then(|()| {
                if peer_uid == Some(u32::MAX) {
                    Err(Error::invalid(
                        "peer_uid",
                        "4294967295 is (uid_t)-1, which no process has; give the agent's uid",
                    ))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| ttl_in_range("max_ttl", max_ttl))
            .and_then(|()| {
                if expires_in > TOKEN_LIFE_MAX {
                    Err(Error::invalid(
                        "expires_in",
                        format!(
                            "{expires_in} seconds is out of range: use at most 10 years (10y), \
                             or leave it out for a token that does not expire"
                        ),
                    ))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| ttl_in_range("max_lifetime", max_lifetime))
            .and_then(|()| {
                if max_lifetime < max_ttl {
                    Err(Error::invalid(
                        "max_lifetime",
                        "it must be at least max_ttl",
                    ))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = check {
            return Err(self
                .deny(ACTOR_ADMIN.into(), "agent.create", &name, request_id, e)
                .await);
        }
        let token = Token::generate("tsr_")?;
        let hash = token.hash();
        let rid = request_id.to_string();
        let row_key = Arc::clone(&self.row_key);
        let info = self
            .store
            .write(move |ctx| {
                let t = now();
                let exists: Option<i64> = ctx
                    .conn
                    .query_row("SELECT id FROM agents WHERE name = ?1", [&name], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if exists.is_some() {
                    let e = Error::AlreadyExists(format!(
                        "an agent named {name:?} already exists (names are never reused, even \
                         after a revoke); choose another name"
                    ));
                    ctx.audit(&admin_entry(
                        "agent.create",
                        &name,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    return Ok(Err(e));
                }
                let expires_at = (expires_in > 0).then(|| t + expires_in as i64);
                ctx.conn.execute(
                    "INSERT INTO agents (name, token_hash, allow, max_ttl, max_lifetime, created_at,
                                         expires_at, peer_uid)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        name,
                        &hash[..],
                        allow.join("\n"),
                        max_ttl as i64,
                        max_lifetime as i64,
                        t,
                        expires_at,
                        peer_uid
                    ],
                )?;
                rowmac::seal_agent(ctx.conn, &row_key, ctx.conn.last_insert_rowid())?;
                let expiry = expires_at.map_or_else(
                    || "token does not expire".to_string(),
                    |e| format!("token expires {}", crate::init::rfc3339(e)),
                );
                ctx.audit(&admin_entry(
                    "agent.create",
                    &name,
                    true,
                    format!(
                        "allow {}; max ttl {max_ttl}s; {expiry}{}",
                        allow.join(","),
                        peer_uid.map_or_else(String::new, |u| format!("; bound to uid {u}"))
                    ),
                    &rid,
                ))?;
                Ok(Ok(AgentInfo {
                    tampered: false,
                    name,
                    allow,
                    max_ttl_seconds: max_ttl,
                    max_lifetime_seconds: max_lifetime,
                    created_at: t,
                    revoked_at: 0,
                    active_leases: 0,
                    expires_at: expires_at.unwrap_or(0),
                    peer_uid,
                }))
            })
            .await??;
        Ok((info, token))
    }

    /// Every agent, with its count of active (unexpired) leases.
    pub async fn list_agents(&self, request_id: &str) -> Result<Vec<AgentInfo>> {
        let out = self.store.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {},
                        (SELECT count(*) FROM leases l
                          WHERE l.agent_id = a.id AND l.state = 0 AND l.expires_at > ?1)
                 FROM agents a ORDER BY a.name",
                rowmac::AGENT_COLUMNS
            ))?;
            let rows = stmt.query_map([now()], |r| {
                let (row, mac) = AgentRow::from_row(r)?;
                Ok(AgentInfo {
                    tampered: !row.verify(&self.row_key, mac.as_deref()),
                    allow: split_allow(&row.allow),
                    max_ttl_seconds: row.max_ttl as u64,
                    max_lifetime_seconds: row.max_lifetime as u64,
                    created_at: row.created_at,
                    revoked_at: row.revoked_at.unwrap_or(0),
                    active_leases: r.get::<_, i64>(11)? as u64,
                    expires_at: row.expires_at.unwrap_or(0),
                    peer_uid: row.peer_uid.map(|u| u as u32),
                    name: row.name,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        let n = out.len();
        self.audit(admin_entry(
            "agent.list",
            "*",
            true,
            format!("{n} agents listed"),
            request_id,
        ))
        .await?;
        Ok(out)
    }

    /// Revokes an agent's token and every active lease it holds, in one
    /// transaction; the token cache forgets it as that transaction commits.
    pub async fn revoke_agent(&self, request_id: &str, name: String) -> Result<u64> {
        if let Err(e) = names::agent(&name, "name") {
            return Err(self
                .deny(ACTOR_ADMIN.into(), "agent.revoke", &name, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        let row_key = Arc::clone(&self.row_key);
        let forget = self.agents.forget_on_commit();
        self.store
            .write_then(
                move |ctx| {
                    let t = now();
                    let row: Option<(i64, Option<i64>)> = ctx
                        .conn
                        .query_row(
                            "SELECT id, revoked_at FROM agents WHERE name = ?1",
                            [&name],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    let Some((id, revoked)) = row else {
                        let e = Error::NotFound(format!(
                            "no agent named {name:?}; `tessera agent list` shows them"
                        ));
                        ctx.audit(&admin_entry(
                            "agent.revoke",
                            &name,
                            false,
                            e.to_string(),
                            &rid,
                        ))?;
                        return Ok(Err(e));
                    };
                    if revoked.is_none() {
                        ctx.conn.execute(
                            "UPDATE agents SET revoked_at = ?1 WHERE id = ?2",
                            params![t, id],
                        )?;
                    }
                    // Also the remedy for a row edited outside tessera: revoked,
                    // it authenticates nothing, so its MAC may cover it as is.
                    rowmac::seal_agent(ctx.conn, &row_key, id)?;
                    let leases = revoke_active(ctx, Scope::Agent(id), t)?;
                    ctx.audit(&admin_entry(
                        "agent.revoke",
                        &name,
                        true,
                        format!("token revoked, {leases} leases revoked"),
                        &rid,
                    ))?;
                    Ok(Ok(leases))
                },
                forget,
            )
            .await?
    }

    /// Checks an agent bearer token, presented by `peer` (the Unix uid of
    /// the process on the other end of the Unix socket; `None` over TCP);
    /// a failure is audited.
    pub async fn authenticate_agent(
        &self,
        token: Option<&str>,
        peer: Option<u32>,
        action: &str,
        target: &str,
        request_id: &str,
    ) -> Result<Arc<Agent>> {
        let Some(token) = token else {
            let e = Error::Unauthenticated(
                "no agent token: send `authorization: Bearer tsr_…` (the CLI reads TESSERA_TOKEN)"
                    .into(),
            );
            return Err(self
                .deny_unknown("anonymous".into(), action, target, request_id, e)
                .await);
        };
        let hash = token_hash(token);
        if let Some(a) = self.agents.get(&hash) {
            return match a.expired(now()).or_else(|| a.wrong_peer(peer)) {
                None => Ok(a),
                Some(e) => Err(self.deny(a.actor(), action, target, request_id, e).await),
            };
        }
        // Read before the row: a revoke that commits after this read bumps
        // it, and the row is then not cached.
        let generation = self.agents.generation();
        let found = self.store.read(|conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {} FROM agents WHERE token_hash = ?1",
                    rowmac::AGENT_COLUMNS
                ))?
                .query_row([&hash[..]], AgentRow::from_row)
                .optional()?)
        })?;
        let found = match found {
            Some((row, mac)) if !row.verify(&self.row_key, mac.as_deref()) => {
                let actor = format!("agent:{}", row.name);
                return Err(self
                    .deny(actor, action, target, request_id, row.tampered())
                    .await);
            }
            Some((row, _)) => Some((
                Agent {
                    id: row.id,
                    allow: split_allow(&row.allow),
                    max_ttl: row.max_ttl as u64,
                    max_lifetime: row.max_lifetime as u64,
                    expires_at: row.expires_at,
                    // (Out of range can only be an edit, which the MAC
                    // catches; it binds to no one rather than to anyone.)
                    peer_uid: row.peer_uid.map(|u| u32::try_from(u).unwrap_or(u32::MAX)),
                    token_hash: row.token_hash.try_into().unwrap_or([0; 32]),
                    name: row.name,
                },
                row.revoked_at,
            )),
            None => None,
        };
        match found {
            Some((agent, None)) if ct_eq(&agent.token_hash, &hash) => {
                if let Some(e) = agent.expired(now()) {
                    return Err(self
                        .deny(agent.actor(), action, target, request_id, e)
                        .await);
                }
                let agent = Arc::new(agent);
                self.agents.insert(generation, hash, &agent);
                match agent.wrong_peer(peer) {
                    None => Ok(agent),
                    Some(e) => Err(self
                        .deny(agent.actor(), action, target, request_id, e)
                        .await),
                }
            }
            Some((agent, Some(_))) => {
                let e = Error::Unauthenticated(format!(
                    "the token of agent {:?} was revoked; ask an admin for a new agent token",
                    agent.name
                ));
                Err(self
                    .deny(agent.actor(), action, target, request_id, e)
                    .await)
            }
            _ => {
                let e = Error::Unauthenticated(if token.starts_with("tsa_") {
                    "this is the admin credential (tsa_…), and agent calls take an agent token \
                     (tsr_…, printed by `tessera agent create`): check TESSERA_TOKEN"
                        .into()
                } else {
                    "the agent token is not valid for this broker (unknown or mistyped); check \
                     TESSERA_TOKEN"
                        .into()
                });
                let actor = self.token_fingerprint(token);
                Err(self
                    .deny_unknown(actor, action, target, request_id, e)
                    .await)
            }
        }
    }

    /// Drops an agent from the token cache by id (after a writer-side check
    /// found it revoked).
    pub(crate) fn forget_agent_id(&self, id: i64) {
        self.agents.forget_where(|a| a.id == id);
    }

    /// Drops cached agent `id` when the writer refused it with `e` because
    /// its token no longer stands (revoked, expired) or its row was edited
    /// outside tessera: the next call loads (and checks) it again.
    pub(crate) fn forget_agent_refused(&self, id: i64, e: &Error) {
        if matches!(e, Error::Unauthenticated(_) | Error::Tampered(_)) {
            self.forget_agent_id(id);
        }
    }
}

/// Longest life of an agent token, when it has one: 10 years of 366 days
/// (so that `10y`, 3,652.5 days, is within it, as for `--every`).
pub const TOKEN_LIFE_MAX: u64 = 10 * 366 * 24 * 3600;

fn ttl_in_range(field: &'static str, v: u64) -> Result<()> {
    if TTL_RANGE.contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{v} seconds is out of range: use 1 second to 30 days (e.g. 15m, 1h, 7d)"),
        ))
    }
}

fn split_allow(s: &str) -> Vec<String> {
    s.split('\n')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

pub(crate) fn admin_entry(
    action: &str,
    target: &str,
    allowed: bool,
    reason: String,
    request_id: &str,
) -> Entry {
    Entry {
        time: now(),
        actor: ACTOR_ADMIN.into(),
        action: action.into(),
        target: target.into(),
        allowed,
        reason,
        request_id: request_id.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bound token is refused from another uid and over TCP, with a
    /// sentence that says what to do; an unbound one from anywhere.
    #[test]
    fn a_bound_token_is_refused_from_another_peer() {
        let mut agent = Agent {
            id: 1,
            name: "bot".into(),
            allow: vec!["*".into()],
            max_ttl: 60,
            max_lifetime: 60,
            expires_at: None,
            peer_uid: None,
            token_hash: [0; 32],
        };
        assert!(agent.wrong_peer(None).is_none());
        assert!(agent.wrong_peer(Some(0)).is_none());
        agent.peer_uid = Some(1000);
        assert!(agent.wrong_peer(Some(1000)).is_none());
        let other = agent.wrong_peer(Some(0)).map(|e| e.to_string());
        assert!(
            other.as_deref().is_some_and(
                |m| m.contains("bound to Unix uid 1000") && m.contains("came from uid 0")
            ),
            "{other:?}"
        );
        let tcp = agent.wrong_peer(None).map(|e| e.to_string());
        assert!(
            tcp.as_deref().is_some_and(|m| m.contains("came over TCP")),
            "{tcp:?}"
        );
    }

    /// The writer's re-check: a revoke the cached agent does not know of,
    /// the token's expiry, or a row edited outside tessera refuses the
    /// write.
    #[test]
    fn refused_in_reads_the_agent_row_the_transaction_sees() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = crate::store::open_rw(&dir.path().join("t.db"), true).expect("new store");
        conn.execute(
            "INSERT INTO agents (id, name, token_hash, allow, max_ttl, max_lifetime, created_at,
                                 expires_at)
             VALUES (1, 'bot', zeroblob(32), '*', 60, 60, 0, 100)",
            [],
        )
        .expect("agent row");
        let agent = Agent {
            id: 1,
            name: "bot".into(),
            allow: vec!["*".into()],
            max_ttl: 60,
            max_lifetime: 60,
            expires_at: Some(100),
            peer_uid: None,
            token_hash: [0; 32],
        };
        assert!(agent.refused_in(&conn, 99).expect("check").is_none());
        // A uid binding added (or removed) in the file is an edit too.
        conn.execute("UPDATE agents SET peer_uid = 1000", [])
            .expect("bind");
        let bound = agent.refused_in(&conn, 99).expect("check");
        assert!(matches!(bound, Some(Error::Tampered(_))), "{bound:?}");
        conn.execute("UPDATE agents SET peer_uid = NULL", [])
            .expect("undo");
        // A row edited outside tessera since the agent was loaded is
        // refused as such, not served from the cache.
        conn.execute("UPDATE agents SET allow = 'a/*\nb/*'", [])
            .expect("edit");
        let edited = agent.refused_in(&conn, 99).expect("check");
        assert!(matches!(edited, Some(Error::Tampered(_))), "{edited:?}");
        conn.execute("UPDATE agents SET allow = '*'", [])
            .expect("undo");
        let expired = agent.refused_in(&conn, 100).expect("check");
        assert!(matches!(expired, Some(Error::Unauthenticated(m)) if m.contains("expired")));
        conn.execute("UPDATE agents SET revoked_at = 50", [])
            .expect("revoke");
        let revoked = agent.refused_in(&conn, 99).expect("check");
        assert!(matches!(revoked, Some(Error::Unauthenticated(m)) if m.contains("revoked")));
        conn.execute("DELETE FROM agents", []).expect("delete");
        assert!(agent.refused_in(&conn, 99).expect("check").is_some());
    }
}
