//! The broker's state, shared by every gRPC call: the unsealed store, the
//! keys derived from the root key, and the caches of agents, current secret
//! rows and class keys (`CommitCache`). The operations themselves live in
//! `secret`, `agent`, `lease` and here (audit).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rusqlite::{OptionalExtension, params};
use zeroize::Zeroizing;

use crate::agent::Agent;
use crate::audit::{self, ACTOR_ADMIN, Entry, Verdict};
use crate::error::{Error, Result};
use crate::init::{DataDir, audit_key, now, row_key};
use crate::keys::{RootKey, SymmetricKey, ct_eq, hex, token_hash};
use crate::proto;
use crate::rowmac;
use crate::store::{self, Store, meta_get, meta_set};
use crate::unseal::{self, Source};

/// Limits an admin can set at `serve`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest secret value accepted, in bytes.
    pub max_value_size: usize,
    /// `Watch` streams one agent may have open at once: each new event
    /// wakes every watcher, so one agent with thousands would slow
    /// everyone's calls.
    pub max_watches_per_agent: usize,
    /// Unexpired leases one agent may hold at once, so that a runaway or
    /// hostile agent cannot fill the store.
    pub max_leases_per_agent: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_size: 64 * 1024,
            max_watches_per_agent: 256,
            max_leases_per_agent: 10_000,
        }
    }
}

/// Calls without a valid credential recorded one by one per window.
pub const UNKNOWN_DENIALS_RECORDED: u32 = 100;
/// The window in which at most [`UNKNOWN_DENIALS_RECORDED`] are recorded.
pub const UNKNOWN_DENIALS_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Calls without a valid credential in the current window.
#[derive(Debug)]
pub(crate) struct UnknownDenials {
    started: std::time::Instant,
    recorded: u32,
    /// Refused without a record of their own, by action.
    suppressed: std::collections::BTreeMap<String, u64>,
}

impl Default for UnknownDenials {
    fn default() -> Self {
        UnknownDenials {
            started: std::time::Instant::now(),
            recorded: 0,
            suppressed: Default::default(),
        }
    }
}

/// The running broker.
pub struct Broker {
    pub(crate) store: Store,
    pub(crate) root_key: Arc<RootKeys>,
    pub(crate) store_id: String,
    /// One rekey at a time; holds an operator-share re-key prepared and
    /// not yet committed.
    pub(crate) rekey_lock: tokio::sync::Mutex<Option<crate::rekey::Pending>>,
    pub(crate) audit_key: SymmetricKey,
    pub(crate) fingerprint_key: SymmetricKey,
    admin_token_hash: [u8; 32],
    /// Keys the MACs on agent rows, secret rows and the admin credential
    /// (`rowmac`).
    pub(crate) row_key: Arc<SymmetricKey>,
    /// Secrets whose row failed its MAC, already warned about in the log.
    pub(crate) tampered_logged: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Held (read) by each rotation run on a task of its own; a shutdown
    /// takes it (write) to wait for them.
    pub(crate) detached: Arc<tokio::sync::RwLock<()>>,
    /// The store's open lock, shared: no restore replaces the file while
    /// this broker has it open.
    _open_lock: Option<crate::init::ServeLock>,
    /// One backup at a time: each is a whole copy of the store beside it.
    pub(crate) backup_slot: Arc<tokio::sync::Semaphore>,
    /// Calls without a valid credential counted but not yet recorded.
    pub(crate) unknown_denials: std::sync::Mutex<UnknownDenials>,
    /// Open `Watch` streams per agent id.
    pub(crate) watching: Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>,
    /// Agents by token hash; a revoke forgets them.
    pub(crate) agents: Arc<CommitCache<[u8; 32], Agent>>,
    pub(crate) limits: Limits,
    source: Source,
    /// The encrypted current version of recently read secrets.
    pub(crate) current_rows: Arc<CommitCache<String, crate::secret::StoredVersion>>,
    /// The broker's Ed25519 key (PKCS#8): signs destruction certificates.
    pub(crate) signing_key: Zeroizing<Vec<u8>>,
    /// Its public half.
    pub(crate) signing_public: [u8; 32],
    /// Unwrapped class keys in use; a shred, or the class re-key of a
    /// holder replacement, forgets them (and a key is zeroized when its
    /// last user drops it).
    pub(crate) class_keys: Arc<CommitCache<String, crate::retention::ClassKey>>,
    /// Set when the broker stops serving: open `Watch` streams end (they
    /// would otherwise hold the graceful shutdown open forever).
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
}

