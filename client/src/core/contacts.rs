//! Contacts: invitations (a new mailbox, its prekeys and the text to give), accepting one
//! (our mailbox, the Olm session, the hello that says where to answer), answering the first
//! message on an invitation's mailbox, identity checks.

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use ed25519_dalek::ed25519::signature::Signer;
use rand::Rng;
use serde_json::json;
use sha2::{Digest, Sha256};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{OlmMessage, SessionConfig};
use whispr_protocol::directory::Directory;
use whispr_protocol::envelope::MailboxSecretKey;
use whispr_protocol::payload::{FinalMessage, PrekeyRequest, Reply};
use whispr_protocol::prekeys::{PrekeyBundle, SignedPrekey, sign_identity};
use whispr_protocol::{AccessToken, DestinationAddress, MailboxId, NodeId};

use whispr_protocol::mailbox_api::REPLICAS_MAX;

use super::{
    AppMessage, ClientCore, Output, PREKEYS_UPLOADED, Pinning, SURB_TTL_MS, epoch_at,
    hello_transcript, owner_key,
};
use crate::error::{ClientError, Result};
use crate::invite::Invitation;
use crate::state::{
    Contact, OutKind, OwnedMailbox, PeerMailbox, PendingInvitation, Replica, SurbPurpose,
};

/// An invitation made by [`ClientCore::prepare_invite`]: the driver creates `mailbox` on each
/// of its replicas and uploads each replica's `prekeys` there (recording what succeeded in
/// `mailbox.replicas`), then commits it ([`ClientCore::commit_invite`]). Its `Debug` leaves
/// out the invitation text (it carries the access key).
pub struct InvitePlan {
    /// The contact's name.
    pub name: String,
    /// The new mailbox (create it on each of `mailbox.replicas`; each carries its slice of
    /// the one-time keys in `prekeys`, the body of its `PUT /prekeys`, `docs/mailbox.md`).
    pub mailbox: OwnedMailbox,
    /// Its HPKE public key.
    pub mailbox_key: [u8; 32],
    /// Retention to ask for.
    pub retention_ms: u64,
    /// The invitation text to give the contact.
    pub invitation: String,
    one_time_key: [u8; 32],
}

/// An acceptance begun by [`ClientCore::accept_start`]: the driver creates `mailbox`, fetches
/// a one-time key through the mesh if the invitation has none
/// ([`ClientCore::request_prekey`]), then finishes ([`ClientCore::accept_finish`]).
#[derive(Debug)]
pub struct AcceptPlan {
    /// The contact's name.
    pub name: String,
    /// Our new mailbox for the contact.
    pub mailbox: OwnedMailbox,
    /// Its HPKE public key.
    pub mailbox_key: [u8; 32],
    /// Retention to ask for.
    pub retention_ms: u64,
    /// The decoded invitation.
    pub invitation: Invitation,
}

impl std::fmt::Debug for InvitePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvitePlan")
            .field("name", &self.name)
            .field("mailbox", &self.mailbox)
            .field("retention_ms", &self.retention_ms)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OwnedMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedMailbox").finish_non_exhaustive()
    }
}

