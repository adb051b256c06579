//! `tessera run --env VAR=secret … -- CMD ARGS…`: fetch leases, start CMD
//! with the values in its environment (never on its command line), renew
//! the leases while it runs, follow rotations and revocations through
//! `Watch` (restart CMD, signal it, or ignore), forward SIGTERM/SIGINT,
//! revoke the leases when CMD exits, and exit with CMD's status.
//!
//! `tessera get NAME --watch` is the same loop with stdout in place of the
//! command: it prints the value, and again each time it changes.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use subtle::ConstantTimeEq;
use tessera_broker::proto;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

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

/// Clap's check of `--on-rotate`, so that a bad value is a usage error
/// (exit 2) like any other flag's.
pub(crate) fn on_rotate_arg(s: &str) -> Result<String, String> {
    parse_on_rotate(s)
        .map(|_| s.to_string())
        .map_err(|e| e.message)
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
    /// When `lease` was fetched, by this machine's clock: with the broker's
    /// `issued_at`, it tells the broker's time now without trusting that
    /// the two clocks agree.
    fetched: tokio::time::Instant,
    /// The lease was revoked, expired or rotated away and a new one could
    /// not be fetched yet (the broker was away).
    stale: bool,
    /// The version a `secret.rotated` event named: a new lease on an older
    /// version is refused once (see [`refresh`]).
    rotated_to: u64,
}

impl Binding {
    /// Whether a new `lease` is on a version older than the one the last
    /// `secret.rotated` event named. Asked once per event: the next lease
    /// is taken whatever its version.
    fn refuses(&mut self, lease: &proto::Lease) -> bool {
        lease.version < std::mem::take(&mut self.rotated_to)
    }
}

