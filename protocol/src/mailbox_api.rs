//! The byte strings a mailbox owner signs when talking to a mailbox node's HTTP API (creation,
//! device registration, login). Shared by the node (`whispr-mailbox`), which verifies them,
//! and clients (`whispr-client`), which sign them; specified in `docs/mailbox.md`.
//!
//! Also the API's request bodies and query strings ([`CreateMailboxRequest`] …
//! [`StreamCommand`]): the JSON / query-string types the node deserializes from untrusted
//! clients and the checks it makes at parse time (`validate`: hex fields of the documented
//! length, the replica count), so that the `mailbox_http` fuzz target
//! ([`crate::fuzzing::mailbox_http`]) runs exactly the node's parsing code without RocksDB.
//! With the `openapi` feature they carry the `utoipa` schemas of the node's OpenAPI document.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::prekeys::SignedPrekey;
use crate::{MailboxId, NodeId};

/// Domain prefix of the proof of possession signed at creation.
pub const CREATE_PREFIX: &[u8] = b"whispr-mailbox-create-v1";
/// Domain prefix of the proof of possession of a replicated mailbox (it names its replica set).
pub const CREATE_PREFIX_V2: &[u8] = b"whispr-mailbox-create-v2";
/// Most replicas a mailbox can name.
pub const REPLICAS_MAX: usize = 5;
/// Domain prefix of a device registration signed by the owner.
pub const DEVICE_PREFIX: &[u8] = b"whispr-mailbox-device-v1";

/// The bytes the owner signs to create a mailbox: proof that it holds `owner_key` and binds
/// every other field.
pub fn create_transcript(
    mailbox_id: &MailboxId,
    mailbox_key: &[u8; 32],
    owner_key: &[u8; 32],
    access_key_hash: &[u8; 32],
    reply_key: Option<&[u8; 32]>,
    retention_ms: u64,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(CREATE_PREFIX.len() + 32 * 5 + 9);
    t.extend_from_slice(CREATE_PREFIX);
    t.extend_from_slice(mailbox_id.as_bytes());
    t.extend_from_slice(mailbox_key);
    t.extend_from_slice(owner_key);
    t.extend_from_slice(access_key_hash);
    match reply_key {
        // The reply key is secret: sign its hash.
        Some(k) => {
            t.push(1);
            t.extend_from_slice(&Sha256::digest(k));
        }
        None => t.push(0),
    }
    t.extend_from_slice(&retention_ms.to_be_bytes());
    t
}

/// The bytes the owner signs to create a replicated mailbox (`docs/replication.md`): the v1
/// fields under [`CREATE_PREFIX_V2`], then the replica set, `n (u8) ‖ n × node id`. Every
/// replica verifies that it is named; a peer repairing a replica hands it this signed request.
/// `None` when `replicas` is empty or longer than [`REPLICAS_MAX`].
pub fn create_transcript_v2(
    mailbox_id: &MailboxId,
    mailbox_key: &[u8; 32],
    owner_key: &[u8; 32],
    access_key_hash: &[u8; 32],
    reply_key: Option<&[u8; 32]>,
    retention_ms: u64,
    replicas: &[NodeId],
) -> Option<Vec<u8>> {
    if replicas.is_empty() || replicas.len() > REPLICAS_MAX {
        return None;
    }
    let v1 = create_transcript(
        mailbox_id,
        mailbox_key,
        owner_key,
        access_key_hash,
        reply_key,
        retention_ms,
    );
    let mut t = Vec::with_capacity(v1.len() + 1 + 32 * replicas.len());
    t.extend_from_slice(CREATE_PREFIX_V2);
    t.extend_from_slice(v1.get(CREATE_PREFIX.len()..).unwrap_or_default());
    t.push(replicas.len() as u8);
    for r in replicas {
        t.extend_from_slice(&r.0);
    }
    Some(t)
}

/// The bytes the owner signs to register `device_key` on `mailbox_id`.
pub fn device_transcript(mailbox_id: &MailboxId, device_key: &[u8; 32]) -> Vec<u8> {
    let mut t = Vec::with_capacity(DEVICE_PREFIX.len() + 64);
    t.extend_from_slice(DEVICE_PREFIX);
    t.extend_from_slice(mailbox_id.as_bytes());
    t.extend_from_slice(device_key);
    t
}

/// Domain prefix of the login signature.
pub const LOGIN_PREFIX: &[u8] = b"whispr-mailbox-login-v1";

