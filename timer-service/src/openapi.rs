//! The timer node's HTTP API as an OpenAPI 3.1 document (docs/timer.md, "API contract and
//! fuzzing"): every route [`crate::node::TimerNode::router`] serves, the exact bodies and
//! query parameters the handlers accept, every status each can answer with its body.
//! Printed by `whispr-timer openapi` and served at `GET /v1/admin/openapi.json`; checked
//! against the router by `tests/api_contract.rs` and against a live node by Schemathesis
//! (`tests/api_fuzz.rs`, `make api-fuzz`).
//!
//! Written out here rather than derived (the mailbox derives its document with utoipa): the
//! response types live in the core modules (queue, audit, backup), which stay free of HTTP
//! concerns.

use serde_json::{Value, json};

use crate::task::Category;

/// The admin routes' prefix.
pub const ADMIN_PREFIX: &str = "/v1/admin";

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn ok(schema: Value) -> Value {
    json!({
        "description": "Done (appended to the audit log).",
        "content": {"application/json": {"schema": schema}}
    })
}

fn body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

/// An authenticated admin operation: the bearer token, 401, and the store's 500 / 503.
fn admin(id: &str, summary: &str, mut responses: Value, request: Option<Value>) -> Value {
    if let Some(r) = responses.as_object_mut() {
        r.insert(
            "401".into(),
            error("unauthorized: missing or wrong bearer token."),
        );
        r.insert(
            "500".into(),
            error("internal: the store or the audit log failed."),
        );
        r.insert(
            "503".into(),
            error("store_poisoned: a store write failed earlier; every later write is refused until a restart."),
        );
    }
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": responses,
    });
    if let (Some(request), Some(o)) = (request, op.as_object_mut()) {
        o.insert("requestBody".into(), request);
    }
    op
}

fn with_parameters(mut op: Value, parameters: Value) -> Value {
    if let Some(o) = op.as_object_mut() {
        o.insert("parameters".into(), parameters);
    }
    op
}

fn done() -> Value {
    json!({"$ref": "#/components/schemas/Done"})
}

