//! Connecting to a broker and turning its answers into exit codes and
//! sentences.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_broker::proto::{
    admin_client::AdminClient, broker_client::BrokerClient, envelope_client::EnvelopeClient,
    holders_client::HoldersClient, retention_client::RetentionClient,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// Documented exit codes (README "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: anything not listed below.
    Failure = 1,
    /// 2: the command line was wrong (clap prints usage).
    Usage = 2,
    /// 3: the named secret, agent or lease does not exist.
    NotFound = 3,
    /// 4: bad, revoked or missing credential, or policy said no.
    Denied = 4,
    /// 5: the request conflicts with the broker's state (sealed, expired,
    /// revoked, already exists, wrong passphrase, keychain missing).
    Precondition = 5,
    /// 6: the broker is not reachable or could not store the request.
    Unavailable = 6,
    /// 7: an argument is invalid (names the field).
    InvalidArgument = 7,
    /// 8: the audit trail failed verification.
    AuditBroken = 8,
    /// 9: stored data failed authentication (tampered database).
    DataLoss = 9,
}

/// A failure to report: a sentence for a person and an exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub exit: Exit,
    /// What went wrong and what to do.
    pub message: String,
}

impl CliError {
    /// A failure with `exit`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError {
            exit,
            message: message.into(),
        }
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        // Failures below gRPC (a TLS port spoken to in plain text, a broker
        // that went away mid-call) arrive as statuses whose text is the
        // transport's, which tells a person nothing: say what to check.
        let m = s.message();
        // (Only codes a transport failure arrives as: an INVALID_ARGUMENT
        // such as a bad --tls-cert may quote a transport error too.)
        let below_grpc = matches!(
            s.code(),
            Code::Unknown | Code::Internal | Code::Unavailable | Code::Cancelled
        ) && (m.starts_with("h2 protocol error")
            || m.contains("transport error")
            // (A reconnect to a broker that went away: the socket's own
            // "Connection refused (os error 111)".)
            || m.starts_with("Connection refused")
            || m.starts_with("Connection reset")
            || (s.code() == Code::Cancelled && m.contains("operation was canceled")));
        if below_grpc {
            return CliError::new(
                Exit::Unavailable,
                format!(
                    "the connection to the broker failed below gRPC ({m}); check that --addr / \
                     TESSERA_ADDR points at a running broker, with https:// and --tls-ca if it \
                     serves TLS"
                ),
            );
        }
        let exit = match s.code() {
            Code::NotFound => Exit::NotFound,
            Code::Unauthenticated | Code::PermissionDenied => Exit::Denied,
            Code::FailedPrecondition | Code::AlreadyExists => Exit::Precondition,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Exit::Unavailable,
            Code::InvalidArgument | Code::OutOfRange => Exit::InvalidArgument,
            Code::DataLoss => Exit::DataLoss,
            _ => Exit::Failure,
        };
        CliError::new(exit, format!("{m} ({:?})", s.code()))
    }
}

impl From<tessera_broker::Error> for CliError {
    fn from(e: tessera_broker::Error) -> Self {
        match e {
            // A file or socket of this process (a directory it cannot
            // create, an address in use): not an unreachable broker.
            tessera_broker::Error::Io(m) => CliError::new(Exit::Failure, m),
            e => CliError::from(Status::from(e)),
        }
    }
}

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct Target {
    /// `unix:///path`, a socket path, `http://127.0.0.1:PORT` or `https://HOST:PORT`.
    pub addr: String,
    /// CA certificate for `https://`.
    pub tls_ca: Option<PathBuf>,
}

impl Target {
    /// The default: the socket in the data directory.
    pub fn socket(path: &Path) -> Self {
        Target {
            addr: format!("unix://{}", path.display()),
            tls_ca: None,
        }
    }

