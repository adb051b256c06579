//! `cargo +nightly fuzz run share_file` (from shred/): the share-file parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_shred::fuzz::share_file(data);
});