async fn issue(
    broker: &mut Broker,
    token: &str,
    secret: &str,
    ttl_seconds: u64,
) -> Result<proto::Lease, CliError> {
    Ok(broker
        .issue(authed(
            proto::IssueRequest {
                secret: secret.into(),
                ttl_seconds,
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
    cmd.args(rest).kill_on_drop(true);
    // The command gets its values, not tessera's own credentials.
    for cred in ["TESSERA_TOKEN", "TESSERA_ADMIN_TOKEN", "TESSERA_PASSPHRASE"] {
        cmd.env_remove(cred);
    }
    for b in bindings {
        if b.lease.value.contains(&0) {
            return Err(CliError::new(
                Exit::InvalidArgument,
                format!(
                    "the value of {} (for {}) contains a NUL byte, which an environment \
                     variable cannot hold; fetch it with `tessera get {}` into a file instead",
                    b.secret, b.var, b.secret
                ),
            ));
        }
        // An environment value is bytes: a value that is not UTF-8 is
        // passed as it is, never converted.
        use std::os::unix::ffi::OsStrExt;
        cmd.env(&b.var, std::ffi::OsStr::from_bytes(&b.lease.value));
    }
    cmd.spawn()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot start {program:?}: {e}")))
}

fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// How long `run` waits before trying to resume a lost watch, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(crate) type Broker = tessera_broker::proto::broker_client::BrokerClient<Channel>;

/// Runs the command; returns its exit code (128 + signal if killed).
/// Whatever ends it (the command's exit, or `run` failing on its own), the
/// leases it holds are given back.
pub(crate) async fn run(g: &Global, args: RunArgs) -> Result<i32, CliError> {
    let on_rotate = parse_on_rotate(&args.on_rotate)?;
    let envs = check_envs(&args.env)?;
    hold(
        g,
        &envs,
        0,
        Sink::Command {
            args: &args,
            on_rotate,
        },
    )
    .await
}

/// `get NAME --watch`: prints the value, then again each time it changes
/// (a rotation, or a new lease after a revocation that brings another
/// value), renewing its lease and riding out broker restarts like `run`.
/// SIGINT or SIGTERM ends it (exit 0) and gives the lease back.
pub(crate) async fn get_watch(
    g: &Global,
    name: &str,
    ttl_seconds: u64,
    print: &dyn Fn(&proto::Lease) -> Result<(), CliError>,
) -> Result<(), CliError> {
    hold(g, &[("", name)], ttl_seconds, Sink::Print(print))
        .await
        .map(|_| ())
}

/// Fetches a lease per `(variable, secret)`, feeds the values to `sink`
/// and keeps them current until the command exits (or, for stdout, a
/// signal); then gives every lease back.
async fn hold(
    g: &Global,
    envs: &[(&str, &str)],
    ttl_seconds: u64,
    sink: Sink<'_>,
) -> Result<i32, CliError> {
    let token = agent_token()?;
    // Before anything else: a SIGTERM or SIGINT while the leases are
    // fetched stops `run` cleanly (what it fetched is given back).
    let mut signals = Signals::install()?;
    let mut broker = target(g).broker().await?;
    let events = broker
        .watch(authed(proto::WatchRequest::default(), &token)?)
        .await?;
    // Where to resume from if the watch is lost before any event arrives.
    let cursor = events
        .metadata()
        .get(tessera_broker::service::EVENT_CURSOR)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let events = events.into_inner();
    let mut bindings = Vec::new();
    let outcome = async {
        for &(var, secret) in envs {
            let call = issue(&mut broker, &token, secret, ttl_seconds);
            tokio::pin!(call);
            let got = tokio::select! {
                r = &mut call => Ok(r),
                _ = signals.term.recv() => Err(Signal::SIGTERM),
                _ = signals.int.recv() => Err(Signal::SIGINT),
            };
            let (lease, stopped) = match got {
                Ok(r) => (Some(r?), None),
                // Stopped before the command started: the lease being
                // fetched may already be granted, so let that call finish
                // (briefly) to give it back with the others, then exit as
                // a process killed by the signal would.
                Err(sig) => {
                    let last = tokio::time::timeout(CLEANUP_DEADLINE, &mut call).await;
                    (last.ok().and_then(Result::ok), Some(sig))
                }
            };
            if let Some(lease) = lease {
                bindings.push(Binding {
                    var: var.to_string(),
                    secret: secret.to_string(),
                    lease,
                    fetched: tokio::time::Instant::now(),
                    stale: false,
                    rotated_to: 0,
                });
            }
            if let Some(sig) = stopped {
                // A command would have died of the signal; stdout just ends.
                return Ok(match sink {
                    Sink::Command { .. } => 128 + sig as i32,
                    Sink::Print(_) => 0,
                });
            }
        }
        let running = sink.start(&bindings)?;
        let watch = (events, cursor);
        let session = Session {
            broker: &mut broker,
            token: &token,
            ttl_seconds,
        };
        supervise(session, &mut bindings, running, watch, signals).await
    }
    .await;
    // The command is gone (on an error it was stopped: SIGTERM, then
    // SIGKILL after a grace period). Giving
    // the leases back is best effort: a hung broker must not hold `run`
    // (they expire anyway).
    let give_back = async {
        for b in &bindings {
            let Ok(req) = authed(
                proto::RevokeRequest {
                    lease_id: b.lease.lease_id.clone(),
                },
                &token,
            ) else {
                return;
            };
            let _ = broker.revoke(req).await;
        }
    };
    if tokio::time::timeout(CLEANUP_DEADLINE, give_back)
        .await
        .is_err()
    {
        tracing_note("the broker did not answer; the leases left will expire on their own");
    }
    outcome
}

/// What the values feed.
enum Sink<'a> {
    /// `tessera run`: a command's environment.
    Command {
        args: &'a RunArgs,
        on_rotate: OnRotate,
    },
    /// `tessera get --watch`: stdout.
    Print(&'a dyn Fn(&proto::Lease) -> Result<(), CliError>),
}

impl<'a> Sink<'a> {
    /// Starts the command, or prints the first values.
    fn start(self, bindings: &[Binding]) -> Result<Running<'a>, CliError> {
        Ok(match self {
            Sink::Command { args, on_rotate } => Running::Command {
                child: spawn(args, bindings)?,
                args,
                on_rotate,
            },
            Sink::Print(print) => {
                for b in bindings {
                    print(&b.lease)?;
                }
                Running::Print(print)
            }
        })
    }
}

/// A started [`Sink`].
enum Running<'a> {
    Command {
        child: Child,
        args: &'a RunArgs,
        on_rotate: OnRotate,
    },
    Print(&'a dyn Fn(&proto::Lease) -> Result<(), CliError>),
}

impl Running<'_> {
    /// The command's exit code (128 + signal if killed); stdout never
    /// ends on its own.
    async fn exited(&mut self) -> Result<i32, CliError> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Running::Command { child, .. } => {
                let status = child.wait().await.map_err(|e| {
                    CliError::new(Exit::Failure, format!("cannot wait for the command: {e}"))
                })?;
                Ok(status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
            }
            Running::Print(_) => std::future::pending().await,
        }
    }

    /// A SIGTERM or SIGINT for `run`: forwarded to the command, which
    /// decides; for stdout, the end (exit 0).
    fn signalled(&mut self, sig: Signal) -> Option<i32> {
        match self {
            Running::Command { child, .. } => {
                signal(child, sig);
                None
            }
            Running::Print(_) => Some(0),
        }
    }

    /// Applies a change of value: `--on-rotate` for a command; for
    /// stdout, the new value printed.
    async fn changed(&mut self, bindings: &[Binding]) -> Result<(), CliError> {
        match self {
            Running::Command {
                child,
                args,
                on_rotate,
            } => changed(child, *on_rotate, args, bindings).await,
            Running::Print(print) => bindings.iter().try_for_each(|b| print(&b.lease)),
        }
    }

    /// Ends the command when `run` cannot go on.
    async fn stop(&mut self, signals: &mut Signals) {
        if let Running::Command { child, .. } = self {
            stop(child, Some(signals)).await;
        }
    }
}

/// How long `run` waits on the broker while stopping.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(5);

/// Splits `VAR=secret/name`; `VAR` is a shell variable name.
fn parse_env(e: &str) -> Result<(&str, &str), CliError> {
    let bad = |why: &str| {
        CliError::new(
            Exit::InvalidArgument,
            format!(
                "invalid --env {e:?}: {why}; write VAR=secret/name, e.g. \
                 OPENAI_API_KEY=openai/prod"
            ),
        )
    };
    let (var, secret) = e.split_once('=').ok_or_else(|| bad("no `=`"))?;
    let mut chars = var.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad(
            "the variable name must be letters, digits and `_`, not starting with a digit",
        ));
    }
    Ok((var, secret))
}

