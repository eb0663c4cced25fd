//! The HTTP side of a mesh node: `GET /v1/directory` and `GET /v1/consensus` (every node),
//! `POST /v1/packets` (edge relays), and the relay binary's `/metrics` and `/healthz`; plus
//! [`serve`], which every node kind uses to serve its API over plain HTTP (loopback) or TLS
//! (rustls).
//!
//! `POST /v1/packets` takes `application/octet-stream`: 1 to `batch_max` packets of exactly
//! `PACKET_SIZE` bytes, back to back. Each is rate limited with the connection's limit (one
//! [`ClientId`] per TCP connection). The answer is JSON: `{"accepted": n, "results": [..]}`,
//! one entry per packet, `"ok"` or the refusal's label (`replay`, `rate_limited`, …). Status
//! 200 when every packet was accepted or refused for its own content; 429 with
//! `Retry-After` when the connection is over its limit; 400 for a body that is not a whole
//! number of packets; 413 for too many.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use whispr_protocol::sphinx::PACKET_SIZE;

use crate::mesh::MeshHandle;
use crate::router::{ClientId, DropReason};

mod guard;

pub use guard::{FIRST_BYTES, ServeLimits};

#[derive(Clone)]
struct MeshState {
    mesh: MeshHandle,
    batch_max: usize,
    hasher: Arc<std::collections::hash_map::RandomState>,
    loopback_per_connection: bool,
}

/// The rate budget a `POST /v1/packets` from `peer` is charged to: its source address (an IPv4
/// address or an IPv6 /64), so that opening new connections buys no new budget (security
/// review findings 4 and 15); loopback clients per connection when `loopback_per_connection`
/// (a reverse proxy or a devnet on the host makes every client a loopback client). The
/// address is hashed with a per-process key and never stored or logged.
fn client_of(
    hasher: &std::collections::hash_map::RandomState,
    peer: &SocketAddr,
    loopback_per_connection: bool,
) -> ClientId {
    let mut h = hasher.build_hasher();
    let source = guard::source(peer);
    if source.is_loopback() && loopback_per_connection {
        h.write(peer.to_string().as_bytes());
    } else {
        h.write(source.to_string().as_bytes());
    }
    ClientId(h.finish())
}

/// The routes every mesh node serves: `GET /v1/directory` (the gossiped descriptors),
/// `GET /v1/consensus` (the verified consensus, with a pinned network), and
/// `POST /v1/packets` when `packets_batch_max` is set (edge relays).
pub fn mesh_routes(mesh: MeshHandle, packets_batch_max: Option<usize>) -> axum::Router {
    mesh_routes_with(mesh, packets_batch_max, true)
}

/// [`mesh_routes`], with loopback clients of `POST /v1/packets` charged per connection or per
/// address (`[http] loopback_per_connection`; see [`client_of`]).
pub fn mesh_routes_with(
    mesh: MeshHandle,
    packets_batch_max: Option<usize>,
    loopback_per_connection: bool,
) -> axum::Router {
    let state = MeshState {
        mesh,
        batch_max: packets_batch_max.unwrap_or(0),
        hasher: Arc::new(std::collections::hash_map::RandomState::new()),
        loopback_per_connection,
    };
    let mut router = axum::Router::new()
        .route("/v1/directory", get(directory))
        .route("/v1/consensus", get(consensus));
    if packets_batch_max.is_some() {
        router = router.route(
            "/v1/packets",
            post(packets).layer(DefaultBodyLimit::max(
                state.batch_max.saturating_mul(PACKET_SIZE).max(PACKET_SIZE),
            )),
        );
    }
    router.with_state(state)
}

