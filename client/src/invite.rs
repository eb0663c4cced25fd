//! Invitations: everything a contact needs to reach a new mailbox and start an Olm session,
//! as one line of text that is also QR-friendly (`WHISPR1:` then RFC 4648 base32, upper case:
//! only characters of a QR code's alphanumeric mode).
//!
//! Layout (bytes): version `3` ‖ flags (bit 0: a one-time key follows) ‖ mailbox id (32) ‖
//! mailbox HPKE key (32) ‖ access key (32) ‖ mailbox owner key (Ed25519, 32) ‖ identity key
//! (Ed25519, 32) ‖ Olm identity key (Curve25519, 32) ‖ n (1 byte, 1 to 5) ‖ n × mailbox node
//! id (32), the replica set in its pinned order ‖ [one-time key (32)] ‖ first 4 bytes of
//! SHA-256 of everything before (catches copy errors).
//!
//! The replica set is pinned: the acceptor deposits there and nowhere else, whatever later
//! directories say (a node that wins rendezvous placement afterwards gets nothing); attempt k
//! of a deposit goes to replica k mod n (`docs/replication.md`). Version `2` (one node id
//! where v3 has n and the set: a set of one) and version `1` (no node) are still read; the
//! acceptor of a version 1 invitation pins the node placement gives at acceptance.

use sha2::{Digest, Sha256};

use whispr_protocol::mailbox_api::REPLICAS_MAX;

use crate::error::{ClientError, Result};

const PREFIX: &str = "WHISPR1:";
const VERSION: u8 = 3;
/// Invitations that pin a single mailbox node (before replication).
const VERSION_ONE_NODE: u8 = 2;
/// Invitations made before the mailbox node was pinned.
const VERSION_UNPINNED: u8 = 1;
const FLAG_ONE_TIME_KEY: u8 = 1;

/// A decoded invitation.
#[derive(Clone, PartialEq, Eq)]
pub struct Invitation {
    /// The inviter's new mailbox.
    pub mailbox_id: [u8; 32],
    /// Its HPKE public key.
    pub mailbox_key: [u8; 32],
    /// Its access key.
    pub access: [u8; 32],
    /// Its owner key (verifies prekey bundles fetched through the mesh).
    pub owner_key: [u8; 32],
    /// The inviter's Ed25519 identity key.
    pub identity: [u8; 32],
    /// The inviter's Curve25519 Olm identity key.
    pub curve: [u8; 32],
    /// A one-time key; without it the acceptor fetches one through the mesh.
    pub one_time_key: Option<[u8; 32]>,
    /// The replica set of the mailbox, in pinned order (one node in version 2 invitations,
    /// none in version 1; at most `REPLICAS_MAX`).
    pub replicas: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Invitation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invitation")
            .field("one_time_key", &self.one_time_key.is_some())
            .finish_non_exhaustive()
    }
}

