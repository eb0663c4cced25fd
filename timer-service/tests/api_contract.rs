//! The timer's OpenAPI document (`whispr-timer openapi`, `GET /v1/admin/openapi.json`; docs/timer.md,
//! "API contract and fuzzing"): it lists exactly the routes the router serves, every admin
//! operation documents its token and errors; and the answers the API fuzzer
//! (`tests/api_fuzz.rs`, `make api-fuzz`) found outside it, against a node in process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;
use whispr_timer_service::deferred::NoMesh;
use whispr_timer_service::node::{NodeConfig, TimerNode};
use whispr_timer_service::openapi::{ADMIN_PREFIX, openapi};

const TOKEN: &str = "api-contract-admin-token-0123456789abcdef";

/// Every (method, path) the router in `src/node.rs` registers, read from its source: each
/// `.route("PATH", get|post(handler))` of `TimerNode::router`, admin ones under the prefix.
fn served_routes() -> BTreeSet<(String, String)> {
    let source = include_str!("../src/node.rs");
    let start = source.find("pub fn router(&self) -> Router").unwrap();
    let end = start + source[start..].find("\n    }\n").unwrap();
    let body = &source[start..end];
    // `let admin = Router::new().route(…)…;` then the root `Router::new().route(…)…`.
    let first = body.find("Router::new()").unwrap();
    let root_start = first + 1 + body[first + 1..].find("Router::new()").unwrap();
    assert!(
        body[..first].contains("let admin"),
        "the router's shape changed"
    );
    let mut out = BTreeSet::new();
    let mut rest = body;
    while let Some(i) = rest.find(".route(\"") {
        let offset = body.len() - rest.len() + i;
        let after = &rest[i + 8..];
        let path = &after[..after.find('"').unwrap()];
        let handler = after[after.find(", ").unwrap() + 2..].trim_start();
        let method = &handler[..handler.find('(').unwrap()];
        let full = if offset < root_start {
            format!("{ADMIN_PREFIX}{path}")
        } else {
            path.to_owned()
        };
        out.insert((method.to_owned(), full));
        rest = &after[1..];
    }
    out
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.clone(), path.clone()));
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_routes_the_router_serves() {
    let served = served_routes();
    assert!(served.len() >= 12, "{served:?}");
    assert!(served.contains(&("get".into(), "/healthz".into())));
    assert!(served.contains(&("post".into(), "/v1/admin/backup".into())));
    assert_eq!(documented_routes(&openapi()), served);
}

#[test]
fn every_admin_operation_documents_its_token_and_errors() {
    let doc = openapi();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{method} {path}");
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("200"), "{name}");
            let secured = op.get("security").is_some();
            let open = ["/healthz", "/metrics", "/v1/admin/openapi.json"].contains(&path.as_str());
            assert_eq!(secured, !open, "{name}: token");
            if secured {
                for code in ["401", "500", "503"] {
                    assert!(responses.contains_key(code), "{name}: no {code}");
                }
            }
            if op.get("requestBody").is_some() {
                assert!(responses.contains_key("400"), "{name}: a body but no 400");
                assert_eq!(op["requestBody"]["required"], true, "{name}");
            }
            for (code, response) in responses {
                assert!(
                    !response["description"].as_str().unwrap_or("").is_empty(),
                    "{name} {code}: no description"
                );
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                if code.starts_with('4') || code.starts_with('5') {
                    let typed = schema == "#/components/schemas/ErrorBody"
                        // The audit log's verification answers its report with 409.
                        || (path == "/v1/admin/audit/verify"
                            && schema == "#/components/schemas/VerifyReport")
                        || !response["content"]["text/plain"].is_null();
                    assert!(typed, "{name} {code}: error without its body");
                }
            }
        }
    }
    // Every reference resolves.
    let text = doc.to_string();
    for (i, _) in text.match_indices("#/components/schemas/") {
        let rest = &text[i + 21..];
        let name = &rest[..rest.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{name} not defined"
        );
    }
}

/// Found by Schemathesis (seed 1) on the code before this test: `POST /v1/admin/pause` with
/// the body `[]` answered 200 and paused every category (serde's derived structs also accept
/// an array of their fields). Every body must now be a JSON object.
#[test]
fn admin_bodies_that_are_not_objects_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("timer.toml");
    std::fs::write(
        &config_path,
        format!(
            "data_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let config = NodeConfig::load(&config_path).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let node = TimerNode::open(config, Arc::new(NoMesh)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = node.router();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let call = |method: &'static str, path: &'static str, body: &'static str| {
            tokio::task::spawn_blocking(move || http(port, method, path, body))
        };
        for (path, body) in [
            ("/v1/admin/pause", "[]"),
            ("/v1/admin/pause", "[\"expiry\"]"),
            ("/v1/admin/purge", "[\"maintenance\"]"),
            (
                "/v1/admin/quarantine",
                "[\"00112233445566778899aabbccddeeff\"]",
            ),
            ("/v1/admin/backup", "[\"/tmp\"]"),
            ("/v1/admin/resume", "null"),
        ] {
            let (status, answer) = call("POST", path, body).await.unwrap();
            assert_eq!(status, 400, "{path} {body}: {answer}");
            let answer: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(answer["error"], "malformed_json", "{path} {body}");
        }
        let (status, queues) = call("GET", "/v1/admin/queues", "").await.unwrap();
        assert_eq!(status, 200);
        let queues: Value = serde_json::from_str(&queues).unwrap();
        for (name, stats) in queues.as_object().unwrap() {
            assert_eq!(stats["paused"], false, "{name} paused by an array body");
        }
        // Objects still work.
        let (status, _) = call("POST", "/v1/admin/pause", "{}").await.unwrap();
        assert_eq!(status, 200);
        server.abort();
    });
}

/// A minimal HTTP/1.1 request with the admin token: (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