/// Prefix of a mailbox node's default login audience.
pub const AUDIENCE_PREFIX: &str = "whispr-mailbox/";

/// The login audience of the mailbox node `node` (its mesh identity key, as the directory and
/// the invitation name it): `"whispr-mailbox/" ‖ hex(node id)`. Every node has its own, so a
/// login signature asked for by one node is refused by every other; clients sign a login only
/// for the audience of the node they meant ([`login_transcript`]).
pub fn node_audience(node: &NodeId) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(AUDIENCE_PREFIX.len() + 64);
    s.push_str(AUDIENCE_PREFIX);
    for b in node.0 {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The bytes a device signs to log in:
/// `"whispr-mailbox-login-v1" ‖ len(audience) (u16 BE) ‖ audience ‖ mailbox_id ‖ device_key ‖
/// challenge`.
pub fn login_transcript(
    audience: &str,
    mailbox: &MailboxId,
    device: &[u8; 32],
    challenge: &[u8; 32],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(LOGIN_PREFIX.len() + 2 + audience.len() + 96);
    t.extend_from_slice(LOGIN_PREFIX);
    let len = u16::try_from(audience.len()).unwrap_or(u16::MAX);
    t.extend_from_slice(&len.to_be_bytes());
    t.extend_from_slice(
        audience
            .as_bytes()
            .get(..usize::from(len))
            .unwrap_or_default(),
    );
    t.extend_from_slice(mailbox.as_bytes());
    t.extend_from_slice(device);
    t.extend_from_slice(challenge);
    t
}

// ---------------------------------------------------------------------------------------
// HTTP request bodies and query strings

/// A request field that does not have its documented format; the node answers 400
/// `bad_request` with this text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// A hex field with a non-hex character or of the wrong length.
    Hex {
        /// The field, as named in the message (`"mailbox id"`, `"prekeys[].key"`, …).
        field: &'static str,
        /// The number of hex characters it must have.
        hex_chars: usize,
    },
    /// `replicas` is empty or names more than [`REPLICAS_MAX`] nodes.
    ReplicaCount,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Hex { field, hex_chars } => {
                write!(f, "{field}: expected {hex_chars} hex characters")
            }
            BodyError::ReplicaCount => write!(f, "replicas: 1 to {REPLICAS_MAX} node ids"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Decodes exactly `N` bytes from `2 × N` hex digits (either case); `None` for anything else.
pub fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() != N.checked_mul(2)? {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let [hi, lo] = pair else {
            return None;
        };
        *o = (nibble(*hi)? << 4) | nibble(*lo)?;
    }
    Some(out)
}

/// 32 bytes from 64 hex digits, or [`BodyError::Hex`] naming `field`.
pub fn hex32(field: &'static str, text: &str) -> Result<[u8; 32], BodyError> {
    hex_array(text).ok_or(BodyError::Hex {
        field,
        hex_chars: 64,
    })
}

/// 64 bytes from 128 hex digits, or [`BodyError::Hex`] naming `field`.
pub fn hex64(field: &'static str, text: &str) -> Result<[u8; 64], BodyError> {
    hex_array(text).ok_or(BodyError::Hex {
        field,
        hex_chars: 128,
    })
}

/// A mailbox id (a path parameter, a body field) from 64 hex digits.
pub fn parse_mailbox_id(text: &str) -> Result<MailboxId, BodyError> {
    hex32("mailbox id", text).map(MailboxId)
}

/// A JSON integer as JSON Schema defines one (the document's `integer`): `5` and `5.0` alike;
/// a fraction, a negative number or one above `T`'s range is refused (400). For
/// `#[serde(deserialize_with = "json_uint")]`.
pub fn json_uint<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let number = serde_json::Number::deserialize(deserializer)?;
    let value = match (number.as_u64(), number.as_f64()) {
        (Some(v), _) => v,
        // Below 2^64 (exact as f64), integral and not negative: the cast is exact.
        (None, Some(f)) if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => {
            f as u64
        }
        _ => return Err(D::Error::custom("expected a non-negative integer")),
    };
    T::try_from(value).map_err(|_| D::Error::custom("integer out of range"))
}

