//! The authority's driver: the HTTP API, and a loop that reads descriptor sources, ticks the
//! core and fetches the other authorities' votes and signatures.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/descriptors` | a node's `SignedDescriptor` (protobuf); answers `{"admitted": bool}` |
//! | `GET /v1/consensus` | the newest consensus with the threshold of signatures (`Consensus` protobuf); 503 before the first |
//! | `GET /v1/consensus/{epoch}` | this authority's document for the epoch, with the signatures it has (for the other authorities) |
//! | `GET /v1/vote/{epoch}` | this authority's signed vote (`Vote` protobuf) |
//! | `GET /v1/status` | JSON: key, epoch, descriptors held and admitted, votes, signatures |
//! | `GET /health` | `ok` |
//! | `GET /metrics` | the counts of `/v1/status` as Prometheus gauges (no identifiers) |

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ed25519_dalek::SigningKey;
use whispr_protocol::consensus::{Consensus, Network, SignedVote};
use whispr_protocol::directory::{DESCRIPTOR_LEN_MAX, SignedDescriptor};
use whispr_protocol::wire;

use crate::config::AuthorityConfig;
use crate::core::{AllowList, AuthorityCore, Schedule};

/// Shared state of the HTTP handlers and the loop.
#[derive(Clone)]
pub struct AuthorityState {
    core: Arc<Mutex<AuthorityCore>>,
}

impl AuthorityState {
    fn lock(&self) -> MutexGuard<'_, AuthorityCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest consensus with the threshold of signatures, if any.
    pub fn consensus(&self) -> Option<Consensus> {
        self.lock().consensus().cloned()
    }
}

/// Everything the driver needs, read from the configuration and the files it names.
pub struct Options {
    /// The authority's key.
    pub key: SigningKey,
    /// The pinned network (this authority included).
    pub network: Network,
    /// The schedule.
    pub schedule: Schedule,
    /// The allow-list file (re-read before each vote).
    pub allow_file: std::path::PathBuf,
    /// Mesh nodes' `/v1/directory` URLs.
    pub descriptor_sources: Vec<String>,
}

impl Options {
    /// Reads the key (creating it), the network file and the allow list named by `config`.
    pub fn from_config(config: &AuthorityConfig) -> anyhow::Result<Options> {
        let secret =
            whispr_relay::keys::load_or_create_secret(&config.key_path(), &mut rand::rng())
                .context("authority key")?;
        let key = SigningKey::from_bytes(&secret);
        let text = std::fs::read_to_string(&config.network_file)
            .with_context(|| format!("reading {}", config.network_file.display()))?;
        let network = Network::parse(&text).context("network file")?;
        Ok(Options {
            key,
            network,
            schedule: config.schedule(),
            allow_file: config.allow_file.clone(),
            descriptor_sources: config.descriptor_sources.clone(),
        })
    }
}

fn read_allow_list(path: &std::path::Path) -> anyhow::Result<AllowList> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    AllowList::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The authority's HTTP routes.
pub fn routes(state: AuthorityState) -> axum::Router {
    axum::Router::new()
        .route("/v1/descriptors", post(submit))
        .route("/v1/consensus", get(latest))
        .route("/v1/consensus/{epoch}", get(document))
        .route("/v1/vote/{epoch}", get(vote))
        .route("/v1/status", get(status))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(DESCRIPTOR_LEN_MAX))
        .with_state(state)
}

fn protobuf(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/x-protobuf")], bytes).into_response()
}

fn json_error(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
}

