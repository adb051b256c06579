//! Holder public keys: an age X25519 recipient (shares are sealed to it) and
//! an Ed25519 key (ceremony statements are signed with it), written as one
//! string so an admin enrols a role with a single `--pubkey` value.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::{Error, hex, unhex};

/// Prefix of the printed public key.
pub const PUBKEY_PREFIX: &str = "tessera-holder-v1";

/// A holder's two public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderPublicKey {
    /// The age recipient (`age1…`).
    pub age_recipient: String,
    /// The Ed25519 verification key.
    pub signing_key: [u8; 32],
}

impl HolderPublicKey {
    /// Parses `tessera-holder-v1:age1…:<64 hex>`. The age part is only
    /// checked for shape here; the broker parses it with the age crate.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |m: &str| Error::MalformedKey(format!("{m}; `tessera holder init` prints it"));
        let mut parts = s.trim().split(':');
        if parts.next() != Some(PUBKEY_PREFIX) {
            return Err(bad("a holder public key starts with tessera-holder-v1:"));
        }
        let age = parts.next().unwrap_or_default();
        let sig = parts.next().unwrap_or_default();
        if parts.next().is_some() || !age.starts_with("age1") || age.len() < 10 {
            return Err(bad(
                "a holder public key is tessera-holder-v1:<age recipient>:<ed25519 key>",
            ));
        }
        let signing_key: [u8; 32] = unhex(sig)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("the Ed25519 part of the holder public key is not 64 hex digits"))?;
        Ok(HolderPublicKey {
            age_recipient: age.to_string(),
            signing_key,
        })
    }

    /// The printed form.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBKEY_PREFIX}:{}:{}",
            self.age_recipient,
            hex(&self.signing_key)
        )
    }

    /// A short fingerprint of the signing key, for listings.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.signing_key)
    }
}

/// Short fingerprint of an Ed25519 public key: 16 hex digits of its SHA-256.
pub fn fingerprint(signing_key: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, signing_key);
    hex(&d.as_ref()[..8])
}

/// Signs `message` with a PKCS#8 Ed25519 key (deterministic, no randomness).
pub fn sign(pkcs8: &[u8], message: &[u8]) -> Result<[u8; 64], Error> {
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| {
        Error::MalformedKey("the holder's signing key is not a valid Ed25519 key".into())
    })?;
    let mut out = [0u8; 64];
    out.copy_from_slice(kp.sign(message).as_ref());
    Ok(out)
}

/// The public key of a PKCS#8 Ed25519 key.
pub fn public_of(pkcs8: &[u8]) -> Result<[u8; 32], Error> {
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8)
        .map_err(|_| Error::MalformedKey("the signing key is not a valid Ed25519 key".into()))?;
    let mut out = [0u8; 32];
    out.copy_from_slice(kp.public_key().as_ref());
    Ok(out)
}

/// Whether `signature` is `key`'s signature over `message`.
pub fn verify(key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, signature)
        .is_ok()
}

/// How far a signed holder request's time may be from the broker's clock.
pub const REQUEST_SKEW_SECS: i64 = 300;

/// The text a holder signs to authenticate one request: the role, the RPC
/// method, its target (class or ceremony id) and the time, so a signature
/// cannot be reused for another request or long after.
pub fn request_text(role: &str, method: &str, target: &str, time: i64) -> String {
    format!("tessera-holder-request-v1\n{role}\n{method}\n{target}\n{time}\n")
}
