//! `tessera rekey root`: a new root key in the configured unseal source.
//! Every secret version's data key, every class key, the broker's signing
//! key and the keys that must stay stable (audit chain, token fingerprints,
//! row MACs) are re-wrapped under it in one transaction; no value is
//! re-encrypted.
//!
//! Interrupted, it resumes: the new key is put in its source first (a
//! keychain entry of the next generation, or nothing on disk for a
//! passphrase or operator shares until the transaction), then one
//! transaction switches everything. Before that commit the store still
//! opens with the old key and a re-run starts over; after it, the store
//! opens with the new key and the old keychain entry is removed (again at
//! the next start if a crash came first).
//!
//! An operator-share store has nothing on disk that holds its key, so its
//! re-key takes two calls: `prepare` makes the new key and hands out its
//! shares, changing nothing; `commit` switches the store once the caller
//! has kept them. A crash, a lost reply or a killed client can then never
//! leave a store whose only key existed in a dead process's memory.

use std::sync::Arc;

use rusqlite::params;
use zeroize::Zeroizing;

use crate::agent::admin_entry;
use crate::broker::{Broker, stable_key_aad};
use crate::error::{Error, Result};
use crate::fault;
use crate::keys::{RootKey, class_key_aad, data_key_aad, signing_key_aad};
use crate::proto;
use crate::store::{meta_get, meta_set};
use crate::unseal::{self, KdfParams, OperatorSplit, Source};

/// An operator-share re-key prepared and not yet committed (kept in
/// memory only: a restart forgets it, and the old shares stay in effect).
pub(crate) struct Pending {
    id: String,
    generation: u64,
    key: Zeroizing<Vec<u8>>,
    fingerprint: [u8; 32],
    split: OperatorSplit,
}

