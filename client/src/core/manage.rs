//! Contact and data management: removing or blocking a contact (the mailbox it deposits into
//! is erased on every replica, so that it can no longer deposit), erasing every mailbox of the
//! account, and the export of the user's own history and contacts.
//!
//! The core decides what to erase and changes its state; the driver does the erasures
//! (`DELETE /v1/mailboxes/{id}` on each replica, `docs/mailbox.md`) and reports which
//! replicas confirmed. Replicas that did not (down, unreachable) are kept in the state and
//! retried by the driver ([`ClientCore::erasures_due`]).

use serde::Serialize;
use serde_json::{Value, json};

use super::ClientCore;
use crate::error::{ClientError, Result};
use crate::state::{Blocked, OwnedMailbox};

/// Most blocked identities kept (the oldest block is forgotten beyond).
pub const BLOCKED_MAX: usize = 10_000;
/// Most mailboxes waiting for their erasure on some replica; beyond it `block` and `remove`
/// are refused until the driver has erased some.
pub const ERASURES_MAX: usize = 1_000;
/// The format name of an export document.
pub const EXPORT_FORMAT: &str = "whispr-export";
/// The version of an export document.
pub const EXPORT_VERSION: u32 = 1;

/// What `remove` or `block` did.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Revoked {
    /// The contact's name.
    pub name: String,
    /// Its identity is blocked.
    pub blocked: bool,
    /// Replicas of the mailbox it deposited into.
    pub replicas: usize,
    /// Of those, the ones that confirmed the erasure (the others are retried).
    pub erased: usize,
}

/// A blocked identity, as listed.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BlockedInfo {
    /// The name the contact had.
    pub name: String,
    /// Its Ed25519 identity key, hex.
    pub identity_key: String,
    /// When it was blocked, ms.
    pub blocked_ms: u64,
}

impl ClientCore {
    /// The own mailbox contact (or pending invitation) `name` deposits into, for the driver
    /// to erase on each of its replicas before [`Self::commit_revoke`]. Refused: an unknown
    /// name; `block` of an invitation nobody answered (there is no identity to block yet);
    /// too many erasures still pending.
    pub fn revoke_plan(&self, name: &str, block: bool) -> Result<OwnedMailbox> {
        self.require_primary("removing a contact")?;
        if super::is_reserved(name) {
            return Err(ClientError::UnknownContact(name.to_string()));
        }
        if self.state.erasures.len() >= ERASURES_MAX {
            return Err(ClientError::Full("the list of mailboxes still to erase"));
        }
        if let Some(c) = self.state.contacts.iter().find(|c| c.name == name) {
            return Ok(c.mine.clone());
        }
        if let Some(i) = self.state.invitations.iter().find(|i| i.name == name) {
            if block {
                return Err(ClientError::InvalidArgument(format!(
                    "{name:?} has not answered your invitation: there is no identity to block \
                     yet (`whispr remove {name}` withdraws the invitation)"
                )));
            }
            return Ok(i.mailbox.clone());
        }
        Err(ClientError::UnknownContact(name.to_string()))
    }

    /// Forgets contact (or pending invitation) `name` at `now`: the contact, its Olm session,
    /// the messages to it still tracked, its receipts and partial messages (the history of
    /// what it sent stays, see `docs/clients.md`). With `block`, its identity is kept so that
    /// a later invitation from it, or a hello from it on one of ours, is refused. The
    /// replicas of its mailbox not in `erased` (those that did not confirm the erasure) are
    /// kept for [`Self::erasures_due`].
    pub fn commit_revoke(
        &mut self,
        now: u64,
        name: &str,
        block: bool,
        erased: &[[u8; 32]],
    ) -> Result<Revoked> {
        self.at(now);
        let mailbox = self.revoke_plan(name, block)?;
        let identity = self
            .state
            .contacts
            .iter()
            .find(|c| c.name == name)
            .map(|c| (c.their_identity, c.their_curve));
        self.state.contacts.retain(|c| c.name != name);
        self.state.invitations.retain(|i| i.name != name);
        self.sessions.remove(name);
        self.prekey_requests.remove(name);
        self.state.outbox.retain(|o| o.contact != name);
        self.state.receipts_due.retain(|r| r.contact != name);
        self.state.partial.retain(|p| p.contact != name);
        if block && let Some((identity, curve)) = identity {
            self.state.blocked.retain(|b| b.identity != identity);
            self.state.blocked.push(Blocked {
                name: name.to_string(),
                identity,
                curve,
                blocked_ms: now,
            });
            if self.state.blocked.len() > BLOCKED_MAX {
                let excess = self.state.blocked.len() - BLOCKED_MAX;
                self.state.blocked.drain(..excess);
            }
        }
        let replicas = mailbox.replicas.len();
        let mut rest = mailbox;
        rest.replicas.retain(|r| !erased.contains(&r.node));
        let done = replicas - rest.replicas.len();
        if !rest.replicas.is_empty() {
            rest.reading = 0;
            self.state.erasures.push(rest);
        }
        self.save();
        Ok(Revoked {
            name: name.to_string(),
            blocked: block,
            replicas,
            erased: done,
        })
    }

