//! The `tessera` command. `serve` runs the broker, `init` creates a store,
//! `demo` walks through the main job on a temporary store; every other
//! subcommand is a gRPC client of a running broker.

#![forbid(unsafe_code)]

/// `println!` for a command's output: a reader that stops early
/// (`tessera … | head`) is not an error, where `println!` would panic
/// (see [`write_out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `errln!` for notes and errors: a stderr that cannot be written (a
/// full disk under a log file, `2>/dev/full`) loses the line rather than
/// panicking, which would take a running broker down with it.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `print!` for a command's output; see `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

/// Set once stdout is found closed (`tessera … | head`).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes command output to stdout. A closed pipe is remembered and later
/// output dropped: the command goes on and ends with its own status (a
/// broker keeps serving, `rotate --due` still reports a failure), and what
/// must be seen once (a token, shares) is checked with [`shown`]. Any other
/// write failure (a full disk) is remembered too, so that the command can
/// still undo what nobody saw, and then ends it with exit 1 (see [`run`]).
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let mut failed = STDOUT_FAILED.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert_with(|| e.to_string());
        }
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Why stdout could not be written, other than a closed pipe.
static STDOUT_FAILED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn stdout_failure() -> Option<String> {
    STDOUT_FAILED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Fails when stdout closed before `what`, shown only once, was written:
/// the command must not end as if it had been seen. `remedy` says what to
/// do about it.
pub(crate) fn shown(what: &str, remedy: &str) -> Result<(), client::CliError> {
    if stdout_closed() {
        let how = match stdout_failure() {
            Some(e) => format!("stdout could not be written ({e})"),
            None => "stdout was closed".into(),
        };
        return Err(client::CliError::new(
            client::Exit::Failure,
            format!("{how} before {what} could be shown{remedy}"),
        ));
    }
    Ok(())
}

/// Keeps other processes of the same user (a command `tessera run`
/// starts, say) from reading this one's memory or `/proc/PID/environ`,
/// where `TESSERA_TOKEN` or `TESSERA_PASSPHRASE` may be, and keeps it from
/// dumping core (a broker's memory holds the root key). A command it
/// starts is dumpable again after `exec`.
pub fn harden() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_dumpable(false);
}

/// Whether what is written to stdout is lost: a closed pipe, or
/// /dev/null (where Rust's runtime puts a closed stdout, `>&-`, at start).
pub(crate) fn stdout_closed() -> bool {
    use std::os::fd::AsFd;
    let null = |fd| {
        let (Ok(a), Ok(b)) = (nix::sys::stat::fstat(fd), nix::sys::stat::stat("/dev/null")) else {
            return false;
        };
        use nix::sys::stat::SFlag;
        let kind = |m| SFlag::from_bits_truncate(m) & SFlag::S_IFMT;
        kind(a.st_mode) == SFlag::S_IFCHR && a.st_rdev == b.st_rdev
    };
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed) || null(std::io::stdout().as_fd())
}

mod backup;
pub mod client;
mod commands;
pub mod demo;
pub mod holder_key;
mod retention;
mod rotation;
mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use client::{CliError, Exit};

