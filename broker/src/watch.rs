//! `Watch`: a server stream of the events in an agent's scope. Events are
//! rows in the store, written in the same transaction as the change they
//! report, so a client that reconnects (even after a broker restart) and
//! gives the last id it saw misses nothing. The writer wakes watchers after
//! each commit that wrote an event; a watcher then reads the new rows from
//! its cursor. A slow poll also picks up events written by another
//! process (`tessera rotate --due` without a running broker).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::params;
use tokio::sync::mpsc;
use tonic::Status;

use crate::agent::Agent;
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::proto;

/// Events read per query.
const PAGE: i64 = 256;

/// How long until `agent`'s token expires (a long time if it never does).
fn until_expiry(agent: &Agent) -> Duration {
    agent.expires_at.map_or(Duration::MAX, |e| {
        Duration::from_secs(u64::try_from(e - crate::init::now()).unwrap_or(0))
    })
}

/// How often a watcher looks for events without being woken: only events
/// written by another process (`rotate --due` on the store while this
/// broker runs) need it.
const POLL: Duration = Duration::from_secs(5);

struct Row {
    event: proto::Event,
    agent_id: Option<i64>,
}

/// Whether `agent` may see `e`.
fn in_scope(agent: &Agent, e: &Row) -> bool {
    match (e.event.kind.as_str(), e.agent_id) {
        ("secret.rotated", _) => agent.rule_for(&e.event.secret).is_some(),
        (_, Some(id)) => id == agent.id,
        // A revoke by secret, version or of everything.
        (_, None) => e.event.secret.is_empty() || agent.rule_for(&e.event.secret).is_some(),
    }
}

/// A place among an agent's open watches, given back when the watch ends.
struct Slot {
    watching: Arc<std::sync::Mutex<HashMap<i64, usize>>>,
    agent: i64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut w = self.watching.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.agent);
            }
        }
    }
}

impl Broker {
    /// Takes a place among `agent`'s open watches, unless it has the most
    /// it may.
    fn watch_slot(&self, agent: &Agent) -> Result<Slot> {
        let max = self.limits.max_watches_per_agent;
        let mut w = self.watching.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(agent.id).or_insert(0);
        if *n >= max {
            return Err(Error::ResourceExhausted(format!(
                "agent {:?} has {max} watches open, the most it may (serve \
                 --max-watches-per-agent); end one first, or share one watch per process",
                agent.name
            )));
        }
        *n += 1;
        Ok(Slot {
            watching: Arc::clone(&self.watching),
            agent: agent.id,
        })
    }

    /// The id of the newest event (0 when there is none).
    pub(crate) fn last_event_id(&self) -> Result<u64> {
        self.store.read(|conn| {
            Ok(
                conn.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| {
                    r.get::<_, i64>(0)
                })? as u64,
            )
        })
    }

    fn events_after(&self, cursor: u64) -> Result<Vec<Row>> {
        self.store.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, time, kind, secret, version, lease_id, agent_id, expires_at, detail
                 FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cursor as i64, PAGE], |r| {
                Ok(Row {
                    event: proto::Event {
                        id: r.get::<_, i64>(0)? as u64,
                        time: r.get(1)?,
                        kind: r.get(2)?,
                        secret: r.get(3)?,
                        version: r.get::<_, i64>(4)? as u64,
                        lease_id: r.get(5)?,
                        expires_at: r.get(7)?,
                        detail: r.get(8)?,
                    },
                    agent_id: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn agent_revoked(&self, id: i64) -> Result<bool> {
        self.store.read(|conn| {
            let r: Option<i64> = conn
                .prepare_cached("SELECT revoked_at FROM agents WHERE id = ?1")?
                .query_row([id], |r| r.get(0))?;
            Ok(r.is_some())
        })
    }

    /// Starts a watch for `agent` after event `after` (0: from now on);
    /// returns the stream and the id it starts after.
    pub fn watch(
        self: &Arc<Self>,
        request_id: &str,
        agent: Arc<Agent>,
        after: u64,
        resume: bool,
    ) -> Result<(mpsc::Receiver<Result<proto::Event, Status>>, u64)> {
        let mut cursor = if after == 0 && !resume {
            self.last_event_id()?
        } else {
            after
        };
        let start = cursor;
        let slot = self.watch_slot(&agent)?;
        let (tx, rx) = mpsc::channel(64);
        let broker = Arc::clone(self);
        let mut wake = self.store.subscribe_events();
        let mut stopping = self.stopping.subscribe();
        let rid = request_id.to_string();
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                // Checked before anything is sent: an expired token gets
                // no further event. The end is audited like a refused call.
                if let Some(e) = agent.expired(crate::init::now()) {
                    let entry = crate::lease::agent_entry(
                        &agent,
                        "watch",
                        "events",
                        false,
                        e.to_string(),
                        &rid,
                    );
                    let e = match broker.audit(entry).await {
                        Ok(()) => e,
                        Err(audit) => audit,
                    };
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
                let page = match broker.events_after(cursor) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let full = page.len() as i64 == PAGE;
                for row in page {
                    cursor = row.event.id;
                    if in_scope(&agent, &row) {
                        // A client that stops reading must not hold a
                        // shutdown open.
                        tokio::select! {
                            sent = tx.send(Ok(row.event)) => if sent.is_err() { return },
                            _ = async { drop(stopping.wait_for(|s| *s).await) } => return,
                        }
                    }
                }
                if full {
                    continue;
                }
                if broker.agent_revoked(agent.id).unwrap_or(false) {
                    let e = Error::Unauthenticated(format!(
                        "the token of agent {:?} was revoked; the watch ends",
                        agent.name
                    ));
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
                tokio::select! {
                    changed = wake.changed() => {
                        // The writer is gone (shutting down): end the watch.
                        if changed.is_err() {
                            let _ = tx.send(Err(Status::unavailable(
                                "the broker is shutting down; reconnect with after_event_id",
                            ))).await;
                            return;
                        }
                    }
                    _ = tokio::time::sleep(until_expiry(&agent).min(POLL)) => {}
                    _ = tx.closed() => return,
                    _ = async { drop(stopping.wait_for(|s| *s).await) } => {
                        let _ = tx.try_send(Err(Status::unavailable(
                            "the broker is shutting down; reconnect with after_event_id",
                        )));
                        return;
                    }
                }
            }
        });
        Ok((rx, start))
    }
}