/// The root key in use, swappable by `rekey root` without a restart. Jobs
/// that wrap keys read it inside the writer, so every row written after a
/// rekey commits uses the new key; reads also try the previous key, so a
/// read that raced the swap still succeeds.
pub struct RootKeys {
    current: RwLock<Arc<RootKey>>,
    previous: RwLock<Option<Arc<RootKey>>>,
    swapped: std::sync::atomic::AtomicBool,
}

impl RootKeys {
    fn new(k: RootKey) -> Self {
        RootKeys {
            current: RwLock::new(Arc::new(k)),
            previous: RwLock::new(None),
            swapped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The current root key.
    pub fn current(&self) -> Arc<RootKey> {
        match self.current.read() {
            Ok(k) => Arc::clone(&k),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Seals under the current key, in a write transaction on `conn`,
    /// once it is checked to be still the store's root key: a process
    /// that unsealed the store before another one re-keyed it (`tessera
    /// rotate --due` opening the store while the broker runs `rekey root`)
    /// must not wrap a key that the store's next start cannot open.
    pub fn seal(
        &self,
        conn: &rusqlite::Connection,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if self.replaced(conn)? {
            return Err(root_key_replaced());
        }
        self.current().seal(aad, plaintext)
    }

    /// Whether the store on `conn` was re-keyed by another process since
    /// this one unsealed it.
    pub(crate) fn replaced(&self, conn: &rusqlite::Connection) -> Result<bool> {
        let check = meta_get(conn, "root_key_check")?.unwrap_or_default();
        Ok(!ct_eq(&check, &unseal::check_value(&self.current())))
    }

    /// Opens with the current key, else the previous one.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        self.current().open(aad, sealed).or_else(|| {
            let prev = self.previous.read().ok()?.clone()?;
            prev.open(aad, sealed)
        })
    }

    /// Makes `new` current, keeping the old key for reads in flight.
    pub(crate) fn swap(&self, new: Arc<RootKey>) {
        let old = match self.current.write() {
            Ok(mut k) => std::mem::replace(&mut *k, new),
            Err(p) => std::mem::replace(&mut *p.into_inner(), new),
        };
        if let Ok(mut p) = self.previous.write() {
            *p = Some(old);
        }
        self.swapped
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a swap happened since the last call (a rekey job that failed
    /// before its swap must not be undone).
    pub(crate) fn generation_swapped(&self) -> bool {
        self.swapped
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

/// Why a process that holds a replaced root key can neither wrap nor open.
pub(crate) fn root_key_replaced() -> Error {
    Error::FailedPrecondition(
        "the store's root key was replaced by another process (`tessera rekey root`) since this \
         one unsealed it; run this again, and restart a broker that serves the store"
            .into(),
    )
}

/// Most agents kept in the token cache before it is cleared.
const AGENT_CACHE_MAX: usize = 10_000;

/// Most secrets whose current row is cached.
const CURRENT_CACHE_MAX: usize = 10_000;

/// Rows read from the store and kept in memory, which a write that changes
/// them forgets from its commit hook ([`Store::write_then`]): on the writer
/// thread, after the commit and before any caller in its batch is answered
/// or `Watch` is woken. Requests that use a cached row still re-check it in
/// their own transaction where serving a replaced row would matter (`Issue`
/// refuses a version that stopped being current, and a revoked agent).
pub(crate) struct CommitCache<K, V> {
    map: RwLock<HashMap<K, Arc<V>>>,
    /// Bumped by every forget, so a row read before a write committed is
    /// not cached after it.
    generation: std::sync::atomic::AtomicU64,
    max: usize,
}

impl<K: Eq + std::hash::Hash, V> CommitCache<K, V> {
    fn new(max: usize) -> Self {
        CommitCache {
            map: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            max,
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        self.map.read().ok()?.get(key).cloned()
    }

    /// Read before reading the row from the store; hand it to
    /// [`CommitCache::insert`].
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Caches `value` unless a forget came after `generation` was read
    /// (the row may then be out of date already).
    pub(crate) fn insert(&self, generation: u64, key: K, value: &Arc<V>) {
        let Ok(mut m) = self.map.write() else { return };
        if self.generation() == generation {
            if m.len() >= self.max {
                m.clear();
            }
            m.insert(key, Arc::clone(value));
        }
    }

    /// Forgets the entries whose value matches `f`.
    pub(crate) fn forget_where(&self, f: impl Fn(&V) -> bool) {
        if let Ok(mut m) = self.map.write() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            m.retain(|_, v| !f(v));
        }
    }

    /// Forgets the entry of `key`.
    pub(crate) fn forget<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        if let Ok(mut m) = self.map.write() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            m.remove(key);
        }
    }

    /// Forgets every entry.
    pub(crate) fn forget_all(&self) {
        self.forget_where(|_| true);
    }

    /// A commit hook for [`Store::write_then`] that forgets every entry.
    pub(crate) fn forget_on_commit(self: &Arc<Self>) -> impl FnOnce(bool) + Send + 'static
    where
        K: Send + Sync + 'static,
        V: Send + Sync + 'static,
    {
        let cache = Arc::clone(self);
        move |_| cache.forget_all()
    }
}

impl Broker {
    /// Opens and unseals the store in `dir`. Fails, changing nothing, if the
    /// root key cannot be had or does not match the store.
    pub fn open(dir: &DataDir, passphrase: Option<&[u8]>, limits: Limits) -> Result<Self> {
        Self::open_with(dir, limits, |conn, store_id| {
            let rk = unseal::unseal(conn, store_id, passphrase)?;
            // A rekey that crashed after its commit left the previous
            // generation's keychain entry behind: remove it now.
            if let Source::Keychain(which) = unseal::recorded_source(conn)? {
                let generation = unseal::root_generation(conn)?;
                if generation > 1 {
                    let _ = unseal::root_item_gen(which, store_id, generation - 1).delete();
                }
            }
            Ok(rk)
        })
    }

    /// Opens the store in `dir` with a root key recombined from operator
    /// shares; fails, changing nothing, unless it is this store's key.
    pub fn open_with_key(dir: &DataDir, root_key: RootKey, limits: Limits) -> Result<Self> {
        Self::open_with(dir, limits, move |conn, _| {
            unseal::check_root_key(conn, &root_key, Source::Shares)?;
            Ok(root_key)
        })
    }

    fn open_with(
        dir: &DataDir,
        limits: Limits,
        root_key: impl FnOnce(&rusqlite::Connection, &str) -> Result<RootKey>,
    ) -> Result<Self> {
        let db = dir.db();
        // Held while the broker lives, so that no restore swaps the file.
        let open_lock = if db.exists() {
            Some(dir.lock_open(false)?.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "a backup is being restored into {}; try again when it has finished",
                    dir.root().display()
                ))
            })?)
        } else {
            None
        };
        let mut conn = store::open_rw(&db, false)?;
        crate::backup::remove_stale_copies(&db);
        let store_id = meta_get(&conn, "store_id")?
            .map(|v| String::from_utf8_lossy(&v).to_string())
            .ok_or_else(|| {
                Error::Store(format!(
                    "{} is not a complete tessera store (no store id); was `init` interrupted?",
                    db.display()
                ))
            })?;
        let source = unseal::recorded_source(&conn)?;
        let root_key = root_key(&conn, &store_id)?;
        let signing_key = load_signing_key(&conn, &store_id, &root_key)?;
        let signing_public = tessera_shred::holder::public_of(&signing_key)
            .map_err(|e| Error::Tampered(format!("the broker's signing key is unusable: {e}")))?;
        let readers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8);
        let audit_key = stable_key(&conn, &store_id, &root_key, "audit")
            .unwrap_or_else(|| Ok(audit_key(&root_key)))?;
        let fingerprint_key = stable_key(&conn, &store_id, &root_key, "fingerprint")
            .unwrap_or_else(|| Ok(root_key.derive("token-fingerprint")))?;
        let row_key = stable_key(&conn, &store_id, &root_key, "rows")
            .unwrap_or_else(|| Ok(row_key(&root_key)))?;
        if unseal::row_macs_pending(&conn, &root_key)? {
            let check = unseal::check_value(&root_key);
            let adopted = store::write_before_start(&mut conn, &audit_key, |ctx| {
                // Decided again in the transaction: another process opening
                // the store may have adopted the rows meanwhile.
                if !unseal::row_macs_pending(ctx.conn, &root_key)? {
                    return Ok(None);
                }
                if rowmac::any_macs(ctx.conn)? || rowmac::adopted_before(ctx.conn, "row-macs")? {
                    return Err(rowmac::written_back());
                }
                let n = rowmac::adopt(ctx, &row_key, &store_id)?;
                meta_set(ctx.conn, "root_key_check", &check)?;
                Ok(Some(n))
            })?;
            if let Some(n) = adopted {
                tracing::warn!(
                    agents = n,
                    "this store had no row MACs: its agent rows, secret rows, holder and class \
                     rows and admin credential were adopted as they stood (audited as \
                     store.upgrade)"
                );
            }
        } else if unseal::retention_macs_pending(&conn, &root_key)? {
            let check = unseal::check_value(&root_key);
            let adopted = store::write_before_start(&mut conn, &audit_key, |ctx| {
                if !unseal::retention_macs_pending(ctx.conn, &root_key)? {
                    return Ok(None);
                }
                let n = rowmac::adopt_retention(ctx, &row_key)?;
                meta_set(ctx.conn, "root_key_check", &check)?;
                Ok(Some(n))
            })?;
            if let Some(n) = adopted {
                tracing::warn!(
                    rows = n,
                    "this store's holder and class rows had no MACs: they were adopted as they \
                     stood (audited as store.upgrade)"
                );
            }
        }
        if meta_get(&conn, crate::backup::RESTORED)?.is_some() {
            store::write_before_start(&mut conn, &audit_key, |ctx| {
                let Some(note) = meta_get(ctx.conn, crate::backup::RESTORED)? else {
                    return Ok(());
                };
                ctx.audit(&crate::audit::Entry {
                    time: now(),
                    actor: crate::audit::ACTOR_SYSTEM.into(),
                    action: "store.restore".into(),
                    target: "store".into(),
                    allowed: true,
                    reason: format!(
                        "the store was restored from a backup: {}",
                        String::from_utf8_lossy(&note)
                    ),
                    request_id: String::new(),
                })?;
                ctx.conn
                    .execute("DELETE FROM meta WHERE key = ?1", [crate::backup::RESTORED])?;
                Ok(())
            })?;
            tracing::warn!(
                "this store was restored from a backup (audited as store.restore); audit \
                 checkpoints taken after the backup no longer verify: take a new one"
            );
        }
        let admin_token_hash = rowmac::admin_hash(&conn, &row_key, &store_id)?;
        let store = Store::start(
            &db,
            conn,
            SymmetricKey::from_bytes(audit_key.expose_bytes())?,
            readers,
        )?;
        Ok(Broker {
            store,
            audit_key,
            fingerprint_key,
            root_key: Arc::new(RootKeys::new(root_key)),
            store_id,
            rekey_lock: tokio::sync::Mutex::new(None),
            admin_token_hash,
            row_key: Arc::new(row_key),
            tampered_logged: std::sync::Mutex::new(std::collections::HashSet::new()),
            watching: Arc::default(),
            detached: Arc::default(),
            agents: Arc::new(CommitCache::new(AGENT_CACHE_MAX)),
            limits,
            source,
            current_rows: Arc::new(CommitCache::new(CURRENT_CACHE_MAX)),
            signing_key,
            signing_public,
            class_keys: Arc::new(CommitCache::new(usize::MAX)),
            stopping: tokio::sync::watch::Sender::new(false),
            _open_lock: open_lock,
            backup_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            unknown_denials: Default::default(),
        })
    }

    /// Ends every open `Watch` stream (with UNAVAILABLE, so clients
    /// reconnect), and stops the scheduler between secrets, for a graceful
    /// shutdown.
    pub fn stop_watches(&self) {
        self.stopping.send_replace(true);
    }

    /// The broker's Ed25519 public key (hex), which signs certificates.
    pub fn broker_key(&self) -> String {
        hex(&self.signing_public)
    }

    /// Where the root key came from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// A short HMAC fingerprint of a presented token, for the audit trail:
    /// it links attempts with the same token without revealing it.
    pub fn token_fingerprint(&self, token: &str) -> String {
        let mac = self.fingerprint_key.mac(&[token.as_bytes()]);
        format!("token:{}", hex(&mac[..8]))
    }

    /// Appends one audit record on its own (denials, and reads such as
    /// listings, which change nothing else). Only a store failure can fail
    /// it: no savepoint.
    pub async fn audit(&self, entry: Entry) -> Result<()> {
        self.store
            .write_unguarded(move |ctx| ctx.audit(&entry))
            .await
    }

    /// Records a denial and hands back the error that caused it.
    pub(crate) async fn deny(
        &self,
        actor: String,
        action: &str,
        target: &str,
        request_id: &str,
        err: Error,
    ) -> Error {
        let entry = Entry {
            time: now(),
            actor,
            action: action.into(),
            target: target.into(),
            allowed: false,
            reason: err.to_string(),
            request_id: request_id.into(),
        };
        match self.audit(entry).await {
            Ok(()) => err,
            // Nothing is done unaudited: if even the denial cannot be
            // recorded, say the store is unavailable.
            Err(e) => e,
        }
    }

    /// [`Broker::deny`] for a caller with no valid credential (none, an
    /// unknown token, several): anyone who can connect can send such calls
    /// as fast as the broker answers, and a record for each would let them
    /// fill the disk and keep the writer busy. The first
    /// [`UNKNOWN_DENIALS_RECORDED`] in each [`UNKNOWN_DENIALS_WINDOW`] are
    /// recorded one by one; the rest are counted, refused the same way, and
    /// recorded as one `auth.refused` summary when the window ends (written
    /// by the next such call, the sweeper's tick or the shutdown).
    pub(crate) async fn deny_unknown(
        &self,
        actor: String,
        action: &str,
        target: &str,
        request_id: &str,
        err: Error,
    ) -> Error {
        if let Err(e) = self.flush_denials(false).await {
            return e;
        }
        let record = {
            let mut w = self
                .unknown_denials
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if w.recorded < UNKNOWN_DENIALS_RECORDED {
                w.recorded += 1;
                true
            } else {
                *w.suppressed.entry(action.to_string()).or_insert(0) += 1;
                false
            }
        };
        if record {
            self.deny(actor, action, target, request_id, err).await
        } else {
            err
        }
    }

    /// Records the calls without a valid credential that were refused past
    /// the per-window limit and only counted, once their window has ended (or
    /// now, with `all`, at shutdown), and starts a new window.
    pub async fn flush_denials(&self, all: bool) -> Result<()> {
        let (since, counted) = {
            let mut w = self
                .unknown_denials
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !all && w.started.elapsed() < UNKNOWN_DENIALS_WINDOW {
                return Ok(());
            }
            let since = w.started.elapsed().as_secs().max(1);
            let counted = std::mem::take(&mut w.suppressed);
            *w = UnknownDenials::default();
            (since, counted)
        };
        if counted.is_empty() {
            return Ok(());
        }
        let total: u64 = counted.values().sum();
        let each: Vec<String> = counted.iter().map(|(a, n)| format!("{a} ×{n}")).collect();
        tracing::warn!(
            refused = total,
            "calls without a valid credential were refused faster than they are recorded one \
             by one; counted in an auth.refused audit record"
        );
        let recorded = self.audit(Entry {
            time: now(),
            actor: audit::ACTOR_SYSTEM.into(),
            action: "auth.refused".into(),
            target: "*".into(),
            allowed: false,
            reason: format!(
                "{total} more calls without a valid credential were refused in the last {since}s \
                 ({}); the first {UNKNOWN_DENIALS_RECORDED} of each {}s are recorded one by one",
                each.join(", "),
                UNKNOWN_DENIALS_WINDOW.as_secs()
            ),
            request_id: String::new(),
        })
        .await;
        if recorded.is_err() {
            // Counted again, for the next try.
            let mut w = self
                .unknown_denials
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (action, n) in counted {
                *w.suppressed.entry(action).or_insert(0) += n;
            }
        }
        recorded
    }

    /// Checks an admin bearer token (constant time). A failure is audited.
    pub async fn authenticate_admin(
        &self,
        token: Option<&str>,
        action: &str,
        target: &str,
        request_id: &str,
    ) -> Result<()> {
        let ok = token.is_some_and(|t| ct_eq(&token_hash(t), &self.admin_token_hash));
        if ok {
            return Ok(());
        }
        let actor = token.map_or_else(|| "anonymous".to_string(), |t| self.token_fingerprint(t));
        let err = Error::Unauthenticated(match token {
            None => "no admin credential: send `authorization: Bearer <admin token>` \
                     (the CLI reads TESSERA_ADMIN_TOKEN or the data dir's admin.token)"
                .into(),
            Some(t) if t.starts_with("tsr_") => "this is an agent token (tsr_…), and admin \
                        calls take the admin credential (tsa_…): use the token `tessera init` \
                        wrote to admin.token"
                .into(),
            Some(_) => "the admin credential is not valid for this broker; use the token \
                        `tessera init` wrote to admin.token"
                .into(),
        });
        Err(self
            .deny_unknown(actor, action, target, request_id, err)
            .await)
    }

    /// Walks the whole audit chain and its stored head.
    pub async fn verify_audit(
        &self,
        request_id: &str,
        checkpoints: &[String],
    ) -> Result<proto::VerifyAuditResponse> {
        // Checkpoints are checked first: a bad one is the caller's mistake.
        let n = checkpoints.len();
        if n > MAX_CHECKPOINTS {
            return Err(Error::invalid(
                "checkpoint",
                format!("give at most {MAX_CHECKPOINTS} checkpoints at once (got {n})"),
            ));
        }
        let mut checkpoints = checkpoints
            .iter()
            .enumerate()
            .map(|(i, text)| {
                crate::checkpoint::verify(text, &self.signing_public).map_err(|e| {
                    Error::invalid("checkpoint", format!("{e} (checkpoint {} of {n})", i + 1))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The earliest checkpoint the trail fails is where it diverged.
        checkpoints.sort_by_key(|cp| cp.seq);
        let verdict = self.store.read(|conn| {
            let verdict = walk_chain(conn, &self.audit_key)?;
            if !matches!(verdict, Verdict::Intact { .. }) {
                return Ok(verdict);
            }
            for cp in &checkpoints {
                if let Some(broken) = check_checkpoint(conn, cp)? {
                    return Ok(broken);
                }
            }
            Ok(verdict)
        })?;
        let resp = match verdict {
            Verdict::Intact { records } => proto::VerifyAuditResponse {
                ok: true,
                records,
                first_bad_seq: 0,
                problem: String::new(),
            },
            Verdict::Broken { seq, problem } => proto::VerifyAuditResponse {
                ok: false,
                records: 0,
                first_bad_seq: seq,
                problem: format!("audit record {seq} is not intact: {problem}"),
            },
        };
        let reason = if resp.ok {
            format!("{} records intact", resp.records)
        } else {
            resp.problem.clone()
        };
        let request_id = request_id.to_string();
        self.store
            .write(move |ctx| {
                ctx.audit(&Entry {
                    time: now(),
                    actor: ACTOR_ADMIN.into(),
                    action: "audit.verify".into(),
                    target: "audit".into(),
                    allowed: true,
                    reason,
                    request_id,
                })
            })
            .await?;
        Ok(resp)
    }

    /// Appends an `audit.checkpoint` record and returns the trail's head
    /// after it, signed with the broker's key, to be kept off the machine.
    pub async fn checkpoint_audit(&self, request_id: &str) -> Result<proto::AuditCheckpoint> {
        let request_id = request_id.to_string();
        let head = self
            .store
            .write(move |ctx| {
                ctx.audit(&Entry {
                    time: now(),
                    actor: ACTOR_ADMIN.into(),
                    action: "audit.checkpoint".into(),
                    target: "audit".into(),
                    allowed: true,
                    reason: "signed checkpoint of the trail, this record included".into(),
                    request_id,
                })?;
                Ok(ctx.audit_head())
            })
            .await?;
        let cp = crate::checkpoint::Checkpoint {
            broker_key: self.signing_public,
            seq: head.0,
            hash: head.1,
            time: now(),
        };
        let text = cp.sign(&self.signing_key).map_err(Error::Internal)?;
        Ok(proto::AuditCheckpoint {
            text,
            seq: cp.seq,
            hash: hex(&cp.hash),
            time: cp.time,
        })
    }

    /// Audit records from `from_seq` (and at or after `since`), at most
    /// `limit` of them, for streaming to a SIEM.
    pub fn audit_page(
        &self,
        from_seq: u64,
        since: i64,
        limit: usize,
    ) -> Result<Vec<proto::AuditRecord>> {
        self.store.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, time, actor, action, target, decision, reason, request_id,
                        prev_hash, hash FROM audit WHERE seq >= ?1 AND time >= ?2
                 ORDER BY seq LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![from_seq as i64, since, limit as i64])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let rec = row_to_record(r)?;
                out.push(proto::AuditRecord {
                    seq: rec.seq,
                    time: rec.entry.time,
                    actor: rec.entry.actor,
                    action: rec.entry.action,
                    target: rec.entry.target,
                    decision: audit::decision(rec.entry.allowed).into(),
                    reason: rec.entry.reason,
                    request_id: rec.entry.request_id,
                    prev_hash: hex(&rec.prev_hash),
                    hash: hex(&rec.hash),
                });
            }
            Ok(out)
        })
    }

    /// Counts for `tessera status`.
    pub fn status(&self) -> Result<proto::StatusResponse> {
        let (store_commits, store_writes) = self.store.write_stats();
        self.store.read(|conn| {
            let count = |sql: &str| -> Result<u64> {
                Ok(conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
            };
            Ok(proto::StatusResponse {
                sealed: false,
                unseal_source: self.source.name().into(),
                secrets: count("SELECT count(*) FROM secrets")?,
                agents: conn.query_row(
                    "SELECT count(*) FROM agents
                     WHERE revoked_at IS NULL AND coalesce(expires_at > ?1, 1)",
                    [crate::init::now()],
                    |r| r.get::<_, i64>(0),
                )? as u64,
                active_leases: conn.query_row(
                    "SELECT count(*) FROM leases WHERE state = 0 AND expires_at > ?1",
                    [crate::init::now()],
                    |r| r.get::<_, i64>(0),
                )? as u64,
                audit_records: count("SELECT coalesce(max(seq), 0) FROM audit")?,
                version: env!("CARGO_PKG_VERSION").into(),
                broker_key: self.broker_key(),
                unseal_received: 0,
                unseal_threshold: 0,
                store_commits,
                store_writes,
                tampered: rowmac::tampered_rows(conn, &self.row_key, &self.store_id)?,
            })
        })
    }

    /// Returns once no rotation run on a task of its own is still going
    /// (a client that asked for it may have gone).
    pub async fn detached_done(&self) {
        drop(self.detached.write().await);
    }

    /// Returns once every acknowledged write is committed (for shutdown).
    pub async fn flush(&self) -> Result<()> {
        self.store.flush().await
    }

    /// Decrypts a value sealed under a data key wrapped by the root key.
    /// `e`, unless the store was re-keyed by another process since this
    /// one unsealed it: that explains a key that does not open.
    pub(crate) fn unopened(&self, e: Error) -> Error {
        match self.store.read(|conn| self.root_key.replaced(conn)) {
            Ok(true) => root_key_replaced(),
            _ => e,
        }
    }

    /// Decrypts version `version` of `name` from its stored row.
    pub(crate) fn open_value(
        &self,
        name: &str,
        version: u64,
        wrapped_key: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let tampered = || {
            Error::Tampered(format!(
                "stored data of secret {name:?} version {version} failed authentication: the \
                 database row was altered or moved. Restore the store from a backup or put the \
                 secret again"
            ))
        };
        let Some(dk_raw) = self
            .root_key
            .open(&crate::keys::data_key_aad(name, version), wrapped_key)
        else {
            // Not the row's fault if this process's key was replaced.
            return Err(self.unopened(tampered()));
        };
        let dk = SymmetricKey::from_bytes(&dk_raw)?;
        dk.open(&crate::keys::value_aad(name, version), ciphertext)
            .ok_or_else(tampered)
    }
}