/// Secrets broker for AI agents: short-lived leases over gRPC, an encrypted
/// store, a hash-chained audit trail.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, propagate_version = true)]
pub struct Cli {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub global: Global,
    #[allow(missing_docs)]
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Data directory (store, admin token, default socket).
    #[arg(
        long,
        global = true,
        env = "TESSERA_DATA_DIR",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub data_dir: Option<PathBuf>,
    /// Broker address: unix:///path, http://127.0.0.1:PORT or https://HOST:PORT
    /// [default: the socket in the data directory]
    #[arg(
        long,
        global = true,
        env = "TESSERA_ADDR",
        hide_env_values = true,
        value_name = "ADDR"
    )]
    pub addr: Option<String>,
    /// CA certificate (PEM) to trust for an https:// address.
    #[arg(
        long,
        global = true,
        env = "TESSERA_TLS_CA",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// File holding the admin token [default: DATA_DIR/admin.token; or set TESSERA_ADMIN_TOKEN]
    #[arg(long, global = true, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Machine-readable output: one JSON document (one per line for streams).
    #[arg(long, global = true)]
    pub json: bool,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a store, its root key and the admin credential.
    Init(InitArgs),
    /// Run the broker.
    Serve(ServeArgs),
    /// Start a broker on a temporary store and walk through its main job.
    Demo,
    /// Store, list and delete secrets (admin).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Register, list and revoke agents (admin).
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Fetch a secret as an agent (token from TESSERA_TOKEN); value to stdout.
    Get(GetArgs),
    /// Rotate secrets now, on a schedule, or whatever is due (admin).
    Rotate(RotateArgs),
    /// Run a command with secrets in its environment, following rotations
    /// (agent; TESSERA_TOKEN).
    Run(RunArgs),
    /// Rotate the root key (admin).
    #[command(subcommand)]
    Rekey(RekeyCmd),
    /// List and revoke leases (admin).
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Verify, checkpoint and export the audit trail (admin).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Show the broker's state (admin; while sealed, anyone).
    Status,
    /// Copy the live store to a new file, consistent to one instant (admin).
    Backup(BackupArgs),
    /// Put a backup in place as the store (no broker may be serving it).
    Restore(RestoreArgs),
    /// Give one operator share to a broker sealed by operator shares.
    Unseal(UnsealArgs),
    /// Key holders: make keys, enrol roles, export sealed shares.
    #[command(subcommand)]
    Holder(HolderCmd),
    /// Retention classes: keys split among holders, with a deadline (admin).
    #[command(subcommand)]
    Class(ClassCmd),
    /// Legal holds that block shredding a class (admin).
    #[command(subcommand)]
    Hold(HoldCmd),
    /// The quorum shred ceremony and its destruction certificate.
    #[command(subcommand)]
    Shred(ShredCmd),
    /// Work with decrypted or sealed shares offline (no broker needed).
    #[command(subcommand)]
    Shares(SharesCmd),
    /// Envelope-encrypt stdin under a class key, as an agent (TESSERA_TOKEN).
    Encrypt(EnvelopeArgs),
    /// Decrypt stdin (from `tessera encrypt`), as an agent (TESSERA_TOKEN).
    Decrypt(EnvelopeArgs),
}

/// Which holder is acting, and where their keys are.
#[derive(Debug, Args)]
pub struct HolderArgs {
    /// The holder's role, e.g. legal.
    #[arg(long)]
    pub role: String,
    /// The holder's key file instead of the OS keychain.
    #[arg(long, value_name = "FILE")]
    pub identity_file: Option<PathBuf>,
}

/// `tessera holder …`.
#[derive(Debug, Subcommand)]
pub enum HolderCmd {
    /// Make a holder's keys (age X25519 + Ed25519) in the holder's keychain
    /// (or --identity-file) and print the public key to enrol.
    Init(HolderArgs),
    /// Bind a role to a holder's public key (admin).
    Enroll {
        /// The role, e.g. legal.
        #[arg(long)]
        role: String,
        /// The public key `tessera holder init` printed.
        #[arg(long)]
        pubkey: String,
    },
    /// Hand a role to a new holder; re-keys every class the role holds (admin).
    Replace {
        /// The role, e.g. legal.
        #[arg(long)]
        role: String,
        /// The new holder's public key (from their `tessera holder init`).
        #[arg(long)]
        pubkey: String,
    },
    /// Roles, key fingerprints, enrolment times (admin).
    List,
    /// A holder's shares.
    #[command(subcommand)]
    Share(HolderShareCmd),
}

