//! Shamir's secret sharing in the format of HashiCorp Vault's `shamir`
//! package (and the npm `shamir-secret-sharing` package): GF(2^8)/0x11b, a
//! random polynomial per secret byte with uniform coefficients, and each
//! share encoded as `y[0..len] || x` with x distinct, non-zero and random.

use zeroize::{Zeroize, Zeroizing};

use crate::Error;
use crate::gf256;

/// A source of uniform random bytes, passed in so that this crate never
/// reads the OS itself (and tests can be deterministic).
pub trait Random {
    /// Fills `buf` with uniform random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// One share: its x coordinate and the evaluations at x. Zeroized on drop;
/// no `Debug`, no `Clone`.
pub struct Share {
    x: u8,
    y: Zeroizing<Vec<u8>>,
}

impl Share {
    /// Parses the wire form `y bytes || x byte`, rejecting forms that no
    /// split could have produced (too short, x = 0).
    pub fn from_bytes(bytes: &[u8]) -> Result<Share, Error> {
        let Some((&x, y)) = bytes.split_last() else {
            return Err(Error::MalformedShare("the share is empty".into()));
        };
        if y.is_empty() {
            return Err(Error::MalformedShare(
                "the share is one byte long; a share is the evaluations followed by x".into(),
            ));
        }
        if x == 0 {
            return Err(Error::MalformedShare(
                "the share's x coordinate is 0, which no split produces".into(),
            ));
        }
        Ok(Share {
            x,
            y: Zeroizing::new(y.to_vec()),
        })
    }

    /// The wire form `y || x`, for sealing to a holder.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(self.y.len() + 1));
        v.extend_from_slice(&self.y);
        v.push(self.x);
        v
    }

    /// The x coordinate (not secret; it only orders shares).
    pub fn x(&self) -> u8 {
        self.x
    }

    /// Length of the secret this share belongs to.
    pub fn secret_len(&self) -> usize {
        self.y.len()
    }
}

/// Checks `2 <= k <= n <= 255`.
pub fn check_threshold(k: usize, n: usize) -> Result<(), Error> {
    if k < 2 || k > n || n > 255 {
        return Err(Error::Threshold(format!(
            "a threshold of {k} of {n} is not possible; it needs 2 <= threshold <= holders <= 255"
        )));
    }
    Ok(())
}

/// Splits `secret` into `n` shares, any `k` of which recover it.
pub fn split(
    secret: &[u8],
    k: usize,
    n: usize,
    random: &mut dyn Random,
) -> Result<Vec<Share>, Error> {
    check_threshold(k, n)?;
    if secret.is_empty() {
        return Err(Error::MalformedShare("cannot split an empty secret".into()));
    }
    let xs = distinct_xs(n, random);
    let mut coefficients = Zeroizing::new(vec![0u8; secret.len() * (k - 1)]);
    random.fill(&mut coefficients);
    Ok(split_with(secret, &coefficients, &xs))
}

/// The deterministic core of `split`: `coefficients` holds, for degree
/// 1..k-1 in turn, one coefficient per secret byte; `xs` are the x
/// coordinates. Public so that known-answer tests can pin the output.
pub fn split_with(secret: &[u8], coefficients: &[u8], xs: &[u8]) -> Vec<Share> {
    let len = secret.len();
    debug_assert_eq!(coefficients.len() % len, 0);
    xs.iter()
        .map(|&x| {
            let mut y = Zeroizing::new(vec![0u8; len]);
            for (i, yi) in y.iter_mut().enumerate() {
                // Horner's rule from the highest degree down to the constant
                // term (the secret byte).
                let mut acc = 0u8;
                for degree in (0..coefficients.len() / len).rev() {
                    acc = gf256::add(gf256::mul(acc, x), coefficients[degree * len + i]);
                }
                *yi = gf256::add(gf256::mul(acc, x), secret[i]);
            }
            Share { x, y }
        })
        .collect()
}

/// `n` distinct non-zero x coordinates in random order: a partial
/// Fisher-Yates shuffle of 1..=255 with rejection sampling (no modulo bias).
fn distinct_xs(n: usize, random: &mut dyn Random) -> Vec<u8> {
    let mut pool: Vec<u8> = (1..=255).collect();
    for i in 0..n {
        let span = 255 - i; // choose from pool[i..255]
        let limit = 256 - 256 % span; // largest multiple of span <= 256
        let j = loop {
            let mut b = [0u8; 1];
            random.fill(&mut b);
            if (b[0] as usize) < limit {
                break i + b[0] as usize % span;
            }
        };
        pool.swap(i, j);
    }
    pool.truncate(n);
    pool
}

