//! One function per subcommand.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tessera_broker::broker::{Limits, peek_source};
use tessera_broker::init::{DataDir, InitOptions};
use tessera_broker::proto;
use tessera_broker::server::ListenOptions;
use tessera_broker::unseal::{KdfParams, KeychainStore, Source};
use tessera_broker::{Broker, server};
use zeroize::Zeroizing;

use crate::client::{CliError, Exit, Target, authed};
use crate::{AgentCmd, AuditCmd, Cli, Command, Global, LeaseCmd, LogFormat, SecretCmd, UnsealArg};

pub(crate) async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => init(g, a).await,
        Command::Serve(a) => serve(g, a).await,
        Command::Demo => crate::demo::run(g.json).await,
        Command::Secret(c) => secret(g, c).await,
        Command::Agent(c) => agent(g, c).await,
        Command::Get(a) if a.watch => crate::rotation::get_watch(g, a).await,
        Command::Get(a) => get(g, a).await,
        Command::Rotate(a) => crate::rotation::rotate(g, a).await,
        Command::Rekey(crate::RekeyCmd::Root {
            shares,
            threshold,
            delivery,
        }) => rekey_root(g, shares, threshold, &delivery).await,
        Command::Run(a) => {
            // The command's own exit status becomes ours (its leases are
            // revoked by then).
            let code = crate::run::run(g, a).await?;
            std::process::exit(code)
        }
        Command::Lease(c) => lease(g, c).await,
        Command::Audit(c) => audit(g, c).await,
        Command::Status => status(g).await,
        Command::Backup(a) => crate::backup::backup(g, a).await,
        Command::Restore(a) => crate::backup::restore(g, a),
        Command::Unseal(a) => unseal(g, a).await,
        Command::Holder(c) => crate::retention::holder(g, c).await,
        Command::Class(c) => crate::retention::class(g, c).await,
        Command::Hold(c) => crate::retention::hold(g, c).await,
        Command::Shred(c) => crate::retention::shred(g, c).await,
        Command::Shares(c) => crate::retention::shares(g, c),
        Command::Encrypt(a) => crate::retention::encrypt(g, a).await,
        Command::Decrypt(a) => crate::retention::decrypt(g, a).await,
    }
}

pub(crate) fn data_dir(g: &Global) -> DataDir {
    DataDir::new(g.data_dir.clone().unwrap_or_else(DataDir::default_path))
}

pub(crate) fn target(g: &Global) -> Target {
    match &g.addr {
        Some(a) => Target {
            addr: a.clone(),
            tls_ca: g.tls_ca.clone(),
        },
        None => Target::socket(&data_dir(g).socket()),
    }
}

/// The admin token: --admin-token-file, else TESSERA_ADMIN_TOKEN, else the
/// data directory's admin.token (a flag given wins over the environment).
pub(crate) fn admin_token(g: &Global) -> Result<Zeroizing<String>, CliError> {
    if g.admin_token_file.is_none()
        && let Ok(t) = std::env::var("TESSERA_ADMIN_TOKEN")
        && !t.is_empty()
    {
        return Ok(Zeroizing::new(t));
    }
    let path = g
        .admin_token_file
        .clone()
        .unwrap_or_else(|| data_dir(g).admin_token());
    if g.admin_token_file.is_some() {
        warn_if_readable(&path, "--admin-token-file");
    }
    let raw = std::fs::read_to_string(&path).map_err(|e| {
        let dir = data_dir(g);
        let instead = if g.admin_token_file.is_some() {
            "check the --admin-token-file path".to_string()
        } else if g.addr.is_none() && !dir.db().exists() {
            format!(
                "{} holds no store: create one with `tessera init`, or point --data-dir \
                 (TESSERA_DATA_DIR) at the store's directory",
                dir.root().display()
            )
        } else {
            "set TESSERA_ADMIN_TOKEN or pass --admin-token-file".to_string()
        };
        CliError::new(
            Exit::Denied,
            format!(
                "no admin credential: cannot read {} ({e}); {instead}",
                path.display()
            ),
        )
    })?;
    Ok(Zeroizing::new(raw.trim().to_string()))
}

/// Reads all of stdin: `what` it is for. On a terminal it first says so
/// (else the command would seem to hang); an empty read is refused, naming
/// `instead`, the other way to give it.
pub(crate) fn read_stdin(what: &str, instead: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        errln!("Reading {what} from stdin; end with Ctrl-D.");
    }
    let mut buf = Zeroizing::new(Vec::new());
    stdin
        .read_to_end(&mut buf)
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot read stdin: {e}")))?;
    if buf.is_empty() {
        return Err(CliError::new(
            Exit::InvalidArgument,
            format!("invalid value: stdin was empty; pipe {what} in{instead}. Nothing was changed"),
        ));
    }
    Ok(buf)
}

/// Reads a secret value: piped in, all of stdin as it is (bytes, newlines
/// kept); typed or pasted at a terminal, everything up to Ctrl-D without
/// echo (so it never shows on screen, and a multi-line paste is taken
/// whole rather than left for the shell), with one final newline dropped.
/// A Ctrl-C while typing puts the echo back before the command ends.
pub(crate) async fn read_value(what: &str, instead: &str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    if !std::io::stdin().is_terminal() {
        return read_stdin(what, instead);
    }
    // Caught before the echo goes off, so that no Ctrl-C can end the
    // process with it off.
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot watch for Ctrl-C: {e}")))?;
    let hidden = HiddenInput::start()?;
    // Only now: what is typed after the prompt is never echoed.
    errln!("Type or paste {what}, then Ctrl-D (input is hidden).");
    // On a thread of its own, which a Ctrl-C leaves blocked in the read
    // until the process exits.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut buf = Zeroizing::new(Vec::new());
        let _ = tx.send(std::io::stdin().read_to_end(&mut buf).map(|_| buf));
    });
    let mut buf = tokio::select! {
        read = rx => read
            .map_err(|_| CliError::new(Exit::Failure, "cannot read stdin"))?
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot read stdin: {e}")))?,
        _ = interrupt.recv() => {
            drop(hidden);
            errln!();
            return Err(CliError::new(Exit::Failure, "interrupted; nothing was changed"));
        }
    };
    drop(hidden);
    // Caught now for the rest of the command: a later Ctrl-C ends it as
    // the default action would have.
    tokio::spawn(async move {
        if interrupt.recv().await.is_some() {
            std::process::exit(130);
        }
    });
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.is_empty() {
        return Err(CliError::new(
            Exit::InvalidArgument,
            format!(
                "invalid value: nothing was typed; type {what}, pipe it in{instead}. Nothing \
                 was changed"
            ),
        ));
    }
    Ok(buf)
}