/// `tessera holder share …`.
#[derive(Debug, Subcommand)]
pub enum HolderShareCmd {
    /// Write this holder's age-sealed share of a class to a file.
    Export {
        #[allow(missing_docs)]
        #[command(flatten)]
        holder: HolderArgs,
        /// The class.
        #[arg(long)]
        class: String,
        /// Where to write it (created 0600, never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// `tessera class …`.
#[derive(Debug, Subcommand)]
pub enum ClassCmd {
    /// Make a class key, split it among the holders' roles, seal each share.
    Create {
        /// Class name, e.g. sox-7y.
        name: String,
        /// How long data is kept, e.g. 7y, 30d, 10s.
        #[arg(long, value_parser = parse_duration)]
        retain: std::time::Duration,
        /// Holder roles, comma-separated, e.g. legal,compliance,ciso,board.
        #[arg(long, value_delimiter = ',', required = true)]
        holders: Vec<String>,
        /// Shares needed to recombine the key (and roles to join a shred).
        #[arg(long)]
        threshold: u32,
        /// Roles an early shred needs [default: all holders]
        #[arg(long)]
        early_threshold: Option<u32>,
    },
    /// After losing a root key: restore a class into this store from the old
    /// store file and a quorum of holder shares.
    Recover {
        /// The class.
        #[arg(long)]
        class: String,
        /// The old store's database file (tessera.db).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Share files (repeatable): decrypted, or .age with --identity-file.
        #[arg(long, value_name = "FILE", required = true)]
        share: Vec<PathBuf>,
        /// Holder key files to open age-sealed shares (repeatable).
        #[arg(long, value_name = "FILE")]
        identity_file: Vec<PathBuf>,
    },
    /// Every class: deadline, holders, threshold, state.
    List,
    /// One class with its legal holds and ceremonies.
    Show {
        /// Class name.
        name: String,
    },
}

/// `tessera hold …`.
#[derive(Debug, Subcommand)]
pub enum HoldCmd {
    /// Place a legal hold: no shred while it stands.
    Place {
        /// The class.
        #[arg(long)]
        class: String,
        /// Why, e.g. 'litigation 2026-17'.
        #[arg(long)]
        reason: String,
    },
    /// Release a standing hold on the class (the only one, or --hold ID).
    Release {
        /// The class.
        #[arg(long)]
        class: String,
        /// The hold to release (its id; needed while several stand).
        #[arg(long, value_name = "ID")]
        hold: Option<u64>,
        /// Why, e.g. 'case closed'.
        #[arg(long)]
        reason: String,
    },
}

/// `tessera shred …`.
#[derive(Debug, Subcommand)]
pub enum ShredCmd {
    /// Open a shred ceremony (admin).
    Open {
        /// The class.
        #[arg(long)]
        class: String,
        /// Why (recorded with the ceremony and in the audit trail)
        /// [default: "retention period ended", or with --early "shredded
        /// early, before the retention period ended"]
        #[arg(long)]
        reason: Option<String>,
        /// Before the deadline: needs the class's early threshold.
        #[arg(long)]
        early: bool,
        /// How long holders have to join.
        #[arg(long, default_value = "72h", value_parser = parse_duration)]
        expires: std::time::Duration,
    },
    /// Show a ceremony's statement and sign it as a holder.
    Join {
        /// Ceremony id (cer_…).
        ceremony: String,
        #[allow(missing_docs)]
        #[command(flatten)]
        holder: HolderArgs,
        /// Sign without asking (the statement is still printed).
        #[arg(long)]
        yes: bool,
    },
    /// Confirm, as a holder, that your offline copy of the share is destroyed.
    Confirm {
        /// The shredded class.
        #[arg(long)]
        class: String,
        #[allow(missing_docs)]
        #[command(flatten)]
        holder: HolderArgs,
    },
    /// Destruction certificates.
    #[command(subcommand)]
    Certificate(CertificateCmd),
}

/// `tessera shred certificate …`.
#[derive(Debug, Subcommand)]
pub enum CertificateCmd {
    /// Print (or write) a shredded class's certificate (admin).
    Show {
        /// The class.
        #[arg(long)]
        class: String,
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Check a certificate offline; exit 9 if it does not verify.
    Verify {
        /// The certificate file.
        file: PathBuf,
        /// The broker's public key (hex, from `tessera status`) to pin.
        #[arg(long)]
        broker_key: Option<String>,
    },
}

/// `tessera shares …`.
#[derive(Debug, Subcommand)]
pub enum SharesCmd {
    /// Recombine a class key from share files (decrypted, or .age with
    /// --identity-file); prints the key's fingerprint, and the key with --reveal.
    Combine {
        /// Share files: `tessera-share-v1` text, or age-sealed.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Holder key files to open age-sealed shares (repeatable).
        #[arg(long, value_name = "FILE")]
        identity_file: Vec<PathBuf>,
        /// Print the recombined key (hex) on stdout.
        #[arg(long)]
        reveal: bool,
    },
}

/// `tessera encrypt|decrypt`.
#[derive(Debug, Args)]
pub struct EnvelopeArgs {
    /// The retention class.
    #[arg(long)]
    pub class: String,
    /// Encryption context KEY=VALUE (repeatable); must match to decrypt.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "write the context as KEY=VALUE, e.g. --context tenant=acme".to_string())
}

/// Where the root key lives.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UnsealArg {
    /// The OS keychain (Secret Service: gnome-keyring, KWallet).
    Keychain,
    /// The Linux kernel keyutils session keyring (gone at logout).
    Keyutils,
    /// A passphrase (Argon2id); from TESSERA_PASSPHRASE, --passphrase-file or a prompt.
    Passphrase,
    /// k of n operator shares (Shamir): the broker starts sealed until
    /// `tessera unseal` has received k of them.
    Shares,
}

/// `tessera init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where the root key is kept.
    #[arg(long, value_enum, default_value = "keychain")]
    pub unseal: UnsealArg,
    /// Read the passphrase from this file (first line).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// With --unseal shares: how many operator shares to make.
    #[arg(long, requires = "threshold")]
    pub shares: Option<u8>,
    /// With --unseal shares: how many shares unseal the broker.
    #[arg(long, requires = "shares")]
    pub threshold: Option<u8>,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub delivery: ShareDelivery,
}

/// Where new operator shares go (`init --unseal shares`, `rekey root`).
#[derive(Debug, Args)]
pub struct ShareDelivery {
    /// With operator shares: write operator-N.share files (0600) here
    /// instead of printing the shares.
    #[arg(long, value_name = "DIR", requires = "shares")]
    pub share_dir: Option<PathBuf>,
    /// With operator shares: seal share N to the Nth age recipient
    /// (repeatable, one per share) so only that operator can read it.
    #[arg(long, value_name = "AGE_RECIPIENT", requires = "shares")]
    pub operator_recipient: Vec<String>,
}

/// `tessera backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The new file (0600; never one that exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `tessera restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup, from `tessera backup`.
    pub file: PathBuf,
}