/// Recombines shares by Lagrange interpolation at x = 0. Rejects what it can
/// detect (fewer than two shares, more than 255, duplicate x, mixed
/// lengths); too few *distinct* shares cannot be detected here and give a
/// wrong value, which is why callers check a key check value.
pub fn combine(shares: &[Share]) -> Result<Zeroizing<Vec<u8>>, Error> {
    if shares.len() < 2 {
        return Err(Error::TooFewShares(format!(
            "{} share given; combining needs at least 2 (and as many as the threshold)",
            shares.len()
        )));
    }
    if shares.len() > 255 {
        return Err(Error::Threshold(format!(
            "{} shares given; there can be at most 255",
            shares.len()
        )));
    }
    let len = shares[0].y.len();
    for (i, s) in shares.iter().enumerate() {
        if s.y.len() != len {
            return Err(Error::MixedShares(
                "the shares have different lengths, so they belong to different secrets".into(),
            ));
        }
        if shares[..i].iter().any(|o| o.x == s.x) {
            return Err(Error::DuplicateShare(format!(
                "two shares have the same x coordinate ({}); each holder's share counts once",
                s.x
            )));
        }
    }
    let mut secret = Zeroizing::new(vec![0u8; len]);
    for (i, si) in shares.iter().enumerate() {
        // Lagrange basis polynomial of share i at 0: prod x_j / (x_j - x_i).
        let mut basis = 1u8;
        for (j, sj) in shares.iter().enumerate() {
            if i != j {
                basis = gf256::mul(basis, gf256::div(sj.x, gf256::add(sj.x, si.x)));
            }
        }
        for (b, &y) in secret.iter_mut().zip(si.y.iter()) {
            *b = gf256::add(*b, gf256::mul(y, basis));
        }
    }
    Ok(secret)
}

impl Drop for Share {
    fn drop(&mut self) {
        self.x.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
            .collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn known_answer_vector() {
        let secret: Vec<u8> = (0u8..32).collect();
        let coefficients =
            unhex("d21528719a2ee3e90016a587350ae0b5c782539aa8d40ce26f0dd36b8967dc9b");
        let shares = split_with(&secret, &coefficients, &[1, 2, 3]);
        let got: Vec<String> = shares.iter().map(|s| hex(&s.to_bytes())).collect();
        assert_eq!(
            got,
            [
                "d2142a729e2be5ee081faf8c3907eebad7934189bcc11af57714c970957ac28401",
                "bf2b52e12b59dbce08255b1e6619d57e850eb43c5fa60ec8c603a7cd15d3bd3202",
                "6d3e7a90b17738270833fe99531335cb428ce7a6f772022aa90e74a69cb461a903",
            ]
        );
        for pair in [[0, 1], [0, 2], [1, 2]] {
            let two: Vec<Share> = pair
                .iter()
                .map(|&i| Share::from_bytes(&shares[i].to_bytes()).expect("parse"))
                .collect();
            assert_eq!(&combine(&two).expect("combine")[..], &secret[..]);
        }
    }

    #[test]
    fn combine_rejects_what_it_can_detect() {
        let secret = [7u8; 16];
        let shares = split_with(&secret, &[9u8; 16], &[1, 2, 3]);
        let again = |i: usize| Share::from_bytes(&shares[i].to_bytes()).expect("parse");
        assert!(matches!(combine(&[again(0)]), Err(Error::TooFewShares(_))));
        assert!(matches!(
            combine(&[again(0), again(0)]),
            Err(Error::DuplicateShare(_))
        ));
        let short = Share::from_bytes(&[1, 2, 3, 9]).expect("parse");
        assert!(matches!(
            combine(&[again(0), short]),
            Err(Error::MixedShares(_))
        ));
        assert!(Share::from_bytes(&[1, 0]).is_err());
        assert!(Share::from_bytes(&[1]).is_err());
        assert!(Share::from_bytes(&[]).is_err());
        assert!(check_threshold(1, 3).is_err());
        assert!(check_threshold(4, 3).is_err());
        assert!(check_threshold(2, 256).is_err());
        assert!(check_threshold(255, 255).is_ok());
    }
}
