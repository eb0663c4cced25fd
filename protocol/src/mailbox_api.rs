//! The byte strings a mailbox owner signs when talking to a mailbox node's HTTP API (creation,
//! device registration, login). Shared by the node (`whispr-mailbox`), which verifies them,
//! and clients (`whispr-client`), which sign them; specified in `docs/mailbox.md`.

use sha2::{Digest, Sha256};

use crate::MailboxId;

/// Domain prefix of the proof of possession signed at creation.
pub const CREATE_PREFIX: &[u8] = b"whispr-mailbox-create-v1";
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
