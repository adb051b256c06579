//! Where the root key comes from at start: the OS keychain (default), a
//! passphrase (Argon2id wraps the root key), or k of n operator shares
//! (Shamir; the broker starts sealed and waits for `tessera unseal`). A
//! wrong passphrase, a missing keychain entry or a wrong share is a clear
//! error that changes nothing.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keys::{RootKey, SymmetricKey, ct_eq};
use crate::store::{meta_get, meta_set};

/// Keychain service name under which root keys are kept.
pub const KEYCHAIN_SERVICE: &str = "tessera";

/// How long a keychain call may take before we give up (a locked keyring
/// with no display can otherwise wait on a prompt).
const KEYCHAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The root key's source, as recorded in the store at `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The OS keychain (Secret Service on Linux).
    Keychain(KeychainStore),
    /// An Argon2id-derived key from a passphrase wraps the root key.
    Passphrase,
    /// The root key is split k-of-n among operators; nothing on disk opens
    /// it. The broker starts sealed until k shares arrive.
    Shares,
}

/// The `class` field of an operator share's envelope.
pub const ROOT_SHARE_CLASS: &str = "tessera-root-key";

/// Which OS credential store holds the root key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeychainStore {
    /// The OS keychain: on Linux the Secret Service over D-Bus
    /// (gnome-keyring, KWallet), on macOS the login keychain.
    Os,
    /// The Linux kernel keyutils session keyring (lost at logout/reboot).
    Keyutils,
}

impl Source {
    /// The name stored in the store and shown to users.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Keychain(KeychainStore::Os) => "keychain",
            Source::Keychain(KeychainStore::Keyutils) => "keyutils",
            Source::Passphrase => "passphrase",
            Source::Shares => "shares",
        }
    }

    /// Parses a stored or user-given name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "keychain" | "secret-service" => Some(Source::Keychain(KeychainStore::Os)),
            "keyutils" => Some(Source::Keychain(KeychainStore::Keyutils)),
            "passphrase" => Some(Source::Passphrase),
            "shares" => Some(Source::Shares),
            _ => None,
        }
    }
}

/// Argon2id cost used when wrapping a root key under a passphrase.
#[derive(Debug, Clone, Copy)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        // OWASP's first Argon2id recommendation is m=46 MiB, t=1; we take
        // 64 MiB and 3 passes: about a third of a second here, once per start.
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        }
    }
}

