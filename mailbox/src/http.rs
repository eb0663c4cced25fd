//! The client API (axum): handlers translate HTTP into core calls and core results into JSON,
//! and [`MailboxNode::serve`] serves them (with the mesh's routes once joined). This module
//! sits above [`crate::node`]: it uses the node, the node never uses it.
//! Every route is described by the generated OpenAPI document at `GET /v1/openapi.json`.
//!
//! Errors are JSON `{"error": kind, "message": text}` ([`ErrorBody`]) with a 4xx status for
//! the caller's mistakes and 5xx for the node's; every limit answers 429 with `Retry-After`.
//! A request that does not match the OpenAPI document (a malformed field, a missing parameter)
//! is answered 400; one that matches it but whose content the node refuses (a key that is not
//! a curve point, a cursor beyond the last message, a retention above the node's maximum) 422;
//! a store that cannot write 503. The document lists every status each operation can return
//! (`tests/api_contract.rs` checks it; `make api-fuzz` fuzzes a live node against it).
//! Nothing here logs an id, token, key or address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use whispr_node_kit::clock::now;
use whispr_protocol::MailboxId;
use whispr_protocol::mailbox_api::{self, BodyError};

use crate::auth::Session;
use crate::core::{CreateMailbox, MessageBody, PrekeyUpload, StoredMessage};
use crate::error::MailboxError;
use crate::node::MailboxNode;
use crate::store::StoreError;

// ---------------------------------------------------------------------------------------
// Serving