/// `tessera unseal`.
#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// The operator share file (plain, or age-sealed with --identity-file);
    /// stdin when absent.
    pub file: Option<PathBuf>,
    /// An age identity (or holder key) file that opens a sealed share.
    #[arg(long, value_name = "FILE")]
    pub identity_file: Vec<PathBuf>,
}

/// `tessera serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Unix socket to listen on [default: DATA_DIR/tessera.sock]
    #[arg(
        long,
        env = "TESSERA_SOCKET",
        hide_env_values = true,
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// Socket mode: 600 (owner only) or 660 (owner and group).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Also listen on TCP (loopback, or any address with --tls-cert/--tls-key).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// TLS certificate chain (PEM) for --listen.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "listen"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --listen.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "listen"])]
    pub tls_key: Option<PathBuf>,
    /// Read the passphrase from this file (first line).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Largest secret value accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_value_size: usize,
    /// How often expired leases are swept (e.g. 1s, 30s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub sweep_interval: std::time::Duration,
    /// How long ended (expired or revoked) leases stay listed before they
    /// are deleted; their audit records stay. 0s keeps them forever.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub lease_history: std::time::Duration,
    /// Connections open at once on each listener (the Unix socket, TCP),
    /// at most; more are closed at once. A new connection that sends no
    /// HTTP/2 preface within 10 s is closed. [default: the limit on open
    /// files less 128, halved with --listen, up to 10000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_connections: Option<u32>,
    /// `Watch` streams (`get --watch`, `run`) one agent may have open at
    /// once; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_watches_per_agent: u32,
    /// Unexpired leases one agent may hold at once; more are refused
    /// (RESOURCE_EXHAUSTED) until some expire or are revoked.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_leases_per_agent: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// Do not run scheduled rotations in this broker (leave them to
    /// `tessera rotate --due` from cron or a systemd timer).
    #[arg(long)]
    pub no_scheduler: bool,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Human,
    /// One JSON object per line.
    Json,
}

