//! Destruction certificates: what the broker signs when a class key is
//! shredded, and the offline check of one (`tessera shred certificate
//! verify`). The certificate carries the ceremony statement's fields, every
//! role's public key, the joining holders' signatures, and later the
//! holders' own confirmations that their offline shares are destroyed.

use crate::ceremony::{Action, Statement};
use crate::{Error, hex, holder, unhex};

/// First line of every certificate.
pub const MAGIC: &str = "tessera-destruction-certificate-v1";
const SIGNATURE_LINE: &str = "broker-signature: ";

/// The signed body of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The ceremony statement the holders signed.
    pub statement: Statement,
    /// Distinct roles the ceremony needed.
    pub required: u8,
    /// The class key's threshold k.
    pub key_threshold: u8,
    /// Shares made (n).
    pub shares: u8,
    /// When the key was destroyed (unix seconds).
    pub destroyed_at: i64,
    /// What was destroyed, in words.
    pub destroyed: String,
    /// The broker's Ed25519 public key.
    pub broker_key: [u8; 32],
    /// Every role of the class with its signing key at the time.
    pub holders: Vec<(String, [u8; 32])>,
    /// Joining roles and their signatures over the statement.
    pub joins: Vec<(String, Vec<u8>)>,
}

impl Certificate {
    /// The canonical body the broker signs.
    pub fn body(&self) -> String {
        let s = &self.statement;
        let mut out = format!(
            "{MAGIC}\nclass: {}\nkey-fingerprint: {}\ndeadline: {}\nceremony: {}\nnonce: {}\n\
             action: {}\nexpires: {}\nrequired: {}\nkey-threshold: {}\nshares: {}\n\
             destroyed-at: {}\ndestroyed: {}\nbroker-key: {}\n",
            s.class,
            hex(&s.key_fingerprint),
            s.deadline,
            s.ceremony,
            hex(&s.nonce),
            s.action.name(),
            s.expires,
            self.required,
            self.key_threshold,
            self.shares,
            self.destroyed_at,
            self.destroyed.replace('\n', " "),
            hex(&self.broker_key)
        );
        for (role, key) in &self.holders {
            out.push_str(&format!("holder: {role} {}\n", hex(key)));
        }
        for (role, sig) in &self.joins {
            out.push_str(&format!("join: {role} {}\n", hex(sig)));
        }
        out
    }

    /// The signed certificate text (body plus the broker's signature line).
    pub fn sign(&self, broker_pkcs8: &[u8]) -> Result<String, Error> {
        let body = self.body();
        let sig = holder::sign(broker_pkcs8, body.as_bytes())?;
        Ok(format!("{body}{SIGNATURE_LINE}{}\n", hex(&sig)))
    }
}

/// The text a holder signs to confirm their offline share is destroyed:
/// it names the certificate by the hash of its signed part.
pub fn confirmation_text(certificate_digest: &[u8; 32], role: &str) -> String {
    format!(
        "tessera-share-destroyed-v1\ncertificate: {}\nrole: {role}\n",
        hex(certificate_digest)
    )
}

/// SHA-256 of a certificate's signed part (body and broker signature).
pub fn digest(signed: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, signed.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What an offline check of a certificate established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The certificate body.
    pub certificate: Certificate,
    /// Roles whose confirmation of offline destruction verified.
    pub confirmed: Vec<String>,
}

impl Verified {
    /// Offline shares not yet confirmed destroyed.
    pub fn outstanding(&self) -> usize {
        (self.certificate.shares as usize).saturating_sub(self.confirmed.len())
    }

    /// Whether fewer than k shares can remain anywhere.
    pub fn irrecoverable(&self) -> bool {
        self.outstanding() < self.certificate.key_threshold as usize
    }
}

/// Splits a certificate file into (signed part, confirmation lines).
pub fn split_file(text: &str) -> Result<(&str, Vec<&str>), Error> {
    let at = text
        .find(SIGNATURE_LINE)
        .ok_or_else(|| bad("it has no broker-signature line"))?;
    let end = text[at..]
        .find('\n')
        .map(|i| at + i + 1)
        .ok_or_else(|| bad("the broker-signature line is not terminated"))?;
    let confirms = text[end..].lines().filter(|l| !l.is_empty()).collect();
    Ok((&text[..end], confirms))
}