/// Checks every `--env` before anything is fetched (each well formed, no
/// variable given twice) and splits them.
fn check_envs(envs: &[String]) -> Result<Vec<(&str, &str)>, CliError> {
    let mut seen = std::collections::HashSet::new();
    envs.iter()
        .map(|e| {
            let (var, secret) = parse_env(e)?;
            if !seen.insert(var) {
                return Err(CliError::new(
                    Exit::InvalidArgument,
                    format!("--env sets {var} twice; give each variable once"),
                ));
            }
            Ok((var, secret))
        })
        .collect()
}

/// What `supervise` and its helpers act with.
struct Session<'a> {
    broker: &'a mut Broker,
    token: &'a str,
    /// The TTL asked for each lease and renewal (0: the agent's maximum).
    ttl_seconds: u64,
}

/// Whether a failed call may succeed later: the broker is away (restarting,
/// unreachable) or restarted sealed and waits for its operators, as opposed
/// to a refusal.
fn transient(e: &CliError) -> bool {
    e.exit == Exit::Unavailable || (e.exit == Exit::Precondition && e.message.contains("sealed:"))
}

/// SIGTERM and SIGINT, caught from the start of `run` and forwarded to the
/// command.
pub(crate) struct Signals {
    pub(crate) term: tokio::signal::unix::Signal,
    pub(crate) int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Self, CliError> {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind, name| {
            signal(kind)
                .map_err(|e| CliError::new(Exit::Failure, format!("cannot watch {name}: {e}")))
        };
        Ok(Signals {
            term: watch(SignalKind::terminate(), "SIGTERM")?,
            int: watch(SignalKind::interrupt(), "SIGINT")?,
        })
    }
}

