//! Subcommands for rotation (`rotate …`, `secret show|config`) and for
//! agents that follow rotations (`get --watch`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tessera_broker::broker::{Limits, peek_source};
use tessera_broker::proto;
use tessera_broker::unseal::Source;
use zeroize::Zeroizing;

use crate::client::{CliError, Exit, authed};
use crate::commands::{admin_token, data_dir, print_json, target, time};
use crate::{GetArgs, Global, RotateArgs, RotateCmd, SecretConfigArgs};

/// The gRPC request for `secret config`.
pub(crate) fn config_request(
    a: SecretConfigArgs,
) -> Result<proto::ConfigureSecretRequest, CliError> {
    let cmd = |path: Option<String>, args: Vec<String>| -> Vec<String> {
        path.into_iter().chain(args).collect()
    };
    Ok(proto::ConfigureSecretRequest {
        name: a.name,
        overlap_seconds: crate::commands::whole_seconds(a.overlap, "--overlap")?,
        class: a.class,
        generate: a.generate,
        set_rotate_cmd: a.rotate_cmd.is_some() || a.no_rotate_cmd,
        rotate_cmd: cmd(a.rotate_cmd, a.rotate_arg),
        set_verify_cmd: a.verify_cmd.is_some() || a.no_verify_cmd,
        verify_cmd: cmd(a.verify_cmd, a.verify_arg),
        value_via: a.value_via,
        cmd_timeout_seconds: crate::commands::whole_seconds(a.cmd_timeout, "--cmd-timeout")?,
    })
}

fn detail_json(d: &proto::SecretDetail) -> serde_json::Value {
    json!({
        "name": d.name,
        "current_version": d.current_version,
        "overlap_seconds": d.overlap_seconds,
        "class": d.class,
        "generate": d.generate,
        "rotate_cmd": d.rotate_cmd,
        "verify_cmd": d.verify_cmd,
        "value_via": d.value_via,
        "cmd_timeout_seconds": d.cmd_timeout_seconds,
        "schedule": d.schedule,
        "schedule_tz": d.schedule_tz,
        "jitter_seconds": d.jitter_seconds,
        "next_due": d.next_due,
        "last_result": d.last_result,
        "last_run_at": d.last_run_at,
        "failures": d.failures,
        "created_at": d.created_at,
        "updated_at": d.updated_at,
        "tampered": d.tampered,
        "versions": d.versions.iter().map(|v| json!({
            "version": v.version,
            "state": v.state,
            "created_at": v.created_at,
            "source": v.source,
            "retire_at": v.retire_at,
            "due_at": v.due_at,
            "archived_class": v.archived_class,
        })).collect::<Vec<_>>(),
    })
}

/// Prints a secret's versions and settings.
pub(crate) fn print_detail(g: &Global, d: &proto::SecretDetail) {
    if g.json {
        print_json(detail_json(d));
        return;
    }
    outln!("Secret {} (current version {})", d.name, d.current_version);
    if d.tampered {
        outln!(
            "  TAMPERED: this row was changed outside tessera; it is not used (no value is \
             issued, no command runs). Delete the secret and store it again."
        );
    }
    outln!("  overlap:     {}s", d.overlap_seconds);
    if !d.class.is_empty() {
        outln!("  archived under class {}", d.class);
    }
    if !d.generate.is_empty() {
        outln!("  generator:   {}", d.generate);
    }
    if !d.rotate_cmd.is_empty() {
        outln!(
            "  rotate cmd:  {} (value via {})",
            d.rotate_cmd.join(" "),
            d.value_via
        );
    }
    if !d.verify_cmd.is_empty() {
        outln!("  verify cmd:  {}", d.verify_cmd.join(" "));
    }
    if d.schedule.is_empty() {
        outln!("  schedule:    none");
    } else {
        outln!(
            "  schedule:    {}{} (jitter {}s); next due {}",
            d.schedule,
            if d.schedule_tz.is_empty() {
                String::new()
            } else {
                format!(" {}", d.schedule_tz)
            },
            d.jitter_seconds,
            time(d.next_due)
        );
    }
    if !d.last_result.is_empty() {
        outln!("  last result: {} ({})", d.last_result, time(d.last_run_at));
    }
    outln!(
        "  {:>7}  {:<38} {:<20}  SOURCE",
        "VERSION",
        "STATE",
        "CREATED"
    );
    for v in &d.versions {
        let state = match v.state.as_str() {
            "overlapping" => format!("overlapping until {}", time(v.retire_at)),
            "archived" => format!("archived ({})", v.archived_class),
            "shredded" => format!("shredded with class {}", v.archived_class),
            s => s.to_string(),
        };
        outln!(
            "  {:>7}  {:<38} {:<20}  {}",
            v.version,
            state,
            time(v.created_at),
            v.source
        );
    }
}

fn result_json(r: &proto::RotationResult) -> serde_json::Value {
    json!({
        "name": r.name,
        "outcome": r.outcome,
        "version": r.version,
        "message": r.message,
        "due_at": r.due_at,
    })
}

