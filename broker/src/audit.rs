//! The audit trail: append-only records, each chained to the previous one by
//! an HMAC keyed from the root key, so that a changed, deleted, inserted or
//! reordered record breaks the chain, and nobody without the root key can
//! forge a consistent replacement.
//!
//! Records never hold a secret value or a token: a token that fails to
//! authenticate appears as an HMAC fingerprint.

use std::borrow::Cow;

use crate::keys::SymmetricKey;

/// Who or what acted.
pub const ACTOR_ADMIN: &str = "admin";
/// The broker itself (sweeps, start-up).
pub const ACTOR_SYSTEM: &str = "system";

/// One record, before it is placed in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Unix seconds.
    pub time: i64,
    /// `admin`, `agent:NAME`, `token:FINGERPRINT`, `system`.
    pub actor: String,
    /// What was attempted, e.g. `lease.issue`.
    pub action: String,
    /// What it was attempted on (secret name, agent name, lease id).
    pub target: String,
    /// Allowed or denied.
    pub allowed: bool,
    /// Why, in words; never a secret.
    pub reason: String,
    /// The caller's request id.
    pub request_id: String,
}

/// A record as stored: the entry, its place, and its links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the trail, from 1, without gaps.
    pub seq: u64,
    /// The entry.
    pub entry: Entry,
    /// Hash of the previous record (zeros for the first).
    pub prev_hash: [u8; 32],
    /// This record's chained hash.
    pub hash: [u8; 32],
}

/// Longest target a record keeps, in bytes (names are at most 128).
pub const MAX_TARGET: usize = 256;
/// Longest reason a record keeps, in bytes.
pub const MAX_REASON: usize = 1024;

impl Entry {
    /// The entry as it is stored: a target or reason that came from a
    /// caller (a name that failed validation, an unknown lease id, sent
    /// before any token was checked) is cut to [`MAX_TARGET`] /
    /// [`MAX_REASON`] bytes, and control characters are escaped, so that
    /// nobody can fill the permanent trail or put terminal escapes in
    /// `audit export`. Borrowed when nothing needs changing (the usual
    /// case).
    pub fn bounded(&self) -> std::borrow::Cow<'_, Entry> {
        let (target, reason) = (
            bounded(&self.target, MAX_TARGET),
            bounded(&self.reason, MAX_REASON),
        );
        if matches!((&target, &reason), (Cow::Borrowed(_), Cow::Borrowed(_))) {
            return Cow::Borrowed(self);
        }
        Cow::Owned(Entry {
            target: target.into_owned(),
            reason: reason.into_owned(),
            ..self.clone()
        })
    }
}

/// `s` cut to `max` bytes (on a character boundary, saying how long it
/// was) with control characters escaped.
fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(max.min(s.len()) + 32);
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            out.push_str(&format!("… ({} bytes)", s.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The decision word stored for `allowed`.
pub fn decision(allowed: bool) -> &'static str {
    if allowed { "allow" } else { "deny" }
}

/// The chained hash of a record at `seq` after `prev_hash`.
pub fn chain_hash(key: &SymmetricKey, seq: u64, prev_hash: &[u8; 32], e: &Entry) -> [u8; 32] {
    key.mac(&[
        b"tessera/v1/audit-record",
        prev_hash,
        &seq.to_be_bytes(),
        &e.time.to_be_bytes(),
        e.actor.as_bytes(),
        e.action.as_bytes(),
        e.target.as_bytes(),
        decision(e.allowed).as_bytes(),
        e.reason.as_bytes(),
        e.request_id.as_bytes(),
    ])
}

/// The MAC over the chain's head (last seq and hash), kept beside the
/// records so that deleting the newest records is detected too.
pub fn head_mac(key: &SymmetricKey, seq: u64, hash: &[u8; 32]) -> [u8; 32] {
    key.mac(&[b"tessera/v1/audit-head", &seq.to_be_bytes(), hash])
}

/// Where the chain stands: the last record's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// Last sequence number (0 when empty).
    pub seq: u64,
    /// Last hash (zeros when empty).
    pub hash: [u8; 32],
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record links and recomputes; the head matches.
    Intact {
        /// How many records were checked.
        records: u64,
    },
    /// The first place where the chain breaks.
    Broken {
        /// Sequence number (or position) of the first bad record.
        seq: u64,
        /// What is wrong there.
        problem: String,
    },
}

/// Walks records in stored order and checks each link. `records` must be in
/// ascending storage order; `head` is the stored head and its MAC.
pub struct Verifier<'k> {
    key: &'k SymmetricKey,
    expected_seq: u64,
    prev: [u8; 32],
    broken: Option<(u64, String)>,
}

impl<'k> Verifier<'k> {
    /// Starts a walk from the beginning of the trail.
    pub fn new(key: &'k SymmetricKey) -> Self {
        Verifier {
            key,
            expected_seq: 1,
            prev: [0; 32],
            broken: None,
        }
    }

