//! Arithmetic in GF(2^8) with the AES polynomial x^8+x^4+x^3+x+1 (0x11b),
//! written without tables or secret-dependent branches so that timing does
//! not depend on share or key bytes.

/// Addition (and subtraction) in GF(2^8).
pub fn add(a: u8, b: u8) -> u8 {
    a ^ b
}

/// Multiplication: shift-and-add over the bits of `b`, with the reduction
/// and the conditional add done by masks rather than branches.
pub fn mul(a: u8, b: u8) -> u8 {
    let mut a = a;
    let mut b = b;
    let mut p = 0u8;
    for _ in 0..8 {
        // 0xff when the low bit of b is set, else 0.
        let take = 0u8.wrapping_sub(b & 1);
        p ^= a & take;
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// The multiplicative inverse, as a^254 (a fixed sequence of squarings and
/// multiplications). The inverse of 0 comes out as 0; callers never divide
/// by 0 because x coordinates are checked non-zero and distinct.
pub fn inv(a: u8) -> u8 {
    // 254 = 0b1111_1110: square-and-multiply with a fixed schedule.
    let a2 = mul(a, a);
    let a4 = mul(a2, a2);
    let a8 = mul(a4, a4);
    let a16 = mul(a8, a8);
    let a32 = mul(a16, a16);
    let a64 = mul(a32, a32);
    let a128 = mul(a64, a64);
    mul(mul(mul(a128, a64), mul(a32, a16)), mul(mul(a8, a4), a2))
}

/// Division `a / b` (b non-zero).
pub fn div(a: u8, b: u8) -> u8 {
    mul(a, inv(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow, obviously-correct reference multiplication.
    fn mul_ref(a: u8, b: u8) -> u8 {
        let mut r: u16 = 0;
        for i in 0..8 {
            if b >> i & 1 == 1 {
                r ^= (a as u16) << i;
            }
        }
        for i in (8..16).rev() {
            if r >> i & 1 == 1 {
                r ^= 0x11b << (i - 8);
            }
        }
        r as u8
    }

    #[test]
    fn multiplication_matches_the_reference_for_every_pair() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), mul_ref(a, b), "{a} * {b}");
            }
        }
    }

    #[test]
    fn every_nonzero_element_has_an_inverse() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "inverse of {a}");
        }
        // The AES S-box's known pair: inv(0x53) = 0xca.
        assert_eq!(inv(0x53), 0xca);
    }
}
