//! Rotation: every new value is a new version, active at once; the previous
//! version keeps working for the secret's overlap window, then is retired
//! (its leases revoked, its value archived under the secret's retention
//! class or destroyed). New values come from the admin, the broker's
//! generator, or a rotation command (run directly, no shell; checked by an
//! optional verify command before activation). Rotations run on a schedule
//! (an interval or a cron expression) from the broker's scheduler or from
//! `tessera rotate --due`; a lock row with an expiry keeps two runners from
//! rotating one secret twice, and a missed schedule rotates once.
//!
//! Crash safety: a new value is stored as a `pending` version before
//! anything else happens; a pending version left by a crash is verified and
//! activated (or marked failed) by the next runner, and the unique
//! (secret, due time) index means one due time never makes two versions.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use zeroize::Zeroizing;

use crate::agent::admin_entry;
use crate::audit::{ACTOR_SYSTEM, Entry};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::fault;
use crate::generate::Generator;
use crate::init::{now, rfc3339};
use crate::keys::{SymmetricKey, class_data_key_aad, data_key_aad, random_id, value_aad};
use crate::lease::{Scope, revoke_active};
use crate::names;
use crate::proto;
use crate::rowmac;
use crate::store::{NewEvent, WriteCtx};

/// Version states as stored.
pub mod version_state {
    /// Stored, not yet verified and activated.
    pub const PENDING: &str = "pending";
    /// What `Issue` hands out.
    pub const ACTIVE: &str = "active";
    /// The previous version, still valid until its `retire_at`.
    pub const OVERLAPPING: &str = "overlapping";
    /// Past its overlap; leases revoked, value destroyed.
    pub const RETIRED: &str = "retired";
    /// Past its overlap; value kept under the secret's retention class.
    pub const ARCHIVED: &str = "archived";
    /// Archived under a class since shredded: its key is destroyed (shown
    /// only; never stored as a state).
    pub const SHREDDED: &str = "shredded";
    /// A rotation that failed verification; value destroyed.
    pub const FAILED: &str = "failed";
}

/// Longest overlap window (30 days).
pub const MAX_OVERLAP_SECS: u64 = 30 * 24 * 3600;
/// Longest command timeout (10 minutes).
pub const MAX_CMD_TIMEOUT_SECS: u64 = 600;
/// Longest rotation interval and jitter accepted (10 years, 30 days).
const MAX_EVERY_SECS: u64 = 10 * 366 * 24 * 3600;
const MAX_JITTER_SECS: u64 = 30 * 24 * 3600;
/// Longest wait before retrying a failed scheduled rotation.
const MAX_BACKOFF_SECS: i64 = 3600;