impl MailboxNode {
    /// Serves the API on `listener` until `shutdown` resolves. TLS when the config names a
    /// certificate; otherwise plain HTTP (only allowed on loopback, see
    /// [`crate::node::NodeConfig::check`]).
    pub async fn serve(
        &self,
        listener: std::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let mut app = router(self.clone());
        if let Some((mesh, _)) = self.mesh() {
            app = app.merge(whispr_relay::http::mesh_routes(mesh.clone(), None));
        }
        let api = &self.shared.config.api;
        let tls = match (&api.tls_cert_file, &api.tls_key_file) {
            (Some(cert), Some(key)) => Some(whispr_relay::http::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        whispr_relay::http::serve(app, listener, tls, shutdown).await
    }

    /// Serves `/metrics` and `/healthz` on `listener` (`api.metrics_listen`; plain HTTP)
    /// until `shutdown` resolves.
    pub async fn serve_metrics(
        &self,
        listener: std::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        whispr_relay::http::serve(metrics_router(self.clone()), listener, None, shutdown).await
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// The JSON body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable kind (e.g. `unauthorized`, `rate_limited`, `bad_request`).
    #[schema(pattern = "^[a-z][a-z_]*$", min_length = 1)]
    pub error: String,
    /// Human-readable explanation (never contains ids, tokens or keys).
    pub message: String,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: String,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind: kind.into(),
            message: message.into(),
            retry_after_secs: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn too_many(what: &str, retry_after_ms: u64) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limited".into(),
            message: format!("{what}; retry later"),
            retry_after_secs: Some(retry_after_ms.div_ceil(1000).max(1)),
        }
    }
}

impl From<MailboxError> for ApiError {
    fn from(e: MailboxError) -> ApiError {
        let status = match &e {
            MailboxError::UnknownMailbox => StatusCode::NOT_FOUND,
            MailboxError::MailboxExists => StatusCode::CONFLICT,
            MailboxError::Unauthorized(_) | MailboxError::BadSignature(_) => {
                StatusCode::UNAUTHORIZED
            }
            MailboxError::UnknownDevice => StatusCode::FORBIDDEN,
            MailboxError::QuotaExceeded { .. } => {
                let mut err = ApiError::too_many(&e.to_string(), 60_000);
                err.kind = e.kind().into();
                return err;
            }
            MailboxError::RateLimited { retry_after_ms, .. } => {
                let mut err = ApiError::too_many(&e.to_string(), *retry_after_ms);
                err.kind = e.kind().into();
                return err;
            }
            // Well-formed (it matches the API document) but refused for its content.
            MailboxError::AlreadyExpired
            | MailboxError::BadCursor(_)
            | MailboxError::InvalidArgument(_) => StatusCode::UNPROCESSABLE_ENTITY,
            MailboxError::Malformed(_) => StatusCode::BAD_REQUEST,
            // The store cannot write (poisoned by a failed write, or failing now): the node
            // cannot serve until it is restarted; /healthz says so too.
            MailboxError::Store(StoreError::Poisoned | StoreError::Backend(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if status.is_server_error() {
            tracing::error!(error = %e, "request failed on the node");
            "the node could not complete the request".to_string()
        } else {
            e.to_string()
        };
        ApiError::new(status, e.kind(), message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(ErrorBody {
                error: self.kind,
                message: self.message,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Json<T>` whose rejections are JSON error bodies (413 for an oversized body).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    // Anything but an oversized body is a malformed request: 400 (axum would answer 422 for
    // JSON of the wrong shape, e.g. an unknown field, and 415 for a missing content type).
    let status = match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "bad_request"
    };
    // The body text says what is wrong with the JSON (no secrets: it names fields, not values).
    ApiError::new(status, kind, rejection.body_text())
}

/// Path extractor with JSON rejections.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| ApiError::bad_request(e.body_text()))
    }
}

/// Query extractor with JSON rejections.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(e.body_text()))
    }
}

/// WebSocket upgrade extractor with JSON rejections (axum's are plain text): 400 for a
/// request without the upgrade headers, 426 when the connection cannot be upgraded.
pub struct ApiUpgrade(pub WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for ApiUpgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(ApiUpgrade)
            .map_err(|e: WebSocketUpgradeRejection| {
                let status = e.status();
                let kind = match status {
                    StatusCode::UPGRADE_REQUIRED => "upgrade_required",
                    StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
                    _ => "bad_request",
                };
                ApiError::new(status, kind, e.body_text())
            })
    }
}

fn bad_body(e: BodyError) -> ApiError {
    ApiError::bad_request(e.to_string())
}

fn hex32(what: &'static str, text: &str) -> ApiResult<[u8; 32]> {
    mailbox_api::hex32(what, text).map_err(bad_body)
}

fn mailbox_id(text: &str) -> ApiResult<MailboxId> {
    mailbox_api::parse_mailbox_id(text).map_err(bad_body)
}

/// The authenticated session of a request (`Authorization: Bearer <hex token>`).
pub struct Authed(pub Session);

impl FromRequestParts<MailboxNode> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        node: &MailboxNode,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized =
            |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m.to_string());
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("missing Authorization: Bearer token"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("Authorization must be a Bearer token"))?;
        let bytes = mailbox_api::parse_token(token)
            .ok_or_else(|| unauthorized("malformed session token"))?;
        let session = node.sessions().authenticate(now(), &bytes).map_err(|e| {
            node.metrics().auth_failures.fetch_add(1, Ordering::Relaxed);
            ApiError::from(e)
        })?;
        Ok(Authed(session))
    }
}

impl Authed {
    /// Checks that the session is for `mailbox`.
    fn for_mailbox(&self, mailbox: &MailboxId) -> ApiResult<()> {
        if &self.0.mailbox != mailbox {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the session is for another mailbox",
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Limits

async fn limit_connection(
    State(node): State<MailboxNode>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let verdict = node
        .shared
        .limiter
        .lock()
        .map(|mut l| {
            let key =
                crate::limiter::limit_key(peer, node.shared.config.api.loopback_per_connection);
            l.check(key, now().0)
        })
        .unwrap_or(Ok(()));
    // The peer address is personal data: wrapped, it prints as `[redacted]`.
    let span = tracing::debug_span!(
        "request",
        peer = %crate::pii::Pii(peer),
        method = %request.method(),
    );
    tracing::debug!(parent: &span, "request");
    match verdict {
        Ok(()) => {
            use tracing::Instrument;
            next.run(request).instrument(span).await
        }
        Err(retry_after_ms) => {
            node.metrics().rate_limited.fetch_add(1, Ordering::Relaxed);
            ApiError::too_many("operations per client address", retry_after_ms).into_response()
        }
    }
}

/// Counts a waiting long poll in the `polls_waiting` gauge while alive.
struct Waiting<'a>(&'a MailboxNode);

impl<'a> Waiting<'a> {
    fn new(node: &'a MailboxNode) -> Waiting<'a> {
        node.metrics().polls_waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(node)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .metrics()
            .polls_waiting
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one of a mailbox's connection slots (long poll or stream) until dropped.
struct Slot {
    node: MailboxNode,
    mailbox: [u8; 32],
}

impl Slot {
    fn take(node: &MailboxNode, mailbox: &MailboxId) -> ApiResult<Slot> {
        let max = node.config().api.connections_per_mailbox_max;
        let mut map = node
            .shared
            .mailbox_connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(mailbox.0).or_insert(0);
        if *n >= max {
            node.metrics().rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::too_many("connections per mailbox", 5_000));
        }
        *n += 1;
        Ok(Slot {
            node: node.clone(),
            mailbox: mailbox.0,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .node
            .shared
            .mailbox_connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.mailbox) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.mailbox);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Types

// The request bodies and query strings: parsed (and their fields checked) by whispr-protocol,
// so that the `mailbox_http` fuzz target runs exactly this parsing (`fuzz/README.md`).
pub use whispr_protocol::mailbox_api::{
    AckRequest, ChallengeRequest, CreateMailboxRequest, DeviceRequest, HexNodeId, LoginRequest,
    PollQuery, PrekeyJson, PrekeysRequest, StreamCommand, StreamQuery,
};

/// Answer to a creation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedResponse {
    /// The mailbox id, hex (lower case).
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub mailbox_id: String,
}

/// A login challenge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChallengeResponse {
    /// 32 random bytes, hex.
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub challenge: String,
    /// The node's audience string, part of the signed transcript.
    pub audience: String,
    /// Unix ms after which the challenge is refused.
    pub expires_at_ms: u64,
}

/// A session token (or stream ticket).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// 32 bytes hex; send as `Authorization: Bearer <token>` (or `?ticket=`).
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub token: String,
    /// Unix ms at which it stops working.
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for TokenResponse {
    // The token is a bearer secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("token", &crate::pii::Pii(()))
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// A stored message.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct MessageJson {
    /// Sequence number; use it as `after` and `up_to`. Per replica.
    pub seq: u64,
    /// Message id, 16 bytes hex, the same on every replica of the mailbox (the envelope's
    /// dedup id, or the SURB id of a SURB reply).
    #[serde(default)]
    #[schema(pattern = "^[0-9a-f]{32}$", min_length = 32, max_length = 32)]
    pub id: String,
    /// When the node stored it (Unix ms).
    pub received_at_ms: u64,
    /// When the node drops it (Unix ms).
    pub expires_at_ms: u64,
    /// `envelope` or `surb_reply`.
    #[schema(pattern = "^(envelope|surb_reply)$")]
    pub kind: String,
    /// For `envelope`: the sealed envelope (protobuf `SealedEnvelope`), base64 (standard
    /// alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9+/]*={0,2}$")]
    pub envelope: Option<String>,
    /// For `surb_reply`: the SURB id, 16 bytes hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9a-f]{32}$", min_length = 32, max_length = 32)]
    pub surb_id: Option<String>,
    /// For `surb_reply`: the sealed reply, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9+/]*={0,2}$")]
    pub payload: Option<String>,
}

impl From<StoredMessage> for MessageJson {
    fn from(m: StoredMessage) -> MessageJson {
        let (kind, envelope, surb_id, payload) = match m.body {
            MessageBody::Envelope(bytes) => ("envelope", Some(B64.encode(bytes)), None, None),
            MessageBody::SurbReply { surb_id, payload } => (
                "surb_reply",
                None,
                Some(hex::encode(surb_id.as_bytes())),
                Some(B64.encode(payload)),
            ),
        };
        MessageJson {
            seq: m.seq,
            id: hex::encode(m.id),
            received_at_ms: m.received_at.0,
            expires_at_ms: m.expires_at.0,
            kind: kind.into(),
            envelope,
            surb_id,
            payload,
        }
    }
}

/// A page of messages.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessagesResponse {
    /// Messages in sequence order.
    pub messages: Vec<MessageJson>,
    /// The last sequence number assigned in the mailbox.
    pub last_seq: u64,
}

/// The device's cursor after an ack.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AckResponse {
    /// Every message up to this sequence number is acknowledged by this device.
    pub cursor: u64,
}

/// Answer to a prekey upload.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PrekeysResponse {
    /// One-time keys stored.
    pub one_time_keys: usize,
}

/// A mailbox's information.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InfoResponse {
    /// Mailbox id, hex.
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub mailbox_id: String,
    /// HPKE public key, hex.
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub mailbox_key: String,
    /// Owner key, hex.
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub owner_key: String,
    /// Retention (ms).
    pub retention_ms: u64,
    /// Creation time (Unix ms).
    pub created_at_ms: u64,
    /// Registered devices with their acknowledged cursor.
    pub devices: Vec<DeviceJson>,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Last sequence number assigned.
    pub last_seq: u64,
    /// One-time prekeys left.
    pub prekeys_left: usize,
}

/// A registered device.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceJson {
    /// Device key, hex.
    #[schema(pattern = "^[0-9a-f]{64}$", min_length = 64, max_length = 64)]
    pub device_key: String,
    /// Its cursor.
    pub cursor: u64,
}

/// `GET /v1/mailboxes/{id}/export`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExportResponse {
    /// Export format version.
    pub version: u32,
    /// When the export was made (Unix ms).
    pub exported_at_ms: u64,
    /// The mailbox's information.
    pub mailbox: InfoResponse,
    /// Every stored message not yet expired, still sealed.
    pub messages: Vec<MessageJson>,
}

/// What the server sends on a stream (JSON text frames).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// A new message.
    Message {
        /// The message.
        message: MessageJson,
    },
    /// The device's cursor after an ack.
    Acked {
        /// New cursor.
        cursor: u64,
    },
    /// A request on the stream failed; the stream stays open.
    Error {
        /// Error kind.
        error: String,
        /// Explanation.
        message: String,
    },
}

// ---------------------------------------------------------------------------------------
// Handlers

/// Creates a mailbox.
#[utoipa::path(post, path = "/v1/mailboxes", tag = "mailboxes",
    request_body = CreateMailboxRequest,
    responses(
        (status = 201, body = CreatedResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn create_mailbox(
    State(node): State<MailboxNode>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<CreateMailboxRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedResponse>)> {
    let fields = req.validate().map_err(bad_body)?;
    let replicas = fields.replicas;
    let request = CreateMailbox {
        mailbox_id: fields.mailbox_id,
        mailbox_key: fields.mailbox_key,
        owner_key: fields.owner_key,
        access_key_hash: fields.access_key_hash,
        reply_key: fields.reply_key,
        retention_ms: fields.retention_ms,
        signature: fields.signature,
    };
    let tag = crate::pii::Tag::of(request.mailbox_id.as_bytes());
    // Creation is unauthenticated: limited per source address, so one address (whatever
    // its number of connections) cannot take the node's `mailboxes_max`.
    let verdict = node
        .shared
        .creations
        .lock()
        .map(|mut l| l.check(crate::limiter::source_key(peer.ip()), now().0))
        .unwrap_or(Ok(()));
    if let Err(retry_after_ms) = verdict {
        node.metrics().rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::too_many(
            "mailbox creations from this address",
            retry_after_ms,
        ));
    }
    node.with_core(move |core| match replicas {
        Some(replicas) => core.create_replicated(now(), request, replicas),
        None => core.create_mailbox(now(), request),
    })
    .await??;
    node.wake_sweeper();
    tracing::info!(mailbox = %tag, "mailbox created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedResponse {
            mailbox_id: req.mailbox_id.to_ascii_lowercase(),
        }),
    ))
}

/// Issues a login challenge for a device.
#[utoipa::path(post, path = "/v1/auth/challenge", tag = "auth",
    request_body = ChallengeRequest,
    responses((status = 200, body = ChallengeResponse), (status = 400, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn challenge(
    State(node): State<MailboxNode>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<ChallengeRequest>,
) -> ApiResult<axum::Json<ChallengeResponse>> {
    let (mailbox, device) = req.validate().map_err(bad_body)?;
    let mut sessions = node.sessions();
    let (challenge, expires) = sessions.challenge_from(now(), peer.ip(), mailbox, device)?;
    Ok(axum::Json(ChallengeResponse {
        challenge: hex::encode(challenge),
        audience: sessions.audience().to_string(),
        expires_at_ms: expires.0,
    }))
}

/// Answers a challenge with the device's signature; returns a session token.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn login(
    State(node): State<MailboxNode>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<axum::Json<TokenResponse>> {
    let mailbox_api::LoginFields {
        mailbox_id: mailbox,
        device_key: device,
        challenge,
        signature,
    } = req.validate().map_err(bad_body)?;
    let is_device = node
        .with_core(move |core| core.is_device(&mailbox, &device))
        .await?;
    let result = node
        .sessions()
        .login(now(), mailbox, device, challenge, signature, is_device);
    let (token, expires) = result.map_err(|e| {
        node.metrics().auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            mailbox = %crate::pii::Tag::of(mailbox.as_bytes()),
            reason = e.kind(),
            "login refused"
        );
        ApiError::from(e)
    })?;
    // The first login makes the mailbox "used": it is no longer erased as unused.
    node.with_core(move |core| core.mark_used(&mailbox))
        .await??;
    Ok(axum::Json(TokenResponse {
        token: hex::encode(token),
        expires_at_ms: expires.0,
    }))
}

/// Ends the session.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth",
    responses((status = 204), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
async fn logout(State(node): State<MailboxNode>, auth: Authed) -> ApiResult<StatusCode> {
    node.sessions().end(now(), &auth.0.token_hash);
    revoked(&node);
    Ok(StatusCode::NO_CONTENT)
}

async fn info_response(node: &MailboxNode, mailbox: &MailboxId) -> ApiResult<InfoResponse> {
    let mailbox = *mailbox;
    let (info, prekeys_left) = node
        .with_core(move |core| -> Result<_, MailboxError> {
            core.load_mailbox(&mailbox)?;
            Ok((core.info(&mailbox)?, core.prekeys_left(&mailbox)?))
        })
        .await??;
    Ok(InfoResponse {
        mailbox_id: info.mailbox_id,
        mailbox_key: info.mailbox_key,
        owner_key: info.owner_key,
        retention_ms: info.retention_ms,
        created_at_ms: info.created_at_ms,
        devices: info
            .devices
            .into_iter()
            .map(|(device_key, cursor)| DeviceJson { device_key, cursor })
            .collect(),
        messages: info.messages,
        bytes: info.bytes,
        last_seq: info.last_seq,
        prekeys_left,
    })
}

/// The mailbox's information (for its owner's devices).
#[utoipa::path(get, path = "/v1/mailboxes/{id}", tag = "mailboxes",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    responses((status = 200, body = InfoResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_mailbox(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<InfoResponse>> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    Ok(axum::Json(info_response(&node, &mailbox).await?))
}

/// Polls for messages after a cursor; with `wait`, long-polls until one arrives.
#[utoipa::path(get, path = "/v1/mailboxes/{id}/messages", tag = "messages",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64), PollQuery),
    responses((status = 200, body = MessagesResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn poll(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> ApiResult<axum::Json<MessagesResponse>> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    let limit = q
        .limit
        .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX))
        .clamp(1, node.config().api.poll_limit_max.max(1));
    let wait_ms = q.wait.unwrap_or(0).min(node.config().api.wait_ms_max);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut _slot = None;
    loop {
        let notified = node.shared.new_messages.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (device, after) = (auth.0.device, q.after);
        let (messages, last_seq) = node
            .with_core(move |core| -> Result<_, MailboxError> {
                core.load_mailbox(&mailbox)?;
                let messages = core.fetch(now(), &mailbox, &device, after, limit)?;
                Ok((messages, core.last_seq(&mailbox)?))
            })
            .await??;
        if !messages.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(axum::Json(MessagesResponse {
                messages: messages.into_iter().map(MessageJson::from).collect(),
                last_seq,
            }));
        }
        if _slot.is_none() {
            _slot = Some(Slot::take(&node, &mailbox)?);
        }
        // A guard, so that a client hanging up mid-wait (the future is dropped) still
        // decrements the gauge.
        let _waiting = Waiting::new(&node);
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

/// Acknowledges messages for this device (cumulative). A message is deleted once every
/// registered device has acknowledged it.
#[utoipa::path(post, path = "/v1/mailboxes/{id}/ack", tag = "messages",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    request_body = AckRequest,
    responses((status = 200, body = AckResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn ack(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AckRequest>,
) -> ApiResult<axum::Json<AckResponse>> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    let device = auth.0.device;
    let cursor = node
        .with_core(move |core| core.ack(&mailbox, &device, req.up_to))
        .await??;
    Ok(axum::Json(AckResponse { cursor }))
}

/// Issues a one-time ticket for opening a stream.
#[utoipa::path(post, path = "/v1/mailboxes/{id}/stream-ticket", tag = "messages",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    responses((status = 200, body = TokenResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
async fn stream_ticket(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<TokenResponse>> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    let (ticket, expires) = node.sessions().ticket(now(), auth.0)?;
    Ok(axum::Json(TokenResponse {
        token: hex::encode(ticket),
        expires_at_ms: expires.0,
    }))
}

/// WebSocket stream: pushes new messages as `{"type":"message"}` frames and takes
/// `{"type":"ack","up_to":N}` frames. Closed after `api.stream_idle_ms` without traffic or
/// when the session expires.
#[utoipa::path(get, path = "/v1/mailboxes/{id}/stream", tag = "messages",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64), StreamQuery,
        ("Connection" = String, Header, description = "WebSocket handshake (RFC 6455)",
            pattern = "^[Uu]pgrade$"),
        ("Upgrade" = String, Header, description = "WebSocket handshake",
            pattern = "^websocket$"),
        ("Sec-WebSocket-Version" = String, Header, description = "WebSocket handshake",
            pattern = "^13$"),
        ("Sec-WebSocket-Key" = String, Header,
            description = "WebSocket handshake: 16 random bytes, base64",
            pattern = "^[A-Za-z0-9+/]{22}==$", min_length = 24, max_length = 24)),
    responses((status = 101, description = "WebSocket upgrade; frames are StreamEvent / StreamCommand JSON"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 426, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn stream(
    State(node): State<MailboxNode>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamQuery>,
    ApiUpgrade(upgrade): ApiUpgrade,
) -> ApiResult<Response> {
    let mailbox = mailbox_id(&id)?;
    let ticket = q
        .ticket()
        .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "malformed ticket"))?;
    // The slot first: a 429 must not burn the ticket.
    let slot = Slot::take(&node, &mailbox)?;
    let session = node
        .sessions()
        .redeem(now(), &mailbox, &ticket)
        .map_err(|e| {
            node.metrics().auth_failures.fetch_add(1, Ordering::Relaxed);
            ApiError::from(e)
        })?;
    // Validate the starting cursor before upgrading.
    let (device, after) = (session.device, q.after);
    node.with_core(move |core| {
        core.load_mailbox(&mailbox)?;
        core.fetch(now(), &mailbox, &device, after, 1).map(|_| ())
    })
    .await??;
    // Frames are capped like messages: tungstenite reads a whole frame (16 MiB by default)
    // before it checks the message size, so without this cap a client made the node buffer
    // megabytes per stream (security review 6756e3f, finding 15).
    let cap = node.config().api.body_bytes_max;
    Ok(upgrade
        .max_message_size(cap)
        .max_frame_size(cap)
        .on_upgrade(move |socket| async move {
            node.metrics().streams_open.fetch_add(1, Ordering::Relaxed);
            run_stream(&node, socket, session, q.after).await;
            node.metrics().streams_open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        }))
}

async fn send_event(socket: &mut WebSocket, event: &StreamEvent) -> bool {
    match serde_json::to_string(event) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

async fn run_stream(
    node: &MailboxNode,
    mut socket: WebSocket,
    session: Session,
    after: Option<u64>,
) {
    let idle = Duration::from_millis(node.config().api.stream_idle_ms.max(1));
    let mut sent_through = after;
    let mut last_activity = tokio::time::Instant::now();
    loop {
        let notified = node.shared.new_messages.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Ends with its session: expiry, logout, device removal or erasure (those wake every
        // stream, see `revoked`).
        if !node.sessions().is_live(now(), &session.token_hash) {
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
        // Push everything new.
        let limit = node.config().api.poll_limit_max;
        let batch = node
            .with_core(move |core| {
                core.load_mailbox(&session.mailbox)?;
                core.fetch(
                    now(),
                    &session.mailbox,
                    &session.device,
                    sent_through,
                    limit,
                )
            })
            .await
            .and_then(|r| r);
        // Checked again after the fetch: a logout (or removal, erasure) that completed while
        // the fetch ran must not see a message deposited after it pushed (the first check
        // alone raced with it: `ending_the_session_ends_its_open_stream` failed once in CI).
        if !node.sessions().is_live(now(), &session.token_hash) {
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
        match batch {
            Ok(messages) => {
                let more = !messages.is_empty();
                for m in messages {
                    sent_through = Some(m.seq);
                    let event = StreamEvent::Message {
                        message: MessageJson::from(m),
                    };
                    if !send_event(&mut socket, &event).await {
                        return;
                    }
                    last_activity = tokio::time::Instant::now();
                }
                if more {
                    continue;
                }
            }
            Err(e) => {
                let _ = send_event(
                    &mut socket,
                    &StreamEvent::Error {
                        error: e.kind().into(),
                        message: ApiError::from(e).message,
                    },
                )
                .await;
                return;
            }
        }
        tokio::select! {
            biased;
            incoming = socket.recv() => {
                let Some(Ok(frame)) = incoming else { return };
                last_activity = tokio::time::Instant::now();
                match frame {
                    Message::Text(text) => {
                        let event = match serde_json::from_str::<StreamCommand>(&text) {
                            Ok(StreamCommand::Ack { up_to }) => {
                                let acked = node
                                    .with_core(move |core| {
                                        core.ack(&session.mailbox, &session.device, up_to)
                                    })
                                    .await
                                    .and_then(|r| r);
                                match acked {
                                    Ok(cursor) => StreamEvent::Acked { cursor },
                                    Err(e) => StreamEvent::Error {
                                        error: e.kind().into(),
                                        message: ApiError::from(e).message,
                                    },
                                }
                            }
                            Err(_) => StreamEvent::Error {
                                error: "bad_request".into(),
                                message: "expected {\"type\":\"ack\",\"up_to\":N}".into(),
                            },
                        };
                        if !send_event(&mut socket, &event).await {
                            return;
                        }
                    }
                    Message::Close(_) => return,
                    _ => {}
                }
            }
            () = &mut notified => {}
            () = tokio::time::sleep_until(last_activity + idle) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// Registers another device (signed by the owner).
#[utoipa::path(post, path = "/v1/mailboxes/{id}/devices", tag = "mailboxes",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    request_body = DeviceRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn add_device(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<DeviceRequest>,
) -> ApiResult<StatusCode> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    let (device, signature) = req.validate().map_err(bad_body)?;
    node.with_core(move |core| core.add_device(&mailbox, device, &signature))
        .await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a device (owner session only; the owner key itself cannot be removed).
#[utoipa::path(delete, path = "/v1/mailboxes/{id}/devices/{device}", tag = "mailboxes",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64),
        ("device" = String, Path, description = "Device key, 32 bytes hex",
            pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn remove_device(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath((id, device)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    owner_only(&node, &auth, &mailbox).await?;
    let device = hex32("device", &device)?;
    node.with_core(move |core| core.remove_device(&mailbox, &device))
        .await??;
    node.sessions().revoke(&mailbox, Some(&device));
    revoked(&node);
    Ok(StatusCode::NO_CONTENT)
}

/// Wakes every open stream so that those whose session just ended close.
fn revoked(node: &MailboxNode) {
    node.shared.new_messages.notify_waiters();
}

async fn owner_only(node: &MailboxNode, auth: &Authed, mailbox: &MailboxId) -> ApiResult<()> {
    let (mailbox, device) = (*mailbox, auth.0.device);
    // An unknown mailbox is 404 (`unknown_mailbox`), not 403: the session may have outlived it.
    if !node
        .with_core(move |core| core.owner_check(&mailbox, &device))
        .await??
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the owner key's session may do this",
        ));
    }
    Ok(())
}

/// Replaces the mailbox's prekeys (public keys, each signed by the owner; owner session only).
#[utoipa::path(put, path = "/v1/mailboxes/{id}/prekeys", tag = "prekeys",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    request_body = PrekeysRequest,
    responses((status = 200, body = PrekeysResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn put_prekeys(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PrekeysRequest>,
) -> ApiResult<axum::Json<PrekeysResponse>> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    // Owner only: another device could re-upload owner-signed one-time keys already handed
    // out (security review 6756e3f, finding 15).
    owner_only(&node, &auth, &mailbox).await?;
    let fields = req.validate().map_err(bad_body)?;
    let upload = PrekeyUpload {
        identity_key: fields.identity_key,
        identity_signature: fields.identity_signature,
        prekeys: fields.prekeys,
    };
    let one_time_keys = node
        .with_core(move |core| core.put_prekeys(&mailbox, upload))
        .await??;
    Ok(axum::Json(PrekeysResponse { one_time_keys }))
}

/// Exports the mailbox: its information and every stored message, still sealed.
#[utoipa::path(get, path = "/v1/mailboxes/{id}/export", tag = "mailboxes",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    responses((status = 200, body = ExportResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn export(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<axum::Json<ExportResponse>> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    let info = info_response(&node, &mailbox).await?;
    let t = now();
    let (_, messages) = node
        .with_core(move |core| {
            core.load_mailbox(&mailbox)?;
            core.export(t, &mailbox)
        })
        .await??;
    Ok(axum::Json(ExportResponse {
        version: 1,
        exported_at_ms: t.0,
        mailbox: info,
        messages: messages.into_iter().map(MessageJson::from).collect(),
    }))
}

/// Erases the mailbox (owner session only): its data key first (crypto-erasure), then every
/// record; every session of the mailbox ends.
#[utoipa::path(delete, path = "/v1/mailboxes/{id}", tag = "mailboxes",
    params(("id" = String, Path, description = "Mailbox id, 32 bytes hex",
        pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
async fn erase(
    State(node): State<MailboxNode>,
    auth: Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let mailbox = mailbox_id(&id)?;
    auth.for_mailbox(&mailbox)?;
    owner_only(&node, &auth, &mailbox).await?;
    node.with_core(move |core| core.erase(&mailbox)).await??;
    node.sessions().revoke(&mailbox, None);
    revoked(&node);
    tracing::info!(mailbox = %crate::pii::Tag::of(mailbox.as_bytes()), "mailbox erased");
    Ok(StatusCode::NO_CONTENT)
}

/// Liveness: 200 while the store accepts writes, 503 once it is poisoned.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "ok", body = String, content_type = "text/plain"),
        (status = 429, body = ErrorBody),
        (status = 503, description = "store poisoned (or the mesh unhealthy)", body = String,
            content_type = "text/plain")))]
async fn healthz(State(node): State<MailboxNode>) -> Response {
    if node.is_healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store poisoned\n").into_response()
    }
}

/// Prometheus metrics (no ids in labels): a snapshot at most `api.metrics_interval_ms` old.
/// Served here only when the API listener is a loopback address and no `api.metrics_listen`
/// is set; otherwise 404 (scrape the metrics listener).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", body = String,
            content_type = "text/plain"),
        (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn metrics(State(node): State<MailboxNode>) -> Response {
    if !node.config().api.metrics_on_api() {
        return fallback().await.into_response();
    }
    published_metrics(&node)
}

/// `/metrics` on the metrics listener.
async fn metrics_on_listener(State(node): State<MailboxNode>) -> Response {
    published_metrics(&node)
}

fn published_metrics(node: &MailboxNode) -> Response {
    let text = node
        .shared
        .metrics_snapshot
        .get(std::time::Instant::now(), || render_metrics(node));
    let mut response = text.to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn render_metrics(node: &MailboxNode) -> String {
    let m = node.metrics();
    let (stats, store, poisoned, sync_latency) = {
        let core = node.core();
        let store = core.store();
        (
            core.stats(),
            crate::store::MailboxStore::stats(store),
            crate::store::MailboxStore::is_poisoned(store),
            crate::store::MailboxStore::sync_latency(store).map(|h| {
                h.render(
                    "whispr_mailbox_sync_seconds",
                    "Duration of the store's synced RocksDB writes (coarse buckets, no sum).",
                )
            }),
        )
    };
    let sessions = node.sessions().session_count();
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP whispr_mailbox_{name} {help}\n# TYPE whispr_mailbox_{name} {kind}\nwhispr_mailbox_{name} {value}\n"
        ));
    };
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    line(
        "deposits_stored_total",
        "counter",
        "Deposits stored.",
        c(&m.deposits_stored),
    );
    line(
        "deposits_duplicate_total",
        "counter",
        "Redelivered deposits acknowledged again.",
        c(&m.deposits_duplicate),
    );
    line(
        "deposits_refused_total",
        "counter",
        "Deposits refused.",
        c(&m.deposits_refused),
    );
    line(
        "commit_batches_total",
        "counter",
        "Group-commit writes.",
        c(&m.commit_batches),
    );
    line(
        "commit_batched_total",
        "counter",
        "Deposits in group-commit writes.",
        c(&m.commit_batched),
    );
    line(
        "replies_total",
        "counter",
        "SURB replies handed to the mesh.",
        c(&m.replies_sent),
    );
    line(
        "expired_deleted_total",
        "counter",
        "Expired messages deleted.",
        c(&m.swept),
    );
    line(
        "unused_erased_total",
        "counter",
        "Mailboxes erased unused (nobody logged in, no deposit) after their grace period.",
        c(&m.unused_erased),
    );
    line(
        "rate_limited_total",
        "counter",
        "Requests answered 429.",
        c(&m.rate_limited),
    );
    line(
        "auth_failures_total",
        "counter",
        "Failed authentications.",
        c(&m.auth_failures),
    );
    line(
        "streams_open",
        "gauge",
        "Open WebSocket streams.",
        c(&m.streams_open),
    );
    line(
        "polls_waiting",
        "gauge",
        "Long polls waiting.",
        c(&m.polls_waiting),
    );
    line("sessions", "gauge", "Live sessions.", sessions as u64);
    line("mailboxes", "gauge", "Mailboxes held.", stats.mailboxes);
    line(
        "messages",
        "gauge",
        "Messages stored (in the loaded mailboxes).",
        stats.messages,
    );
    line(
        "mailboxes_unloaded",
        "gauge",
        "Mailboxes whose messages are not loaded yet since the start (not in messages, stored_bytes).",
        stats.mailboxes_unloaded,
    );
    line(
        "stored_bytes",
        "gauge",
        "Bytes of stored messages.",
        stats.bytes,
    );
    line(
        "wal_bytes_written_total",
        "counter",
        "Bytes written to the RocksDB WAL.",
        store.wal_bytes_written,
    );
    line(
        "sst_bytes_written_total",
        "counter",
        "Bytes written to SST files.",
        store.sst_bytes_written,
    );
    line(
        "synced_writes_total",
        "counter",
        "Synced RocksDB writes.",
        store.synced_writes,
    );
    line(
        "store_poisoned",
        "gauge",
        "1 once a store write failed: every later write is refused until a restart.",
        u64::from(poisoned),
    );
    let r = node.replica_stats();
    let rm = node.replica_metrics();
    for (name, help, value) in [
        (
            "replica_receipts_held_total",
            "Deposit receipts held for the write quorum.",
            r.receipts_held,
        ),
        (
            "replica_receipts_released_total",
            "Held receipts released (write quorum reached).",
            r.receipts_released,
        ),
        (
            "replica_receipts_timed_out_total",
            "Held receipts dropped: too few peers acknowledged in time.",
            r.receipts_timed_out,
        ),
        (
            "replica_receipts_dropped_total",
            "Receipts dropped: the held table was full.",
            r.receipts_dropped,
        ),
        (
            "replica_pushed_total",
            "Messages pushed to peer replicas.",
            r.pushed,
        ),
        (
            "replica_stored_from_peers_total",
            "Messages stored from peer replicas.",
            r.stored_from_peers,
        ),
        (
            "replica_refused_total",
            "Replica messages or items refused.",
            r.refused,
        ),
        (
            "replica_acks_applied_total",
            "Device acknowledgements applied from peers.",
            r.acks_applied,
        ),
        (
            "replica_tombstones_applied_total",
            "Messages deleted or ids marked gone by anti-entropy.",
            r.tombstones_applied,
        ),
        (
            "replica_pulled_total",
            "Messages asked from peers by anti-entropy.",
            r.pulled,
        ),
        (
            "replica_summaries_received_total",
            "Anti-entropy summaries received from peer replicas (one per peer per round).",
            r.summaries_received,
        ),
        (
            "replica_summaries_differing_total",
            "Anti-entropy summaries received that differed from this node's.",
            r.summaries_differing,
        ),
        (
            "replica_digests_sent_total",
            "Anti-entropy digests sent to peer replicas (for differing summary buckets).",
            r.digests_sent,
        ),
        (
            "replica_digest_mismatches_total",
            "Anti-entropy digests that differed.",
            r.digest_mismatches,
        ),
        (
            "replica_records_repaired_total",
            "Mailbox records recreated from peers.",
            r.records_repaired,
        ),
        (
            "replica_records_refused_total",
            "Mailbox records from peers refused.",
            r.records_refused,
        ),
        (
            "replica_erased_by_peer_total",
            "Mailboxes erased because a peer erased them.",
            r.erased_by_peer,
        ),
        (
            "replica_messages_sent_total",
            "Replica messages handed to the mesh.",
            c(&rm.sent),
        ),
        (
            "replica_messages_send_failed_total",
            "Replica messages the mesh refused.",
            c(&rm.send_failed),
        ),
        (
            "replica_messages_received_total",
            "Replica messages received.",
            c(&rm.received),
        ),
        (
            "replica_messages_malformed_total",
            "Replica messages that did not decode.",
            c(&rm.malformed),
        ),
    ] {
        line(name, "counter", help, value);
    }
    if let Some(text) = sync_latency {
        out.push_str(&text);
    }
    out.push_str(&node.backup_metrics().render("whispr_mailbox"));
    if let Some((mesh, mesh_metrics)) = node.mesh() {
        out.push_str(&mesh_metrics.render());
        out.push_str(&mesh.metrics_text());
    }
    out
}

/// The metrics listener's routes: `/metrics` and `/healthz`.
pub fn metrics_router(node: MailboxNode) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_on_listener))
        .route("/healthz", axum::routing::get(healthz))
        .fallback(fallback)
        .with_state(node)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Whispr Mesh mailbox node API",
        version = "1",
        description = "Owner API of a Whispr Mesh mailbox node. Deposits arrive through the mesh, not this API. See docs/mailbox.md."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, StreamEvent, StreamCommand))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// Completes the document's responses: every 429 carries `Retry-After` (seconds), and an
/// error response without a description gets the one of its status.
struct Contract;

/// What each error status means on this API.
fn status_description(status: &str) -> Option<&'static str> {
    Some(match status {
        "400" => "The request does not match this document (a malformed parameter or body).",
        "401" => {
            "Missing, malformed, expired or revoked session token or ticket; or a signature that \
             does not verify (`bad_signature`)."
        }
        "403" => "The session is for another mailbox, or is not the owner's (or its device's).",
        "404" => "No such mailbox on this node (erased, or never created here).",
        "409" => "A mailbox with this id already exists.",
        "413" => "The body is larger than the node's `api.body_bytes_max`.",
        "422" => {
            "Well-formed, but the node refuses its content (`invalid_argument`, `bad_cursor`): a \
             key that is not a curve point, a cursor beyond the last message, a value above the \
             node's limit."
        }
        "426" => "The connection cannot be upgraded to a WebSocket.",
        "200" => "Success.",
        "201" => "Created.",
        "204" => "Done (no body).",
        "429" => {
            "A rate limit or quota: per connection, per source address, per mailbox \
             (`rate_limited`, `quota_exceeded`). Retry after `Retry-After` seconds."
        }
        "503" => "The node's store cannot write (poisoned by a failed write): restart the node.",
        _ => return None,
    })
}

/// A `u64` is documented with `format: int64` and a maximum of 2^64 − 1, which contradict
/// each other (int64 ends at 2^63 − 1: a fuzzer took 2^63 for invalid, and the node accepts
/// it). The maximum is what the node accepts: the format goes.
fn exact_u64(schema: &mut utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>) {
    use utoipa::Number;
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::Schema;
    if let RefOr::T(Schema::Object(object)) = schema {
        let above_i64 = match object.maximum {
            Some(Number::UInt(max)) => u64::try_from(max).is_ok_and(|m| m > i64::MAX as u64),
            Some(Number::Float(max)) => max > 9.2e18,
            _ => false,
        };
        if above_i64 {
            object.format = None;
        }
        for property in object.properties.values_mut() {
            exact_u64(property);
        }
    }
}

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        if let Some(components) = openapi.components.as_mut() {
            for schema in components.schemas.values_mut() {
                exact_u64(schema);
            }
        }
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                for parameter in operation.parameters.iter_mut().flatten() {
                    if let Some(schema) = parameter.schema.as_mut() {
                        exact_u64(schema);
                    }
                }
                for (status, response) in &mut operation.responses.responses {
                    let RefOr::T(response) = response else {
                        continue;
                    };
                    if response.description.is_empty()
                        && let Some(text) = status_description(status)
                    {
                        response.description = text.to_string();
                    }
                    if status == "429" {
                        let seconds = ObjectBuilder::new()
                            .schema_type(Type::Integer)
                            .minimum(Some(1))
                            .build();
                        response.headers.insert(
                            "Retry-After".to_string(),
                            HeaderBuilder::new()
                                .schema(seconds)
                                .description(Some("Seconds to wait before retrying."))
                                .build(),
                        );
                    }
                }
            }
        }
    }
}

/// The API's routes and the OpenAPI document describing exactly them.
pub fn api_parts() -> (axum::Router<MailboxNode>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_mailbox))
        .routes(routes!(challenge))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(get_mailbox, erase))
        .routes(routes!(poll))
        .routes(routes!(ack))
        .routes(routes!(stream_ticket))
        .routes(routes!(stream))
        .routes(routes!(add_device))
        .routes(routes!(remove_device))
        .routes(routes!(put_prekeys))
        .routes(routes!(export))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .split_for_parts();
    // After the routes: their paths are in the document only now.
    utoipa::Modify::modify(&Contract, &mut doc);
    (router, doc)
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_parts().1
}

async fn fallback() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The complete router: API routes, `/v1/openapi.json`, limits.
pub fn router(node: MailboxNode) -> axum::Router {
    let (api, doc) = api_parts();
    let doc_json = serde_json::to_string(&doc).unwrap_or_default();
    let body_max = node.config().api.body_bytes_max;
    api.route(
        "/v1/openapi.json",
        axum::routing::get(move || async move {
            (
                [(header::CONTENT_TYPE, "application/json")],
                doc_json.clone(),
            )
        }),
    )
    .fallback(fallback)
    .layer(axum::middleware::from_fn_with_state(
        node.clone(),
        limit_connection,
    ))
    .layer(DefaultBodyLimit::max(body_max))
    .with_state(node)
}
