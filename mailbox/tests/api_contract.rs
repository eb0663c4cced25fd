//! The OpenAPI document states exactly what the mailbox API accepts and returns
//! (docs/mailbox.md, "API contract and fuzzing"): these tests check the document's own
//! properties, and the answers the API fuzzer (`tests/api_fuzz.rs`, `make api-fuzz`) found
//! outside it, in process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::net::TcpListener;
use std::sync::Arc;

use serde_json::{Value, json};
use whispr_mailbox::http::openapi;
use whispr_mailbox::node::{MailboxNode, NoMesh, NodeConfig};
use whispr_mailbox::testkit::{Owner, create_body};

fn document() -> Value {
    serde_json::to_value(openapi()).unwrap()
}

/// Every (method, path, operation) of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((method.clone(), path.clone(), op.clone()));
        }
    }
    out
}

fn statuses(op: &Value) -> Vec<String> {
    op["responses"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn every_operation_documents_its_errors_and_every_429_its_retry_after() {
    let doc = document();
    let ops = operations(&doc);
    assert_eq!(ops.len(), 16, "the API's 16 operations");
    for (method, path, op) in &ops {
        let name = format!("{method} {path}");
        let codes = statuses(op);
        // Every route is behind the per-connection limiter.
        assert!(codes.contains(&"429".into()), "{name}: no 429");
        let retry = &op["responses"]["429"]["headers"]["Retry-After"];
        assert_eq!(
            retry["schema"]["type"], "integer",
            "{name}: 429 without Retry-After"
        );
        assert_eq!(retry["schema"]["minimum"], 1, "{name}");
        if op.get("requestBody").is_some() {
            for code in ["400", "413"] {
                assert!(codes.contains(&code.into()), "{name}: a body but no {code}");
            }
        }
        let bearer = op.get("security").is_some();
        if bearer {
            assert!(codes.contains(&"401".into()), "{name}: a token but no 401");
        }
        if path.contains("{id}") {
            for code in ["400", "401"] {
                assert!(codes.contains(&code.into()), "{name}: an id but no {code}");
            }
        }
        for (code, response) in op["responses"].as_object().unwrap() {
            assert!(
                !response["description"].as_str().unwrap_or("").is_empty(),
                "{name} {code}: no description"
            );
            if code.starts_with('4') || code.starts_with('5') {
                let json = &response["content"]["application/json"]["schema"]["$ref"];
                let text = &response["content"]["text/plain"];
                assert!(
                    json == "#/components/schemas/ErrorBody" || !text.is_null(),
                    "{name} {code}: error without the typed error body"
                );
            }
        }
    }
}

#[test]
fn parameters_are_where_the_server_reads_them_with_their_exact_format() {
    let doc = document();
    for (method, path, op) in operations(&doc) {
        let name = format!("{method} {path}");
        for p in op["parameters"].as_array().unwrap_or(&Vec::new()) {
            let pname = p["name"].as_str().unwrap();
            let place = p["in"].as_str().unwrap();
            let schema = &p["schema"];
            match place {
                "path" => {
                    assert!(path.contains(&format!("{{{pname}}}")), "{name}: {pname}");
                    assert_eq!(p["required"], true, "{name}: {pname}");
                    assert_eq!(schema["pattern"], "^[0-9a-fA-F]{64}$", "{name}: {pname}");
                    assert_eq!(schema["minLength"], 64, "{name}: {pname}");
                    assert_eq!(schema["maxLength"], 64, "{name}: {pname}");
                }
                "query" => {
                    // Only the stream's ticket is required; the others are optional numbers.
                    let required = p["required"].as_bool().unwrap_or(false);
                    assert_eq!(required, pname == "ticket", "{name}: {pname}");
                    if pname != "ticket" {
                        assert_eq!(schema["type"], "integer", "{name}: {pname} nullable?");
                        assert!(schema["maximum"].is_number(), "{name}: {pname}");
                    }
                }
                "header" => assert!(path.ends_with("/stream"), "{name}: header {pname}"),
                other => panic!("{name}: {pname} in {other}"),
            }
        }
    }
}

#[test]
fn hex_fields_state_their_pattern_and_length() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let hex64 = |s: &str, f: &str| {
        let field = &schemas[s]["properties"][f];
        assert_eq!(field["minLength"], 64, "{s}.{f}");
        assert_eq!(field["maxLength"], 64, "{s}.{f}");
        assert!(
            field["pattern"].as_str().unwrap().contains("{64}"),
            "{s}.{f}"
        );
    };
    let hex128 = |s: &str, f: &str| {
        let field = &schemas[s]["properties"][f];
        assert_eq!(field["minLength"], 128, "{s}.{f}");
        assert_eq!(field["pattern"], "^[0-9a-fA-F]{128}$", "{s}.{f}");
    };
    for f in [
        "mailbox_id",
        "mailbox_key",
        "owner_key",
        "access_key_hash",
        "reply_key",
    ] {
        hex64("CreateMailboxRequest", f);
    }
    hex128("CreateMailboxRequest", "signature");
    for f in ["mailbox_id", "device_key", "challenge"] {
        hex64("LoginRequest", f);
    }
    hex128("LoginRequest", "signature");
    hex64("ChallengeRequest", "mailbox_id");
    hex64("ChallengeRequest", "device_key");
    hex64("DeviceRequest", "device_key");
    hex128("DeviceRequest", "signature");
    hex64("PrekeysRequest", "identity_key");
    hex128("PrekeysRequest", "identity_signature");
    hex64("PrekeyJson", "key");
    hex128("PrekeyJson", "signature");
    for (s, f) in [
        ("CreatedResponse", "mailbox_id"),
        ("ChallengeResponse", "challenge"),
        ("TokenResponse", "token"),
        ("InfoResponse", "mailbox_id"),
        ("InfoResponse", "owner_key"),
        ("DeviceJson", "device_key"),
    ] {
        hex64(s, f);
    }
    assert_eq!(
        schemas["MessageJson"]["properties"]["envelope"]["pattern"],
        "^[A-Za-z0-9+/]*={0,2}$"
    );
    assert_eq!(schemas["HexNodeId"]["pattern"], "^[0-9a-fA-F]{64}$");
    let replicas = &schemas["CreateMailboxRequest"]["properties"]["replicas"];
    assert_eq!(
        (&replicas["minItems"], &replicas["maxItems"]),
        (&json!(1), &json!(5))
    );
    // Unknown fields are refused, and the document says so.
    for s in [
        "CreateMailboxRequest",
        "ChallengeRequest",
        "LoginRequest",
        "AckRequest",
        "DeviceRequest",
        "PrekeysRequest",
        "PrekeyJson",
    ] {
        assert_eq!(schemas[s]["additionalProperties"], false, "{s}");
    }
}

struct Live {
    base: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn live() -> Live {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::with_data_dir(dir.path().join("data"));
    config.check().unwrap();
    let node = MailboxNode::open(config, Arc::new(NoMesh::default())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = node
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await;
    });
    Live {
        base,
        http: reqwest::Client::new(),
        _stop: stop,
        _dir: dir,
    }
}

async fn error_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let content_type = r.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(content_type, "application/json", "status {status}");
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].is_string());
    (status, body["error"].as_str().unwrap().to_string())
}

