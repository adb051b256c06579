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
use crate::holder_key::HolderKey;

/// Where the narration goes: stdout, or stderr under `--json` so that
/// stdout carries one JSON document.
static NARRATE_TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

macro_rules! say {
    ($($t:tt)*) => {
        if NARRATE_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
            errln!($($t)*)
        } else {
            outln!($($t)*)
        }
    };
}

fn step(n: u32, what: &str) {
    say!("\n[{n}] {what}");
}

fn masked(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(v);
    let head: String = s.chars().take(6).collect();
    format!("{head}… ({} bytes)", v.len())
}

/// Steps 10-11: a rotation under a live lease: the agent's watch hears of
/// it, the old lease keeps working through the overlap window, then is
/// revoked.
async fn rotation_under_lease(
    target: &Target,
    admin_token: &str,
    agent_token: &str,
) -> Result<(), CliError> {
    let mut admin = target.admin().await?;
    let mut agent = target.broker().await?;
    step(
        10,
        "tessera secret config openai/prod --overlap 2s --generate 'sk-{alnum:32}'; \
         tessera rotate now openai/prod (the agent holds a lease and watches)",
    );
    let mut events = agent
        .watch(authed(proto::WatchRequest::default(), agent_token)?)
        .await?
        .into_inner();
    let held = agent
        .issue(authed(
            proto::IssueRequest {
                secret: "openai/prod".into(),
                ttl_seconds: 300,
            },
            agent_token,
        )?)
        .await?
        .into_inner();
    say!(
        "    agent holds lease {} on version {}",
        held.lease_id,
        held.version
    );
    admin
        .configure_secret(authed(
            proto::ConfigureSecretRequest {
                name: "openai/prod".into(),
                overlap_seconds: Some(2),
                generate: Some("sk-{alnum:32}".into()),
                ..Default::default()
            },
            admin_token,
        )?)
        .await?;
    let r = admin
        .rotate_now(authed(
            proto::RotateNowRequest {
                name: "openai/prod".into(),
                value: Vec::new(),
                generate: String::new(),
            },
            admin_token,
        )?)
        .await?
        .into_inner();
    say!("    rotated: {}", r.message);
    if let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_secs(5), events.message()).await {
        say!(
            "    Watch: {} {} version {}",
            ev.kind,
            ev.secret,
            ev.version
        );
    }
    let renew = |id: String| proto::RenewRequest {
        lease_id: id,
        ttl_seconds: 60,
    };
    agent
        .renew(authed(renew(held.lease_id.clone()), agent_token)?)
        .await?;
    say!("    the old lease still renews during the overlap window");
    let fresh = agent
        .issue(authed(
            proto::IssueRequest {
                secret: "openai/prod".into(),
                ttl_seconds: 300,
            },
            agent_token,
        )?)
        .await?
        .into_inner();
    say!(
        "    a new Issue gets version {}: {}",
        fresh.version,
        masked(&fresh.value)
    );

    step(
        11,
        "after the overlap: version 1 is retired and its lease revoked",
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    match agent
        .renew(authed(renew(held.lease_id.clone()), agent_token)?)
        .await
    {
        Ok(_) => say!("    unexpectedly renewed"),
        Err(s) => say!("    {:?}: {}", s.code(), s.message()),
    }
    let d = admin
        .show_secret(authed(
            proto::ShowSecretRequest {
                name: "openai/prod".into(),
            },
            admin_token,
        )?)
        .await?
        .into_inner();
    for v in d.versions {
        say!("    version {}: {} ({})", v.version, v.state, v.source);
    }
    Ok(())
}