/// The document.
pub fn openapi() -> Value {
    let names: Vec<&str> = Category::ALL.into_iter().map(Category::name).collect();
    let bad_body = "malformed_json (not JSON, not this object, unknown or missing fields, \
                    no JSON content type)";
    let paths = json!({
        "/healthz": {"get": {
            "operationId": "healthz",
            "summary": "Liveness: the store (and the mesh, when joined) works.",
            "responses": {
                "200": {"description": "Healthy.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "503": {"description": "The store (or the mesh) is failing.", "content": {"text/plain": {"schema": {"type": "string"}}}}
            }
        }},
        "/metrics": {"get": {
            "operationId": "metrics",
            "summary": "Prometheus text exposition.",
            "responses": {
                "200": {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
            }
        }},
        "/v1/admin/openapi.json": {"get": {
            "operationId": "openapi",
            "summary": "This document (no token: it holds nothing secret).",
            "responses": {
                "200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}
            }
        }},
        "/v1/admin/queues": {"get": admin("queues", "Per category: scheduled, due, running, quarantined, paused.",
            json!({"200": ok(json!({
                "type": "object",
                "properties": names.iter().map(|n| ((*n).to_owned(), json!({"$ref": "#/components/schemas/CategoryStats"}))).collect::<serde_json::Map<_, _>>(),
                "required": names,
                "additionalProperties": false
            }))}), None)},
        "/v1/admin/pause": {"post": admin("pause", "Emergency stop of one category, or of all.",
            json!({"200": ok(done()), "400": error(&format!("{bad_body}, unknown_category."))}),
            Some(body("CategoryBody")))},
        "/v1/admin/resume": {"post": admin("resume", "Lift the stop of one category, or of all.",
            json!({"200": ok(done()), "400": error(&format!("{bad_body}, unknown_category."))}),
            Some(body("CategoryBody")))},
        "/v1/admin/purge": {"post": admin("purge", "Delete every task of a category.",
            json!({"200": ok(done()), "400": error(&format!("{bad_body}, missing_category, unknown_category."))}),
            Some(body("PurgeBody")))},
        "/v1/admin/quarantine": {"post": admin("quarantine", "Take a task out of circulation.",
            json!({"200": ok(done()), "400": error(&format!("{bad_body}, bad_task_id.")),
                   "404": error("not_found: no such task."),
                   "409": error("wrong_state: the task cannot be quarantined now.")}),
            Some(body("TaskBody")))},
        "/v1/admin/release": {"post": admin("release", "Put a quarantined task back (attempts reset, due time kept).",
            json!({"200": ok(done()), "400": error(&format!("{bad_body}, bad_task_id.")),
                   "404": error("not_found: no such task."),
                   "409": error("wrong_state: the task is not quarantined.")}),
            Some(body("TaskBody")))},
        "/v1/admin/audit/verify": {"get": admin("audit_verify", "Verify the audit log's hash chain and anchor.",
            json!({"200": ok(json!({"$ref": "#/components/schemas/VerifyReport"})),
                   "409": {"description": "The log does not verify: the report says where.",
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VerifyReport"}}}}}),
            None)},
        "/v1/admin/fired": {"get": with_parameters(admin("fired", "The last task outcomes.",
            json!({"200": ok(json!({"type": "array", "items": {"$ref": "#/components/schemas/FiredRecord"}})),
                   "400": error("bad_query: not an unsigned integer, or an unknown parameter.")}),
            None), json!([{
                "name": "limit", "in": "query", "required": false,
                "description": "At most this many of the last outcomes (all kept ones without it).",
                "schema": {"type": "integer", "minimum": 0, "maximum": u64::try_from(usize::MAX).unwrap_or(u64::MAX)}
            }]))},
        "/v1/admin/backup": {"post": admin("backup", "Online backup of the store (and a copy of the audit log) into an absolute directory.",
            json!({"200": ok(json!({"$ref": "#/components/schemas/BackupReport"})),
                   "400": error(&format!("{bad_body}, bad_backup_dir (another node kind's backups, a bad manifest).")),
                   "409": error("backup_running: another backup is under way."),
                   "500": error("backup_failed or internal: the directory cannot be written, the store failed.")}),
            Some(body("BackupBody")))},
    });
    let mut nullable_names: Vec<Value> = names.iter().map(|n| json!(n)).collect();
    nullable_names.push(Value::Null);
    let u64_schema = json!({"type": "integer", "minimum": 0});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "whispr-timer admin API",
            "description": "The timer node's admin listener (docs/timer.md).",
            "version": env!("CARGO_PKG_VERSION")
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "admin.token"}},
            "schemas": {
                "ErrorBody": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string", "description": "A stable code."},
                        "message": {"type": "string", "description": "Text without user data."}
                    },
                    "additionalProperties": false
                },
                "Done": {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {"ok": {"type": "boolean", "const": true}, "count": u64_schema},
                    "additionalProperties": false
                },
                "CategoryBody": {
                    "type": "object",
                    "description": "One category, or all when absent or null.",
                    "properties": {"category": {"enum": nullable_names}},
                    "additionalProperties": false
                },
                "PurgeBody": {
                    "type": "object",
                    "required": ["category"],
                    "properties": {"category": {"type": "string", "enum": names}},
                    "additionalProperties": false
                },
                "TaskBody": {
                    "type": "object",
                    "required": ["task"],
                    "properties": {"task": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$", "minLength": 32, "maxLength": 32}},
                    "additionalProperties": false
                },
                "BackupBody": {
                    "type": "object",
                    "required": ["to"],
                    "properties": {"to": {"type": "string", "pattern": "^/", "minLength": 1, "description": "An absolute directory, created if missing."}},
                    "additionalProperties": false
                },
                "CategoryStats": {
                    "type": "object",
                    "required": ["scheduled", "due", "running", "quarantined", "paused"],
                    "properties": {
                        "scheduled": u64_schema, "due": u64_schema, "running": u64_schema,
                        "quarantined": u64_schema, "paused": {"type": "boolean"}
                    },
                    "additionalProperties": false
                },
                "FiredRecord": {
                    "type": "object",
                    "required": ["task", "category", "due_at_ms", "fired_at_ms", "outcome"],
                    "properties": {
                        "task": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                        "category": {"type": "string", "enum": names},
                        "due_at_ms": u64_schema, "fired_at_ms": u64_schema,
                        "outcome": {"type": "string", "enum": ["completed", "retry", "quarantined"]}
                    },
                    "additionalProperties": false
                },
                "VerifyReport": {
                    "type": "object",
                    "required": ["ok", "entries", "tip_seq", "tip_hash", "problem"],
                    "properties": {
                        "ok": {"type": "boolean"}, "entries": u64_schema, "tip_seq": u64_schema,
                        "tip_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        "problem": {"oneOf": [{"type": "null"}, {
                            "type": "object",
                            "required": ["line", "kind", "detail"],
                            "properties": {"line": u64_schema, "kind": {"type": "string"}, "detail": {"type": "string"}},
                            "additionalProperties": false
                        }]}
                    },
                    "additionalProperties": false
                },
                "BackupReport": {
                    "type": "object",
                    "required": ["backup_id", "size_bytes", "files", "kept", "duration_ms"],
                    "properties": {
                        "backup_id": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                        "size_bytes": u64_schema,
                        "files": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                        "kept": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": u32::MAX}},
                        "duration_ms": u64_schema
                    },
                    "additionalProperties": false
                }
            }
        }
    })
}
