//! The text envelope around a holder's share (`tessera-share-v1`): it names
//! the class, the key's fingerprint, the threshold, the share count and the
//! role, so that a share read years later with `age -d` explains itself.

use zeroize::Zeroizing;

use crate::{Error, Share, hex, unhex};

/// First line of every share envelope.
pub const MAGIC: &str = "tessera-share-v1";

/// A parsed share envelope. No `Debug`: it holds a share.
pub struct ShareEnvelope {
    /// The retention class the share belongs to.
    pub class: String,
    /// The class key's check value (its fingerprint).
    pub key_fingerprint: [u8; 32],
    /// Shares needed to recombine.
    pub threshold: u8,
    /// Shares made.
    pub shares: u8,
    /// The holder role the share was sealed to.
    pub role: String,
    /// The share itself.
    pub share: Share,
}

impl ShareEnvelope {
    /// The envelope text. Zeroized on drop since it carries the share.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{MAGIC}\nclass: {}\nkey-fingerprint: {}\nthreshold: {}\nshares: {}\nrole: {}\nshare: {}\n",
            self.class,
            hex(&self.key_fingerprint),
            self.threshold,
            self.shares,
            self.role,
            Zeroizing::new(hex(&self.share.to_bytes())).as_str(),
        ))
    }

    /// Parses an envelope strictly: fields in order, nothing else. This is
    /// the fuzz target for untrusted share files.
    pub fn parse(text: &[u8]) -> Result<ShareEnvelope, Error> {
        let text = std::str::from_utf8(text)
            .map_err(|_| bad("the share file is not text; was it decrypted with age -d?"))?;
        let mut lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
        if lines.next().map(|l| l.trim_end_matches('\r')) != Some(MAGIC) {
            return Err(bad(
                "this is not a tessera share (its first line is not tessera-share-v1); \
                 decrypt the .age file first",
            ));
        }
        let mut field = |name: &str| -> Result<String, Error> {
            let line = lines
                .next()
                .ok_or_else(|| bad(&format!("the share has no {name} line")))?;
            let line = line.trim_end_matches('\r');
            line.strip_prefix(name)
                .and_then(|r| r.strip_prefix(": "))
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("expected a {name} line, found another line")))
        };
        let class = field("class")?;
        let fp = field("key-fingerprint")?;
        let threshold = field("threshold")?;
        let shares = field("shares")?;
        let role = field("role")?;
        let share_hex = Zeroizing::new(field("share")?);
        if lines.next().is_some() {
            return Err(bad("the share has lines after its share line"));
        }
        let key_fingerprint: [u8; 32] = unhex(&fp)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("the key fingerprint is not 64 hex digits"))?;
        let threshold: u8 = threshold
            .parse()
            .map_err(|_| bad("the threshold is not a number from 2 to 255"))?;
        let shares: u8 = shares
            .parse()
            .map_err(|_| bad("the share count is not a number from 2 to 255"))?;
        crate::shamir::check_threshold(threshold as usize, shares as usize)?;
        let bytes =
            Zeroizing::new(unhex(&share_hex).ok_or_else(|| bad("the share is not hex digits"))?);
        if class.is_empty() || role.is_empty() {
            return Err(bad("the share names no class or no role"));
        }
        Ok(ShareEnvelope {
            class,
            key_fingerprint,
            threshold,
            shares,
            role,
            share: Share::from_bytes(&bytes)?,
        })
    }
}

fn bad(m: &str) -> Error {
    Error::MalformedShare(m.to_string())
}

/// Combines the shares in `envelopes` after checking they belong together
/// (same class, same key, at least the threshold, no role twice), and
/// checks the result against the key fingerprint.
pub fn combine_envelopes(envelopes: &[ShareEnvelope]) -> Result<Zeroizing<Vec<u8>>, Error> {
    let Some(first) = envelopes.first() else {
        return Err(Error::TooFewShares("no shares given".into()));
    };
    for (i, e) in envelopes.iter().enumerate() {
        if e.class != first.class || e.key_fingerprint != first.key_fingerprint {
            return Err(Error::MixedShares(format!(
                "the share of role {} belongs to class {} (key {}), not to class {} (key {}); \
                 give shares of one class key only",
                e.role,
                e.class,
                &hex(&e.key_fingerprint)[..16],
                first.class,
                &hex(&first.key_fingerprint)[..16]
            )));
        }
        if envelopes[..i].iter().any(|o| o.role == e.role) {
            return Err(Error::DuplicateShare(format!(
                "the share of role {} was given twice; each role's share counts once",
                e.role
            )));
        }
    }
    if envelopes.len() < first.threshold as usize {
        return Err(Error::TooFewShares(format!(
            "{} shares given; class {} needs {} of {}",
            envelopes.len(),
            first.class,
            first.threshold,
            first.shares
        )));
    }
    let shares: Vec<Share> = envelopes
        .iter()
        .map(|e| Share::from_bytes(&e.share.to_bytes()))
        .collect::<Result<_, _>>()?;
    crate::combine_checked(&shares, &first.key_fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let share = Share::from_bytes(&[1, 2, 3, 4]).expect("share");
        let env = ShareEnvelope {
            class: "sox-7y".into(),
            key_fingerprint: [0xab; 32],
            threshold: 2,
            shares: 3,
            role: "legal".into(),
            share,
        };
        let text = env.to_text();
        let back = ShareEnvelope::parse(text.as_bytes()).expect("parse");
        assert_eq!(back.class, "sox-7y");
        assert_eq!(back.role, "legal");
        assert_eq!(&back.share.to_bytes()[..], &[1, 2, 3, 4]);
        for bad in [
            "",
            "tessera-share-v1\n",
            "age-encryption.org/v1\n",
            &text.replace("threshold: 2", "threshold: 1"),
            &text.replace("threshold: 2", "threshold: x"),
            &text.replace("share: 01020304", "share: 0102030"),
            &format!("{}extra\n", text.as_str()),
        ] {
            assert!(ShareEnvelope::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