/// `tessera secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a new version; the value comes from stdin or --from-file, never argv.
    Put {
        /// Secret name, e.g. openai/prod.
        name: String,
        /// Read the value from this file instead of stdin.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// Names, versions and times; never values.
    List,
    /// Delete a secret, all its versions, and revoke its leases.
    Rm {
        /// Secret name.
        name: String,
    },
    /// Versions with states, rotation settings and schedule; never values.
    Show {
        /// Secret name.
        name: String,
    },
    /// Rotation settings: overlap window, retention class, generator,
    /// rotation and verify commands (run directly, no shell).
    Config(SecretConfigArgs),
}

/// `tessera secret config`.
#[derive(Debug, Args)]
pub struct SecretConfigArgs {
    /// Secret name.
    pub name: String,
    /// How long the previous version stays valid after a rotation, e.g. 1h.
    #[arg(long, value_parser = parse_duration)]
    pub overlap: Option<std::time::Duration>,
    /// Archive retired versions under this retention class ('-' to clear).
    #[arg(long)]
    pub class: Option<String>,
    /// Generate new values: alnum:N, hex:N, base64:N or a template like
    /// 'sk-{alnum:48}' ('-' to clear).
    #[arg(long, value_name = "SPEC")]
    pub generate: Option<String>,
    /// Program that prints the new value (absolute path; the current value
    /// reaches it on stdin or in TESSERA_CURRENT_VALUE, never in argv).
    #[arg(long, value_name = "PATH")]
    pub rotate_cmd: Option<String>,
    /// An argument for --rotate-cmd (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub rotate_arg: Vec<String>,
    /// Remove the rotation command.
    #[arg(long, conflicts_with = "rotate_cmd")]
    pub no_rotate_cmd: bool,
    /// Program that must exit 0 for a new value before it is activated (it
    /// gets the value on stdin or in TESSERA_NEW_VALUE).
    #[arg(long, value_name = "PATH")]
    pub verify_cmd: Option<String>,
    /// An argument for --verify-cmd (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub verify_arg: Vec<String>,
    /// Remove the verify command.
    #[arg(long, conflicts_with = "verify_cmd")]
    pub no_verify_cmd: bool,
    /// How commands receive values: stdin or env.
    #[arg(long, value_name = "stdin|env")]
    pub value_via: Option<String>,
    /// How long a command may run before it is killed, e.g. 30s.
    #[arg(long, value_parser = parse_duration)]
    pub cmd_timeout: Option<std::time::Duration>,
}

/// `tessera rekey …`.
#[derive(Debug, Subcommand)]
pub enum RekeyCmd {
    /// A new root key in the configured unseal source; every data key is
    /// re-wrapped (values are not re-encrypted). Passphrase stores read
    /// TESSERA_PASSPHRASE; operator-share stores hand out new shares
    /// (printed, or as --share-dir and --operator-recipient say).
    Root {
        /// For an operator-share store: how many new shares.
        #[arg(long, requires = "threshold")]
        shares: Option<u32>,
        /// For an operator-share store: how many unseal.
        #[arg(long, requires = "shares")]
        threshold: Option<u32>,
        #[allow(missing_docs)]
        #[command(flatten)]
        delivery: ShareDelivery,
    },
}

/// `tessera run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VAR=secret/name (repeatable): the secret's value goes into VAR.
    #[arg(long, value_name = "VAR=SECRET", required = true)]
    pub env: Vec<String>,
    /// When a value is rotated or its lease revoked: restart the command,
    /// send it a signal (signal:HUP, signal:USR1…), or ignore.
    #[arg(
        long,
        default_value = "restart",
        value_name = "restart|signal:NAME|ignore",
        value_parser = crate::run::on_rotate_arg
    )]
    pub on_rotate: String,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `tessera rotate`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RotateArgs {
    /// Rotate every secret whose schedule is due (for cron or a systemd
    /// timer; works with or without a running broker); exit 1 if any failed.
    #[arg(long)]
    pub due: bool,
    /// With --due and no broker running, on a passphrase store: read the
    /// passphrase from this file (first line) instead of TESSERA_PASSPHRASE.
    #[arg(long, value_name = "FILE", requires = "due")]
    pub passphrase_file: Option<PathBuf>,
    #[allow(missing_docs)]
    #[command(subcommand)]
    pub cmd: Option<RotateCmd>,
}

