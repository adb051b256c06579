//! Fuzz target bodies, kept as plain functions so the stable test suite
//! drives them too (cargo-fuzz needs nightly; see `shred/fuzz/`).

/// Parses untrusted share-file bytes every way tessera does: as an
/// envelope, and the raw share inside. Must never panic.
pub fn share_file(data: &[u8]) {
    if let Ok(env) = crate::envelope::ShareEnvelope::parse(data) {
        let again = crate::envelope::ShareEnvelope::parse(env.to_text().as_bytes());
        assert!(again.is_ok(), "a parsed envelope re-parses");
    }
    let _ = crate::Share::from_bytes(data);
    let _ = crate::holder::HolderPublicKey::parse(&String::from_utf8_lossy(data));
    let _ = crate::certificate::verify(&String::from_utf8_lossy(data), None);
}