/// Marks `version` of `name` active (it must be stored already), moves the
/// previous active version into its overlap window, and records a
/// `secret.rotated` event. In the caller's transaction.
pub(crate) fn activate_version(
    ctx: &mut WriteCtx<'_>,
    row_key: &SymmetricKey,
    name: &str,
    version: u64,
    t: i64,
) -> Result<()> {
    // Checked and resealed in this one transaction, so an edit made while a
    // rotation command ran is refused here, not sealed as genuine.
    rowmac::check_secret(ctx.conn, row_key, name)?;
    let overlap: i64 = ctx
        .conn
        .query_row(
            "SELECT overlap_secs FROM secrets WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(3600);
    let superseded = ctx.conn.execute(
        "UPDATE secret_versions SET state = 'overlapping', retire_at = ?3
         WHERE name = ?1 AND state = 'active' AND version != ?2",
        params![name, version as i64, t + overlap],
    )?;
    ctx.conn.execute(
        "UPDATE secret_versions SET state = 'active', retire_at = NULL
         WHERE name = ?1 AND version = ?2",
        params![name, version as i64],
    )?;
    ctx.conn.execute(
        "UPDATE secrets SET current_version = ?2, updated_at = ?3 WHERE name = ?1",
        params![name, version as i64, t],
    )?;
    rowmac::seal_secret(ctx.conn, row_key, name)?;
    ctx.event(&NewEvent {
        time: t,
        kind: "secret.rotated",
        secret: name,
        version,
        detail: &if superseded == 0 {
            format!("version {version} is active")
        } else {
            format!("version {version} is active; the previous one stays valid for {overlap}s")
        },
        ..Default::default()
    })
}

/// How a rotation gets its value.
pub enum ValueSource {
    /// Given by the admin.
    Given(Zeroizing<Vec<u8>>),
    /// A generator spec for this rotation only.
    Generate(String),
    /// Whatever the secret is configured with (generator or command).
    Configured,
}

/// A secret's rotation settings.
#[derive(Debug, Clone, Default)]
struct Settings {
    generator: Option<String>,
    rotate_cmd: Option<Vec<String>>,
    verify_cmd: Option<Vec<String>>,
    value_via: String,
    cmd_timeout: u64,
    schedule: Option<String>,
    schedule_tz: Option<String>,
    jitter: u64,
}

fn argv(json: Option<String>) -> Option<Vec<String>> {
    json.and_then(|j| serde_json::from_str(&j).ok())
}

/// The rotation settings of `name`, if it exists; DATA_LOSS when its row
/// was changed outside tessera.
fn load_settings(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<Option<Settings>> {
    rowmac::check_secret(conn, key, name)?;
    Ok(conn
        .query_row(
            "SELECT generator, rotate_cmd, verify_cmd, value_via, cmd_timeout, schedule,
                    schedule_tz, jitter_secs
             FROM secrets WHERE name = ?1",
            [name],
            |r| {
                Ok(Settings {
                    generator: r.get(0)?,
                    rotate_cmd: argv(r.get(1)?),
                    verify_cmd: argv(r.get(2)?),
                    value_via: r.get(3)?,
                    cmd_timeout: r.get::<_, i64>(4)? as u64,
                    schedule: r.get(5)?,
                    schedule_tz: r.get(6)?,
                    jitter: r.get::<_, i64>(7)? as u64,
                })
            },
        )
        .optional()?)
}

/// In the caller's transaction, a rotation of `name` refused because its
/// row failed its MAC (`e`): a pending `version` is marked failed (it could
/// only become current by sealing the edited row) but keeps its sealed
/// value, since the rotate command already gave it to the system it
/// rotates; a secret whose scheduled slot has come is tried again only
/// after the longest backoff (not on every scheduler tick), and the refusal
/// is audited. The secret's bookkeeping is touched only while its row still
/// fails, and a schedule only for the slot that was `due` (or any slot
/// already due, for a run that served none).
fn refuse_tampered(
    ctx: &mut WriteCtx<'_>,
    key: &SymmetricKey,
    name: &str,
    version: Option<u64>,
    due: Option<i64>,
    e: &Error,
    (actor, request_id): (&str, &str),
) -> Result<()> {
    let t = now();
    let mut reason = e.to_string();
    if rowmac::check_secret(ctx.conn, key, name).is_err() {
        if let Some(v) = version {
            let discarded = ctx.conn.execute(
                "UPDATE secret_versions SET state = 'failed'
                 WHERE name = ?1 AND version = ?2 AND state = 'pending'",
                params![name, v as i64],
            )?;
            if discarded > 0 {
                reason.push_str(&format!(
                    "; version {v} was discarded, not activated, after the rotate command had \
                     run: reset that credential where it is used"
                ));
            }
        }
        ctx.conn.execute(
            "UPDATE secrets SET failures = failures + (?5 IS NOT NULL), last_result = ?2,
                last_run_at = ?3,
                next_due = CASE WHEN next_due <= ?3 AND (?5 IS NULL OR next_due = ?5)
                                THEN ?4 ELSE next_due END
             WHERE name = ?1",
            params![
                name,
                "failed: the stored settings failed authentication",
                t,
                t + MAX_BACKOFF_SECS,
                due
            ],
        )?;
    }
    ctx.audit(&Entry {
        time: t,
        actor: actor.into(),
        action: "secret.rotate".into(),
        target: name.into(),
        allowed: false,
        reason,
        request_id: request_id.into(),
    })
}

/// In a write: the settings of `name`, or its refusal, audited as
/// `action`, when there is no such secret or its row fails its MAC.
fn settings_or_refuse(
    ctx: &mut WriteCtx<'_>,
    key: &SymmetricKey,
    name: &str,
    action: &str,
    request_id: &str,
) -> Result<std::result::Result<Settings, Error>> {
    let e = match load_settings(ctx.conn, key, name) {
        Ok(Some(s)) => return Ok(Ok(s)),
        Ok(None) => no_secret(name),
        Err(e @ Error::Tampered(_)) => e,
        Err(e) => return Err(e),
    };
    ctx.audit(&admin_entry(action, name, false, e.to_string(), request_id))?;
    Ok(Err(e))
}

/// Why `name` has no row: it is not a valid name (INVALID_ARGUMENT, so
/// the hint to `secret put` it is never given for a name that would be
/// refused there), or no secret has it.
fn no_secret(name: &str) -> Error {
    if let Err(e) = crate::names::secret(name, "name") {
        return e;
    }
    Error::NotFound(format!(
        "no secret named {name:?}; store a first value with `tessera secret put {name}`"
    ))
}

/// A parsed schedule.
pub enum Schedule {
    /// Every so many seconds.
    Every(u64),
    /// A 5-field cron expression in a time zone.
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

impl Schedule {
    /// Parses the stored form (`every:SECS` or `cron:EXPR`) and zone.
    pub fn parse(stored: &str, tz: Option<&str>) -> Result<Self> {
        if let Some(secs) = stored.strip_prefix("every:") {
            let secs: u64 = secs
                .parse()
                .map_err(|_| Error::invalid("every", "the interval is not a number of seconds"))?;
            if secs == 0 {
                return Err(Error::invalid(
                    "every",
                    "the interval must be positive, e.g. --every 30d",
                ));
            }
            return Ok(Schedule::Every(secs));
        }
        let expr = stored.strip_prefix("cron:").unwrap_or(stored);
        if expr.split_whitespace().count() != 5 {
            return Err(Error::invalid(
                "cron",
                format!(
                    "{expr:?} is not a 5-field cron expression (minute hour day-of-month month \
                     day-of-week), e.g. '0 3 * * 1'"
                ),
            ));
        }
        let cron: croner::Cron = expr
            .parse()
            .map_err(|e| Error::invalid("cron", format!("{expr:?} does not parse: {e}")))?;
        let tz: chrono_tz::Tz = match tz {
            None | Some("") | Some("UTC") => chrono_tz::UTC,
            Some(z) => z.parse().map_err(|_| {
                Error::invalid(
                    "tz",
                    format!("{z:?} is not an IANA time zone, e.g. Europe/Berlin or UTC"),
                )
            })?,
        };
        Ok(Schedule::Cron(Box::new(cron), tz))
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: i64) -> Result<i64> {
        match self {
            Schedule::Every(secs) => Ok(t + *secs as i64),
            Schedule::Cron(cron, tz) => {
                let at = chrono::DateTime::from_timestamp(t, 0)
                    .ok_or_else(|| Error::Internal("time out of range".into()))?
                    .with_timezone(tz);
                let next = cron
                    .find_next_occurrence(&at, false)
                    .map_err(|e| Error::invalid("cron", format!("no next occurrence: {e}")))?;
                Ok(next.timestamp())
            }
        }
    }
}

/// A random delay in `[0, jitter]` seconds.
fn jitter_secs(jitter: u64) -> i64 {
    if jitter == 0 {
        return 0;
    }
    let mut b = [0u8; 8];
    let _ = crate::keys::fill_random(&mut b);
    (u64::from_be_bytes(b) % jitter.saturating_add(1).max(1)) as i64
}

/// This machine's host name (empty if unknown).
fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Who holds a rotation lock: host, process id, and a random part.
fn lock_owner() -> String {
    format!(
        "{}:{}:{}",
        hostname(),
        std::process::id(),
        random_id("").unwrap_or_default()
    )
}

/// Whether a lock's owner is a dead process on this host.
fn owner_is_dead(owner: &str) -> bool {
    let mut parts = owner.split(':');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    // Signal 0 only asks whether the process exists (EPERM: it does, as
    // another user's). Without a known host name nothing can be told.
    !host.is_empty()
        && host == hostname()
        && pid > 0
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH)
}

/// Takes the rotation lock on `name` for `owner` unless another live
/// runner holds it. Returns whether it was taken.
fn take_lock(conn: &Connection, name: &str, owner: &str, ttl: i64, t: i64) -> Result<bool> {
    let held: Option<(String, i64)> = conn
        .query_row(
            "SELECT owner, expires_at FROM rotation_locks WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((o, exp)) = held
        && o != owner
        && exp > t
        && !owner_is_dead(&o)
    {
        return Ok(false);
    }
    conn.execute(
        "INSERT INTO rotation_locks (name, owner, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
        params![name, owner, t + ttl],
    )?;
    Ok(true)
}

fn release_lock(conn: &Connection, name: &str, owner: &str) -> Result<()> {
    conn.execute(
        "DELETE FROM rotation_locks WHERE name = ?1 AND owner = ?2",
        params![name, owner],
    )?;
    Ok(())
}

/// Runs a rotation or verify command directly (no shell), giving it `input`
/// on stdin or in `env_name`, and returns its stdout. Fails on a missing
/// program, a non-zero exit, a timeout or output over `max_out` bytes.
/// Its stderr is logged with any secret value in it masked.
fn run_command(
    argv: &[String],
    input: &[u8],
    via_env: bool,
    env_name: &str,
    timeout: Duration,
    max_out: usize,
    secrets: &[&[u8]],
) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
    let Some(program) = argv.first() else {
        return Err("no command configured".into());
    };
    let mut cmd = Command::new(program);
    // Its own process group, so a timeout kills whatever it started too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if via_env {
        // The value's bytes as they are (a lossy conversion would alter a
        // value that is not UTF-8).
        cmd.env(
            env_name,
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(input),
        );
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("the command {program:?} does not exist (give a full path to a program)")
        } else {
            format!("the command {program:?} could not start: {e}")
        }
    })?;
    let input = Zeroizing::new(if via_env { Vec::new() } else { input.to_vec() });
    let deadline = Instant::now() + timeout;
    let mut io = match CommandIo::new(&mut child, input, max_out) {
        Ok(io) => io,
        Err(e) => {
            kill_group(&child);
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot read the output of {program:?}: {e}"));
        }
    };
    let mut done = false;
    // Once it has exited with its stdout closed, its stderr gets a moment.
    let mut grace: Option<Instant> = None;
    loop {
        done = done || exited(&mut child);
        // Its output is complete when its pipes close (which may come
        // after it exits, from a process it left behind).
        let now = Instant::now();
        if done && io.stdout_open.is_none() && grace.is_none() {
            grace = Some((now + Duration::from_millis(500)).min(deadline));
        }
        if (done && io.output_closed())
            || now >= deadline
            || grace.is_some_and(|g| now >= g)
            || io.stdout.len() > max_out
        {
            break;
        }
        io.step(grace.unwrap_or(deadline));
    }
    // What came just before the deadline counts too.
    io.drain_ready();
    let over = io.stdout.len() > max_out;
    let held_open = done && !io.output_closed();
    // Whatever it left behind in its group goes with it (a rotation command
    // must not leave processes running), then it is reaped.
    kill_group(&child);
    let status = if done && !over {
        child.wait().ok()
    } else {
        let _ = child.kill();
        let _ = child.wait();
        None
    };
    // Whatever is still open is closed here, even if a process in a session
    // of its own holds the other end: nothing waits on it any more.
    let CommandIo {
        stdout,
        mut stderr,
        stdout_open,
        stderr_open,
        ..
    } = io;
    let complete = status.is_some() && stdout_open.is_none();
    if complete {
        // Cut short (at its limit, or still open), it may end inside a
        // value, which would not be masked: only whole lines are shown.
        if stderr_open.is_some() || stderr.len() >= MAX_STDERR {
            let whole = stderr
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            stderr.truncate(whole);
        }
        let mut shown = Zeroizing::new(String::from_utf8_lossy(&stderr).into_owned());
        for s in secrets.iter().chain(std::iter::once(&&stdout[..])) {
            let s = Zeroizing::new(String::from_utf8_lossy(s).into_owned());
            let s = s.trim();
            if !s.is_empty() {
                *shown = shown.replace(s, "[redacted]");
            }
        }
        for line in shown.lines().filter(|l| !l.trim().is_empty()).take(20) {
            tracing::warn!(command = %program, stderr = %line, "rotation command wrote to stderr");
        }
    } else if !stderr.is_empty() {
        // Its output is partial: a value half printed could not be masked.
        tracing::warn!(command = %program, "rotation command wrote to stderr; not shown, since its output did not complete");
    }
    if over {
        return Err(format!(
            "the command {program:?} printed more than the {max_out}-byte value limit"
        ));
    }
    let Some(status) = status else {
        return Err(format!(
            "the command {program:?} did not finish within {}s and was killed",
            timeout.as_secs()
        ));
    };
    if !complete {
        return Err(format!(
            "the command {program:?} exited, but a process it started kept its output open \
             past {}s; what was left of its process group was killed (a rotation command \
             must not leave processes running in the background)",
            timeout.as_secs()
        ));
    }
    if held_open {
        tracing::warn!(command = %program, "a process the rotation command started kept its stderr open; what was left of its process group was killed");
    }
    if !status.success() {
        return Err(format!("the command {program:?} failed ({status})"));
    }
    Ok(stdout)
}

/// A command's three pipes, served without threads: its input written,
/// its output read, each as far as the pipe allows, so that a process left
/// holding a pipe can hold up nothing but its own command (whose pipes are
/// dropped at the deadline).
struct CommandIo {
    stdin: Option<std::process::ChildStdin>,
    input: Zeroizing<Vec<u8>>,
    written: usize,
    stdout_open: Option<std::process::ChildStdout>,
    stderr_open: Option<std::process::ChildStderr>,
    stdout: Zeroizing<Vec<u8>>,
    stderr: Zeroizing<Vec<u8>>,
    max_out: usize,
}

/// Most of a command's stderr that is kept (for the log).
const MAX_STDERR: usize = 64 * 1024;

