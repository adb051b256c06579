//! Values the broker generates itself, from a declared format:
//! `alnum:N` (N letters and digits), `hex:N` (N random bytes as hex),
//! `base64:N` (N random bytes, standard base64), or a template such as
//! `sk-{alnum:48}` where each `{…}` is one of those.

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keys::fill_random;

/// Longest N in a generator part.
pub const MAX_PART: usize = 4096;

/// One part of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Alnum(usize),
    Hex(usize),
    Base64(usize),
}

/// A parsed generator spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generator {
    parts: Vec<Part>,
}

fn bad(spec: &str, why: &str) -> Error {
    Error::invalid(
        "generate",
        format!(
            "{spec:?} is not a generator ({why}); use alnum:N, hex:N, base64:N or a template \
             like 'sk-{{alnum:48}}'"
        ),
    )
}

fn part(spec: &str, p: &str) -> Result<Part> {
    let (kind, n) = p
        .split_once(':')
        .ok_or_else(|| bad(spec, &format!("{p:?} has no :N length")))?;
    let n: usize = n
        .parse()
        .map_err(|_| bad(spec, &format!("the length {n:?} is not a number")))?;
    if n == 0 || n > MAX_PART {
        return Err(bad(spec, &format!("the length must be 1 to {MAX_PART}")));
    }
    match kind {
        "alnum" => Ok(Part::Alnum(n)),
        "hex" => Ok(Part::Hex(n)),
        "base64" => Ok(Part::Base64(n)),
        other => Err(bad(spec, &format!("unknown generator {other:?}"))),
    }
}

impl Generator {
    /// Parses a spec; a template needs at least one `{…}` part.
    pub fn parse(spec: &str) -> Result<Self> {
        if !spec.contains('{') {
            return Ok(Generator {
                parts: vec![part(spec, spec)?],
            });
        }
        let mut parts = Vec::new();
        let mut rest = spec;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad(spec, "a `{` is not closed"))?;
            parts.push(part(spec, &rest[open + 1..open + close])?);
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(bad(spec, "a `}` has no `{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Generator { parts })
    }

    /// How many bytes each value has.
    pub fn value_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                Part::Alnum(n) => *n,
                Part::Hex(n) => 2 * n,
                Part::Base64(n) => n.div_ceil(3) * 4,
            })
            .sum()
    }

    /// A fresh value.
    pub fn generate(&self) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(Vec::new());
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.extend_from_slice(s.as_bytes()),
                Part::Alnum(n) => alnum(*n, &mut out)?,
                Part::Hex(n) => {
                    let raw = random(*n)?;
                    out.extend_from_slice(crate::keys::hex(&raw).as_bytes());
                }
                Part::Base64(n) => {
                    let raw = random(*n)?;
                    base64(&raw, &mut out);
                }
            }
        }
        Ok(out)
    }
}

fn random(n: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut b = Zeroizing::new(vec![0u8; n]);
    fill_random(&mut b)?;
    Ok(b)
}

/// `n` characters from [A-Za-z0-9], uniform (rejection sampling).
fn alnum(n: usize, out: &mut Vec<u8>) -> Result<()> {
    const SET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut made = 0;
    while made < n {
        let buf = random(n.max(16))?;
        for &b in buf.iter() {
            // 248 = 4 * 62: bytes at or above it would bias the result.
            if b < 248 && made < n {
                out.push(SET[(b % 62) as usize]);
                made += 1;
            }
        }
    }
    Ok(())
}

/// Standard base64 with padding.
fn base64(data: &[u8], out: &mut Vec<u8>) {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(v >> 18) as usize & 63]);
        out.push(T[(v >> 12) as usize & 63]);
        out.push(if chunk.len() > 1 {
            T[(v >> 6) as usize & 63]
        } else {
            b'='
        });
        out.push(if chunk.len() > 2 {
            T[v as usize & 63]
        } else {
            b'='
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_templates() {
        let v = Generator::parse("alnum:40")
            .expect("spec")
            .generate()
            .expect("gen");
        assert_eq!(v.len(), 40);
        assert!(v.iter().all(u8::is_ascii_alphanumeric));
        assert_eq!(
            Generator::parse("hex:32")
                .expect("spec")
                .generate()
                .expect("gen")
                .len(),
            64
        );
        assert_eq!(
            Generator::parse("base64:32")
                .expect("spec")
                .generate()
                .expect("gen")
                .len(),
            44
        );
        for spec in [
            "alnum:40",
            "hex:32",
            "base64:32",
            "base64:30",
            "sk-{alnum:48}-x",
        ] {
            let g = Generator::parse(spec).expect("spec");
            assert_eq!(g.generate().expect("value").len(), g.value_len(), "{spec}");
        }
        let t = Generator::parse("sk-{alnum:48}")
            .expect("spec")
            .generate()
            .expect("gen");
        assert!(t.starts_with(b"sk-") && t.len() == 51);
        for bad in [
            "",
            "alnum",
            "alnum:0",
            "alnum:x",
            "uuid:4",
            "sk-{alnum:4",
            "a}b",
            "sk-{}",
            "hex:99999",
        ] {
            assert!(Generator::parse(bad).is_err(), "{bad:?}");
        }
        let mut out = Vec::new();
        base64(b"foob", &mut out);
        assert_eq!(out, b"Zm9vYg==");
    }
}
