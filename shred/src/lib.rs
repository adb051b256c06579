//! Retention-key logic for tessera: Shamir split/combine over GF(2^8) in the
//! interoperable share format of DESIGN.md, holder keys, the shred ceremony
//! state machine and destruction certificates.
//!
//! Pure logic by design: no I/O, no clock, no randomness of its own (all are
//! passed in), so every ceremony rule is unit-testable. The code arrives with
//! issue 4 (retention classes and the quorum shred ceremony); this crate is
//! already part of the workspace so the dependency direction
//! `cli -> broker -> shred` holds from the start.

#![forbid(unsafe_code)]