impl CommandIo {
    fn new(
        child: &mut std::process::Child,
        input: Zeroizing<Vec<u8>>,
        max_out: usize,
    ) -> nix::Result<Self> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use std::os::fd::AsFd;
        let nonblocking = |fd: std::os::fd::BorrowedFd<'_>| -> nix::Result<()> {
            let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
            fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
        };
        let (stdin, stdout_open, stderr_open) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        for fd in [
            stdin.as_ref().map(|p| p.as_fd()),
            stdout_open.as_ref().map(|p| p.as_fd()),
            stderr_open.as_ref().map(|p| p.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            nonblocking(fd)?;
        }
        // Nothing to give: stdin is closed at once (the command sees EOF).
        let stdin = stdin.filter(|_| !input.is_empty());
        Ok(CommandIo {
            stdin,
            input,
            written: 0,
            stdout_open,
            stderr_open,
            // At their full size from the start: a buffer that grew would
            // leave copies of the value behind in freed memory.
            stdout: Zeroizing::new(Vec::with_capacity(max_out + 1)),
            stderr: Zeroizing::new(Vec::with_capacity(MAX_STDERR)),
            max_out,
        })
    }

    /// Reads what the output pipes hold now, without waiting.
    fn drain_ready(&mut self) {
        if drain(&mut self.stdout_open, &mut self.stdout, self.max_out + 1) {
            self.stdout_open = None;
        }
        if drain(&mut self.stderr_open, &mut self.stderr, MAX_STDERR) {
            self.stderr_open = None;
        }
    }

    fn output_closed(&self) -> bool {
        self.stdout_open.is_none() && self.stderr_open.is_none()
    }

    /// Waits (at most 20 ms, never past `deadline`) for a pipe to be ready,
    /// then moves what it can.
    fn step(&mut self, deadline: Instant) {
        use nix::poll::{PollFd, PollFlags, poll};
        use std::os::fd::AsFd;
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(20));
        let ready = {
            let mut fds = Vec::with_capacity(3);
            let mut which = Vec::with_capacity(3);
            if let Some(p) = &self.stdin {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLOUT));
                which.push(0);
            }
            if let Some(p) = &self.stdout_open {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(1);
            }
            if let Some(p) = &self.stderr_open {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(2);
            }
            if fds.is_empty() {
                // Only the exit is left to wait for.
                std::thread::sleep(wait);
                return;
            }
            // Rounded up: a wait under a millisecond is not a busy poll.
            let ms = u16::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(20);
            match poll(&mut fds, ms) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return,
                Err(_) => {
                    std::thread::sleep(wait);
                    return;
                }
            }
            which
                .into_iter()
                .zip(&fds)
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(w, _)| w)
                .collect::<Vec<_>>()
        };
        for w in ready {
            match w {
                0 => self.write_input(),
                1 => {
                    let limit = self.max_out + 1;
                    if drain(&mut self.stdout_open, &mut self.stdout, limit) {
                        self.stdout_open = None;
                    }
                }
                _ => {
                    if drain(&mut self.stderr_open, &mut self.stderr, MAX_STDERR) {
                        self.stderr_open = None;
                    }
                }
            }
        }
    }

    fn write_input(&mut self) {
        let Some(p) = self.stdin.as_mut() else { return };
        match p.write(&self.input[self.written..]) {
            Ok(n) => self.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            // The command closed its stdin: it takes no more.
            Err(_) => self.written = self.input.len(),
        }
        if self.written >= self.input.len() {
            self.stdin = None;
        }
    }
}

/// Reads what `pipe` holds into `buf` (keeping at most `limit` bytes, and
/// reading at most 128 KiB a call, so that a command that never stops
/// printing still meets its deadline); true once it is closed (end of
/// file, or an error).
fn drain<R: Read>(pipe: &mut Option<R>, buf: &mut Vec<u8>, limit: usize) -> bool {
    let Some(p) = pipe.as_mut() else { return true };
    let mut chunk = Zeroizing::new([0u8; 8192]);
    for _ in 0..16 {
        match p.read(&mut chunk[..]) {
            Ok(0) => return true,
            Ok(n) => {
                // (Within the capacity reserved for it: never reallocated.)
                let room = limit.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    false
}

/// Whether a command has exited, asked without reaping it (Linux): until
/// it is reaped its process group id cannot be given to anyone else, so
/// killing the group afterwards cannot hit another process.
#[cfg(target_os = "linux")]
fn exited(child: &mut std::process::Child) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive))
}

/// Whether a command has exited (elsewhere, where there is no `WNOWAIT`,
/// this reaps it).
#[cfg(not(target_os = "linux"))]
fn exited(child: &mut std::process::Child) -> bool {
    child.try_wait().map_or(true, |s| s.is_some())
}

