//! The shred ceremony's rules: when one may open, the canonical statement
//! holders sign, and how joins are judged. Time is passed in as unix
//! seconds; nothing here reads a clock.

use crate::{Error, hex, unhex};

/// First line of every ceremony statement.
pub const STATEMENT_MAGIC: &str = "tessera-shred-statement-v1";

/// Default time a ceremony stays open: 72 hours.
pub const DEFAULT_EXPIRY_SECS: i64 = 72 * 3600;

/// What the ceremony does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Shred at or after the retention deadline.
    Shred,
    /// Shred before the deadline (stricter threshold).
    ShredEarly,
}

impl Action {
    /// The word used in statements.
    pub fn name(self) -> &'static str {
        match self {
            Action::Shred => "shred",
            Action::ShredEarly => "shred-early",
        }
    }

    /// Parses the statement word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "shred" => Some(Action::Shred),
            "shred-early" => Some(Action::ShredEarly),
            _ => None,
        }
    }
}

/// The canonical statement every joining holder signs. Every field is
/// public: signing it proves consent, it reveals nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Ceremony id.
    pub ceremony: String,
    /// Retention class.
    pub class: String,
    /// The class key's check value.
    pub key_fingerprint: [u8; 32],
    /// Retention deadline (unix seconds).
    pub deadline: i64,
    /// Random nonce, so a signature never carries over to another ceremony.
    pub nonce: [u8; 16],
    /// What is being done.
    pub action: Action,
    /// When the ceremony expires (unix seconds).
    pub expires: i64,
}

impl Statement {
    /// The exact bytes holders sign.
    pub fn to_text(&self) -> String {
        format!(
            "{STATEMENT_MAGIC}\nceremony: {}\nclass: {}\nkey-fingerprint: {}\ndeadline: {}\n\
             nonce: {}\naction: {}\nexpires: {}\n",
            self.ceremony,
            self.class,
            hex(&self.key_fingerprint),
            self.deadline,
            hex(&self.nonce),
            self.action.name(),
            self.expires
        )
    }

    /// Parses the canonical text (strict: it must re-serialize identically).
    pub fn parse(text: &str) -> Result<Statement, Error> {
        let bad = |m: &str| Error::MalformedDocument(format!("ceremony statement: {m}"));
        let mut lines = text.lines();
        if lines.next() != Some(STATEMENT_MAGIC) {
            return Err(bad("does not start with tessera-shred-statement-v1"));
        }
        let mut field = |name: &str| -> Result<String, Error> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(": "))
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("missing {name}")))
        };
        let s = Statement {
            ceremony: field("ceremony")?,
            class: field("class")?,
            key_fingerprint: unhex(&field("key-fingerprint")?)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| bad("bad key-fingerprint"))?,
            deadline: field("deadline")?
                .parse()
                .map_err(|_| bad("bad deadline"))?,
            nonce: unhex(&field("nonce")?)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| bad("bad nonce"))?,
            action: Action::parse(&field("action")?).ok_or_else(|| bad("bad action"))?,
            expires: field("expires")?.parse().map_err(|_| bad("bad expires"))?,
        };
        if s.to_text() != text {
            return Err(bad("not in canonical form"));
        }
        Ok(s)
    }
}

/// Why a ceremony may not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenRefusal {
    /// A legal hold stands; names it.
    Hold {
        /// The hold's reason, as placed.
        reason: String,
    },
    /// The deadline has not passed and the ceremony is not marked early.
    BeforeDeadline {
        /// The retention deadline.
        deadline: i64,
    },
    /// The class is already shredded.
    AlreadyShredded,
}

/// Decides whether a ceremony may open at `now`, and which action and how
/// many distinct roles it needs. `holds` are the reasons of standing holds.
pub fn may_open(
    now: i64,
    deadline: i64,
    early: bool,
    shredded: bool,
    holds: &[String],
    threshold: u8,
    early_threshold: u8,
) -> Result<(Action, u8), OpenRefusal> {
    if shredded {
        return Err(OpenRefusal::AlreadyShredded);
    }
    if let Some(reason) = holds.first() {
        return Err(OpenRefusal::Hold {
            reason: reason.clone(),
        });
    }
    if now >= deadline {
        Ok((Action::Shred, threshold))
    } else if early {
        Ok((Action::ShredEarly, early_threshold.max(threshold)))
    } else {
        Err(OpenRefusal::BeforeDeadline { deadline })
    }
}

/// Why a join is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The ceremony expired before the join.
    Expired,
    /// The signature does not verify under the role's current key.
    BadSignature,
}

/// Judges a join: the ceremony must be live and the signature must be the
/// role's current key over exactly this statement.
pub fn judge_join(
    statement: &Statement,
    now: i64,
    role_key: &[u8; 32],
    signature: &[u8],
) -> Result<(), JoinRefusal> {
    if now >= statement.expires {
        return Err(JoinRefusal::Expired);
    }
    if !crate::holder::verify(role_key, statement.to_text().as_bytes(), signature) {
        return Err(JoinRefusal::BadSignature);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        Statement {
            ceremony: "cer_1".into(),
            class: "sox-7y".into(),
            key_fingerprint: [1; 32],
            deadline: 1000,
            nonce: [2; 16],
            action: Action::Shred,
            expires: 2000,
        }
    }

    #[test]
    fn statement_round_trips_canonically() {
        let s = statement();
        assert_eq!(Statement::parse(&s.to_text()).expect("parse"), s);
        assert!(
            Statement::parse(&s.to_text().replace("deadline: 1000", "deadline: 01000")).is_err()
        );
    }

    #[test]
    fn open_rules() {
        let holds = vec!["litigation 2026-17".to_string()];
        assert_eq!(
            may_open(999, 1000, false, false, &[], 2, 3),
            Err(OpenRefusal::BeforeDeadline { deadline: 1000 })
        );
        assert_eq!(
            may_open(999, 1000, true, false, &[], 2, 3),
            Ok((Action::ShredEarly, 3))
        );
        assert_eq!(
            may_open(1000, 1000, false, false, &[], 2, 3),
            Ok((Action::Shred, 2))
        );
        assert!(matches!(
            may_open(5000, 1000, false, false, &holds, 2, 3),
            Err(OpenRefusal::Hold { .. })
        ));
        assert_eq!(
            may_open(5000, 1000, false, true, &[], 2, 3),
            Err(OpenRefusal::AlreadyShredded)
        );
    }

    #[test]
    fn joins_need_the_right_key_the_right_statement_and_time() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        let pubkey = crate::holder::public_of(pkcs8.as_ref()).expect("pub");
        let s = statement();
        let sig = crate::holder::sign(pkcs8.as_ref(), s.to_text().as_bytes()).expect("sign");
        assert_eq!(judge_join(&s, 1500, &pubkey, &sig), Ok(()));
        assert_eq!(
            judge_join(&s, 2000, &pubkey, &sig),
            Err(JoinRefusal::Expired)
        );
        let mut other = s.clone();
        other.nonce = [3; 16];
        assert_eq!(
            judge_join(&other, 1500, &pubkey, &sig),
            Err(JoinRefusal::BadSignature)
        );
        assert_eq!(
            judge_join(&s, 1500, &[9; 32], &sig),
            Err(JoinRefusal::BadSignature)
        );
    }
}
