//! The byte strings a mailbox owner signs when talking to a mailbox node's HTTP API (creation,
//! device registration, login). Shared by the node (`whispr-mailbox`), which verifies them,
//! and clients (`whispr-client`), which sign them; specified in `docs/mailbox.md`.

use sha2::{Digest, Sha256};

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