/// How soon a binding left without a lease (the broker was away) is tried
/// again.
const STALE_RETRY_SECS: u64 = 5;

/// When to renew next: halfway through the shortest remaining lease, so a
/// lease replaced by one with a shorter TTL is renewed in time, and never
/// sooner than a second from now.
fn next_renewal(bindings: &[Binding]) -> tokio::time::Instant {
    let secs = bindings
        .iter()
        .map(|b| {
            if b.stale {
                return STALE_RETRY_SECS;
            }
            // `issued_at` is in whole seconds: count the time since from
            // the end of that second, rounded up, so a lease is never
            // thought to last longer than it does.
            let since = b.fetched.elapsed().as_secs_f64().ceil() as i64 + 1;
            (b.lease.expires_at - b.lease.issued_at - since).max(2) as u64 / 2
        })
        .min()
        .unwrap_or(60);
    tokio::time::Instant::now() + Duration::from_secs(secs.max(1))
}

/// Whether `ev` (a revocation) ended `lease`. A revocation of all leases
/// of an agent or a secret covers only leases that existed when it was
/// made: one replayed on resume does not end a lease fetched since.
fn revokes(ev: &proto::Event, secret: &str, lease: &proto::Lease) -> bool {
    if ev.kind != "lease.revoked" {
        return false;
    }
    if !ev.lease_id.is_empty() {
        return ev.lease_id == lease.lease_id;
    }
    (ev.secret.is_empty() || ev.secret == secret)
        && (ev.version == 0 || ev.version == lease.version)
        && ev.time >= lease.issued_at
}

/// Keeps the command running until it exits: renews, follows `Watch`
/// (resuming it from the last event after the broker comes back), forwards
/// signals.
async fn supervise(
    session: Session<'_>,
    bindings: &mut [Binding],
    mut running: Running<'_>,
    watch: (tonic::Streaming<proto::Event>, u64),
    mut signals: Signals,
) -> Result<i32, CliError> {
    let outcome = watch_over(session, bindings, &mut running, watch, &mut signals).await;
    if outcome.is_err() {
        // `run` cannot go on (the agent was revoked, a secret deleted): the
        // command gets SIGTERM and a moment to shut down cleanly, as on a
        // restart, before it is killed (at once if `run` is told to stop).
        running.stop(&mut signals).await;
    }
    outcome
}