/// The relay binary's API: [`mesh_routes`] plus `/healthz`, and `/metrics` when
/// `http.metrics_on_api()` (see [`crate::config::HttpConfig`]).
pub fn relay_routes(
    mesh: MeshHandle,
    packets_batch_max: Option<usize>,
    http: &crate::config::HttpConfig,
) -> axum::Router {
    let routes = mesh_routes_with(
        mesh.clone(),
        packets_batch_max,
        http.loopback_per_connection,
    );
    if http.metrics_on_api() {
        routes.merge(metrics_routes(mesh, http))
    } else {
        routes.merge(
            axum::Router::new()
                .route("/healthz", get(healthz))
                .with_state(OpsState {
                    mesh,
                    snapshot: Arc::new(MetricsSnapshot::new(Duration::ZERO)),
                }),
        )
    }
}

/// `/metrics` (a snapshot at most `metrics_interval_ms` old) and `/healthz`: on the API
/// listener of a loopback relay, or on `metrics_listen`.
pub fn metrics_routes(mesh: MeshHandle, http: &crate::config::HttpConfig) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(OpsState {
            mesh,
            snapshot: Arc::new(MetricsSnapshot::new(Duration::from_millis(
                http.metrics_interval_ms,
            ))),
        })
}

#[derive(Clone)]
struct OpsState {
    mesh: MeshHandle,
    snapshot: Arc<MetricsSnapshot>,
}

/// Metrics published at most once per interval: every scrape within an interval gets the
/// same text, so the difference between two scrapes covers at least one interval's traffic
/// and never times one packet (a mixing delay, a deposit). A zero interval publishes live.
#[derive(Debug)]
pub struct MetricsSnapshot {
    interval: Duration,
    taken: std::sync::Mutex<Option<(std::time::Instant, Arc<str>)>>,
}

impl MetricsSnapshot {
    /// Snapshots refreshed at most every `interval`.
    pub fn new(interval: Duration) -> MetricsSnapshot {
        MetricsSnapshot {
            interval,
            taken: std::sync::Mutex::new(None),
        }
    }

    /// The published text at `now`: the last snapshot while it is younger than the
    /// interval, otherwise a new one from `render`.
    pub fn get(&self, now: std::time::Instant, render: impl FnOnce() -> String) -> Arc<str> {
        if self.interval.is_zero() {
            return render().into();
        }
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        match &*taken {
            Some((at, text)) if now.saturating_duration_since(*at) < self.interval => text.clone(),
            _ => {
                let text: Arc<str> = render().into();
                *taken = Some((now, text.clone()));
                text
            }
        }
    }
}

async fn directory(State(state): State<MeshState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        state.mesh.directory_bytes(),
    )
        .into_response()
}

/// The consensus this node routes by (a mirror of the authorities'), verified when fetched;
/// 404 without a pinned network or before the first one.
async fn consensus(State(state): State<MeshState>) -> Response {
    match state.mesh.consensus_bytes() {
        Some(bytes) => ([(header::CONTENT_TYPE, "application/x-protobuf")], bytes).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no_consensus",
            "this node has no verified consensus (no network file, or none fetched yet)",
        ),
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": kind, "message": message })),
    )
        .into_response()
}

async fn packets(
    State(state): State<MeshState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let octets = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/octet-stream"));
    if !octets {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/octet-stream",
        );
    }
    if body.is_empty() || !body.len().is_multiple_of(PACKET_SIZE) {
        return error(
            StatusCode::BAD_REQUEST,
            "wrong_size",
            "the body must be a whole number of packets",
        );
    }
    if body.len() / PACKET_SIZE > state.batch_max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            "too many packets in one request",
        );
    }
    let client = client_of(&state.hasher, &peer, state.loopback_per_connection);
    let mut accepted = 0usize;
    let mut limited = false;
    let mut results = Vec::with_capacity(body.len() / PACKET_SIZE);
    for chunk in body.chunks(PACKET_SIZE) {
        match state.mesh.submit_client(client, chunk.to_vec()).await {
            Ok(()) => {
                accepted += 1;
                results.push("ok");
            }
            Err(reason) => {
                limited |= reason == DropReason::RateLimited;
                results.push(reason.label());
            }
        }
    }
    let body = Json(serde_json::json!({ "accepted": accepted, "results": results }));
    if limited {
        let mut response = (StatusCode::TOO_MANY_REQUESTS, body).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    } else {
        body.into_response()
    }
}

