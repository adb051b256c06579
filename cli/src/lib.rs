//! The `tessera` command. `serve` runs the broker, `init` creates a store,
//! `demo` walks through the main job on a temporary store; every other
//! subcommand is a gRPC client of a running broker.

#![forbid(unsafe_code)]

pub mod client;
mod commands;
pub mod demo;

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
    /// List and revoke leases (admin).
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Verify and export the audit trail (admin).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Show the broker's state (admin).
    Status,
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
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --listen.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
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
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    pub log_format: LogFormat,
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
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Revoke leases: one, an agent's, a secret's, or all.
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
    Verify,
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
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration like 30s, 15m, 1h or 7d"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match s.trim_start_matches('0') {
        "600" => Ok(0o600),
        "660" => Ok(0o660),
        _ => Err("use 600 (owner only) or 660 (owner and group)".into()),
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{e}; write a time like 2026-01-01T00:00:00Z"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .map_err(|_| "times before 1970 are not accepted".to_string())
        })
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
            eprintln!("error: cannot start the async runtime: {e}");
            return Exit::Failure as i32;
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(()) => 0,
        Err(e) => {
            if json {
                let doc = serde_json::json!({
                    "error": { "exit": e.exit as i32, "message": e.message }
                });
                eprintln!("{doc}");
            } else {
                eprintln!("error: {}", e.message);
            }
            e.exit as i32
        }
    }
}