/// `POST /v1/mailboxes`.
#[derive(Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateMailboxRequest {
    /// Mailbox id, 32 bytes hex (random, chosen by the owner).
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub mailbox_id: String,
    /// HPKE X25519 public key senders seal to, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub mailbox_key: String,
    /// Owner Ed25519 key, 32 bytes hex; also the first device. Not a curve point: 422.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub owner_key: String,
    /// SHA-256 of the access key given to contacts, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub access_key_hash: String,
    /// Reply key minting the SURB ids of replies into this mailbox, 32 bytes hex (secret).
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub reply_key: Option<String>,
    /// Retention in milliseconds, 1 to the node's `limits.retention_ms_max` (above it: 422).
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 0, maximum = 18446744073709551615_u64)
    )]
    #[serde(deserialize_with = "json_uint")]
    pub retention_ms: u64,
    /// Owner Ed25519 signature over the creation transcript (see docs/mailbox.md), 64 bytes
    /// hex. Wrong: 401 `bad_signature`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{128}$", min_length = 128, max_length = 128)
    )]
    pub signature: String,
    /// The mailbox's replica set (1 to 5 node ids, hex), which must name this node: the
    /// signature is then over the v2 transcript (`docs/replication.md`). Absent: the v1
    /// transcript, a mailbox on this node only, never replicated.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(min_items = 1, max_items = 5, value_type = Option<Vec<HexNodeId>>)
    )]
    pub replicas: Option<Vec<String>>,
}

impl fmt::Debug for CreateMailboxRequest {
    // The reply key is secret; the access key hash would let whoever reads it test guesses
    // of the access key offline; mailbox ids are never printed in clear (`MailboxId`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateMailboxRequest")
            .field("mailbox_id", &"[redacted]")
            .field("mailbox_key", &self.mailbox_key)
            .field("owner_key", &self.owner_key)
            .field("access_key_hash", &"[redacted]")
            .field("reply_key", &self.reply_key.as_ref().map(|_| "[redacted]"))
            .field("retention_ms", &self.retention_ms)
            .field("signature", &self.signature)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// A [`CreateMailboxRequest`] whose fields have their documented format.
#[derive(Clone, PartialEq, Eq)]
pub struct CreateMailboxFields {
    /// The mailbox id.
    pub mailbox_id: MailboxId,
    /// The HPKE public key senders seal to.
    pub mailbox_key: [u8; 32],
    /// The owner's Ed25519 key (not checked to be a curve point here).
    pub owner_key: [u8; 32],
    /// SHA-256 of the access key.
    pub access_key_hash: [u8; 32],
    /// The reply key (secret).
    pub reply_key: Option<[u8; 32]>,
    /// Retention, ms.
    pub retention_ms: u64,
    /// The owner's signature over the v1 or v2 creation transcript.
    pub signature: [u8; 64],
    /// The replica set (1 to [`REPLICAS_MAX`] node ids), if any.
    pub replicas: Option<Vec<NodeId>>,
}

impl fmt::Debug for CreateMailboxFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateMailboxFields")
            .field("replicas", &self.replicas.as_ref().map(Vec::len))
            .field("retention_ms", &self.retention_ms)
            .finish_non_exhaustive()
    }
}

impl CreateMailboxRequest {
    /// Decodes the hex fields (in the order of the struct) and checks the replica count.
    pub fn validate(&self) -> Result<CreateMailboxFields, BodyError> {
        let mailbox_id = parse_mailbox_id(&self.mailbox_id)?;
        let mailbox_key = hex32("mailbox_key", &self.mailbox_key)?;
        let owner_key = hex32("owner_key", &self.owner_key)?;
        let access_key_hash = hex32("access_key_hash", &self.access_key_hash)?;
        let reply_key = self
            .reply_key
            .as_deref()
            .map(|k| hex32("reply_key", k))
            .transpose()?;
        let signature = hex64("signature", &self.signature)?;
        let replicas = match &self.replicas {
            None => None,
            Some(list) if list.is_empty() || list.len() > REPLICAS_MAX => {
                return Err(BodyError::ReplicaCount);
            }
            Some(list) => Some(
                list.iter()
                    .map(|r| hex32("replicas", r).map(NodeId))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(CreateMailboxFields {
            mailbox_id,
            mailbox_key,
            owner_key,
            access_key_hash,
            reply_key,
            retention_ms: self.retention_ms,
            signature,
            replicas,
        })
    }
}

/// A node id, 32 bytes hex.
/// (Schema only: the field is a `String`.)
pub struct HexNodeId;

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for HexNodeId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("A node id, 32 bytes hex."))
            .pattern(Some("^[0-9a-fA-F]{64}$"))
            .min_length(Some(64))
            .max_length(Some(64))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for HexNodeId {}

/// `POST /v1/auth/challenge`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// Mailbox id, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub mailbox_id: String,
    /// The device key that will sign, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub device_key: String,
}

