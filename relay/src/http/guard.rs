//! Connection guards for [`super::serve`] (security review, finding 12): a cap on open
//! connections, in all and per client address, and a deadline on a connection's first bytes.
//!
//! hyper-util's automatic HTTP/1 / HTTP/2 detection reads the first bytes of a connection
//! with no deadline of its own, so a client that connects and sends nothing, or a prefix of
//! the HTTP/2 preface, held its connection (and its task) forever; hyper's header-read
//! timeout starts only after the detection. [`FirstBytes`] fails the read once
//! [`ServeLimits::first_bytes_timeout`] has passed without [`FIRST_BYTES`] bytes (the length
//! of the HTTP/2 preface; any HTTP/1 request line with its first header is longer).
//!
//! The guard wraps the stream the server reads requests from: the decrypted one under TLS (the
//! TLS handshake has its own timeout, `axum-server`'s 10 s).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Bytes a connection must send within [`ServeLimits::first_bytes_timeout`]: the length of
/// the HTTP/2 client preface.
pub const FIRST_BYTES: usize = 24;

/// The limits [`super::serve`] enforces on every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// How long a client may take to send a request's headers (HTTP/1).
    pub header_read_timeout: Duration,
    /// How long a new connection may take to send its first [`FIRST_BYTES`] bytes.
    pub first_bytes_timeout: Duration,
    /// Open connections, in all; more are closed as soon as they are accepted.
    pub connections_max: usize,
    /// Open connections per client address (an IPv4 address, or an IPv6 /64); loopback
    /// addresses are exempt (a reverse proxy on the same host).
    pub connections_per_address_max: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: super::HEADER_READ_TIMEOUT,
            first_bytes_timeout: super::HEADER_READ_TIMEOUT,
            connections_max: 4096,
            connections_per_address_max: 64,
        }
    }
}

/// The address a connection counts against: the IPv4 address, or the IPv6 /64 (one host
/// gets a whole /64).
pub(super) fn source(addr: &SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
pub(super) struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Accepts a connection only within the caps, and puts the deadline on its first bytes.
#[derive(Clone, Debug)]
pub struct Guard<A> {
    inner: A,
    limits: ServeLimits,
    counts: Arc<Mutex<Counts>>,
}

impl<A> Guard<A> {
    /// Guards what `inner` accepts (`DefaultAcceptor`, or a TLS acceptor).
    pub fn new(inner: A, limits: ServeLimits) -> Guard<A> {
        Guard {
            inner,
            limits,
            counts: Arc::default(),
        }
    }
}

fn lock(m: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's place under the caps, given back when the connection is dropped.
#[derive(Debug)]
pub(super) struct Slot {
    counts: Arc<Mutex<Counts>>,
    source: IpAddr,
}

impl Slot {
    pub(super) fn take(
        counts: &Arc<Mutex<Counts>>,
        source: IpAddr,
        limits: &ServeLimits,
    ) -> Option<Slot> {
        let mut c = lock(counts);
        let mine = c.per_source.get(&source).copied().unwrap_or(0);
        // Loopback is exempt from the per-address cap: behind a reverse proxy on the same
        // host every client comes from there (the total cap still holds).
        let capped = !source.is_loopback() && mine >= limits.connections_per_address_max;
        if c.total >= limits.connections_max || capped {
            return None;
        }
        c.total += 1;
        c.per_source.insert(source, mine + 1);
        Some(Slot {
            counts: counts.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

impl<A, S> Accept<TcpStream, S> for Guard<A>
where
    A: Accept<TcpStream, S> + Clone + Send + Sync + 'static,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
    S: Send + 'static,
{
    type Stream = FirstBytes<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let slot = stream
            .peer_addr()
            .ok()
            .and_then(|a| Slot::take(&self.counts, source(&a), &self.limits));
        let Some(slot) = slot else {
            // Dropping the stream closes it.
            return Box::pin(std::future::ready(Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection cap reached",
            ))));
        };
        let inner = self.inner.accept(stream, service);
        let timeout = self.limits.first_bytes_timeout;
        Box::pin(async move {
            let (stream, service) = inner.await?;
            Ok((FirstBytes::new(stream, timeout, slot), service))
        })
    }
}

/// A stream whose reads fail once its deadline passed before [`FIRST_BYTES`] bytes came; it
/// also holds the connection's place under the caps.
#[derive(Debug)]
pub struct FirstBytes<S> {
    inner: S,
    deadline: Option<Pin<Box<Sleep>>>,
    left: usize,
    _slot: Slot,
}

impl<S> FirstBytes<S> {
    fn new(inner: S, timeout: Duration, slot: Slot) -> FirstBytes<S> {
        FirstBytes {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            left: FIRST_BYTES,
            _slot: slot,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let Poll::Ready(Ok(())) = read {
                this.left = this.left.saturating_sub(buf.filled().len() - before);
                if this.left == 0 {
                    this.deadline = None;
                }
                return read;
            }
            // Polled (and so woken) at the deadline while waiting for the first bytes.
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the first-bytes timeout",
                )));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
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