    /// Mailboxes of removed or blocked contacts still to erase, each with only the replicas
    /// that have not confirmed it yet.
    pub fn erasures_due(&self) -> Vec<OwnedMailbox> {
        self.state.erasures.clone()
    }

    /// Replicas, over all removed contacts' mailboxes, that have not confirmed their erasure
    /// yet.
    pub fn erasures_pending(&self) -> usize {
        self.state.erasures.iter().map(|m| m.replicas.len()).sum()
    }

    /// Replica `node` confirmed the erasure of mailbox `id` (it erased it, or no longer has
    /// it): it is not tried again.
    pub fn erasure_confirmed(&mut self, id: &[u8; 32], node: &[u8; 32]) {
        for m in self.state.erasures.iter_mut().filter(|m| m.id == *id) {
            m.replicas.retain(|r| r.node != *node);
        }
        self.state.erasures.retain(|m| !m.replicas.is_empty());
        self.save();
    }

    /// Every mailbox of the account, for `erase`: one per contact, per pending invitation,
    /// and those of removed contacts not yet erased everywhere.
    pub fn erase_plan(&self) -> Vec<OwnedMailbox> {
        let mut all = self.owned_mailboxes();
        all.extend(self.state.erasures.iter().cloned());
        all
    }

    /// Lifts the block of the identity blocked as `name`.
    pub fn unblock(&mut self, name: &str) -> Result<()> {
        let before = self.state.blocked.len();
        self.state.blocked.retain(|b| b.name != name);
        if self.state.blocked.len() == before {
            return Err(ClientError::UnknownContact(name.to_string()));
        }
        self.save();
        Ok(())
    }

    /// The blocked identities, oldest block first.
    pub fn blocked(&self) -> Vec<BlockedInfo> {
        self.state
            .blocked
            .iter()
            .map(|b| BlockedInfo {
                name: b.name.clone(),
                identity_key: hex::encode(b.identity),
                blocked_ms: b.blocked_ms,
            })
            .collect()
    }

    /// The block of `identity` (an Ed25519 identity key), if it is blocked.
    pub(super) fn blocked_as(&self, identity: &[u8; 32]) -> Option<&Blocked> {
        self.state.blocked.iter().find(|b| b.identity == *identity)
    }

    /// The user's own data at `now`, as the JSON document of `whispr export`
    /// (`docs/clients.md`, *Export*): public identity keys, contacts (names, states, their
    /// public identity keys), pending invitations, blocked identities, the received messages
    /// still kept (disappearing ones past their time are left out) and the outgoing messages
    /// tracked (their state; the client keeps no plaintext of what it sent). No secret key,
    /// Olm session, mailbox key or access key: the export is to read and keep, not to restore
    /// a client from.
    pub fn export(&self, now: u64) -> Value {
        let (ed, curve) = self.identity_keys();
        let states: std::collections::BTreeMap<String, String> = self
            .contacts()
            .into_iter()
            .map(|c| (c.name, c.state))
            .collect();
        let contacts: Vec<Value> = self
            .state
            .contacts
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "state": states.get(&c.name),
                    "verified": c.verified,
                    "identity_key": hex::encode(c.their_identity),
                    "olm_identity_key": hex::encode(c.their_curve),
                    "created_ms": c.created_ms,
                })
            })
            .collect();
        let invitations: Vec<Value> = self
            .state
            .invitations
            .iter()
            .map(|i| json!({"name": i.name, "created_ms": i.created_ms}))
            .collect();
        let history: Vec<Value> = self
            .state
            .history
            .iter()
            .filter(|h| h.expires_ms.is_none_or(|e| e > now))
            .map(|h| {
                json!({
                    "contact": h.contact,
                    "message_id": h.message_id,
                    "text": h.text,
                    "sent_ms": h.sent_ms,
                    "received_ms": h.received_ms,
                    "expires_ms": h.expires_ms,
                })
            })
            .collect();
        let outgoing: Vec<Value> = self
            .state
            .outbox
            .iter()
            .map(|o| {
                json!({
                    "id": o.id,
                    "contact": o.contact,
                    "kind": o.kind,
                    "state": o.state,
                    "created_ms": o.created_ms,
                    "release_ms": o.release_ms,
                    "expires_ms": o.expires_ms,
                    "bytes": o.len,
                })
            })
            .collect();
        json!({
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at_ms": now,
            "identity": {"identity_key": ed, "olm_identity_key": curve},
            "contacts": contacts,
            "pending_invitations": invitations,
            "blocked": self.blocked(),
            "history": history,
            "outgoing": outgoing,
        })
    }
}
