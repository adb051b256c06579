//! The tessera broker: an encrypted SQLite store whose root key lives in the
//! OS keychain (or behind a passphrase), agents with bearer tokens and allow
//! lists, short-lived leases over gRPC, and a hash-chained audit trail.
//!
//! `cli` parses arguments and calls into this crate; everything a user can
//! do is reachable (and tested) from here.

#![forbid(unsafe_code)]

/// Test hook for crash safety: with `TESSERA_FAULT=<point>` the process
/// aborts at that point, as `kill -9` would, so tests can show each step of
/// a multi-step operation is safe to interrupt. Points: `shred-*` in
/// `ceremony`, `rotate-*` in `rotation`, `rekey-*` in `rekey`.
pub(crate) fn fault(point: &str) {
    if std::env::var("TESSERA_FAULT").is_ok_and(|p| p == point) {
        eprintln!("TESSERA_FAULT: aborting at {point}");
        std::process::abort();
    }
}

/// With `TESSERA_FAULT=POINT:pause` and `TESSERA_PAUSE_DIR=DIR`, writes
/// `DIR/paused` at `point` and waits (at most a minute) until `DIR/resume`
/// exists: lets a test put another call between two steps of this one.
pub(crate) async fn pause(point: &str) {
    if !std::env::var("TESSERA_FAULT").is_ok_and(|p| p.strip_suffix(":pause") == Some(point)) {
        return;
    }
    let Some(dir) = std::env::var_os("TESSERA_PAUSE_DIR").map(std::path::PathBuf::from) else {
        return;
    };
    let _ = std::fs::write(dir.join("paused"), point);
    for _ in 0..1200 {
        if dir.join("resume").exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub mod agent;
pub mod audit;
pub mod backup;
pub mod broker;
pub mod ceremony;
pub mod checkpoint;
pub mod conn;
pub mod error;
pub mod gate;
pub mod generate;
pub mod init;
pub mod keys;
pub mod lease;
pub mod names;
pub mod proto;
pub mod rekey;
pub mod retention;
pub mod rotation;
mod rowmac;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod unseal;
pub mod watch;

pub use broker::Broker;
pub use error::{Error, Result};