pub(crate) async fn rotate(g: &Global, a: RotateArgs) -> Result<(), CliError> {
    if a.due {
        return rotate_due(g, a.passphrase_file.as_deref()).await;
    }
    let Some(cmd) = a.cmd else {
        return Err(CliError::new(
            Exit::Usage,
            "say what to rotate: `tessera rotate now NAME`, `rotate schedule`, `rotate status` \
             or `rotate --due`",
        ));
    };
    let token = admin_token(g)?;
    let mut admin = target(g).admin().await?;
    match cmd {
        RotateCmd::Now {
            name,
            from_stdin,
            generate,
        } => {
            let mut value = Zeroizing::new(Vec::new());
            if from_stdin {
                value = crate::commands::read_value(
                    &format!("the new value of {name}"),
                    ", or leave out --from-stdin for a generated value",
                )
                .await?;
            }
            let r = admin
                .rotate_now(authed(
                    proto::RotateNowRequest {
                        name,
                        value: std::mem::take(&mut *value),
                        generate: generate.unwrap_or_default(),
                    },
                    &token,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(result_json(&r));
            } else {
                outln!("{}: {}", r.name, r.message);
            }
        }
        RotateCmd::Schedule {
            name,
            every,
            cron,
            tz,
            jitter,
        } => {
            let every_seconds = crate::commands::seconds_or_default(every, "--every")?;
            let d = admin
                .schedule_rotation(authed(
                    proto::ScheduleRotationRequest {
                        name,
                        every_seconds,
                        cron: cron.unwrap_or_default(),
                        tz: tz.unwrap_or_default(),
                        jitter_seconds: crate::commands::whole_seconds(jitter, "--jitter")?
                            .unwrap_or(0),
                    },
                    &token,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(detail_json(&d));
            } else {
                outln!(
                    "{} rotates on {}; next due {}",
                    d.name,
                    d.schedule,
                    time(d.next_due)
                );
            }
        }
        RotateCmd::Unschedule { name } => {
            let d = admin
                .unschedule_rotation(authed(proto::ShowSecretRequest { name }, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(detail_json(&d));
            } else {
                outln!("{} is no longer scheduled", d.name);
            }
        }
        RotateCmd::Status => {
            let r = admin
                .rotation_status(authed(proto::RotationStatusRequest {}, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(
                    json!({"secrets": r.secrets.iter().map(detail_json).collect::<Vec<_>>()}),
                );
            } else {
                outln!(
                    "{:<32} {:<24} {:<20}  LAST RESULT",
                    "SECRET",
                    "SCHEDULE",
                    "NEXT DUE"
                );
                for d in r.secrets {
                    outln!(
                        "{:<32} {:<24} {:<20}  {}",
                        d.name,
                        d.schedule,
                        time(d.next_due),
                        d.last_result
                    );
                }
            }
        }
    }
    Ok(())
}

/// `rotate --due`: through the running broker, or, when none answers on a
/// local socket (the default, or a `unix://` `--addr` as the systemd unit
/// and cron job give), in this process on the store itself. A broker at a
/// TCP address may serve a store on another machine: that is only reported.
async fn rotate_due(g: &Global, passphrase_file: Option<&Path>) -> Result<(), CliError> {
    let local = g.addr.as_deref().is_none_or(|a| a.starts_with("unix:"));
    let results = match target(g).admin().await {
        Ok(mut admin) => {
            let token = admin_token(g)?;
            admin
                .rotate_due(authed(proto::RotateDueRequest {}, &token)?)
                .await?
                .into_inner()
                .results
        }
        Err(e) if e.exit == Exit::Unavailable && local => {
            let dir = data_dir(g);
            let source = peek_source(&dir)?;
            let pass = match source {
                Source::Passphrase => Some(
                    crate::commands::passphrase(passphrase_file, false).map_err(|e| {
                        CliError::new(
                            e.exit,
                            format!(
                                "no broker is running and this store is sealed with a \
                                 passphrase; {}",
                                e.message
                            ),
                        )
                    })?,
                ),
                Source::Shares => {
                    return Err(CliError::new(
                        Exit::Precondition,
                        "no broker is running and this store's root key is split among \
                         operators: start `tessera serve` and unseal it",
                    ));
                }
                Source::Keychain(_) => None,
            };
            let d = dir.clone();
            let broker = tokio::task::spawn_blocking(move || {
                tessera_broker::Broker::open(&d, pass.as_deref().map(|p| &p[..]), Limits::default())
            })
            .await
            .map_err(|e| CliError::new(Exit::Failure, format!("unseal task failed: {e}")))??;
            let broker = Arc::new(broker);
            let r = broker.rotate_due("rotate-due", "admin").await?;
            broker.flush().await?;
            r
        }
        Err(e) => return Err(e),
    };
    let failed = results.iter().filter(|r| r.outcome == "failed").count();
    if g.json {
        print_json(
            json!({"results": results.iter().map(result_json).collect::<Vec<_>>(), "failed": failed}),
        );
    } else if results.is_empty() {
        outln!("nothing is due");
    } else {
        for r in &results {
            outln!("{:<8} {}: {}", r.outcome, r.name, r.message);
        }
    }
    if failed > 0 {
        return Err(CliError::new(
            Exit::Failure,
            format!("{failed} rotation(s) failed; their current versions stay active"),
        ));
    }
    Ok(())
}

/// `get NAME --watch`: print the value, then again each time it changes.
pub(crate) async fn get_watch(g: &Global, a: GetArgs) -> Result<(), CliError> {
    let ttl_seconds = crate::commands::seconds_or_default(a.ttl, "--ttl")?;
    let print = |lease: &proto::Lease| -> Result<(), CliError> {
        let value = Zeroizing::new(lease.value.clone());
        let mut out = std::io::stdout().lock();
        if g.json {
            let mut doc = json!({
                "lease_id": lease.lease_id,
                "secret": lease.secret,
                "version": lease.version,
                "expires_at": lease.expires_at,
            });
            crate::commands::put_value(&mut doc, &value);
            let text = Zeroizing::new(doc.to_string());
            crate::commands::wipe_json(&mut doc);
            writeln!(out, "{}", text.as_str())
        } else {
            out.write_all(&value).and_then(|()| out.write_all(b"\n"))
        }
        .and_then(|()| out.flush())
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot write stdout: {e}")))
    };
    crate::run::get_watch(g, &a.name, ttl_seconds, &print).await
}