/// Steps 12-18: three key holders, a retention class split 2 of 3, data
/// encrypted under it, a refused early shred, a legal hold, the ceremony
/// the broker opens at the deadline, two holders joining, the key
/// destroyed, and the certificate checked offline.
async fn shred_ceremony(target: &Target, admin_token: &str) -> Result<(), CliError> {
    let mut retention = target.retention().await?;
    let mut holders = target.holders().await?;
    let mut envelope = target.envelope().await?;
    let mut admin = target.admin().await?;

    step(
        12,
        "tessera holder init / enroll: legal, compliance and ciso make keys and are enrolled",
    );
    let mut keys = Vec::new();
    for role in ["legal", "compliance", "ciso"] {
        // Real holders keep these in their own keychains; the demo keeps
        // them in memory.
        let key = HolderKey::generate(role)?;
        let pubkey = key.public()?.to_text();
        let info = retention
            .enroll_holder(authed(
                proto::EnrollHolderRequest {
                    role: role.into(),
                    pubkey,
                },
                admin_token,
            )?)
            .await?
            .into_inner();
        say!("    {:<11} key {}", info.role, info.key_fingerprint);
        keys.push(key);
    }

    step(
        13,
        "tessera class create sox-demo --retain 3s --holders legal,compliance,ciso --threshold 2",
    );
    let class = retention
        .create_class(authed(
            proto::CreateClassRequest {
                name: "sox-demo".into(),
                retain_seconds: 3,
                holders: vec!["legal".into(), "compliance".into(), "ciso".into()],
                threshold: 2,
                early_threshold: 0,
            },
            admin_token,
        )?)
        .await?
        .into_inner();
    say!(
        "    class key {} split 2 of 3; each share sealed to its holder with age",
        &class.key_fingerprint[..16]
    );

    step(14, "agent archiver: Encrypt(sox-demo, ledger 2019)");
    let created = admin
        .create_agent(authed(
            proto::CreateAgentRequest {
                name: "archiver".into(),
                allow: vec!["class:sox-demo".into()],
                max_ttl_seconds: 900,
                max_lifetime_seconds: 3600,
                expires_in_seconds: 0,
                peer_uid: None,
            },
            admin_token,
        )?)
        .await?
        .into_inner();
    let archiver = Zeroizing::new(created.token.clone());
    let context: std::collections::HashMap<String, String> =
        [("ledger".to_string(), "2019".to_string())].into();
    let ct = envelope
        .encrypt(authed(
            proto::EncryptRequest {
                class: "sox-demo".into(),
                plaintext: b"general ledger FY2019".to_vec(),
                context: context.clone(),
            },
            &archiver,
        )?)
        .await?
        .into_inner();
    say!(
        "    ciphertext of {} bytes, data key {}",
        ct.ciphertext.len(),
        ct.key_id
    );

    step(
        15,
        "tessera shred open --class sox-demo (before the deadline)",
    );
    let open = |early: bool| proto::OpenShredRequest {
        class: "sox-demo".into(),
        reason: "retention ended".into(),
        early,
        expires_seconds: 0,
    };
    if let Err(s) = retention
        .open_shred(authed(open(false), admin_token)?)
        .await
    {
        say!("    {:?}: {}", s.code(), s.message());
    }

    step(
        16,
        "tessera hold place --class sox-demo --reason 'litigation 2026-17'",
    );
    retention
        .place_hold(authed(
            proto::HoldRequest {
                class: "sox-demo".into(),
                reason: "litigation 2026-17".into(),
                hold: 0,
            },
            admin_token,
        )?)
        .await?;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    if let Err(s) = retention
        .open_shred(authed(open(false), admin_token)?)
        .await
    {
        say!("    after the deadline, {:?}: {}", s.code(), s.message());
    }
    retention
        .release_hold(authed(
            proto::HoldRequest {
                class: "sox-demo".into(),
                reason: "case closed".into(),
                hold: 0,
            },
            admin_token,
        )?)
        .await?;
    say!("    hold released: case closed");

    step(
        17,
        "the broker opens the ceremony; legal and ciso run `tessera shred join`",
    );
    let ceremony = loop {
        let c = retention
            .get_class(authed(
                proto::GetClassRequest {
                    name: "sox-demo".into(),
                },
                admin_token,
            )?)
            .await?
            .into_inner();
        if let Some(cer) = c.ceremonies.into_iter().find(|c| c.state == "open") {
            break cer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    say!(
        "    ceremony {} opened by {}; statement:",
        ceremony.id,
        ceremony.opened_by
    );
    for line in ceremony.statement.lines() {
        say!("      {line}");
    }
    for key in [&keys[0], &keys[2]] {
        let sig = key.sign(ceremony.statement.as_bytes())?;
        let joined = holders
            .join_shred(key.request(
                proto::JoinShredRequest {
                    ceremony: ceremony.id.clone(),
                    signature: tessera_shred::hex(&sig),
                },
                "JoinShred",
                &ceremony.id,
            )?)
            .await?
            .into_inner();
        say!(
            "    {} joined: {} of {}, ceremony {}",
            key.role,
            joined.joined.len(),
            joined.required,
            joined.state
        );
    }

    step(
        18,
        "after the shred: Decrypt is refused; the certificate verifies offline",
    );
    match envelope
        .decrypt(authed(
            proto::DecryptRequest {
                class: "sox-demo".into(),
                ciphertext: ct.ciphertext,
                context,
            },
            &archiver,
        )?)
        .await
    {
        Ok(_) => say!("    unexpectedly decrypted"),
        Err(s) => say!("    {:?}: {}", s.code(), s.message()),
    }
    let cert = retention
        .get_certificate(authed(
            proto::GetCertificateRequest {
                class: "sox-demo".into(),
            },
            admin_token,
        )?)
        .await?
        .into_inner();
    let pin: Option<[u8; 32]> =
        tessera_shred::unhex(&cert.broker_key).and_then(|k| k.try_into().ok());
    let v = tessera_shred::certificate::verify(&cert.certificate, pin.as_ref())
        .map_err(|e| CliError::new(Exit::DataLoss, e.to_string()))?;
    say!(
        "    certificate valid: key {} destroyed ({}), signed by broker key {}; {} offline \
         shares still to be confirmed destroyed",
        &class.key_fingerprint[..16],
        v.certificate.destroyed,
        &tessera_shred::hex(&v.certificate.broker_key)[..16],
        v.outstanding()
    );
    Ok(())
}

/// Runs the walk-through; every step goes over gRPC to the broker. A
/// SIGINT or SIGTERM stops it and still removes its temporary store.
pub async fn run(json: bool) -> Result<(), CliError> {
    let tmp = tempfile::Builder::new()
        .prefix("tessera-demo-")
        .tempdir()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot create a temp dir: {e}")))?;
    tokio::select! {
        r = walk(json, tmp.path()) => r,
        () = server::termination() => {
            // The broker the walk started still runs (its tasks were not
            // stopped): a file it writes meanwhile fails one attempt.
            let mut removed = false;
            for _ in 0..20 {
                removed = std::fs::remove_dir_all(tmp.path()).is_ok() || !tmp.path().exists();
                if removed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(CliError::new(
                Exit::Failure,
                if removed {
                    "stopped by a signal; the demo's temporary store was removed".to_string()
                } else {
                    format!(
                        "stopped by a signal; remove the demo's temporary store {}",
                        tmp.path().display()
                    )
                },
            ))
        }
    }
}

async fn walk(json: bool, root: &std::path::Path) -> Result<(), CliError> {
    NARRATE_TO_STDERR.store(json, std::sync::atomic::Ordering::Relaxed);
    let dir = DataDir::new(root.join("data"));
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
    say!("    store: {}", done.db_path.display());
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
            lease_history: Duration::from_secs(7 * 24 * 3600),
            scheduler: true,
            max_connections: None,
        },
    )
    .await?;
    say!("    listening on unix://{}", dir.socket().display());
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
    say!("    stored {} version {}", info.name, info.current_version);

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
                expires_in_seconds: 0,
                peer_uid: None,
            },
            &admin_token,
        )?)
        .await?
        .into_inner();
    let agent_token = Zeroizing::new(created.token.clone());
    say!("    token tsr_… shown once to the admin; the broker keeps only its hash");

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
    say!(
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
        Ok(_) => say!("    unexpectedly allowed"),
        Err(s) => say!("    {:?}: {}", s.code(), s.message()),
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
    say!(
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
    say!("    revoked {} lease(s)", r.revoked);

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
        Ok(_) => say!("    unexpectedly renewed"),
        Err(s) => say!("    {:?}: {}", s.code(), s.message()),
    }

    rotation_under_lease(&target, &admin_token, &agent_token).await?;
    shred_ceremony(&target, &admin_token).await?;

    step(
        19,
        "tessera audit checkpoint && tessera audit verify --checkpoint",
    );
    let cp = admin
        .checkpoint_audit(authed(proto::CheckpointAuditRequest {}, &admin_token)?)
        .await?
        .into_inner();
    say!(
        "    checkpoint of record {} signed by the broker (keep it off the machine: it \
         catches a store rolled back to an older copy)",
        cp.seq
    );
    let v = admin
        .verify_audit(authed(
            proto::VerifyAuditRequest {
                checkpoints: vec![cp.text],
            },
            &admin_token,
        )?)
        .await?
        .into_inner();
    say!(
        "    {} ({} records, hash-chained, reaching the checkpoint; no value or token in any \
         of them)",
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
        say!(
            "    #{:<3} {:<20} {:<14} {:<14} {}",
            rec.seq,
            rec.actor,
            rec.action,
            rec.target,
            rec.decision
        );
    }

    running.stop();
    running.wait().await?;
    say!("\nDone. A real broker: `tessera init && tessera serve` (see README).");
    if json {
        outln!(
            "{}",
            serde_json::json!({"ok": v.ok, "audit_records": v.records})
        );
    }
    Ok(())
}