impl Broker {
    /// Rotates the root key (see the module doc).
    pub async fn rekey_root(
        &self,
        request_id: &str,
        mut req: proto::RekeyRootRequest,
    ) -> Result<proto::RekeyRootResponse> {
        // One rekey at a time: two would both write the next generation.
        let mut pending = self.rekey_lock.lock().await;
        let passphrase = Zeroizing::new(std::mem::take(&mut req.passphrase));
        let store_id = self.store_id.clone();
        let generation = self.store.read(unseal::root_generation)?;
        let next = generation + 1;
        let mut new_rk = RootKey::generate()?;
        // The new key in its source, before anything in the store changes.
        let mut passphrase_wrap = None;
        let mut operator_shares = Vec::new();
        let mut fingerprint = None;
        let source = self.source();
        if !matches!(source, Source::Shares)
            && (req.shares != 0 || req.threshold != 0 || req.prepare || !req.commit.is_empty())
        {
            let e = Error::invalid(
                "shares",
                "this store's root key is not split among operators (it is sealed by the OS \
                 keychain or a passphrase, and stays so): leave out --shares and --threshold",
            );
            return Err(self
                .deny("admin".into(), "root.rekey", "root-key", request_id, e)
                .await);
        }
        let new_bytes;
        let prepared: Result<()> = match source {
            Source::Keychain(which) => {
                new_bytes = Zeroizing::new(new_rk.expose_bytes().to_vec());
                let item = unseal::root_item_gen(which, &store_id, next);
                let bytes = new_bytes.clone();
                tokio::task::spawn_blocking(move || item.write(bytes))
                    .await
                    .map_err(|e| Error::Internal(format!("keychain task: {e}")))?
            }
            Source::Passphrase => {
                new_bytes = Zeroizing::new(new_rk.expose_bytes().to_vec());
                if passphrase.is_empty() {
                    Err(Error::invalid(
                        "passphrase",
                        "this store's root key is sealed by a passphrase: give it (TESSERA_PASSPHRASE) so it can seal the new key",
                    ))
                } else {
                    let current = self.root_key.current();
                    let id = store_id.clone();
                    let p = passphrase.clone();
                    let ok = self.store.read(|conn| {
                        let rk = unseal::unseal(conn, &id, Some(&p))?;
                        Ok(crate::keys::ct_eq(
                            rk.expose_bytes(),
                            current.expose_bytes(),
                        ))
                    });
                    match ok {
                        Ok(true) => {
                            let (id, p) = (store_id.clone(), passphrase.clone());
                            let k = RootKey::from_bytes(&new_bytes)?;
                            passphrase_wrap = Some(
                                tokio::task::spawn_blocking(move || {
                                    unseal::wrap_with_passphrase(&id, &k, &p, KdfParams::default())
                                })
                                .await
                                .map_err(|e| Error::Internal(format!("kdf task: {e}")))??,
                            );
                            Ok(())
                        }
                        Ok(false) | Err(Error::WrongPassphrase) => Err(Error::WrongPassphrase),
                        Err(e) => Err(e),
                    }
                }
            }
            Source::Shares if !req.commit.is_empty() => match pending.take() {
                Some(p) if p.id == req.commit && p.generation == next => {
                    new_rk = RootKey::from_bytes(&p.key)?;
                    new_bytes = p.key;
                    fingerprint = Some((p.fingerprint, p.split));
                    Ok(())
                }
                other => {
                    *pending = other;
                    new_bytes = Zeroizing::new(Vec::new());
                    Err(Error::FailedPrecondition(
                        "no re-key with this id is waiting to be committed (the broker \
                             restarted, or another `rekey root` replaced or finished it); \
                             nothing was changed and the old operator shares still unseal \
                             this store: run `tessera rekey root` again"
                            .into(),
                    ))
                }
            },
            Source::Shares => {
                new_bytes = Zeroizing::new(new_rk.expose_bytes().to_vec());
                if req.shares == 0 || req.threshold == 0 {
                    Err(Error::invalid(
                        "shares",
                        "this store's root key is split among operators: give --shares N and --threshold K for the new split",
                    ))
                } else if !req.prepare {
                    Err(Error::invalid(
                        "prepare",
                        "an operator-share store is re-keyed in two steps (prepare, then \
                         commit once the new shares are kept); use `tessera rekey root` of \
                         this version",
                    ))
                } else {
                    let count = |n: u32| u8::try_from(n).unwrap_or(u8::MAX);
                    let split = OperatorSplit {
                        threshold: count(req.threshold),
                        shares: count(req.shares),
                    };
                    if req.shares > 255 || req.threshold > 255 {
                        Err(Error::invalid(
                            "shares",
                            "at most 255 shares can be made, with a threshold of at most 255",
                        ))
                    } else {
                        unseal::split_root_key(&new_rk, split).map(|(s, fp)| {
                            operator_shares = s;
                            fingerprint = Some((fp, split));
                        })
                    }
                }
            }
        };
        if let Err(e) = prepared {
            return Err(self
                .deny("admin".into(), "root.rekey", "root-key", request_id, e)
                .await);
        }
        if let Some((fingerprint, split)) = fingerprint.filter(|_| req.commit.is_empty()) {
            let id = crate::keys::random_id("rk_")?;
            *pending = Some(Pending {
                id: id.clone(),
                generation: next,
                key: new_bytes,
                fingerprint,
                split,
            });
            self.audit(admin_entry(
                "root.rekey",
                "root-key",
                true,
                format!(
                    "root key generation {next} prepared, split {} of {}; not in effect until \
                     committed",
                    split.threshold, split.shares
                ),
                request_id,
            ))
            .await?;
            return Ok(proto::RekeyRootResponse {
                generation: next,
                operator_shares: operator_shares.iter().map(|s| s.to_string()).collect(),
                pending_id: id,
                versions_rewrapped: 0,
                classes_rewrapped: 0,
            });
        }
        let handle = Arc::clone(&self.root_key);
        let swap_handle = Arc::clone(&self.root_key);
        let new_for_swap = RootKey::from_bytes(&new_bytes)?;
        let old_for_undo = self.root_key.current();
        let audit_bytes = Zeroizing::new(self.audit_key.expose_bytes().to_vec());
        let fingerprint_bytes = Zeroizing::new(self.fingerprint_key.expose_bytes().to_vec());
        let row_bytes = Zeroizing::new(self.row_key.expose_bytes().to_vec());
        let rid = request_id.to_string();
        let id = store_id.clone();
        let forget_rows = self.current_rows.forget_on_commit();
        let counts = self
            .store
            .write_then(
                move |ctx| {
                    let c = ctx.conn;
                    if unseal::root_generation(c)? != generation {
                        return Err(Error::FailedPrecondition(
                            "the root key was rotated meanwhile; nothing was changed, run \
                             `tessera rekey root` again if another rotation is wanted"
                                .into(),
                        ));
                    }
                    let tampered = |what: String| {
                        Error::Tampered(format!(
                            "{what} failed authentication under the current root key; nothing \
                             was changed"
                        ))
                    };
                    let rows: Vec<(String, i64, Vec<u8>)> = c
                        .prepare("SELECT name, version, wrapped_key FROM secret_versions WHERE length(wrapped_key) > 0")?
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect::<rusqlite::Result<_>>()?;
                    for (name, version, w) in &rows {
                        let aad = data_key_aad(name, *version as u64);
                        let dk = handle
                            .open(&aad, w)
                            .ok_or_else(|| tampered(format!("version {version} of {name}")))?;
                        c.execute(
                            "UPDATE secret_versions SET wrapped_key = ?3 WHERE name = ?1 AND version = ?2",
                            params![name, version, new_rk.seal(&aad, &dk)?],
                        )?;
                    }
                    let classes: Vec<(String, i64, Vec<u8>)> = c
                        .prepare("SELECT name, generation, wrapped_key FROM classes WHERE wrapped_key IS NOT NULL")?
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect::<rusqlite::Result<_>>()?;
                    for (name, generation, w) in &classes {
                        let aad = class_key_aad(name, *generation as u64);
                        let ck = handle
                            .open(&aad, w)
                            .ok_or_else(|| tampered(format!("the key of class {name}")))?;
                        c.execute(
                            "UPDATE classes SET wrapped_key = ?2 WHERE name = ?1",
                            params![name, new_rk.seal(&aad, &ck)?],
                        )?;
                    }
                    if let Some(sealed) = meta_get(c, "broker_signing_key")? {
                        let aad = signing_key_aad(&id);
                        let sk = handle
                            .open(&aad, &sealed)
                            .ok_or_else(|| tampered("the broker's signing key".into()))?;
                        meta_set(c, "broker_signing_key", &new_rk.seal(&aad, &sk)?)?;
                    }
                    meta_set(c, "audit_key_wrapped", &new_rk.seal(&stable_key_aad(&id, "audit"), &audit_bytes)?)?;
                    meta_set(
                        c,
                        "fingerprint_key_wrapped",
                        &new_rk.seal(&stable_key_aad(&id, "fingerprint"), &fingerprint_bytes)?,
                    )?;
                    meta_set(c, "rows_key_wrapped", &new_rk.seal(&stable_key_aad(&id, "rows"), &row_bytes)?)?;
                    if let Some((salt, kdf_params, wrapped)) = &passphrase_wrap {
                        meta_set(c, "kdf_salt", salt)?;
                        meta_set(c, "kdf_params", kdf_params)?;
                        meta_set(c, "wrapped_root_key", wrapped)?;
                    }
                    if let Some((fp, split)) = fingerprint {
                        meta_set(c, "root_key_fingerprint", &fp)?;
                        meta_set(c, "unseal_threshold", &[split.threshold])?;
                        meta_set(c, "unseal_shares", &[split.shares])?;
                    }
                    meta_set(c, "root_key_check", &unseal::check_value(&new_rk))?;
                    meta_set(c, "root_key_generation", &next.to_be_bytes())?;
                    meta_set(c, "compact_pending", b"1")?;
                    fault("rekey-before-commit");
                    ctx.audit(&admin_entry(
                        "root.rekey",
                        "root-key",
                        true,
                        format!(
                            "root key generation {next}: {} data keys and {} class keys re-wrapped",
                            rows.len(),
                            classes.len()
                        ),
                        &rid,
                    ))?;
                    // Jobs later in this batch must already seal with the
                    // new key (the re-wrap above cannot see their rows); if
                    // the batch rolls back, the hook below swaps back.
                    handle.swap(Arc::new(new_for_swap));
                    Ok((rows.len() as u64, classes.len() as u64))
                },
                move |committed| {
                    // Cached rows hold data keys wrapped by the old key.
                    forget_rows(committed);
                    let swapped = swap_handle.generation_swapped();
                    if !committed && swapped {
                        swap_handle.swap(old_for_undo);
                        let _ = swap_handle.generation_swapped();
                    }
                },
            )
            .await?;
        fault("rekey-after-commit");
        if let Source::Keychain(which) = self.source() {
            let old = unseal::root_item_gen(which, &store_id, generation);
            let _ = tokio::task::spawn_blocking(move || old.delete()).await;
        }
        self.compact_if_pending().await?;
        Ok(proto::RekeyRootResponse {
            generation: next,
            versions_rewrapped: counts.0,
            classes_rewrapped: counts.1,
            operator_shares: Vec::new(),
            pending_id: String::new(),
        })
    }
}
