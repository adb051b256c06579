//! Retention-key logic for tessera: Shamir split/combine over GF(2^8) in the
//! interoperable share format of DESIGN.md, the share envelope sealed to
//! holders, holder public keys, the shred ceremony's statement and rules,
//! and destruction certificates.
//!
//! Pure logic by design: no I/O, no clock, no randomness of its own (time
//! and random bytes are passed in), so every ceremony rule is unit-testable.

#![forbid(unsafe_code)]

pub mod ceremony;
pub mod certificate;
pub mod envelope;
pub mod fuzz;
pub mod gf256;
pub mod holder;
pub mod shamir;

pub use shamir::{Random, Share, combine, split};

/// What can go wrong with shares, statements and certificates. Each variant
/// carries a sentence that says what is wrong; none carries share bytes.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A share or share envelope could not be parsed.
    MalformedShare(String),
    /// Fewer shares than combining needs.
    TooFewShares(String),
    /// Two shares have the same x coordinate (the same holder's share twice).
    DuplicateShare(String),
    /// The shares belong to different secrets or classes.
    MixedShares(String),
    /// The threshold or share count is out of range.
    Threshold(String),
    /// The shares combined to a key whose check value does not match: a
    /// share is wrong, tampered, or too few were given.
    WrongCombination(String),
    /// A holder public key could not be parsed.
    MalformedKey(String),
    /// A statement or certificate could not be parsed.
    MalformedDocument(String),
    /// A signature does not verify.
    BadSignature(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::MalformedShare(m)
            | Error::TooFewShares(m)
            | Error::DuplicateShare(m)
            | Error::MixedShares(m)
            | Error::Threshold(m)
            | Error::WrongCombination(m)
            | Error::MalformedKey(m)
            | Error::MalformedDocument(m)
            | Error::BadSignature(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// A key's check value: HMAC-SHA256 keyed by the key over a fixed label.
/// It identifies the key (it is the key fingerprint in statements and
/// certificates) and tells a right combination of shares from a wrong one,
/// without revealing the key.
pub fn key_check(key: &[u8]) -> [u8; 32] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, b"tessera-key-check-v1");
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case); `None` if malformed.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

/// Combines shares and checks the result against `expected_check`, so that
/// a wrong, tampered or insufficient set of shares is an error rather than
/// a wrong key.
pub fn combine_checked(
    shares: &[Share],
    expected_check: &[u8; 32],
) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
    let key = combine(shares)?;
    let got = key_check(&key);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &expected_check[..])) {
        return Err(Error::WrongCombination(format!(
            "the {} shares do not combine to the key they were made from (check value \
             mismatch): a share \
             is wrong or altered, or fewer shares than the threshold were given",
            shares.len()
        )));
    }
    Ok(key)
}