/// Terminal echo off while it lives (restored on drop, errors included).
struct HiddenInput {
    saved: nix::sys::termios::Termios,
}

impl HiddenInput {
    fn start() -> Result<Self, CliError> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let failed =
            |e: nix::Error| CliError::new(Exit::Failure, format!("cannot hide the input: {e}"));
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).map_err(failed)?;
        let mut hidden = saved.clone();
        hidden.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &hidden).map_err(failed)?;
        Ok(HiddenInput { saved })
    }
}

impl Drop for HiddenInput {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

pub(crate) fn agent_token() -> Result<Zeroizing<String>, CliError> {
    match std::env::var("TESSERA_TOKEN") {
        Ok(t) if !t.is_empty() => Ok(Zeroizing::new(t)),
        _ => Err(CliError::new(
            Exit::Denied,
            "no agent token: set TESSERA_TOKEN to the tsr_… token `tessera agent create` printed",
        )),
    }
}

/// Warns when `file`, given as `flag`, holds a credential other users can
/// read.
fn warn_if_readable(file: &Path, flag: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(file)
        && m.permissions().mode() & 0o077 != 0
    {
        errln!(
            "warning: {flag} {} can be read by other users (mode {:o}); `chmod 600` it",
            file.display(),
            m.permissions().mode() & 0o777
        );
    }
}

/// The passphrase: --passphrase-file, else TESSERA_PASSPHRASE, else a
/// prompt when stdin is a terminal.
pub(crate) fn passphrase(
    file: Option<&Path>,
    confirm: bool,
) -> Result<Zeroizing<Vec<u8>>, CliError> {
    if let Some(f) = file {
        warn_if_readable(f, "--passphrase-file");
        let raw = Zeroizing::new(std::fs::read_to_string(f).map_err(|e| {
            CliError::new(
                Exit::InvalidArgument,
                format!("cannot read --passphrase-file {}: {e}", f.display()),
            )
        })?);
        let line = raw.lines().next().unwrap_or_default();
        return Ok(Zeroizing::new(line.as_bytes().to_vec()));
    }
    if let Ok(p) = std::env::var("TESSERA_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(Zeroizing::new(p.into_bytes()));
    }
    if std::io::stdin().is_terminal() {
        let p = Zeroizing::new(rpassword::prompt_password("tessera passphrase: ").map_err(
            |e| CliError::new(Exit::Failure, format!("cannot read the passphrase: {e}")),
        )?);
        if confirm {
            let again = Zeroizing::new(rpassword::prompt_password("repeat passphrase: ").map_err(
                |e| CliError::new(Exit::Failure, format!("cannot read the passphrase: {e}")),
            )?);
            if *again != *p {
                return Err(CliError::new(
                    Exit::InvalidArgument,
                    "the passphrases differ; nothing was created",
                ));
            }
        }
        return Ok(Zeroizing::new(p.as_bytes().to_vec()));
    }
    Err(CliError::new(
        Exit::Precondition,
        "a passphrase is needed: set TESSERA_PASSPHRASE, pass --passphrase-file, or run from a \
         terminal to be prompted",
    ))
}

/// Prints one JSON document, then wipes every string in it and the text
/// it was printed from (some hold a value or a token).
pub(crate) fn print_json(mut v: serde_json::Value) {
    let text = Zeroizing::new(v.to_string());
    outln!("{}", text.as_str());
    wipe_json(&mut v);
}

/// Overwrites every string in `v` (some hold a value or a token).
pub(crate) fn wipe_json(v: &mut serde_json::Value) {
    use zeroize::Zeroize;
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(wipe_json),
        _ => {}
    }
}

pub(crate) fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
    )
    .to_string()
}

async fn init(g: &Global, a: crate::InitArgs) -> Result<(), CliError> {
    if g.admin_token_file.is_some() {
        return Err(CliError::new(
            Exit::InvalidArgument,
            "invalid admin_token_file: init always writes the admin token to \
             DATA_DIR/admin.token (0600); --admin-token-file tells other commands where to \
             read it. Leave it out here, and move the file afterwards if you like",
        ));
    }
    let source = match a.unseal {
        UnsealArg::Keychain => Source::Keychain(KeychainStore::Os),
        UnsealArg::Keyutils => Source::Keychain(KeychainStore::Keyutils),
        UnsealArg::Passphrase => Source::Passphrase,
        UnsealArg::Shares => Source::Shares,
    };
    let pass = match source {
        Source::Passphrase => Some(passphrase(a.passphrase_file.as_deref(), true)?),
        Source::Keychain(_) | Source::Shares => None,
    };
    let split = match (source, a.shares, a.threshold) {
        (Source::Shares, Some(n), Some(k)) => {
            // Before anything (the data directory included) is made.
            tessera_shred::shamir::check_threshold(k as usize, n as usize).map_err(|e| {
                CliError::new(Exit::InvalidArgument, format!("invalid threshold: {e}"))
            })?;
            Some(tessera_broker::unseal::OperatorSplit {
                threshold: k,
                shares: n,
            })
        }
        (Source::Shares, _, _) => {
            return Err(CliError::new(
                Exit::InvalidArgument,
                "invalid shares: --unseal shares needs --shares N and --threshold K, e.g. \
                 --shares 5 --threshold 3",
            ));
        }
        (_, None, None) => None,
        _ => {
            return Err(CliError::new(
                Exit::InvalidArgument,
                "invalid shares: --shares and --threshold go with --unseal shares",
            ));
        }
    };
    if let Some(split) = &split {
        // Everything that could stop the shares from being delivered is
        // checked before the store exists: a store whose shares were never
        // handed out can never be unsealed.
        check_share_delivery(u32::from(split.shares), &a.delivery)?;
    }
    let dir = data_dir(g);
    let done = tessera_broker::init::init(InitOptions {
        data_dir: dir.clone(),
        source,
        passphrase: pass,
        kdf: KdfParams::default(),
        split,
    })
    .await?;
    for problem in dir.open_to_others() {
        errln!("warning: {problem}");
    }
    let shares = deliver_operator_shares(&done.operator_shares, &a.delivery).map_err(|e| {
        CliError::new(
            e.exit,
            format!(
                "{}; the store in {} was created but its operator shares were not all \
                 delivered, so it can never be unsealed: remove that directory and run \
                 init again",
                e.message,
                dir.root().display()
            ),
        )
    })?;
    if g.json {
        print_json(json!({
            "store": done.db_path,
            "store_id": done.store_id,
            "unseal": source.name(),
            "admin_token": done.admin_token.reveal_once(),
            "admin_token_file": done.admin_token_path,
            "operator_shares": shares,
        }));
    } else {
        outln!("Created a tessera store at {}", done.db_path.display());
        outln!("Root key sealed by: {}", source.name());
        outln!(
            "Admin token (shown once; also written 0600 to {}):",
            done.admin_token_path.display()
        );
        outln!("  {}", done.admin_token.reveal_once());
        if !done.operator_shares.is_empty() {
            outln!(
                "The root key is split into {} operator shares; `tessera serve` starts sealed \
                 until enough are given with `tessera unseal`.",
                done.operator_shares.len()
            );
            show_delivered(&shares, &a.delivery);
        }
        outln!("Next: tessera serve --data-dir {}", dir.root().display());
    }
    if !done.operator_shares.is_empty() && a.delivery.share_dir.is_none() {
        crate::shown(
            "the operator shares, which exist nowhere else",
            &format!("; remove {} and run init again", dir.root().display()),
        )?;
    }
    Ok(())
}

