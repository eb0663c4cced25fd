//! The client API through a real server over real sockets: an in-process `MailboxNode`
//! serving on a loopback listener (plain HTTP, and HTTPS with a self-signed certificate),
//! driven with reqwest and tokio-tungstenite. Every refused request is checked for its status,
//! its JSON error kind and for changing nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite;
use whispr_mailbox::MailboxError;
use whispr_mailbox::core::{DepositReceipt, Incoming};
use whispr_mailbox::limiter::{ConnectionLimiter, limit_key};
use whispr_mailbox::node::{MailboxNode, NoMesh, NodeConfig};
use whispr_mailbox::testkit::{Owner, create_body};
use whispr_protocol::DedupId;
use whispr_protocol::envelope::Envelope;
use whispr_protocol::prekeys::{SignedPrekey, sign_identity};

const AUDIENCE: &str = "http-test-node";
const RETENTION_MS: u64 = 3_600_000;

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn mid(owner: &Owner) -> String {
    hex::encode(owner.mailbox_id.as_bytes())
}

fn key_hex(device: &SigningKey) -> String {
    hex::encode(device.verifying_key().to_bytes())
}

fn http_client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts an error response: status, JSON content type, `error` kind, a `message`; and,
/// for 429, a `Retry-After` header of at least one second. Returns the body.
async fn expect_error(response: reqwest::Response, status: u16, kind: &str) -> Value {
    let got = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_string());
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "expected {status} {kind}, got {got}: {text}");
    assert!(
        content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "error body is not JSON ({content_type:?}): {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], kind, "wrong error kind: {text}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    if status == 429 {
        let secs: u64 = retry_after
            .expect("429 without Retry-After")
            .parse()
            .unwrap();
        assert!(secs >= 1);
    }
    body
}