/// Checks a certificate file offline: the broker's signature (against
/// `pinned_broker_key` when given), every join signature against the role's
/// listed key over the statement, that enough distinct roles joined, and
/// each confirmation line (`confirm: ROLE SIGHEX`).
pub fn verify(text: &str, pinned_broker_key: Option<&[u8; 32]>) -> Result<Verified, Error> {
    let (signed, confirms) = split_file(text)?;
    let cert = parse_body(signed)?;
    let sig_hex = signed
        .lines()
        .last()
        .and_then(|l| l.strip_prefix(SIGNATURE_LINE))
        .ok_or_else(|| bad("the broker signature line is malformed"))?;
    let sig = unhex(sig_hex).ok_or_else(|| bad("the broker signature is not hex"))?;
    if let Some(pin) = pinned_broker_key
        && pin != &cert.broker_key
    {
        return Err(Error::BadSignature(format!(
            "the certificate was signed by broker key {}, not the pinned key {} (`tessera \
             status` shows your broker's key)",
            crate::hex(&cert.broker_key),
            crate::hex(pin)
        )));
    }
    // Byte for byte as the broker wrote it: the body is parsed leniently
    // (`+10`, `010`, lines in another order), and a text the signature
    // check accepted in another spelling would name another digest.
    if cert.sign_check(&sig).is_err()
        || signed != format!("{}{SIGNATURE_LINE}{sig_hex}\n", cert.body())
    {
        return Err(Error::BadSignature(
            "the broker's signature over the certificate does not verify: it was altered".into(),
        ));
    }
    let statement = cert.statement.to_text();
    let mut joined: Vec<&str> = Vec::new();
    for (role, sig) in &cert.joins {
        let key = cert.key_of(role)?;
        if !holder::verify(key, statement.as_bytes(), sig) {
            return Err(Error::BadSignature(format!(
                "the join signature of role {role} does not verify over the ceremony statement"
            )));
        }
        if !joined.contains(&role.as_str()) {
            joined.push(role);
        }
    }
    if joined.len() < cert.required as usize {
        return Err(Error::BadSignature(format!(
            "only {} roles joined; the ceremony needed {}",
            joined.len(),
            cert.required
        )));
    }
    let d = digest(signed);
    let mut confirmed: Vec<String> = Vec::new();
    for line in confirms {
        let rest = line
            .strip_prefix("confirm: ")
            .ok_or_else(|| bad("a line after the signature is not a confirm line"))?;
        let (role, sig_hex) = rest
            .split_once(' ')
            .ok_or_else(|| bad("a confirm line is not `confirm: ROLE SIGNATURE`"))?;
        let sig = unhex(sig_hex).ok_or_else(|| bad("a confirm signature is not hex"))?;
        let key = cert.key_of(role)?;
        if !holder::verify(key, confirmation_text(&d, role).as_bytes(), &sig) {
            return Err(Error::BadSignature(format!(
                "the confirmation of role {role} does not verify for this certificate"
            )));
        }
        if !confirmed.iter().any(|r| r == role) {
            confirmed.push(role.to_string());
        }
    }
    Ok(Verified {
        certificate: cert,
        confirmed,
    })
}

impl Certificate {
    fn key_of(&self, role: &str) -> Result<&[u8; 32], Error> {
        self.holders
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, k)| k)
            .ok_or_else(|| {
                Error::BadSignature(format!(
                    "role {role} is not a holder named in the certificate"
                ))
            })
    }

    fn sign_check(&self, sig: &[u8]) -> Result<(), Error> {
        if holder::verify(&self.broker_key, self.body().as_bytes(), sig) {
            Ok(())
        } else {
            Err(Error::BadSignature("bad broker signature".into()))
        }
    }
}

fn bad(m: &str) -> Error {
    Error::MalformedDocument(format!("not a valid destruction certificate: {m}"))
}