impl ChallengeRequest {
    /// The mailbox id and the device key.
    pub fn validate(&self) -> Result<(MailboxId, [u8; 32]), BodyError> {
        Ok((
            parse_mailbox_id(&self.mailbox_id)?,
            hex32("device_key", &self.device_key)?,
        ))
    }
}

/// `POST /v1/auth/login`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Mailbox id, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub mailbox_id: String,
    /// Device key, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub device_key: String,
    /// The challenge, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub challenge: String,
    /// Ed25519 signature over the login transcript, 64 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{128}$", min_length = 128, max_length = 128)
    )]
    pub signature: String,
}

/// A [`LoginRequest`] whose fields have their documented format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginFields {
    /// The mailbox id.
    pub mailbox_id: MailboxId,
    /// The device key.
    pub device_key: [u8; 32],
    /// The challenge.
    pub challenge: [u8; 32],
    /// The device's signature over [`login_transcript`].
    pub signature: [u8; 64],
}

impl LoginRequest {
    /// Decodes the hex fields, in the order of the struct.
    pub fn validate(&self) -> Result<LoginFields, BodyError> {
        Ok(LoginFields {
            mailbox_id: parse_mailbox_id(&self.mailbox_id)?,
            device_key: hex32("device_key", &self.device_key)?,
            challenge: hex32("challenge", &self.challenge)?,
            signature: hex64("signature", &self.signature)?,
        })
    }
}

/// `GET /v1/mailboxes/{id}/messages` query.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct PollQuery {
    /// Return messages with a sequence number above this (default: the device's cursor).
    /// Beyond the mailbox's last sequence number: 422 `bad_cursor`.
    #[cfg_attr(
        feature = "openapi",
        param(
            required = false,
            nullable = false,
            minimum = 0,
            maximum = 18446744073709551615_u64
        )
    )]
    pub after: Option<u64>,
    /// Most messages returned (0 counts as 1; capped by the node's `api.poll_limit_max`).
    #[cfg_attr(
        feature = "openapi",
        param(required = false, nullable = false, format = Int64, minimum = 0, maximum = 4294967295_u64)
    )]
    pub limit: Option<u32>,
    /// Long poll: wait up to this many milliseconds for a message when there is none (capped
    /// by the node's `api.wait_ms_max`).
    #[cfg_attr(
        feature = "openapi",
        param(
            required = false,
            nullable = false,
            minimum = 0,
            maximum = 18446744073709551615_u64
        )
    )]
    pub wait: Option<u64>,
}

/// `POST /v1/mailboxes/{id}/ack`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// Acknowledge every message up to this sequence number (inclusive) for this device.
    /// Beyond the mailbox's last sequence number: 422 `bad_cursor`.
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 0, maximum = 18446744073709551615_u64)
    )]
    #[serde(deserialize_with = "json_uint")]
    pub up_to: u64,
}

/// `POST /v1/mailboxes/{id}/devices`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeviceRequest {
    /// The new device's Ed25519 key, 32 bytes hex. Not a curve point: 422.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub device_key: String,
    /// The owner's signature over the device transcript, 64 bytes hex. Wrong: 401
    /// `bad_signature`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{128}$", min_length = 128, max_length = 128)
    )]
    pub signature: String,
}

impl DeviceRequest {
    /// The device key and the owner's signature over [`device_transcript`].
    pub fn validate(&self) -> Result<([u8; 32], [u8; 64]), BodyError> {
        Ok((
            hex32("device_key", &self.device_key)?,
            hex64("signature", &self.signature)?,
        ))
    }
}

/// One prekey in an upload.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PrekeyJson {
    /// Owner-chosen id.
    #[cfg_attr(
        feature = "openapi",
        schema(format = Int64, minimum = 0, maximum = 4294967295_u64)
    )]
    #[serde(deserialize_with = "json_uint")]
    pub key_id: u32,
    /// Curve25519 public key, 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub key: String,
    /// True for the fallback key.
    #[serde(default)]
    pub fallback: bool,
    /// Owner signature, 64 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{128}$", min_length = 128, max_length = 128)
    )]
    pub signature: String,
}

