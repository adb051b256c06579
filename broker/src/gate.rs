//! The gate in front of the broker: open at once for keychain and
//! passphrase stores; for a store sealed by operator shares, closed until
//! `tessera unseal` has delivered k shares. While closed, every service
//! answers FAILED_PRECONDITION "sealed" except `Status` and `Unseal`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use tessera_shred::envelope::ShareEnvelope;
use tokio::sync::Mutex;

use crate::audit::Entry;
use crate::broker::{Broker, Limits};
use crate::error::{Error, Result};
use crate::init::{DataDir, now};
use crate::keys::{SymmetricKey, hex};
use crate::proto;
use crate::unseal::{ROOT_SHARE_CLASS, operator_split};

/// The broker, or the promise of one.
pub struct Gate {
    broker: OnceLock<Arc<Broker>>,
    sealed: Option<Mutex<Unsealing>>,
    threshold: u8,
    shares: u8,
    received: AtomicU32,
}

/// One unseal attempt, kept until the audit trail can be written.
struct Attempt {
    time: i64,
    actor: String,
    accepted: bool,
    reason: String,
}

struct Unsealing {
    dir: DataDir,
    limits: Limits,
    fingerprint: [u8; 32],
    received: Vec<ShareEnvelope>,
    attempts: Vec<Attempt>,
}

/// The answer to a share given to a broker that is already unsealed:
/// nothing more is needed, but an operator who checks which set of shares
/// is in effect (after an interrupted `rekey root`) is told whether this
/// one is, never that it worked.
fn already_unsealed(b: &Broker, share_text: &str) -> Error {
    let current = b
        .store
        .read(|c| crate::store::meta_get(c, "root_key_fingerprint"));
    match (ShareEnvelope::parse(share_text.as_bytes()), current) {
        (Err(e), _) => Error::invalid("share", e.to_string()),
        (Ok(_), Err(e)) => e,
        (Ok(env), Ok(Some(fp)))
            if env.class == ROOT_SHARE_CLASS && env.key_fingerprint[..] == fp[..] =>
        {
            Error::FailedPrecondition(
                "the broker is already unsealed, so no share is needed now; this share is of \
                 the root key in effect: keep it"
                    .into(),
            )
        }
        (Ok(env), _) => Error::invalid(
            "share",
            format!(
                "the broker is already unsealed, and this share is not of the root key in \
                 effect (it names {} key {}): it does not unseal this store",
                env.class,
                &hex(&env.key_fingerprint)[..16]
            ),
        ),
    }
}

impl Gate {
    /// A gate that is open: the broker is unsealed.
    pub fn unsealed(broker: Arc<Broker>) -> Arc<Gate> {
        let cell = OnceLock::new();
        let _ = cell.set(broker);
        Arc::new(Gate {
            broker: cell,
            sealed: None,
            threshold: 0,
            shares: 0,
            received: AtomicU32::new(0),
        })
    }

    /// A closed gate for the store in `dir`, sealed by operator shares.
    pub fn sealed(dir: &DataDir, limits: Limits) -> Result<Arc<Gate>> {
        let conn = crate::store::open_rw(&dir.db(), false)?;
        let (threshold, shares, fingerprint) = operator_split(&conn)?;
        drop(conn);
        Ok(Arc::new(Gate {
            broker: OnceLock::new(),
            sealed: Some(Mutex::new(Unsealing {
                dir: dir.clone(),
                limits,
                fingerprint,
                received: Vec::new(),
                attempts: Vec::new(),
            })),
            threshold,
            shares,
            received: AtomicU32::new(0),
        }))
    }

    /// The broker, once unsealed.
    pub fn broker(&self) -> Option<&Arc<Broker>> {
        self.broker.get()
    }

    /// The error every service gives while sealed.
    pub fn sealed_error(&self) -> Error {
        Error::FailedPrecondition(format!(
            "sealed: the broker waits for {} of {} operator shares ({} received so far); \
             operators give them with `tessera unseal SHARE_FILE`",
            self.threshold,
            self.shares,
            self.received.load(Ordering::Relaxed)
        ))
    }

    /// Progress while sealed: (received, threshold).
    pub fn progress(&self) -> (u32, u32) {
        (self.received.load(Ordering::Relaxed), self.threshold as u32)
    }