/// Most checkpoints one `audit verify` checks.
const MAX_CHECKPOINTS: usize = 64;

/// Whether the trail still holds the record `cp` was signed over.
fn check_checkpoint(
    conn: &rusqlite::Connection,
    cp: &crate::checkpoint::Checkpoint,
) -> Result<Option<Verdict>> {
    let hash: Option<Vec<u8>> = conn
        .query_row(
            "SELECT hash FROM audit WHERE seq = ?1",
            [cp.seq as i64],
            |r| r.get(0),
        )
        .optional()?;
    let problem = match hash {
        Some(h) if ct_eq(&h, &cp.hash) => return Ok(None),
        Some(_) => format!(
            "it differs from the checkpoint signed {}, so the trail differs at or before it: \
             the store was rolled back to an older copy (and written since) or rewritten",
            time_text(cp.time)
        ),
        None => format!(
            "the trail ends before it, but a checkpoint signed {} covers it: the store was \
             rolled back to an older copy or its newest records were removed",
            time_text(cp.time)
        ),
    };
    Ok(Some(Verdict::Broken {
        seq: cp.seq,
        problem,
    }))
}

fn time_text(t: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
    )
    .to_string()
}

/// Walks the whole audit trail in stored order against its stored head.
pub(crate) fn walk_chain(conn: &rusqlite::Connection, key: &SymmetricKey) -> Result<Verdict> {
    // The rows and the head from one snapshot: a commit between two reads
    // would move the head past the last row read, which reads as deleted
    // records.
    let _snapshot = if conn.is_autocommit() {
        Some(conn.unchecked_transaction()?)
    } else {
        None
    };
    let mut v = audit::Verifier::new(key);
    let mut stmt = conn.prepare(
        "SELECT seq, time, actor, action, target, decision, reason, request_id,
                prev_hash, hash FROM audit ORDER BY rowid",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        v.push(&row_to_record(r)?);
    }
    let head = meta_get(conn, "audit_head")?.and_then(|h| store::parse_head(&h));
    Ok(v.finish(head))
}

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<audit::Record> {
    let h = |v: Vec<u8>| -> [u8; 32] { v.try_into().unwrap_or([0; 32]) };
    let decision: String = r.get(5)?;
    Ok(audit::Record {
        seq: r.get::<_, i64>(0)? as u64,
        entry: Entry {
            time: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            // Anything but the exact word "allow" reads as a denial, and
            // the chain hash catches the edit either way.
            allowed: decision == "allow",
            reason: r.get(6)?,
            request_id: r.get(7)?,
        },
        prev_hash: h(r.get(8)?),
        hash: h(r.get(9)?),
    })
}