/// `PUT /v1/mailboxes/{id}/prekeys`: public keys only, each signed by the owner.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PrekeysRequest {
    /// Olm identity key (Curve25519), 32 bytes hex.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub identity_key: String,
    /// Owner signature over it, 64 bytes hex. Wrong: 401 `bad_signature`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9a-fA-F]{128}$", min_length = 128, max_length = 128)
    )]
    pub identity_signature: String,
    /// One-time keys and at most one fallback key (more than the node's
    /// `limits.prekeys_max`, or two fallback keys: 422).
    pub prekeys: Vec<PrekeyJson>,
}

/// A [`PrekeysRequest`] whose fields have their documented format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeysFields {
    /// The Olm identity key.
    pub identity_key: [u8; 32],
    /// The owner's signature over it.
    pub identity_signature: [u8; 64],
    /// The prekeys, in the request's order.
    pub prekeys: Vec<SignedPrekey>,
}

impl PrekeysRequest {
    /// Decodes every prekey (key, then signature), then the identity key and its signature.
    pub fn validate(&self) -> Result<PrekeysFields, BodyError> {
        let mut prekeys = Vec::with_capacity(self.prekeys.len());
        for p in &self.prekeys {
            prekeys.push(SignedPrekey {
                key_id: p.key_id,
                key: hex32("prekeys[].key", &p.key)?,
                fallback: p.fallback,
                signature: hex64("prekeys[].signature", &p.signature)?,
            });
        }
        Ok(PrekeysFields {
            identity_key: hex32("identity_key", &self.identity_key)?,
            identity_signature: hex64("identity_signature", &self.identity_signature)?,
            prekeys,
        })
    }
}

/// `GET /v1/mailboxes/{id}/stream` query.
#[derive(Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct StreamQuery {
    /// One-time ticket from `POST /v1/mailboxes/{id}/stream-ticket`, 32 bytes hex. Wrong,
    /// used or expired: 401.
    #[cfg_attr(
        feature = "openapi",
        param(pattern = "^[0-9a-fA-F]{64}$", min_length = 64, max_length = 64)
    )]
    pub ticket: String,
    /// Start after this sequence number (default: the device's cursor). Beyond the mailbox's
    /// last sequence number: 422 `bad_cursor`.
    #[cfg_attr(
        feature = "openapi",
        param(
            required = false,
            nullable = false,
            minimum = 0,
            maximum = 18446744073709551615_u64
        )
    )]
    pub after: Option<u64>,
}

impl fmt::Debug for StreamQuery {
    // The ticket is a bearer secret until redeemed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamQuery")
            .field("ticket", &"[redacted]")
            .field("after", &self.after)
            .finish()
    }
}

impl StreamQuery {
    /// The ticket's 32 bytes (the node answers a malformed ticket 401, like a wrong one).
    pub fn ticket(&self) -> Result<[u8; 32], BodyError> {
        hex32("ticket", &self.ticket)
    }
}

/// What a client sends on a stream.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamCommand {
    /// Acknowledge up to `up_to`.
    Ack {
        /// Sequence number.
        up_to: u64,
    },
}