    /// Checks the next record; after the first break, later ones are ignored.
    pub fn push(&mut self, r: &Record) {
        if self.broken.is_some() {
            return;
        }
        let problem = if r.seq != self.expected_seq {
            Some(format!(
                "expected record {} but found record {}: a record was deleted, inserted or reordered",
                self.expected_seq, r.seq
            ))
        } else if !crate::keys::ct_eq(&r.prev_hash, &self.prev) {
            Some("its previous-hash link does not match the record before it".to_string())
        } else if !crate::keys::ct_eq(
            &chain_hash(self.key, r.seq, &r.prev_hash, &r.entry),
            &r.hash,
        ) {
            Some("its contents do not match its hash: the record was changed".to_string())
        } else {
            None
        };
        match problem {
            Some(p) => self.broken = Some((self.expected_seq, p)),
            None => {
                self.expected_seq += 1;
                self.prev = r.hash;
            }
        }
    }

    /// Ends the walk against the stored head.
    pub fn finish(self, head: Option<(Head, [u8; 32])>) -> Verdict {
        if let Some((seq, problem)) = self.broken {
            return Verdict::Broken { seq, problem };
        }
        let last = self.expected_seq - 1;
        match head {
            None if last == 0 => Verdict::Intact { records: 0 },
            None => Verdict::Broken {
                seq: last,
                problem: "the stored chain head is missing".into(),
            },
            Some((h, mac)) => {
                if !crate::keys::ct_eq(&head_mac(self.key, h.seq, &h.hash), &mac) {
                    Verdict::Broken {
                        seq: h.seq,
                        problem: "the stored chain head fails authentication".into(),
                    }
                } else if h.seq != last || !crate::keys::ct_eq(&h.hash, &self.prev) {
                    Verdict::Broken {
                        seq: last + 1,
                        problem: format!(
                            "the trail ends at record {last} but the chain head says {}: \
                             newest records were deleted",
                            h.seq
                        ),
                    }
                } else {
                    Verdict::Intact { records: last }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_stored_bounded_and_escaped() {
        let e = entry(1);
        assert!(matches!(e.bounded(), Cow::Borrowed(_)));
        let long = Entry {
            target: format!("\u{1b}]0;{}", "é".repeat(MAX_TARGET)),
            reason: "x".repeat(MAX_REASON + 1),
            ..entry(1)
        };
        let b = long.bounded();
        assert!(b.target.starts_with("\\u{1b}]0;éé"), "{}", b.target);
        assert!(
            b.target
                .ends_with(&format!("… ({} bytes)", long.target.len()))
        );
        assert!(b.target.len() < MAX_TARGET + 32);
        assert!(!b.reason.chars().any(char::is_control));
        assert!(b.reason.len() < MAX_REASON + 32);
        assert_eq!((b.actor.as_str(), b.time), ("admin", 1));
    }

    fn entry(n: i64) -> Entry {
        Entry {
            time: n,
            actor: "admin".into(),
            action: "secret.put".into(),
            target: format!("s{n}"),
            allowed: true,
            reason: String::new(),
            request_id: "r".into(),
        }
    }

    fn chain(key: &SymmetricKey, n: u64) -> Vec<Record> {
        let mut prev = [0; 32];
        (1..=n)
            .map(|seq| {
                let e = entry(seq as i64);
                let hash = chain_hash(key, seq, &prev, &e);
                let r = Record {
                    seq,
                    entry: e,
                    prev_hash: prev,
                    hash,
                };
                prev = hash;
                r
            })
            .collect()
    }

    fn verify(key: &SymmetricKey, rs: &[Record], head: Head) -> Verdict {
        let mut v = Verifier::new(key);
        rs.iter().for_each(|r| v.push(r));
        v.finish(Some((head, head_mac(key, head.seq, &head.hash))))
    }

    #[test]
    fn intact_chain_verifies_and_every_kind_of_edit_is_caught() {
        let key = SymmetricKey::generate().expect("random");
        let rs = chain(&key, 5);
        let head = Head {
            seq: 5,
            hash: rs[4].hash,
        };
        assert_eq!(verify(&key, &rs, head), Verdict::Intact { records: 5 });

        let mut changed = rs.clone();
        changed[2].entry.target = "other".into();
        assert!(matches!(
            verify(&key, &changed, head),
            Verdict::Broken { seq: 3, .. }
        ));

        let mut deleted = rs.clone();
        deleted.remove(1);
        assert!(matches!(
            verify(&key, &deleted, head),
            Verdict::Broken { seq: 2, .. }
        ));

        let mut reordered = rs.clone();
        reordered.swap(1, 2);
        assert!(matches!(
            verify(&key, &reordered, head),
            Verdict::Broken { seq: 2, .. }
        ));

        let truncated = &rs[..4];
        assert!(matches!(
            verify(&key, truncated, head),
            Verdict::Broken { seq: 5, .. }
        ));
    }
}
