//! Micro-benchmarks of the per-request crypto on the Issue path: opening a
//! secret version (unwrap the data key, decrypt the value) and chaining an
//! audit record.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tessera_broker::audit::{Entry, chain_hash};
use tessera_broker::keys::{SymmetricKey, data_key_aad, value_aad};

fn bench(c: &mut Criterion) {
    let rk = SymmetricKey::generate().expect("random");
    let dk = SymmetricKey::generate().expect("random");
    let wrapped = rk
        .seal(&data_key_aad("openai/prod", 7), dk.expose_bytes())
        .expect("seal");
    let ct = dk
        .seal(&value_aad("openai/prod", 7), &[b'x'; 64])
        .expect("seal");
    c.bench_function("open secret version (unwrap + decrypt, 64 B)", |b| {
        b.iter(|| {
            let raw = rk
                .open(&data_key_aad("openai/prod", 7), black_box(&wrapped))
                .expect("open");
            let k = SymmetricKey::from_bytes(&raw).expect("key");
            black_box(
                k.open(&value_aad("openai/prod", 7), black_box(&ct))
                    .expect("open"),
            )
        })
    });
    let key = SymmetricKey::generate().expect("random");
    let e = Entry {
        time: 1_700_000_000,
        actor: "agent:openclaw-gw".into(),
        action: "lease.issue".into(),
        target: "openai/prod".into(),
        allowed: true,
        reason: "lease lse_0123456789abcdef0123456789abcdef on version 7 for 900s".into(),
        request_id: "req_0123456789abcdef".into(),
    };
    c.bench_function("chain one audit record", |b| {
        b.iter(|| black_box(chain_hash(&key, black_box(42), &[7; 32], &e)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