/// A session token (`Authorization: Bearer <hex>`) or a stream ticket: 32 bytes from 64 hex
/// digits, surrounding whitespace ignored.
pub fn parse_token(text: &str) -> Option<[u8; 32]> {
    hex_array(text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_has_its_own_audience() {
        let a = node_audience(&NodeId([0xab; 32]));
        assert_eq!(a, format!("whispr-mailbox/{}", "ab".repeat(32)));
        assert_ne!(a, node_audience(&NodeId([0xac; 32])));
        assert_ne!(
            login_transcript(&a, &MailboxId([1; 32]), &[2; 32], &[3; 32]),
            login_transcript(
                &node_audience(&NodeId([0xac; 32])),
                &MailboxId([1; 32]),
                &[2; 32],
                &[3; 32]
            )
        );
    }

    #[test]
    fn hex_fields_need_exactly_their_length_in_either_case() {
        assert_eq!(hex_array::<2>("0aFf"), Some([0x0a, 0xff]));
        for bad in ["0af", "0aff0", "0g00", "", " 0aff", "0a\u{e9}"] {
            assert_eq!(hex_array::<2>(bad), None, "{bad:?}");
        }
        assert_eq!(
            hex32("mailbox_key", "00").unwrap_err().to_string(),
            "mailbox_key: expected 64 hex characters"
        );
        assert_eq!(
            hex64("signature", &"0".repeat(64)).unwrap_err().to_string(),
            "signature: expected 128 hex characters"
        );
        assert_eq!(
            parse_token(&format!(" {} ", "ab".repeat(32))),
            Some([0xab; 32])
        );
    }

    fn create_body(replicas: &str) -> String {
        let h = "11".repeat(32);
        format!(
            r#"{{"mailbox_id":"{h}","mailbox_key":"{h}","owner_key":"{h}","access_key_hash":"{h}",
            "retention_ms":1000.0,"signature":"{}"{replicas}}}"#,
            "22".repeat(64)
        )
    }

    #[test]
    fn a_create_request_is_checked_like_the_node_always_did() {
        let parse = |body: &str| {
            serde_json::from_str::<CreateMailboxRequest>(body)
                .map_err(|e| e.to_string())
                .and_then(|r| r.validate().map_err(|e| e.to_string()))
        };
        let fields = parse(&create_body("")).unwrap();
        assert_eq!(fields.retention_ms, 1000);
        assert_eq!(fields.replicas, None);
        let two = format!(
            r#","replicas":["{}","{}"]"#,
            "aa".repeat(32),
            "BB".repeat(32)
        );
        assert_eq!(
            parse(&create_body(&two)).unwrap().replicas,
            Some(vec![NodeId([0xaa; 32]), NodeId([0xbb; 32])])
        );
        assert_eq!(
            parse(&create_body(r#","replicas":[]"#)).unwrap_err(),
            "replicas: 1 to 5 node ids"
        );
        assert_eq!(
            parse(&create_body(r#","replicas":["00"]"#)).unwrap_err(),
            "replicas: expected 64 hex characters"
        );
        // A fraction is not an integer, an unknown field is refused.
        assert!(parse(&create_body("").replace("1000.0", "1000.5")).is_err());
        assert!(parse(&create_body(r#","extra":1"#)).is_err());
        // The reply key is secret: not in Debug.
        let with_key = create_body(&format!(r#","reply_key":"{}""#, "77".repeat(32)));
        let request: CreateMailboxRequest = serde_json::from_str(&with_key).unwrap();
        assert!(!format!("{request:?}").contains("7777"));
    }

    #[test]
    fn prekeys_are_checked_before_the_identity_key() {
        let body = format!(
            r#"{{"identity_key":"00","identity_signature":"00","prekeys":[{{"key_id":1,"key":"{}","signature":"0"}}]}}"#,
            "33".repeat(32)
        );
        let request: PrekeysRequest = serde_json::from_str(&body).unwrap();
        assert_eq!(
            request.validate().unwrap_err().to_string(),
            "prekeys[].signature: expected 128 hex characters"
        );
    }

    #[test]
    fn queries_parse_like_axum_parses_them() {
        let q: PollQuery = serde_urlencoded::from_str("after=3&limit=7").unwrap();
        assert_eq!((q.after, q.limit, q.wait), (Some(3), Some(7), None));
        assert!(serde_urlencoded::from_str::<PollQuery>("limit=4294967296").is_err());
        assert!(serde_urlencoded::from_str::<PollQuery>("other=1").is_err());
        let q: StreamQuery =
            serde_urlencoded::from_str(&format!("ticket={}", "Ab".repeat(32))).unwrap();
        assert_eq!(q.ticket().unwrap(), [0xab; 32]);
        assert!(!format!("{q:?}").contains("Ab"));
    }

    #[test]
    fn the_v2_create_transcript_binds_the_replica_set() {
        let id = MailboxId([1; 32]);
        let t = |replicas: &[NodeId]| {
            create_transcript_v2(
                &id,
                &[2; 32],
                &[3; 32],
                &[4; 32],
                Some(&[5; 32]),
                60_000,
                replicas,
            )
        };
        let one = t(&[NodeId([7; 32])]).expect("one replica");
        let two = t(&[NodeId([7; 32]), NodeId([8; 32])]).expect("two replicas");
        let swapped = t(&[NodeId([8; 32]), NodeId([7; 32])]).expect("two replicas");
        assert_ne!(one, two);
        assert_ne!(two, swapped);
        assert!(one.starts_with(CREATE_PREFIX_V2));
        let v1 = create_transcript(&id, &[2; 32], &[3; 32], &[4; 32], Some(&[5; 32]), 60_000);
        assert_eq!(
            one[CREATE_PREFIX_V2.len()..one.len() - 33],
            v1[CREATE_PREFIX.len()..]
        );
        assert_eq!(t(&[]), None);
        assert_eq!(t(&[NodeId([7; 32]); REPLICAS_MAX + 1]), None);
        assert!(t(&[NodeId([7; 32]); REPLICAS_MAX]).is_some());
    }
}
