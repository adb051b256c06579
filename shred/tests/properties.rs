//! Property tests: any k of n shares give the secret back; k-1 give nothing
//! equal to it. Plus the share-file fuzz target's body, driven on stable
//! with random and mangled inputs (cargo-fuzz drives it on nightly).

use proptest::prelude::*;
use tessera_shred::envelope::ShareEnvelope;
use tessera_shred::{Random, Share, combine, split};

/// A deterministic generator seeded by proptest (splitmix64).
struct Seeded(u64);

impl Random for Seeded {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *b = (z ^ (z >> 31)) as u8;
        }
    }
}

fn copy(s: &Share) -> Share {
    Share::from_bytes(&s.to_bytes()).expect("a share re-parses")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_k_of_n_shares_recover_the_secret(
        secret in proptest::collection::vec(any::<u8>(), 16..64),
        n in 2usize..12,
        k_off in 0usize..12,
        seed in any::<u64>(),
        pick in any::<u64>(),
    ) {
        let k = 2 + k_off % (n - 1);
        let shares = split(&secret, k, n, &mut Seeded(seed)).expect("split");
        prop_assert_eq!(shares.len(), n);
        let mut xs: Vec<u8> = shares.iter().map(Share::x).collect();
        xs.sort_unstable();
        xs.dedup();
        prop_assert_eq!(xs.len(), n, "x coordinates are distinct");
        prop_assert!(!xs.contains(&0));

        // A pseudo-random subset of size k, and one of size k-1.
        let mut order: Vec<usize> = (0..n).collect();
        let mut p = pick;
        for i in (1..n).rev() {
            order.swap(i, (p % (i as u64 + 1)) as usize);
            p = p.rotate_left(7) ^ 0x5555;
        }
        let subset: Vec<Share> = order[..k].iter().map(|&i| copy(&shares[i])).collect();
        let got = combine(&subset).expect("combine");
        prop_assert_eq!(&got[..], &secret[..]);

        let fewer: Vec<Share> = order[..k - 1].iter().map(|&i| copy(&shares[i])).collect();
        // One share alone is refused outright; more give another value.
        if let Ok(v) = combine(&fewer) {
            prop_assert_ne!(&v[..], &secret[..]);
        }
    }

    #[test]
    fn share_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        tessera_shred::fuzz::share_file(&data);
    }

    #[test]
    fn mangled_envelopes_never_panic(cut in 0usize..200, flip in any::<u8>(), at in 0usize..200) {
        let env = ShareEnvelope {
            class: "sox-7y".into(),
            key_fingerprint: [7; 32],
            threshold: 2,
            shares: 3,
            role: "legal".into(),
            share: Share::from_bytes(&[1, 2, 3, 4, 5]).expect("share"),
        };
        let mut bytes = env.to_text().as_bytes().to_vec();
        if at < bytes.len() {
            bytes[at] ^= flip;
        }
        bytes.truncate(cut.max(1));
        tessera_shred::fuzz::share_file(&bytes);
    }
}