async fn metrics(State(ops): State<OpsState>) -> Response {
    let text = ops
        .snapshot
        .get(std::time::Instant::now(), || ops.mesh.metrics_text());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text.to_string(),
    )
        .into_response()
}

async fn healthz(State(ops): State<OpsState>) -> Response {
    if ops.mesh.is_healthy() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy").into_response()
    }
}

/// Prometheus text for monotonic counters: `{prefix}_{name}_total` with its help line, for
/// each `(name, help, counter)`. Names and help carry no identifiers.
pub fn prometheus_counters(
    prefix: &str,
    counters: &[(&str, &str, &std::sync::atomic::AtomicU64)],
) -> String {
    let mut out = String::new();
    for (name, help, value) in counters {
        let value = value.load(std::sync::atomic::Ordering::Relaxed);
        out.push_str(&format!(
            "# HELP {prefix}_{name}_total {help}\n# TYPE {prefix}_{name}_total counter\n\
             {prefix}_{name}_total {value}\n"
        ));
    }
    out
}

/// TLS material for [`serve`].
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// How long a client may take to send a request's headers, the first request's included;
/// past it, the connection is closed (a slowloris holds connections open by sending headers
/// byte by byte, or not at all). hyper enforces it only when given a timer, which
/// `axum-server` does not give it: [`serve`] does.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `Strict-Transport-Security` on every answer served over TLS: a browser or client that
/// honours it never falls back to plain HTTP for this host (one year).
pub const HSTS: &str = "max-age=31536000";

/// Serves `app` on `listener` until `shutdown` resolves (then drains for up to 5 s): TLS 1.3
/// with rustls when `tls` is set (TLS 1.2 and older refused; HSTS on every answer), plain
/// HTTP otherwise (callers allow that only on loopback). Handlers see the peer address
/// through `ConnectInfo<SocketAddr>`. Every connection is held to [`ServeLimits::default`]:
/// its first bytes within 30 s, a request's headers within [`HEADER_READ_TIMEOUT`], and caps
/// on open connections in all and per client address.
pub async fn serve(
    app: axum::Router,
    listener: std::net::TcpListener,
    tls: Option<TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(app, listener, tls, ServeLimits::default(), shutdown).await
}

/// The TLS 1.3-only server configuration from PEM files (HTTP/2 and HTTP/1.1 by ALPN).
fn tls13_config(files: &TlsFiles) -> std::io::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad("certificate file", &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate file", &e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad("key file", &e))?;
    let mut config =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// [`serve`] with other limits (tests, or a node that configures them).
pub async fn serve_with(
    app: axum::Router,
    listener: std::net::TcpListener,
    tls: Option<TlsFiles>,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        h.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    match tls {
        Some(files) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = tls13_config(&files)?;
            let tls = axum_server::tls_rustls::RustlsAcceptor::new(
                axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config)),
            );
            let app = app.layer(axum::middleware::map_response(
                |mut response: Response| async move {
                    response.headers_mut().insert(
                        header::STRICT_TRANSPORT_SECURITY,
                        HeaderValue::from_static(HSTS),
                    );
                    response
                },
            ));
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(guard::Guard::new(tls, limits))
                .handle(handle);
            time_out_slow_headers(server.http_builder(), limits.header_read_timeout);
            server
                .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                .await
        }
        None => {
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(guard::Guard::new(
                    axum_server::accept::DefaultAcceptor,
                    limits,
                ))
                .handle(handle);
            time_out_slow_headers(server.http_builder(), limits.header_read_timeout);
            server
                .serve(app.into_make_service_with_connect_info::<SocketAddr>())
                .await
        }
    }
}