async fn submit(State(state): State<AuthorityState>, body: Bytes) -> Response {
    let signed = match SignedDescriptor::decode(&body) {
        Ok(s) => s,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let now = whispr_node_kit::clock::now();
    match state.lock().submit_descriptor(now, signed) {
        Ok(admitted) => axum::Json(serde_json::json!({ "admitted": admitted })).into_response(),
        Err(e) => json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn latest(State(state): State<AuthorityState>) -> Response {
    match state.lock().consensus() {
        Some(c) => protobuf(c.encode()),
        None => json_error(StatusCode::SERVICE_UNAVAILABLE, "no consensus yet"),
    }
}

async fn document(State(state): State<AuthorityState>, Path(epoch): Path<u64>) -> Response {
    match state.lock().document(epoch) {
        Some(c) => protobuf(c.encode()),
        None => json_error(StatusCode::NOT_FOUND, "no document for this epoch"),
    }
}

async fn vote(State(state): State<AuthorityState>, Path(epoch): Path<u64>) -> Response {
    match state.lock().vote(epoch) {
        Some(v) => protobuf(v.encode()),
        None => json_error(StatusCode::NOT_FOUND, "no vote for this epoch"),
    }
}

async fn status(State(state): State<AuthorityState>) -> Response {
    let core = state.lock();
    let now = whispr_node_kit::clock::now();
    let mut v = serde_json::to_value(core.status(now)).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "key".to_owned(),
            serde_json::Value::String(hex::encode(core.public_key())),
        );
    }
    axum::Json(v).into_response()
}

/// `GET /metrics`: what `GET /v1/status` says (public already), as Prometheus gauges.
async fn metrics(State(state): State<AuthorityState>) -> Response {
    let now = whispr_node_kit::clock::now();
    let text = metrics_text(&state.lock(), now);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The authority's gauges at `now`.
fn metrics_text(core: &AuthorityCore, now: whispr_protocol::UnixTime) -> String {
    let status = core.status(now);
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let gauges = [
        ("epoch", "The current consensus epoch.", status.epoch),
        (
            "epoch_seconds",
            "Length of a consensus epoch (epoch_secs).",
            core.schedule().period.as_secs(),
        ),
        (
            "consensus_epoch",
            "Epoch of the newest consensus with the threshold of signatures (0: none yet).",
            status.consensus_epoch.unwrap_or(0),
        ),
        (
            "consensus_valid_until_seconds",
            "Unix time at which the newest consensus expires (0: none yet).",
            core.consensus_valid_until().map_or(0, |t| t.0 / 1000),
        ),
        (
            "descriptors",
            "Descriptors held (of admitted nodes only).",
            count(status.descriptors),
        ),
        (
            "descriptors_admitted",
            "Descriptors held that the allow list admits.",
            count(status.admitted),
        ),
        (
            "votes",
            "Votes held for the current epoch, this authority's included.",
            count(status.votes),
        ),
        (
            "signatures",
            "Signatures on this authority's current-epoch document.",
            count(status.signatures),
        ),
        (
            "authorities",
            "Authorities the network pins.",
            count(core.network().authorities().len()),
        ),
        (
            "threshold",
            "Signatures a consensus needs.",
            count(core.network().threshold()),
        ),
    ];
    let mut out = String::new();
    for (name, help, value) in gauges {
        out.push_str(&format!(
            "# HELP whispr_authority_{name} {help}\n# TYPE whispr_authority_{name} gauge\nwhispr_authority_{name} {value}\n"
        ));
    }
    out
}

/// A started authority: its state, its address, and how to stop it.
pub struct Running {
    /// The state (for tests and `main`).
    pub state: AuthorityState,
    /// Where it listens.
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Stops the loop and the listener and waits for both.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts the HTTP API on `listener` and the voting loop.
pub fn start(options: Options, listener: std::net::TcpListener) -> anyhow::Result<Running> {
    let allow = read_allow_list(&options.allow_file)?;
    let core = AuthorityCore::new(
        options.key.clone(),
        options.network.clone(),
        options.schedule,
        allow,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let state = AuthorityState {
        core: Arc::new(Mutex::new(core)),
    };
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut http_stop = stop_rx.clone();
    let app = routes(state.clone());
    tasks.spawn(async move {
        let served = whispr_relay::http::serve(app, listener, None, async move {
            let _ = http_stop.changed().await;
        })
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tasks.spawn(voting_loop(state.clone(), options, stop_rx));
    Ok(Running {
        state,
        addr,
        stop,
        tasks,
    })
}

/// The loop's tick: short enough that a round completes well inside a short test epoch.
fn tick_interval(schedule: &Schedule) -> Duration {
    (schedule.period / 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

async fn voting_loop(
    state: AuthorityState,
    options: Options,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(http) = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()
    else {
        tracing::error!("cannot build the HTTP client");
        return;
    };
    let me = options.key.verifying_key().to_bytes();
    let peers: Vec<_> = options
        .network
        .authorities()
        .iter()
        .filter(|a| a.key != me)
        .cloned()
        .collect();
    let tick = tick_interval(&options.schedule);
    let sources_every = (options.schedule.period / 4).clamp(tick, Duration::from_secs(60));
    let mut sources_at: Option<tokio::time::Instant> = None;
    let mut announced: Option<u64> = None;
    loop {
        let due = sources_at.is_none_or(|at| at.elapsed() >= sources_every);
        if due {
            sources_at = Some(tokio::time::Instant::now());
            read_sources(&state, &http, &options).await;
        }
        let now = whispr_node_kit::clock::now();
        state.lock().tick(now);
        for peer in &peers {
            let (want_vote, want_signature) = state.lock().wants_from(now, &peer.key);
            let epoch = state.lock().epoch(now);
            if want_vote
                && let Some(bytes) = fetch(&http, &format!("{}/v1/vote/{epoch}", peer.url)).await
            {
                match SignedVote::decode(&bytes).map(|v| state.lock().add_vote(&v)) {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) | Err(e) => {
                        tracing::warn!(error = %e, peer = %peer.url, "vote refused");
                    }
                }
            }
            if want_signature
                && let Some(bytes) =
                    fetch(&http, &format!("{}/v1/consensus/{epoch}", peer.url)).await
                && let Ok(doc) = Consensus::decode(&bytes)
            {
                state.lock().add_signatures(now, epoch, &doc);
            }
        }
        state.lock().tick(whispr_node_kit::clock::now());
        let status = state.lock().status(whispr_node_kit::clock::now());
        if status.consensus_epoch.is_some() && status.consensus_epoch != announced {
            announced = status.consensus_epoch;
            tracing::info!(
                epoch = status.epoch,
                nodes = status.admitted,
                signatures = status.signatures,
                "consensus made"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> Option<Vec<u8>> {
    let r = http.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.bytes().await.ok().map(|b| b.to_vec())
}

async fn read_sources(state: &AuthorityState, http: &reqwest::Client, options: &Options) {
    match read_allow_list(&options.allow_file) {
        Ok(allow) => state.lock().set_allow_list(allow),
        Err(e) => tracing::warn!(error = %e, "allow list unreadable; the previous one stays"),
    }
    for source in &options.descriptor_sources {
        let Some(bytes) = fetch(http, source).await else {
            continue;
        };
        let Ok(set) =
            wire::decode::<wire::Directory>(&bytes, whispr_protocol::directory::DIRECTORY_LEN_MAX)
        else {
            tracing::warn!(source = %source, "descriptor source sent no directory");
            continue;
        };
        let now = whispr_node_kit::clock::now();
        let mut core = state.lock();
        for d in set.descriptors {
            let _ = core.submit_descriptor(now, SignedDescriptor(d));
        }
    }
}