impl ClientCore {
    pub(super) fn contact(&self, name: &str) -> Result<&Contact> {
        self.state
            .contacts
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ClientError::UnknownContact(name.to_string()))
    }

    fn name_taken(&self, name: &str) -> bool {
        self.state.contacts.iter().any(|c| c.name == name)
            || self.state.invitations.iter().any(|i| i.name == name)
    }

    /// A new mailbox on R mailbox nodes (its replica set; R = `Settings::replicas`, at most
    /// `REPLICAS_MAX` and the mailbox nodes of the directory): the nodes rendezvous placement
    /// ranks highest for it, those of `avoid` (the replicas of the contact's mailbox) last: a
    /// node holding both mailboxes of a relationship would see each deposit and its ack
    /// (security review finding 5), so they are taken only when there are not enough others.
    pub(super) fn new_owned_mailbox(
        &mut self,
        dir: &Directory,
        avoid: &[NodeId],
    ) -> Result<(OwnedMailbox, [u8; 32])> {
        let mut id = [0u8; 32];
        self.rng.fill_bytes(&mut id);
        let secret = MailboxSecretKey::generate(&mut self.crypto_rng);
        let ranked = dir.mailbox_replicas(&MailboxId(id), dir.len());
        let r = self.state.settings.replicas.clamp(1, REPLICAS_MAX);
        let (others, avoided): (Vec<NodeId>, Vec<NodeId>) =
            ranked.into_iter().partition(|n| !avoid.contains(n));
        let chosen: Vec<NodeId> = others.into_iter().chain(avoided).take(r).collect();
        let first = *chosen
            .first()
            .ok_or_else(|| ClientError::NoRoute("no mailbox node in the directory".to_string()))?;
        let replicas = chosen
            .iter()
            .map(|node| Replica {
                node: node.0,
                // A node without an API address cannot be reached over HTTP: the driver says
                // so.
                api_url: dir
                    .get(node)
                    .and_then(|d| d.api_url.clone())
                    .unwrap_or_default(),
                cursor: 0,
                token: None,
                token_expires_ms: 0,
                created: false,
                prekeys: None,
            })
            .collect();
        let mut m = OwnedMailbox {
            id,
            secret: *secret.to_bytes(),
            owner_seed: [0; 32],
            access: [0; 32],
            reply_key: [0; 32],
            node: first.0,
            replicas,
            reading: 0,
            retention_ms: self.state.settings.retention_ms,
            legacy_api_url: String::new(),
            legacy_cursor: 0,
            legacy_token: None,
            legacy_token_expires_ms: 0,
        };
        self.rng.fill_bytes(&mut m.owner_seed);
        self.rng.fill_bytes(&mut m.access);
        self.rng.fill_bytes(&mut m.reply_key);
        Ok((m, secret.public_key().to_bytes()))
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > 64 || name.starts_with('~') || name.contains('#') {
            return Err(ClientError::InvalidArgument(
                "a contact name has 1 to 64 characters, no #, and does not start with ~"
                    .to_string(),
            ));
        }
        if self.name_taken(name) {
            return Err(ClientError::ContactExists(name.to_string()));
        }
        Ok(())
    }

    /// Makes an invitation for a new contact (named `contact-N` when `name` is `None`): a new
    /// mailbox, its prekeys, and the text to give. With `inline_prekey` false the text is
    /// shorter and the contact fetches a one-time key anonymously through the mesh. Nothing
    /// is kept until [`Self::commit_invite`].
    pub fn prepare_invite(
        &mut self,
        now: u64,
        name: Option<&str>,
        inline_prekey: bool,
    ) -> Result<InvitePlan> {
        self.at(now);
        self.require_primary("making a contact")?;
        let name = match name {
            Some(n) => n.trim().to_string(),
            None => {
                let mut i = self.state.contacts.len() + self.state.invitations.len() + 1;
                while self.name_taken(&format!("contact-{i}")) {
                    i += 1;
                }
                format!("contact-{i}")
            }
        };
        self.check_name(&name)?;
        let dir = self.dir()?;
        let (mut mailbox, mailbox_key) = self.new_owned_mailbox(&dir, &[])?;
        let replicas = mailbox.replicas.len().max(1);
        let generated = self
            .account
            .generate_one_time_keys(PREKEYS_UPLOADED.max(replicas) + 1);
        self.account.mark_keys_as_published();
        let mut keys = generated.created.into_iter();
        let inline = keys
            .next()
            .ok_or_else(|| ClientError::Olm("no one-time key generated".to_string()))?;
        let owner = owner_key(&mailbox);
        let curve = self.account.curve25519_key().to_bytes();
        let id = MailboxId(mailbox.id);
        // Not the Olm identity key itself, which is the same for every mailbox of the user
        // and would let nodes link them (security review finding 8): a commitment to it that
        // only someone holding the invitation can check.
        let committed = identity_commitment(&id, &curve);
        // Prekeys are not replicated: each replica gets its own slice of the one-time keys,
        // so that no key can be handed out twice (`docs/replication.md`).
        let mut slices: Vec<Vec<serde_json::Value>> = vec![Vec::new(); replicas];
        for (i, k) in keys.enumerate() {
            let p = SignedPrekey::sign(
                &owner,
                &id,
                u32::try_from(i).unwrap_or(u32::MAX),
                false,
                k.to_bytes(),
            );
            if let Some(slice) = slices.get_mut(i % replicas) {
                slice.push(json!({"key_id": p.key_id, "key": hex::encode(p.key),
                    "fallback": false, "signature": hex::encode(p.signature)}));
            }
        }
        let identity_signature = hex::encode(sign_identity(&owner, &id, &committed));
        for (r, slice) in mailbox.replicas.iter_mut().zip(slices) {
            r.prekeys = Some(json!({
                "identity_key": hex::encode(committed),
                "identity_signature": identity_signature,
                "prekeys": slice,
            }));
        }
        let invitation = Invitation {
            mailbox_id: mailbox.id,
            mailbox_key,
            access: mailbox.access,
            owner_key: owner.verifying_key().to_bytes(),
            identity: self.identity().verifying_key().to_bytes(),
            curve,
            one_time_key: inline_prekey.then(|| inline.to_bytes()),
            replicas: mailbox.replica_nodes(),
        };
        Ok(InvitePlan {
            name,
            mailbox,
            mailbox_key,
            retention_ms: self.state.settings.retention_ms,
            invitation: invitation.encode(),
            one_time_key: inline.to_bytes(),
        })
    }

    /// Keeps an invitation whose mailbox now exists on at least one of its replicas (with
    /// what the driver recorded per replica: created, prekeys uploaded, token); its text.
    pub fn commit_invite(&mut self, now: u64, plan: InvitePlan) -> String {
        self.at(now);
        self.state.invitations.push(PendingInvitation {
            name: plan.name,
            mailbox: plan.mailbox,
            one_time_key: plan.one_time_key,
            created_ms: now,
        });
        self.save();
        plan.invitation
    }

    /// Begins accepting invitation `text` as contact `name`: our mailbox for them, and the
    /// contact (without a session yet, so that its mailbox is polled for a prekey reply).
    pub fn accept_start(&mut self, now: u64, text: &str, name: &str) -> Result<AcceptPlan> {
        self.at(now);
        self.require_primary("making a contact")?;
        let name = name.trim();
        self.check_name(name)?;
        let inv = Invitation::decode(text)?;
        if inv.identity == self.identity().verifying_key().to_bytes() {
            return Err(ClientError::InvalidInvitation("it is your own invitation"));
        }
        if let Some(b) = self.blocked_as(&inv.identity) {
            return Err(ClientError::InvalidArgument(format!(
                "this invitation is from {:?}, whom you blocked (`whispr unblock {}` first)",
                b.name, b.name
            )));
        }
        let dir = self.dir()?;
        // Pinned by the invitation; an old one pins today's placement.
        let replicas = if inv.replicas.is_empty() {
            vec![Self::mailbox_node(&dir, &MailboxId(inv.mailbox_id))?.0]
        } else {
            inv.replicas.clone()
        };
        let node = replicas.first().copied().unwrap_or_default();
        let avoid: Vec<NodeId> = replicas.iter().copied().map(NodeId).collect();
        let (mine, _) = self.new_owned_mailbox(&dir, &avoid)?;
        let mailbox_key = MailboxSecretKey::from_bytes(&mine.secret)?
            .public_key()
            .to_bytes();
        self.state.contacts.push(Contact {
            name: name.to_string(),
            mine: mine.clone(),
            theirs: Some(PeerMailbox {
                id: inv.mailbox_id,
                key: inv.mailbox_key,
                access: inv.access,
                node,
                replicas,
            }),
            their_identity: inv.identity,
            their_curve: inv.curve,
            session: None,
            heard_from: false,
            verified: false,
            seen: Default::default(),
            invitation_key: None,
            created_ms: now,
            deposit_replica: None,
            their_devices: None,
            devices_sent: 0,
            device_sessions: Vec::new(),
        });
        Ok(AcceptPlan {
            name: name.to_string(),
            mailbox: mine,
            mailbox_key,
            retention_ms: self.state.settings.retention_ms,
            invitation: inv,
        })
    }

    /// Gives up an acceptance begun by [`Self::accept_start`].
    pub fn abandon_accept(&mut self, name: &str) {
        if !self.sessions.contains_key(name) {
            self.state.contacts.retain(|c| c.name != name);
        }
    }

    /// Asks for one of the inviter's one-time keys anonymously: a prekey request through the
    /// mesh whose answer comes back through a SURB into our new mailbox for contact `name`.
    /// The SURB's id, for [`Self::take_prekey_reply`].
    pub fn request_prekey(&mut self, now: u64, name: &str, inv: &Invitation) -> Result<String> {
        self.at(now);
        let dir = self.dir()?;
        let epoch = epoch_at(now);
        let contact = self.contact(name)?;
        let mine = contact.mine.clone();
        let theirs = contact
            .theirs
            .clone()
            .ok_or_else(|| ClientError::NotEstablished(name.to_string()))?;
        let target = MailboxId(inv.mailbox_id);
        // Each request goes to the next replica: each holds its own slice of the keys, and
        // one may be down.
        let attempt = self.prekey_requests.get(name).copied().unwrap_or(0);
        self.prekey_requests
            .insert(name.to_string(), attempt.saturating_add(1));
        let node = Self::peer_replica(&dir, &theirs, attempt)?;
        let surb = self.new_surb(
            &dir,
            &mine,
            attempt,
            SurbPurpose::Prekeys,
            epoch,
            now + SURB_TTL_MS,
        )?;
        let surb_id = self
            .state
            .surbs
            .last()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        let plaintext = FinalMessage::PrekeyRequest(PrekeyRequest {
            mailbox_id: target,
            access_token: AccessToken(inv.access),
            reply_surb: surb,
        })
        .encode()?;
        let route = self.route(&dir, epoch, &node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let packet = self.codec.build_packet(
            &mut self.crypto_rng,
            &route,
            &delays,
            DestinationAddress::mailbox(&target),
            &plaintext,
        )?;
        let edge = route.first().map_or(node, |h| h.node);
        self.push(Output::Transmit { edge, packet });
        Ok(surb_id)
    }

    /// The one-time key that came back for [`Self::request_prekey`]'s SURB `surb_id`, checked
    /// against the invitation; `None` while it has not arrived.
    pub fn take_prekey_reply(
        &mut self,
        surb_id: &str,
        inv: &Invitation,
    ) -> Option<Result<[u8; 32]>> {
        let pos = self
            .state
            .prekey_replies
            .iter()
            .position(|(id, _)| *id == surb_id)?;
        let (_, reply) = self.state.prekey_replies.remove(pos);
        let opened = base64::engine::general_purpose::STANDARD
            .decode(reply)
            .map_err(|_| ClientError::Olm("prekey reply encoding".to_string()))
            .and_then(|bytes| Reply::decode(&bytes).map_err(ClientError::from))
            .and_then(|reply| match reply {
                Reply::Prekeys(bundle) => check_bundle(&bundle, inv),
                _ => Err(ClientError::Olm("unexpected reply".to_string())),
            });
        Some(opened)
    }

    /// Finishes accepting as `name` with the inviter's one-time key `otk`: starts the Olm
    /// session and sends the hello that tells them where to answer; the hello's local id.
    pub fn accept_finish(
        &mut self,
        now: u64,
        name: &str,
        inv: &Invitation,
        otk: [u8; 32],
    ) -> Result<u64> {
        self.at(now);
        let session = self
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                Curve25519PublicKey::from_bytes(inv.curve),
                Curve25519PublicKey::from_bytes(otk),
            )
            .map_err(|e| ClientError::Olm(e.to_string()))?;
        self.sessions.insert(name.to_string(), session);
        let mine = self.contact(name)?.mine.clone();
        let me = PeerMailbox {
            id: mine.id,
            key: MailboxSecretKey::from_bytes(&mine.secret)?
                .public_key()
                .to_bytes(),
            access: mine.access,
            node: mine.node,
            replicas: mine.replica_nodes(),
        };
        let curve = self.account.curve25519_key().to_bytes();
        let identity = self.identity();
        let hello = AppMessage::Hello {
            identity: hex::encode(identity.verifying_key().to_bytes()),
            curve: hex::encode(curve),
            mailbox: hex::encode(me.id),
            mailbox_key: hex::encode(me.key),
            access: hex::encode(me.access),
            binding: hex::encode(
                identity
                    .sign(&hello_transcript(&curve, &me, Pinning::Replicas))
                    .to_bytes(),
            ),
            node: None,
            replicas: Some(me.replicas.iter().map(hex::encode).collect()),
        };
        let id = self.queue(name, OutKind::Hello, &hello, None, None)?;
        self.sync_contact(name);
        let result = self.pump();
        self.save();
        result.map(|()| id)
    }

    /// A prekey message on an invitation's mailbox: creates the contact.
    pub(super) fn answer_invitation(
        &mut self,
        m: &OwnedMailbox,
        name: &str,
        olm: &OlmMessage,
        sender: [u8; 32],
    ) -> Result<Vec<u8>> {
        let OlmMessage::PreKey(pre) = olm else {
            return Err(ClientError::Olm(
                "the first message of a contact must start a session".to_string(),
            ));
        };
        let created = self
            .account
            .create_inbound_session(SessionConfig::version_1(), pre.identity_key(), pre)
            .map_err(|e| ClientError::Olm(e.to_string()))?;
        let pos = self
            .state
            .invitations
            .iter()
            .position(|i| i.mailbox.id == m.id)
            .ok_or_else(|| ClientError::UnknownContact(name.to_string()))?;
        let inv = self.state.invitations.remove(pos);
        self.state.contacts.push(Contact {
            name: name.to_string(),
            mine: inv.mailbox,
            theirs: None,
            their_identity: sender,
            their_curve: pre.identity_key().to_bytes(),
            session: None,
            heard_from: true,
            verified: false,
            seen: Default::default(),
            invitation_key: Some(inv.one_time_key),
            created_ms: self.now,
            deposit_replica: None,
            their_devices: None,
            devices_sent: 0,
            device_sessions: Vec::new(),
        });
        self.sessions.insert(name.to_string(), created.session);
        Ok(created.plaintext)
    }

    /// Checks a hello's binding: the identity that sent it signed where to answer.
    pub(super) fn check_hello(
        &self,
        name: &str,
        sender: [u8; 32],
        (identity, curve): ([u8; 32], [u8; 32]),
        theirs: &PeerMailbox,
        pinned: Pinning,
        binding: [u8; 64],
    ) -> Result<()> {
        let c = self.contact(name)?;
        if identity != sender || curve != c.their_curve {
            return Err(ClientError::IdentityChanged(name.to_string()));
        }
        VerifyingKey::from_bytes(&identity)
            .and_then(|k| {
                k.verify_strict(
                    &hello_transcript(&curve, theirs, pinned),
                    &ed25519_dalek::Signature::from_bytes(&binding),
                )
            })
            .map_err(|_| ClientError::Olm("hello binding does not verify".to_string()))
    }

    /// Where attempt `attempt` (0 for the first send, + 1 per retransmission) deposits into a
    /// contact's mailbox: replica `attempt` mod R of its pinned replica set, counting only the
    /// replicas present in `dir` (a dead replica costs one retransmission timeout, not the
    /// message; `docs/replication.md`). States from before pinning: rendezvous placement in
    /// `dir`.
    pub(super) fn peer_replica(
        dir: &Directory,
        theirs: &PeerMailbox,
        attempt: u32,
    ) -> Result<NodeId> {
        Self::peer_replica_from(dir, theirs, None, attempt)
    }

    /// [`Self::peer_replica`], counting attempts from replica `start` (hex node id: the one
    /// that acknowledged the last deposit) when it is in the set and the directory.
    pub(super) fn peer_replica_from(
        dir: &Directory,
        theirs: &PeerMailbox,
        start: Option<&str>,
        attempt: u32,
    ) -> Result<NodeId> {
        let set = theirs.replica_set();
        if set.is_empty() {
            return Self::mailbox_node(dir, &MailboxId(theirs.id));
        }
        let present: Vec<[u8; 32]> = set
            .iter()
            .copied()
            .filter(|n| dir.get(&NodeId(*n)).is_some())
            .collect();
        let offset = start
            .and_then(|s| present.iter().position(|n| hex::encode(n) == s))
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        Ok(NodeId(pick_replica(
            dir,
            &set,
            attempt.wrapping_add(offset),
        )))
    }

    /// The node rendezvous placement gives mailbox `target` in `dir` (used only where nothing
    /// is pinned: at creation, and for relationships made before pinning).
    pub(super) fn mailbox_node(dir: &Directory, target: &MailboxId) -> Result<NodeId> {
        dir.mailbox_replicas(target, 1)
            .first()
            .copied()
            .ok_or_else(|| ClientError::NoRoute("no mailbox node".to_string()))
    }
}