fn parse_body(signed: &str) -> Result<Certificate, Error> {
    let mut lines = signed.lines().peekable();
    if lines.next() != Some(MAGIC) {
        return Err(bad(
            "it does not start with tessera-destruction-certificate-v1",
        ));
    }
    let mut field = |name: &str| -> Result<String, Error> {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(": "))
            .map(str::to_string)
            .ok_or_else(|| bad(&format!("the {name} line is missing")))
    };
    let num = |s: String, what: &str| -> Result<i64, Error> {
        s.parse()
            .map_err(|_| bad(&format!("{what} is not a number")))
    };
    let hex32 = |s: String, what: &str| -> Result<[u8; 32], Error> {
        unhex(&s)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad(&format!("{what} is not 64 hex digits")))
    };
    let class = field("class")?;
    let key_fingerprint = hex32(field("key-fingerprint")?, "key-fingerprint")?;
    let deadline = num(field("deadline")?, "deadline")?;
    let ceremony = field("ceremony")?;
    let nonce: [u8; 16] = unhex(&field("nonce")?)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| bad("nonce is not 32 hex digits"))?;
    let action = Action::parse(&field("action")?).ok_or_else(|| bad("unknown action"))?;
    let expires = num(field("expires")?, "expires")?;
    let small = |v: i64, what: &str| -> Result<u8, Error> {
        u8::try_from(v).map_err(|_| bad(&format!("{what} is out of range")))
    };
    let required = small(num(field("required")?, "required")?, "required")?;
    let key_threshold = small(
        num(field("key-threshold")?, "key-threshold")?,
        "key-threshold",
    )?;
    let shares = small(num(field("shares")?, "shares")?, "shares")?;
    let destroyed_at = num(field("destroyed-at")?, "destroyed-at")?;
    let destroyed = field("destroyed")?;
    let broker_key = hex32(field("broker-key")?, "broker-key")?;
    let mut holders = Vec::new();
    let mut joins = Vec::new();
    for line in lines {
        if let Some(rest) = line.strip_prefix("holder: ") {
            let (role, key) = rest
                .split_once(' ')
                .ok_or_else(|| bad("malformed holder line"))?;
            holders.push((role.to_string(), hex32(key.to_string(), "a holder key")?));
        } else if let Some(rest) = line.strip_prefix("join: ") {
            let (role, sig) = rest
                .split_once(' ')
                .ok_or_else(|| bad("malformed join line"))?;
            joins.push((
                role.to_string(),
                unhex(sig).ok_or_else(|| bad("a join signature is not hex"))?,
            ));
        } else if !line.starts_with(SIGNATURE_LINE) {
            return Err(bad("it has an unknown line"));
        }
    }
    let cert = Certificate {
        statement: Statement {
            ceremony,
            class,
            key_fingerprint,
            deadline,
            nonce,
            action,
            expires,
        },
        required,
        key_threshold,
        shares,
        destroyed_at,
        destroyed,
        broker_key,
        holders,
        joins,
    };
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::Ed25519KeyPair;

    type KeyPair = (Vec<u8>, [u8; 32]);

    fn key() -> KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        let public = holder::public_of(pkcs8.as_ref()).expect("pub");
        (pkcs8.as_ref().to_vec(), public)
    }

    #[test]
    fn a_signed_certificate_verifies_and_counts_confirmations() {
        let (broker, broker_pub) = key();
        let holders: Vec<(String, KeyPair)> = ["legal", "ciso", "board"]
            .iter()
            .map(|r| (r.to_string(), key()))
            .collect();
        let statement = Statement {
            ceremony: "cer_x".into(),
            class: "sox-7y".into(),
            key_fingerprint: [5; 32],
            deadline: 10,
            nonce: [6; 16],
            action: Action::Shred,
            expires: 100,
        };
        let joins = holders[..2]
            .iter()
            .map(|(r, (sk, _))| {
                let sig = holder::sign(sk, statement.to_text().as_bytes()).expect("sign");
                (r.clone(), sig.to_vec())
            })
            .collect();
        let cert = Certificate {
            statement,
            required: 2,
            key_threshold: 2,
            shares: 3,
            destroyed_at: 50,
            destroyed: "wrapped class key, 3 sealed shares".into(),
            broker_key: broker_pub,
            holders: holders
                .iter()
                .map(|(r, (_, pk))| (r.clone(), *pk))
                .collect(),
            joins,
        };
        let signed = cert.sign(&broker).expect("sign");
        let v = verify(&signed, Some(&broker_pub)).expect("verify");
        assert_eq!(v.outstanding(), 3);
        assert!(!v.irrecoverable());

        let d = digest(&signed);
        let mut file = signed.clone();
        for (r, (sk, _)) in &holders[..2] {
            let sig = holder::sign(sk, confirmation_text(&d, r).as_bytes()).expect("sign");
            file.push_str(&format!("confirm: {r} {}\n", hex(&sig)));
        }
        let v = verify(&file, Some(&broker_pub)).expect("verify");
        assert_eq!(v.outstanding(), 1);
        assert!(v.irrecoverable());

        // Any edit breaks it.
        assert!(verify(&signed.replace("deadline: 10", "deadline: 11"), None).is_err());
        assert!(verify(&signed, Some(&[0; 32])).is_err());
        let forged = format!("{signed}confirm: board {}\n", hex(&[0u8; 64]));
        assert!(verify(&forged, None).is_err());
        // So does a respelling that parses to the same body (it would name
        // another digest for the confirmations).
        for (from, to) in [
            ("deadline: 10\n", "deadline: +10\n"),
            ("deadline: 10\n", "deadline: 010\n"),
        ] {
            let respelled = signed.replace(from, to);
            assert_ne!(respelled, signed);
            assert!(verify(&respelled, None).is_err(), "{to:?} accepted");
        }
        let lines: Vec<&str> = signed.lines().collect();
        let holder_at = lines
            .iter()
            .position(|l| l.starts_with("holder: "))
            .expect("holder");
        let mut swapped = lines.clone();
        swapped.swap(holder_at, holder_at + 1);
        assert!(
            verify(&(swapped.join("\n") + "\n"), None).is_err(),
            "holders reordered"
        );
    }
}