impl Invitation {
    /// The invitation as text.
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(3 + (8 + self.replicas.len()) * 32 + 4);
        b.push(if self.replicas.is_empty() {
            VERSION_UNPINNED
        } else {
            VERSION
        });
        b.push(if self.one_time_key.is_some() {
            FLAG_ONE_TIME_KEY
        } else {
            0
        });
        for k in [
            &self.mailbox_id,
            &self.mailbox_key,
            &self.access,
            &self.owner_key,
            &self.identity,
            &self.curve,
        ] {
            b.extend_from_slice(k);
        }
        if !self.replicas.is_empty() {
            b.push(u8::try_from(self.replicas.len()).unwrap_or(u8::MAX));
            for n in &self.replicas {
                b.extend_from_slice(n);
            }
        }
        if let Some(k) = &self.one_time_key {
            b.extend_from_slice(k);
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(sum.get(..4).unwrap_or_default());
        format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&b))
    }

    /// Parses an invitation; whitespace (line breaks from copying) is ignored.
    pub fn decode(text: &str) -> Result<Invitation> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let body = compact
            .to_ascii_uppercase()
            .strip_prefix(PREFIX)
            .map(str::to_string)
            .ok_or(ClientError::InvalidInvitation(
                "it does not start with WHISPR1:",
            ))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| ClientError::InvalidInvitation("not base32"))?;
        let (content, sum) = bytes
            .split_last_chunk::<4>()
            .ok_or(ClientError::InvalidInvitation("too short"))?;
        if Sha256::digest(content).get(..4) != Some(sum.as_slice()) {
            return Err(ClientError::InvalidInvitation(
                "checksum mismatch (copied incompletely?)",
            ));
        }
        let (&version, rest) = content
            .split_first()
            .ok_or(ClientError::InvalidInvitation("too short"))?;
        let (&flags, rest) = rest
            .split_first()
            .ok_or(ClientError::InvalidInvitation("too short"))?;
        let otk = if flags == FLAG_ONE_TIME_KEY {
            1
        } else if flags == 0 {
            0
        } else {
            return Err(ClientError::InvalidInvitation("unknown flags"));
        };
        let key_at = |bytes: &[u8], i: usize| -> [u8; 32] {
            let mut k = [0u8; 32];
            if let Some(s) = bytes.get(i * 32..(i + 1) * 32) {
                k.copy_from_slice(s);
            }
            k
        };
        let (head, tail) = rest.split_at(rest.len().min(6 * 32));
        // What follows the six keys: the pinned node(s), then the one-time key.
        let (pinned, tail): (usize, &[u8]) = match version {
            VERSION => {
                let (&n, tail) = tail
                    .split_first()
                    .ok_or(ClientError::InvalidInvitation("too short"))?;
                let n = usize::from(n);
                if n == 0 || n > REPLICAS_MAX {
                    return Err(ClientError::InvalidInvitation("bad replica count"));
                }
                (n, tail)
            }
            VERSION_ONE_NODE => (1, tail),
            VERSION_UNPINNED => (0, tail),
            _ => return Err(ClientError::InvalidInvitation("unknown version")),
        };
        if head.len() != 6 * 32 || tail.len() != (pinned + otk) * 32 {
            return Err(ClientError::InvalidInvitation("wrong length"));
        }
        Ok(Invitation {
            mailbox_id: key_at(head, 0),
            mailbox_key: key_at(head, 1),
            access: key_at(head, 2),
            owner_key: key_at(head, 3),
            identity: key_at(head, 4),
            curve: key_at(head, 5),
            replicas: (0..pinned).map(|i| key_at(tail, i)).collect(),
            one_time_key: (otk == 1).then(|| key_at(tail, pinned)),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample(otk: bool) -> Invitation {
        Invitation {
            mailbox_id: [1; 32],
            mailbox_key: [2; 32],
            access: [3; 32],
            owner_key: [4; 32],
            identity: [5; 32],
            curve: [6; 32],
            one_time_key: otk.then_some([7; 32]),
            replicas: vec![[8; 32], [9; 32], [10; 32]],
        }
    }

    #[test]
    fn an_unpinned_version_1_invitation_still_reads() {
        for otk in [true, false] {
            let old = Invitation {
                replicas: Vec::new(),
                ..sample(otk)
            };
            let text = old.encode();
            assert_eq!(Invitation::decode(&text).unwrap(), old);
        }
    }

    /// A version 2 invitation (one pinned node, as written before replication) reads as a
    /// replica set of that one node.
    #[test]
    fn a_version_2_invitation_still_reads_as_a_set_of_one() {
        for otk in [true, false] {
            let inv = Invitation {
                replicas: vec![[8; 32]],
                ..sample(otk)
            };
            // The v2 layout: no count byte, the node id right after the six keys.
            let mut b = vec![VERSION_ONE_NODE, u8::from(otk)];
            for k in [
                [1u8; 32], [2; 32], [3; 32], [4; 32], [5; 32], [6; 32], [8; 32],
            ] {
                b.extend_from_slice(&k);
            }
            if otk {
                b.extend_from_slice(&[7; 32]);
            }
            let sum = Sha256::digest(&b);
            b.extend_from_slice(&sum[..4]);
            let text = format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&b));
            assert_eq!(Invitation::decode(&text).unwrap(), inv);
        }
    }

    #[test]
    fn replica_counts_out_of_range_are_refused() {
        for n in [0usize, REPLICAS_MAX + 1] {
            let mut b = vec![VERSION, 0];
            for _ in 0..6 {
                b.extend_from_slice(&[1; 32]);
            }
            b.push(n as u8);
            for _ in 0..n {
                b.extend_from_slice(&[2; 32]);
            }
            let sum = Sha256::digest(&b);
            b.extend_from_slice(&sum[..4]);
            let text = format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&b));
            assert!(matches!(
                Invitation::decode(&text),
                Err(ClientError::InvalidInvitation(_))
            ));
        }
        let five = Invitation {
            replicas: vec![[3; 32]; REPLICAS_MAX],
            ..sample(true)
        };
        assert_eq!(Invitation::decode(&five.encode()).unwrap(), five);
    }

    #[test]
    fn round_trips_and_is_qr_alphanumeric() {
        for otk in [true, false] {
            let text = sample(otk).encode();
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ':')
            );
            assert_eq!(Invitation::decode(&text).unwrap(), sample(otk));
            // Line breaks and lower case from copying are tolerated.
            let wrapped = format!("{}\n  {}", &text[..20], text[20..].to_lowercase());
            assert_eq!(Invitation::decode(&wrapped).unwrap(), sample(otk));
        }
    }

    proptest::proptest! {
        /// Any text, and any bytes behind the prefix, decode to an invitation or a typed
        /// error; never a panic.
        #[test]
        fn arbitrary_input_never_panics(text in ".{0,600}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Invitation::decode(&text);
            let _ = Invitation::decode(&format!("WHISPR1:{}", data_encoding::BASE32_NOPAD.encode(&bytes)));
            // With a valid checksum, only the layout checks stand between bytes and a value.
            let mut with_sum = bytes.clone();
            let sum = Sha256::digest(&bytes);
            with_sum.extend_from_slice(&sum[..4]);
            let _ = Invitation::decode(&format!("WHISPR1:{}", data_encoding::BASE32_NOPAD.encode(&with_sum)));
        }
    }

    #[test]
    fn damaged_invitations_are_refused_with_a_reason() {
        let text = sample(true).encode();
        let mut chars: Vec<char> = text.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let flipped: String = chars.into_iter().collect();
        assert!(matches!(
            Invitation::decode(&flipped),
            Err(ClientError::InvalidInvitation(_))
        ));
        assert!(Invitation::decode(&text[..text.len() - 8]).is_err());
        assert!(Invitation::decode("hello").is_err());
        assert!(Invitation::decode("WHISPR1:").is_err());
        assert!(Invitation::decode("WHISPR1:!!!!").is_err());
    }
}
