//! tessera's shares against an independent Shamir implementation (the npm
//! package `shamir-secret-sharing`, installed by scripts/test.sh into
//! tests/interop): its shares combine in tessera, tessera's combine in it.

use std::path::PathBuf;
use std::process::Command;

use tessera_shred::{Random, Share, combine, hex, split, unhex};

struct Os;
impl Random for Os {
    fn fill(&mut self, buf: &mut [u8]) {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), buf)
            .expect("OS randomness");
    }
}

fn interop_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop");
    if dir.join("node_modules/shamir-secret-sharing").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the npm package shamir-secret-sharing is not installed in tests/interop; \
         scripts/test.sh installs it (npm ci --prefix tests/interop)"
    );
    eprintln!("skipped: run `npm ci --prefix tests/interop` to enable the interop test");
    None
}

fn node(dir: &PathBuf, args: &[String]) -> Vec<String> {
    let out = Command::new("node")
        .arg(dir.join("interop.js"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "node interop.js {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn shares_interoperate_with_an_independent_implementation() {
    let Some(dir) = interop_dir() else { return };
    for (n, k) in [(3usize, 2usize), (5, 3), (4, 4)] {
        let mut secret = [0u8; 32];
        Os.fill(&mut secret);

        // tessera splits, the npm package combines any k of them.
        let ours = split(&secret, k, n, &mut Os).expect("split");
        let args: Vec<String> = std::iter::once("combine".to_string())
            .chain(ours.iter().rev().take(k).map(|s| hex(&s.to_bytes())))
            .collect();
        assert_eq!(
            node(&dir, &args),
            [hex(&secret)],
            "npm combine of tessera's {k}-of-{n}"
        );

        // The npm package splits, tessera combines any k of them.
        let theirs = node(
            &dir,
            &["split".into(), hex(&secret), n.to_string(), k.to_string()],
        );
        assert_eq!(theirs.len(), n);
        let shares: Vec<Share> = theirs[n - k..]
            .iter()
            .map(|h| Share::from_bytes(&unhex(h).expect("hex")).expect("a share"))
            .collect();
        assert_eq!(&combine(&shares).expect("combine")[..], &secret[..]);
    }
}
