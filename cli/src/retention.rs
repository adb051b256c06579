//! Subcommands for key holders, retention classes, legal holds, the shred
//! ceremony, offline share work and envelope encryption.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use serde_json::json;
use tessera_broker::proto;
use tessera_shred::certificate;
use tessera_shred::envelope::{ShareEnvelope, combine_envelopes};
use tessera_shred::hex;
use zeroize::Zeroizing;

use crate::client::{CliError, Exit, authed};
use crate::commands::{admin_token, agent_token, print_json, target, time};
use crate::holder_key::{HolderKey, age_decrypt};
use crate::{
    CertificateCmd, ClassCmd, EnvelopeArgs, Global, HoldCmd, HolderCmd, HolderShareCmd, SharesCmd,
    ShredCmd,
};

pub(crate) async fn holder(g: &Global, c: HolderCmd) -> Result<(), CliError> {
    match c {
        HolderCmd::Init(h) => {
            let key = HolderKey::generate(&h.role)?;
            let public = key.public()?;
            let place = key.save(h.identity_file.as_deref())?;
            if g.json {
                print_json(json!({
                    "role": h.role,
                    "pubkey": public.to_text(),
                    "key_fingerprint": public.fingerprint(),
                    "stored_in": place,
                }));
            } else {
                outln!(
                    "Made the {} holder's keys; private keys are in the {place}.",
                    h.role
                );
                outln!("Give this public key to the tessera admin to enrol the role:");
                outln!("  {}", public.to_text());
                outln!(
                    "  (they run: tessera holder enroll --role {} --pubkey <that key>)",
                    h.role
                );
            }
        }
        HolderCmd::Enroll { role, pubkey } => {
            let token = admin_token(g)?;
            let info = target(g)
                .retention()
                .await?
                .enroll_holder(authed(proto::EnrollHolderRequest { role, pubkey }, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(holder_json(&info));
            } else {
                outln!("Enrolled role {} (key {})", info.role, info.key_fingerprint);
            }
        }
        HolderCmd::Replace { role, pubkey } => {
            let token = admin_token(g)?;
            let r = target(g)
                .retention()
                .await?
                .replace_holder(authed(proto::EnrollHolderRequest { role, pubkey }, &token)?)
                .await?
                .into_inner();
            let h = r.holder.unwrap_or_default();
            if g.json {
                let mut doc = holder_json(&h);
                doc["rekeyed"] = json!(r.rekeyed);
                doc["cancelled_ceremonies"] = json!(r.cancelled);
                print_json(doc);
            } else if r.rekeyed.is_empty() {
                outln!(
                    "Role {} now belongs to key {}; it holds a share of no class, so nothing \
                     was re-keyed.",
                    h.role,
                    h.key_fingerprint
                );
            } else {
                outln!(
                    "Role {} now belongs to key {}; re-keyed {} classes ({}). Shares of the old \
                     keys no longer open anything: holders export their new shares.",
                    h.role,
                    h.key_fingerprint,
                    r.rekeyed.len(),
                    r.rekeyed.join(", ")
                );
                if !r.cancelled.is_empty() {
                    outln!(
                        "Cancelled, because they named the old class keys: shred ceremony {}. \
                         Open them again with `tessera shred open`.",
                        r.cancelled.join(", ")
                    );
                }
            }
        }
        HolderCmd::List => {
            let token = admin_token(g)?;
            let r = target(g)
                .retention()
                .await?
                .list_holders(authed(proto::ListHoldersRequest {}, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(
                    json!({"holders": r.holders.iter().map(holder_json).collect::<Vec<_>>()}),
                );
            } else {
                outln!("{:<16} {:<17} {:<20}  CLASSES", "ROLE", "KEY", "ENROLLED");
                for h in r.holders {
                    outln!(
                        "{:<16} {:<17} {:<20}  {}",
                        h.role,
                        if h.tampered {
                            "TAMPERED"
                        } else {
                            &h.key_fingerprint
                        },
                        time(h.enrolled_at),
                        h.classes.join(",")
                    );
                }
            }
        }
        HolderCmd::Share(HolderShareCmd::Export { holder, class, out }) => {
            let key = HolderKey::load(&holder.role, holder.identity_file.as_deref())?;
            let req = key.request(
                proto::ExportShareRequest {
                    class: class.clone(),
                },
                "ExportShare",
                &class,
            )?;
            let r = target(g)
                .holders()
                .await?
                .export_share(req)
                .await?
                .into_inner();
            tessera_broker::init::write_private_file(&out, r.sealed_share.as_bytes()).map_err(
                |e| CliError::new(Exit::Precondition, format!("{e}; nothing was written")),
            )?;
            if g.json {
                print_json(json!({"class": r.class, "role": r.role, "file": out}));
            } else {
                outln!(
                    "Wrote the {} share of class {} to {} (age-sealed to your key; open it with \
                     `age -d -i YOUR_KEY_FILE {}`)",
                    r.role,
                    r.class,
                    out.display(),
                    out.display()
                );
            }
        }
    }
    Ok(())
}

fn holder_json(h: &proto::HolderInfo) -> serde_json::Value {
    json!({
        "role": h.role,
        "age_recipient": h.age_recipient,
        "key_fingerprint": h.key_fingerprint,
        "enrolled_at": h.enrolled_at,
        "classes": h.classes,
        "tampered": h.tampered,
    })
}

pub(crate) async fn class(g: &Global, c: ClassCmd) -> Result<(), CliError> {
    let token = admin_token(g)?;
    let mut client = target(g).retention().await?;
    match c {
        ClassCmd::Create {
            name,
            retain,
            holders,
            threshold,
            early_threshold,
        } => {
            let info = client
                .create_class(authed(
                    proto::CreateClassRequest {
                        name,
                        retain_seconds: crate::commands::seconds(retain, "--retain")?,
                        holders,
                        threshold,
                        early_threshold: early_threshold.unwrap_or(0),
                    },
                    &token,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(class_json(&info));
            } else {
                outln!(
                    "Created class {}: key {} split {} of {} among {}; shred due {}",
                    info.name,
                    &info.key_fingerprint[..16],
                    info.threshold,
                    info.holders.len(),
                    info.holders.join(", "),
                    time(info.deadline)
                );
                outln!(
                    "Each holder exports their sealed share with: tessera holder share export \
                     --role ROLE --class {} --out FILE",
                    info.name
                );
            }
        }
        ClassCmd::Recover {
            class,
            from,
            share,
            identity_file,
        } => {
            let mut req = tessera_broker::retention::export_class(&from, &class)?;
            let old_key = req.key_fingerprint.clone();
            req.shares = read_shares(&share, &identity_file)?
                .into_iter()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .collect();
            let info = client
                .recover_class(authed(req, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(class_json(&info));
            } else {
                outln!(
                    "Recovered class {} (key {}) with {} data keys; its deadline stays {}.",
                    info.name,
                    &info.key_fingerprint[..16],
                    info.data_keys,
                    time(info.deadline)
                );
                if info.key_fingerprint != old_key {
                    outln!(
                        "Some of its roles are enrolled here with other keys than in the old \
                         store, so the class was re-keyed: the old shares no longer open it. \
                         Each holder exports their new share with: tessera holder share export \
                         --role ROLE --class {}",
                        info.name
                    );
                }
            }
        }
        ClassCmd::List => {
            let r = client
                .list_classes(authed(proto::ListClassesRequest {}, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(
                    json!({"classes": r.classes.iter().map(class_json).collect::<Vec<_>>()}),
                );
            } else {
                outln!(
                    "{:<20} {:<10} {:<20} {:>9}  {:<6} HOLDERS",
                    "NAME",
                    "STATE",
                    "DEADLINE",
                    "THRESHOLD",
                    "HOLDS"
                );
                for c in r.classes {
                    outln!(
                        "{:<20} {:<10} {:<20} {:>9}  {:<6} {}",
                        c.name,
                        if c.tampered { "TAMPERED" } else { &c.state },
                        time(c.deadline),
                        format!("{}/{}", c.threshold, c.holders.len()),
                        c.holds.iter().filter(|h| h.released_at == 0).count(),
                        c.holders.join(",")
                    );
                }
            }
        }
        ClassCmd::Show { name } => {
            let c = client
                .get_class(authed(proto::GetClassRequest { name }, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(class_json(&c));
            } else {
                outln!("Class {}", c.name);
                if c.tampered {
                    outln!(
                        "  TAMPERED: this record (deadline, holders, thresholds or legal holds) \
                         was changed outside tessera; no ceremony of it proceeds. Restore the \
                         store from a backup."
                    );
                }
                outln!("  state:            {}", c.state);
                outln!("  key fingerprint:  {}", c.key_fingerprint);
                outln!("  created:          {}", time(c.created_at));
                outln!("  deadline:         {}", time(c.deadline));
                outln!(
                    "  holders:          {} (threshold {}, early shred {})",
                    c.holders.join(", "),
                    c.threshold,
                    c.early_threshold
                );
                outln!("  data keys:        {}", c.data_keys);
                if !c.certificate.is_empty() {
                    outln!("  certificate:      {}", c.certificate);
                }
                for h in &c.holds {
                    if h.released_at == 0 {
                        outln!(
                            "  legal hold {}:     {} (since {})",
                            h.id,
                            h.reason,
                            time(h.placed_at)
                        );
                    } else {
                        outln!(
                            "  released hold {}:  {} ({} - {}: {})",
                            h.id,
                            h.reason,
                            time(h.placed_at),
                            time(h.released_at),
                            h.release_reason
                        );
                    }
                }
                for cer in &c.ceremonies {
                    outln!(
                        "  ceremony {}: {} {} ({} of {} joined{}), expires {}",
                        cer.id,
                        cer.action,
                        cer.state,
                        cer.joined.len(),
                        cer.required,
                        if cer.joined.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", cer.joined.join(","))
                        },
                        time(cer.expires_at)
                    );
                }
            }
        }
    }
    Ok(())
}

fn class_json(c: &proto::ClassInfo) -> serde_json::Value {
    json!({
        "name": c.name,
        "state": c.state,
        "retain_seconds": c.retain_seconds,
        "deadline": c.deadline,
        "holders": c.holders,
        "threshold": c.threshold,
        "early_threshold": c.early_threshold,
        "key_fingerprint": c.key_fingerprint,
        "created_at": c.created_at,
        "data_keys": c.data_keys,
        "certificate": c.certificate,
        "tampered": c.tampered,
        "holds": c.holds.iter().map(hold_json).collect::<Vec<_>>(),
        "ceremonies": c.ceremonies.iter().map(ceremony_json).collect::<Vec<_>>(),
    })
}

fn hold_json(h: &proto::HoldInfo) -> serde_json::Value {
    json!({
        "id": h.id,
        "class": h.class,
        "reason": h.reason,
        "placed_at": h.placed_at,
        "released_at": h.released_at,
        "release_reason": h.release_reason,
    })
}

fn ceremony_json(c: &proto::CeremonyInfo) -> serde_json::Value {
    json!({
        "id": c.id,
        "class": c.class,
        "action": c.action,
        "state": c.state,
        "required": c.required,
        "joined": c.joined,
        "opened_by": c.opened_by,
        "reason": c.reason,
        "opened_at": c.opened_at,
        "expires_at": c.expires_at,
        "statement": c.statement,
    })
}

pub(crate) async fn hold(g: &Global, c: HoldCmd) -> Result<(), CliError> {
    let token = admin_token(g)?;
    let mut client = target(g).retention().await?;
    let (placing, class, hold, reason) = match c {
        HoldCmd::Place { class, reason } => (true, class, None, reason),
        HoldCmd::Release {
            class,
            hold,
            reason,
        } => (false, class, hold, reason),
    };
    let req = authed(
        proto::HoldRequest {
            class,
            reason,
            hold: hold.unwrap_or(0),
        },
        &token,
    )?;
    let h = if placing {
        client.place_hold(req).await?
    } else {
        client.release_hold(req).await?
    }
    .into_inner();
    if g.json {
        print_json(hold_json(&h));
    } else if placing {
        outln!(
            "Legal hold {} placed on class {}: {}. No shred can open or finish until it is released.",
            h.id,
            h.class,
            h.reason
        );
    } else {
        outln!(
            "Released legal hold {} on class {}: {}",
            h.id,
            h.class,
            h.release_reason
        );
    }
    Ok(())
}

pub(crate) async fn shred(g: &Global, c: ShredCmd) -> Result<(), CliError> {
    match c {
        ShredCmd::Open {
            class,
            reason,
            early,
            expires,
        } => {
            let reason = reason.unwrap_or_else(|| {
                if early {
                    "shredded early, before the retention period ended".into()
                } else {
                    "retention period ended".into()
                }
            });
            let token = admin_token(g)?;
            let cer = target(g)
                .retention()
                .await?
                .open_shred(authed(
                    proto::OpenShredRequest {
                        class,
                        reason,
                        early,
                        expires_seconds: crate::commands::seconds_defaulted(expires, "--expires")?,
                    },
                    &token,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(ceremony_json(&cer));
            } else {
                outln!(
                    "Opened shred ceremony {} for class {} ({}): {} roles must join by {}.",
                    cer.id,
                    cer.class,
                    cer.action,
                    cer.required,
                    time(cer.expires_at)
                );
                outln!(
                    "Each holder runs: tessera shred join {} --role ROLE",
                    cer.id
                );
            }
        }
        ShredCmd::Join {
            ceremony,
            holder,
            yes,
        } => {
            let key = HolderKey::load(&holder.role, holder.identity_file.as_deref())?;
            let mut client = target(g).holders().await?;
            let cer = client
                .get_ceremony(key.request(
                    proto::GetCeremonyRequest {
                        ceremony: ceremony.clone(),
                    },
                    "GetCeremony",
                    &ceremony,
                )?)
                .await?
                .into_inner();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let open = cer.state == "open" && cer.expires_at > now;
            // On stderr, so that stdout stays one JSON document; shown
            // whenever the holder is asked to confirm, --json or not.
            if open && (!g.json || !yes) {
                errln!("You are asked, as the {} holder, to sign:\n", key.role);
                for line in cer.statement.lines() {
                    errln!("    {line}");
                }
                errln!();
            }
            if open && !yes {
                confirm_signing(&cer)?;
            }
            let already = cer.joined.contains(&key.role);
            // Nothing is signed for a ceremony that is over: the broker
            // refuses it before it looks at the signature, saying why and
            // what to do instead.
            let sig = if open {
                hex(&key.sign(cer.statement.as_bytes())?)
            } else {
                String::new()
            };
            let done = client
                .join_shred(key.request(
                    proto::JoinShredRequest {
                        ceremony: ceremony.clone(),
                        signature: sig,
                    },
                    "JoinShred",
                    &ceremony,
                )?)
                .await?
                .into_inner();
            if done.state == "cancelled" {
                // The join counted, but a legal hold (or a re-key) placed at
                // the same moment won: nothing was destroyed.
                return Err(CliError::new(
                    Exit::Precondition,
                    format!(
                        "joined as {}, but shred ceremony {} was cancelled meanwhile (a legal \
                         hold on class {}, or a re-key after a change of holder): nothing was \
                         destroyed; `tessera class show {}` tells which",
                        key.role, done.id, done.class, done.class
                    ),
                ));
            }
            if g.json {
                print_json(ceremony_json(&done));
            } else if done.state == "done" {
                outln!(
                    "Joined. The quorum is met ({} of {}): the key of class {} is destroyed and \
                     the destruction certificate is written (tessera shred certificate show \
                     --class {}).",
                    done.joined.len(),
                    done.required,
                    done.class,
                    done.class
                );
            } else {
                outln!(
                    "{} as {}: {} of {} roles have joined ceremony {}.",
                    if already { "Already joined" } else { "Joined" },
                    key.role,
                    done.joined.len(),
                    done.required,
                    done.id
                );
            }
        }
        ShredCmd::Confirm { class, holder } => {
            let key = HolderKey::load(&holder.role, holder.identity_file.as_deref())?;
            let mut client = target(g).holders().await?;
            let cert = client
                .get_certificate(key.request(
                    proto::GetCertificateRequest {
                        class: class.clone(),
                    },
                    "GetCertificate",
                    &class,
                )?)
                .await?
                .into_inner();
            let (signed, _) = certificate::split_file(&cert.certificate)
                .map_err(|e| CliError::new(Exit::DataLoss, e.to_string()))?;
            let digest = certificate::digest(signed);
            let sig = key.sign(certificate::confirmation_text(&digest, &key.role).as_bytes())?;
            let r = client
                .confirm_shred(key.request(
                    proto::ConfirmShredRequest {
                        class: class.clone(),
                        signature: hex(&sig),
                    },
                    "ConfirmShred",
                    &class,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(certificate_json(&r));
            } else {
                outln!(
                    "Confirmed: the {} share of class {class} is destroyed.",
                    key.role
                );
                print_provenance(&r);
            }
        }
        ShredCmd::Certificate(CertificateCmd::Show { class, out }) => {
            crate::commands::check_new_file(out.as_deref())?;
            let token = admin_token(g)?;
            let r = target(g)
                .retention()
                .await?
                .get_certificate(authed(proto::GetCertificateRequest { class }, &token)?)
                .await?
                .into_inner();
            match out {
                Some(f) => {
                    crate::commands::write_new_file(&f, r.certificate.as_bytes())?;
                    if g.json {
                        print_json(certificate_json(&r));
                    } else {
                        outln!("Wrote the certificate to {}", f.display());
                        print_provenance(&r);
                    }
                }
                None if g.json => print_json(certificate_json(&r)),
                None => out!("{}", r.certificate),
            }
        }
        ShredCmd::Certificate(CertificateCmd::Verify { file, broker_key }) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                CliError::new(
                    Exit::InvalidArgument,
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            let pin: Option<[u8; 32]> = match broker_key {
                Some(k) => Some(
                    tessera_shred::unhex(&k)
                        .and_then(|v| v.try_into().ok())
                        .ok_or_else(|| {
                            CliError::new(
                                Exit::InvalidArgument,
                                "invalid broker_key: give the 64 hex digits `tessera status` shows",
                            )
                        })?,
                ),
                None => None,
            };
            let v = certificate::verify(&text, pin.as_ref()).map_err(|e| {
                CliError::new(
                    Exit::DataLoss,
                    format!("the certificate does not verify: {e}"),
                )
            })?;
            let c = &v.certificate;
            if g.json {
                print_json(json!({
                    "valid": true,
                    "class": c.statement.class,
                    "key_fingerprint": hex(&c.statement.key_fingerprint),
                    "ceremony": c.statement.ceremony,
                    "deadline": c.statement.deadline,
                    "action": c.statement.action.name(),
                    "destroyed_at": c.destroyed_at,
                    "destroyed": c.destroyed,
                    "joined": c.joins.iter().map(|(r, _)| r).collect::<Vec<_>>(),
                    "required": c.required,
                    "threshold": c.key_threshold,
                    "shares": c.shares,
                    "confirmed": v.confirmed,
                    "outstanding": v.outstanding(),
                    "irrecoverable": v.irrecoverable(),
                    "broker_key": hex(&c.broker_key),
                    "broker_key_pinned": pin.is_some(),
                }));
            } else {
                outln!(
                    "Certificate valid: signed by broker key {}{}.",
                    hex(&c.broker_key),
                    if pin.is_some() {
                        " (the pinned key)"
                    } else {
                        " (not pinned: pass --broker-key to check it is your broker's)"
                    }
                );
                outln!(
                    "  class {} key {} ({} of {} shares) destroyed at {} by ceremony {} ({}).",
                    c.statement.class,
                    &hex(&c.statement.key_fingerprint)[..16],
                    c.key_threshold,
                    c.shares,
                    time(c.destroyed_at),
                    c.statement.ceremony,
                    c.statement.action.name()
                );
                outln!(
                    "  joined by {} (needed {}); destroyed: {}.",
                    c.joins
                        .iter()
                        .map(|(r, _)| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.required,
                    c.destroyed
                );
                if v.irrecoverable() {
                    outln!(
                        "  The key is provably irrecoverable: {} of {} offline shares are \
                         confirmed destroyed, so fewer than {} can remain anywhere.",
                        v.confirmed.len(),
                        c.shares,
                        c.key_threshold
                    );
                } else {
                    outln!(
                        "  Not yet provably irrecoverable: {} offline shares are unconfirmed; \
                         {} more holders must run `tessera shred confirm`.",
                        v.outstanding(),
                        v.outstanding() + 1 - c.key_threshold as usize
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_provenance(r: &proto::CertificateResponse) {
    if r.irrecoverable {
        outln!(
            "The key is now provably irrecoverable: fewer than a quorum of shares remain anywhere."
        );
    } else {
        outln!(
            "{} offline shares are not yet confirmed destroyed.",
            r.outstanding
        );
    }
}

fn certificate_json(r: &proto::CertificateResponse) -> serde_json::Value {
    json!({
        "certificate": r.certificate,
        "outstanding": r.outstanding,
        "irrecoverable": r.irrecoverable,
        "broker_key": r.broker_key,
    })
}

/// Asks the holder to type the class name before signing (a terminal is
/// required unless --yes).
fn confirm_signing(cer: &proto::CeremonyInfo) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            Exit::Precondition,
            "not signing: stdin is not a terminal to confirm on; read the statement above and \
             pass --yes to sign it",
        ));
    }
    eprint!(
        "Type the class name ({}) to sign, anything else to stop: ",
        cer.class
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot read the answer: {e}")))?;
    if line.trim() != cer.class {
        return Err(CliError::new(Exit::Failure, "not signed; nothing was sent"));
    }
    Ok(())
}

pub(crate) fn shares(g: &Global, c: SharesCmd) -> Result<(), CliError> {
    let SharesCmd::Combine {
        files,
        identity_file,
        reveal,
    } = c;
    let key = combine_files(&files, &identity_file)?;
    let env_class = key.1;
    let fp = tessera_shred::key_check(&key.0);
    if g.json {
        let mut doc = json!({
            "class": env_class,
            "key_fingerprint": hex(&fp),
            "shares": files.len(),
        });
        if reveal {
            doc["key"] = json!(Zeroizing::new(hex(&key.0)).as_str());
        }
        print_json(doc);
    } else {
        errln!(
            "The {} shares combine to the key of class {env_class} (fingerprint {}).",
            files.len(),
            hex(&fp)
        );
        if reveal {
            outln!("{}", Zeroizing::new(hex(&key.0)).as_str());
        }
    }
    if reveal {
        crate::shown("the recombined key", "")?;
    }
    Ok(())
}

/// The age identities in key files: holder key files, or plain age
/// identity files (lines `AGE-SECRET-KEY-1…`).
fn identities(files: &[PathBuf]) -> Result<Vec<age::x25519::Identity>, CliError> {
    use std::str::FromStr;
    let mut out = Vec::new();
    for f in files {
        let text = Zeroizing::new(std::fs::read_to_string(f).map_err(|e| {
            CliError::new(
                Exit::InvalidArgument,
                format!("cannot read --identity-file {}: {e}", f.display()),
            )
        })?);
        let before = out.len();
        for line in text.lines().filter(|l| l.starts_with("AGE-SECRET-KEY-")) {
            out.push(age::x25519::Identity::from_str(line.trim()).map_err(|e| {
                CliError::new(Exit::InvalidArgument, format!("{}: {e}", f.display()))
            })?);
        }
        if out.len() == before {
            return Err(CliError::new(
                Exit::InvalidArgument,
                format!("{} holds no age identity (AGE-SECRET-KEY-1…)", f.display()),
            ));
        }
    }
    Ok(out)
}

/// A share file's text: as is, or opened with age when it is sealed.
pub(crate) fn open_share_bytes(
    raw: Zeroizing<Vec<u8>>,
    identity_files: &[PathBuf],
    what: &str,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    if !(raw.starts_with(b"age-encryption.org")
        || raw.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"))
    {
        return Ok(raw);
    }
    let keys = identities(identity_files)?;
    let ids: Vec<&age::x25519::Identity> = keys.iter().collect();
    age_decrypt(&raw, &ids).map_err(|e| {
        CliError::new(
            Exit::InvalidArgument,
            format!(
                "cannot open {what} with the given --identity-file keys ({e}); pass the key it \
                 was sealed to"
            ),
        )
    })
}

/// Reads share files: plain `tessera-share-v1` envelopes, or age-sealed
/// ones opened with the given key files.
pub(crate) fn read_shares(
    files: &[PathBuf],
    identity_files: &[PathBuf],
) -> Result<Vec<Zeroizing<Vec<u8>>>, CliError> {
    let mut out = Vec::new();
    for f in files {
        let raw = Zeroizing::new(std::fs::read(f).map_err(|e| {
            CliError::new(
                Exit::InvalidArgument,
                format!("cannot read {}: {e}", f.display()),
            )
        })?);
        out.push(open_share_bytes(
            raw,
            identity_files,
            &f.display().to_string(),
        )?);
    }
    Ok(out)
}

/// Reads share files and combines them, checked against the fingerprint.
pub(crate) fn combine_files(
    files: &[PathBuf],
    identity_files: &[PathBuf],
) -> Result<(Zeroizing<Vec<u8>>, String), CliError> {
    let mut envelopes = Vec::new();
    for (f, text) in files.iter().zip(read_shares(files, identity_files)?) {
        envelopes.push(
            ShareEnvelope::parse(&text).map_err(|e| {
                CliError::new(Exit::InvalidArgument, format!("{}: {e}", f.display()))
            })?,
        );
    }
    let class = envelopes
        .first()
        .map(|e| e.class.clone())
        .unwrap_or_default();
    let key = combine_envelopes(&envelopes)
        .map_err(|e| CliError::new(Exit::InvalidArgument, format!("cannot combine: {e}")))?;
    Ok((key, class))
}

fn context(a: &EnvelopeArgs) -> std::collections::HashMap<String, String> {
    a.context.iter().cloned().collect()
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot write stdout: {e}")))
}

pub(crate) async fn encrypt(g: &Global, a: EnvelopeArgs) -> Result<(), CliError> {
    let token = agent_token()?;
    let plaintext = crate::commands::read_stdin("the data to encrypt", "")?;
    let r = target(g)
        .envelope()
        .await?
        .encrypt(authed(
            proto::EncryptRequest {
                class: a.class.clone(),
                plaintext: plaintext.to_vec(),
                context: context(&a),
            },
            &token,
        )?)
        .await?
        .into_inner();
    if g.json {
        print_json(json!({"class": a.class, "key_id": r.key_id, "ciphertext": hex(&r.ciphertext)}));
        Ok(())
    } else {
        write_stdout(&r.ciphertext)
    }
}

/// The ciphertext as `encrypt` wrote it, or as the hex `encrypt --json`
/// printed (a raw envelope starts with `tse1`/`tsk1`, never a hex digit, so
/// the two cannot be confused).
fn from_hex_if_hex(input: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    let text = input.trim_ascii();
    if text.is_empty() || !text.iter().all(u8::is_ascii_hexdigit) {
        return input;
    }
    match std::str::from_utf8(text)
        .ok()
        .and_then(tessera_shred::unhex)
    {
        Some(bytes) => Zeroizing::new(bytes),
        None => input,
    }
}

pub(crate) async fn decrypt(g: &Global, a: EnvelopeArgs) -> Result<(), CliError> {
    let token = agent_token()?;
    let ciphertext = from_hex_if_hex(crate::commands::read_stdin(
        "the ciphertext to decrypt",
        "",
    )?);
    let mut r = target(g)
        .envelope()
        .await?
        .decrypt(authed(
            proto::DecryptRequest {
                class: a.class.clone(),
                ciphertext: ciphertext.to_vec(),
                context: context(&a),
            },
            &token,
        )?)
        .await?
        .into_inner();
    let plaintext = Zeroizing::new(std::mem::take(&mut r.plaintext));
    if g.json {
        let hexed = Zeroizing::new(hex(&plaintext));
        print_json(json!({"class": a.class, "plaintext": hexed.as_str()}));
        Ok(())
    } else {
        write_stdout(&plaintext)
    }
}