/// Checks, before `init` creates anything (or `rekey root` replaces the
/// root key), that `n` operator shares can be delivered as asked: one
/// `--operator-recipient` per share, or none, each one parsing, and
/// `--share-dir` can be created and written and holds no share file yet.
fn check_share_delivery(n: u32, a: &crate::ShareDelivery) -> Result<(), CliError> {
    if !a.operator_recipient.is_empty() && a.operator_recipient.len() != n as usize {
        return Err(CliError::new(
            Exit::InvalidArgument,
            format!("invalid operator_recipient: give one per share ({n}), or none"),
        ));
    }
    for (i, r) in a.operator_recipient.iter().enumerate() {
        tessera_broker::retention::parse_recipient(r, "operator_recipient").map_err(|e| {
            let e = CliError::from(e);
            CliError::new(e.exit, format!("{} (recipient {})", e.message, i + 1))
        })?;
    }
    let Some(d) = &a.share_dir else {
        return Ok(());
    };
    if let Some(f) = (1..=n)
        .map(|i| d.join(format!("operator-{i}.share")))
        .find(|f| f.exists())
    {
        return Err(CliError::new(
            Exit::Precondition,
            format!(
                "{} already exists; choose an empty --share-dir",
                f.display()
            ),
        ));
    }
    let cannot = |e: std::io::Error| {
        CliError::new(
            Exit::Failure,
            format!("cannot write operator shares to {}: {e}", d.display()),
        )
    };
    share_dir(d).map_err(cannot)?;
    // Others must not replace or remove a share before its operator has it.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(d).map_err(cannot)?;
    if m.mode() & 0o022 != 0 || m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(CliError::new(
            Exit::InvalidArgument,
            format!(
                "invalid share_dir: {} can be written by others (mode {:o}, owner uid {}); \
                 choose a directory only you can write, or a new one (made 0700)",
                d.display(),
                m.mode() & 0o7777,
                m.uid()
            ),
        ));
    }
    tempfile::tempfile_in(d).map(drop).map_err(cannot)
}

/// Creates --share-dir if needed, 0700 whatever the umask (others must not
/// replace or remove shares before the operators collect them).
fn share_dir(d: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
}

/// Writes operator shares to --share-dir (age-sealed to the operators'
/// recipients when given) and returns, per share, its file or its text.
fn deliver_operator_shares(
    shares: &[Zeroizing<String>],
    a: &crate::ShareDelivery,
) -> Result<Vec<serde_json::Value>, CliError> {
    let mut out = Vec::new();
    for (i, text) in shares.iter().enumerate() {
        let body: Zeroizing<Vec<u8>> = match a.operator_recipient.get(i) {
            Some(r) => Zeroizing::new(
                tessera_broker::retention::seal_to_holder(r, text.as_bytes())?.into_bytes(),
            ),
            None => Zeroizing::new(text.as_bytes().to_vec()),
        };
        match &a.share_dir {
            Some(d) => {
                share_dir(d).map_err(|e| {
                    CliError::new(Exit::Failure, format!("cannot create {}: {e}", d.display()))
                })?;
                let f = d.join(format!("operator-{}.share", i + 1));
                tessera_broker::init::write_private_file(&f, &body)?;
                out.push(json!(f));
            }
            None => out.push(json!(String::from_utf8_lossy(&body))),
        }
    }
    // The files' names are durable too (and the directory's own, if it
    // was just made), before anything relies on them.
    if let Some(d) = &a.share_dir {
        let parent = d
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| {
                CliError::new(Exit::Failure, format!("cannot sync {}: {e}", d.display()))
            })?;
        // Best effort: a parent this user may not read is not a reason to
        // stop (it matters only for a directory just made).
        let _ = std::fs::File::open(parent).and_then(|f| f.sync_all());
    }
    Ok(out)
}

/// Says where delivered shares went, or prints them (sealed where a
/// recipient was given).
fn show_delivered(shares: &[serde_json::Value], a: &crate::ShareDelivery) {
    match &a.share_dir {
        Some(d) => outln!(
            "Shares written to {} (hand one to each operator):",
            d.display()
        ),
        None => outln!("Operator shares (shown once; hand one to each operator):"),
    }
    for s in shares {
        outln!("{}", s.as_str().unwrap_or_default());
    }
}

