//! `tessera serve`: the broker on a Unix socket (default) and, on request,
//! TCP (loopback, or any address with TLS); health and reflection services;
//! a sweeper for expired leases; SIGTERM/SIGINT drain in-flight requests.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tonic::codegen::http::Response;
use tonic::transport::Server;

use crate::conn;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::proto::{
    admin_server::AdminServer, broker_server::BrokerServer, envelope_server::EnvelopeServer,
    holders_server::HoldersServer, retention_server::RetentionServer,
};
use crate::service::Services;

/// Largest gRPC message accepted (a secret value is far smaller; this only
/// bounds what a caller can make the broker buffer).
const MAX_MESSAGE: usize = 1024 * 1024;

/// tonic answers a request body it cannot decode (not this method's
/// protobuf message, or a string field that is not UTF-8) with INTERNAL;
/// the fault is the caller's input, so it becomes INVALID_ARGUMENT with a
/// sentence that says so.
fn undecodable_is_invalid<B>(mut res: Response<B>) -> Response<B> {
    let h = res.headers();
    let undecodable = h.get("grpc-status").is_some_and(|v| v == "13")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode")
            });
    if undecodable {
        let status = tonic::Status::invalid_argument(
            "the request could not be decoded as this method's message (a field of the wrong \
             type, a text field that is not UTF-8, or another method's message); check the \
             client against tessera's .proto files",
        );
        let _ = status.add_header(res.headers_mut());
    }
    res
}

/// The largest `--max-value-size`: a value and its request's other fields
/// must fit in one message.
pub const MAX_VALUE_SIZE: usize = MAX_MESSAGE - 64 * 1024;

/// Checks the configured value size limit before anything is opened.
pub fn check_limits(limits: &crate::broker::Limits) -> Result<()> {
    if limits.max_value_size == 0 || limits.max_value_size > MAX_VALUE_SIZE {
        return Err(Error::invalid(
            "max_value_size",
            format!(
                "--max-value-size must be between 1 and {MAX_VALUE_SIZE} bytes (got {}): a larger \
                 value would not fit in one gRPC message",
                limits.max_value_size
            ),
        ));
    }
    Ok(())
}

/// How `serve` listens.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// The Unix socket path.
    pub socket: PathBuf,
    /// Its mode (0600 or 0660).
    pub socket_mode: u32,
    /// An optional TCP address.
    pub tcp: Option<SocketAddr>,
    /// PEM certificate chain and key for TCP (required off loopback).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How often expired leases are swept.
    pub sweep_interval: Duration,
    /// How long ended leases stay listed before they are deleted (their
    /// audit records stay); zero keeps them forever.
    pub lease_history: Duration,
    /// Whether this broker runs scheduled rotations itself.
    pub scheduler: bool,
    /// Connections open at once, at most (Unix socket and TCP together);
    /// `None`: as many as the limit on open files allows.
    pub max_connections: Option<usize>,
}

/// Checks the listen options before anything is opened.
pub fn check_listen(opts: &ListenOptions) -> Result<()> {
    if let Some(addr) = opts.tcp
        && !addr.ip().is_loopback()
        && opts.tls.is_none()
    {
        return Err(Error::invalid(
            "listen",
            format!(
                "{addr} is not a loopback address: serving secrets over plain TCP off this \
                     machine is refused; pass --tls-cert and --tls-key, or listen on 127.0.0.1"
            ),
        ));
    }
    if opts.socket_mode & !0o660 != 0 {
        return Err(Error::invalid(
            "socket_mode",
            "the socket may be readable by its owner and group only (0600 or 0660)",
        ));
    }
    // Scheduled rotations and ceremony deadlines ride on the sweep too: an
    // interval over an hour would put them off.
    if opts.sweep_interval.is_zero() || opts.sweep_interval > Duration::from_secs(3600) {
        return Err(Error::invalid(
            "sweep_interval",
            "--sweep-interval must be longer than zero and at most 1h, e.g. 1s",
        ));
    }
    Ok(())
}