async fn expect_json(response: reqwest::Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "expected {status}, got {got}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Opens the envelope of a served message with the mailbox's secret key; returns its body.
fn open_message(owner: &Owner, message: &Value) -> Vec<u8> {
    assert_eq!(message["kind"], "envelope");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(message["envelope"].as_str().unwrap())
        .unwrap();
    let envelope = Envelope::decode(&bytes).unwrap();
    assert_eq!(envelope.outer.mailbox_id, owner.mailbox_id);
    let opened = envelope.open(&owner.mailbox_secret).unwrap();
    assert_eq!(opened.sender, owner.sender.verifying_key());
    opened.content.content
}

fn metric(text: &str, name: &str) -> u64 {
    let prefix = format!("whispr_mailbox_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("metric {name} missing"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits (up to 20 s, polling `/metrics` of `s`) until gauge `name` reads `value`: the
/// event a test needs before its next step, instead of a fixed sleep.
async fn wait_for_gauge(s: &Server, name: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = metric(&s.metrics_on_new_connection().await, name);
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gauge {name} stayed at {now}, never reached {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node serving on a loopback port, stopped when dropped.
struct Server {
    node: MailboxNode,
    addr: SocketAddr,
    base: String,
    http: reqwest::Client,
    rng: ChaCha20Rng,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Server {
    async fn start(configure: impl FnOnce(&mut NodeConfig)) -> Server {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::with_data_dir(dir.path().join("data"));
        config.audience = Some(AUDIENCE.into());
        // Live metrics: the tests read counters right after what they count.
        config.api.metrics_interval_ms = 0;
        configure(&mut config);
        config.check().unwrap();
        let node = MailboxNode::open(config, Arc::new(NoMesh::default())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = node.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = serving.serve(listener, shutdown).await {
                eprintln!("serve failed: {e}");
            }
        });
        Server {
            node,
            addr,
            base: format!("http://{addr}"),
            http: http_client(),
            rng: ChaCha20Rng::seed_from_u64(addr.port().into()),
            stop: Some(stop),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(self.url(path));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send().await.unwrap()
    }

    async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.post(self.url(path)).json(body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send().await.unwrap()
    }

    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn create(&self, owner: &Owner) {
        let r = self
            .post(
                "/v1/mailboxes",
                &create_body(&owner.create_request(RETENTION_MS)),
                None,
            )
            .await;
        let v = expect_json(r, 201).await;
        assert_eq!(v["mailbox_id"], mid(owner));
    }

    /// A challenge for `device_key` on `owner`'s mailbox.
    async fn challenge_for(&self, mailbox: &str, device_key: &str) -> [u8; 32] {
        let r = self
            .post(
                "/v1/auth/challenge",
                &json!({"mailbox_id": mailbox, "device_key": device_key}),
                None,
            )
            .await;
        let v = expect_json(r, 200).await;
        assert_eq!(v["audience"], AUDIENCE);
        assert!(v["expires_at_ms"].as_u64().unwrap() > 0);
        let mut challenge = [0u8; 32];
        hex::decode_to_slice(v["challenge"].as_str().unwrap(), &mut challenge).unwrap();
        challenge
    }

    async fn challenge(&self, owner: &Owner, device: &SigningKey) -> [u8; 32] {
        self.challenge_for(&mid(owner), &key_hex(device)).await
    }

    async fn login_raw(
        &self,
        mailbox: &str,
        device_key: &str,
        challenge: &[u8; 32],
        signature: &[u8; 64],
    ) -> reqwest::Response {
        self.post(
            "/v1/auth/login",
            &json!({
                "mailbox_id": mailbox,
                "device_key": device_key,
                "challenge": hex::encode(challenge),
                "signature": hex::encode(signature),
            }),
            None,
        )
        .await
    }

    /// Logs `device` in to `owner`'s mailbox; returns the session token.
    async fn login(&self, owner: &Owner, device: &SigningKey) -> String {
        let challenge = self.challenge(owner, device).await;
        let signature = owner.sign_login(device, AUDIENCE, &challenge);
        let r = self
            .login_raw(&mid(owner), &key_hex(device), &challenge, &signature)
            .await;
        let v = expect_json(r, 200).await;
        let token = v["token"].as_str().unwrap().to_string();
        assert_eq!(token.len(), 64);
        token
    }

    async fn info(&self, owner: &Owner, token: &str) -> Value {
        let r = self
            .get(&format!("/v1/mailboxes/{}", mid(owner)), Some(token))
            .await;
        expect_json(r, 200).await
    }

    async fn poll(&self, owner: &Owner, token: &str, query: &str) -> reqwest::Response {
        self.get(
            &format!("/v1/mailboxes/{}/messages{query}", mid(owner)),
            Some(token),
        )
        .await
    }

    async fn poll_ok(&self, owner: &Owner, token: &str, query: &str) -> Value {
        expect_json(self.poll(owner, token, query).await, 200).await
    }

    async fn ack(&self, owner: &Owner, token: &str, up_to: u64) -> reqwest::Response {
        self.post(
            &format!("/v1/mailboxes/{}/ack", mid(owner)),
            &json!({ "up_to": up_to }),
            Some(token),
        )
        .await
    }

    async fn ack_ok(&self, owner: &Owner, token: &str, up_to: u64) -> u64 {
        let v = expect_json(self.ack(owner, token, up_to).await, 200).await;
        v["cursor"].as_u64().unwrap()
    }

    async fn metrics(&self) -> String {
        let r = self.get("/metrics", None).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// Deposits (as the mesh would) an envelope carrying `body`.
    async fn deposit(&mut self, owner: &Owner, body: &[u8]) -> DepositReceipt {
        let dedup = DedupId::random(&mut self.rng);
        let envelope = owner
            .envelope(&mut self.rng, dedup, None, None, body)
            .unwrap();
        self.node
            .deposit(Incoming::Deposit(envelope))
            .await
            .unwrap()
    }

    async fn stream_ticket(&self, owner: &Owner, token: &str) -> String {
        let r = self
            .post(
                &format!("/v1/mailboxes/{}/stream-ticket", mid(owner)),
                &json!({}),
                Some(token),
            )
            .await;
        let v = expect_json(r, 200).await;
        v["token"].as_str().unwrap().to_string()
    }

    fn stream_url(&self, mailbox: &str, ticket: &str) -> String {
        format!(
            "ws://{}/v1/mailboxes/{mailbox}/stream?ticket={ticket}",
            self.addr
        )
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str) -> Ws {
    let (ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// Asserts that the upgrade is refused with `status` before switching protocols (and, when
/// the body arrived with the head, that it is a JSON error of `kind`).
async fn ws_refused(url: &str, status: u16, kind: &str) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("upgrade accepted, expected {status} {kind}"),
        Err(tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            assert_eq!(response.status().as_u16(), status, "{body}");
            if status == 429 {
                assert!(response.headers().contains_key("retry-after"));
            }
            if !body.is_empty() {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["error"], kind, "{body}");
            }
        }
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

/// The next JSON event on a stream (pings and pongs skipped), within 5 s.
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no stream event within 5 s")
            .expect("stream ended")
            .unwrap();
        match frame {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn ws_send(ws: &mut Ws, text: &str) {
    ws.send(tungstenite::Message::Text(text.into()))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flow_and_every_refused_login_or_token() {
    let s = Server::start(|_| {}).await;
    let a = Owner::from_seed(1);
    let b = Owner::from_seed(2);
    s.create(&a).await;
    s.create(&b).await;
    let owner_a = a.device(0);
    let sessions = |m: &str| metric(m, "sessions");

    // The full flow: challenge → login → the token works.
    let token_a = s.login(&a, &owner_a).await;
    let info_a = s.info(&a, &token_a).await;
    assert_eq!(info_a["mailbox_id"], mid(&a));
    assert_eq!(info_a["owner_key"], key_hex(&owner_a));
    assert_eq!(info_a["devices"].as_array().unwrap().len(), 1);
    let live = sessions(&s.metrics().await);
    assert_eq!(live, 1);
    let failures_before = metric(&s.metrics().await, "auth_failures_total");

    // A used challenge is refused, even with the right signature.
    let challenge = s.challenge(&a, &owner_a).await;
    let signature = a.sign_login(&owner_a, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &signature)
        .await;
    expect_json(r, 200).await;
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &signature)
        .await;
    expect_error(r, 401, "unauthorized").await;
    let live = live + 1;

    // Wrong signature → 401 bad_signature; the challenge is consumed by that attempt.
    let challenge = s.challenge(&a, &owner_a).await;
    let mut bad = a.sign_login(&owner_a, AUDIENCE, &challenge);
    bad[7] ^= 1;
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &bad)
        .await;
    expect_error(r, 401, "bad_signature").await;
    let good = a.sign_login(&owner_a, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &good)
        .await;
    expect_error(r, 401, "unauthorized").await;

    // A signature by another key, or for another node (audience), is a bad signature.
    let challenge = s.challenge(&a, &owner_a).await;
    let forged = a.sign_login(&a.device(5), AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &forged)
        .await;
    expect_error(r, 401, "bad_signature").await;
    let challenge = s.challenge(&a, &owner_a).await;
    let elsewhere = a.sign_login(&owner_a, "another-node", &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &elsewhere)
        .await;
    expect_error(r, 401, "bad_signature").await;

    // Register a second device, then use a challenge issued for the owner key with it.
    let second = a.device(1);
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/devices", mid(&a)),
            &json!({"device_key": key_hex(&second), "signature": hex::encode(a.sign_device(&second))}),
            Some(&token_a),
        )
        .await;
    assert_eq!(r.status(), 204);
    let challenge = s.challenge(&a, &owner_a).await;
    let signature = a.sign_login(&second, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&second), &challenge, &signature)
        .await;
    expect_error(r, 401, "unauthorized").await;
    // A challenge for mailbox B answered on mailbox A.
    let challenge = s.challenge(&b, &b.device(0)).await;
    let signature = a.sign_login(&owner_a, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&owner_a), &challenge, &signature)
        .await;
    expect_error(r, 401, "unauthorized").await;

    // A device that is not registered, with a valid signature of its own.
    let stranger = a.device(7);
    let challenge = s.challenge(&a, &stranger).await;
    let signature = a.sign_login(&stranger, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&a), &key_hex(&stranger), &challenge, &signature)
        .await;
    expect_error(r, 401, "unauthorized").await;
    // An unknown mailbox.
    let nobody = Owner::from_seed(99);
    let challenge = s.challenge(&nobody, &nobody.device(0)).await;
    let signature = nobody.sign_login(&nobody.device(0), AUDIENCE, &challenge);
    let r = s
        .login_raw(
            &mid(&nobody),
            &key_hex(&nobody.device(0)),
            &challenge,
            &signature,
        )
        .await;
    expect_error(r, 401, "unauthorized").await;
    // Bad hex in a login or challenge request.
    let r = s
        .post(
            "/v1/auth/challenge",
            &json!({"mailbox_id": "xyz", "device_key": key_hex(&owner_a)}),
            None,
        )
        .await;
    expect_error(r, 400, "bad_request").await;
    let r = s
        .post(
            "/v1/auth/login",
            &json!({"mailbox_id": mid(&a), "device_key": key_hex(&owner_a),
                    "challenge": "00", "signature": "00"}),
            None,
        )
        .await;
    expect_error(r, 400, "bad_request").await;

    // None of the refused logins created a session; each counted as an auth failure.
    let m = s.metrics().await;
    assert_eq!(sessions(&m), live);
    assert!(metric(&m, "auth_failures_total") >= failures_before + 7);

    // The registered second device logs in with its own challenge.
    let token_second = s.login(&a, &second).await;
    assert_eq!(s.info(&a, &token_second).await["mailbox_id"], mid(&a));

    // Token of mailbox A on mailbox B → 403, on every route; B unchanged.
    let token_b = s.login(&b, &b.device(0)).await;
    let info_b = s.info(&b, &token_b).await;
    let r = s
        .get(&format!("/v1/mailboxes/{}", mid(&b)), Some(&token_a))
        .await;
    expect_error(r, 403, "forbidden").await;
    let r = s.poll(&b, &token_a, "").await;
    expect_error(r, 403, "forbidden").await;
    let r = s.ack(&b, &token_a, 0).await;
    expect_error(r, 403, "forbidden").await;
    let r = s
        .get(&format!("/v1/mailboxes/{}/export", mid(&b)), Some(&token_a))
        .await;
    expect_error(r, 403, "forbidden").await;
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/stream-ticket", mid(&b)),
            &json!({}),
            Some(&token_a),
        )
        .await;
    expect_error(r, 403, "forbidden").await;
    let r = s
        .delete(&format!("/v1/mailboxes/{}", mid(&b)), &token_a)
        .await;
    expect_error(r, 403, "forbidden").await;
    assert_eq!(s.info(&b, &token_b).await, info_b);

    // Missing or garbage Authorization → 401.
    let info_path = format!("/v1/mailboxes/{}", mid(&a));
    let r = s.get(&info_path, None).await;
    expect_error(r, 401, "unauthorized").await;
    for value in [
        "Bearer".to_string(),
        "Bearer zz".to_string(),
        format!("Basic {token_a}"),
        format!("Bearer {}", &token_a[..62]),
        format!("Bearer {}", hex::encode([0x5au8; 32])),
        token_a.clone(),
    ] {
        let r = s
            .http
            .get(s.url(&info_path))
            .header(reqwest::header::AUTHORIZATION, value.as_str())
            .send()
            .await
            .unwrap();
        expect_error(r, 401, "unauthorized").await;
    }
    assert_eq!(
        s.info(&a, &token_a).await["devices"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Logout ends the session.
    let r = s
        .http
        .post(s.url("/v1/auth/logout"))
        .bearer_auth(&token_second)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s.get(&info_path, Some(&token_second)).await;
    expect_error(r, 401, "unauthorized").await;
    s.info(&a, &token_a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refusals_change_nothing() {
    let s = Server::start(|c| c.api.body_bytes_max = 2048).await;
    let owner = Owner::from_seed(3);
    let good = create_body(&owner.create_request(RETENTION_MS));

    // Bad proof of possession: a flipped signature, or a field the signature does not cover.
    let mut forged = good.clone();
    let mut signature = owner.create_request(RETENTION_MS).signature;
    signature[0] ^= 0x80;
    forged["signature"] = json!(hex::encode(signature));
    expect_error(
        s.post("/v1/mailboxes", &forged, None).await,
        401,
        "bad_signature",
    )
    .await;
    let mut swapped = good.clone();
    swapped["retention_ms"] = json!(RETENTION_MS - 1);
    expect_error(
        s.post("/v1/mailboxes", &swapped, None).await,
        401,
        "bad_signature",
    )
    .await;
    let mut other_hash = good.clone();
    other_hash["access_key_hash"] = json!(hex::encode([1u8; 32]));
    expect_error(
        s.post("/v1/mailboxes", &other_hash, None).await,
        401,
        "bad_signature",
    )
    .await;

    // Malformed JSON, unknown field, missing field, bad hex, oversized body.
    expect_error(
        s.post_raw("/v1/mailboxes", "{\"mailbox_id\": ").await,
        400,
        "bad_request",
    )
    .await;
    expect_error(
        s.post_raw("/v1/mailboxes", "[1, 2").await,
        400,
        "bad_request",
    )
    .await;
    let mut unknown = good.clone();
    unknown["colour"] = json!("blue");
    expect_error(
        s.post("/v1/mailboxes", &unknown, None).await,
        400,
        "bad_request",
    )
    .await;
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("owner_key");
    expect_error(
        s.post("/v1/mailboxes", &missing, None).await,
        400,
        "bad_request",
    )
    .await;
    for field in [
        "mailbox_id",
        "mailbox_key",
        "owner_key",
        "access_key_hash",
        "signature",
    ] {
        let mut bad_hex = good.clone();
        bad_hex[field] = json!("zz".repeat(32));
        expect_error(
            s.post("/v1/mailboxes", &bad_hex, None).await,
            400,
            "bad_request",
        )
        .await;
        let mut short = good.clone();
        short[field] = json!("abcd");
        expect_error(
            s.post("/v1/mailboxes", &short, None).await,
            400,
            "bad_request",
        )
        .await;
    }
    let mut huge = good.clone();
    huge["padding"] = json!("x".repeat(4096));
    expect_error(
        s.post("/v1/mailboxes", &huge, None).await,
        413,
        "body_too_large",
    )
    .await;
    // A retention of 0 or above the node's maximum.
    let zero = create_body(&owner.create_request(0));
    expect_error(
        s.post("/v1/mailboxes", &zero, None).await,
        422,
        "invalid_argument",
    )
    .await;
    let long = create_body(&owner.create_request(u64::MAX));
    expect_error(
        s.post("/v1/mailboxes", &long, None).await,
        422,
        "invalid_argument",
    )
    .await;

    // Nothing was created: the node holds no mailbox, and the right request succeeds.
    assert_eq!(metric(&s.metrics().await, "mailboxes"), 0);
    let r = s.post("/v1/mailboxes", &good, None).await;
    assert_eq!(expect_json(r, 201).await["mailbox_id"], mid(&owner));
    let token = s.login(&owner, &owner.device(0)).await;
    let info = s.info(&owner, &token).await;
    assert_eq!(info["retention_ms"], RETENTION_MS);
    assert_eq!(info["messages"], 0);

    // Duplicate → 409 (even with another, valid, retention); the mailbox is unchanged.
    expect_error(
        s.post("/v1/mailboxes", &good, None).await,
        409,
        "mailbox_exists",
    )
    .await;
    let other = create_body(&owner.create_request(RETENTION_MS / 2));
    expect_error(
        s.post("/v1/mailboxes", &other, None).await,
        409,
        "mailbox_exists",
    )
    .await;
    // Refused bodies aimed at the existing mailbox change nothing either.
    expect_error(
        s.post("/v1/mailboxes", &huge, None).await,
        413,
        "body_too_large",
    )
    .await;
    expect_error(
        s.post("/v1/mailboxes", &forged, None).await,
        401,
        "bad_signature",
    )
    .await;
    assert_eq!(s.info(&owner, &token).await, info);
    assert_eq!(metric(&s.metrics().await, "mailboxes"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_orders_pages_and_long_polls() {
    let mut s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(4);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;

    let empty = s.poll_ok(&owner, &token, "").await;
    assert_eq!(seqs(&empty), Vec::<u64>::new());
    assert_eq!(empty["last_seq"], 0);

    for i in 0..5u8 {
        let receipt = s.deposit(&owner, &[b'm', i]).await;
        assert_eq!(receipt.seq, u64::from(i) + 1);
    }
    let page = s.poll_ok(&owner, &token, "").await;
    assert_eq!(seqs(&page), vec![1, 2, 3, 4, 5]);
    assert_eq!(page["last_seq"], 5);
    for (i, m) in page["messages"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            open_message(&owner, m),
            vec![b'm', u8::try_from(i).unwrap()]
        );
        assert!(m["expires_at_ms"].as_u64().unwrap() > m["received_at_ms"].as_u64().unwrap());
    }
    assert_eq!(
        seqs(&s.poll_ok(&owner, &token, "?after=2").await),
        vec![3, 4, 5]
    );
    assert_eq!(
        seqs(&s.poll_ok(&owner, &token, "?limit=2").await),
        vec![1, 2]
    );
    assert_eq!(
        seqs(&s.poll_ok(&owner, &token, "?after=2&limit=2").await),
        vec![3, 4]
    );
    assert_eq!(
        seqs(&s.poll_ok(&owner, &token, "?after=5").await),
        Vec::<u64>::new()
    );
    assert_eq!(seqs(&s.poll_ok(&owner, &token, "?limit=0").await), vec![1]);

    // Refused cursors and queries change nothing.
    let info = s.info(&owner, &token).await;
    expect_error(s.poll(&owner, &token, "?after=6").await, 422, "bad_cursor").await;
    expect_error(
        s.poll(&owner, &token, "?after=18446744073709551615").await,
        422,
        "bad_cursor",
    )
    .await;
    for query in [
        "?after=abc",
        "?after=-1",
        "?limit=x",
        "?wait=soon",
        "?colour=blue",
    ] {
        expect_error(s.poll(&owner, &token, query).await, 400, "bad_request").await;
    }
    let r = s.get("/v1/mailboxes/not-hex/messages", Some(&token)).await;
    expect_error(r, 400, "bad_request").await;
    assert_eq!(s.info(&owner, &token).await, info);
    assert_eq!(
        seqs(&s.poll_ok(&owner, &token, "").await),
        vec![1, 2, 3, 4, 5]
    );

    // Long poll: returns as soon as a deposit lands. The deposit is made once the poll is
    // seen waiting (the `polls_waiting` gauge), so the poll cannot have found it already; the
    // wait asked for (30 s) is far longer than the answer may take.
    let poller = {
        let http = http_client();
        let url = s.url(&format!(
            "/v1/mailboxes/{}/messages?after=5&wait=30000",
            mid(&owner)
        ));
        let token = token.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            (expect_json(r, 200).await, started.elapsed())
        })
    };
    wait_for_gauge(&s, "polls_waiting", 1).await;
    let receipt = {
        let mut rng = ChaCha20Rng::seed_from_u64(44);
        let dedup = DedupId::random(&mut rng);
        let envelope = owner
            .envelope(&mut rng, dedup, None, None, b"late")
            .unwrap();
        s.node.deposit(Incoming::Deposit(envelope)).await.unwrap()
    };
    assert_eq!(receipt.seq, 6);
    let (page, took) = poller.await.unwrap();
    assert_eq!(seqs(&page), vec![6]);
    assert_eq!(open_message(&owner, &page["messages"][0]), b"late");
    assert!(
        took < Duration::from_secs(25),
        "the long poll ran out its 30 s wait instead of returning at the deposit ({took:?})"
    );

    // Nothing arrives: empty after the wait.
    let started = Instant::now();
    let page = s.poll_ok(&owner, &token, "?after=6&wait=300").await;
    let took = started.elapsed();
    assert_eq!(seqs(&page), Vec::<u64>::new());
    assert_eq!(page["last_seq"], 6);
    assert!(
        took >= Duration::from_millis(280),
        "returned after {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "returned after {took:?}"
    );
    assert_eq!(metric(&s.metrics().await, "polls_waiting"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_receive_and_ack_independently() {
    let mut s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(5);
    s.create(&owner).await;
    let first = owner.device(0);
    let second = owner.device(1);
    let t1 = s.login(&owner, &first).await;
    for i in 0..4u8 {
        s.deposit(&owner, &[b'a', i]).await;
    }

    // Cumulative acks for the only device; older acks are no-ops; beyond last → 422.
    let info = s.info(&owner, &t1).await;
    assert_eq!(info["messages"], 4);
    expect_error(s.ack(&owner, &t1, 5).await, 422, "bad_cursor").await;
    expect_error(s.ack(&owner, &t1, u64::MAX).await, 422, "bad_cursor").await;
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/ack", mid(&owner)),
            &json!({"up_to": "one"}),
            Some(&t1),
        )
        .await;
    expect_error(r, 400, "bad_request").await;
    assert_eq!(s.info(&owner, &t1).await, info);
    assert_eq!(s.ack_ok(&owner, &t1, 1).await, 1);
    assert_eq!(s.ack_ok(&owner, &t1, 0).await, 1);
    assert_eq!(s.info(&owner, &t1).await["messages"], 3);
    assert_eq!(seqs(&s.poll_ok(&owner, &t1, "").await), vec![2, 3, 4]);

    // Register a second device: a signature not by the owner is refused.
    let devices = format!("/v1/mailboxes/{}/devices", mid(&owner));
    let info = s.info(&owner, &t1).await;
    let by_itself = {
        use ed25519_dalek::Signer;
        let mut t = b"whispr-mailbox-device-v1".to_vec();
        t.extend_from_slice(owner.mailbox_id.as_bytes());
        t.extend_from_slice(&second.verifying_key().to_bytes());
        second.sign(&t).to_bytes()
    };
    let r = s
        .post(
            &devices,
            &json!({"device_key": key_hex(&second), "signature": hex::encode(by_itself)}),
            Some(&t1),
        )
        .await;
    expect_error(r, 401, "bad_signature").await;
    // The owner's signature for another device does not register this one.
    let r = s
        .post(
            &devices,
            &json!({"device_key": key_hex(&second),
                    "signature": hex::encode(owner.sign_device(&owner.device(2)))}),
            Some(&t1),
        )
        .await;
    expect_error(r, 401, "bad_signature").await;
    let r = s
        .post(
            &devices,
            &json!({"device_key": "12", "signature": hex::encode(owner.sign_device(&second))}),
            Some(&t1),
        )
        .await;
    expect_error(r, 400, "bad_request").await;
    assert_eq!(s.info(&owner, &t1).await, info);
    let challenge = s.challenge(&owner, &second).await;
    let signature = owner.sign_login(&second, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&owner), &key_hex(&second), &challenge, &signature)
        .await;
    expect_error(r, 401, "unauthorized").await;

    let r = s
        .post(
            &devices,
            &json!({"device_key": key_hex(&second), "signature": hex::encode(owner.sign_device(&second))}),
            Some(&t1),
        )
        .await;
    assert_eq!(r.status(), 204);
    let info = s.info(&owner, &t1).await;
    let devs = info["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 2);
    // The new device starts at the oldest cursor: it sees everything still stored.
    assert!(devs.contains(&json!({"device_key": key_hex(&second), "cursor": 1})));
    let t2 = s.login(&owner, &second).await;

    // Each device receives every message and acks on its own.
    assert_eq!(seqs(&s.poll_ok(&owner, &t1, "").await), vec![2, 3, 4]);
    assert_eq!(seqs(&s.poll_ok(&owner, &t2, "").await), vec![2, 3, 4]);
    assert_eq!(s.ack_ok(&owner, &t1, 3).await, 3);
    assert_eq!(
        s.info(&owner, &t1).await["messages"],
        3,
        "deleted before both acked"
    );
    assert_eq!(seqs(&s.poll_ok(&owner, &t1, "").await), vec![4]);
    assert_eq!(seqs(&s.poll_ok(&owner, &t2, "").await), vec![2, 3, 4]);
    assert_eq!(s.ack_ok(&owner, &t2, 2).await, 2);
    assert_eq!(s.info(&owner, &t2).await["messages"], 2);
    assert_eq!(s.ack_ok(&owner, &t2, 4).await, 4);
    // Device 2 is ahead now; the minimum (device 1 at 3) decides.
    assert_eq!(s.info(&owner, &t2).await["messages"], 1);
    assert_eq!(seqs(&s.poll_ok(&owner, &t2, "").await), Vec::<u64>::new());
    assert_eq!(seqs(&s.poll_ok(&owner, &t1, "").await), vec![4]);
    assert_eq!(s.ack_ok(&owner, &t1, 4).await, 4);
    assert_eq!(s.info(&owner, &t1).await["messages"], 0);

    // A message only the removed device had not acknowledged goes with it.
    s.deposit(&owner, b"last").await;
    assert_eq!(s.ack_ok(&owner, &t1, 5).await, 5);
    assert_eq!(s.info(&owner, &t1).await["messages"], 1);
    let second_path = format!("{devices}/{}", key_hex(&second));
    // Only the owner's session may remove a device.
    let info = s.info(&owner, &t1).await;
    expect_error(s.delete(&second_path, &t2).await, 403, "forbidden").await;
    let owner_path = format!("{devices}/{}", key_hex(&first));
    expect_error(s.delete(&owner_path, &t2).await, 403, "forbidden").await;
    // The owner key itself cannot be removed.
    expect_error(s.delete(&owner_path, &t1).await, 422, "invalid_argument").await;
    expect_error(
        s.delete(&format!("{devices}/zz"), &t1).await,
        400,
        "bad_request",
    )
    .await;
    assert_eq!(s.info(&owner, &t1).await, info);
    assert_eq!(s.delete(&second_path, &t1).await.status(), 204);
    expect_error(
        s.get(&format!("/v1/mailboxes/{}", mid(&owner)), Some(&t2))
            .await,
        401,
        "unauthorized",
    )
    .await;
    expect_error(s.poll(&owner, &t2, "").await, 401, "unauthorized").await;
    let info = s.info(&owner, &t1).await;
    assert_eq!(info["devices"].as_array().unwrap().len(), 1);
    assert_eq!(info["messages"], 0);
    // Removing it again: not a device any more.
    expect_error(s.delete(&second_path, &t1).await, 403, "unknown_device").await;
    // It cannot log in again.
    let challenge = s.challenge(&owner, &second).await;
    let signature = owner.sign_login(&second, AUDIENCE, &challenge);
    let r = s
        .login_raw(&mid(&owner), &key_hex(&second), &challenge, &signature)
        .await;
    expect_error(r, 401, "unauthorized").await;
    assert_eq!(s.info(&owner, &t1).await, info);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pushes_takes_acks_and_refuses_used_or_foreign_tickets() {
    let mut s = Server::start(|_| {}).await;
    let a = Owner::from_seed(6);
    let b = Owner::from_seed(7);
    s.create(&a).await;
    s.create(&b).await;
    let token = s.login(&a, &a.device(0)).await;
    let token_b = s.login(&b, &b.device(0)).await;

    let ticket = s.stream_ticket(&a, &token).await;
    assert_eq!(ticket.len(), 64);
    let url = s.stream_url(&mid(&a), &ticket);
    let mut ws = ws_connect(&url).await;
    // Deposit once the server runs the stream (it counts it open), so that the message is
    // pushed rather than found in the backlog.
    wait_for_gauge(&s, "streams_open", 1).await;
    s.deposit(&a, b"pushed").await;
    let event = next_event(&mut ws).await;
    assert_eq!(event["type"], "message", "{event}");
    assert_eq!(event["message"]["seq"], 1);
    assert_eq!(open_message(&a, &event["message"]), b"pushed");
    ws_send(&mut ws, r#"{"type":"ack","up_to":1}"#).await;
    let event = next_event(&mut ws).await;
    assert_eq!(event, json!({"type": "acked", "cursor": 1}));
    let info = s.info(&a, &token).await;
    assert_eq!(info["devices"][0]["cursor"], 1);
    assert_eq!(info["messages"], 0);

    // Malformed frames get an error event; the stream stays open and works.
    for bad in [
        "not json",
        r#"{"type":"ack"}"#,
        r#"{"type":"nack","up_to":1}"#,
        r#"{"type":"ack","up_to":1,"extra":true}"#,
        r#"{"type":"ack","up_to":-3}"#,
    ] {
        ws_send(&mut ws, bad).await;
        let event = next_event(&mut ws).await;
        assert_eq!(event["type"], "error", "{bad}: {event}");
        assert_eq!(event["error"], "bad_request", "{bad}: {event}");
    }
    ws_send(&mut ws, r#"{"type":"ack","up_to":99}"#).await;
    let event = next_event(&mut ws).await;
    assert_eq!(event["type"], "error");
    assert_eq!(event["error"], "bad_cursor");
    ws.send(tungstenite::Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(s.info(&a, &token).await, info);
    s.deposit(&a, b"second").await;
    let event = next_event(&mut ws).await;
    assert_eq!(event["type"], "message", "{event}");
    assert_eq!(event["message"]["seq"], 2);
    ws_send(&mut ws, r#"{"type":"ack","up_to":2}"#).await;
    assert_eq!(
        next_event(&mut ws).await,
        json!({"type": "acked", "cursor": 2})
    );
    assert_eq!(metric(&s.metrics().await, "streams_open"), 1);

    // The ticket is single-use.
    ws_refused(&url, 401, "unauthorized").await;
    // A ticket of mailbox B on mailbox A's stream → 401 (and it is consumed).
    let ticket_b = s.stream_ticket(&b, &token_b).await;
    ws_refused(&s.stream_url(&mid(&a), &ticket_b), 401, "unauthorized").await;
    ws_refused(&s.stream_url(&mid(&b), &ticket_b), 401, "unauthorized").await;
    // Malformed and unknown tickets.
    ws_refused(&s.stream_url(&mid(&a), "zz"), 401, "unauthorized").await;
    ws_refused(
        &s.stream_url(&mid(&a), &hex::encode([9u8; 32])),
        401,
        "unauthorized",
    )
    .await;
    // Nothing of that disturbed the open stream.
    s.deposit(&a, b"third").await;
    let event = next_event(&mut ws).await;
    assert_eq!(event["message"]["seq"], 3);

    // A stream opened with `after` starts there; a bad `after` is refused before upgrading.
    let ticket = s.stream_ticket(&a, &token).await;
    ws_refused(
        &format!("{}&after=99", s.stream_url(&mid(&a), &ticket)),
        422,
        "bad_cursor",
    )
    .await;
    let ticket = s.stream_ticket(&a, &token).await;
    let mut ws2 = ws_connect(&s.stream_url(&mid(&a), &ticket)).await;
    // Device cursor is 2: message 3 is pushed again to the new stream.
    let event = next_event(&mut ws2).await;
    assert_eq!(event["message"]["seq"], 3);
    ws2.close(None).await.unwrap();
    ws.close(None).await.unwrap();

    // The stream ends with the session: after logout no new ticket can be had.
    let r = s
        .http
        .post(s.url("/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/stream-ticket", mid(&a)),
            &json!({}),
            Some(&token),
        )
        .await;
    expect_error(r, 401, "unauthorized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_is_closed() {
    let s = Server::start(|c| c.api.stream_idle_ms = 400).await;
    let owner = Owner::from_seed(8);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    let ticket = s.stream_ticket(&owner, &token).await;
    let mut ws = ws_connect(&s.stream_url(&mid(&owner), &ticket)).await;
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "idle stream still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// Security review 6756e3f, finding 15: a client frame announcing more than the API accepts
/// ends the stream at its header. Before, tungstenite read frames up to its default 16 MiB
/// before checking the message size, so one stream buffered megabytes it then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_frame_larger_than_the_api_accepts_is_refused_at_its_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start(|c| c.api.stream_idle_ms = 120_000).await;
    let owner = Owner::from_seed(16);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    let ticket = s.stream_ticket(&owner, &token).await;
    let ws = ws_connect(&s.stream_url(&mid(&owner), &ticket)).await;
    let tokio_tungstenite::MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
        panic!("expected a plain TCP stream");
    };
    // A masked binary frame header announcing 1 MiB, then 4 KiB of it; the rest never comes.
    let mut frame = vec![0x82u8, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 4096]);
    tcp.write_all(&frame).await.unwrap();
    // The node closes the connection without waiting for the announced megabyte.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the node still waits for the rest of a 1 MiB frame after 10 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_per_connection_limit_answers_429_with_retry_after() {
    let mut s = Server::start(|c| c.api.ops_per_min_per_connection = 5).await;
    let owner = Owner::from_seed(9);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    s.deposit(&owner, b"one").await;
    s.deposit(&owner, b"two").await;
    // The budget belongs to a connection: the limited requests go over one raw HTTP/1.1
    // connection held here (a pooled client may open a second one under load, which gets a
    // fresh budget, and the test would see no refusal).
    let mut conn = RawConnection::open(s.addr).await;
    let info = format!("/v1/mailboxes/{}", mid(&owner));
    let ack = format!("/v1/mailboxes/{}/ack", mid(&owner));
    for _ in 0..4 {
        assert_eq!(conn.request("GET", &info, &token, None).await.0, 200); // 1..4
    }
    let (status, _, body) = conn
        .request("POST", &ack, &token, Some(r#"{"up_to":1}"#))
        .await; // 5
    assert_eq!(status, 200, "{body}");
    let (status, retry_after, body) = conn
        .request("POST", &ack, &token, Some(r#"{"up_to":2}"#))
        .await; // 6
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limited"), "{body}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(metric(&s.metrics_on_new_connection().await, "rate_limited_total") >= 1);

    // The refused ack changed nothing (checked with another client: other connections).
    let fresh = Server {
        node: s.node.clone(),
        addr: s.addr,
        base: s.base.clone(),
        http: http_client(),
        rng: ChaCha20Rng::seed_from_u64(1),
        stop: None,
        _dir: tempfile::tempdir().unwrap(),
    };
    let token2 = fresh.login(&owner, &owner.device(0)).await;
    let info_now = fresh.info(&owner, &token2).await;
    assert_eq!(info_now["devices"][0]["cursor"], 1);
    assert_eq!(info_now["messages"], 1);

    // The policy is per minute: 5 operations/min refill one every 12 s, so the answer says
    // to wait about that long, and a retry a second later is still refused.
    assert!(
        (10..=60).contains(&retry_after),
        "Retry-After {retry_after} s for a 5/min limit"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _, _) = conn
        .request("POST", &ack, &token, Some(r#"{"up_to":2}"#))
        .await;
    assert_eq!(status, 429);
    let mut fresh = fresh;
    fresh.http = http_client();
    assert_eq!(fresh.info(&owner, &token2).await["devices"][0]["cursor"], 1);
}

/// Issue 16 ("the client checks the login audience against the node it meant"): with the
/// default configuration every node had the audience `whispr-mailbox`, so a node that relayed
/// another node's login challenge to a client got a signature that the other node accepted.
/// The default audience now names the node ([`whispr_protocol::mailbox_api::node_audience`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_signed_for_one_node_is_refused_by_another_with_default_configs() {
    let default_audience = NodeConfig::with_data_dir(std::path::PathBuf::new()).audience;
    let start = |id: u8| {
        let default_audience = default_audience.clone();
        Server::start(move |c| {
            c.audience = default_audience;
            c.limits.node_id = Some([id; 32]);
        })
    };
    let (a, b) = (start(1).await, start(2).await);
    let owner = Owner::from_seed(12);
    a.create(&owner).await;
    b.create(&owner).await;
    let device = owner.device(0);
    let challenge_at = |s: &Server| {
        let body = json!({"mailbox_id": mid(&owner), "device_key": key_hex(&device)});
        let r = s.http.post(s.url("/v1/auth/challenge")).json(&body).send();
        async move {
            let v = expect_json(r.await.unwrap(), 200).await;
            let mut challenge = [0u8; 32];
            hex::decode_to_slice(v["challenge"].as_str().unwrap(), &mut challenge).unwrap();
            (challenge, v["audience"].as_str().unwrap().to_string())
        }
    };
    let (_, audience_a) = challenge_at(&a).await;
    let (challenge_b, audience_b) = challenge_at(&b).await;
    assert_ne!(audience_a, audience_b, "two nodes, one default audience");
    // Node A hands B's challenge to the client as its own; the client signs for A.
    let signature = owner.sign_login(&device, &audience_a, &challenge_b);
    let r = b
        .login_raw(&mid(&owner), &key_hex(&device), &challenge_b, &signature)
        .await;
    let status = r.status().as_u16();
    assert_eq!(
        status,
        401,
        "node B accepted a login signed for node A: {}",
        r.text().await.unwrap()
    );
}

/// Finding 11(d)/15: the operation budget belonged to a socket address, so a client opening a
/// new connection for every request was never limited. It belongs to the source address now
/// (loopback is limited per connection by default; this node counts loopback as one address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_new_connections_gets_no_new_budget() {
    let s = Server::start(|c| {
        c.api.ops_per_min_per_connection = 5;
        c.api.loopback_per_connection = false;
    })
    .await;
    let owner = Owner::from_seed(11);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    let info = format!("/v1/mailboxes/{}", mid(&owner));
    let mut statuses = Vec::new();
    for _ in 0..8 {
        // A new connection for every request.
        let mut conn = RawConnection::open(s.addr).await;
        statuses.push(conn.request("GET", &info, &token, None).await.0);
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        served <= 5 && statuses.contains(&429),
        "8 requests on 8 new connections at 5 ops/min: {served} served ({statuses:?})"
    );
}

/// One HTTP/1.1 connection driven by hand (requests in sequence, keep-alive).
struct RawConnection {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConnection {
    async fn open(addr: SocketAddr) -> RawConnection {
        RawConnection {
            stream: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// (status, Retry-After, body) of one request.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&str>,
    ) -> (u16, Option<String>, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).await.unwrap();
        let read_more = |buf: &mut Vec<u8>, n: usize, chunk: &[u8]| {
            assert!(n > 0, "the server closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        };
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = self.stream.read(&mut chunk).await.unwrap();
            read_more(&mut self.buf, n, &chunk);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end + 4);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.buf.len() < len {
            let n = self.stream.read(&mut chunk).await.unwrap();
            read_more(&mut self.buf, n, &chunk);
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        (
            status,
            header("retry-after"),
            String::from_utf8_lossy(&body).to_string(),
        )
    }
}

/// The limiter's arithmetic on a synthetic clock: `per_min` operations per minute.
#[test]
fn connection_limiter_refills_per_minute() {
    let peer = limit_key("127.0.0.1:4000".parse().unwrap(), true);
    let mut limiter = ConnectionLimiter::new(5, 16);
    let t0 = 1_000_000;
    for _ in 0..5 {
        limiter.check(peer, t0).unwrap();
    }
    let retry_ms = limiter.check(peer, t0).unwrap_err();
    assert!(
        (11_000..=12_000).contains(&retry_ms),
        "5/min: next operation in {retry_ms} ms, expected about 12 s"
    );
    // One second later: a twelfth of an operation has been refilled, not five.
    assert!(
        limiter.check(peer, t0 + 1_000).is_err(),
        "5/min allowed a 6th op after 1 s"
    );
    assert!(limiter.check(peer, t0 + 11_000).is_err());
    limiter.check(peer, t0 + 12_000).unwrap();
    assert!(limiter.check(peer, t0 + 12_001).is_err());
    // A full minute idle refills the whole bucket, and no more.
    let t1 = t0 + 12_000 + 60_000;
    for _ in 0..5 {
        limiter.check(peer, t1).unwrap();
    }
    assert!(limiter.check(peer, t1).is_err());
    // Other loopback connections have their own bucket.
    limiter
        .check(limit_key("127.0.0.1:4001".parse().unwrap(), true), t1)
        .unwrap();
    // 200/min (the policy default): 200 in a burst, then one every 300 ms.
    let mut limiter = ConnectionLimiter::new(200, 16);
    for _ in 0..200 {
        limiter.check(peer, t0).unwrap();
    }
    assert!(
        limiter.check(peer, t0 + 100).is_err(),
        "200/min refilled an op in 100 ms"
    );
    limiter.check(peer, t0 + 300).unwrap();
}

impl Server {
    async fn metrics_on_new_connection(&self) -> String {
        let r = http_client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_mailbox_limit_answers_429_with_retry_after() {
    let mut s = Server::start(|c| c.api.connections_per_mailbox_max = 1).await;
    let owner = Owner::from_seed(10);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;

    // A long poll holds the mailbox's only slot.
    let first = {
        let http = http_client();
        let url = s.url(&format!("/v1/mailboxes/{}/messages?wait=3000", mid(&owner)));
        let token = token.clone();
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            expect_json(r, 200).await
        })
    };
    wait_for_gauge(&s, "polls_waiting", 1).await;
    // A second concurrent long poll → 429 + Retry-After; a plain poll is not limited.
    let r = s.poll(&owner, &token, "?wait=1000").await;
    expect_error(r, 429, "rate_limited").await;
    assert_eq!(
        seqs(&s.poll_ok(&owner, &token, "").await),
        Vec::<u64>::new()
    );
    // So is a stream.
    let ticket = s.stream_ticket(&owner, &token).await;
    ws_refused(&s.stream_url(&mid(&owner), &ticket), 429, "rate_limited").await;

    // A deposit ends the first poll; the slot is free again.
    s.deposit(&owner, b"wake").await;
    let page = first.await.unwrap();
    assert_eq!(seqs(&page), vec![1]);
    let started = Instant::now();
    let page = s.poll_ok(&owner, &token, "?after=1&wait=300").await;
    assert_eq!(seqs(&page), Vec::<u64>::new());
    assert!(started.elapsed() >= Duration::from_millis(280));

    // A stream holds the slot too, until it is closed.
    let ticket = s.stream_ticket(&owner, &token).await;
    let mut ws = ws_connect(&s.stream_url(&mid(&owner), &ticket)).await;
    assert_eq!(next_event(&mut ws).await["message"]["seq"], 1);
    expect_error(
        s.poll(&owner, &token, "?after=1&wait=1000").await,
        429,
        "rate_limited",
    )
    .await;
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = s.poll(&owner, &token, "?after=1&wait=50").await;
        if r.status() == 200 {
            break;
        }
        expect_error(r, 429, "rate_limited").await;
        assert!(
            Instant::now() < deadline,
            "closed stream still holds its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_long_poll_releases_its_slot_and_gauge() {
    let s = Server::start(|c| c.api.connections_per_mailbox_max = 1).await;
    let owner = Owner::from_seed(17);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    // The client gives up after 200 ms of a 1 s long poll and closes its connection.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let gave_up = impatient
        .get(s.url(&format!("/v1/mailboxes/{}/messages?wait=1000", mid(&owner))))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(gave_up.is_err());
    drop(impatient);
    // Whether the server cancelled the handler or let it run out its 1 s wait, the gauge
    // comes back to zero (the wait fails after 20 s if the abandoned poll stays counted)
    // and the slot is free.
    wait_for_gauge(&s, "polls_waiting", 0).await;
    let page = s.poll_ok(&owner, &token, "?wait=100").await;
    assert_eq!(seqs(&page), Vec::<u64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_refused_by_a_limit_keeps_its_ticket() {
    // "A refused request changes nothing": a 429 (retry later) must not burn the ticket.
    let mut s = Server::start(|c| c.api.connections_per_mailbox_max = 1).await;
    let owner = Owner::from_seed(11);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    let holder = s.stream_ticket(&owner, &token).await;
    let mut ws = ws_connect(&s.stream_url(&mid(&owner), &holder)).await;
    let ticket = s.stream_ticket(&owner, &token).await;
    let url = s.stream_url(&mid(&owner), &ticket);
    ws_refused(&url, 429, "rate_limited").await;
    ws.close(None).await.unwrap();
    drop(ws);
    s.deposit(&owner, b"x").await;
    // Once the server has seen the first stream close, the same ticket opens the stream;
    // until then it is refused with 429 again, each time without being spent.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ws = loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => break ws,
            Err(tungstenite::Error::Http(r))
                if r.status().as_u16() == 429 && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the ticket refused with 429 no longer opens the stream: {e}"),
        }
    };
    assert_eq!(next_event(&mut ws).await["message"]["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prekey_upload_checks_owner_signatures() {
    let s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(12);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    let path = format!("/v1/mailboxes/{}/prekeys", mid(&owner));
    let signer = &owner.owner;
    let identity_key = [0x11u8; 32];
    let upload = |prekeys: &[SignedPrekey], identity_signature: [u8; 64]| {
        json!({
            "identity_key": hex::encode(identity_key),
            "identity_signature": hex::encode(identity_signature),
            "prekeys": prekeys.iter().map(|p| json!({
                "key_id": p.key_id,
                "key": hex::encode(p.key),
                "fallback": p.fallback,
                "signature": hex::encode(p.signature),
            })).collect::<Vec<_>>(),
        })
    };
    let put = |body: Value| {
        s.http
            .put(s.url(&path))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let identity_signature = sign_identity(signer, &owner.mailbox_id, &identity_key);
    let mut keys: Vec<SignedPrekey> = (1..=3u32)
        .map(|id| {
            SignedPrekey::sign(
                signer,
                &owner.mailbox_id,
                id,
                false,
                [u8::try_from(id).unwrap(); 32],
            )
        })
        .collect();
    keys.push(SignedPrekey::sign(
        signer,
        &owner.mailbox_id,
        100,
        true,
        [0xfe; 32],
    ));
    assert_eq!(s.info(&owner, &token).await["prekeys_left"], 0);
    let r = put(upload(&keys, identity_signature)).await.unwrap();
    assert_eq!(expect_json(r, 200).await["one_time_keys"], 3);
    let info = s.info(&owner, &token).await;
    assert_eq!(info["prekeys_left"], 3);

    // A prekey with a bad signature, a key signed by another key, a bad identity signature.
    let mut tampered = keys.clone();
    tampered[1].signature[3] ^= 1;
    let r = put(upload(&tampered, identity_signature)).await.unwrap();
    expect_error(r, 401, "bad_signature").await;
    let mut foreign = keys.clone();
    foreign.push(SignedPrekey::sign(
        &owner.device(1),
        &owner.mailbox_id,
        9,
        false,
        [9; 32],
    ));
    let r = put(upload(&foreign, identity_signature)).await.unwrap();
    expect_error(r, 401, "bad_signature").await;
    let mut flipped = keys.clone();
    flipped[0].fallback = true;
    let r = put(upload(&flipped, identity_signature)).await.unwrap();
    expect_error(r, 401, "bad_signature").await;
    let mut bad_identity = identity_signature;
    bad_identity[0] ^= 1;
    let r = put(upload(&keys, bad_identity)).await.unwrap();
    expect_error(r, 401, "bad_signature").await;
    // Signed for another mailbox.
    let other = Owner::from_seed(13);
    let r = put(upload(
        &keys,
        sign_identity(signer, &other.mailbox_id, &identity_key),
    ))
    .await
    .unwrap();
    expect_error(r, 401, "bad_signature").await;
    let mut bad_hex = upload(&keys, identity_signature);
    bad_hex["prekeys"][0]["key"] = json!("xyz");
    expect_error(put(bad_hex).await.unwrap(), 400, "bad_request").await;
    assert_eq!(s.info(&owner, &token).await, info);

    // A replacement upload replaces.
    let r = put(upload(&keys[..1], identity_signature)).await.unwrap();
    assert_eq!(expect_json(r, 200).await["one_time_keys"], 1);
    assert_eq!(s.info(&owner, &token).await["prekeys_left"], 1);
}

/// Security review 6756e3f, finding 15: only the owner key's session replaces the prekeys. A
/// secondary device holds no owner key, but it could re-upload owner-signed prekeys it saw
/// before (one-time keys already handed out, so a sender would reuse them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_device_cannot_replace_the_prekeys() {
    let s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(15);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    let second = owner.device(1);
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/devices", mid(&owner)),
            &json!({"device_key": key_hex(&second), "signature": hex::encode(owner.sign_device(&second))}),
            Some(&token),
        )
        .await;
    assert_eq!(r.status(), 204);
    let token2 = s.login(&owner, &second).await;
    let path = format!("/v1/mailboxes/{}/prekeys", mid(&owner));
    let identity_key = [0x22u8; 32];
    let identity_signature = sign_identity(&owner.owner, &owner.mailbox_id, &identity_key);
    let upload = |ids: std::ops::RangeInclusive<u32>| {
        json!({
            "identity_key": hex::encode(identity_key),
            "identity_signature": hex::encode(identity_signature),
            "prekeys": ids.map(|id| {
                let p = SignedPrekey::sign(&owner.owner, &owner.mailbox_id, id, false,
                    [u8::try_from(id).unwrap(); 32]);
                json!({
                    "key_id": p.key_id,
                    "key": hex::encode(p.key),
                    "fallback": p.fallback,
                    "signature": hex::encode(p.signature),
                })
            }).collect::<Vec<_>>(),
        })
    };
    // The owner uploads keys 1..=2; the secondary device replays an older owner upload of
    // keys 1..=5 (every signature valid).
    let put = |token: &str, body: Value| {
        s.http
            .put(s.url(&path))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let r = put(&token, upload(1..=2)).await.unwrap();
    assert_eq!(expect_json(r, 200).await["one_time_keys"], 2);
    let info = s.info(&owner, &token).await;
    let r = put(&token2, upload(1..=5)).await.unwrap();
    expect_error(r, 403, "forbidden").await;
    assert_eq!(s.info(&owner, &token).await, info);
    assert_eq!(info["prekeys_left"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_sealed_and_delete_erases() {
    let mut s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(14);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    for body in [b"one".as_slice(), b"two", b"three"] {
        s.deposit(&owner, body).await;
    }
    assert_eq!(s.ack_ok(&owner, &token, 1).await, 1);
    let second = owner.device(1);
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/devices", mid(&owner)),
            &json!({"device_key": key_hex(&second), "signature": hex::encode(owner.sign_device(&second))}),
            Some(&token),
        )
        .await;
    assert_eq!(r.status(), 204);
    let token2 = s.login(&owner, &second).await;

    let export_path = format!("/v1/mailboxes/{}/export", mid(&owner));
    let export = expect_json(s.get(&export_path, Some(&token)).await, 200).await;
    assert_eq!(export["version"], 1);
    assert_eq!(export["mailbox"]["mailbox_id"], mid(&owner));
    assert_eq!(
        export["mailbox"]["mailbox_key"],
        hex::encode(owner.mailbox_secret.public_key().to_bytes())
    );
    assert_eq!(export["mailbox"]["messages"], 2);
    assert_eq!(seqs(&export), vec![2, 3]);
    let bodies: Vec<Vec<u8>> = export["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| open_message(&owner, m))
        .collect();
    assert_eq!(bodies, vec![b"two".to_vec(), b"three".to_vec()]);
    // Sealed: the stored envelope does not carry the access key.
    let raw = base64::engine::general_purpose::STANDARD
        .decode(export["messages"][0]["envelope"].as_str().unwrap())
        .unwrap();
    assert!(
        !raw.windows(32).any(|w| w == owner.access_token.as_bytes()),
        "export carries the access key"
    );
    // Any device of the mailbox may export.
    let export2 = expect_json(s.get(&export_path, Some(&token2)).await, 200).await;
    assert_eq!(seqs(&export2), vec![2, 3]);

    // DELETE by a device that is not the owner key → 403, nothing erased.
    let info = s.info(&owner, &token).await;
    let delete_path = format!("/v1/mailboxes/{}", mid(&owner));
    expect_error(s.delete(&delete_path, &token2).await, 403, "forbidden").await;
    assert_eq!(s.info(&owner, &token).await, info);
    s.deposit(&owner, b"four").await;

    // Owner → 204; every session ends, login fails, deposits find no mailbox.
    let before = metric(&s.metrics().await, "mailboxes");
    assert_eq!(s.delete(&delete_path, &token).await.status(), 204);
    expect_error(s.get(&delete_path, Some(&token)).await, 401, "unauthorized").await;
    expect_error(
        s.get(&delete_path, Some(&token2)).await,
        401,
        "unauthorized",
    )
    .await;
    expect_error(s.get(&export_path, Some(&token)).await, 401, "unauthorized").await;
    let challenge = s.challenge(&owner, &owner.device(0)).await;
    let signature = owner.sign_login(&owner.device(0), AUDIENCE, &challenge);
    let r = s
        .login_raw(
            &mid(&owner),
            &key_hex(&owner.device(0)),
            &challenge,
            &signature,
        )
        .await;
    expect_error(r, 401, "unauthorized").await;
    let dedup = DedupId::random(&mut s.rng);
    let envelope = owner
        .envelope(&mut s.rng, dedup, None, None, b"late")
        .unwrap();
    let refused = s.node.deposit(Incoming::Deposit(envelope)).await;
    assert!(
        matches!(refused, Err(MailboxError::UnknownMailbox)),
        "{refused:?}"
    );
    let m = s.metrics().await;
    assert_eq!(metric(&m, "mailboxes"), before - 1);
    assert_eq!(metric(&m, "messages"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let mut s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(15);
    s.create(&owner).await;
    s.deposit(&owner, b"counted").await;

    let r = s.get("/v1/openapi.json", None).await;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let paths = doc["paths"].as_object().unwrap();
    let exercised = [
        ("post", "/v1/mailboxes"),
        ("post", "/v1/auth/challenge"),
        ("post", "/v1/auth/login"),
        ("post", "/v1/auth/logout"),
        ("get", "/v1/mailboxes/{id}"),
        ("delete", "/v1/mailboxes/{id}"),
        ("get", "/v1/mailboxes/{id}/messages"),
        ("post", "/v1/mailboxes/{id}/ack"),
        ("post", "/v1/mailboxes/{id}/stream-ticket"),
        ("get", "/v1/mailboxes/{id}/stream"),
        ("post", "/v1/mailboxes/{id}/devices"),
        ("delete", "/v1/mailboxes/{id}/devices/{device}"),
        ("put", "/v1/mailboxes/{id}/prekeys"),
        ("get", "/v1/mailboxes/{id}/export"),
        ("get", "/healthz"),
        ("get", "/metrics"),
    ];
    for (method, path) in exercised {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "the document lacks {method} {path}"
        );
    }

    // Every documented operation is routed: nothing answers the fallback's 404 or a 405.
    let some_id = hex::encode([0x42u8; 32]);
    let some_device = hex::encode([0x43u8; 32]);
    let mut checked = 0;
    for (path, item) in paths {
        if path == "/v1/openapi.json" {
            continue;
        }
        let concrete = path
            .replace("{id}", &some_id)
            .replace("{device}", &some_device);
        assert!(!concrete.contains('{'), "unknown path parameter in {path}");
        for method in item.as_object().unwrap().keys() {
            let m = match method.as_str() {
                "get" => reqwest::Method::GET,
                "post" => reqwest::Method::POST,
                "put" => reqwest::Method::PUT,
                "delete" => reqwest::Method::DELETE,
                "patch" => reqwest::Method::PATCH,
                "parameters" | "summary" | "description" | "servers" => continue,
                other => panic!("unexpected method {other} on {path}"),
            };
            let mut request = s.http.request(m.clone(), s.url(&concrete));
            if m != reqwest::Method::GET && m != reqwest::Method::DELETE {
                request = request.json(&json!({}));
            }
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert_ne!(
                status, 405,
                "{method} {path} is documented but not routed: {text}"
            );
            if status == 404 {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                assert_ne!(
                    v["error"], "not_found",
                    "{method} {path} is documented but not routed"
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= exercised.len(),
        "only {checked} operations documented"
    );
    // The fallback itself is a JSON 404.
    expect_error(s.get("/v1/nowhere", None).await, 404, "not_found").await;
    expect_error(
        s.get(&format!("/v1/mailboxes/{some_id}/nowhere"), None)
            .await,
        404,
        "not_found",
    )
    .await;

    let r = s.get("/healthz", None).await;
    assert_eq!(r.status(), 200);
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("whispr_mailbox_deposits_stored_total"),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "deposits_stored_total"), 1);
    assert_eq!(metric(&metrics, "mailboxes"), 1);
    for secret in [
        mid(&owner),
        key_hex(&owner.device(0)),
        hex::encode(owner.access_token.as_bytes()),
    ] {
        assert!(!metrics.contains(&secret), "metrics carry an id or key");
        assert!(
            !metrics.contains(&secret[..16]),
            "metrics carry part of an id or key"
        );
    }
}

/// A node serving its API over TLS with a fresh self-signed certificate for `localhost`, and a
/// test client that trusts it: the server, the certificate, its PEM files' directory and paths,
/// and the port.
struct TlsNode {
    s: Server,
    cert: rcgen::CertifiedKey<rcgen::KeyPair>,
    certs: tempfile::TempDir,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    port: u16,
}

async fn tls_node() -> TlsNode {
    install_crypto();
    let certs = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = generated.cert.pem();
    let cert_file = certs.path().join("cert.pem");
    let key_file = certs.path().join("key.pem");
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, generated.signing_key.serialize_pem()).unwrap();
    let mut s = Server::start(|c| {
        c.api.tls_cert_file = Some(cert_file.clone());
        c.api.tls_key_file = Some(key_file.clone());
    })
    .await;
    let port = s.addr.port();
    s.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .resolve("localhost", s.addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    s.base = format!("https://localhost:{port}");
    TlsNode {
        s,
        cert: generated,
        certs,
        cert_file,
        key_file,
        port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_streams_over_wss_from_a_tls_node() {
    // Issue 16, "Transport": `recv --stream` works over `wss://` against a TLS node. Before:
    // the client refused any stream that was not plain `ws://` ("streaming needs a plain-HTTP
    // (loopback) mailbox node; over TLS, poll instead").
    let TlsNode {
        mut s,
        cert: generated,
        certs: _certs,
        port,
        ..
    } = tls_node().await;
    let owner = Owner::from_seed(18);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;

    // The client's own URL and TLS path: trusting the node's certificate (a private CA).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let tls = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let url = |ticket: &str| {
        format!(
            "wss://localhost:{port}/v1/mailboxes/{}/stream?ticket={ticket}&after=0",
            mid(&owner)
        )
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let ticket = s.stream_ticket(&owner, &token).await;
    let stream = tokio::spawn(whispr_client::net::run_stream_with(
        url(&ticket),
        "mine".to_string(),
        tx,
        Some(tls),
    ));
    s.deposit(&owner, b"pushed over wss").await;
    let (tag, message) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("no message pushed over wss within 30 s")
        .expect("the stream ended without a message");
    assert_eq!(tag, "mine");
    assert_eq!(
        open_message(&owner, &serde_json::to_value(&message).unwrap()),
        b"pushed over wss"
    );
    stream.abort();

    // With the platform's roots only, the self-signed node is refused: no stream, a typed
    // error naming TLS.
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let ticket = s.stream_ticket(&owner, &token).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        whispr_client::net::run_stream(url(&ticket), "mine".to_string(), tx),
    )
    .await
    .expect("the untrusted TLS stream neither failed nor ended");
    assert!(
        matches!(&refused, Err(whispr_client::ClientError::Unreachable { reason, .. }) if reason.contains("TLS")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_api_and_refuses_plain_http() {
    let TlsNode {
        mut s,
        certs,
        cert_file,
        key_file,
        port,
        ..
    } = tls_node().await;

    let owner = Owner::from_seed(16);
    s.create(&owner).await;
    let token = s.login(&owner, &owner.device(0)).await;
    s.deposit(&owner, b"over tls").await;
    let page = s.poll_ok(&owner, &token, "").await;
    assert_eq!(open_message(&owner, &page["messages"][0]), b"over tls");
    expect_error(s.poll(&owner, &token, "?after=9").await, 422, "bad_cursor").await;

    // Plain HTTP to the TLS port fails; so does HTTPS to a client that does not trust it.
    let plain = http_client()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|r| r.status())
    );
    let untrusting = reqwest::Client::builder()
        .resolve("localhost", s.addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await;
    assert!(untrusting.is_err(), "an untrusted certificate was accepted");

    // Plain HTTP is only allowed on loopback.
    let mut config = NodeConfig::with_data_dir(certs.path().join("unused"));
    config.api.listen = "0.0.0.0:7400".parse().unwrap();
    let err = config.check().unwrap_err();
    assert_eq!(err.key, "api.tls_cert_file");
    assert!(err.to_string().contains("api.tls_cert_file"), "{err}");
    config.api.listen = "[::]:7400".parse().unwrap();
    assert_eq!(config.check().unwrap_err().key, "api.tls_cert_file");
    config.api.tls_cert_file = Some(cert_file.clone());
    assert_eq!(config.check().unwrap_err().key, "api.tls_key_file");
    config.api.tls_key_file = Some(key_file.clone());
    config.check().unwrap();
    config.api.listen = "[::1]:7400".parse().unwrap();
    config.api.tls_cert_file = None;
    config.api.tls_key_file = None;
    config.check().unwrap();
}

/// Waits up to 2 s for the server to end a stream; fails if it pushes a message instead.
async fn expect_stream_end(ws: &mut Ws, what: &str) {
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(tungstenite::Message::Close(_))) => return,
                Some(Ok(tungstenite::Message::Text(text))) => {
                    let event: Value = serde_json::from_str(&text).unwrap();
                    assert_ne!(
                        event["type"], "message",
                        "{what}: the stream still pushes {event}"
                    );
                }
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "{what}: the stream is still open after 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_session_ends_its_open_stream() {
    let mut s = Server::start(|_| {}).await;
    let owner = Owner::from_seed(18);
    s.create(&owner).await;

    // Logout: the session is over, so is its stream (documented: a stream ends with its
    // session); new messages are not pushed to it.
    let token = s.login(&owner, &owner.device(0)).await;
    let ticket = s.stream_ticket(&owner, &token).await;
    let mut ws = ws_connect(&s.stream_url(&mid(&owner), &ticket)).await;
    let r = s
        .http
        .post(s.url("/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    s.deposit(&owner, b"after logout").await;
    expect_stream_end(&mut ws, "after logout").await;

    // Removing a device ends its stream.
    let token = s.login(&owner, &owner.device(0)).await;
    let second = owner.device(1);
    let r = s
        .post(
            &format!("/v1/mailboxes/{}/devices", mid(&owner)),
            &json!({"device_key": key_hex(&second), "signature": hex::encode(owner.sign_device(&second))}),
            Some(&token),
        )
        .await;
    assert_eq!(r.status(), 204);
    let token2 = s.login(&owner, &second).await;
    let ticket = s.stream_ticket(&owner, &token2).await;
    let mut ws = ws_connect(&s.stream_url(&mid(&owner), &ticket)).await;
    assert_eq!(next_event(&mut ws).await["message"]["seq"], 1);
    let r = s
        .delete(
            &format!("/v1/mailboxes/{}/devices/{}", mid(&owner), key_hex(&second)),
            &token,
        )
        .await;
    assert_eq!(r.status(), 204);
    expect_stream_end(&mut ws, "after the device was removed").await;

    // Erasing the mailbox ends every stream of it, even with nothing new deposited.
    let ticket = s.stream_ticket(&owner, &token).await;
    let mut ws = ws_connect(&s.stream_url(&mid(&owner), &ticket)).await;
    assert_eq!(next_event(&mut ws).await["message"]["seq"], 1);
    let r = s
        .delete(&format!("/v1/mailboxes/{}", mid(&owner)), &token)
        .await;
    assert_eq!(r.status(), 204);
    expect_stream_end(&mut ws, "after erasure").await;
}

/// A client whose connections come from `source` (a loopback address: 127.0.0.0/8 is
/// all local) and are never reused: every request opens a fresh connection.
fn client_from(source: &str) -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .local_address(Some(source.parse().unwrap()))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

impl Server {
    /// The same node seen through another client.
    fn through(&self, http: reqwest::Client) -> Server {
        Server {
            node: self.node.clone(),
            addr: self.addr,
            base: self.base.clone(),
            http,
            rng: ChaCha20Rng::seed_from_u64(2),
            stop: None,
            _dir: tempfile::tempdir().unwrap(),
        }
    }
}

/// Security review, finding 11 (b): the login-challenge table is global, so one address
/// asking for challenges on fresh connections (each with a new per-connection budget) filled
/// it and nobody else could log in. A flood from one address must leave room for others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_flood_from_one_address_does_not_lock_out_other_owners() {
    let s = Server::start(|c| c.auth.challenges_max = 64).await;
    let owner = Owner::from_seed(41);
    s.create(&owner).await;
    let attacker = client_from("127.0.0.1");
    let stranger = Owner::from_seed(42);
    let mut granted = 0;
    for _ in 0..=64 {
        let r = attacker
            .post(s.url("/v1/auth/challenge"))
            .json(&json!({"mailbox_id": mid(&stranger), "device_key": key_hex(&stranger.owner)}))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            expect_error(r, 429, "rate_limited").await;
            break;
        }
        granted += 1;
    }
    assert!(granted >= 1);
    // The owner, from another address, still logs in.
    let victim = s.through(client_from("127.0.0.2"));
    let r = victim
        .post(
            "/v1/auth/challenge",
            &json!({"mailbox_id": mid(&owner), "device_key": key_hex(&owner.owner)}),
            None,
        )
        .await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(
        status, 200,
        "after {granted} challenges from one address, another address was refused: {text}"
    );
    victim.login(&owner, &owner.device(0)).await;
}

/// Security review, finding 11 (c): mailbox creation is unauthenticated, so one address
/// could create mailboxes until `mailboxes_max` and no new user could be served. Creation is
/// rate limited per address, so others can still create theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_fill_the_node_with_mailboxes() {
    let s = Server::start(|c| c.limits.mailboxes_max = 100).await;
    let attacker = s.through(client_from("127.0.0.1"));
    let mut created = 0;
    for seed in 1_000..1_101 {
        let r = attacker
            .post(
                "/v1/mailboxes",
                &create_body(&Owner::from_seed(seed).create_request(RETENTION_MS)),
                None,
            )
            .await;
        if r.status() != 201 {
            let status = r.status();
            let text = r.text().await.unwrap();
            assert_eq!(status, 429, "{text}");
            break;
        }
        created += 1;
    }
    let newcomer = Owner::from_seed(2_000);
    let r = s
        .through(client_from("127.0.0.3"))
        .post(
            "/v1/mailboxes",
            &create_body(&newcomer.create_request(RETENTION_MS)),
            None,
        )
        .await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(
        status, 201,
        "after {created} mailboxes from one address, another address could not create one: {text}"
    );
}

/// Security review, finding 11 (c): mailboxes never expired, so mass-created ones held the
/// node's capacity for ever. A mailbox nobody logged in to (and that received nothing) is
/// erased `unused_mailbox_ttl_ms` after its creation; one its owner logged in to stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_nobody_uses_is_erased_after_its_grace_period() {
    let s = Server::start(|c| {
        c.limits.unused_mailbox_ttl_ms = 1_000;
        c.limits.expiry_bucket_ms = 100;
    })
    .await;
    let unused = Owner::from_seed(51);
    let used = Owner::from_seed(52);
    s.create(&unused).await;
    s.create(&used).await;
    s.login(&used, &used.device(0)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s
            .post(
                "/v1/mailboxes",
                &create_body(&unused.create_request(RETENTION_MS)),
                None,
            )
            .await;
        match r.status().as_u16() {
            201 => break,
            409 => {}
            other => panic!("creating again gave {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "a mailbox nobody logged in to was still there 60 s after its 1 s grace period"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The one its owner logged in to is still there.
    let r = s
        .post(
            "/v1/mailboxes",
            &create_body(&used.create_request(RETENTION_MS)),
            None,
        )
        .await;
    expect_error(r, 409, "mailbox_exists").await;
}

/// Security review, finding 6: `/metrics` counted deposits, SURB replies and waiting polls in
/// real time, so anyone scraping it learnt to the second when a mailbox received a deposit.
/// The published counters change at most once per `metrics_interval_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_do_not_time_a_deposit() {
    let mut s = Server::start(|c| c.api.metrics_interval_ms = 60_000).await;
    let owner = Owner::from_seed(61);
    s.create(&owner).await;
    let before = metric(&s.metrics().await, "deposits_stored_total");
    s.deposit(&owner, b"when?").await;
    let after = metric(&s.metrics().await, "deposits_stored_total");
    assert_eq!(
        after, before,
        "a scrape right after a deposit showed it ({before} -> {after})"
    );
}

/// Security review, finding 6: `/metrics` was served on the public API listener. With a
/// metrics listener configured, the API listener answers 404 for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_not_served_on_the_api_listener_when_a_metrics_listener_is_set() {
    let s = Server::start(|c| c.api.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let r = s.get("/metrics", None).await;
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    // Health stays on the API listener.
    assert_eq!(s.get("/healthz", None).await.status(), 200);
}

/// Replica messages a node sends, kept for the test.
#[derive(Default)]
struct CapturedReplicas(std::sync::Mutex<Vec<(whispr_protocol::NodeId, Vec<u8>)>>);

impl whispr_mailbox::node::ReplicaTransport for CapturedReplicas {
    fn send(&self, to: whispr_protocol::NodeId, bytes: Vec<u8>) {
        self.0.lock().unwrap().push((to, bytes));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_mailbox_is_created_with_its_replica_set_and_messages_carry_their_id() {
    use whispr_mailbox::testkit::create_body_replicated;
    use whispr_protocol::NodeId;
    use whispr_protocol::replica::ReplicaMessage;
    let me = NodeId([7; 32]);
    let peer = NodeId([8; 32]);
    let mut server = Server::start(|c| c.limits.node_id = Some(me.0)).await;
    let captured = Arc::new(CapturedReplicas::default());
    server.node.attach_replica_transport(
        captured.clone() as Arc<dyn whispr_mailbox::node::ReplicaTransport>
    );
    // A replica set that does not name this node, an empty one, a v1 signature with a
    // replica set: refused.
    let other = Owner::from_seed(41);
    let not_me = [peer, NodeId([9; 32])];
    let r = server
        .post(
            "/v1/mailboxes",
            &create_body_replicated(
                &other.create_request_replicated(RETENTION_MS, &not_me),
                &not_me,
            ),
            None,
        )
        .await;
    expect_error(r, 422, "invalid_argument").await;
    let r = server
        .post(
            "/v1/mailboxes",
            &create_body_replicated(&other.create_request_replicated(RETENTION_MS, &[me]), &[]),
            None,
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = server
        .post(
            "/v1/mailboxes",
            &create_body_replicated(&other.create_request(RETENTION_MS), &[me, peer]),
            None,
        )
        .await;
    expect_error(r, 401, "bad_signature").await;
    // Named: created.
    let owner = Owner::from_seed(42);
    let replicas = [me, peer];
    let r = server
        .post(
            "/v1/mailboxes",
            &create_body_replicated(
                &owner.create_request_replicated(RETENTION_MS, &replicas),
                &replicas,
            ),
            None,
        )
        .await;
    expect_json(r, 201).await;
    // A deposit is pushed to the peer, and served with its id.
    let dedup = DedupId::random(&mut server.rng);
    let envelope = owner
        .envelope(&mut server.rng, dedup, None, None, b"replicated")
        .unwrap();
    server
        .node
        .deposit(Incoming::Deposit(envelope))
        .await
        .unwrap();
    let sent = captured.0.lock().unwrap().clone();
    assert!(sent.iter().any(|(to, bytes)| *to == peer
        && matches!(ReplicaMessage::decode(bytes), Ok(ReplicaMessage::Push { items, .. }) if items.len() == 1 && items[0].id == dedup.0)));
    let token = server.login(&owner, &owner.owner).await;
    let page = server.poll_ok(&owner, &token, "").await;
    assert_eq!(page["messages"][0]["id"], hex::encode(dedup.0));
}