/// A key that must outlive root key rotations (the audit chain's, the token
/// fingerprints'): derived from the first root key, and after a `rekey root`
/// kept in `meta` wrapped by the current one. `None` before any rekey.
fn stable_key(
    conn: &rusqlite::Connection,
    store_id: &str,
    rk: &RootKey,
    which: &str,
) -> Option<Result<SymmetricKey>> {
    let sealed = meta_get(conn, &format!("{which}_key_wrapped")).ok()??;
    Some(
        rk.open(&stable_key_aad(store_id, which), &sealed)
            .ok_or_else(|| {
                Error::Tampered(format!(
                    "the stored {which} key failed authentication; restore the store from a backup"
                ))
            })
            .and_then(|raw| SymmetricKey::from_bytes(&raw)),
    )
}

/// AAD of a stable key wrapped by the root key.
pub(crate) fn stable_key_aad(store_id: &str, which: &str) -> Vec<u8> {
    format!("tessera/v1/stable-key/{which}/{store_id}").into_bytes()
}

/// Reads the broker's signing key, sealed by the root key in `meta`, making
/// one on first start (stores made before certificates existed have none).
fn load_signing_key(
    conn: &rusqlite::Connection,
    store_id: &str,
    rk: &RootKey,
) -> Result<Zeroizing<Vec<u8>>> {
    let aad = crate::keys::signing_key_aad(store_id);
    if let Some(sealed) = meta_get(conn, "broker_signing_key")? {
        return rk.open(&aad, &sealed).ok_or_else(|| {
            Error::Tampered(
                "the broker's sealed signing key failed authentication; restore the store from \
                 a backup"
                    .into(),
            )
        });
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| Error::Internal("cannot generate the broker's signing key".into()))?;
    let pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
    store::meta_set(conn, "broker_signing_key", &rk.seal(&aad, &pkcs8)?)?;
    Ok(pkcs8)
}

/// The root key's source recorded in the store in `dir`, without unsealing
/// (so the CLI knows whether to ask for a passphrase).
pub fn peek_source(dir: &DataDir) -> Result<Source> {
    let conn = store::open_rw(&dir.db(), false)?;
    unseal::recorded_source(&conn)
}