/// How long a shutdown waits for open requests before stopping anyway.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Concurrent streams (calls, watches) one connection may have open: h2
/// would otherwise allow any number, each holding memory.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// A server with the limits every listener shares: streams per
/// connection, and keepalive pings that close a connection whose peer has
/// gone (or does not answer).
fn builder() -> Server {
    Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// A broker being served: lets the caller stop it and learn where it is.
pub struct Running {
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<()>>,
    /// The TCP address actually bound (useful with port 0).
    pub tcp_addr: Option<SocketAddr>,
}

impl Running {
    /// Asks the servers to stop; in-flight requests finish first.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits until the servers have stopped and the store is flushed.
    pub async fn wait(self) -> Result<()> {
        self.done
            .await
            .map_err(|e| Error::Internal(format!("the server task failed: {e}")))?
    }
}

/// Starts serving the broker behind `gate` (sealed or not). Returns once
/// the listeners are bound.
pub async fn start(gate: Arc<Gate>, opts: ListenOptions) -> Result<Running> {
    check_listen(&opts)?;
    // Everything that can fail comes before the Unix socket is bound, so a
    // broker that cannot start leaves no socket behind.
    let tcp = match opts.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Io(format!("cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let tls = match &opts.tls {
        Some((cert, key)) if tcp.is_some() => Some(load_tls(cert, key)?),
        _ => None,
    };
    // Calls under way, so that a shutdown waits for them and not for
    // connections that merely stay open.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&in_flight);
    let tcp_builder = tcp.as_ref().map(|_| {
        builder()
            .layer(tower::util::MapResponseLayer::new(undecodable_is_invalid))
            .layer(tower::util::MapFutureLayer::new(move |f| {
                counted(Arc::clone(&counter), f)
            }))
    });

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServer<Services>>()
        .await;
    health_reporter.set_serving::<AdminServer<Services>>().await;
    health_reporter
        .set_serving::<RetentionServer<Services>>()
        .await;
    health_reporter
        .set_serving::<HoldersServer<Services>>()
        .await;
    health_reporter
        .set_serving::<EnvelopeServer<Services>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let services = Services::new(Arc::clone(&gate));
    let broker_svc = BrokerServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE);
    let retention_svc =
        RetentionServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE);
    let holders_svc = HoldersServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE);
    let envelope_svc = EnvelopeServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE);
    let admin_svc = AdminServer::new(services).max_decoding_message_size(MAX_MESSAGE);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let mut tasks = Vec::new();
    let counter = Arc::clone(&in_flight);
    let router = builder()
        .layer(tower::util::MapResponseLayer::new(undecodable_is_invalid))
        .layer(tower::util::MapFutureLayer::new(move |f| {
            counted(Arc::clone(&counter), f)
        }))
        .add_service(health.clone())
        .add_service(reflection_v1.clone())
        .add_service(reflection_v1alpha.clone())
        .add_service(broker_svc.clone())
        .add_service(admin_svc.clone())
        .add_service(retention_svc.clone())
        .add_service(holders_svc.clone())
        .add_service(envelope_svc.clone());
    // A cap per listener: the Unix socket (owner or group only) keeps its
    // own places, and its descriptors, whatever anyone does over TCP.
    let fds = conn::connection_limit();
    let each = if tcp.is_some() { (fds / 2).max(1) } else { fds };
    let (limit, source) = match opts.max_connections {
        Some(n) if n <= each => (n.max(1), "--max-connections"),
        asked => {
            if let Some(n) = asked {
                tracing::info!(
                    asked = n,
                    limit = each,
                    "--max-connections is more than the open-file limit allows; using the limit"
                );
            }
            (
                each,
                "from the limit on open files, less 128, shared by the listeners; raise \
                 LimitNOFILE or ulimit -n if they are legitimate",
            )
        }
    };
    tracing::debug!(limit, "connections accepted at most, per listener");
    let uds = bind_socket(&opts.socket, opts.socket_mode)?;
    let uds_stream = conn::Incoming::new(
        uds,
        Arc::new(tokio::sync::Semaphore::new(limit)),
        limit,
        source,
    );
    let rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(uds_stream, signal(rx))
            .await
    }));
    if let (Some(listener), Some(mut builder)) = (tcp, tcp_builder) {
        let router = builder
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(broker_svc)
            .add_service(admin_svc)
            .add_service(retention_svc)
            .add_service(holders_svc)
            .add_service(envelope_svc);
        let rx = shutdown_rx.clone();
        let permits = Arc::new(tokio::sync::Semaphore::new(limit));
        let incoming = conn::Incoming::new(listener, permits, limit, source);
        tasks.push(tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    router
                        .serve_with_incoming_shutdown(
                            conn::TlsIncoming::new(incoming, acceptor),
                            signal(rx),
                        )
                        .await
                }
                None => {
                    router
                        .serve_with_incoming_shutdown(incoming, signal(rx))
                        .await
                }
            }
        }));
    }

    // A shutdown ends open watches, or the drain would wait on them forever.
    // Sealed at that moment, the broker may still be unsealed by a request
    // the drain lets finish: its watches are ended as soon as it exists.
    let watch_gate = Arc::clone(&gate);
    let mut watch_rx = shutdown_rx.clone();
    tokio::spawn(async move {
        if watch_rx.wait_for(|stop| *stop).await.is_err() {
            return;
        }
        let until = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while tokio::time::Instant::now() < until {
            if let Some(b) = watch_gate.broker() {
                b.stop_watches();
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });

    let sweeper_gate = Arc::clone(&gate);
    let mut sweep_rx = shutdown_rx.clone();
    let sweep_every = opts.sweep_interval;
    let lease_history = opts.lease_history;
    let scheduler = opts.scheduler;
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Nothing to sweep while sealed.
                    let Some(sweeper_broker) = sweeper_gate.broker() else { continue };
                    match sweeper_broker.sweep_expired().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(expired = n, "swept expired leases"),
                        Err(e) => tracing::warn!(error = %e, "lease sweep failed; will retry"),
                    }
                    if !lease_history.is_zero() {
                        match sweeper_broker.purge_ended(lease_history).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "deleted old ended leases"),
                            Err(e) => tracing::warn!(error = %e, "lease purge failed; will retry"),
                        }
                        match sweeper_broker.purge_events(lease_history).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "deleted old watch events"),
                            Err(e) => tracing::warn!(error = %e, "event purge failed; will retry"),
                        }
                    }
                    if let Err(e) = sweeper_broker.flush_denials(false).await {
                        tracing::warn!(error = %e, "could not record refused calls; will retry");
                    }
                    if let Err(e) = sweeper_broker.retention_tick().await {
                        tracing::warn!(error = %e, "retention work failed; will retry");
                    }
                    if let Err(e) = sweeper_broker.rotation_tick().await {
                        tracing::warn!(error = %e, "rotation work failed; will retry");
                    }
                }
                _ = sweep_rx.changed() => break,
            }
        }
    });
    let scheduler_gate = Arc::clone(&gate);
    let mut scheduler_rx = shutdown_rx.clone();
    let scheduler = scheduler.then(|| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let Some(b) = scheduler_gate.broker() else { continue };
                        if let Err(e) = b.scheduler_tick().await {
                            tracing::warn!(error = %e, "scheduled rotations failed; will retry");
                        }
                    }
                    _ = scheduler_rx.changed() => break,
                }
            }
        })
    });

    let socket = opts.socket.clone();
    let mut stop_rx = shutdown_rx.clone();
    let done = tokio::spawn(async move {
        let servers = async {
            let mut first_err = None;
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => first_err = first_err.or(Some(Error::Io(format!("server: {e}")))),
                    Err(e) => {
                        first_err = first_err.or(Some(Error::Internal(format!("server: {e}"))))
                    }
                }
            }
            first_err
        };
        // A client that never finishes its request must not hold the
        // shutdown open for ever.
        let mut settle_rx = stop_rx.clone();
        let deadline = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(DRAIN_DEADLINE).await;
        };
        // Nor one that keeps a connection open with no call under way
        // (silent, or not answering the closing handshake).
        let settled = async {
            let _ = settle_rx.wait_for(|stop| *stop).await;
            let mut quiet = 0;
            while quiet < 5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                quiet = if in_flight.load(Ordering::SeqCst) == 0 {
                    quiet + 1
                } else {
                    0
                };
            }
        };
        let first_err = tokio::select! {
            e = servers => e,
            () = settled => None,
            () = deadline => {
                tracing::warn!(
                    seconds = DRAIN_DEADLINE.as_secs(),
                    "calls still under way at the drain deadline; no longer waiting for them \
                     (a rotation under way still finishes)"
                );
                None
            }
        };
        let _ = sweeper.await;
        // The rotation under way, if any, finishes (or times out) first;
        // the scheduler starts no other once stopping.
        if let Some(scheduler) = scheduler {
            let _ = scheduler.await;
        }
        let flushed = match gate.broker() {
            Some(b) => {
                // A rotation whose client went away still stores its
                // output (its command has run) before the store closes.
                if tokio::time::timeout(DRAIN_DEADLINE, b.detached_done())
                    .await
                    .is_err()
                {
                    tracing::warn!("a rotation was still running at the drain deadline");
                }
                if let Err(e) = b.flush_denials(true).await {
                    tracing::warn!(error = %e, "could not record the last refused calls");
                }
                b.flush().await
            }
            None => Ok(()),
        };
        let _ = std::fs::remove_file(&socket);
        match first_err {
            Some(e) => Err(e),
            None => flushed,
        }
    });
    Ok(Running {
        shutdown: shutdown_tx,
        done,
        tcp_addr,
    })
}