fn kek_from_passphrase(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<SymmetricKey> {
    let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(32))
        .map_err(|e| Error::Store(format!("stored Argon2 parameters are invalid: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|e| Error::Internal(format!("Argon2id failed: {e}")))?;
    SymmetricKey::from_bytes(&out[..])
}

fn root_aad(store_id: &str) -> Vec<u8> {
    format!("tessera/v1/root-key/{store_id}").into_bytes()
}

/// The check value stored beside the key's source: tells the right root key
/// from a wrong one without revealing anything about it.
pub fn check_value(rk: &RootKey) -> [u8; 32] {
    rk.mac(&[b"tessera/v1/root-key-check", b"row-macs", b"retention-macs"])
}

/// The check value of stores whose agent, secret and admin rows carry MACs
/// but whose holder and class rows do not yet: such a store adopts those
/// at the next start, then records [`check_value`].
fn rows_only_check_value(rk: &RootKey) -> [u8; 32] {
    rk.mac(&[b"tessera/v1/root-key-check", b"row-macs"])
}

/// Whether the store records the check value of a store whose holder and
/// class rows carry no MACs yet (so they are to be adopted).
pub(crate) fn retention_macs_pending(conn: &Connection, rk: &RootKey) -> Result<bool> {
    let check = meta_get(conn, "root_key_check")?.unwrap_or_default();
    Ok(ct_eq(&check, &rows_only_check_value(rk)))
}

/// The check value of stores made before agent rows and the admin
/// credential carried MACs (see `rowmac`): such a store adopts its rows at
/// the next start, then records [`check_value`].
fn legacy_check_value(rk: &RootKey) -> [u8; 32] {
    rk.mac(&[b"tessera/v1/root-key-check"])
}

/// Whether the store still records the check value of a store without row
/// MACs (so its rows are to be adopted).
pub(crate) fn row_macs_pending(conn: &Connection, rk: &RootKey) -> Result<bool> {
    let check = meta_get(conn, "root_key_check")?.unwrap_or_default();
    Ok(ct_eq(&check, &legacy_check_value(rk)))
}

/// How a root key split among operators is split.
#[derive(Debug, Clone, Copy)]
pub struct OperatorSplit {
    /// Shares needed to unseal.
    pub threshold: u8,
    /// Shares made.
    pub shares: u8,
}

/// Records `rk` with `source` in a freshly created store. For `Shares`,
/// returns the operator share envelopes (`tessera-share-v1` text), which
/// exist nowhere else.
pub fn seal_root_key(
    conn: &Connection,
    store_id: &str,
    rk: &RootKey,
    source: Source,
    passphrase: Option<&[u8]>,
    kdf: KdfParams,
    split: Option<OperatorSplit>,
) -> Result<Vec<Zeroizing<String>>> {
    let mut operator_shares = Vec::new();
    match source {
        Source::Shares => {
            let split = split.ok_or_else(|| {
                Error::invalid(
                    "shares",
                    "give --shares N and --threshold K for --unseal shares",
                )
            })?;
            let (shares, fingerprint) = split_root_key(rk, split)?;
            operator_shares = shares;
            meta_set(conn, "root_key_fingerprint", &fingerprint)?;
            meta_set(conn, "unseal_threshold", &[split.threshold])?;
            meta_set(conn, "unseal_shares", &[split.shares])?;
        }
        Source::Passphrase => {
            let passphrase = passphrase.ok_or_else(|| {
                Error::invalid(
                    "passphrase",
                    "a passphrase is required for --unseal passphrase",
                )
            })?;
            if passphrase.len() < 8 {
                return Err(Error::invalid(
                    "passphrase",
                    "use at least 8 characters (a long random phrase is best)",
                ));
            }
            let (salt, params, wrapped) = wrap_with_passphrase(store_id, rk, passphrase, kdf)?;
            meta_set(conn, "kdf_salt", &salt)?;
            meta_set(conn, "kdf_params", &params)?;
            meta_set(conn, "wrapped_root_key", &wrapped)?;
        }
        Source::Keychain(which) => {
            keychain_set(which, store_id, rk)?;
        }
    }
    meta_set(conn, "unseal_source", source.name().as_bytes())?;
    meta_set(conn, "root_key_check", &check_value(rk))?;
    Ok(operator_shares)
}

/// Splits `rk` into operator share envelopes; returns them and the key's
/// fingerprint (its check value).
pub fn split_root_key(
    rk: &RootKey,
    split: OperatorSplit,
) -> Result<(Vec<Zeroizing<String>>, [u8; 32])> {
    let (k, n) = (split.threshold as usize, split.shares as usize);
    tessera_shred::shamir::check_threshold(k, n)
        .map_err(|e| Error::invalid("threshold", e.to_string()))?;
    let fingerprint = tessera_shred::key_check(rk.expose_bytes());
    let shares = tessera_shred::split(rk.expose_bytes(), k, n, &mut crate::retention::OsRandom)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut out = Vec::new();
    for (i, share) in shares.into_iter().enumerate() {
        let env = tessera_shred::envelope::ShareEnvelope {
            class: ROOT_SHARE_CLASS.into(),
            key_fingerprint: fingerprint,
            threshold: split.threshold,
            shares: split.shares,
            role: format!("operator-{}", i + 1),
            share,
        };
        out.push(env.to_text());
    }
    Ok((out, fingerprint))
}

/// What a store sealed by operator shares expects: (threshold, shares,
/// key fingerprint).
pub fn operator_split(conn: &Connection) -> Result<(u8, u8, [u8; 32])> {
    let byte = |k: &str| -> Result<u8> {
        meta_get(conn, k)?
            .and_then(|v| v.first().copied())
            .ok_or_else(|| Error::Store(format!("the store lacks {k}; was `init` interrupted?")))
    };
    let fp: [u8; 32] = meta_get(conn, "root_key_fingerprint")?
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Store("the store lacks its root key fingerprint".into()))?;
    Ok((byte("unseal_threshold")?, byte("unseal_shares")?, fp))
}

/// Checks that `rk` is this store's root key.
pub fn check_root_key(conn: &Connection, rk: &RootKey, source: Source) -> Result<()> {
    let check = meta_get(conn, "root_key_check")?.unwrap_or_default();
    let known = [
        check_value(rk),
        rows_only_check_value(rk),
        legacy_check_value(rk),
    ];
    if !known.iter().any(|k| ct_eq(&check, k)) {
        return Err(Error::FailedPrecondition(format!(
            "the root key from the {} does not belong to this store (key check failed); \
             nothing was changed. Is TESSERA_DATA_DIR pointing at the right store?",
            source.name()
        )));
    }
    Ok(())
}

/// Reads the source recorded at `init`.
pub fn recorded_source(conn: &Connection) -> Result<Source> {
    let raw = meta_get(conn, "unseal_source")?
        .ok_or_else(|| Error::Store("the store has no root key recorded; was `init` interrupted? Re-run `tessera init` on an empty data dir".into()))?;
    let s = String::from_utf8_lossy(&raw).to_string();
    Source::parse(&s).ok_or_else(|| Error::Store(format!("unknown unseal source {s:?} in store")))
}

/// Gets the root key back from its recorded source and checks it.
pub fn unseal(conn: &Connection, store_id: &str, passphrase: Option<&[u8]>) -> Result<RootKey> {
    let source = recorded_source(conn)?;
    let rk = match source {
        Source::Passphrase => {
            let passphrase = passphrase.ok_or_else(|| {
                Error::FailedPrecondition(
                    "this store is sealed with a passphrase: set TESSERA_PASSPHRASE, pass \
                     --passphrase-file, or run from a terminal to be prompted"
                        .into(),
                )
            })?;
            let salt = meta_get(conn, "kdf_salt")?.unwrap_or_default();
            let params = meta_get(conn, "kdf_params")?.unwrap_or_default();
            let wrapped = meta_get(conn, "wrapped_root_key")?.unwrap_or_default();
            if params.len() != 12 {
                return Err(Error::Store("stored Argon2 parameters are missing".into()));
            }
            let num = |i: usize| u32::from_be_bytes(params[i..i + 4].try_into().unwrap_or([0; 4]));
            let kdf = KdfParams {
                m_kib: num(0),
                t: num(4),
                p: num(8),
            };
            let kek = kek_from_passphrase(passphrase, &salt, kdf)?;
            let raw = kek
                .open(&root_aad(store_id), &wrapped)
                .ok_or(Error::WrongPassphrase)?;
            SymmetricKey::from_bytes(&raw)?
        }
        Source::Keychain(which) => {
            let raw = root_item_gen(which, store_id, root_generation(conn)?).read()?;
            SymmetricKey::from_bytes(&raw)?
        }
        Source::Shares => {
            return Err(Error::FailedPrecondition(
                "sealed: this store's root key is split among operators; start `tessera serve` \
                 and give it the shares with `tessera unseal`"
                    .into(),
            ));
        }
    };
    check_root_key(conn, &rk, source)?;
    Ok(rk)
}

fn keychain_user(store_id: &str) -> String {
    format!("root-key/{store_id}")
}

#[cfg(target_os = "linux")]
fn credential_store(
    which: KeychainStore,
    what: &str,
) -> Result<Arc<keyring_core::CredentialStore>> {
    let store: Arc<keyring_core::CredentialStore> = match which {
        KeychainStore::Os => zbus_secret_service_keyring_store::Store::new()
            .map_err(|e| keychain_error(&e, which, what, "open the Secret Service keychain"))?,
        KeychainStore::Keyutils => linux_keyutils_keyring_store::Store::new()
            .map_err(|e| keychain_error(&e, which, what, "open the kernel keyutils keyring"))?,
    };
    Ok(store)
}

#[cfg(target_os = "macos")]
fn credential_store(
    which: KeychainStore,
    what: &str,
) -> Result<Arc<keyring_core::CredentialStore>> {
    let store: Arc<keyring_core::CredentialStore> = match which {
        KeychainStore::Os => apple_native_keyring_store::keychain::Store::new()
            .map_err(|e| keychain_error(&e, which, what, "open the macOS keychain"))?,
        KeychainStore::Keyutils => return Err(not_here("the kernel keyutils keyring")),
    };
    Ok(store)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn credential_store(
    _which: KeychainStore,
    _what: &str,
) -> Result<Arc<keyring_core::CredentialStore>> {
    Err(not_here("an OS keychain store"))
}

#[cfg(not(target_os = "linux"))]
fn not_here(what: &str) -> Error {
    Error::Keychain(format!(
        "this build of tessera has no {what} on this system; use --unseal keychain where \
         available, passphrase or shares"
    ))
}

/// How to unlock the OS keychain, and what to do when it cannot be reached,
/// on this system.
#[cfg(target_os = "macos")]
const KEYCHAIN_UNLOCK: &str = "unlock it (log in, or `security unlock-keychain`)";
#[cfg(target_os = "macos")]
const KEYCHAIN_HINT: &str = "unlock the login keychain (`security unlock-keychain`)";
#[cfg(not(target_os = "macos"))]
const KEYCHAIN_UNLOCK: &str =
    "unlock it (e.g. log in to the desktop, or `gnome-keyring-daemon --unlock`)";
#[cfg(not(target_os = "macos"))]
const KEYCHAIN_HINT: &str = "start a Secret Service (gnome-keyring) in a D-Bus session";

/// Runs a keychain call on its own thread with a timeout: a keyring that
/// wants to prompt with no display must not hang the broker.
fn with_timeout<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(KEYCHAIN_TIMEOUT).unwrap_or_else(|_| {
        Err(Error::Keychain(format!(
            "the OS keychain did not answer within {}s while trying to {what}; is it locked \
             and waiting for a password prompt? Unlock it, or keep the key elsewhere \
             (`--unseal passphrase` for a store, `--identity-file` for a holder key)",
            KEYCHAIN_TIMEOUT.as_secs()
        )))
    })
}

/// A named item in an OS keychain: which store, the service and user it is
/// filed under, and what it is (for messages).
#[derive(Debug, Clone)]
pub struct KeychainItem {
    /// The keychain backend.
    pub store: KeychainStore,
    /// Service name, e.g. `tessera` or `tessera-holder`.
    pub service: String,
    /// User name within the service.
    pub user: String,
    /// What the item is, e.g. "root key"; used in error messages.
    pub what: &'static str,
}

impl KeychainItem {
    fn entry(&self, doing: &str) -> Result<keyring_core::Entry> {
        let store = credential_store(self.store, self.what)?;
        keyring_core::Entry::new_in_store(&store, &self.service, &self.user)
            .map_err(|e| keychain_error(&e, self.store, self.what, doing))
    }

    /// Stores `bytes` (replacing any previous value).
    pub fn write(&self, bytes: Zeroizing<Vec<u8>>) -> Result<()> {
        let item = self.clone();
        with_timeout(format!("store the {}", self.what), move || {
            item.entry("create the keychain entry")?
                .set_secret(&bytes)
                .map_err(|e| {
                    keychain_error(
                        &e,
                        item.store,
                        item.what,
                        &format!("store the {}", item.what),
                    )
                })
        })
    }

    /// Reads the stored bytes.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>> {
        let item = self.clone();
        with_timeout(format!("read the {}", self.what), move || {
            Ok(Zeroizing::new(
                item.entry("open the keychain entry")?
                    .get_secret()
                    .map_err(|e| {
                        keychain_error(
                            &e,
                            item.store,
                            item.what,
                            &format!("read the {}", item.what),
                        )
                    })?,
            ))
        })
    }

    /// Whether the item exists (any keychain failure reads as "no").
    pub fn exists(&self) -> bool {
        self.read().is_ok()
    }

    /// Deletes the item.
    pub fn delete(&self) -> Result<()> {
        let item = self.clone();
        with_timeout(format!("delete the {}", self.what), move || {
            item.entry("open the keychain entry")?
                .delete_credential()
                .map_err(|e| {
                    keychain_error(
                        &e,
                        item.store,
                        item.what,
                        &format!("delete the {}", item.what),
                    )
                })
        })
    }
}

fn root_item(which: KeychainStore, store_id: &str) -> KeychainItem {
    root_item_gen(which, store_id, 1)
}

/// The keychain item of root key generation `generation` (1 is the key
/// `init` made; `rekey root` makes the next).
pub fn root_item_gen(which: KeychainStore, store_id: &str, generation: u64) -> KeychainItem {
    KeychainItem {
        store: which,
        service: KEYCHAIN_SERVICE.into(),
        user: if generation <= 1 {
            keychain_user(store_id)
        } else {
            format!("{}/{generation}", keychain_user(store_id))
        },
        what: "root key",
    }
}

/// The store's root key generation (1 until the first `rekey root`).
pub fn root_generation(conn: &Connection) -> Result<u64> {
    Ok(meta_get(conn, "root_key_generation")?
        .and_then(|v| v.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(1))
}

/// The AAD of a passphrase-wrapped root key.
pub fn passphrase_aad(store_id: &str) -> Vec<u8> {
    root_aad(store_id)
}

/// Wraps `rk` under a passphrase: returns (salt, params, wrapped).
pub fn wrap_with_passphrase(
    store_id: &str,
    rk: &RootKey,
    passphrase: &[u8],
    kdf: KdfParams,
) -> Result<([u8; 16], Vec<u8>, Vec<u8>)> {
    let mut salt = [0u8; 16];
    crate::keys::fill_random(&mut salt)?;
    let kek = kek_from_passphrase(passphrase, &salt, kdf)?;
    let wrapped = kek.seal(&root_aad(store_id), rk.expose_bytes())?;
    let mut params = Vec::new();
    for v in [kdf.m_kib, kdf.t, kdf.p] {
        params.extend_from_slice(&v.to_be_bytes());
    }
    Ok((salt, params, wrapped))
}

fn keychain_set(which: KeychainStore, store_id: &str, rk: &RootKey) -> Result<()> {
    root_item(which, store_id).write(Zeroizing::new(rk.expose_bytes().to_vec()))
}

/// Removes this store's root key from the keychain (used when `init` fails
/// half-way, so no orphan key is left behind).
pub fn keychain_delete(which: KeychainStore, store_id: &str) -> Result<()> {
    root_item(which, store_id).delete()
}

fn keychain_error(e: &keyring_core::Error, store: KeychainStore, what: &str, doing: &str) -> Error {
    use keyring_core::Error as K;
    let elsewhere = if what == "holder key" {
        "keep the key in a file with --identity-file"
    } else {
        "for a new store, choose `tessera init --unseal passphrase`"
    };
    let msg = match e {
        // The kernel keyring has no lock and no daemon: gnome-keyring
        // advice would mislead.
        K::NoStorageAccess(inner) | K::PlatformFailure(inner)
            if store == KeychainStore::Keyutils =>
        {
            format!(
                "the kernel keyutils keyring refused (could not {doing}: {inner}); it needs a \
                 session keyring this user may write (a login session; not always there in \
                 containers or services), or {elsewhere}"
            )
        }
        K::NoEntry if what == "root key" => format!(
            "the OS keychain has no root key for this store (could not {doing}); nothing was \
             changed. Was the store initialised by another user or on another machine?"
        ),
        K::NoEntry => {
            format!("the OS keychain has no {what} (could not {doing}); nothing was changed")
        }
        K::NoStorageAccess(_) => format!(
            "the OS keychain is locked or has no default collection (could not {doing}); \
             {KEYCHAIN_UNLOCK} and retry"
        ),
        K::PlatformFailure(inner) => format!(
            "the OS keychain is not reachable (could not {doing}: {inner}); {KEYCHAIN_HINT}, \
             or {elsewhere}"
        ),
        // These two carry the raw stored bytes: never format them.
        K::BadEncoding(_) | K::BadDataFormat(..) => format!(
            "the OS keychain holds something that is not a tessera {what} (could not {doing})"
        ),
        other => format!("the OS keychain failed (could not {doing}): {other}"),
    };
    Error::Keychain(msg)
}