async fn rekey_root(
    g: &Global,
    shares: Option<u32>,
    threshold: Option<u32>,
    delivery: &crate::ShareDelivery,
) -> Result<(), CliError> {
    let token = admin_token(g)?;
    if let (Some(n), Some(k)) = (shares, threshold) {
        // The split first (the broker would refuse it), then the delivery:
        // all before the root key is replaced.
        tessera_shred::shamir::check_threshold(k as usize, n as usize)
            .map_err(|e| CliError::new(Exit::InvalidArgument, format!("invalid threshold: {e}")))?;
        check_share_delivery(n, delivery)?;
    }
    let pass = match std::env::var("TESSERA_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Zeroizing::new(p.into_bytes()),
        _ => Zeroizing::new(Vec::new()),
    };
    let mut admin = target(g).admin().await?;
    let call = |prepare: bool, commit: String| proto::RekeyRootRequest {
        passphrase: pass.to_vec(),
        shares: shares.unwrap_or(0),
        threshold: threshold.unwrap_or(0),
        prepare,
        commit,
    };
    let (Some(_), Some(_)) = (shares, threshold) else {
        // A keychain or passphrase store: one call (the new key is in its
        // source before the store switches to it).
        let r = admin
            .rekey_root(authed(call(false, String::new()), &token)?)
            .await?
            .into_inner();
        return rekeyed(g, &r, &[], delivery);
    };
    // Operator shares: the new shares are kept (written, or shown) before
    // the store switches to their key, so that no crash, lost reply or
    // killed client can leave a store that no share opens.
    let mut prepared = admin
        .rekey_root(authed(call(true, String::new()), &token)?)
        .await?
        .into_inner();
    let texts: Vec<Zeroizing<String>> = std::mem::take(&mut prepared.operator_shares)
        .into_iter()
        .map(Zeroizing::new)
        .collect();
    // A broker from before the two steps ignores `prepare` and has switched
    // already: then a failure to keep the shares is not "nothing changed".
    let switched = prepared.pending_id.is_empty();
    let not_changed = |e: CliError| {
        if switched {
            // (Not the exit code of "nothing changed".)
            return CliError::new(
                Exit::Failure,
                format!(
                    "{}; the root key WAS replaced (by a broker older than this CLI, in one \
                     step) and its new shares could not be kept: run `tessera rekey root` \
                     again while the broker is unsealed, or it cannot be unsealed after a \
                     restart",
                    e.message
                ),
            );
        }
        CliError::new(
            e.exit,
            format!(
                "{}; the root key was not replaced and the old operator shares still unseal \
                 this store",
                e.message
            ),
        )
    };
    let kept = deliver_operator_shares(&texts, delivery).map_err(not_changed)?;
    if delivery.share_dir.is_none() {
        // Shown before the switch: once on stdout, they are the operators'.
        if g.json {
            print_json(json!({
                "generation": prepared.generation,
                "operator_shares": kept,
            }));
        } else {
            outln!(
                "New operator shares (shown once; hand one to each operator; they take effect \
                 as the re-key below commits):"
            );
            for s in &kept {
                outln!("{}", s.as_str().unwrap_or_default());
            }
        }
        crate::shown("the new operator shares", "").map_err(not_changed)?;
    }
    if switched {
        // The shares just kept are the ones in effect, and a second call
        // would re-key again.
        return rekeyed(g, &prepared, &kept, delivery);
    }
    let done = admin
        .rekey_root(authed(call(false, prepared.pending_id.clone()), &token)?)
        .await;
    let r = match done {
        Ok(r) => r.into_inner(),
        Err(status) => {
            use tonic::Code;
            let unknown = matches!(
                status.code(),
                Code::Unknown
                    | Code::Internal
                    | Code::Unavailable
                    | Code::Cancelled
                    | Code::DeadlineExceeded
            );
            let e = CliError::from(status);
            let shares_at = delivery.share_dir.as_ref().map_or_else(
                || "printed above".to_string(),
                |d| format!("in {}", d.display()),
            );
            return Err(if unknown {
                CliError::new(
                    Exit::Failure,
                    format!(
                        "{}; the re-key may or may not have taken effect. Keep both the old \
                         shares and the new ones ({shares_at}): after a restart, the set that \
                         unseals the broker is the one in effect (`tessera unseal` refuses a \
                         share of the other key)",
                        e.message
                    ),
                )
            } else {
                if delivery.share_dir.is_some() {
                    for f in &kept {
                        let _ = std::fs::remove_file(f.as_str().unwrap_or_default());
                    }
                }
                not_changed(CliError::new(
                    e.exit,
                    format!("{} (the new shares {shares_at} are void)", e.message),
                ))
            });
        }
    };
    rekeyed(g, &r, &kept, delivery)
}

/// What `rekey root` says once the store switched to the new key: with
/// shares written to a directory, where they are (shares shown on stdout
/// were shown before the switch).
fn rekeyed(
    g: &Global,
    r: &proto::RekeyRootResponse,
    kept: &[serde_json::Value],
    delivery: &crate::ShareDelivery,
) -> Result<(), CliError> {
    let in_dir = delivery.share_dir.is_some() && !kept.is_empty();
    if g.json {
        if kept.is_empty() || in_dir {
            print_json(json!({
                "generation": r.generation,
                "versions_rewrapped": r.versions_rewrapped,
                "classes_rewrapped": r.classes_rewrapped,
                "operator_shares": kept,
            }));
        }
    } else {
        outln!(
            "Root key generation {}: {} data keys and {} class keys re-wrapped; no value was \
             re-encrypted.",
            r.generation,
            r.versions_rewrapped,
            r.classes_rewrapped
        );
        if !kept.is_empty() {
            outln!("The old operator shares no longer unseal this store.");
        }
        if in_dir {
            show_delivered(kept, delivery);
        }
    }
    Ok(())
}

