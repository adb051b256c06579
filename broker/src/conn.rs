//! Accepted connections, guarded: a cap on how many are open at once, a
//! deadline for a new one to start speaking, and accept errors (out of
//! file descriptors) that back off with one warning instead of spinning.
//! Without these, idle connections that never send a byte, which need no
//! token, would use up the broker's descriptors and lock everyone out.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

/// How long a new connection has to send its first bytes (the HTTP/2
/// preface, or a TLS ClientHello) before it is closed.
pub const GREETING_DEADLINE: Duration = Duration::from_secs(10);
/// The HTTP/2 client preface is 24 bytes; a ClientHello is longer.
const GREETING_BYTES: usize = 24;
/// How long accepting pauses after an error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning of each kind per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Descriptors kept for the store, the log and everything but connections.
const RESERVED_FDS: u64 = 128;
/// Connections at most, however many descriptors the process may open.
const MAX_CONNECTIONS: u64 = 10_000;

/// How many connections to accept at once: the soft limit on open files
/// less what the rest of the broker needs. (Not raised here: the rotation
/// commands the broker starts would inherit a raised limit.)
pub fn connection_limit() -> usize {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        return soft.saturating_sub(RESERVED_FDS).clamp(16, MAX_CONNECTIONS) as usize;
    }
    1024 - RESERVED_FDS as usize
}

/// A listener this module can accept from.
pub trait Accept: Unpin + Send + 'static {
    /// The accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Accepts the next connection.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// Logs `what` at most once per [`WARN_EVERY`], with how many were held back.
struct Throttled {
    last: Option<Instant>,
    held: u64,
}

impl Throttled {
    fn new() -> Self {
        Throttled {
            last: None,
            held: 0,
        }
    }

    fn warn(&mut self, what: &str, error: Option<&io::Error>) {
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            self.held += 1;
            return;
        }
        let also = std::mem::take(&mut self.held);
        match error {
            Some(e) => tracing::warn!(error = %e, also, "{what}"),
            None => tracing::warn!(also, "{what}"),
        }
        self.last = Some(Instant::now());
    }
}

/// The stream of accepted connections `serve_with_incoming` takes. It never
/// yields an error (tonic would only log it and ask again at once).
pub struct Incoming<L> {
    listener: L,
    permits: Arc<Semaphore>,
    limit: usize,
    source: &'static str,
    backoff: Option<Pin<Box<Sleep>>>,
    full: Throttled,
    failing: Throttled,
}

impl<L: Accept> Incoming<L> {
    /// Accepts from `listener` while `permits` (`limit` places, set by
    /// `source`) has one left.
    pub fn new(listener: L, permits: Arc<Semaphore>, limit: usize, source: &'static str) -> Self {
        Incoming {
            listener,
            permits,
            limit,
            source,
            backoff: None,
            full: Throttled::new(),
            failing: Throttled::new(),
        }
    }
}

impl<L: Accept> Stream for Incoming<L> {
    type Item = io::Result<Guarded<L::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = &mut this.backoff {
                ready!(b.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok(io) => match Arc::clone(&this.permits).try_acquire_owned() {
                    Ok(permit) => return Poll::Ready(Some(Ok(Guarded::new(io, Some(permit))))),
                    // Closed at once: the client learns it now, not after
                    // a timeout.
                    Err(_) => {
                        let (limit, source) = (this.limit, this.source);
                        this.full.warn(
                            &format!(
                                "{limit} connections are open on this listener, the most it \
                                 accepts ({source}); closing new ones"
                            ),
                            None,
                        );
                    }
                },
                Err(e) => {
                    this.failing
                        .warn("cannot accept a connection; pausing briefly", Some(&e));
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// An accepted connection: holds its place under the cap until it closes,
/// and fails its reads if it has not sent 24 bytes (an HTTP/2 preface) within
/// [`GREETING_DEADLINE`].
pub struct Guarded<T> {
    inner: T,
    _permit: Option<OwnedSemaphorePermit>,
    greeting: Option<(Pin<Box<Sleep>>, usize)>,
}

impl<T> Guarded<T> {
    fn new(inner: T, permit: Option<OwnedSemaphorePermit>) -> Self {
        Guarded {
            inner,
            _permit: permit,
            greeting: Some((Box::pin(tokio::time::sleep(GREETING_DEADLINE)), 0)),
        }
    }
}

impl<T: Connected> Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some((deadline, got)) = &mut this.greeting {
            match &r {
                Poll::Ready(Ok(())) => {
                    *got += buf.filled().len() - before;
                    if *got >= GREETING_BYTES {
                        this.greeting = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )));
                }
                _ => {}
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A TLS connection accepted by [`TlsIncoming`].
pub struct Tls<T>(tokio_rustls::server::TlsStream<T>);

impl<T: Connected> Connected for Tls<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// A connection over TLS: the TCP connection holds the place under the cap
/// and its greeting deadline covers the ClientHello; the handshake must end
/// within [`GREETING_DEADLINE`]; then the HTTP/2 preface, decrypted, has a
/// deadline of its own.
pub type TlsConn = Guarded<Tls<Guarded<tokio::net::TcpStream>>>;

/// Accepted TCP connections with their TLS handshakes done here, each on a
/// task of its own (one slow client holds up no other), under a deadline.
pub struct TlsIncoming {
    tcp: Incoming<tokio::net::TcpListener>,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: tokio::task::JoinSet<Option<TlsConn>>,
}

impl TlsIncoming {
    /// TLS with `acceptor` over the connections `tcp` accepts.
    pub fn new(
        tcp: Incoming<tokio::net::TcpListener>,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> Self {
        TlsIncoming {
            tcp,
            acceptor,
            handshakes: tokio::task::JoinSet::new(),
        }
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(Some(done)) = this.handshakes.poll_join_next(cx) {
                match done {
                    Ok(Some(conn)) => return Poll::Ready(Some(Ok(conn))),
                    // A failed or slow handshake: that client is gone.
                    _ => continue,
                }
            }
            match ready!(Pin::new(&mut this.tcp).poll_next(cx)) {
                Some(Ok(tcp)) => {
                    let acceptor = this.acceptor.clone();
                    this.handshakes.spawn(async move {
                        match tokio::time::timeout(GREETING_DEADLINE, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => Some(Guarded::new(Tls(tls), None)),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => None,
                        }
                    });
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }
}