/// Kills the process group a command leads (never our own: commands are
/// started with `process_group(0)`), so whatever it started goes too.
fn kill_group(child: &std::process::Child) {
    if let Ok(pgid) = i32::try_from(child.id())
        && pgid > 1
    {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Trims one trailing newline (what `echo` adds) from a command's output.
fn trim_newline(mut v: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    if v.last() == Some(&b'\n') {
        v.pop();
        if v.last() == Some(&b'\r') {
            v.pop();
        }
    }
    v
}

impl Broker {
    /// Versions with states, settings and schedule of `name`.
    pub async fn show_secret(&self, request_id: &str, name: &str) -> Result<proto::SecretDetail> {
        let out = self
            .store
            .read(|conn| secret_detail(conn, &self.row_key, name));
        self.audit(admin_entry(
            "secret.show",
            name,
            out.is_ok(),
            match &out {
                Ok(d) => format!("{} versions shown", d.versions.len()),
                Err(e) => e.to_string(),
            },
            request_id,
        ))
        .await?;
        out
    }

    /// Changes rotation settings of `name`.
    pub async fn configure_secret(
        &self,
        request_id: &str,
        req: proto::ConfigureSecretRequest,
    ) -> Result<proto::SecretDetail> {
        let name = req.name.clone();
        let checked = (|| {
            names::secret(&req.name, "name")?;
            if let Some(o) = req.overlap_seconds
                && o > MAX_OVERLAP_SECS
            {
                return Err(Error::invalid(
                    "overlap",
                    "the overlap may be at most 30 days",
                ));
            }
            if let Some(g) = req.generate.as_deref()
                && g != "-"
            {
                let len = Generator::parse(g)?.value_len();
                let max = self.limits.max_value_size;
                if len > max {
                    return Err(Error::invalid(
                        "generate",
                        format!(
                            "it makes values of {len} bytes, and a value may have at most \
                             {max} (serve --max-value-size)"
                        ),
                    ));
                }
            }
            if let Some(c) = req.class.as_deref()
                && c != "-"
            {
                names::class(c, "class")?;
                match self
                    .store
                    .read(|conn| crate::retention::load_class(conn, c))?
                {
                    None => {
                        return Err(Error::NotFound(format!(
                            "no retention class {c:?}; create it with `tessera class create`"
                        )));
                    }
                    Some(row) if row.state == crate::retention::class_state::SHREDDED => {
                        return Err(crate::retention::shredded_error(&row));
                    }
                    Some(_) => {}
                }
            }
            if let Some(v) = req.value_via.as_deref()
                && v != "stdin"
                && v != "env"
            {
                return Err(Error::invalid("value_via", "use stdin or env"));
            }
            if let Some(t) = req.cmd_timeout_seconds
                && (t == 0 || t > MAX_CMD_TIMEOUT_SECS)
            {
                return Err(Error::invalid(
                    "cmd_timeout",
                    "the command timeout must be 1 s to 10 min",
                ));
            }
            for (set, cmd, field) in [
                (req.set_rotate_cmd, &req.rotate_cmd, "rotate_cmd"),
                (req.set_verify_cmd, &req.verify_cmd, "verify_cmd"),
            ] {
                if set
                    && let Some(p) = cmd.first()
                    && !p.starts_with('/')
                {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "{p:?} is not an absolute path; commands run without a shell, give /path/to/program"
                        ),
                    ));
                }
            }
            Ok(())
        })();
        if let Err(e) = checked {
            return Err(self
                .deny("admin".into(), "secret.config", &name, request_id, e)
                .await);
        }
        let rid = request_id.to_string();
        let key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                let s = match settings_or_refuse(ctx, &key, &req.name, "secret.config", &rid)? {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                // A scheduled secret keeps a way to make values, or every
                // scheduled run would fail.
                let generates = req
                    .generate
                    .as_deref()
                    .map_or(s.generator.is_some(), |g| g != "-");
                let runs_cmd = if req.set_rotate_cmd {
                    !req.rotate_cmd.is_empty()
                } else {
                    s.rotate_cmd.is_some()
                };
                if s.schedule.is_some() && !generates && !runs_cmd {
                    let e = Error::FailedPrecondition(format!(
                        "{0} rotates on a schedule, which needs a generator or a rotate command: \
                         keep one, or take it off the schedule first (`tessera rotate unschedule \
                         {0}`)",
                        req.name
                    ));
                    ctx.audit(&admin_entry(
                        "secret.config",
                        &req.name,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    return Ok(Err(e));
                }
                let mut changed = Vec::new();
                let c = ctx.conn;
                if let Some(o) = req.overlap_seconds {
                    c.execute(
                        "UPDATE secrets SET overlap_secs = ?2 WHERE name = ?1",
                        params![req.name, o as i64],
                    )?;
                    changed.push(format!("overlap {o}s"));
                }
                let opt = |v: &str| if v == "-" { None } else { Some(v.to_string()) };
                if let Some(cl) = req.class.as_deref() {
                    c.execute(
                        "UPDATE secrets SET class = ?2 WHERE name = ?1",
                        params![req.name, opt(cl)],
                    )?;
                    changed.push(format!("class {cl}"));
                }
                if let Some(g) = req.generate.as_deref() {
                    c.execute(
                        "UPDATE secrets SET generator = ?2 WHERE name = ?1",
                        params![req.name, opt(g)],
                    )?;
                    changed.push(format!("generator {g}"));
                }
                let json = |v: &Vec<String>| {
                    if v.is_empty() {
                        None
                    } else {
                        serde_json::to_string(v).ok()
                    }
                };
                if req.set_rotate_cmd {
                    c.execute(
                        "UPDATE secrets SET rotate_cmd = ?2 WHERE name = ?1",
                        params![req.name, json(&req.rotate_cmd)],
                    )?;
                    changed.push(format!("rotate command {:?}", req.rotate_cmd.first()));
                }
                if req.set_verify_cmd {
                    c.execute(
                        "UPDATE secrets SET verify_cmd = ?2 WHERE name = ?1",
                        params![req.name, json(&req.verify_cmd)],
                    )?;
                    changed.push(format!("verify command {:?}", req.verify_cmd.first()));
                }
                if let Some(v) = req.value_via.as_deref() {
                    c.execute(
                        "UPDATE secrets SET value_via = ?2 WHERE name = ?1",
                        params![req.name, v],
                    )?;
                    changed.push(format!("value via {v}"));
                }
                if let Some(t) = req.cmd_timeout_seconds {
                    c.execute(
                        "UPDATE secrets SET cmd_timeout = ?2 WHERE name = ?1",
                        params![req.name, t as i64],
                    )?;
                    changed.push(format!("command timeout {t}s"));
                }
                rowmac::seal_secret(c, &key, &req.name)?;
                ctx.audit(&admin_entry(
                    "secret.config",
                    &req.name,
                    true,
                    changed.join("; "),
                    &rid,
                ))?;
                Ok(Ok(secret_detail(ctx.conn, &key, &req.name)?))
            })
            .await?
    }

    /// Puts `name` on a schedule: every `every` seconds, or a cron
    /// expression in `tz`, plus up to `jitter` seconds.
    pub async fn schedule_rotation(
        &self,
        request_id: &str,
        req: proto::ScheduleRotationRequest,
    ) -> Result<proto::SecretDetail> {
        let stored = match (req.every_seconds, req.cron.trim()) {
            (0, "") => Err(Error::invalid(
                "schedule",
                "give --every DURATION (e.g. 30d) or --cron 'MIN HOUR DOM MON DOW'",
            )),
            (s, "") if s > MAX_EVERY_SECS => Err(Error::invalid(
                "every",
                "the interval may be at most 10 years",
            )),
            (s, "") => Ok(format!("every:{s}")),
            (0, c) => Ok(format!("cron:{c}")),
            _ => Err(Error::invalid(
                "schedule",
                "give --every or --cron, not both",
            )),
        };
        let tz = (!req.tz.is_empty()).then(|| req.tz.clone());
        let stored = stored.and_then(|s| {
            if req.jitter_seconds > MAX_JITTER_SECS {
                Err(Error::invalid(
                    "jitter",
                    "the jitter may be at most 30 days",
                ))
            } else if req.every_seconds > 0 && tz.is_some() {
                Err(Error::invalid(
                    "tz",
                    "a time zone goes with --cron; an interval (--every) has none",
                ))
            } else if req.every_seconds > 0 && req.jitter_seconds >= req.every_seconds {
                // A delay as long as the interval would let rotations drift
                // past the next slot, or skip it.
                Err(Error::invalid(
                    "jitter",
                    "the jitter must be shorter than the interval (--every)",
                ))
            } else {
                Ok(s)
            }
        });
        let parsed = stored.and_then(|s| {
            let sch = Schedule::parse(&s, tz.as_deref())?;
            let first = sch.next_after(now())?;
            Ok((s, first))
        });
        let (stored, first) = match parsed {
            Ok(v) => v,
            Err(e) => {
                return Err(self
                    .deny("admin".into(), "rotate.schedule", &req.name, request_id, e)
                    .await);
            }
        };
        let rid = request_id.to_string();
        let jitter = req.jitter_seconds;
        let key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                let s = match settings_or_refuse(ctx, &key, &req.name, "rotate.schedule", &rid)? {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                if s.generator.is_none() && s.rotate_cmd.is_none() {
                    let e = Error::FailedPrecondition(format!(
                        "{} has no way to make new values on its own: configure one first with \
                         `tessera secret config {} --generate SPEC` or `--rotate-cmd PATH`",
                        req.name, req.name
                    ));
                    ctx.audit(&admin_entry(
                        "rotate.schedule",
                        &req.name,
                        false,
                        e.to_string(),
                        &rid,
                    ))?;
                    return Ok(Err(e));
                }
                let due = first + jitter_secs(jitter);
                ctx.conn.execute(
                    "UPDATE secrets SET schedule = ?2, schedule_tz = ?3, jitter_secs = ?4,
                        next_due = ?5, failures = 0 WHERE name = ?1",
                    params![req.name, stored, tz, jitter as i64, due],
                )?;
                rowmac::seal_secret(ctx.conn, &key, &req.name)?;
                ctx.audit(&admin_entry(
                    "rotate.schedule",
                    &req.name,
                    true,
                    format!("{stored} (jitter {jitter}s); next due {}", rfc3339(due)),
                    &rid,
                ))?;
                Ok(Ok(secret_detail(ctx.conn, &key, &req.name)?))
            })
            .await?
    }

    /// Takes `name` off its schedule.
    pub async fn unschedule_rotation(
        &self,
        request_id: &str,
        name: String,
    ) -> Result<proto::SecretDetail> {
        let rid = request_id.to_string();
        let key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                let s = match settings_or_refuse(ctx, &key, &name, "rotate.unschedule", &rid)? {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                ctx.conn.execute(
                    "UPDATE secrets SET schedule = NULL, schedule_tz = NULL, next_due = NULL
                     WHERE name = ?1",
                    [&name],
                )?;
                rowmac::seal_secret(ctx.conn, &key, &name)?;
                ctx.audit(&admin_entry(
                    "rotate.unschedule",
                    &name,
                    true,
                    match s.schedule {
                        Some(was) => format!("schedule {was} removed"),
                        None => "it was not scheduled; nothing changed".into(),
                    },
                    &rid,
                ))?;
                Ok(Ok(secret_detail(ctx.conn, &key, &name)?))
            })
            .await?
    }

    /// Every scheduled secret.
    pub fn rotation_status(&self) -> Result<Vec<proto::SecretDetail>> {
        self.store.read(|conn| {
            let names: Vec<String> = conn
                .prepare("SELECT name FROM secrets WHERE schedule IS NOT NULL ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            names
                .iter()
                .map(|n| secret_detail(conn, &self.row_key, n))
                .collect()
        })
    }

    /// Rotates `name` now (an admin's request).
    pub async fn rotate_now(
        &self,
        request_id: &str,
        mut req: proto::RotateNowRequest,
    ) -> Result<proto::RotationResult> {
        let source = if !req.value.is_empty() {
            ValueSource::Given(Zeroizing::new(std::mem::take(&mut req.value)))
        } else if !req.generate.is_empty() {
            ValueSource::Generate(std::mem::take(&mut req.generate))
        } else {
            ValueSource::Configured
        };
        let r = self
            .rotate(request_id, "admin", &req.name, source, None, &lock_owner())
            .await?;
        // A rotation asked for now that rotated nothing (another runner
        // holds the lock, or a newer version overtook this one) is not a
        // success to the one who asked: a script rotating after a leak must
        // be able to tell.
        if r.outcome != "skipped" {
            return Ok(r);
        }
        let name = r.name;
        let exists = self.store.read(|conn| {
            Ok(conn
                .query_row("SELECT 1 FROM secrets WHERE name = ?1", [&name], |_| Ok(()))
                .optional()?
                .is_some())
        })?;
        if !exists {
            return Err(no_secret(&name));
        }
        let e = Error::FailedPrecondition(format!(
            "{name} was not rotated: {}; check `tessera secret show {name}` and retry",
            r.message
        ));
        // A skip that got as far as a version was audited where it was
        // decided; one that never took the lock is audited here.
        if r.version == 0 {
            return Err(self
                .deny("admin".into(), "secret.rotate", &name, request_id, e)
                .await);
        }
        Err(e)
    }

    /// Rotates every secret that is due (scheduler and `rotate --due`);
    /// resumes rotations a crash left pending.
    pub async fn rotate_due(
        &self,
        request_id: &str,
        actor: &str,
    ) -> Result<Vec<proto::RotationResult>> {
        let owner = lock_owner();
        let mut results = Vec::new();
        // At a shutdown, what has not started waits for the next start
        // (still pending, or still due), so that stopping takes one
        // command's time at most, not every due secret's.
        let stopping = || *self.stopping.borrow();
        for (name, version) in self.pending_versions()? {
            if stopping() {
                return Ok(results);
            }
            results.push(
                self.resume_pending(request_id, actor, &name, version, &owner)
                    .await,
            );
        }
        let due: Vec<(String, i64)> = self.store.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, next_due FROM secrets WHERE next_due IS NOT NULL AND next_due <= ?1
                 ORDER BY next_due",
            )?;
            let rows = stmt.query_map([now()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })?;
        for (name, slot) in due {
            if stopping() {
                break;
            }
            let r = self
                .rotate(
                    request_id,
                    actor,
                    &name,
                    ValueSource::Configured,
                    Some(slot),
                    &owner,
                )
                .await;
            results.push(r.unwrap_or_else(|e| proto::RotationResult {
                name: name.clone(),
                outcome: "failed".into(),
                version: 0,
                message: e.to_string(),
                due_at: slot,
            }));
        }
        Ok(results)
    }

    fn pending_versions(&self) -> Result<Vec<(String, u64)>> {
        self.store.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, version FROM secret_versions WHERE state = 'pending' ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    /// One rotation: lock, value, pending version, verify, activate.
    pub async fn rotate(
        &self,
        request_id: &str,
        actor: &str,
        name: &str,
        source: ValueSource,
        due: Option<i64>,
        owner: &str,
    ) -> Result<proto::RotationResult> {
        let settings = match self
            .store
            .read(|conn| load_settings(conn, &self.row_key, name))
        {
            Ok(Some(s)) => s,
            Ok(None) => {
                let e = no_secret(name);
                return Err(self
                    .deny(actor.into(), "secret.rotate", name, request_id, e)
                    .await);
            }
            Err(e @ Error::Tampered(_)) => {
                self.refuse_tampered_now((actor, request_id), name, None, due, None, &e)
                    .await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let ttl = (settings.cmd_timeout as i64) * 2 + 30;
        // The lock, and (for a scheduled run) a check that the slot is still due.
        let (n, o) = (name.to_string(), owner.to_string());
        let (sched, tz) = (settings.schedule.clone(), settings.schedule_tz.clone());
        let locked = self
            .store
            .write(move |ctx| {
                let t = now();
                if let Some(slot) = due {
                    let next: Option<i64> = ctx
                        .conn
                        .query_row("SELECT next_due FROM secrets WHERE name = ?1", [&n], |r| {
                            r.get(0)
                        })
                        .optional()?
                        .flatten();
                    if next != Some(slot) {
                        return Ok(false);
                    }
                    let served: Option<i64> = ctx
                        .conn
                        .query_row(
                            "SELECT version FROM secret_versions WHERE name = ?1 AND due_at = ?2",
                            params![n, slot],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if served.is_some() {
                        // The slot has its version (a crash came between
                        // serving it and moving on): move on now.
                        if let Some(sc) = &sched {
                            let next = Schedule::parse(sc, tz.as_deref())?.next_after(t)?;
                            ctx.conn.execute(
                                "UPDATE secrets SET next_due = ?2 WHERE name = ?1",
                                params![n, next],
                            )?;
                        }
                        return Ok(false);
                    }
                }
                take_lock(ctx.conn, &n, &o, ttl, t)
            })
            .await?;
        if !locked {
            return Ok(proto::RotationResult {
                name: name.into(),
                outcome: "skipped".into(),
                version: 0,
                message: if due.is_some() {
                    "another runner holds the rotation lock, or the slot was already served"
                } else {
                    "another rotation of it is running (it holds the rotation lock)"
                }
                .into(),
                due_at: due.unwrap_or(0),
            });
        }
        let (value, label) = match self.new_value(name, &settings, source).await {
            Ok(v) => v,
            Err(e) => {
                self.record_failure(request_id, actor, name, &settings, owner, due, &e)
                    .await?;
                return Err(e);
            }
        };
        fault("rotate-after-value");
        let version = match self
            .store_pending(request_id, actor, name, &value, &label, due)
            .await
        {
            Ok(Some(v)) => v,
            Err(e) => {
                self.record_failure(request_id, actor, name, &settings, owner, due, &e)
                    .await?;
                return Err(e);
            }
            Ok(None) => {
                let (n, o) = (name.to_string(), owner.to_string());
                self.store
                    .write(move |ctx| release_lock(ctx.conn, &n, &o))
                    .await?;
                return Ok(proto::RotationResult {
                    name: name.into(),
                    outcome: "skipped".into(),
                    version: 0,
                    message: "this due time was already rotated".into(),
                    due_at: due.unwrap_or(0),
                });
            }
        };
        fault("rotate-after-pending");
        self.verify_and_activate(
            request_id, actor, name, version, value, &settings, owner, due,
        )
        .await
    }

    async fn new_value(
        &self,
        name: &str,
        s: &Settings,
        source: ValueSource,
    ) -> Result<(Zeroizing<Vec<u8>>, String)> {
        let limit = self.limits.max_value_size;
        let (value, label) = match source {
            ValueSource::Given(v) => (v, "admin".to_string()),
            ValueSource::Generate(spec) => (
                Generator::parse(&spec)?.generate()?,
                format!("generator {spec}"),
            ),
            ValueSource::Configured => {
                if let Some(cmd) = s.rotate_cmd.clone() {
                    // From the store, not the cache: another process
                    // (`rotate --due` opening the store itself) may have
                    // rotated it, and the command may need the value that
                    // is current downstream to log in.
                    self.current_rows.forget(name);
                    let current = self.read_current(name)?.value;
                    let via_env = s.value_via == "env";
                    let timeout = Duration::from_secs(s.cmd_timeout);
                    let out = tokio::task::spawn_blocking(move || {
                        run_command(
                            &cmd,
                            &current,
                            via_env,
                            "TESSERA_CURRENT_VALUE",
                            timeout,
                            limit,
                            &[&current],
                        )
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("rotation task: {e}")))?
                    .map_err(|m| {
                        Error::FailedPrecondition(format!(
                            "rotation command failed: {m}; the current version stays active"
                        ))
                    })?;
                    (trim_newline(out), "command".to_string())
                } else if let Some(spec) = &s.generator {
                    (
                        Generator::parse(spec)?.generate()?,
                        format!("generator {spec}"),
                    )
                } else {
                    return Err(Error::FailedPrecondition(format!(
                        "{name} has no way to make a new value: give one (`tessera rotate now \
                         {name} --from-stdin`), or configure `--generate SPEC` or `--rotate-cmd PATH`"
                    )));
                }
            }
        };
        if value.is_empty() {
            return Err(Error::FailedPrecondition(
                "the new value is empty (the rotation command printed nothing); the current \
                 version stays active"
                    .into(),
            ));
        }
        if value.len() > limit {
            return Err(Error::invalid(
                "value",
                format!(
                    "the new value is {} bytes, over the limit of {limit}",
                    value.len()
                ),
            ));
        }
        Ok((value, label))
    }

    /// Stores `value` as a pending version; `None` if this due time already
    /// has a version (another runner got there first).
    async fn store_pending(
        &self,
        request_id: &str,
        actor: &str,
        name: &str,
        value: &Zeroizing<Vec<u8>>,
        label: &str,
        due: Option<i64>,
    ) -> Result<Option<u64>> {
        let dk = SymmetricKey::generate()?;
        let rk = std::sync::Arc::clone(&self.root_key);
        let (n, v, l, a, rid) = (
            name.to_string(),
            value.clone(),
            label.to_string(),
            actor.to_string(),
            request_id.to_string(),
        );
        self.store
            .write(move |ctx| {
                let t = now();
                if let Some(slot) = due {
                    let done: Option<i64> = ctx.conn.query_row(
                        "SELECT version FROM secret_versions WHERE name = ?1 AND due_at = ?2",
                        params![n, slot], |r| r.get(0)).optional()?;
                    if done.is_some() {
                        return Ok(None);
                    }
                }
                let version: i64 = ctx.conn.query_row(
                    "SELECT coalesce(max(version), 0) + 1 FROM secret_versions WHERE name = ?1",
                    [&n], |r| r.get(0))?;
                let version = version as u64;
                let wrapped = rk.seal(ctx.conn, &data_key_aad(&n, version), dk.expose_bytes())?;
                let ct = dk.seal(&value_aad(&n, version), &v)?;
                ctx.conn.execute(
                    "INSERT INTO secret_versions (name, version, created_at, wrapped_key, ciphertext,
                        state, source, due_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
                    params![n, version as i64, t, wrapped, ct, l, due],
                )?;
                ctx.audit(&Entry {
                    time: t,
                    actor: a,
                    action: "secret.rotate".into(),
                    target: n,
                    allowed: true,
                    reason: format!("version {version} stored as pending ({l})"),
                    request_id: rid,
                })?;
                Ok(Some(version))
            })
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn verify_and_activate(
        &self,
        request_id: &str,
        actor: &str,
        name: &str,
        version: u64,
        value: Zeroizing<Vec<u8>>,
        s: &Settings,
        owner: &str,
        due: Option<i64>,
    ) -> Result<proto::RotationResult> {
        if let Some(cmd) = s.verify_cmd.clone() {
            let via_env = s.value_via == "env";
            let timeout = Duration::from_secs(s.cmd_timeout);
            let v = value.clone();
            let verified = tokio::task::spawn_blocking(move || {
                run_command(
                    &cmd,
                    &v,
                    via_env,
                    "TESSERA_NEW_VALUE",
                    timeout,
                    64 * 1024,
                    &[&v],
                )
            })
            .await
            .map_err(|e| Error::Internal(format!("verify task: {e}")))?;
            if let Err(m) = verified {
                let e = Error::FailedPrecondition(format!(
                    "the verify command rejected version {version}: {m}; the current version \
                     stays active"
                ));
                let (n, rid, a, msg) = (
                    name.to_string(),
                    request_id.to_string(),
                    actor.to_string(),
                    e.to_string(),
                );
                self.store
                    .write(move |ctx| {
                        ctx.conn.execute(
                            "UPDATE secret_versions SET state = 'failed', wrapped_key = x'',
                                ciphertext = x'' WHERE name = ?1 AND version = ?2
                                AND state = 'pending'",
                            params![n, version as i64],
                        )?;
                        ctx.audit(&Entry {
                            time: now(),
                            actor: a,
                            action: "secret.verify".into(),
                            target: n,
                            allowed: false,
                            reason: msg,
                            request_id: rid,
                        })
                    })
                    .await?;
                self.record_failure(request_id, actor, name, s, owner, due, &e)
                    .await?;
                return Err(e);
            }
        }
        fault("rotate-after-verify");
        let (n, o, rid, a) = (
            name.to_string(),
            owner.to_string(),
            request_id.to_string(),
            actor.to_string(),
        );
        let (sched, tz, jitter) = (s.schedule.clone(), s.schedule_tz.clone(), s.jitter);
        let key = Arc::clone(&self.row_key);
        let forget = self.current_rows.forget_on_commit();
        let outcome = self
            .store
            .write_then(move |ctx| {
                let t = now();
                // The row's MAC is checked in the transaction that would
                // reseal it: an edit made while the commands ran is refused
                // here, never sealed as genuine.
                if let Err(e) = rowmac::check_secret(ctx.conn, &key, &n) {
                    release_lock(ctx.conn, &n, &o)?;
                    refuse_tampered(ctx, &key, &n, Some(version), due, &e, (&a, &rid))?;
                    return Ok(Err(e));
                }
                // Only a version still pending, and newer than the current
                // one, becomes current: a `secret put` or another runner may
                // have moved on meanwhile.
                let (state, current): (Option<String>, Option<i64>) = (
                    ctx.conn
                        .query_row(
                            "SELECT state FROM secret_versions WHERE name = ?1 AND version = ?2",
                            params![n, version as i64],
                            |r| r.get(0),
                        )
                        .optional()?,
                    ctx.conn
                        .query_row(
                            "SELECT current_version FROM secrets WHERE name = ?1",
                            [&n],
                            |r| r.get(0),
                        )
                        .optional()?,
                );
                let why = match current {
                    None => Some(format!(
                        "{n} was deleted during the rotation; version {version} was not activated"
                    )),
                    Some(_) if state.as_deref() != Some(version_state::PENDING) => {
                        Some(format!("version {version} was already finished"))
                    }
                    Some(current) if current >= version as i64 => {
                        ctx.conn.execute(
                            "UPDATE secret_versions SET state = 'failed', wrapped_key = x'',
                                ciphertext = x'' WHERE name = ?1 AND version = ?2",
                            params![n, version as i64],
                        )?;
                        Some(format!(
                            "version {version} was superseded by version {current} before it \
                             could be activated; it was discarded"
                        ))
                    }
                    Some(_) => None,
                };
                if let Some(why) = why {
                    release_lock(ctx.conn, &n, &o)?;
                    ctx.audit(&Entry {
                        time: t,
                        actor: a,
                        action: "secret.rotate".into(),
                        target: n.clone(),
                        allowed: false,
                        reason: why.clone(),
                        request_id: rid,
                    })?;
                    return Ok(Ok(Some(why)));
                }
                activate_version(ctx, &key, &n, version, t)?;
                fault("rotate-in-activate");
                let next = match &sched {
                    Some(sc) => Some(
                        Schedule::parse(sc, tz.as_deref())?.next_after(t)? + jitter_secs(jitter),
                    ),
                    None => None,
                };
                ctx.conn.execute(
                    "UPDATE secrets SET next_due = ?2, last_result = ?3, last_run_at = ?4,
                        failures = 0 WHERE name = ?1",
                    params![n, next, format!("ok: version {version}"), t],
                )?;
                release_lock(ctx.conn, &n, &o)?;
                ctx.audit(&Entry {
                    time: t,
                    actor: a,
                    action: "secret.rotate".into(),
                    target: n.clone(),
                    allowed: true,
                    reason: format!(
                        "version {version} active{}",
                        next.map(|d| format!("; next due {}", rfc3339(d)))
                            .unwrap_or_default()
                    ),
                    request_id: rid,
                })?;
                Ok(Ok(None))
            }, forget)
            .await??;
        if let Some(why) = outcome {
            return Ok(proto::RotationResult {
                name: name.into(),
                outcome: "skipped".into(),
                version,
                message: why,
                due_at: due.unwrap_or(0),
            });
        }
        Ok(proto::RotationResult {
            name: name.into(),
            outcome: "rotated".into(),
            version,
            message: format!("version {version} is active"),
            due_at: due.unwrap_or(0),
        })
    }

    /// A failed rotation: audited, the lock released, and (for a scheduled
    /// secret) a retry after a growing delay.
    #[allow(clippy::too_many_arguments)]
    async fn record_failure(
        &self,
        request_id: &str,
        actor: &str,
        name: &str,
        s: &Settings,
        owner: &str,
        due: Option<i64>,
        e: &Error,
    ) -> Result<()> {
        let (n, o, rid, a, msg) = (
            name.to_string(),
            owner.to_string(),
            request_id.to_string(),
            actor.to_string(),
            e.to_string(),
        );
        // Only a run that served a slot retries on the schedule's behalf; a
        // refused manual rotation leaves the schedule alone.
        let scheduled = s.schedule.is_some() && due.is_some();
        self.store
            .write(move |ctx| {
                let t = now();
                let failures: i64 = ctx
                    .conn
                    .query_row("SELECT failures FROM secrets WHERE name = ?1", [&n], |r| {
                        r.get(0)
                    })
                    .optional()?
                    // Deleted during the rotation: only the lock is left.
                    .unwrap_or(0);
                let backoff = (60i64 << failures.min(6)).min(MAX_BACKOFF_SECS);
                // A scheduled secret keeps its slot (so the retry serves the
                // same due time) but is retried after the backoff.
                let retry = scheduled.then_some(t + backoff);
                // `failures` counts the schedule's consecutive failures (it
                // sets the backoff): a manual attempt is not one of them.
                ctx.conn.execute(
                    "UPDATE secrets SET failures = failures + ?5, last_result = ?2,
                        last_run_at = ?3, next_due = coalesce(?4, next_due) WHERE name = ?1",
                    params![n, format!("failed: {msg}"), t, retry, i64::from(scheduled)],
                )?;
                release_lock(ctx.conn, &n, &o)?;
                ctx.audit(&Entry {
                    time: t,
                    actor: a,
                    action: "secret.rotate".into(),
                    target: n,
                    allowed: false,
                    reason: format!(
                        "{msg}{}",
                        retry
                            .map(|r| format!("; retry at {}", rfc3339(r)))
                            .unwrap_or_default()
                    ),
                    request_id: rid,
                })
            })
            .await
    }

    /// Finishes a rotation a crash left pending: verify (if configured) and
    /// activate, or mark it failed.
    async fn resume_pending(
        &self,
        request_id: &str,
        actor: &str,
        name: &str,
        version: u64,
        owner: &str,
    ) -> proto::RotationResult {
        let fail = |m: String| proto::RotationResult {
            name: name.into(),
            outcome: "failed".into(),
            version,
            message: m,
            due_at: 0,
        };
        let settings = match self
            .store
            .read(|conn| load_settings(conn, &self.row_key, name))
        {
            Ok(Some(s)) => s,
            Ok(None) => return fail("the secret no longer exists".into()),
            Err(e @ Error::Tampered(_)) => {
                // Discard the pending version, or every tick would retry it;
                // not while another runner is part-way through it.
                let done = self
                    .refuse_tampered_now(
                        (actor, request_id),
                        name,
                        Some(version),
                        None,
                        Some(owner),
                        &e,
                    )
                    .await;
                return match done {
                    Ok(false) => proto::RotationResult {
                        name: name.into(),
                        outcome: "skipped".into(),
                        version,
                        message: "another runner is finishing this rotation".into(),
                        due_at: 0,
                    },
                    Ok(true) => fail(e.to_string()),
                    Err(e) => fail(e.to_string()),
                };
            }
            Err(e) => return fail(e.to_string()),
        };
        let ttl = (settings.cmd_timeout as i64) * 2 + 30;
        let (n, o) = (name.to_string(), owner.to_string());
        let row = self
            .store
            .write(move |ctx| {
                if !take_lock(ctx.conn, &n, &o, ttl, now())? {
                    return Ok(None);
                }
                Ok(ctx
                    .conn
                    .query_row(
                        "SELECT wrapped_key, ciphertext, due_at, state FROM secret_versions
                     WHERE name = ?1 AND version = ?2",
                        params![n, version as i64],
                        |r| {
                            Ok((
                                r.get::<_, Vec<u8>>(0)?,
                                r.get::<_, Vec<u8>>(1)?,
                                r.get::<_, Option<i64>>(2)?,
                                r.get::<_, String>(3)?,
                            ))
                        },
                    )
                    .optional()?)
            })
            .await;
        let (wrapped, ct, due, state) = match row {
            Ok(Some(r)) => r,
            Ok(None) => {
                return proto::RotationResult {
                    name: name.into(),
                    outcome: "skipped".into(),
                    version,
                    message: "another runner is finishing this rotation".into(),
                    due_at: 0,
                };
            }
            Err(e) => return fail(e.to_string()),
        };
        if state != version_state::PENDING {
            let (n, o) = (name.to_string(), owner.to_string());
            let _ = self
                .store
                .write(move |ctx| release_lock(ctx.conn, &n, &o))
                .await;
            return proto::RotationResult {
                name: name.into(),
                outcome: "skipped".into(),
                version,
                message: "already finished".into(),
                due_at: due.unwrap_or(0),
            };
        }
        let value = match self.open_value(name, version, &wrapped, &ct) {
            Ok(v) => v,
            Err(e) => return fail(e.to_string()),
        };
        tracing::info!(secret = %name, version, "resuming a rotation left pending");
        self.verify_and_activate(
            request_id, actor, name, version, value, &settings, owner, due,
        )
        .await
        .unwrap_or_else(|e| fail(e.to_string()))
    }

    /// Periodic rotation housekeeping: retire versions past their overlap
    /// and warn of leases about to expire.
    pub async fn rotation_tick(&self) -> Result<()> {
        self.retire_due().await?;
        self.warn_expiring().await
    }

    /// The scheduler's turn: rotate what is due and resume pending
    /// rotations. Run on a task of its own, so that a slow rotation command
    /// (up to its timeout) never holds up the sweeps, retirements and
    /// ceremonies of [`Broker::rotation_tick`].
    pub async fn scheduler_tick(&self) -> Result<()> {
        for r in self.rotate_due("scheduler", ACTOR_SYSTEM).await? {
            match r.outcome.as_str() {
                "rotated" => {
                    tracing::info!(secret = %r.name, version = r.version, "scheduled rotation done")
                }
                "failed" => {
                    tracing::warn!(secret = %r.name, error = %r.message, "scheduled rotation failed")
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`refuse_tampered`] in a write of its own. With `lock` (an owner),
    /// only if that rotation lock can be taken, and it is released after;
    /// returns whether it ran.
    async fn refuse_tampered_now(
        &self,
        (actor, request_id): (&str, &str),
        name: &str,
        version: Option<u64>,
        due: Option<i64>,
        lock: Option<&str>,
        e: &Error,
    ) -> Result<bool> {
        let (n, a, rid, msg) = (
            name.to_string(),
            actor.to_string(),
            request_id.to_string(),
            e.to_string(),
        );
        let lock = lock.map(str::to_string);
        let key = Arc::clone(&self.row_key);
        self.store
            .write(move |ctx| {
                if let Some(o) = &lock
                    && !take_lock(ctx.conn, &n, o, 60, now())?
                {
                    return Ok(false);
                }
                let e = Error::Tampered(msg);
                refuse_tampered(ctx, &key, &n, version, due, &e, (&a, &rid))?;
                if let Some(o) = &lock {
                    release_lock(ctx.conn, &n, o)?;
                }
                Ok(true)
            })
            .await
    }

    /// Warns, once per secret while the broker runs, that a secret's row
    /// failed its MAC (what depends on it waits).
    fn log_tampered_once(&self, name: &str) {
        let first = self
            .tampered_logged
            .lock()
            .map(|mut seen| seen.insert(name.to_string()))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                secret = %name,
                "the stored settings of this secret failed authentication; its versions past \
                 their overlap are not retired until it is deleted (`tessera secret rm`)"
            );
        }
    }

    async fn retire_due(&self) -> Result<()> {
        let (due, tampered) = self.store.read(|conn| {
            // By secret first: one whose row fails its MAC has no
            // trustworthy class to archive under, so its versions wait,
            // however many, and do not hold up the others.
            let names: Vec<String> = conn
                .prepare_cached(
                    "SELECT DISTINCT name FROM secret_versions
                     WHERE state = 'overlapping' AND retire_at <= ?1 ORDER BY name",
                )?
                .query_map([now()], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut due = Vec::new();
            let mut tampered = Vec::new();
            let mut versions = conn.prepare_cached(
                "SELECT v.name, v.version, s.class FROM secret_versions v
                 JOIN secrets s ON s.name = v.name
                 WHERE v.name = ?1 AND v.state = 'overlapping' AND v.retire_at <= ?2
                 ORDER BY v.retire_at LIMIT ?3",
            )?;
            for name in names {
                if due.len() >= 100 {
                    break;
                }
                if rowmac::check_secret(conn, &self.row_key, &name).is_err() {
                    tampered.push(name);
                    continue;
                }
                let rows = versions.query_map(
                    rusqlite::params![name, now(), (100 - due.len()) as i64],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)? as u64,
                            r.get::<_, Option<String>>(2)?,
                        ))
                    },
                )?;
                for row in rows {
                    due.push(row?);
                }
            }
            Ok((due, tampered))
        })?;
        for name in tampered {
            self.log_tampered_once(&name);
        }
        for (name, version, class) in due {
            let ck = match &class {
                Some(c) => match self.class_key(c) {
                    Ok(k) => Some(k),
                    // Shredded (or gone): nothing to archive under; destroy.
                    Err(Error::FailedPrecondition(_) | Error::NotFound(_)) => None,
                    Err(e) => {
                        tracing::warn!(secret = %name, version, error = %e,
                            "cannot archive a retired version now; will retry");
                        continue;
                    }
                },
                None => None,
            };
            let rk = std::sync::Arc::clone(&self.root_key);
            let row_key = Arc::clone(&self.row_key);
            let label = name.clone();
            let retired = self
                .store
                .write(move |ctx| {
                    let t = now();
                    // Whether to archive or destroy follows the row's class:
                    // an edited row decides nothing (retried, and logged).
                    rowmac::check_secret(ctx.conn, &row_key, &name)?;
                    // Deleted and put again, or moved to another class since
                    // it was read: the next tick decides afresh.
                    let live: Option<(String, Option<String>)> = ctx
                        .conn
                        .query_row(
                            "SELECT v.state, s.class FROM secret_versions v
                             JOIN secrets s ON s.name = v.name
                             WHERE v.name = ?1 AND v.version = ?2",
                            params![name, version as i64],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    if !live.is_some_and(|(state, c)| state == "overlapping" && c == class) {
                        return Ok(());
                    }
                    // The class may have been shredded or re-keyed since its
                    // key was read: the writer's view decides. Shredded or
                    // gone, the value is destroyed; re-keyed, a data key
                    // sealed under the old key would be lost with it, so
                    // this retirement waits for the next tick.
                    let ck = match (&class, ck) {
                        (Some(c), Some(ck)) => match crate::retention::load_class(ctx.conn, c)? {
                            Some(row) if row.state == crate::retention::class_state::SHREDDED => None,
                            Some(row) if row.generation != ck.generation => {
                                return Err(Error::Unavailable(format!(
                                    "the key of class {c} was just replaced; retrying"
                                )));
                            }
                            Some(_) => Some(ck),
                            None => None,
                        },
                        _ => None,
                    };
                    let leases = revoke_active(ctx, Scope::Version(&name, version), t)?;
                    let (wrapped, archived): (Vec<u8>, Option<(String, u64)>) = match (&class, &ck) {
                        (Some(c), Some(ck)) => {
                            let w: Vec<u8> = ctx.conn.query_row(
                                "SELECT wrapped_key FROM secret_versions WHERE name = ?1 AND version = ?2",
                                params![name, version as i64], |r| r.get(0))?;
                            let dk = rk.open(&data_key_aad(&name, version), &w).ok_or_else(|| {
                                Error::Tampered(format!("version {version} of {name} failed authentication"))
                            })?;
                            let id: i64 = ctx.conn.query_row(
                                "SELECT coalesce(max(id), 0) + 1 FROM class_data_keys WHERE class = ?1",
                                [c], |r| r.get(0))?;
                            let digest = archive_digest(&name, version);
                            let sealed = ck.key.seal(&class_data_key_aad(c, id as u64, &digest), &dk)?;
                            ctx.conn.execute(
                                "INSERT INTO class_data_keys (class, id, created_at, context_digest, wrapped)
                                 VALUES (?1, ?2, ?3, ?4, ?5)",
                                params![c, id, t, &digest[..], sealed],
                            )?;
                            (Vec::new(), Some((c.clone(), id as u64)))
                        }
                        _ => (Vec::new(), None),
                    };
                    match &archived {
                        Some((c, id)) => ctx.conn.execute(
                            "UPDATE secret_versions SET state = 'archived', wrapped_key = ?3,
                                archived_class = ?4, archived_key = ?5 WHERE name = ?1 AND version = ?2",
                            params![name, version as i64, wrapped, c, *id as i64],
                        )?,
                        None => ctx.conn.execute(
                            "UPDATE secret_versions SET state = 'retired', wrapped_key = x'',
                                ciphertext = x'' WHERE name = ?1 AND version = ?2",
                            params![name, version as i64],
                        )?,
                    };
                    ctx.audit(&Entry {
                        time: t,
                        actor: ACTOR_SYSTEM.into(),
                        action: "secret.retire".into(),
                        target: name.clone(),
                        allowed: true,
                        reason: format!(
                            "version {version} past its overlap: {leases} leases revoked; {}",
                            match &archived {
                                Some((c, id)) => format!("archived under class {c} (data key {id})"),
                                None => "value destroyed".into(),
                            }
                        ),
                        request_id: "rotation".into(),
                    })
                })
                .await;
            if let Err(e) = retired {
                tracing::warn!(secret = %label, version, error = %e,
                    "could not retire a version past its overlap; will retry");
            }
        }
        Ok(())
    }

    async fn warn_expiring(&self) -> Result<()> {
        const WARN_SECS: i64 = 30;
        let soon: Vec<(String, i64, String, i64)> = self.store.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, agent_id, secret, expires_at FROM leases
                 WHERE state = 0 AND warned = 0 AND expires_at <= ?1 LIMIT 1000",
            )?;
            let rows = stmt.query_map([now() + WARN_SECS], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })?;
        if soon.is_empty() {
            return Ok(());
        }
        self.store
            .write(move |ctx| {
                let t = now();
                for (id, agent, secret, exp) in &soon {
                    ctx.conn
                        .execute("UPDATE leases SET warned = 1 WHERE id = ?1", [id])?;
                    ctx.event(&NewEvent {
                        time: t,
                        kind: "lease.expiring",
                        secret,
                        lease_id: id,
                        agent_id: Some(*agent),
                        expires_at: *exp,
                        detail: "renew it or fetch a new lease",
                        ..Default::default()
                    })?;
                }
                Ok(())
            })
            .await
    }
}

/// The context digest an archived secret version's data key is bound to.
pub fn archive_digest(name: &str, version: u64) -> [u8; 32] {
    crate::keys::sha256(format!("tessera/v1/archived-version\0{name}\0{version}").as_bytes())
}

fn secret_detail(conn: &Connection, key: &SymmetricKey, name: &str) -> Result<proto::SecretDetail> {
    let tampered = matches!(
        rowmac::check_secret(conn, key, name),
        Err(Error::Tampered(_))
    );
    let d = conn
        .query_row(
            "SELECT name, current_version, overlap_secs, class, generator, rotate_cmd, verify_cmd,
                    value_via, cmd_timeout, schedule, schedule_tz, jitter_secs, next_due,
                    last_result, last_run_at, failures, created_at, updated_at
             FROM secrets WHERE name = ?1",
            [name],
            |r| {
                Ok(proto::SecretDetail {
                    name: r.get(0)?,
                    current_version: r.get::<_, i64>(1)? as u64,
                    overlap_seconds: r.get::<_, i64>(2)? as u64,
                    class: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    generate: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    rotate_cmd: argv(r.get(5)?).unwrap_or_default(),
                    verify_cmd: argv(r.get(6)?).unwrap_or_default(),
                    value_via: r.get(7)?,
                    cmd_timeout_seconds: r.get::<_, i64>(8)? as u64,
                    schedule: r.get::<_, Option<String>>(9)?.unwrap_or_default(),
                    schedule_tz: r.get::<_, Option<String>>(10)?.unwrap_or_default(),
                    jitter_seconds: r.get::<_, i64>(11)? as u64,
                    next_due: r.get::<_, Option<i64>>(12)?.unwrap_or(0),
                    last_result: r.get::<_, Option<String>>(13)?.unwrap_or_default(),
                    last_run_at: r.get::<_, Option<i64>>(14)?.unwrap_or(0),
                    failures: r.get::<_, i64>(15)? as u32,
                    versions: Vec::new(),
                    created_at: r.get(16)?,
                    updated_at: r.get(17)?,
                    tampered: false,
                })
            },
        )
        .optional()?
        .ok_or_else(|| no_secret(name))?;
    let mut stmt = conn.prepare_cached(
        "SELECT v.version, v.state, v.created_at, v.source, v.retire_at, v.due_at,
                v.archived_class, c.state = 'shredded'
         FROM secret_versions v LEFT JOIN classes c ON c.name = v.archived_class
         WHERE v.name = ?1 ORDER BY v.version",
    )?;
    let versions = stmt
        .query_map([name], |r| {
            // An archived version whose class was shredded is gone for good.
            let shredded = r.get::<_, Option<bool>>(7)?.unwrap_or(false);
            let state: String = r.get(1)?;
            Ok(proto::VersionInfo {
                version: r.get::<_, i64>(0)? as u64,
                state: if shredded && state == version_state::ARCHIVED {
                    version_state::SHREDDED.into()
                } else {
                    state
                },
                created_at: r.get(2)?,
                source: r.get(3)?,
                retire_at: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                due_at: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                archived_class: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(proto::SecretDetail {
        versions,
        tampered,
        ..d
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation lock is taken over only from a process of this host that
    /// no longer exists.
    #[test]
    fn only_a_dead_local_owner_loses_its_lock() {
        let host = hostname();
        assert!(!host.is_empty(), "this host has a name");
        let me = format!("{host}:{}:x", std::process::id());
        assert!(!owner_is_dead(&me), "a live process keeps its lock");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(owner_is_dead(&format!("{host}:{pid}:x")));
        assert!(!owner_is_dead(&format!("{host}-elsewhere:{pid}:x")));
        assert!(!owner_is_dead(&format!(":{pid}:x")));
        assert!(!owner_is_dead(&format!("{host}:not-a-pid:x")));
        assert!(!owner_is_dead(&format!("{host}:0:x")));
        assert!(!owner_is_dead("garbage"));
    }

    /// Runs `script` with `sh`, for at most `secs`.
    fn sh_for(
        secs: u64,
        script: &str,
        input: &[u8],
        via_env: bool,
    ) -> std::result::Result<Vec<u8>, String> {
        let argv = ["/bin/sh".to_string(), "-c".into(), script.into()];
        let timeout = Duration::from_secs(secs);
        run_command(&argv, input, via_env, "VALUE", timeout, 1024, &[]).map(|v| v.to_vec())
    }

    /// A command that is expected to finish (a timeout no busy machine
    /// reaches).
    fn sh(script: &str, input: &[u8], via_env: bool) -> std::result::Result<Vec<u8>, String> {
        sh_for(60, script, input, via_env)
    }

    /// A command is given the value's bytes as they are, and its output is
    /// what it printed before its pipes closed.
    #[test]
    fn a_command_gets_the_value_and_its_output_is_read_to_the_end() {
        assert_eq!(sh("cat", b"v1", false).expect("stdin"), b"v1");
        let odd = b"\xff\xfe not UTF-8";
        let via_env = sh("printf %s \"$VALUE\"", odd, true).expect("env");
        assert_eq!(via_env, odd);
        let err = sh("exit 3", b"", false).expect_err("failed");
        assert!(err.contains("failed"), "{err}");
        // More than a pipe holds, both ways.
        let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let argv = ["/bin/cat".to_string()];
        let out = run_command(
            &argv,
            &big,
            false,
            "V",
            Duration::from_secs(60),
            400_000,
            &[],
        )
        .expect("cat");
        assert_eq!(&out[..], &big[..]);
    }

    /// What a command leaves running in its process group is killed when
    /// it ends.
    #[test]
    fn a_command_leaves_nothing_running() {
        let dir = tempfile::tempdir().expect("dir");
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 30 >/dev/null 2>&1 & echo $! > {}; echo v1",
            pid_file.display()
        );
        assert_eq!(sh(&script, b"", false).expect("ran"), b"v1\n");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("a pid");
        // Killed, and reaped by init: gone (or at most a zombie for a moment).
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        };
        let mut tries = 0;
        while alive() && tries < 100 {
            std::thread::sleep(Duration::from_millis(50));
            tries += 1;
        }
        assert!(!alive(), "the background sleep {pid} still runs");
    }

    /// A command that leaves a process holding its output open, even one in
    /// a session of its own, fails at its timeout instead of holding up the
    /// broker's loop for ever.
    #[test]
    fn a_process_left_holding_the_output_fails_the_command_at_its_timeout() {
        // (The timeouts wait in full: short, but long enough for `sh` to
        // start and exit on a busy machine.)
        let err = sh_for(5, "sleep 60 & echo v1", b"", false).expect_err("held open");
        assert!(err.contains("kept its output open"), "{err}");
        if let Ok(setsid) = which_setsid() {
            let err = sh_for(5, &format!("{setsid} sleep 8 & echo v1"), b"", false)
                .expect_err("held open in another session");
            assert!(err.contains("kept its output open"), "{err}");
        }
        // Only stderr held open: the value printed is good.
        let v = sh("sleep 60 >/dev/null & echo v1", b"", false).expect("stdout closed");
        assert_eq!(v, b"v1\n");
        let err = sh_for(2, "sleep 60", b"", false).expect_err("timed out");
        assert!(err.contains("did not finish"), "{err}");
        // A command that never stops printing is stopped at the value limit.
        let err = sh("yes", b"", false).expect_err("endless output");
        assert!(err.contains("more than the 1024-byte value limit"), "{err}");
    }

    fn which_setsid() -> std::result::Result<String, ()> {
        ["/usr/bin/setsid", "/bin/setsid"]
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .map(|p| p.to_string())
            .ok_or(())
    }
}