/// `tessera rotate …`.
#[derive(Debug, Subcommand)]
pub enum RotateCmd {
    /// Rotate one secret now.
    Now {
        /// Secret name.
        name: String,
        /// Take the new value from stdin.
        #[arg(long)]
        from_stdin: bool,
        /// Generate the new value with this spec (this time only).
        #[arg(long, value_name = "SPEC", conflicts_with = "from_stdin")]
        generate: Option<String>,
    },
    /// Rotate on a schedule: an interval or a 5-field cron expression.
    #[command(group(clap::ArgGroup::new("when").required(true).args(["every", "cron"])))]
    Schedule {
        /// Secret name.
        name: String,
        /// Interval, e.g. 30d.
        #[arg(long, value_parser = parse_duration, conflicts_with = "cron")]
        every: Option<std::time::Duration>,
        /// Cron expression, e.g. '0 3 * * 1' (minute hour day month weekday).
        #[arg(long)]
        cron: Option<String>,
        /// Time zone for --cron, e.g. Europe/Berlin [default: UTC]
        #[arg(long, requires = "cron")]
        tz: Option<String>,
        /// Random delay added to each due time, up to this, e.g. 10m.
        #[arg(long, value_parser = parse_duration)]
        jitter: Option<std::time::Duration>,
    },
    /// Take a secret off its schedule.
    Unschedule {
        /// Secret name.
        name: String,
    },
    /// Every schedule with its next due time and last result.
    Status,
}

/// `tessera agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Register an agent; prints its token once.
    Create {
        /// Agent name, e.g. ci-bot.
        name: String,
        /// Secret pattern the agent may read (repeatable), e.g. 'openai/*'.
        #[arg(long, required = true)]
        allow: Vec<String>,
        /// Longest lease (and renewal), e.g. 15m.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        max_ttl: std::time::Duration,
        /// Longest total life of a lease across renewals [default: 24h]
        #[arg(long, value_parser = parse_duration)]
        max_lifetime: Option<std::time::Duration>,
        /// The token stops working after this long, e.g. 90d; leases issued
        /// with it end by then too [default: never]
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Accept the token only from processes of this Unix user (a uid or
        /// a user name) over the broker's Unix socket: a copied token is
        /// refused from any other user and over TCP [default: from anywhere]
        #[arg(long, value_name = "USER", value_parser = parse_uid)]
        uid: Option<u32>,
    },
    /// List agents.
    List,
    /// Revoke an agent's token and all its leases.
    Revoke {
        /// Agent name.
        name: String,
    },
}

/// `tessera get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Secret name.
    pub name: String,
    /// Lease lifetime (capped by the agent's maximum) [default: the agent's maximum]
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// Keep running: print the value again (one line each) whenever it is rotated.
    #[arg(long)]
    pub watch: bool,
}

/// `tessera lease …`.
#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// List active leases (all with --all).
    List {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Only leases on this secret.
        #[arg(long)]
        secret: Option<String>,
        /// Include expired and revoked leases.
        #[arg(long)]
        all: bool,
        /// At most this many (0: the most one call returns, 10,000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Revoke leases: one, an agent's, a secret's, or all.
    #[command(group(clap::ArgGroup::new("sel").required(true)))]
    Revoke {
        /// One lease.
        #[arg(long, group = "sel")]
        lease: Option<String>,
        /// Every lease of this agent.
        #[arg(long, group = "sel")]
        agent: Option<String>,
        /// Every lease on this secret.
        #[arg(long, group = "sel")]
        secret: Option<String>,
        /// Every active lease.
        #[arg(long, group = "sel")]
        all: bool,
    },
}

