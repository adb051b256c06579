//! Creating a store: the data directory, the database, the root key and the
//! admin credential. Also where the data directory's files are named.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::audit::{ACTOR_SYSTEM, Entry};
use crate::error::{Error, Result};
use crate::keys::{RootKey, SymmetricKey, Token, random_id};
use crate::store::{self, Store, meta_set};
use crate::unseal::{self, KdfParams, Source};

/// Held by a running `serve` ([`DataDir::lock_for_serving`]), or on the
/// store's open lock ([`DataDir::lock_open`]); unlocks when dropped.
pub struct ServeLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The files of one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A data directory at `root` (not created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// `$XDG_DATA_HOME/tessera`, else `$HOME/.local/share/tessera`.
    pub fn default_path() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(x).join("tessera");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".local/share/tessera")
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The SQLite database.
    pub fn db(&self) -> PathBuf {
        self.root.join("tessera.db")
    }

    /// The admin token written by `init` (mode 0600).
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    /// The lock a running `serve` holds.
    pub fn serve_lock(&self) -> PathBuf {
        self.root.join("serve.lock")
    }

    /// The default Unix socket of `serve`.
    pub fn socket(&self) -> PathBuf {
        self.root.join("tessera.sock")
    }

    /// The lock every process that opens the store holds (shared), and a
    /// restore takes alone.
    pub fn open_lock(&self) -> PathBuf {
        self.root.join("open.lock")
    }

    /// Takes the store's open lock, shared (`exclusive` false: every
    /// process that opens the store, a broker or an offline `rotate --due`)
    /// or alone (a restore, which replaces the file under them). Never
    /// waits: `None` when it is held the other way.
    pub fn lock_open(&self, exclusive: bool) -> Result<Option<ServeLock>> {
        try_lock(&self.open_lock(), exclusive)
    }

    /// Takes the lock `serve` holds while it runs, so that a second broker
    /// on this store is refused (each would act on what it cached of rows
    /// the other changes). Released when the returned lock is dropped, or
    /// when the process ends, however it ends.
    pub fn lock_for_serving(&self) -> Result<ServeLock> {
        try_lock(&self.serve_lock(), true)?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "another broker is already serving the store in {}; stop it first (two \
                 brokers on one store would each act on what they cached of it)",
                self.root.display()
            ))
        })
    }

    /// The directory and store files that other users may reach, each with
    /// a sentence saying so and how to fix it. tessera creates them private
    /// (0700 and 0600); a directory made beforehand, or modes changed
    /// since, can leave them open.
    pub fn open_to_others(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| m.permissions().mode() & 0o777)
        };
        if let Some(m) = mode(&self.root).filter(|m| m & 0o077 != 0) {
            out.push(format!(
                "the data directory {} has mode {m:03o}: other users can reach into it; \
                 run `chmod 700 {}`",
                self.root.display(),
                self.root.display()
            ));
        }
        let db = self.db();
        let files = [
            db.clone(),
            db.with_extension("db-wal"),
            db.with_extension("db-shm"),
            self.admin_token(),
            self.serve_lock(),
        ];
        for f in files {
            if let Some(m) = mode(&f).filter(|m| m & 0o077 != 0) {
                out.push(format!(
                    "{} has mode {m:03o}: other users may read or change it; run `chmod 600 {}`",
                    f.display(),
                    f.display()
                ));
            }
        }
        out
    }
}

