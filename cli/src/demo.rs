//! `tessera demo`: a broker on a temporary store (passphrase-sealed, so no
//! keychain daemon is needed), served on a real Unix socket, and a walk
//! through what an admin and an agent do with it.

use std::sync::Arc;
use std::time::Duration;

use tessera_broker::Broker;
use tessera_broker::broker::Limits;
use tessera_broker::init::{DataDir, InitOptions};
use tessera_broker::keys::Token;
use tessera_broker::proto::{self, revoke_leases_request::Selector};
use tessera_broker::server::{self, ListenOptions};
use tessera_broker::unseal::{KdfParams, Source};
use zeroize::Zeroizing;

use crate::client::{CliError, Exit, Target, authed};

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn masked(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(v);
    let head: String = s.chars().take(6).collect();
    format!("{head}… ({} bytes)", v.len())
}

/// Runs the walk-through; every step goes over gRPC to the broker.
pub async fn run(json: bool) -> Result<(), CliError> {
    let tmp = tempfile::Builder::new()
        .prefix("tessera-demo-")
        .tempdir()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot create a temp dir: {e}")))?;
    let dir = DataDir::new(tmp.path().join("data"));
    // A random passphrase held only in memory: the demo needs no keychain.
    let pass = Token::generate("demo-")?;
    let pass_bytes = Zeroizing::new(pass.reveal_once().as_bytes().to_vec());

    step(
        1,
        "tessera init: a new store, root key sealed under a passphrase (Argon2id)",
    );
    let done = tessera_broker::init::init(InitOptions {
        data_dir: dir.clone(),
        source: Source::Passphrase,
        passphrase: Some(pass_bytes.clone()),
        kdf: KdfParams::default(),
        split: None,
    })
    .await?;
    println!("    store: {}", done.db_path.display());
    let admin_token = Zeroizing::new(done.admin_token.reveal_once().to_string());

    step(2, "tessera serve: unseal and listen on a Unix socket");
    let d = dir.clone();
    let broker =
        tokio::task::spawn_blocking(move || Broker::open(&d, Some(&pass_bytes), Limits::default()))
            .await
            .map_err(|e| CliError::new(Exit::Failure, format!("unseal failed: {e}")))??;
    let running = server::start(
        tessera_broker::gate::Gate::unsealed(Arc::new(broker)),
        ListenOptions {
            socket: dir.socket(),
            socket_mode: 0o600,
            tcp: None,
            tls: None,
            sweep_interval: Duration::from_secs(1),
        },
    )
    .await?;
    println!("    listening on unix://{}", dir.socket().display());
    let target = Target::socket(&dir.socket());
    let mut admin = target.admin().await?;
    let mut agent = target.broker().await?;

    step(
        3,
        "tessera secret put openai/prod (admin; value from stdin, never argv)",
    );
    let info = admin
        .put_secret(authed(
            proto::PutSecretRequest {
                name: "openai/prod".into(),
                value: b"sk-demo-0123456789abcdef".to_vec(),
            },
            &admin_token,
        )?)
        .await?
        .into_inner();
    println!("    stored {} version {}", info.name, info.current_version);

    step(
        4,
        "tessera agent create openclaw-gw --allow 'openai/*' --max-ttl 15m",
    );
    let created = admin
        .create_agent(authed(
            proto::CreateAgentRequest {
                name: "openclaw-gw".into(),
                allow: vec!["openai/*".into()],
                max_ttl_seconds: 900,
                max_lifetime_seconds: 3600,
            },
            &admin_token,
        )?)
        .await?
        .into_inner();
    let agent_token = Zeroizing::new(created.token.clone());
    println!("    token tsr_… shown once to the admin; the broker keeps only its hash");

    step(5, "agent: Issue(openai/prod, ttl 5m)");
    let lease = agent
        .issue(authed(
            proto::IssueRequest {
                secret: "openai/prod".into(),
                ttl_seconds: 300,
            },
            &agent_token,
        )?)
        .await?
        .into_inner();
    println!(
        "    lease {} on version {}, value {}, expires in {}s",
        lease.lease_id,
        lease.version,
        masked(&lease.value),
        lease.expires_at - lease.issued_at
    );

    step(6, "agent: Issue(stripe/live) — outside its allow list");
    match agent
        .issue(authed(
            proto::IssueRequest {
                secret: "stripe/live".into(),
                ttl_seconds: 0,
            },
            &agent_token,
        )?)
        .await
    {
        Ok(_) => println!("    unexpectedly allowed"),
        Err(s) => println!("    {:?}: {}", s.code(), s.message()),
    }

    step(7, "agent: Renew(lease, 15m)");
    let renewed = agent
        .renew(authed(
            proto::RenewRequest {
                lease_id: lease.lease_id.clone(),
                ttl_seconds: 900,
            },
            &agent_token,
        )?)
        .await?
        .into_inner();
    println!(
        "    now expires in {}s",
        renewed.expires_at - tessera_broker::init::now()
    );

    step(8, "tessera lease revoke --agent openclaw-gw (admin)");
    let r = admin
        .revoke_leases(authed(
            proto::RevokeLeasesRequest {
                selector: Some(Selector::Agent("openclaw-gw".into())),
            },
            &admin_token,
        )?)
        .await?
        .into_inner();
    println!("    revoked {} lease(s)", r.revoked);

    step(9, "agent: Renew(revoked lease)");
    match agent
        .renew(authed(
            proto::RenewRequest {
                lease_id: lease.lease_id.clone(),
                ttl_seconds: 60,
            },
            &agent_token,
        )?)
        .await
    {
        Ok(_) => println!("    unexpectedly renewed"),
        Err(s) => println!("    {:?}: {}", s.code(), s.message()),
    }

    step(10, "tessera audit verify");
    let v = admin
        .verify_audit(authed(proto::VerifyAuditRequest {}, &admin_token)?)
        .await?
        .into_inner();
    println!(
        "    {} ({} records, hash-chained; no value or token in any of them)",
        if v.ok { "intact" } else { "BROKEN" },
        v.records
    );
    let mut stream = admin
        .export_audit(authed(proto::ExportAuditRequest::default(), &admin_token)?)
        .await?
        .into_inner();
    let mut records = Vec::new();
    while let Some(rec) = stream.message().await? {
        records.push(rec);
    }
    for rec in records.iter().rev().take(5).rev() {
        println!(
            "    #{:<3} {:<20} {:<14} {:<14} {}",
            rec.seq, rec.actor, rec.action, rec.target, rec.decision
        );
    }

    running.stop();
    running.wait().await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": v.ok, "audit_records": v.records})
        );
    }
    println!("\nDone. A real broker: `tessera init && tessera serve` (see README).");
    Ok(())
}