/// How long a command has to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// SIGTERM, then SIGKILL if the command is still there after
/// [`STOP_GRACE`], or as soon as `run` itself gets SIGTERM or SIGINT.
async fn stop(child: &mut Child, signals: Option<&mut Signals>) {
    signal(child, Signal::SIGTERM);
    let told = async {
        match signals {
            Some(s) => {
                tokio::select! {
                    _ = s.term.recv() => {}
                    _ = s.int.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    };
    let exited = tokio::select! {
        r = tokio::time::timeout(STOP_GRACE, child.wait()) => r.is_ok(),
        () = told => false,
    };
    if !exited {
        let _ = child.kill().await;
    }
}

async fn watch_over(
    Session {
        broker,
        token,
        ttl_seconds,
    }: Session<'_>,
    bindings: &mut [Binding],
    running: &mut Running<'_>,
    (events, cursor): (tonic::Streaming<proto::Event>, u64),
    Signals { term, int }: &mut Signals,
) -> Result<i32, CliError> {
    let renew = tokio::time::sleep_until(next_renewal(bindings));
    tokio::pin!(renew);
    let mut events = Some(events);
    let mut last_event = cursor;
    let mut backoff = Duration::from_secs(1);
    let resume = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(resume);
    loop {
        let watching = events.is_some();
        let next_event = async {
            match events.as_mut() {
                Some(s) => s.message().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            code = running.exited() => return code,
            _ = term.recv() => if let Some(code) = running.signalled(Signal::SIGTERM) {
                return Ok(code);
            },
            _ = int.recv() => if let Some(code) = running.signalled(Signal::SIGINT) {
                return Ok(code);
            },
            _ = &mut renew => {
                let mut any = false;
                for b in bindings.iter_mut() {
                    if !b.stale {
                        let renewed = broker.renew(authed(proto::RenewRequest {
                            lease_id: b.lease.lease_id.clone(), ttl_seconds,
                        }, token)?).await;
                        match renewed {
                            Ok(r) => {
                                let r = r.into_inner();
                                b.lease.expires_at = r.expires_at;
                                // At its maximum lifetime the lease cannot be
                                // extended again: replace it before it ends.
                                b.stale = r.expires_at >= r.renewable_until;
                            }
                            Err(s) => {
                                let e = CliError::from(s);
                                if transient(&e) {
                                    tracing_note(&format!("cannot renew the lease on {} ({}); the command keeps its value, retrying", b.secret, e.message));
                                    continue;
                                }
                                // Past its lifetime, or revoked: fetch a new lease.
                                tracing_note(&format!("lease on {} could not be renewed ({}); fetching a new one", b.secret, e.message));
                                b.stale = true;
                            }
                        }
                    }
                    any |= refresh(broker, token, ttl_seconds, b).await?;
                }
                if any {
                    running.changed(bindings).await?;
                }
                renew.as_mut().reset(next_renewal(bindings));
            }
            _ = &mut resume, if !watching => {
                let req = proto::WatchRequest { after_event_id: last_event, resume: true };
                match broker.watch(authed(req, token)?).await {
                    Ok(s) => {
                        tracing_note("the watch resumed");
                        events = Some(s.into_inner());
                    }
                    Err(s) => {
                        // The agent's other watches (the old stream of this
                        // one among them, until the broker notices it is
                        // gone) may hold every place for a while.
                        let full = s.code() == tonic::Code::ResourceExhausted;
                        let e = CliError::from(s);
                        if !transient(&e) && !full {
                            return Err(e);
                        }
                        if full {
                            tracing_note(&format!("the watch was refused ({}); retrying", e.message));
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        resume.as_mut().reset(tokio::time::Instant::now() + backoff);
                    }
                }
            }
            ev = next_event => {
                let ev = match ev {
                    Ok(Some(ev)) => ev,
                    // The broker ended the watch with a refusal (the token
                    // expired or was revoked): resuming would be refused too.
                    Err(s) if CliError::from(s.clone()).exit == Exit::Denied => {
                        return Err(s.into());
                    }
                    Ok(None) | Err(_) => {
                        // The broker went away (a restart, most often): the
                        // command keeps its values; resume after the last
                        // event seen, so nothing said meanwhile is missed.
                        tracing_note(&format!("the watch ended; retrying in {}s", backoff.as_secs()));
                        events = None;
                        resume.as_mut().reset(tokio::time::Instant::now() + backoff);
                        continue;
                    }
                };
                last_event = last_event.max(ev.id);
                backoff = Duration::from_secs(1);
                let (mut any, mut replaced) = (false, false);
                for b in bindings.iter_mut() {
                    let rotated = ev.kind == "secret.rotated" && ev.secret == b.secret && ev.version > b.lease.version;
                    if rotated {
                        b.rotated_to = b.rotated_to.max(ev.version);
                    }
                    b.stale |= rotated || revokes(&ev, &b.secret, &b.lease);
                    replaced |= b.stale;
                    any |= refresh(broker, token, ttl_seconds, b).await?;
                }
                if replaced {
                    // Only a new lease can bring the renewal forward; other
                    // events must not push it back.
                    let next = next_renewal(bindings).min(renew.deadline());
                    renew.as_mut().reset(next);
                }
                if any {
                    running.changed(bindings).await?;
                }
            }
        }
    }
}

/// Replaces a stale binding's lease with a new one and gives the old one
/// back; true if the value the command sees changed (a new lease on the
/// same value, after a revocation or at the end of a lease's lifetime,
/// leaves the command alone). While the broker is away the binding stays
/// stale and is retried at the next renewal.
///
/// After a `secret.rotated` event, a lease on a version older than the one
/// the event named is given back and fetched again at the next renewal
/// (the broker serves the new version once it has told of it; this guards
/// against one that does not). Only once: if the broker still serves the
/// older version, the secret was put back since, and its answer stands.
async fn refresh(
    broker: &mut Broker,
    token: &str,
    ttl_seconds: u64,
    b: &mut Binding,
) -> Result<bool, CliError> {
    if !b.stale {
        return Ok(false);
    }
    let request = || {
        authed(
            proto::IssueRequest {
                secret: b.secret.clone(),
                ttl_seconds,
            },
            token,
        )
    };
    let mut issued = broker.issue(request()?).await;
    if issued
        .as_ref()
        .is_err_and(|s| s.code() == tonic::Code::ResourceExhausted)
        && !b.lease.lease_id.is_empty()
    {
        // The agent holds the most leases it may (`serve
        // --max-leases-per-agent`): the lease being replaced frees a place.
        give_back(broker, token, &mut b.lease).await?;
        issued = broker.issue(request()?).await;
    }
    let mut lease = match issued
        .map(tonic::Response::into_inner)
        .map_err(CliError::from)
    {
        Ok(l) => l,
        Err(e) if transient(&e) => {
            tracing_note(&format!(
                "cannot fetch a new lease on {} ({}); retrying",
                b.secret, e.message
            ));
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    if b.refuses(&lease) {
        tracing_note(&format!(
            "the broker served version {} of {}, older than the rotated version; retrying",
            lease.version, b.secret
        ));
        give_back(broker, token, &mut lease).await?;
        return Ok(false);
    }
    let mut old = std::mem::replace(&mut b.lease, lease);
    b.fetched = tokio::time::Instant::now();
    b.stale = false;
    let changed = !bool::from(old.value.ct_eq(&b.lease.value));
    // The old value is no longer in use: give its lease back.
    give_back(broker, token, &mut old).await?;
    Ok(changed)
}

/// Revokes a lease this process no longer uses; a failure is left to the
/// lease's expiry.
pub(crate) async fn give_back(
    broker: &mut Broker,
    token: &str,
    lease: &mut proto::Lease,
) -> Result<(), CliError> {
    let _ = broker
        .revoke(authed(
            proto::RevokeRequest {
                lease_id: std::mem::take(&mut lease.lease_id),
            },
            token,
        )?)
        .await;
    Ok(())
}

fn tracing_note(m: &str) {
    errln!("tessera: {m}");
}

/// Applies `on_rotate` after a value changed.
async fn changed(
    child: &mut Child,
    on_rotate: OnRotate,
    args: &RunArgs,
    bindings: &[Binding],
) -> Result<(), CliError> {
    match on_rotate {
        OnRotate::Ignore => {}
        OnRotate::Signal(sig) => signal(child, sig),
        OnRotate::Restart => {
            tracing_note("a value changed; restarting the command");
            stop(child, None).await;
            *child = spawn(args, bindings)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, issued_at: i64, expires_at: i64) -> proto::Lease {
        // (Field by field: `Lease` wipes its value on drop, so struct
        // update syntax cannot move out of a default one.)
        let mut l = proto::Lease::default();
        l.lease_id = id.into();
        l.secret = "svc/a".into();
        l.version = 2;
        l.issued_at = issued_at;
        l.expires_at = expires_at;
        l
    }

    fn revoked(lease_id: &str, secret: &str, version: u64, time: i64) -> proto::Event {
        proto::Event {
            kind: "lease.revoked".into(),
            lease_id: lease_id.into(),
            secret: secret.into(),
            version,
            time,
            ..Default::default()
        }
    }

    #[test]
    fn a_bulk_revocation_covers_only_leases_that_existed_when_it_was_made() {
        let l = lease("lse_1", 100, 200);
        // All of the agent's leases, or all on its secret, at or after issue.
        assert!(revokes(&revoked("", "", 0, 100), "svc/a", &l));
        assert!(revokes(&revoked("", "svc/a", 0, 150), "svc/a", &l));
        assert!(revokes(&revoked("", "svc/a", 2, 150), "svc/a", &l));
        // Replayed on resume: made before this lease was issued.
        assert!(!revokes(&revoked("", "", 0, 99), "svc/a", &l));
        // Another secret, another version.
        assert!(!revokes(&revoked("", "svc/b", 0, 150), "svc/a", &l));
        assert!(!revokes(&revoked("", "svc/a", 1, 150), "svc/a", &l));
        // One lease, by id, whatever the time.
        assert!(revokes(&revoked("lse_1", "svc/a", 0, 10), "svc/a", &l));
        assert!(!revokes(&revoked("lse_2", "svc/a", 0, 150), "svc/a", &l));
        let mut rotated = revoked("", "", 0, 150);
        rotated.kind = "secret.rotated".into();
        assert!(!revokes(&rotated, "svc/a", &l));
    }

    #[test]
    fn renewal_comes_halfway_through_the_shortest_remaining_lease() {
        let binding = |ttl: i64, stale: bool| Binding {
            var: "A".into(),
            secret: "svc/a".into(),
            lease: lease("lse_1", 1_000, 1_000 + ttl),
            fetched: tokio::time::Instant::now(),
            stale,
            rotated_to: 0,
        };
        let in_secs = |bs: &[Binding]| {
            next_renewal(bs)
                .duration_since(tokio::time::Instant::now())
                .as_secs_f64()
                .round() as u64
        };
        assert_eq!(in_secs(&[binding(900, false)]), 449);
        // A lease replaced by a shorter one brings the renewal forward.
        assert_eq!(in_secs(&[binding(900, false), binding(60, false)]), 29);
        // A binding without a lease is retried soon; an ending lease, in a
        // second at the least.
        assert_eq!(in_secs(&[binding(900, true)]), STALE_RETRY_SECS);
        assert_eq!(in_secs(&[binding(0, false)]), 1);
    }

    #[test]
    fn a_lease_older_than_the_rotation_heard_of_is_refused_once() {
        let waiting_for = |version: u64| Binding {
            var: "A".into(),
            secret: "svc/a".into(),
            lease: lease("lse_1", 1_000, 1_900),
            fetched: tokio::time::Instant::now(),
            stale: true,
            rotated_to: version,
        };
        let old = lease("lse_2", 1_010, 1_910); // version 2
        let mut new = lease("lse_3", 1_010, 1_910);
        new.version = 3;
        // The event named version 3: a lease on it is taken at once.
        assert!(!waiting_for(3).refuses(&new));
        // An older one is refused, once; the retry takes what it is given
        // (the secret was put back since).
        let mut b = waiting_for(3);
        assert!(b.refuses(&old));
        assert!(!b.refuses(&old));
        // Without a rotation event nothing is refused.
        assert!(!waiting_for(0).refuses(&old));
    }

    #[test]
    fn each_env_names_a_shell_variable_once() {
        let ok = |envs: &[&str]| {
            check_envs(&envs.iter().map(|e| e.to_string()).collect::<Vec<_>>())
                .map(|pairs| pairs.len())
        };
        let good = ["OPENAI_API_KEY=openai/prod".to_string(), "_X1=a".into()];
        assert_eq!(
            check_envs(&good).expect("accepted"),
            [("OPENAI_API_KEY", "openai/prod"), ("_X1", "a")]
        );
        for bad in [
            &["=openai/prod"][..],
            &["1A=x"],
            &["A-B=x"],
            &["A B=x"],
            &["openai/prod"],
            &["GH=a", "GH=b"],
        ] {
            let e = ok(bad).expect_err("refused");
            assert_eq!(e.exit, Exit::InvalidArgument, "{bad:?}");
        }
    }
}
