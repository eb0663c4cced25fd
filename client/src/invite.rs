//! Invitations: everything a contact needs to reach a new mailbox and start an Olm session,
//! as one line of text that is also QR-friendly (`WHISPR1:` then RFC 4648 base32, upper case:
//! only characters of a QR code's alphanumeric mode).
//!
//! Layout (bytes): version `2` ‖ flags (bit 0: a one-time key follows) ‖ mailbox id (32) ‖
//! mailbox HPKE key (32) ‖ access key (32) ‖ mailbox owner key (Ed25519, 32) ‖ identity key
//! (Ed25519, 32) ‖ Olm identity key (Curve25519, 32) ‖ mailbox node id (32) ‖ [one-time key
//! (32)] ‖ first 4 bytes of SHA-256 of everything before (catches copy errors).
//!
//! The mailbox node is pinned: the acceptor deposits there and nowhere else, whatever later
//! directories say (a node that wins rendezvous placement afterwards gets nothing). Version
//! `1` (no node) is still read; its acceptor pins the node placement gives at acceptance.

use sha2::{Digest, Sha256};

use crate::error::{ClientError, Result};

const PREFIX: &str = "WHISPR1:";
const VERSION: u8 = 2;
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
    /// The node holding the mailbox (version 1 invitations have none).
    pub node: Option<[u8; 32]>,
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
        let mut b = Vec::with_capacity(2 + 8 * 32 + 4);
        b.push(if self.node.is_some() {
            VERSION
        } else {
            VERSION_UNPINNED
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
        if let Some(n) = &self.node {
            b.extend_from_slice(n);
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
        let pinned = match version {
            VERSION => 1,
            VERSION_UNPINNED => 0,
            _ => return Err(ClientError::InvalidInvitation("unknown version")),
        };
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
        let keys = 6 + pinned + otk;
        if rest.len() != keys * 32 {
            return Err(ClientError::InvalidInvitation("wrong length"));
        }
        let key = |i: usize| -> [u8; 32] {
            let mut k = [0u8; 32];
            if let Some(s) = rest.get(i * 32..(i + 1) * 32) {
                k.copy_from_slice(s);
            }
            k
        };
        Ok(Invitation {
            mailbox_id: key(0),
            mailbox_key: key(1),
            access: key(2),
            owner_key: key(3),
            identity: key(4),
            curve: key(5),
            node: (pinned == 1).then(|| key(6)),
            one_time_key: (otk == 1).then(|| key(6 + pinned)),
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
            node: Some([8; 32]),
        }
    }

    #[test]
    fn an_unpinned_version_1_invitation_still_reads() {
        for otk in [true, false] {
            let old = Invitation {
                node: None,
                ..sample(otk)
            };
            let text = old.encode();
            assert_eq!(Invitation::decode(&text).unwrap(), old);
        }
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
