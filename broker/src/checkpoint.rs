//! Signed audit checkpoints: the head of the audit trail (sequence number and
//! hash) signed by the broker's Ed25519 key, kept off the machine.
//!
//! The hash chain and the HMAC'd head stored with it catch any edit,
//! deletion, insertion or truncation made inside the store, but not the
//! restore of an entire older copy of the store file: that copy is intact in
//! itself. A checkpoint kept elsewhere (a SIEM, another host, paper) is what
//! catches it: `audit verify --checkpoint FILE` fails when the trail no
//! longer reaches the checkpoint's record, or holds another record there.

use crate::keys::{hex, unhex};

/// First line of every checkpoint.
pub const HEADER: &str = "tessera-audit-checkpoint-v1";

/// A checkpoint is about 330 bytes; anything far longer is something else.
pub const MAX_LEN: usize = 4096;

/// A checkpoint's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The broker's Ed25519 public key.
    pub broker_key: [u8; 32],
    /// The last record covered.
    pub seq: u64,
    /// That record's hash.
    pub hash: [u8; 32],
    /// When it was signed (Unix seconds).
    pub time: i64,
}

impl Checkpoint {
    /// The signed text.
    pub fn body(&self) -> String {
        format!(
            "{HEADER}\nbroker-key: {}\nseq: {}\nhash: {}\ntime: {}\n",
            hex(&self.broker_key),
            self.seq,
            hex(&self.hash),
            self.time
        )
    }

    /// The body followed by its signature line.
    pub fn sign(&self, broker_pkcs8: &[u8]) -> Result<String, String> {
        let body = self.body();
        let sig = tessera_shred::holder::sign(broker_pkcs8, body.as_bytes())
            .map_err(|e| format!("cannot sign the checkpoint: {e}"))?;
        Ok(format!("{body}signature: {}\n", hex(&sig)))
    }
}

/// Parses a signed checkpoint and checks its signature against the key it
/// names, and that key against `pinned` (the verifying broker's own key).
/// Errors are one sentence for a person.
pub fn verify(text: &str, pinned: &[u8; 32]) -> Result<Checkpoint, String> {
    let bad = |what: &str| format!("it is not a tessera audit checkpoint ({what})");
    if text.len() > MAX_LEN {
        return Err(bad(&format!("longer than {MAX_LEN} bytes")));
    }
    // A copy that went through Windows keeps its meaning.
    let text = text.replace("\r\n", "\n");
    let text = text.trim_end_matches('\n');
    if text.lines().count() != 6 {
        return Err(bad("it should have 6 lines, the last one its signature"));
    }
    let (body, sig_line) = text.rsplit_once('\n').ok_or_else(|| bad("too short"))?;
    let body = format!("{body}\n");
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        return Err(bad(&format!("the first line is not {HEADER}")));
    }
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(": "))
            .map(str::to_owned)
            .ok_or_else(|| bad(&format!("no {name} line")))
    };
    let key32 = |s: &str, what: &str| -> Result<[u8; 32], String> {
        unhex(s)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad(&format!("{what} is not 32 bytes of hex")))
    };
    let broker_key = key32(&field("broker-key")?, "broker-key")?;
    let seq = field("seq")?
        .parse()
        .map_err(|_| bad("seq is not a number"))?;
    let hash = key32(&field("hash")?, "hash")?;
    let time = field("time")?
        .parse()
        .map_err(|_| bad("time is not a number"))?;
    let sig = sig_line
        .strip_prefix("signature: ")
        .and_then(unhex)
        .filter(|s| s.len() == 64)
        .ok_or_else(|| bad("the last line is not a 64-byte signature in hex"))?;
    let cp = Checkpoint {
        broker_key,
        seq,
        hash,
        time,
    };
    if cp.body() != body {
        return Err(bad("unexpected lines"));
    }
    if !tessera_shred::holder::verify(&broker_key, body.as_bytes(), &sig) {
        return Err(
            "its signature does not match its content: it was altered after signing".into(),
        );
    }
    if &broker_key != pinned {
        return Err(format!(
            "it was signed by another broker (key {}), not by this one ({})",
            tessera_shred::holder::fingerprint(&broker_key),
            tessera_shred::holder::fingerprint(pinned)
        ));
    }
    Ok(cp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> (Vec<u8>, [u8; 32]) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("key")
            .as_ref()
            .to_vec();
        let public = tessera_shred::holder::public_of(&pkcs8).expect("public");
        (pkcs8, public)
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_is_refused() {
        let (pkcs8, public) = keypair();
        let cp = Checkpoint {
            broker_key: public,
            seq: 42,
            hash: [9; 32],
            time: 1_800_000_000,
        };
        let text = cp.sign(&pkcs8).expect("sign");
        assert_eq!(verify(&text, &public), Ok(cp.clone()));
        let altered = text.replace("seq: 42", "seq: 43");
        assert!(
            verify(&altered, &public)
                .expect_err("altered")
                .contains("altered")
        );
        let (_, other) = keypair();
        assert!(
            verify(&text, &other)
                .expect_err("other broker")
                .contains("another broker")
        );
        assert!(verify("hello\n", &public).is_err());
        // CRLF line ends are read as LF.
        assert_eq!(verify(&text.replace('\n', "\r\n"), &public), Ok(cp));
    }

    /// No edit of a checkpoint (a byte changed, removed or added anywhere)
    /// panics, and none verifies.
    #[test]
    fn every_edit_of_a_checkpoint_is_refused_without_panicking() {
        let (pkcs8, public) = keypair();
        let text = Checkpoint {
            broker_key: public,
            seq: 7,
            hash: [3; 32],
            time: 1_800_000_000,
        }
        .sign(&pkcs8)
        .expect("sign");
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for edit in 0..3 {
                let mut b = bytes.to_vec();
                match edit {
                    0 => b[i] ^= 0x01,
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, b'0'),
                }
                let Ok(edited) = String::from_utf8(b) else {
                    continue;
                };
                // Removing the final newline changes nothing that is signed.
                if edited.trim_end_matches('\n') == text.trim_end_matches('\n') {
                    continue;
                }
                assert!(
                    verify(&edited, &public).is_err(),
                    "edit {edit} at byte {i} verified"
                );
            }
        }
    }
}
