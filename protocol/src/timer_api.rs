//! The request bodies and query strings of a timer node's admin HTTP API (`docs/timer.md`):
//! the JSON types the node deserializes, the rule that every body is a JSON object
//! ([`object_body`]), and the task id format ([`parse_task_id`]). They live here, not in
//! `whispr-timer-service` (which builds RocksDB), so that the `timer_http` fuzz target
//! ([`crate::fuzzing::timer_http`]) runs exactly the node's parsing code.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Body of pause / resume / purge: `{"category": "expiry"}`, or `{}` / `{"category": null}`
/// for all (purge needs one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryBody {
    /// The category's name (`deferred_send`, `expiry`, `maintenance`), checked by the node.
    #[serde(default)]
    pub category: Option<String>,
}

/// Body of quarantine / release: `{"task": "<32 hex digits>"}` ([`parse_task_id`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskBody {
    /// The task id, 32 hex digits.
    pub task: String,
}

/// Body of backup: `{"to": "/absolute/backup/dir"}` (the node checks the path).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupBody {
    /// Where to write the backup.
    pub to: PathBuf,
}

/// Query of `GET /v1/admin/fired`: `?limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiredQuery {
    /// Most records returned (the latest ones); all when absent.
    pub limit: Option<usize>,
}

/// Why an admin body was refused (the node answers 400 `malformed_json` with this text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectBodyError {
    /// Valid JSON that is not an object (`[]`, `1`, `"x"`, `null`).
    NotObject,
    /// An object that is not the body's type (unknown or missing field, wrong type): serde's
    /// message.
    Invalid(String),
}

impl fmt::Display for ObjectBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectBodyError::NotObject => f.write_str("the body must be a JSON object"),
            ObjectBodyError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ObjectBodyError {}

/// An admin body from its parsed JSON, which must be an object. serde's derived structs also
/// accept an array of their fields in order (`[]` for a struct whose fields all have
/// defaults: `POST pause` with `[]` paused every category), which the API does not offer.
pub fn object_body<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ObjectBodyError> {
    if !value.is_object() {
        return Err(ObjectBodyError::NotObject);
    }
    serde_json::from_value(value).map_err(|e| ObjectBodyError::Invalid(e.to_string()))
}

/// A task id: 16 bytes from 32 hex digits (either case); `None` for anything else.
pub fn parse_task_id(text: &str) -> Option<[u8; 16]> {
    crate::mailbox_api::hex_array(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_body_must_be_an_object() {
        let parse = |text: &str| object_body::<CategoryBody>(serde_json::from_str(text).unwrap());
        // `[]` deserializes into a struct whose fields all have defaults; refused.
        assert_eq!(parse("[]").unwrap_err(), ObjectBodyError::NotObject);
        assert_eq!(
            parse("null").unwrap_err().to_string(),
            "the body must be a JSON object"
        );
        assert_eq!(parse("{}").unwrap().category, None);
        assert_eq!(
            parse(r#"{"category":"expiry"}"#)
                .unwrap()
                .category
                .as_deref(),
            Some("expiry")
        );
        assert!(matches!(
            parse(r#"{"category":"expiry","x":1}"#),
            Err(ObjectBodyError::Invalid(_))
        ));
        let task: TaskBody = object_body(serde_json::json!({"task": "0F".repeat(16)})).unwrap();
        assert_eq!(parse_task_id(&task.task), Some([0x0f; 16]));
        assert_eq!(parse_task_id("0f"), None);
    }
}
