//! HTTP to the nodes: the directory, an edge relay's packet ingress, and the mailbox API
//! (`docs/mailbox.md`). Every error comes back typed; nothing here logs ids or tokens.

use std::time::Duration;

use ed25519_dalek::ed25519::signature::Signer;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use whispr_protocol::consensus::{CONSENSUS_LEN_MAX, Consensus, Network, VerifiedConsensus};
use whispr_protocol::directory::{DIRECTORY_LEN_MAX, Directory};
use whispr_protocol::mailbox_api::{create_transcript_v2, login_transcript, node_audience};
use whispr_protocol::{MailboxId, NodeId, UnixTime};

use crate::error::{ClientError, Result};
use crate::state::{OwnedMailbox, Replica};

pub use crate::core::StoredMessage;

/// Connection timeout to a mailbox replica.
pub const MAILBOX_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than its wait a poll of a replica may take before it counts as failed (and
/// reading fails over to the next replica).
pub const POLL_GRACE: Duration = Duration::from_secs(3);
/// Timeout of the other calls to a mailbox replica (login, ack, create, prekeys).
pub const MAILBOX_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The most the client reads of an error answer (its JSON `error`/`message`).
pub const ERROR_BODY_MAX: usize = 16 * 1024;
/// The most the client reads of a small JSON answer (challenge, login, ticket, submit results).
pub const SMALL_BODY_MAX: usize = 256 * 1024;
/// The most the client reads of one page of messages: `limit=100` envelopes of at most a
/// Sphinx payload each, base64 in JSON, with room to spare.
pub const PAGE_BODY_MAX: usize = 4 * 1024 * 1024;
/// The most the client reads of a mailbox export (a node stores at most 64 MiB of envelopes
/// per mailbox by default; base64 adds a third).
pub const EXPORT_BODY_MAX: usize = 128 * 1024 * 1024;

/// Reads `r`'s body, refusing (and no longer reading) past `max` bytes: a node, or whatever
/// answers in its place, cannot make the client buffer an unbounded answer.
async fn read_capped(mut r: reqwest::Response, max: usize, node: &'static str) -> Result<Vec<u8>> {
    let too_large = ClientError::ResponseTooLarge { node, max };
    if r.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(unreachable(node))? {
        if body.len() + chunk.len() > max {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `r`'s body as JSON of type `T`, read up to `max` bytes (see [`read_capped`]).
async fn json_capped<T: serde::de::DeserializeOwned>(
    r: reqwest::Response,
    max: usize,
    node: &'static str,
) -> Result<T> {
    let body = read_capped(r, max, node).await?;
    serde_json::from_slice(&body).map_err(|_| ClientError::Unreachable {
        node,
        reason: "answered something that is not the expected JSON".to_string(),
    })
}

/// The HTTP client.
#[derive(Clone, Debug)]
pub struct Net {
    http: reqwest::Client,
}

async fn error_of(node: &'static str, r: reqwest::Response) -> ClientError {
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = json_capped(r, ERROR_BODY_MAX, node)
        .await
        .unwrap_or(Value::Null);
    let mut message = body
        .get("message")
        .unwrap_or(&Value::Null)
        .as_str()
        .unwrap_or("")
        .to_string();
    if let Some(s) = retry {
        message = format!("{message} (retry after {s} s)");
    }
    ClientError::Node {
        node,
        status,
        kind: body
            .get("error")
            .unwrap_or(&Value::Null)
            .as_str()
            .unwrap_or("unknown")
            .to_string(),
        message,
    }
}

fn unreachable(node: &'static str) -> impl FnOnce(reqwest::Error) -> ClientError {
    move |e| ClientError::Unreachable {
        node,
        reason: if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_decode() {
            "answered something that is not the expected JSON".to_string()
        } else if e.is_connect() {
            "connection failed".to_string()
        } else {
            "request failed".to_string()
        },
    }
}

pub use crate::core::owner_key;

/// An HTTP method of the mailbox API.
#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Net {
    /// One call to the mailbox API of `m` on its replica `r`: `path` below
    /// `/v1/mailboxes/{id}`, with the session token and a JSON body if given; the response if
    /// it succeeded, else the typed error.
    async fn mailbox_call(
        &self,
        method: Method,
        (m, r): (&OwnedMailbox, &Replica),
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response> {
        let url = format!("{}/v1/mailboxes/{}{path}", r.api_url, hex::encode(m.id));
        let request = match method {
            Method::Get => self.http.get(url),
            Method::Post => self.http.post(url),
            Method::Put => self.http.put(url),
            Method::Delete => self.http.delete(url),
        }
        .bearer_auth(token);
        let request = match body {
            Some(b) => request.json(b),
            None => request,
        };
        let r = request
            .timeout(MAILBOX_CALL_TIMEOUT)
            .send()
            .await
            .map_err(unreachable("mailbox"))?;
        if !r.status().is_success() {
            return Err(error_of("mailbox", r).await);
        }
        Ok(r)
    }

    /// A client with sane timeouts (long polls add their wait).
    pub fn new() -> Result<Net> {
        Self::with_connect_timeout(Duration::from_secs(5))
    }

    /// A client for one mailbox's replicas: a short connection timeout, so that reading
    /// fails over to the next replica within seconds when one is unreachable.
    pub fn for_mailbox() -> Result<Net> {
        Self::with_connect_timeout(MAILBOX_CONNECT_TIMEOUT)
    }

    fn with_connect_timeout(connect: Duration) -> Result<Net> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(connect)
            .timeout(Duration::from_secs(60))
            // Nodes close a connection that sends no request for 30 s
            // (`whispr_relay::http::HEADER_READ_TIMEOUT`): never reuse one that close to it.
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .map_err(|_| ClientError::Unreachable {
                node: "http client",
                reason: "could not be built".to_string(),
            })?;
        Ok(Net { http })
    }

    /// The directory of the first consensus, fetched from `urls` in order (a mirror first,
    /// then each pinned authority's `/v1/consensus`), that carries the threshold of valid
    /// signatures of `network`'s authorities, is valid at `now` and is not older than
    /// `min_epoch` (an old consensus replayed within its validity). Anything else is refused,
    /// whatever served it; with every source refused, the last reason is returned.
    pub async fn directory(
        &self,
        urls: &[String],
        network: &Network,
        now: UnixTime,
        min_epoch: Option<u64>,
    ) -> Result<Directory> {
        let mut last = ClientError::Unreachable {
            node: "directory",
            reason: "no source".to_string(),
        };
        for url in urls {
            match self.consensus(url, network, now).await {
                Ok(v) if min_epoch.is_some_and(|m| v.epoch < m) => {
                    last = ClientError::Protocol(whispr_protocol::Error::Malformed {
                        what: "consensus",
                        reason: "older than the one already accepted",
                    });
                }
                Ok(v) => return Ok(Directory::from_consensus(now, &v)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn consensus(
        &self,
        url: &str,
        network: &Network,
        now: UnixTime,
    ) -> Result<VerifiedConsensus> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(unreachable("directory"))?;
        if !r.status().is_success() {
            return Err(error_of("directory", r).await);
        }
        let bytes = read_capped(r, CONSENSUS_LEN_MAX, "directory").await?;
        Ok(Consensus::decode(&bytes)?.verify(now, network)?)
    }

    /// Fetches a plain directory of self-signed descriptors, trusting whoever serves it: what
    /// a node hears on the mesh (`GET /v1/directory`), for the devnet supervisor's check that
    /// the nodes hear each other. A client never routes by it: [`crate::Client`] accepts only
    /// a consensus of its pinned authorities.
    pub async fn unpinned_directory(&self, url: &str, now: UnixTime) -> Result<Directory> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(unreachable("directory"))?;
        if !r.status().is_success() {
            return Err(error_of("directory", r).await);
        }
        let bytes = read_capped(r, DIRECTORY_LEN_MAX, "directory").await?;
        Ok(Directory::decode(now, &bytes)?.0)
    }

    /// Posts packets to an edge relay; the per-packet results (`ok` or a drop reason).
    pub async fn submit(&self, api: &str, packets: &[Vec<u8>]) -> Result<Vec<String>> {
        let body: Vec<u8> = packets.concat();
        let r = self
            .http
            .post(format!("{api}/v1/packets"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(unreachable("edge relay"))?;
        if !r.status().is_success() {
            return Err(error_of("edge relay", r).await);
        }
        let v: Value = json_capped(r, SMALL_BODY_MAX, "edge relay").await?;
        Ok(v.get("results")
            .unwrap_or(&Value::Null)
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("unknown").to_string())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Creates `m` on its replica `r`: the create request names the whole replica set, in
    /// pinned order, and is signed over the v2 transcript (`docs/replication.md`). A mailbox
    /// that exists there already (409: created before, or repaired from a peer) counts as
    /// created.
    pub async fn create_mailbox(
        &self,
        (m, r): (&OwnedMailbox, &Replica),
        mailbox_key: [u8; 32],
        retention_ms: u64,
    ) -> Result<()> {
        let owner = owner_key(m);
        let owner_pub = owner.verifying_key().to_bytes();
        let hash: [u8; 32] = Sha256::digest(m.access).into();
        let replicas: Vec<NodeId> = m.replicas.iter().map(|r| NodeId(r.node)).collect();
        let transcript = create_transcript_v2(
            &MailboxId(m.id),
            &mailbox_key,
            &owner_pub,
            &hash,
            Some(&m.reply_key),
            retention_ms,
            &replicas,
        )
        .ok_or_else(|| {
            ClientError::InvalidArgument("a replica set of 1 to 5 nodes is needed".to_string())
        })?;
        let body = json!({
            "mailbox_id": hex::encode(m.id),
            "mailbox_key": hex::encode(mailbox_key),
            "owner_key": hex::encode(owner_pub),
            "access_key_hash": hex::encode(hash),
            "reply_key": hex::encode(m.reply_key),
            "retention_ms": retention_ms,
            "replicas": replicas.iter().map(|n| hex::encode(n.0)).collect::<Vec<_>>(),
            "signature": hex::encode(owner.sign(&transcript).to_bytes()),
        });
        let resp = self
            .http
            .post(format!("{}/v1/mailboxes", r.api_url))
            .timeout(MAILBOX_CALL_TIMEOUT)
            .json(&body)
            .send()
            .await
            .map_err(unreachable("mailbox"))?;
        match resp.status().as_u16() {
            201 | 409 => Ok(()),
            _ => Err(error_of("mailbox", resp).await),
        }
    }

    /// Logs in to `m` on its replica `r` (challenge, signed login); the token and its expiry.
    pub async fn login(&self, (m, r): (&OwnedMailbox, &Replica)) -> Result<(String, u64)> {
        let owner = owner_key(m);
        let device = hex::encode(owner.verifying_key().to_bytes());
        let mailbox = hex::encode(m.id);
        let node = NodeId(r.node);
        let api = &r.api_url;
        let r = self
            .http
            .post(format!("{api}/v1/auth/challenge"))
            .timeout(MAILBOX_CALL_TIMEOUT)
            .json(&json!({"mailbox_id": mailbox, "device_key": device}))
            .send()
            .await
            .map_err(unreachable("mailbox"))?;
        if !r.status().is_success() {
            return Err(error_of("mailbox", r).await);
        }
        let c: Value = json_capped(r, SMALL_BODY_MAX, "mailbox").await?;
        let mut challenge = [0u8; 32];
        hex::decode_to_slice(
            c.get("challenge")
                .unwrap_or(&Value::Null)
                .as_str()
                .unwrap_or(""),
            &mut challenge,
        )
        .map_err(|_| ClientError::Node {
            node: "mailbox",
            status: 200,
            kind: "malformed".to_string(),
            message: "challenge is not 32 hex bytes".to_string(),
        })?;
        let audience = c
            .get("audience")
            .unwrap_or(&Value::Null)
            .as_str()
            .unwrap_or("");
        // Sign only for the node we meant: a node asking for another audience may be relaying
        // another node's challenge, to log in there with our signature.
        let expected = node_audience(&node);
        if audience != expected {
            return Err(ClientError::Node {
                node: "mailbox",
                status: 200,
                kind: "wrong_audience".to_string(),
                message: "the node asked for a login signature for another node".to_string(),
            });
        }
        let signature = owner.sign(&login_transcript(
            &expected,
            &MailboxId(m.id),
            &owner.verifying_key().to_bytes(),
            &challenge,
        ));
        let r = self
            .http
            .post(format!("{api}/v1/auth/login"))
            .timeout(MAILBOX_CALL_TIMEOUT)
            .json(&json!({
                "mailbox_id": mailbox, "device_key": device,
                "challenge": hex::encode(challenge),
                "signature": hex::encode(signature.to_bytes()),
            }))
            .send()
            .await
            .map_err(unreachable("mailbox"))?;
        if !r.status().is_success() {
            return Err(error_of("mailbox", r).await);
        }
        let v: Value = json_capped(r, SMALL_BODY_MAX, "mailbox").await?;
        Ok((
            v.get("token")
                .unwrap_or(&Value::Null)
                .as_str()
                .unwrap_or("")
                .to_string(),
            v.get("expires_at_ms")
                .unwrap_or(&Value::Null)
                .as_u64()
                .unwrap_or(0),
        ))
    }

    /// Messages of `m` on its replica `r` after that replica's cursor, waiting up to `wait`
    /// for one; a replica that does not answer within [`POLL_GRACE`] past the wait fails.
    pub async fn poll(
        &self,
        (m, r): (&OwnedMailbox, &Replica),
        token: &str,
        wait: Duration,
    ) -> Result<Vec<StoredMessage>> {
        let r = self
            .http
            .get(format!(
                "{}/v1/mailboxes/{}/messages?after={}&limit=100&wait={}",
                r.api_url,
                hex::encode(m.id),
                r.cursor,
                wait.as_millis()
            ))
            .bearer_auth(token)
            .timeout(wait + POLL_GRACE)
            .send()
            .await
            .map_err(unreachable("mailbox"))?;
        if !r.status().is_success() {
            return Err(error_of("mailbox", r).await);
        }
        #[derive(Deserialize)]
        struct Page {
            messages: Vec<StoredMessage>,
        }
        let page: Page = json_capped(r, PAGE_BODY_MAX, "mailbox").await?;
        Ok(page.messages)
    }

    /// Acknowledges every message of `m` on replica `r` up to `up_to` (the node deletes
    /// them, and tells its peers).
    pub async fn ack(&self, m: (&OwnedMailbox, &Replica), token: &str, up_to: u64) -> Result<()> {
        self.mailbox_call(
            Method::Post,
            m,
            "/ack",
            token,
            Some(&json!({ "up_to": up_to })),
        )
        .await
        .map(drop)
    }

    /// Replaces the prekeys of `m` on replica `r` (`body` as in `docs/mailbox.md`).
    pub async fn put_prekeys(
        &self,
        m: (&OwnedMailbox, &Replica),
        token: &str,
        body: &Value,
    ) -> Result<()> {
        self.mailbox_call(Method::Put, m, "/prekeys", token, Some(body))
            .await
            .map(drop)
    }

    /// Registers device key `device` on `m` at replica `r` (owner session, owner-signed;
    /// registering it again is no error).
    pub async fn add_device(
        &self,
        m: (&OwnedMailbox, &Replica),
        token: &str,
        device: &[u8; 32],
    ) -> Result<()> {
        let signature = owner_key(m.0).sign(&whispr_protocol::mailbox_api::device_transcript(
            &MailboxId(m.0.id),
            device,
        ));
        let body = json!({
            "device_key": hex::encode(device),
            "signature": hex::encode(signature.to_bytes()),
        });
        self.mailbox_call(Method::Post, m, "/devices", token, Some(&body))
            .await
            .map(drop)
    }

    /// Removes device key `device` from `m` at replica `r` (owner session): it can no longer
    /// log in there, and its sessions end.
    pub async fn remove_device(
        &self,
        m: (&OwnedMailbox, &Replica),
        token: &str,
        device: &[u8; 32],
    ) -> Result<()> {
        let path = format!("/devices/{}", hex::encode(device));
        match self
            .mailbox_call(Method::Delete, m, &path, token, None)
            .await
        {
            // Gone already: removed through a peer replica (removals replicate), or the
            // mailbox is.
            Ok(_) | Err(ClientError::Node { status: 404, .. }) => Ok(()),
            Err(ClientError::Node { kind, .. }) if kind == "unknown_device" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A one-time ticket for the WebSocket stream of `m` on replica `r`.
    pub async fn stream_ticket(&self, m: (&OwnedMailbox, &Replica), token: &str) -> Result<String> {
        let r = self
            .mailbox_call(Method::Post, m, "/stream-ticket", token, None)
            .await?;
        let v: Value = json_capped(r, SMALL_BODY_MAX, "mailbox").await?;
        Ok(v.get("token")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }

    /// Erases `m` on replica `r` (owner session): the node deletes its data key first
    /// (crypto-erasure), then every record, ends every session of it, and tells the other
    /// replicas (`docs/mailbox.md`, *Export and erasure*).
    pub async fn erase(&self, m: (&OwnedMailbox, &Replica), token: &str) -> Result<()> {
        self.mailbox_call(Method::Delete, m, "", token, None)
            .await
            .map(drop)
    }

    /// The raw export of `m` on replica `r` (to check what a node still stores).
    pub async fn export(&self, m: (&OwnedMailbox, &Replica), token: &str) -> Result<Value> {
        let r = self
            .mailbox_call(Method::Get, m, "/export", token, None)
            .await?;
        json_capped(r, EXPORT_BODY_MAX, "mailbox").await
    }
}

/// The WebSocket address of `m`'s stream on replica `r` after that replica's cursor, for a
/// ticket: `wss://` for a node served over HTTPS, `ws://` for a plain-HTTP (loopback or devnet)
/// node.
pub fn stream_url((m, r): (&OwnedMailbox, &Replica), ticket: &str) -> Result<String> {
    let (scheme, rest) = if let Some(rest) = r.api_url.strip_prefix("https://") {
        ("wss", rest)
    } else if let Some(rest) = r.api_url.strip_prefix("http://") {
        ("ws", rest)
    } else {
        return Err(ClientError::InvalidArgument(
            "a mailbox API address must start with https:// or http://".to_string(),
        ));
    };
    Ok(format!(
        "{scheme}://{}/v1/mailboxes/{}/stream?ticket={ticket}&after={}",
        rest.trim_end_matches('/'),
        hex::encode(m.id),
        r.cursor
    ))
}

/// The most the client reads of one stream frame or message: one stored message as JSON (an
/// envelope of at most a Sphinx payload, base64) with room to spare. tungstenite's defaults
/// (16 MiB frames, 64 MiB messages) would let a node make the client buffer that much.
pub const STREAM_MESSAGE_MAX: usize = 256 * 1024;

/// The TLS configuration of `wss://` streams: TLS 1.3 only (what every node's public listener
/// speaks), the platform's certificate verifier.
pub fn stream_tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_platform_verifier()
        .map_err(|_| ClientError::Unreachable {
            node: "mailbox",
            reason: "no TLS certificate verifier on this platform".to_string(),
        })?
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Connects to a mailbox stream and forwards every message to `tx` with the mailbox id (hex);
/// returns when the stream ends (idle timeout, session expiry, node restart) or `tx` closes.
/// A `wss://` URL is verified with the platform's roots ([`stream_tls_config`]).
pub async fn run_stream(
    url: String,
    mailbox: String,
    tx: tokio::sync::mpsc::Sender<(String, StoredMessage)>,
) -> Result<()> {
    let tls = if url.starts_with("wss://") {
        Some(stream_tls_config()?)
    } else {
        None
    };
    run_stream_with(url, mailbox, tx, tls).await
}

/// [`run_stream`] with the TLS configuration of `wss://` URLs given (a private CA's roots).
pub async fn run_stream_with(
    url: String,
    mailbox: String,
    tx: tokio::sync::mpsc::Sender<(String, StoredMessage)>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    let failed = |reason: &str| ClientError::Unreachable {
        node: "mailbox",
        reason: reason.to_string(),
    };
    let ws_config = WebSocketConfig::default()
        .max_frame_size(Some(STREAM_MESSAGE_MAX))
        .max_message_size(Some(STREAM_MESSAGE_MAX));
    let request = url
        .as_str()
        .into_client_request()
        .map_err(|_| ClientError::InvalidArgument("not a stream URL".to_string()))?;
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| ClientError::InvalidArgument("a stream URL needs a host".to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    match uri.scheme_str() {
        Some("wss") => {
            let tls = match tls {
                Some(c) => c,
                None => stream_tls_config()?,
            };
            let port = uri.port_u16().unwrap_or(443);
            let server_name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| ClientError::InvalidArgument("not a TLS server name".to_string()))?;
            let tcp = tokio::time::timeout(
                MAILBOX_CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            .map_err(|_| failed("stream connection timed out"))?
            .map_err(|_| failed("stream connection failed"))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await
                .map_err(|_| failed("TLS handshake failed (untrusted certificate?)"))?;
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config))
                    .await
                    .map_err(|_| failed("stream connection failed"))?;
            pump(ws, mailbox, tx).await
        }
        Some("ws") => {
            let (ws, _) =
                tokio_tungstenite::connect_async_with_config(request, Some(ws_config), false)
                    .await
                    .map_err(|_| failed("stream connection failed"))?;
            pump(ws, mailbox, tx).await
        }
        _ => Err(ClientError::InvalidArgument(
            "a stream URL starts with wss:// or ws://".to_string(),
        )),
    }
}

/// Forwards the messages of an open stream to `tx` until it ends.
async fn pump<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    mailbox: String,
    tx: tokio::sync::mpsc::Sender<(String, StoredMessage)>,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    while let Some(frame) = ws.next().await {
        let Ok(tokio_tungstenite::tungstenite::Message::Text(text)) = frame else {
            if frame.is_err() {
                break;
            }
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if v.get("type").and_then(Value::as_str) != Some("message") {
            continue;
        }
        let Some(Ok(msg)) = v
            .get("message")
            .cloned()
            .map(serde_json::from_value::<StoredMessage>)
        else {
            continue;
        };
        if tx.send((mailbox.clone(), msg)).await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A hostile node: answers any request with `head` and then an endless chunked body,
    /// counting the bytes the client took before it hung up.
    async fn endless_answer(head: &'static str) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = conn.read(&mut request).await;
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                    while conn.write_all(chunk.as_bytes()).await.is_ok() {
                        counter.fetch_add(0x10000, Ordering::Relaxed);
                    }
                });
            }
        });
        (url, sent)
    }

    #[tokio::test]
    async fn an_endless_answer_is_refused_at_the_bound_not_buffered() {
        // Review finding 15 ("client trusts unbounded responses"). Before: the client read
        // the whole body before looking at it, so it kept reading (and buffering) for as long
        // as the node kept sending.
        let (url, sent) =
            endless_answer("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
        let net = Net::new().unwrap();
        let result =
            tokio::time::timeout(Duration::from_secs(20), net.submit(&url, &[vec![0u8; 16]])).await;
        let taken = sent.load(Ordering::Relaxed);
        let Ok(result) = result else {
            panic!("the client was still reading the answer after 20 s ({taken} bytes so far)");
        };
        assert!(
            matches!(
                result,
                Err(ClientError::ResponseTooLarge {
                    node: "edge relay",
                    max: SMALL_BODY_MAX
                })
            ),
            "{result:?}"
        );
        // What the client took is the bound plus what sits in the socket buffers.
        assert!(taken < 16 * 1024 * 1024, "the client took {taken} bytes");
    }

    #[tokio::test]
    async fn an_error_answer_and_a_declared_length_are_bounded_too() {
        // An error status with an endless body: the error is still typed, from what fits.
        let (url, _) =
            endless_answer("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
        let net = Net::new().unwrap();
        let result = tokio::time::timeout(Duration::from_secs(20), net.submit(&url, &[]))
            .await
            .expect("the client kept reading an endless error answer");
        assert!(
            matches!(result, Err(ClientError::Node { status: 503, .. })),
            "{result:?}"
        );

        // A declared length over the bound is refused before reading the body.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                CONSENSUS_LEN_MAX + 1
            );
            let _ = conn.write_all(head.as_bytes()).await;
            // The body never comes: a client waiting for it would time out instead.
            tokio::time::sleep(Duration::from_secs(120)).await;
        });
        let result = tokio::time::timeout(
            Duration::from_secs(20),
            net.unpinned_directory(&url, UnixTime(0)),
        )
        .await
        .expect("the client waited for a body it should have refused");
        assert!(
            matches!(
                result,
                Err(ClientError::ResponseTooLarge {
                    node: "directory",
                    max: DIRECTORY_LEN_MAX
                })
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_frame_over_the_bound_ends_the_stream() {
        // Review finding 15 (WebSocket frames buffered): tungstenite reads frames up to
        // 16 MiB and messages up to 64 MiB by default. Before: the client read a 1 MiB frame
        // whole and went on reading the stream.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use futures_util::SinkExt;
            let (conn, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(conn).await.unwrap();
            let big = tokio_tungstenite::tungstenite::Message::binary(vec![0u8; 1024 * 1024]);
            let _ = ws.send(big).await;
            // Keep the connection open: only the client's bound can end the stream.
            tokio::time::sleep(Duration::from_secs(120)).await;
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let url = format!("ws://{addr}/v1/mailboxes/00/stream?ticket=t&after=0");
        let ended = tokio::time::timeout(
            Duration::from_secs(20),
            run_stream(url, "m".to_string(), tx),
        )
        .await;
        assert!(
            ended.is_ok(),
            "the stream was still open 20 s after a 1 MiB frame"
        );
        assert!(rx.try_recv().is_err(), "nothing is forwarded");
    }

    #[test]
    fn stream_urls_follow_the_api_scheme() {
        let hex32 = |b: u8| hex::encode([b; 32]);
        let m: OwnedMailbox = serde_json::from_value(json!({
            "id": hex32(7), "secret": hex32(1), "owner_seed": hex32(2), "access": hex32(3),
            "reply_key": hex32(4), "node": hex32(5),
        }))
        .unwrap();
        let mut r: Replica = serde_json::from_value(json!({
            "node": hex32(5), "api_url": "https://mailbox.example:8443", "cursor": 5,
        }))
        .unwrap();
        let url = stream_url((&m, &r), "tk").unwrap();
        assert!(
            url.starts_with("wss://mailbox.example:8443/v1/mailboxes/0707"),
            "{url}"
        );
        assert!(url.ends_with("/stream?ticket=tk&after=5"), "{url}");
        r.api_url = "http://127.0.0.1:7400".to_string();
        assert!(
            stream_url((&m, &r), "tk")
                .unwrap()
                .starts_with("ws://127.0.0.1:7400/")
        );
        r.api_url = "ftp://x".to_string();
        assert!(stream_url((&m, &r), "tk").is_err());
    }
}