    /// Opens a channel (lazily: the first call connects).
    pub async fn channel(&self) -> Result<Channel, CliError> {
        let addr = if self.addr.starts_with('/') {
            format!("unix://{}", self.addr)
        } else {
            self.addr.clone()
        };
        let bad = |e: &dyn std::fmt::Display| {
            CliError::new(
                Exit::InvalidArgument,
                format!(
                    "invalid --addr {addr:?} ({e}): use unix:///path/to/tessera.sock, \
                     http://127.0.0.1:PORT or https://HOST:PORT"
                ),
            )
        };
        if !["unix://", "http://", "https://"]
            .iter()
            .any(|scheme| addr.starts_with(scheme))
        {
            return Err(bad(&"unsupported scheme"));
        }
        let mut ep = Endpoint::from_shared(addr.clone()).map_err(|e| bad(&e))?;
        // Tokens go in a header: never in the clear past this machine (the
        // broker itself refuses plain TCP on other addresses).
        if addr.starts_with("http://") {
            let host = ep.uri().host().unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(CliError::new(
                    Exit::InvalidArgument,
                    format!(
                        "invalid --addr {addr:?}: http:// would send the token in the clear to \
                         another machine; use https://{host}:PORT (the broker with \
                         --tls-cert/--tls-key, this side with --tls-ca), or a loopback \
                         address"
                    ),
                ));
            }
        }
        // Keepalive pings notice a broker that vanished without closing the
        // connection (a long watch, `tessera run`).
        ep = ep
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if addr.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                let pem = std::fs::read(ca).map_err(|e| {
                    CliError::new(
                        Exit::InvalidArgument,
                        format!("cannot read --tls-ca {}: {e}", ca.display()),
                    )
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(|e| bad(&e))?;
        }
        ep.connect().await.map_err(|e| {
            CliError::new(
                Exit::Unavailable,
                format!(
                    "the broker at {addr} is not reachable ({e}); is `tessera serve` running, \
                     and does --addr / TESSERA_ADDR point at it? (A broker at its connection \
                     limit closes new connections too: its log says so.){}",
                    if addr.starts_with("https://") {
                        " Over https:// the TLS handshake may have failed instead: the broker \
                         needs --tls-cert/--tls-key, and --tls-ca the CA that signed its \
                         certificate (a leaf certificate, CA:FALSE, naming the host in \
                         --addr; a self-signed CA certificate is refused as a server \
                         certificate). Use http:// for a broker without TLS."
                    } else {
                        ""
                    }
                ),
            )
        })
    }

    /// An admin client.
    pub async fn admin(&self) -> Result<AdminClient<Channel>, CliError> {
        Ok(AdminClient::new(self.channel().await?))
    }

    /// A retention-admin client.
    pub async fn retention(&self) -> Result<RetentionClient<Channel>, CliError> {
        Ok(RetentionClient::new(self.channel().await?))
    }

    /// A key-holder client.
    pub async fn holders(&self) -> Result<HoldersClient<Channel>, CliError> {
        Ok(HoldersClient::new(self.channel().await?))
    }

    /// An envelope-encryption client (agents).
    pub async fn envelope(&self) -> Result<EnvelopeClient<Channel>, CliError> {
        Ok(EnvelopeClient::new(self.channel().await?))
    }

    /// An agent client.
    pub async fn broker(&self) -> Result<BrokerClient<Channel>, CliError> {
        Ok(BrokerClient::new(self.channel().await?))
    }
}

/// `msg` with `authorization: Bearer token`.
pub fn authed<T>(msg: T, token: &str) -> Result<Request<T>, CliError> {
    let mut req = Request::new(msg);
    let printable = token.bytes().all(|b| b.is_ascii_graphic());
    let v = Some(format!("Bearer {token}"))
        .filter(|_| printable)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            CliError::new(
                Exit::InvalidArgument,
                "the token contains characters that cannot be sent; check TESSERA_TOKEN / \
             TESSERA_ADMIN_TOKEN",
            )
        })?;
    req.metadata_mut().insert("authorization", v);
    Ok(req)
}