/// Replica `attempt` mod n of the n replicas of `set` present in `dir` (of the whole set when
/// none is: the route then fails, as it would have).
pub(super) fn pick_replica(dir: &Directory, set: &[[u8; 32]], attempt: u32) -> [u8; 32] {
    let present: Vec<[u8; 32]> = set
        .iter()
        .copied()
        .filter(|n| dir.get(&NodeId(*n)).is_some())
        .collect();
    let from = if present.is_empty() { set } else { &present };
    let k = usize::try_from(attempt).unwrap_or(usize::MAX);
    from.get(k % from.len().max(1)).copied().unwrap_or_default()
}

/// What a mailbox's prekeys carry in place of its owner's Olm identity key:
/// SHA-256("whispr-prekey-identity-v1" ‖ mailbox id ‖ Curve25519 identity key). Different for
/// every mailbox of a user; checkable by whoever holds the invitation (which names the key).
fn identity_commitment(mailbox: &MailboxId, curve: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"whispr-prekey-identity-v1");
    h.update(mailbox.as_bytes());
    h.update(curve);
    h.finalize().into()
}

fn check_bundle(bundle: &PrekeyBundle, inv: &Invitation) -> Result<[u8; 32]> {
    let owner = VerifyingKey::from_bytes(&inv.owner_key)
        .map_err(|_| ClientError::InvalidInvitation("owner key"))?;
    let mailbox = MailboxId(inv.mailbox_id);
    bundle.verify(&owner, &mailbox)?;
    if bundle.identity_key != identity_commitment(&mailbox, &inv.curve) {
        return Err(ClientError::IdentityChanged("the inviter".to_string()));
    }
    bundle
        .prekey
        .as_ref()
        .map(|p| p.key)
        .ok_or(ClientError::InvalidInvitation(
            "the inviter has no one-time key left: ask for a new invitation",
        ))
}
