//! `tessera run --env VAR=secret … -- CMD ARGS…`: fetch leases, start CMD
//! with the values in its environment (never on its command line), renew
//! the leases while it runs, follow rotations and revocations through
//! `Watch` (restart CMD, signal it, or ignore), forward SIGTERM/SIGINT,
//! revoke the leases when CMD exits, and exit with CMD's status.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tessera_broker::proto;
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::client::{CliError, Exit, authed};
use crate::commands::{agent_token, target};
use crate::{Global, RunArgs};

/// What to do when a value changes under a running command.
#[derive(Debug, Clone, Copy)]
enum OnRotate {
    Restart,
    Signal(Signal),
    Ignore,
}

fn parse_on_rotate(s: &str) -> Result<OnRotate, CliError> {
    match s {
        "restart" => Ok(OnRotate::Restart),
        "ignore" => Ok(OnRotate::Ignore),
        _ => {
            let name = s.strip_prefix("signal:").ok_or_else(|| {
                CliError::new(
                    Exit::InvalidArgument,
                    format!("invalid on_rotate {s:?}: use restart, signal:HUP (or another signal) or ignore"),
                )
            })?;
            let sig: Signal = format!("SIG{}", name.trim_start_matches("SIG"))
                .parse()
                .map_err(|_| {
                    CliError::new(
                        Exit::InvalidArgument,
                        format!(
                            "invalid on_rotate: {name:?} is not a signal name (HUP, USR1, TERM…)"
                        ),
                    )
                })?;
            Ok(OnRotate::Signal(sig))
        }
    }
}

/// One environment variable fed from a secret.
struct Binding {
    var: String,
    secret: String,
    lease: proto::Lease,
}

async fn issue(
    broker: &mut tessera_broker::proto::broker_client::BrokerClient<Channel>,
    token: &str,
    secret: &str,
) -> Result<proto::Lease, CliError> {
    Ok(broker
        .issue(authed(
            proto::IssueRequest {
                secret: secret.into(),
                ttl_seconds: 0,
            },
            token,
        )?)
        .await?
        .into_inner())
}

fn spawn(args: &RunArgs, bindings: &[Binding]) -> Result<Child, CliError> {
    let (program, rest) = args.command.split_first().ok_or_else(|| {
        CliError::new(
            Exit::Usage,
            "give the command to run after --, e.g. -- python bot.py",
        )
    })?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .env_remove("TESSERA_TOKEN")
        .kill_on_drop(true);
    for b in bindings {
        let v = Zeroizing::new(String::from_utf8_lossy(&b.lease.value).into_owned());
        cmd.env(&b.var, v.as_str());
    }
    cmd.spawn()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot start {program:?}: {e}")))
}

fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Runs the command; returns its exit code (128 + signal if killed).
pub(crate) async fn run(g: &Global, args: RunArgs) -> Result<i32, CliError> {
    let token = agent_token()?;
    let on_rotate = parse_on_rotate(&args.on_rotate)?;
    let mut broker = target(g).broker().await?;
    let mut events = broker
        .watch(authed(proto::WatchRequest { after_event_id: 0 }, &token)?)
        .await?
        .into_inner();
    let mut bindings = Vec::new();
    for e in &args.env {
        let (var, secret) = e.split_once('=').ok_or_else(|| {
            CliError::new(
                Exit::InvalidArgument,
                format!(
                    "invalid env {e:?}: write VAR=secret/name, e.g. OPENAI_API_KEY=openai/prod"
                ),
            )
        })?;
        let lease = issue(&mut broker, &token, secret).await?;
        bindings.push(Binding {
            var: var.to_string(),
            secret: secret.to_string(),
            lease,
        });
    }
    let mut child = spawn(&args, &bindings)?;
    let renew_every = bindings
        .iter()
        .map(|b| (b.lease.expires_at - b.lease.issued_at).max(2) as u64 / 2)
        .min()
        .unwrap_or(60);
    let mut renew = tokio::time::interval(Duration::from_secs(renew_every.max(1)));
    renew.tick().await;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot watch SIGTERM: {e}")))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot watch SIGINT: {e}")))?;
    let status = loop {
        tokio::select! {
            status = child.wait() => {
                break status.map_err(|e| CliError::new(Exit::Failure, format!("cannot wait for the command: {e}")))?;
            }
            _ = term.recv() => signal(&child, Signal::SIGTERM),
            _ = int.recv() => signal(&child, Signal::SIGINT),
            _ = renew.tick() => {
                let mut any = false;
                for b in &mut bindings {
                    let renewed = broker.renew(authed(proto::RenewRequest {
                        lease_id: b.lease.lease_id.clone(), ttl_seconds: 0,
                    }, &token)?).await;
                    match renewed {
                        Ok(r) => b.lease.expires_at = r.into_inner().expires_at,
                        Err(s) => {
                            // Past its lifetime, or revoked: fetch a new lease.
                            tracing_note(&format!("lease on {} could not be renewed ({}); fetching a new one", b.secret, s.message()));
                            b.lease = issue(&mut broker, &token, &b.secret).await?;
                            any = true;
                        }
                    }
                }
                if any {
                    child = changed(child, on_rotate, &args, &bindings).await?;
                }
            }
            ev = events.message() => {
                let Some(ev) = ev? else {
                    return Err(CliError::new(Exit::Unavailable, "the broker ended the watch"));
                };
                let mut any = false;
                for b in &mut bindings {
                    let rotated = ev.kind == "secret.rotated" && ev.secret == b.secret && ev.version > b.lease.version;
                    let revoked = ev.kind == "lease.revoked" && (ev.lease_id == b.lease.lease_id
                        || (ev.lease_id.is_empty()
                            && (ev.secret.is_empty() || ev.secret == b.secret)
                            && (ev.version == 0 || ev.version == b.lease.version)));
                    if rotated || revoked {
                        let old = std::mem::replace(&mut b.lease, issue(&mut broker, &token, &b.secret).await?);
                        // The old value is no longer in use: give its lease back.
                        let _ = broker.revoke(authed(proto::RevokeRequest { lease_id: old.lease_id }, &token)?).await;
                        any = true;
                    }
                }
                if any {
                    child = changed(child, on_rotate, &args, &bindings).await?;
                }
            }
        }
    };
    for b in &bindings {
        let _ = broker
            .revoke(authed(
                proto::RevokeRequest {
                    lease_id: b.lease.lease_id.clone(),
                },
                &token,
            )?)
            .await;
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn tracing_note(m: &str) {
    eprintln!("tessera run: {m}");
}

/// Applies `on_rotate` after a value changed.
async fn changed(
    mut child: Child,
    on_rotate: OnRotate,
    args: &RunArgs,
    bindings: &[Binding],
) -> Result<Child, CliError> {
    match on_rotate {
        OnRotate::Ignore => Ok(child),
        OnRotate::Signal(sig) => {
            signal(&child, sig);
            Ok(child)
        }
        OnRotate::Restart => {
            tracing_note("a value changed; restarting the command");
            signal(&child, Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            spawn(args, bindings)
        }
    }
}