fn time_out_slow_headers(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    timeout: Duration,
) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn packet_rate_budgets_are_per_source_address_not_per_connection() {
        // Security review findings 4 and 15 (DoS budget): an edge's client budget was keyed
        // by ip:port, so every new TCP connection from one host brought a fresh 200-packet
        // budget. Before: two connections of 203.0.113.7 had two budgets.
        let hasher = std::collections::hash_map::RandomState::new();
        let id = |a: &str, per_conn: bool| client_of(&hasher, &a.parse().unwrap(), per_conn);
        assert_eq!(
            id("203.0.113.7:40000", true),
            id("203.0.113.7:40001", true),
            "two connections of one IPv4 address have two budgets"
        );
        assert_eq!(
            id("[2001:db8:1:2::5]:40000", true),
            id("[2001:db8:1:2:ffff::9]:50000", true),
            "one IPv6 /64 has several budgets"
        );
        assert_ne!(id("203.0.113.7:40000", true), id("203.0.113.8:40000", true));
        assert_ne!(
            id("[2001:db8:1:2::5]:1", true),
            id("[2001:db8:1:3::5]:1", true)
        );
        // Loopback (a proxy or devnet on the host): per connection by default, per address
        // when configured.
        assert_ne!(id("127.0.0.1:1000", true), id("127.0.0.1:1001", true));
        assert_eq!(id("127.0.0.1:1000", false), id("127.0.0.1:1001", false));
    }

    async fn server(
        header_read_timeout: Duration,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_with(
            app,
            listener,
            None,
            ServeLimits {
                header_read_timeout,
                first_bytes_timeout: header_read_timeout,
                ..ServeLimits::default()
            },
            async move {
                let _ = stopped.await;
            },
        ));
        (addr, stop)
    }

    /// Reads until the server closes the connection (or 60 s, far past the timeout); what it
    /// sent meanwhile.
    async fn until_closed(conn: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), async {
            let mut buf = [0u8; 1024];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server kept the connection open");
        got
    }

    /// Security review, finding 6: the published metrics change at most once per interval,
    /// so the difference between two scrapes never isolates one packet.
    #[test]
    fn published_metrics_change_at_most_once_per_interval() {
        let snapshot = MetricsSnapshot::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        assert_eq!(&*snapshot.get(t0, || "a".into()), "a");
        assert_eq!(
            &*snapshot.get(t0 + Duration::from_secs(59), || "b".into()),
            "a"
        );
        assert_eq!(
            &*snapshot.get(t0 + Duration::from_secs(60), || "c".into()),
            "c"
        );
        let live = MetricsSnapshot::new(Duration::ZERO);
        assert_eq!(&*live.get(t0, || "a".into()), "a");
        assert_eq!(&*live.get(t0, || "b".into()), "b");
    }

    #[test]
    fn a_public_relay_serves_metrics_only_on_its_metrics_listener() {
        let mut http = crate::config::HttpConfig::default();
        assert!(http.metrics_on_api(), "loopback API: served there");
        http.listen = "0.0.0.0:443".parse().unwrap();
        assert!(!http.metrics_on_api(), "public API: not served there");
        http.listen = "127.0.0.1:7480".parse().unwrap();
        http.metrics_listen = Some("127.0.0.1:9480".parse().unwrap());
        assert!(!http.metrics_on_api());
        http.check().unwrap();
        http.metrics_listen = Some("0.0.0.0:9480".parse().unwrap());
        assert!(
            http.check().is_err(),
            "a public metrics listener needs the switch"
        );
        http.metrics_allow_non_loopback = true;
        http.check().unwrap();
    }

    /// Security review, finding 12: without a timer, hyper silently disabled its header-read
    /// timeout, so a client sending half a request held its connection forever. Now it is
    /// closed once the timeout passes; a complete request is served.
    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let (addr, _stop) = server(Duration::from_secs(1)).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let answered = until_closed(&mut slow).await;
        assert!(!answered.starts_with(b"HTTP/1.1 200"), "{answered:?}");
        // A client that sends its request in time is served as before.
        let mut prompt = tokio::net::TcpStream::connect(addr).await.unwrap();
        prompt
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut prompt).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }

    /// Security review, finding 12: a client that connects and sends nothing, or a prefix of
    /// the HTTP/2 preface, stayed in hyper-util's protocol detection, which has no deadline:
    /// before the first-bytes guard, both connections were still open after 60 s ("the
    /// server kept the connection open").
    #[tokio::test]
    async fn a_silent_client_or_a_partial_http2_preface_is_disconnected() {
        let (addr, _stop) = server(Duration::from_secs(1)).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
        preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(until_closed(&mut silent).await.is_empty());
        assert!(until_closed(&mut preface).await.is_empty());
    }

    /// Security review, finding 12: connections are capped in all (and per client address,
    /// loopback excepted); one over the cap is closed at once, and a place freed is taken
    /// again.
    #[tokio::test]
    async fn connections_over_the_cap_are_closed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", get(|| async { "ok" }));
        let limits = ServeLimits {
            connections_max: 2,
            ..ServeLimits::default()
        };
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_with(app, listener, None, limits, async move {
            let _ = stopped.await;
        }));
        let ask = |mut c: tokio::net::TcpStream| async move {
            c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            until_closed(&mut c).await
        };
        let first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let refused = ask(third).await;
        assert!(
            refused.is_empty(),
            "a third connection was served: {refused:?}"
        );
        drop(first);
        // The freed place is taken again (the server sees the close a moment later).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            if ask(c).await.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no place freed after a connection closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(second);
    }

    /// Security policy M-031 / M-098 (TLS 1.3 mandatory) and M-101 (HSTS): the API is served
    /// over TLS 1.3 only, with `Strict-Transport-Security`; a TLS 1.2 client is refused.
    #[tokio::test]
    async fn tls_is_1_3_only_and_sends_hsts() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_pem = generated.cert.pem();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::write(&files.cert, &cert_pem).unwrap();
        std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", get(|| async { "ok" }));
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(app, listener, Some(files), async move {
            let _ = stopped.await;
        }));
        let client = |max: Option<reqwest::tls::Version>| {
            let mut b = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
                .resolve("localhost", addr)
                .timeout(Duration::from_secs(30));
            if let Some(v) = max {
                b = b.tls_version_max(v);
            }
            b.build().unwrap()
        };
        let url = format!("https://localhost:{}/healthz", addr.port());
        let ok = client(None).get(&url).send().await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers().get(header::STRICT_TRANSPORT_SECURITY).unwrap(),
            HSTS
        );
        let old = client(Some(reqwest::tls::Version::TLS_1_2))
            .get(&url)
            .send()
            .await;
        assert!(
            old.is_err(),
            "TLS 1.2 was accepted: {:?}",
            old.map(|r| r.status())
        );
    }

    #[test]
    fn the_per_address_cap_counts_an_ipv6_64_as_one_address_and_exempts_loopback() {
        let limits = ServeLimits {
            connections_per_address_max: 1,
            ..ServeLimits::default()
        };
        let counts = Arc::default();
        let ip = |s: &str| guard::source(&SocketAddr::new(s.parse().unwrap(), 1));
        let a = guard::Slot::take(&counts, ip("2001:db8:1:2::1"), &limits).unwrap();
        assert!(guard::Slot::take(&counts, ip("2001:db8:1:2::ffff"), &limits).is_none());
        let _b = guard::Slot::take(&counts, ip("2001:db8:1:3::1"), &limits).unwrap();
        let _c = guard::Slot::take(&counts, ip("::ffff:192.0.2.1"), &limits).unwrap();
        assert!(guard::Slot::take(&counts, ip("192.0.2.1"), &limits).is_none());
        let _l1 = guard::Slot::take(&counts, ip("127.0.0.1"), &limits).unwrap();
        let _l2 = guard::Slot::take(&counts, ip("127.0.0.1"), &limits).unwrap();
        drop(a);
        assert!(guard::Slot::take(&counts, ip("2001:db8:1:2::1"), &limits).is_some());
    }
}
