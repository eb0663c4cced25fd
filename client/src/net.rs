//! HTTP to the nodes: the directory, an edge relay's packet ingress, and the mailbox API
//! (`docs/mailbox.md`). Every error comes back typed; nothing here logs ids or tokens.

use std::time::Duration;

use ed25519_dalek::ed25519::signature::Signer;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use whispr_protocol::consensus::{Consensus, Network, VerifiedConsensus};
use whispr_protocol::directory::Directory;
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
    let body: Value = r.json().await.unwrap_or(Value::Null);
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
        let bytes = r.bytes().await.map_err(unreachable("directory"))?;
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
        let bytes = r.bytes().await.map_err(unreachable("directory"))?;
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
        let v: Value = r.json().await.map_err(unreachable("edge relay"))?;
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
        let c: Value = r.json().await.map_err(unreachable("mailbox"))?;
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
        let v: Value = r.json().await.map_err(unreachable("mailbox"))?;
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
        let page: Page = r.json().await.map_err(unreachable("mailbox"))?;
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

    /// A one-time ticket for the WebSocket stream of `m` on replica `r`.
    pub async fn stream_ticket(&self, m: (&OwnedMailbox, &Replica), token: &str) -> Result<String> {
        let r = self
            .mailbox_call(Method::Post, m, "/stream-ticket", token, None)
            .await?;
        let v: Value = r.json().await.map_err(unreachable("mailbox"))?;
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
        r.json().await.map_err(unreachable("mailbox"))
    }
}

/// The WebSocket address of `m`'s stream on replica `r` after that replica's cursor, for a
/// ticket. Plain `ws://` only (a devnet or a node on loopback); TLS streams are not supported
/// yet, poll instead.
pub fn stream_url((m, r): (&OwnedMailbox, &Replica), ticket: &str) -> Result<String> {
    let rest = r.api_url.strip_prefix("http://").ok_or_else(|| {
        ClientError::InvalidArgument(
            "streaming needs a plain-HTTP (loopback) mailbox node; over TLS, poll instead"
                .to_string(),
        )
    })?;
    Ok(format!(
        "ws://{rest}/v1/mailboxes/{}/stream?ticket={ticket}&after={}",
        hex::encode(m.id),
        r.cursor
    ))
}

/// Connects to a mailbox stream and forwards every message to `tx` with the mailbox id (hex);
/// returns when the stream ends (idle timeout, session expiry, node restart) or `tx` closes.
pub async fn run_stream(
    url: String,
    mailbox: String,
    tx: tokio::sync::mpsc::Sender<(String, StoredMessage)>,
) -> Result<()> {
    use futures_util::StreamExt;
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|_| ClientError::Unreachable {
            node: "mailbox",
            reason: "stream connection failed".to_string(),
        })?;
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