/// Found by the fuzzer: a stream request without the WebSocket handshake headers was
/// answered axum's plain-text 400, outside the document (every error is an `ErrorBody`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_request_without_the_handshake_gets_a_typed_400() {
    let s = live().await;
    let id = "ab".repeat(32);
    let ticket = "cd".repeat(32);
    let r = s
        .http
        .get(format!(
            "{}/v1/mailboxes/{id}/stream?ticket={ticket}",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (400, "bad_request".to_string()));
}

/// Found by the fuzzer: JSON Schema's `integer` includes `5.0`; serde refused it (400 to a
/// schema-valid request). Integral numbers are integers now; fractions are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integral_float_is_an_integer_and_a_fraction_is_not() {
    let s = live().await;
    let owner = Owner::from_seed(3);
    let mut body = create_body(&owner.create_request(86_400_000));
    body["retention_ms"] = json!(86_400_000.0);
    let r = s
        .http
        .post(format!("{}/v1/mailboxes", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let other = Owner::from_seed(4);
    let mut body = create_body(&other.create_request(86_400_000));
    body["retention_ms"] = json!(86_400_000.5);
    let r = s
        .http
        .post(format!("{}/v1/mailboxes", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (400, "bad_request".to_string()));
}

/// A well-formed request the node refuses for its content is a 422, never a 400: the
/// fuzzer's "schema-valid request refused" check holds the line between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_formed_request_refused_for_its_content_is_422() {
    let s = live().await;
    let owner = Owner::from_seed(5);
    // A retention above the node's maximum.
    let body = create_body(&owner.create_request(u64::MAX));
    let r = s
        .http
        .post(format!("{}/v1/mailboxes", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (422, "invalid_argument".to_string()));
    // An owner key that is not a curve point (y = 2 does not decompress).
    let mut body = create_body(&owner.create_request(86_400_000));
    body["owner_key"] = json!(format!("02{}", "00".repeat(31)));
    let r = s
        .http
        .post(format!("{}/v1/mailboxes", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, kind) = error_of(r).await;
    assert!(
        (status, kind.as_str()) == (422, "invalid_argument")
            || (status, kind.as_str()) == (401, "bad_signature"),
        "{status} {kind}"
    );
}

/// The served document is the one `whispr-mailbox openapi` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_printed_one() {
    let s = live().await;
    let r = s
        .http
        .get(format!("{}/v1/openapi.json", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let served: Value = r.json().await.unwrap();
    assert_eq!(served, document());
}

/// Found by the fuzzer (seed 3, 150 examples): `wait=9223372036854775808` (2^63) was
/// "schema-violating" for the document (`format: int64`) yet served. A `u64` has its true
/// maximum and no int64 format now, here and in every body.
#[test]
fn no_integer_is_documented_as_int64_beyond_its_range() {
    fn walk(v: &Value, at: &str) {
        match v {
            Value::Object(map) => {
                if map.get("format") == Some(&json!("int64"))
                    && let Some(max) = map.get("maximum")
                {
                    assert!(
                        max.as_i64().is_some(),
                        "{at}: format int64 with maximum {max}"
                    );
                }
                for (k, child) in map {
                    walk(child, &format!("{at}/{k}"));
                }
            }
            Value::Array(items) => items.iter().for_each(|c| walk(c, at)),
            _ => {}
        }
    }
    let doc = document();
    walk(&doc, "");
    let poll = &doc["paths"]["/v1/mailboxes/{id}/messages"]["get"]["parameters"];
    let wait = poll
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "wait")
        .unwrap();
    assert_eq!(wait["schema"]["maximum"], json!(u64::MAX));
}
