//! Prekeys: the public Curve25519 keys a mailbox owner publishes so that contacts can start an
//! Olm session, each signed with the owner's Ed25519 key.
//!
//! The mailbox node stores only public keys and checks the owner's signatures on upload; the
//! requester checks them again on the bundle it receives (the node could lie). Transcripts:
//!
//! - identity: `"whispr-prekey-identity-v1" ‖ mailbox_id(32) ‖ identity_key(32)`
//! - prekey: `"whispr-prekey-v1" ‖ mailbox_id(32) ‖ key_id(u32 BE) ‖ fallback(1 byte) ‖ key(32)`

use ed25519_dalek::{Signature, SigningKey, VerifyingKey, ed25519::signature::Signer};

use crate::{Error, MailboxId, Result, wire};

const IDENTITY_PREFIX: &[u8] = b"whispr-prekey-identity-v1";
const PREKEY_PREFIX: &[u8] = b"whispr-prekey-v1";

/// One signed Curve25519 prekey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPrekey {
    /// Owner-chosen id, unique per mailbox.
    pub key_id: u32,
    /// Curve25519 public key.
    pub key: [u8; 32],
    /// True for the long-lived fallback key (served when no one-time key is left).
    pub fallback: bool,
    /// The owner's signature over the prekey transcript.
    pub signature: [u8; 64],
}

fn identity_transcript(mailbox: &MailboxId, identity_key: &[u8; 32]) -> Vec<u8> {
    let mut t = Vec::with_capacity(IDENTITY_PREFIX.len() + 64);
    t.extend_from_slice(IDENTITY_PREFIX);
    t.extend_from_slice(mailbox.as_bytes());
    t.extend_from_slice(identity_key);
    t
}

fn prekey_transcript(mailbox: &MailboxId, key_id: u32, fallback: bool, key: &[u8; 32]) -> Vec<u8> {
    let mut t = Vec::with_capacity(PREKEY_PREFIX.len() + 69);
    t.extend_from_slice(PREKEY_PREFIX);
    t.extend_from_slice(mailbox.as_bytes());
    t.extend_from_slice(&key_id.to_be_bytes());
    t.push(u8::from(fallback));
    t.extend_from_slice(key);
    t
}

/// Signs the owner's Olm identity key for `mailbox`.
pub fn sign_identity(owner: &SigningKey, mailbox: &MailboxId, identity_key: &[u8; 32]) -> [u8; 64] {
    owner
        .sign(&identity_transcript(mailbox, identity_key))
        .to_bytes()
}

/// Checks an identity-key signature.
pub fn verify_identity(
    owner: &VerifyingKey,
    mailbox: &MailboxId,
    identity_key: &[u8; 32],
    signature: &[u8; 64],
) -> Result<()> {
    owner
        .verify_strict(
            &identity_transcript(mailbox, identity_key),
            &Signature::from_bytes(signature),
        )
        .map_err(|_| Error::BadSignature("prekey identity"))
}

impl SignedPrekey {
    /// Creates and signs a prekey.
    pub fn sign(
        owner: &SigningKey,
        mailbox: &MailboxId,
        key_id: u32,
        fallback: bool,
        key: [u8; 32],
    ) -> SignedPrekey {
        let signature = owner
            .sign(&prekey_transcript(mailbox, key_id, fallback, &key))
            .to_bytes();
        SignedPrekey {
            key_id,
            key,
            fallback,
            signature,
        }
    }

    /// Checks the owner's signature.
    pub fn verify(&self, owner: &VerifyingKey, mailbox: &MailboxId) -> Result<()> {
        owner
            .verify_strict(
                &prekey_transcript(mailbox, self.key_id, self.fallback, &self.key),
                &Signature::from_bytes(&self.signature),
            )
            .map_err(|_| Error::BadSignature("prekey"))
    }
}

/// What a mailbox node answers to an anonymous prekey request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyBundle {
    /// The mailbox owner's Ed25519 key.
    pub owner_key: [u8; 32],
    /// The owner's Olm identity key (Curve25519).
    pub identity_key: [u8; 32],
    /// Owner signature over the identity key.
    pub identity_signature: [u8; 64],
    /// A one-time key (consumed by this request), the fallback key, or none.
    pub prekey: Option<SignedPrekey>,
}

fn array<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N]> {
    <[u8; N]>::try_from(bytes).map_err(|_| Error::BadLength {
        what,
        len: bytes.len(),
        expected: N,
    })
}

impl PrekeyBundle {
    /// Verifies every signature in the bundle for `mailbox`, against the owner key the
    /// requester already knows (from an invitation), not the one in the bundle.
    pub fn verify(&self, owner: &VerifyingKey, mailbox: &MailboxId) -> Result<()> {
        if owner.as_bytes() != &self.owner_key {
            return Err(Error::BadSignature("prekey bundle owner"));
        }
        verify_identity(owner, mailbox, &self.identity_key, &self.identity_signature)?;
        if let Some(p) = &self.prekey {
            p.verify(owner, mailbox)?;
        }
        Ok(())
    }

    pub(crate) fn to_wire(&self) -> wire::PrekeyBundle {
        let (key_id, key, key_signature, fallback) = match &self.prekey {
            Some(p) => (p.key_id, p.key.to_vec(), p.signature.to_vec(), p.fallback),
            None => (0, Vec::new(), Vec::new(), false),
        };
        wire::PrekeyBundle {
            owner_key: self.owner_key.to_vec(),
            identity_key: self.identity_key.to_vec(),
            identity_signature: self.identity_signature.to_vec(),
            key_id,
            key,
            key_signature,
            fallback,
        }
    }

    pub(crate) fn from_wire(w: wire::PrekeyBundle) -> Result<PrekeyBundle> {
        let prekey = if w.key.is_empty() {
            if !w.key_signature.is_empty() || w.fallback || w.key_id != 0 {
                return Err(Error::Malformed {
                    what: "prekey bundle",
                    reason: "fields set without a key",
                });
            }
            None
        } else {
            Some(SignedPrekey {
                key_id: w.key_id,
                key: array("prekey", &w.key)?,
                fallback: w.fallback,
                signature: array("prekey signature", &w.key_signature)?,
            })
        };
        Ok(PrekeyBundle {
            owner_key: array("owner key", &w.owner_key)?,
            identity_key: array("identity key", &w.identity_key)?,
            identity_signature: array("identity signature", &w.identity_signature)?,
            prekey,
        })
    }
}
