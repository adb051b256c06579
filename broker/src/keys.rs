//! The key hierarchy: the root key, per-version data keys, and the AEAD that
//! binds every ciphertext to the row it belongs to.
//!
//! Sealed blobs are `nonce (12 bytes) || ciphertext || tag (16 bytes)`,
//! AES-256-GCM with a random nonce and a caller-given AAD.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// Length of every symmetric key in the hierarchy (256 bits).
pub const KEY_LEN: usize = 32;

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::Internal("the operating system's random source failed".into()))
}

/// A 256-bit symmetric key that zeroizes on drop and never prints itself.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SymmetricKey([u8; KEY_LEN]);

impl SymmetricKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut k = [0u8; KEY_LEN];
        fill_random(&mut k)?;
        Ok(SymmetricKey(k))
    }

    /// Takes key bytes; fails unless exactly 32 bytes are given.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| Error::Tampered("stored key material has the wrong length".into()))?;
        Ok(SymmetricKey(arr))
    }

    /// The raw key bytes, for wrapping or handing to a keychain.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key is valid for AES-256"),
        )
    }

    /// Encrypts `plaintext` bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| Error::Internal("encryption failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts a blob made by [`SymmetricKey::seal`] with the same `aad`.
    /// Returns `None` when the blob was altered, moved to another row, or
    /// sealed under another key.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let len = self
            .aead()
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }

    /// HMAC-SHA256 of `parts` under this key (parts are length-prefixed, so
    /// their boundaries are part of what is authenticated).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&key);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let tag = ctx.sign();
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// A key derived from this one for a named purpose (HMAC as a PRF), so
    /// that one purpose's key never serves another.
    pub fn derive(&self, purpose: &str) -> SymmetricKey {
        SymmetricKey(self.mac(&[b"tessera/v1/derive", purpose.as_bytes()]))
    }
}

/// The root key (RK): wraps every data key. Unsealed once at start.
pub type RootKey = SymmetricKey;

/// AAD for a data key wrapped by the root key.
pub fn data_key_aad(name: &str, version: u64) -> Vec<u8> {
    aad(&[
        b"tessera/v1/data-key",
        name.as_bytes(),
        &version.to_be_bytes(),
    ])
}

/// AAD for a secret value sealed under its data key.
pub fn value_aad(name: &str, version: u64) -> Vec<u8> {
    aad(&[b"tessera/v1/value", name.as_bytes(), &version.to_be_bytes()])
}

/// AAD for a retention class key wrapped by the root key.
pub fn class_key_aad(class: &str, generation: u64) -> Vec<u8> {
    aad(&[
        b"tessera/v1/class-key",
        class.as_bytes(),
        &generation.to_be_bytes(),
    ])
}

/// AAD for an envelope data key wrapped by a class key: bound to the class,
/// the key's row and the caller's encryption context.
pub fn class_data_key_aad(class: &str, id: u64, context: &[u8]) -> Vec<u8> {
    aad(&[
        b"tessera/v1/class-data-key",
        class.as_bytes(),
        &id.to_be_bytes(),
        context,
    ])
}

/// AAD for data sealed under an envelope data key.
pub fn envelope_aad(class: &str, id: u64, context: &[u8]) -> Vec<u8> {
    aad(&[
        b"tessera/v1/envelope",
        class.as_bytes(),
        &id.to_be_bytes(),
        context,
    ])
}

/// AAD for the broker's Ed25519 signing key wrapped by the root key.
pub fn signing_key_aad(store_id: &str) -> Vec<u8> {
    aad(&[b"tessera/v1/broker-signing-key", store_id.as_bytes()])
}

/// The digest of an encryption context: SHA-256 of its canonical form
/// (pairs sorted by key, each part length-prefixed), so equal maps always
/// give equal bytes. Stored beside each envelope data key so the key can be
/// re-wrapped (at a holder handover) without the context itself.
pub fn context_digest(context: &std::collections::HashMap<String, String>) -> [u8; 32] {
    let mut pairs: Vec<(&String, &String)> = context.iter().collect();
    pairs.sort();
    let parts: Vec<&[u8]> = pairs
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()])
        .collect();
    sha256(&aad(&parts))
}

fn aad(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Constant-time equality of two digests.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    fn val(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

/// A random identifier with a readable prefix, e.g. `lse_3f9a…` (128 bits).
pub fn random_id(prefix: &str) -> Result<String> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    Ok(format!("{prefix}{}", hex(&b)))
}

/// A request id for a call that brought none: `req_`, 8 random bytes drawn
/// once per process, then a counter, in hex. Unique (it only correlates
/// log lines and audit records; nothing is granted by knowing one), and
/// costs no system call per request.
pub fn request_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        // Without a random source, a clock reading still keeps ids from
        // one run apart from the next.
        if fill_random(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            b = t.to_be_bytes();
        }
        hex(&b)
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("req_{prefix}{n:016x}")
}

/// A lease id: `lse_`, 6 bytes of milliseconds since the epoch, 10 random
/// bytes (80 bits), in hex. Time-ordered, so new leases append to the end of
/// the index instead of landing on random pages.
pub fn lease_id(now_ms: u64) -> Result<String> {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
    fill_random(&mut b[6..])?;
    Ok(format!("lse_{}", hex(&b)))
}

/// A bearer token: a prefix that secret scanners recognise (`tsr_` for
/// agents, `tsa_` for admins) and 256 random bits.
pub struct Token(Zeroizing<String>);

impl Token {
    /// A fresh token with `prefix`.
    pub fn generate(prefix: &str) -> Result<Self> {
        let mut b = Zeroizing::new([0u8; 32]);
        fill_random(&mut b[..])?;
        Ok(Token(Zeroizing::new(format!("{prefix}{}", hex(&b[..])))))
    }

    /// The token text, for showing it the one time it is shown.
    pub fn reveal_once(&self) -> &str {
        &self.0
    }

    /// What the store keeps: SHA-256 of the token. Tokens carry 256 random
    /// bits, so a fast hash is enough (no dictionary to attack).
    pub fn hash(&self) -> [u8; 32] {
        token_hash(&self.0)
    }
}

/// The stored form of a presented token.
pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_value_is_bound_to_its_row() {
        let k = SymmetricKey::generate().expect("random");
        let blob = k.seal(&value_aad("a", 1), b"hello").expect("seal");
        assert_eq!(
            k.open(&value_aad("a", 1), &blob).expect("opens").as_slice(),
            b"hello"
        );
        assert!(k.open(&value_aad("a", 2), &blob).is_none());
        assert!(k.open(&value_aad("b", 1), &blob).is_none());
        let other = SymmetricKey::generate().expect("random");
        assert!(other.open(&value_aad("a", 1), &blob).is_none());
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert!(k.open(&value_aad("a", 1), &bad).is_none());
    }

    #[test]
    fn request_ids_are_unique_and_keep_their_shape() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| request_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let hexpart = id.strip_prefix("req_").expect("req_ prefix");
            assert_eq!(hexpart.len(), 32, "{id}");
            assert!(hexpart.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::generate("tsr_").expect("random");
        assert!(!format!("{t:?}").contains(&t.reveal_once()[4..]));
        assert!(t.reveal_once().starts_with("tsr_"));
        assert_eq!(t.reveal_once().len(), 4 + 64);
    }
}
