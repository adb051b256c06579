//! The tessera broker: an encrypted SQLite store whose root key lives in the
//! OS keychain (or behind a passphrase), agents with bearer tokens and allow
//! lists, short-lived leases over gRPC, and a hash-chained audit trail.
//!
//! `cli` parses arguments and calls into this crate; everything a user can
//! do is reachable (and tested) from here.

#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod broker;
pub mod ceremony;
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
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod unseal;
pub mod watch;

pub use broker::Broker;
pub use error::{Error, Result};