/// Locks the file `path` (made 0600 if missing), alone or shared, without
/// waiting: `None` when it is held the other way.
fn try_lock(path: &Path, exclusive: bool) -> Result<Option<ServeLock>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::Io(format!("cannot open {}: {e}", path.display())))?;
    let how = if exclusive {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    } else {
        nix::fcntl::FlockArg::LockSharedNonblock
    };
    match nix::fcntl::Flock::lock(file, how) {
        Ok(lock) => Ok(Some(ServeLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(Error::Io(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// What `init` needs to know.
pub struct InitOptions {
    /// Where to create the store.
    pub data_dir: DataDir,
    /// Where the root key will live.
    pub source: Source,
    /// The passphrase, for `Source::Passphrase`.
    pub passphrase: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// Argon2id cost for `Source::Passphrase`.
    pub kdf: KdfParams,
    /// How to split the root key for `Source::Shares`.
    pub split: Option<unseal::OperatorSplit>,
}

/// What `init` made.
pub struct Initialized {
    /// The store's random id (names its keychain entry).
    pub store_id: String,
    /// The admin token, to show once; also written to `admin_token_path`.
    pub admin_token: Token,
    /// Where the admin token was written.
    pub admin_token_path: PathBuf,
    /// The database file.
    pub db_path: PathBuf,
    /// For `Source::Shares`: the operator share envelopes, shown once.
    pub operator_shares: Vec<zeroize::Zeroizing<String>>,
}

/// Creates a new store. On any failure, nothing is left behind (no database
/// file, no keychain entry, no token file).
pub async fn init(opts: InitOptions) -> Result<Initialized> {
    let dir = &opts.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.root())
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.root().display())))?;
    let db = dir.db();
    let token_path = dir.admin_token();
    // (With a database present, opening it below explains the refusal.)
    if !db.exists() && token_path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} exists but there is no store next to it (left by another tool or an \
             interrupted init); remove the file or choose another --data-dir",
            token_path.display()
        )));
    }
    let conn = store::open_rw(&db, true)?;
    let store_id = random_id("")?;
    let rk = RootKey::generate()?;
    let admin = Token::generate("tsa_")?;
    let mut wrote_token = false;
    let result = async {
        let operator_shares = unseal::seal_root_key(
            &conn,
            &store_id,
            &rk,
            opts.source,
            opts.passphrase.as_deref().map(|p| &p[..]),
            opts.kdf,
            opts.split,
        )?;
        meta_set(&conn, "store_id", store_id.as_bytes())?;
        crate::rowmac::set_admin_hash(&conn, &row_key(&rk), &store_id, &admin.hash())?;
        write_private_file(&token_path, admin.reveal_once().as_bytes())?;
        wrote_token = true;
        let store = Store::start(&db, conn, audit_key(&rk), 1)?;
        let source = opts.source.name();
        store
            .write(move |ctx| {
                ctx.audit(&Entry {
                    time: now(),
                    actor: ACTOR_SYSTEM.into(),
                    action: "store.init".into(),
                    target: "store".into(),
                    allowed: true,
                    reason: format!("root key sealed by {source}"),
                    request_id: String::new(),
                })
            })
            .await?;
        // Leave everything in the database file and an empty WAL, so the
        // new store is complete in one file (to copy, or to compare).
        store
            .maintain(|conn| {
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })?;
                Ok(())
            })
            .await?;
        Ok(operator_shares)
    }
    .await;
    let operator_shares = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&db);
            let _ = std::fs::remove_file(db.with_extension("db-wal"));
            let _ = std::fs::remove_file(db.with_extension("db-shm"));
            if wrote_token {
                let _ = std::fs::remove_file(&token_path);
            }
            if let Source::Keychain(which) = opts.source {
                let _ = unseal::keychain_delete(which, &store_id);
            }
            return Err(e);
        }
    };
    Ok(Initialized {
        operator_shares,
        store_id,
        admin_token: admin,
        admin_token_path: dir.admin_token(),
        db_path: db,
    })
}

/// The audit chain's key, derived from the root key.
pub fn audit_key(rk: &RootKey) -> SymmetricKey {
    rk.derive("audit-chain")
}

/// The key of the MACs on agent rows and the admin credential (`rowmac`),
/// derived from the root key (kept, wrapped, across a root key rotation).
pub(crate) fn row_key(rk: &RootKey) -> SymmetricKey {
    rk.derive("row-macs")
}

/// Writes `contents` to a new file with mode 0600, refusing to overwrite.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", path.display())))?;
    // The umask cannot widen 0600, but make the mode explicit anyway.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A Unix time as RFC 3339 (UTC), for messages people read.
pub fn rfc3339(t: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
    )
    .to_string()
}