async fn unseal(g: &Global, a: crate::UnsealArgs) -> Result<(), CliError> {
    let raw = match &a.file {
        Some(f) => Zeroizing::new(std::fs::read(f).map_err(|e| {
            CliError::new(
                Exit::InvalidArgument,
                format!("cannot read {}: {e}", f.display()),
            )
        })?),
        None => read_stdin("your operator share", ", or give its file")?,
    };
    let text = crate::retention::open_share_bytes(raw, &a.identity_file, "the share")?;
    let r = target(g)
        .admin()
        .await?
        .unseal(proto::UnsealRequest {
            share: String::from_utf8_lossy(&text).into_owned(),
        })
        .await?
        .into_inner();
    if g.json {
        print_json(json!({
            "sealed": r.sealed,
            "received": r.received,
            "threshold": r.threshold,
            "shares": r.shares,
        }));
    } else if r.sealed {
        outln!(
            "Share accepted: {} of {} received; the broker stays sealed until {} are given.",
            r.received,
            r.threshold,
            r.threshold
        );
    } else {
        outln!("Unsealed: the broker is serving.");
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in a log file or journal.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // A log line that cannot be written is lost, not reported on the
        // same stderr (which panics when that fails too): a full disk under
        // the log must not stop the broker.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn serve(g: &Global, a: crate::ServeArgs) -> Result<(), CliError> {
    init_logging(a.log_format);
    let dir = data_dir(g);
    whole_seconds(Some(a.lease_history), "--lease-history")?;
    let opts = ListenOptions {
        socket: a.socket.clone().unwrap_or_else(|| dir.socket()),
        socket_mode: a.socket_mode,
        tcp: a.listen,
        tls: a.tls_cert.clone().zip(a.tls_key.clone()),
        sweep_interval: a.sweep_interval,
        lease_history: a.lease_history,
        scheduler: !a.no_scheduler,
        max_connections: a.max_connections.map(|n| n as usize),
    };
    server::check_listen(&opts)?;
    let limits = Limits {
        max_value_size: a.max_value_size,
        max_watches_per_agent: a.max_watches_per_agent as usize,
        max_leases_per_agent: a.max_leases_per_agent,
    };
    server::check_limits(&limits)?;
    let source = peek_source(&dir)?;
    // First: a directory open to others also explains a lock held by
    // someone else.
    for problem in dir.open_to_others() {
        tracing::warn!("{problem}");
    }
    // Held until `serve` returns.
    let _serving = dir.lock_for_serving()?;
    let pass = match source {
        Source::Passphrase => Some(passphrase(a.passphrase_file.as_deref(), false)?),
        Source::Keychain(_) | Source::Shares => None,
    };
    if source == Source::Shares {
        let gate = tessera_broker::gate::Gate::sealed(&dir, limits)?;
        let (_, k) = gate.progress();
        let running = server::start(gate, opts.clone()).await?;
        tracing::info!(
            socket = %opts.socket.display(),
            tcp = %running.tcp_addr.map(|a| a.to_string()).unwrap_or_default(),
            threshold = k,
            "tessera broker sealed: waiting for operator shares (tessera unseal)"
        );
        announce(g, &opts, &running, "shares", true);
        server::termination().await;
        running.stop();
        running.wait().await?;
        announce_stopped(g);
        return Ok(());
    }
    let d = dir.clone();
    let broker = tokio::task::spawn_blocking(move || {
        Broker::open(&d, pass.as_deref().map(|p| &p[..]), limits)
    })
    .await
    .map_err(|e| CliError::new(Exit::Failure, format!("unseal task failed: {e}")))??;
    let running = server::start(
        tessera_broker::gate::Gate::unsealed(Arc::new(broker)),
        opts.clone(),
    )
    .await?;
    tracing::info!(
        socket = %opts.socket.display(),
        tcp = %running.tcp_addr.map(|a| a.to_string()).unwrap_or_default(),
        unseal = source.name(),
        "tessera broker ready"
    );
    announce(g, &opts, &running, source.name(), false);
    server::termination().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.stop();
    running.wait().await?;
    tracing::info!("stopped");
    announce_stopped(g);
    Ok(())
}

/// Under `--json`, `serve` prints one JSON line on stdout once it listens
/// (for supervisors and scripts; the logs stay on stderr) and one when it
/// has stopped.
fn announce(
    g: &Global,
    opts: &ListenOptions,
    running: &server::Running,
    unseal: &str,
    sealed: bool,
) {
    if g.json {
        print_json(json!({
            "ready": true,
            "sealed": sealed,
            "unseal": unseal,
            "socket": opts.socket.display().to_string(),
            "tcp": running.tcp_addr.map(|a| a.to_string()),
        }));
    }
}

fn announce_stopped(g: &Global) {
    if g.json {
        print_json(json!({"stopped": true}));
    }
}

async fn secret(g: &Global, c: SecretCmd) -> Result<(), CliError> {
    let token = admin_token(g)?;
    let mut admin = target(g).admin().await?;
    match c {
        SecretCmd::Put { name, from_file } => {
            let mut value = Zeroizing::new(Vec::new());
            match from_file {
                Some(f) => {
                    *value = std::fs::read(&f).map_err(|e| {
                        CliError::new(
                            Exit::InvalidArgument,
                            format!("cannot read --from-file {}: {e}", f.display()),
                        )
                    })?;
                }
                None => {
                    value =
                        read_value(&format!("the value of {name}"), " or use --from-file").await?;
                }
            }
            // Past this, the request would not fit in one gRPC message and
            // the transport would refuse it without naming the value.
            let max = tessera_broker::server::MAX_VALUE_SIZE;
            if value.len() > max {
                return Err(CliError::new(
                    Exit::InvalidArgument,
                    format!(
                        "invalid value: it is {} bytes, and tessera stores at most {max} bytes \
                         per value (the broker's --max-value-size, 64 KiB by default, may allow \
                         less)",
                        value.len()
                    ),
                ));
            }
            let req = proto::PutSecretRequest {
                name,
                value: std::mem::take(&mut *value),
            };
            let info = admin.put_secret(authed(req, &token)?).await?.into_inner();
            if g.json {
                print_json(secret_json(&info));
            } else {
                outln!("Stored {} version {}", info.name, info.current_version);
            }
        }
        SecretCmd::Show { name } => {
            let d = admin
                .show_secret(authed(proto::ShowSecretRequest { name }, &token)?)
                .await?
                .into_inner();
            crate::rotation::print_detail(g, &d);
        }
        SecretCmd::Config(a) => {
            let d = admin
                .configure_secret(authed(crate::rotation::config_request(a)?, &token)?)
                .await?
                .into_inner();
            crate::rotation::print_detail(g, &d);
        }
        SecretCmd::List => {
            let r = admin
                .list_secrets(authed(proto::ListSecretsRequest {}, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(
                    json!({"secrets": r.secrets.iter().map(secret_json).collect::<Vec<_>>()}),
                );
            } else {
                outln!(
                    "{:<40} {:>7} {:>8}  {:<20}",
                    "NAME",
                    "VERSION",
                    "VERSIONS",
                    "UPDATED"
                );
                for s in r.secrets {
                    outln!(
                        "{:<40} {:>7} {:>8}  {:<20}",
                        s.name,
                        s.current_version,
                        s.versions,
                        time(s.updated_at)
                    );
                }
            }
        }
        SecretCmd::Rm { name } => {
            let r = admin
                .delete_secret(authed(
                    proto::DeleteSecretRequest { name: name.clone() },
                    &token,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(
                    json!({"name": name, "versions_deleted": r.versions_deleted, "leases_revoked": r.leases_revoked, "archived_kept": r.archived_kept}),
                );
            } else {
                outln!(
                    "Deleted {name}: {} versions, {} leases revoked",
                    r.versions_deleted,
                    r.leases_revoked
                );
                if r.archived_kept > 0 {
                    outln!(
                        "Kept {} archived versions: retention data, destroyed only by a shred \
                         ceremony of their class",
                        r.archived_kept
                    );
                }
            }
        }
    }
    Ok(())
}

fn secret_json(s: &proto::SecretInfo) -> serde_json::Value {
    json!({
        "name": s.name,
        "current_version": s.current_version,
        "versions": s.versions,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    })
}

fn agent_json(a: &proto::AgentInfo) -> serde_json::Value {
    json!({
        "name": a.name,
        "allow": a.allow,
        "max_ttl_seconds": a.max_ttl_seconds,
        "max_lifetime_seconds": a.max_lifetime_seconds,
        "created_at": a.created_at,
        "revoked_at": if a.revoked_at == 0 { serde_json::Value::Null } else { a.revoked_at.into() },
        "expires_at": if a.expires_at == 0 { serde_json::Value::Null } else { a.expires_at.into() },
        "active_leases": a.active_leases,
        "tampered": a.tampered,
        "peer_uid": a.peer_uid,
    })
}

async fn agent(g: &Global, c: AgentCmd) -> Result<(), CliError> {
    let token = admin_token(g)?;
    let mut admin = target(g).admin().await?;
    match c {
        AgentCmd::Create {
            name,
            allow,
            max_ttl,
            max_lifetime,
            expires_in,
            uid,
        } => {
            let req = proto::CreateAgentRequest {
                name,
                allow,
                max_ttl_seconds: seconds_defaulted(max_ttl, "--max-ttl")?,
                max_lifetime_seconds: seconds_or_default(max_lifetime, "--max-lifetime")?,
                expires_in_seconds: seconds_or_default(expires_in, "--expires-in")?,
                peer_uid: uid,
            };
            let mut r = admin.create_agent(authed(req, &token)?).await?.into_inner();
            let info = r.agent.take().unwrap_or_default();
            if g.json {
                let mut v = agent_json(&info);
                v["token"] = r.token.clone().into();
                print_json(v);
            } else {
                outln!(
                    "Created agent {} (allow {})",
                    info.name,
                    info.allow.join(", ")
                );
                if info.expires_at != 0 {
                    outln!("The token expires at {}.", time(info.expires_at));
                }
                if let Some(uid) = info.peer_uid {
                    outln!(
                        "The token is accepted only from Unix uid {uid}, over the broker's Unix socket."
                    );
                }
                outln!("Token (shown once; give it to the agent as TESSERA_TOKEN):");
                outln!("  {}", r.token);
            }
            if crate::stdout_closed() {
                // Nobody saw the token: an agent no one can use, or one
                // whose token went somewhere unknown. Revoke it.
                let revoked = admin
                    .revoke_agent(authed(
                        proto::RevokeAgentRequest {
                            name: info.name.clone(),
                        },
                        &token,
                    )?)
                    .await;
                let remedy = match revoked {
                    Ok(_) => format!(
                        ", so agent {} was revoked; create the agent again under another name \
                         (names are not used twice)",
                        info.name
                    ),
                    Err(_) => format!(
                        "; revoke agent {} (`tessera agent revoke {}`) and create it again \
                         under another name",
                        info.name, info.name
                    ),
                };
                crate::shown(&format!("the token of agent {}", info.name), &remedy)?;
            }
        }
        AgentCmd::List => {
            let r = admin
                .list_agents(authed(proto::ListAgentsRequest {}, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(json!({"agents": r.agents.iter().map(agent_json).collect::<Vec<_>>()}));
            } else {
                outln!(
                    "{:<24} {:<8} {:>8} {:>7} {:>6}  ALLOW",
                    "NAME",
                    "STATE",
                    "MAX TTL",
                    "LEASES",
                    "UID"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                for a in r.agents {
                    outln!(
                        "{:<24} {:<8} {:>8} {:>7} {:>6}  {}",
                        a.name,
                        if a.tampered {
                            "TAMPERED"
                        } else if a.revoked_at != 0 {
                            "revoked"
                        } else if a.expires_at != 0 && a.expires_at <= now {
                            "expired"
                        } else {
                            "active"
                        },
                        humantime::format_duration(std::time::Duration::from_secs(
                            a.max_ttl_seconds
                        ))
                        .to_string(),
                        a.active_leases,
                        a.peer_uid
                            .map_or_else(|| "-".to_string(), |u| u.to_string()),
                        a.allow.join(", ")
                    );
                }
            }
        }
        AgentCmd::Revoke { name } => {
            let r = admin
                .revoke_agent(authed(
                    proto::RevokeAgentRequest { name: name.clone() },
                    &token,
                )?)
                .await?
                .into_inner();
            if g.json {
                print_json(json!({"name": name, "leases_revoked": r.leases_revoked}));
            } else {
                outln!("Revoked agent {name} and {} leases", r.leases_revoked);
            }
        }
    }
    Ok(())
}

async fn get(g: &Global, a: crate::GetArgs) -> Result<(), CliError> {
    let token = agent_token()?;
    let mut broker = target(g).broker().await?;
    let req = proto::IssueRequest {
        secret: a.name,
        ttl_seconds: seconds_or_default(a.ttl, "--ttl")?,
    };
    let mut lease = broker.issue(authed(req, &token)?).await?.into_inner();
    let value = Zeroizing::new(std::mem::take(&mut lease.value));
    if g.json {
        let mut doc = json!({
            "lease_id": lease.lease_id,
            "secret": lease.secret,
            "version": lease.version,
            "issued_at": lease.issued_at,
            "expires_at": lease.expires_at,
            "renewable_until": lease.renewable_until,
        });
        put_value(&mut doc, &value);
        print_json(doc);
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&value)
            .and_then(|()| out.flush())
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot write stdout: {e}")))?;
    }
    Ok(())
}

/// Puts a secret value into a JSON document: as `value` when it is UTF-8
/// text, else as `value_hex` (JSON cannot carry raw bytes, and a lossy
/// conversion would silently change the value). `print_json` wipes the copy.
pub(crate) fn put_value(doc: &mut serde_json::Value, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => doc["value"] = json!(text),
        Err(_) => doc["value_hex"] = json!(tessera_broker::keys::hex(value)),
    }
}

fn lease_json(l: &proto::LeaseInfo) -> serde_json::Value {
    json!({
        "lease_id": l.lease_id,
        "agent": l.agent,
        "secret": l.secret,
        "version": l.version,
        "issued_at": l.issued_at,
        "expires_at": l.expires_at,
        "renewable_until": l.renewable_until,
        "state": l.state,
    })
}

async fn lease(g: &Global, c: LeaseCmd) -> Result<(), CliError> {
    let token = admin_token(g)?;
    let mut admin = target(g).admin().await?;
    match c {
        LeaseCmd::List {
            agent,
            secret,
            all,
            limit,
        } => {
            let req = proto::ListLeasesRequest {
                agent: agent.unwrap_or_default(),
                secret: secret.unwrap_or_default(),
                all,
                limit,
                after: String::new(),
            };
            let r = admin.list_leases(authed(req, &token)?).await?.into_inner();
            if g.json {
                print_json(json!({"leases": r.leases.iter().map(lease_json).collect::<Vec<_>>()}));
            } else {
                outln!(
                    "{:<40} {:<16} {:<24} {:>3} {:<8} EXPIRES",
                    "LEASE",
                    "AGENT",
                    "SECRET",
                    "V",
                    "STATE"
                );
                for l in r.leases {
                    outln!(
                        "{:<40} {:<16} {:<24} {:>3} {:<8} {}",
                        l.lease_id,
                        l.agent,
                        l.secret,
                        l.version,
                        l.state,
                        time(l.expires_at)
                    );
                }
            }
        }
        LeaseCmd::Revoke {
            lease,
            agent,
            secret,
            all,
        } => {
            use proto::revoke_leases_request::Selector;
            let selector = match (lease, agent, secret, all) {
                (Some(l), _, _, _) => Selector::LeaseId(l),
                (_, Some(a), _, _) => Selector::Agent(a),
                (_, _, Some(s), _) => Selector::Secret(s),
                (_, _, _, true) => Selector::All(true),
                _ => {
                    return Err(CliError::new(
                        Exit::Usage,
                        "say which leases to revoke: --lease ID, --agent NAME, --secret NAME or --all",
                    ));
                }
            };
            let req = proto::RevokeLeasesRequest {
                selector: Some(selector),
            };
            let r = admin
                .revoke_leases(authed(req, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(json!({"revoked": r.revoked}));
            } else {
                outln!("Revoked {} leases", r.revoked);
            }
        }
    }
    Ok(())
}

async fn audit(g: &Global, c: AuditCmd) -> Result<(), CliError> {
    let token = admin_token(g)?;
    let mut admin = target(g).admin().await?;
    match c {
        AuditCmd::Verify { checkpoints } => {
            let checkpoints = checkpoints
                .iter()
                .map(|p| read_checkpoint(p))
                .collect::<Result<Vec<_>, _>>()?;
            let given = checkpoints.len();
            let r = admin
                .verify_audit(authed(proto::VerifyAuditRequest { checkpoints }, &token)?)
                .await?
                .into_inner();
            if g.json {
                print_json(json!({
                    "ok": r.ok,
                    // Records verified: none can be counted on when the
                    // trail is broken.
                    "records": if r.ok { r.records.into() } else { serde_json::Value::Null },
                    "first_bad_seq": if r.ok { serde_json::Value::Null } else { r.first_bad_seq.into() },
                    "problem": if r.ok { serde_json::Value::Null } else { r.problem.clone().into() },
                }));
            } else if r.ok && given == 0 {
                outln!("Audit trail intact: {} records verified", r.records);
            } else if r.ok {
                outln!(
                    "Audit trail intact: {} records verified, reaching {given} signed checkpoint{}",
                    r.records,
                    if given == 1 { "" } else { "s" }
                );
            }
            if !r.ok {
                return Err(CliError::new(Exit::AuditBroken, r.problem));
            }
        }
        AuditCmd::Checkpoint { out } => {
            check_new_file(out.as_deref())?;
            let cp = admin
                .checkpoint_audit(authed(proto::CheckpointAuditRequest {}, &token)?)
                .await?
                .into_inner();
            match &out {
                // The broker has signed and recorded it: not lost if the
                // file cannot be written after all.
                Some(path) => write_new_file(path, cp.text.as_bytes()).inspect_err(|_| {
                    out!("{}", cp.text);
                    errln!("the checkpoint is printed above, as it could not be written:");
                })?,
                None if !g.json => out!("{}", cp.text),
                None => {}
            }
            if g.json {
                print_json(json!({
                    "seq": cp.seq,
                    "hash": cp.hash,
                    "time": cp.time,
                    "checkpoint": cp.text,
                    "file": out.as_ref().map(|p| p.display().to_string()),
                }));
            } else if let Some(path) = &out {
                outln!(
                    "Checkpoint of audit record {} written to {}; keep a copy off this machine",
                    cp.seq,
                    path.display()
                );
            }
        }
        AuditCmd::Export { since, from_seq } => {
            let req = proto::ExportAuditRequest {
                since: since.unwrap_or(0),
                from_seq,
            };
            let mut stream = admin.export_audit(authed(req, &token)?).await?.into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(r) = stream.message().await? {
                let line = json!({
                    "seq": r.seq,
                    "time": time(r.time),
                    "ts": r.time,
                    "actor": r.actor,
                    "action": r.action,
                    "target": r.target,
                    "decision": r.decision,
                    "reason": r.reason,
                    "request_id": r.request_id,
                    "prev_hash": r.prev_hash,
                    "hash": r.hash,
                });
                match writeln!(out, "{line}") {
                    Ok(()) => {}
                    // The reader stopped early (`| head`): the export ends.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => {
                        return Err(CliError::new(
                            Exit::Failure,
                            format!("cannot write stdout: {e}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A duration flag as whole seconds, at least one: `0s` or `500ms` would
/// otherwise reach the broker as 0, which there means "the default".
pub(crate) fn seconds(d: std::time::Duration, flag: &str) -> Result<u64, CliError> {
    positive_seconds(d, flag, "")
}

/// [`seconds`], for a flag that has a default.
pub(crate) fn seconds_defaulted(d: std::time::Duration, flag: &str) -> Result<u64, CliError> {
    positive_seconds(d, flag, "; leave it out for the default")
}

fn positive_seconds(d: std::time::Duration, flag: &str, hint: &str) -> Result<u64, CliError> {
    if d.as_secs() == 0 || d.subsec_nanos() != 0 {
        return Err(CliError::new(
            Exit::InvalidArgument,
            format!(
                "{flag} must be a positive whole number of seconds (at least 1s), e.g. 30s, 15m \
                 or 1h{hint}"
            ),
        ));
    }
    Ok(d.as_secs())
}

/// An optional duration flag: [`seconds`], or 0 (the default) when absent.
pub(crate) fn seconds_or_default(
    d: Option<std::time::Duration>,
    flag: &str,
) -> Result<u64, CliError> {
    d.map_or(Ok(0), |d| seconds_defaulted(d, flag))
}

/// An optional duration flag for which 0 is a value of its own (no
/// overlap, no jitter): whole seconds, so that `500ms` is not silently 0.
pub(crate) fn whole_seconds(
    d: Option<std::time::Duration>,
    flag: &str,
) -> Result<Option<u64>, CliError> {
    match d {
        Some(d) if d.subsec_nanos() != 0 => Err(CliError::new(
            Exit::InvalidArgument,
            format!("{flag} must be a whole number of seconds, e.g. 0s, 30s, 15m or 1h"),
        )),
        d => Ok(d.map(|d| d.as_secs())),
    }
}

/// Writes `--out` files (checkpoints, certificates): a new file, 0600,
/// never over an existing one (an older checkpoint is a rollback anchor).
pub(crate) fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), CliError> {
    check_new_file(Some(path))?;
    Ok(tessera_broker::init::write_private_file(path, contents)?)
}

/// Refuses an `--out` that exists, before anything is asked of the broker.
pub(crate) fn check_new_file(path: Option<&Path>) -> Result<(), CliError> {
    match path {
        // (A symlink counts, even one that leads nowhere.)
        Some(p) if p.symlink_metadata().is_ok() => Err(CliError::new(
            Exit::Precondition,
            format!(
                "{} already exists; give --out a new file name (tessera does not overwrite it)",
                p.display()
            ),
        )),
        Some(p)
            if !p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .is_dir() =>
        {
            Err(CliError::new(
                Exit::InvalidArgument,
                format!(
                    "invalid out: the directory of {} does not exist; create it or give \
                     another path",
                    p.display()
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// A checkpoint file: the signed text, or the JSON line `audit checkpoint
/// --json` prints (as saved from a log), whose `checkpoint` field holds it.
fn read_checkpoint(path: &std::path::Path) -> Result<String, CliError> {
    use std::io::Read;
    let unreadable = |e: &dyn std::fmt::Display| {
        CliError::new(
            Exit::InvalidArgument,
            format!("cannot read the checkpoint {}: {e}", path.display()),
        )
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(|e| unreadable(&e))?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| unreadable(&e))?;
    // A line as syslog or the journal shows it (`Dec 01 … tessera[12]:
    // {…}`): the JSON after the prefix.
    let line = text.trim();
    let json = match line.find('{') {
        Some(i) if !line.contains('\n') => &line[i..],
        _ => line,
    };
    if !json.starts_with('{') {
        return Ok(text);
    }
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["checkpoint"].as_str().map(str::to_owned))
        .ok_or_else(|| unreadable(&"a JSON line without a \"checkpoint\" field"))
}

async fn status(g: &Global) -> Result<(), CliError> {
    // A sealed broker answers anyone (operators giving shares hold no admin
    // token); an unsealed one wants the token, and its absence is then
    // explained here rather than by the broker.
    let token = admin_token(g);
    let req = match &token {
        Ok(t) => authed(proto::StatusRequest {}, t)?,
        Err(_) => tonic::Request::new(proto::StatusRequest {}),
    };
    let mut admin = target(g).admin().await?;
    let s = match admin.status(req).await {
        Ok(r) => r.into_inner(),
        Err(st) => {
            return Err(match token {
                Err(e) if st.code() == tonic::Code::Unauthenticated => e,
                _ => st.into(),
            });
        }
    };
    if g.json {
        print_json(json!({
            "sealed": s.sealed,
            "unseal_source": s.unseal_source,
            "secrets": s.secrets,
            "agents": s.agents,
            "active_leases": s.active_leases,
            "audit_records": s.audit_records,
            "version": s.version,
            "broker_key": s.broker_key,
            "unseal_received": s.unseal_received,
            "unseal_threshold": s.unseal_threshold,
            "store_commits": s.store_commits,
            "store_writes": s.store_writes,
            "tampered": s.tampered,
        }));
    } else {
        outln!(
            "tessera {} — {}",
            s.version,
            if s.sealed { "SEALED" } else { "unsealed" }
        );
        outln!("root key source: {}", s.unseal_source);
        outln!(
            "secrets: {}  agents: {}  active leases: {}  audit records: {}",
            s.secrets,
            s.agents,
            s.active_leases,
            s.audit_records
        );
        if s.sealed && s.unseal_threshold > 0 {
            outln!(
                "operator shares: {} of {} given",
                s.unseal_received,
                s.unseal_threshold
            );
        } else {
            outln!(
                "store: {} writes in {} commits since start",
                s.store_writes,
                s.store_commits
            );
            outln!("broker key (signs certificates): {}", s.broker_key);
        }
        if !s.tampered.is_empty() {
            outln!(
                "TAMPERED (changed outside tessera, refused until dealt with): {}",
                s.tampered.join(", ")
            );
        }
    }
    Ok(())
}