/// `tessera audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; exit 8 if it is broken.
    Verify {
        /// A signed checkpoint (from `audit checkpoint`) the trail must
        /// still reach; catches a store rolled back to an older copy.
        /// Repeatable.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// Sign the trail's head with the broker's key, to keep off the machine
    /// (run it from cron or a timer and ship the files elsewhere).
    Checkpoint {
        /// Write the checkpoint here instead of to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Write records as JSON lines (for a SIEM).
    Export {
        /// Only records at or after this time (RFC 3339, e.g. 2026-01-01T00:00:00Z).
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Only records from this sequence number on.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|_| {
        format!(
            "{s:?} is not a duration: write a number and a unit (s, m, h, d, w, M for months, \
             y), e.g. 30s, 15m, 1h or 7d"
        )
    })
}

/// A Unix uid, given as a number or as a user name of this machine.
fn parse_uid(s: &str) -> Result<u32, String> {
    if let Ok(uid) = s.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!(
            "there is no Unix user {s:?} on this machine; give a user name or a numeric uid"
        )),
        Err(e) => Err(format!(
            "cannot look up Unix user {s:?} ({e}); give a numeric uid"
        )),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match s.trim_start_matches('0') {
        "600" => Ok(0o600),
        "660" => Ok(0o660),
        _ => Err("use 600 (owner only) or 660 (owner and group)".into()),
    }
}

/// An RFC 3339 time: UTC (`Z`, or no zone), or with an offset such as
/// `+01:00`, which humantime does not read and is applied here.
fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.to_ascii_uppercase();
    let (base, offset) = split_offset(&s);
    humantime::parse_rfc3339_weak(base)
        .map_err(|e| {
            format!("{e}; write a time like 2026-01-01T00:00:00Z or 2026-01-01T01:00:00+01:00")
        })
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64 - offset)
                .map_err(|_| "times before 1970 are not accepted".to_string())
        })
}

/// Splits a trailing `+HH:MM` / `-HH:MM` off a time; returns the rest and
/// the offset in seconds (0 when there is none).
fn split_offset(s: &str) -> (&str, i64) {
    let b = s.as_bytes();
    let n = b.len();
    if n > 16 && matches!(b[n - 6], b'+' | b'-') && b[n - 3] == b':' {
        let num = |r: std::ops::Range<usize>| s[r].parse::<i64>().ok();
        if let (Some(h), Some(m)) = (num(n - 5..n - 3), num(n - 2..n))
            && h < 24
            && m < 60
        {
            let sign = if b[n - 6] == b'-' { -1 } else { 1 };
            return (&s[..n - 6], sign * (h * 3600 + m * 60));
        }
    }
    (s, 0)
}

/// Reports a command line that does not parse, and `--help`/`--version`.
/// With `--json` anywhere on the line, a usage error is one JSON document
/// on stderr, like every other failure; returns the exit code.
pub fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    // `--json` among tessera's own arguments (not a command's after `--`).
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit()
    }
    let doc = serde_json::json!({
        "error": { "exit": Exit::Usage as i32, "message": e.render().to_string().trim_end() }
    });
    errln!("{doc}");
    Exit::Usage as i32
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let json = cli.global.json;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the async runtime: {e}");
            return Exit::Failure as i32;
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(()) => match stdout_failure() {
            Some(e) => {
                errln!("error: cannot write stdout: {e}");
                Exit::Failure as i32
            }
            None => 0,
        },
        Err(e) => {
            if json {
                let doc = serde_json::json!({
                    "error": { "exit": e.exit as i32, "message": e.message }
                });
                errln!("{doc}");
            } else {
                errln!("error: {}", e.message);
            }
            e.exit as i32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_take_utc_or_an_offset() {
        let utc = parse_time("2026-12-01T00:00:00Z").expect("utc");
        assert_eq!(utc, 1_796_083_200);
        assert_eq!(parse_time("2026-12-01T01:00:00+01:00"), Ok(utc));
        assert_eq!(parse_time("2026-11-30T19:00:00-05:00"), Ok(utc));
        assert_eq!(parse_time("2026-12-01t00:00:00z"), Ok(utc));
        assert_eq!(parse_time("2026-12-01 00:00:00"), Ok(utc));
        assert!(parse_time("2026-12-01T00:00:00+25:00").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