    fn response(&self, sealed: bool) -> proto::UnsealResponse {
        proto::UnsealResponse {
            sealed,
            received: self.received.load(Ordering::Relaxed),
            threshold: self.threshold as u32,
            shares: self.shares as u32,
        }
    }

    /// Takes one operator share. With the k-th, recombines the root key,
    /// opens the store and writes every attempt to the audit trail.
    pub async fn unseal(&self, share_text: &str) -> Result<proto::UnsealResponse> {
        let Some(lock) = &self.sealed else {
            // Nothing was read: an operator at the wrong broker is told so,
            // not that their share worked.
            return Err(Error::FailedPrecondition(
                "this broker is not sealed by operator shares (it unsealed its root key at \
                 start, from the keychain or its passphrase): no share is needed; check \
                 --addr / TESSERA_ADDR"
                    .into(),
            ));
        };
        let mut u = lock.lock().await;
        if let Some(b) = self.broker.get() {
            let e = already_unsealed(b, share_text);
            let actor = ShareEnvelope::parse(share_text.as_bytes()).map_or_else(
                |_| "anonymous".into(),
                |env| format!("operator:{}", env.role),
            );
            let rid = crate::keys::request_id();
            return Err(b.deny(actor, "unseal.share", "root-key", &rid, e).await);
        }
        let t = now();
        let env = match ShareEnvelope::parse(share_text.as_bytes()) {
            Ok(e) => e,
            Err(e) => {
                u.attempts.push(Attempt {
                    time: t,
                    actor: "anonymous".into(),
                    accepted: false,
                    reason: format!("malformed share: {e}"),
                });
                return Err(Error::invalid("share", e.to_string()));
            }
        };
        let actor = format!("operator:{}", env.role);
        let refusal = if env.class != ROOT_SHARE_CLASS || env.key_fingerprint != u.fingerprint {
            Some(Error::invalid(
                "share",
                format!(
                    "this share is not of this store's root key (it names {} key {}); give a \
                     share printed by this store's `tessera init --unseal shares`",
                    env.class,
                    &hex(&env.key_fingerprint)[..16]
                ),
            ))
        } else if u.received.iter().any(|r| r.role == env.role) {
            Some(Error::invalid(
                "share",
                format!(
                    "the share of {} was already given; each counts once",
                    env.role
                ),
            ))
        } else {
            None
        };
        if let Some(e) = refusal {
            u.attempts.push(Attempt {
                time: t,
                actor,
                accepted: false,
                reason: e.to_string(),
            });
            return Err(e);
        }
        u.attempts.push(Attempt {
            time: t,
            actor,
            accepted: true,
            reason: format!("share of {} accepted", env.role),
        });
        u.received.push(env);
        self.received
            .store(u.received.len() as u32, Ordering::Relaxed);
        if u.received.len() < self.threshold as usize {
            return Ok(self.response(true));
        }
        let combined = tessera_shred::envelope::combine_envelopes(&u.received);
        u.received.clear();
        self.received.store(0, Ordering::Relaxed);
        let raw = match combined {
            Ok(k) => k,
            Err(e) => {
                u.attempts.push(Attempt {
                    time: t,
                    actor: "system".into(),
                    accepted: false,
                    reason: format!("shares did not combine: {e}; progress reset"),
                });
                return Err(Error::FailedPrecondition(format!(
                    "{e}; unseal progress was reset, give the shares again"
                )));
            }
        };
        let rk = SymmetricKey::from_bytes(&raw)?;
        let (dir, limits) = (u.dir.clone(), u.limits.clone());
        let broker = tokio::task::spawn_blocking(move || Broker::open_with_key(&dir, rk, limits))
            .await
            .map_err(|e| Error::Internal(format!("unseal task failed: {e}")))??;
        let broker = Arc::new(broker);
        for a in u.attempts.drain(..) {
            broker
                .audit(Entry {
                    time: a.time,
                    actor: a.actor,
                    action: "unseal.share".into(),
                    target: "root-key".into(),
                    allowed: a.accepted,
                    reason: a.reason,
                    request_id: String::new(),
                })
                .await?;
        }
        broker
            .audit(Entry {
                time: now(),
                actor: "system".into(),
                action: "store.unseal".into(),
                target: "root-key".into(),
                allowed: true,
                reason: format!("unsealed with {} operator shares", self.threshold),
                request_id: String::new(),
            })
            .await?;
        let _ = self.broker.set(broker);
        tracing::info!("unsealed with operator shares; serving");
        Ok(self.response(false))
    }
}