/// `call`, counted in `in_flight` while it runs (dropped or not).
fn counted<F: std::future::Future>(
    in_flight: Arc<AtomicUsize>,
    call: F,
) -> impl std::future::Future<Output = F::Output> {
    struct Running(Arc<AtomicUsize>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    in_flight.fetch_add(1, Ordering::SeqCst);
    let running = Running(in_flight);
    async move {
        let out = call.await;
        drop(running);
        out
    }
}

/// Binds the Unix socket, replacing a stale one but never a live one, and
/// never anything that is not a socket.
fn bind_socket(path: &Path, mode: u32) -> Result<tokio::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(Error::invalid(
                "socket",
                format!(
                    "{} exists and is not a socket; tessera never replaces it: give --socket \
                     a path that is free",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::FailedPrecondition(format!(
                "another broker is already listening on {}; stop it first, or give this one \
                 another --socket",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            Error::Io(format!(
                "cannot remove stale socket {}: {e}",
                path.display()
            ))
        })?;
    }
    if let Some(dir) = path.parent() {
        // Made for the socket: searchable by the group only when the
        // socket is shared with it (mode 660).
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if mode & 0o070 != 0 { 0o750 } else { 0o700 })
            .create(dir)?;
    }
    // Created owner-only, then widened to `mode`: a socket outside the
    // private data directory is never open to others, not even briefly.
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(umask);
    let listener =
        bound.map_err(|e| Error::Io(format!("cannot listen on {}: {e}", path.display())))?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(listener)
}

fn load_tls(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &Path, field: &'static str| {
        std::fs::read(p)
            .map_err(|e| Error::invalid(field, format!("cannot read {}: {e}", p.display())))
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert, "tls_cert")?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Error::invalid(
                "tls_cert",
                format!("{} holds no PEM certificate", cert.display()),
            )
        })?;
    let key_pem = zeroize::Zeroizing::new(read(key, "tls_key")?);
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        Error::invalid(
            "tls_key",
            format!(
                "{} holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)",
                key.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => Error::invalid(
                "tls_key",
                format!(
                    "{} is not the private key of the first certificate in {}",
                    key.display(),
                    cert.display()
                ),
            ),
            e => Error::invalid("tls_cert", format!("TLS setup failed: {e}")),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can still be stopped by SIGKILL; wait forever.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
