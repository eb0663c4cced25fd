//! Receiving: what a mailbox returns is either a reply through one of our SURBs (a deposit,
//! hold or cancel ack, a prekey bundle) or an envelope from a contact, which is opened,
//! reassembled, decrypted (Olm) and acted on (hello, text, receipt).

use std::time::Duration;

use base64::Engine;
use vodozemac::olm::OlmMessage;
use whispr_protocol::envelope::{Envelope, EnvelopeContent, MailboxSecretKey};
use whispr_protocol::fragment::{Fragment, FragmentInfo, Inserted, Reassembler, ReassemblyLimits};
use whispr_protocol::payload::Reply;
use whispr_protocol::{MailboxId, UnixTime};

use whispr_protocol::mailbox_api::REPLICAS_MAX;

use super::devices::{FORMAT_MULTI, LINK_CONTACT, SELF_CONTACT, is_reserved};
use super::{AppMessage, ClientCore, Output, PARTIAL_AGE_MAX_MS, Pinning, StoredMessage, h32};
use crate::error::{ClientError, Result};
use crate::state::{
    HistoryEntry, OutKind, OutState, OwnedMailbox, PeerMailbox, PendingSurb, Receipts,
    StoredFragment, SurbPurpose,
};

impl ClientCore {
    /// Messages mailbox `mailbox` returned at `now` from the replica read from now (a poll
    /// page or stream pushes, in order): see [`Self::handle_fetched_from`].
    pub fn handle_fetched(&mut self, now: u64, mailbox: &[u8; 32], messages: &[StoredMessage]) {
        let Some(node) = self
            .owned_mailbox(mailbox)
            .and_then(|m| m.current().map(|r| r.node))
        else {
            return;
        };
        self.handle_fetched_from(now, mailbox, &node, messages);
    }

    /// Messages mailbox `mailbox`'s replica `node` returned at `now` (a poll page or stream
    /// pushes, in order). Processes those after that replica's cursor, then asks for the state
    /// to be saved and for the messages to be acknowledged to that replica ([`Output::Save`],
    /// [`Output::Ack`]). A message read before from another replica (after a failover, a
    /// replica serves what the one read before had served) is dropped by its end-to-end id or
    /// its SURB, and acknowledged here too. Messages for a mailbox or replica we do not own
    /// are ignored.
    pub fn handle_fetched_from(
        &mut self,
        now: u64,
        mailbox: &[u8; 32],
        node: &[u8; 32],
        messages: &[StoredMessage],
    ) {
        self.at(now);
        let Some(m) = self.owned_mailbox(mailbox) else {
            return;
        };
        let Some(before) = m.replica(node).map(|r| r.cursor) else {
            return;
        };
        let mut cursor = before;
        for msg in messages {
            if msg.seq <= cursor {
                continue;
            }
            self.process(&m, msg);
            cursor = msg.seq;
        }
        if cursor == before {
            return;
        }
        if let Some(r) = self
            .mailbox_mut(mailbox)
            .and_then(|mine| mine.replicas.iter_mut().find(|r| r.node == *node))
        {
            r.cursor = cursor;
        }
        // Durable first, then acknowledged: a crash in between re-reads messages, which the
        // seen ids and the SURB table make harmless.
        self.save();
        self.push(Output::Ack {
            mailbox: *mailbox,
            node: *node,
            up_to: cursor,
        });
    }

    fn process(&mut self, m: &OwnedMailbox, msg: &StoredMessage) {
        let b64 = base64::engine::general_purpose::STANDARD;
        match msg.kind.as_str() {
            "surb_reply" => {
                let (Some(id), Some(payload)) = (&msg.surb_id, &msg.payload) else {
                    return;
                };
                let Some(pos) = self.state.surbs.iter().position(|s| s.id == *id) else {
                    return;
                };
                // The SURB is used up only by a reply that opens under it: garbage under its
                // id (from whoever learnt the id) does not cost us the genuine reply.
                let opened = self.state.surbs.get(pos).and_then(|surb| {
                    let sealed = b64.decode(payload).ok()?;
                    let opened = self.codec.open_reply(&surb.recovery, &sealed).ok()?;
                    let reply = Reply::decode(&opened).ok()?;
                    Some((opened, reply))
                });
                let Some((opened, reply)) = opened else {
                    return;
                };
                let surb = self.state.surbs.remove(pos);
                self.on_reply(&surb, reply, &opened);
            }
            "envelope" => {
                let Some(e) = &msg.envelope else { return };
                let Ok(bytes) = b64.decode(e) else { return };
                if let Err(e) = self.on_envelope(m, &bytes) {
                    let contact = self.owner_name(m);
                    self.notice(
                        "undecryptable",
                        contact.as_deref(),
                        None,
                        format!("a message was dropped: {e}"),
                    );
                }
            }
            _ => {}
        }
    }

    fn owner_name(&self, m: &OwnedMailbox) -> Option<String> {
        self.state
            .contacts
            .iter()
            .find(|c| c.mine.id == m.id)
            .map(|c| c.name.clone())
            .or_else(|| {
                self.state
                    .invitations
                    .iter()
                    .find(|i| i.mailbox.id == m.id)
                    .map(|i| i.name.clone())
            })
    }

    fn on_reply(&mut self, surb: &PendingSurb, reply: Reply, raw: &[u8]) {
        match (&surb.purpose, reply) {
            (SurbPurpose::DepositAck { out, fragment }, Reply::DepositAck { dedup_id, .. }) => {
                let Some(i) = self.out_index(*out) else {
                    return;
                };
                let mut stored = None;
                let mut carried = Vec::new();
                let mut acked_by = None;
                if let Some(o) = self.state.outbox.get_mut(i) {
                    if let Some(f) = o.fragments.get_mut(*fragment)
                        && f.dedup == dedup_id.0
                        && !f.acked
                    {
                        f.acked = true;
                        // The last hop of the last route: the replica that (most likely)
                        // answered.
                        acked_by = f.route.last().cloned().map(|n| (o.contact.clone(), n));
                        carried = f
                            .route
                            .iter()
                            .take(f.route.len().saturating_sub(1))
                            .cloned()
                            .collect();
                        carried.extend(f.surb_route.iter().cloned());
                    }
                    if o.fragments.iter().all(|f| f.acked)
                        && matches!(
                            o.state,
                            OutState::Sending | OutState::Scheduled | OutState::Held
                        )
                    {
                        o.state = OutState::Stored;
                        // Never sent again: the sealed copies are no longer needed.
                        for f in &mut o.fragments {
                            f.envelope = Vec::new();
                        }
                        for h in &mut o.holds {
                            h.packet = Vec::new();
                        }
                        stored = Some((o.contact.clone(), o.kind, o.id));
                    }
                }
                self.record_health(&carried, true);
                if let Some((contact, node)) = acked_by
                    && let Some(c) = self.state.contacts.iter_mut().find(|c| c.name == contact)
                {
                    c.deposit_replica = Some(node);
                }
                if let Some((contact, kind, id)) = stored
                    && kind == OutKind::Text
                {
                    self.notice(
                        "stored",
                        Some(&contact),
                        Some(id),
                        format!("message {id} is in {contact}'s mailbox"),
                    );
                }
            }
            (SurbPurpose::HoldAck { out, hold, part }, Reply::HoldAck { hold_id, cancelled }) => {
                let Some(i) = self.out_index(*out) else {
                    return;
                };
                let mut event = None;
                if let Some(o) = self.state.outbox.get_mut(i) {
                    if let Some(h) = o.holds.get_mut(*hold) {
                        if h.hold_id != hold_id.0 {
                            return;
                        }
                        if cancelled {
                            h.cancel_acked = true;
                        } else if let Some(p) = h.parts_acked.get_mut(*part) {
                            *p = true;
                        }
                    }
                    if o.state == OutState::Cancelling && o.holds.iter().all(|h| h.cancel_acked) {
                        o.state = OutState::Cancelled;
                        event = Some(("cancelled", o.contact.clone(), o.id));
                    } else if !cancelled
                        && o.state == OutState::Scheduled
                        && o.holds.iter().all(|h| h.parts_acked.iter().all(|a| *a))
                    {
                        o.state = OutState::Held;
                        event = Some(("scheduled", o.contact.clone(), o.id));
                    }
                }
                if let Some((kind, _, id)) = &event {
                    // The account's other devices can cancel it, and learn it was.
                    self.sync_scheduled(kind, *id);
                }
                if let Some((kind, contact, id)) = event {
                    let text = if kind == "cancelled" {
                        format!("scheduled message {id} to {contact} was cancelled")
                    } else {
                        format!("message {id} to {contact} is held by a timer node")
                    };
                    self.notice(kind, Some(&contact), Some(id), text);
                }
            }
            (SurbPurpose::Prekeys, Reply::Prekeys(_)) => {
                self.state.prekey_replies.push((
                    surb.id.clone(),
                    base64::engine::general_purpose::STANDARD.encode(raw),
                ));
                if self.state.prekey_replies.len() > 16 {
                    self.state.prekey_replies.remove(0);
                }
            }
            _ => {}
        }
    }

    fn on_envelope(&mut self, m: &OwnedMailbox, bytes: &[u8]) -> Result<()> {
        let envelope = Envelope::decode(bytes)?;
        let opened = envelope.open(&MailboxSecretKey::from_bytes(&m.secret)?)?;
        let sender = opened.sender.to_bytes();
        if sender == self.identity().verifying_key().to_bytes() {
            // Our own cover traffic (or our own deposit in the sync mailbox).
            return Ok(());
        }
        let Some(name) = self.owner_name(m) else {
            return Ok(());
        };
        let message_id = hex::encode(opened.content.message_id.as_bytes());
        if name == LINK_CONTACT && !self.joining() {
            // A new device's request to join (in clear inside the envelope), or its copies.
            let Some(whole) = self.reassemble(&name, &message_id, &opened.content)? else {
                return Ok(());
            };
            return self.on_link_request(&sender, &whole);
        }
        if !is_reserved(&name) && self.is_own_device(&sender) {
            // Another device of the account: its cover traffic.
            return Ok(());
        }
        let is_contact = self.state.contacts.iter().any(|c| c.mine.id == m.id);
        if !is_contact && let Some(b) = self.blocked_as(&sender) {
            // An identity the user blocked answered one of our invitations: refused before
            // any session is made; the invitation stays open for whom it was meant.
            let blocked = b.name.clone();
            self.notice(
                "blocked",
                Some(&name),
                None,
                format!("{blocked}, whom you blocked, answered the invitation {name}; refused"),
            );
            return Ok(());
        }
        if is_contact {
            let c = self.contact(&name)?;
            if !Self::sender_allowed(c, &sender) {
                let reused = c.invitation_key.is_some();
                if reused {
                    self.notice(
                        "invitation_reused",
                        Some(&name),
                        None,
                        format!(
                            "someone other than {name} answered the invitation you gave {name}; refused"
                        ),
                    );
                } else {
                    self.notice(
                        "identity_changed",
                        Some(&name),
                        None,
                        format!(
                            "a message claiming to be from {name} has another identity key; refused"
                        ),
                    );
                }
                return Ok(());
            }
            if c.seen.contains(&message_id) {
                return Ok(());
            }
        }
        let Some(whole) = self.reassemble(&name, &message_id, &opened.content)? else {
            return Ok(());
        };
        let (&t, body) = whole
            .split_first()
            .ok_or(ClientError::Olm("empty message".to_string()))?;
        let plaintext = if is_contact && t == FORMAT_MULTI {
            match self.decrypt_multi(&name, &sender, &whole)? {
                Some(p) => p,
                None => {
                    // Sent before the contact learnt of this device.
                    self.not_for_this_device(&name);
                    return Ok(());
                }
            }
        } else if is_contact {
            let olm = OlmMessage::from_parts(usize::from(t), body)
                .map_err(|e| ClientError::Olm(e.to_string()))?;
            if !self.sessions.contains_key(&name) && !self.is_primary() {
                // A one-device message to the primary, sent before the contact learnt of this
                // device.
                self.not_for_this_device(&name);
                return Ok(());
            }
            let session = self
                .sessions
                .get_mut(&name)
                .ok_or_else(|| ClientError::NotEstablished(name.clone()))?;
            // A retransmitted copy whose first copy was already read, or garbage, fails here.
            session
                .decrypt(&olm)
                .map_err(|e| ClientError::Olm(e.to_string()))?
        } else {
            let olm = OlmMessage::from_parts(usize::from(t), body)
                .map_err(|e| ClientError::Olm(e.to_string()))?;
            self.answer_invitation(m, &name, &olm, sender)?
        };
        if let Some(c) = self.state.contacts.iter_mut().find(|c| c.name == name) {
            c.heard_from = true;
            c.seen.push_back(message_id.clone());
            while c.seen.len() > self.state.settings.seen_max.max(1) {
                c.seen.pop_front();
            }
        }
        let app: AppMessage = serde_json::from_slice(&plaintext)
            .map_err(|_| ClientError::Olm("undecodable message".to_string()))?;
        match (name.as_str(), app) {
            (_, AppMessage::Devices { list }) => self.on_devices(&name, list),
            (SELF_CONTACT, app) => self.on_sync(app),
            (LINK_CONTACT, AppMessage::LinkTransfer { transfer }) => self.on_transfer(*transfer),
            (n, app) if !is_reserved(n) => self.on_app(&name, &message_id, app, sender),
            _ => Ok(()),
        }
    }

    fn reassemble(
        &mut self,
        name: &str,
        message_id: &str,
        content: &EnvelopeContent,
    ) -> Result<Option<Vec<u8>>> {
        let now = self.now;
        let mut r: Reassembler<()> = Reassembler::new(ReassemblyLimits {
            messages_max: 2,
            bytes_max: usize::MAX,
            age_max: Duration::from_millis(PARTIAL_AGE_MAX_MS),
            completed_max: 1,
        });
        let mine: Vec<&StoredFragment> = self
            .state
            .partial
            .iter()
            .filter(|p| p.contact == name && p.message_id == message_id)
            .collect();
        for p in &mine {
            let _ = r.insert(
                UnixTime(now),
                (),
                Fragment {
                    message_id: content.message_id,
                    info: FragmentInfo {
                        index: p.index,
                        count: p.count,
                        total_len: p.total_len,
                        message_digest: p.digest,
                    },
                    data: p.data.clone(),
                },
            );
        }
        match r.insert(
            UnixTime(now),
            (),
            Fragment {
                message_id: content.message_id,
                info: content.fragment,
                data: content.content.clone(),
            },
        )? {
            Inserted::Duplicate => Ok(None),
            Inserted::Complete(bytes) => {
                self.state
                    .partial
                    .retain(|p| !(p.contact == name && p.message_id == message_id));
                Ok(Some(bytes))
            }
            Inserted::Pending => {
                self.state.partial.push(StoredFragment {
                    contact: name.to_string(),
                    message_id: message_id.to_string(),
                    index: content.fragment.index,
                    count: content.fragment.count,
                    total_len: content.fragment.total_len,
                    digest: content.fragment.message_digest,
                    data: content.content.clone(),
                    received_ms: now,
                });
                let mut total: usize = self.state.partial.iter().map(|p| p.data.len()).sum();
                while total > self.state.settings.partial_bytes_max {
                    let Some(oldest) = self.state.partial.first().map(|p| p.message_id.clone())
                    else {
                        break;
                    };
                    self.state.partial.retain(|p| p.message_id != oldest);
                    total = self.state.partial.iter().map(|p| p.data.len()).sum();
                }
                Ok(None)
            }
        }
    }

    fn on_app(
        &mut self,
        name: &str,
        message_id: &str,
        app: AppMessage,
        sender: [u8; 32],
    ) -> Result<()> {
        let now = self.now;
        match app {
            AppMessage::Hello {
                identity,
                curve,
                mailbox,
                mailbox_key,
                access,
                binding,
                node,
                replicas,
            } => {
                let identity = h32(&identity, "hello identity")?;
                let curve = h32(&curve, "hello curve")?;
                let replicas = replicas
                    .unwrap_or_default()
                    .iter()
                    .map(|n| h32(n, "hello replica"))
                    .collect::<Result<Vec<_>>>()?;
                if replicas.len() > REPLICAS_MAX {
                    return Err(ClientError::Olm("hello: too many replicas".to_string()));
                }
                let pinned = if !replicas.is_empty() {
                    Pinning::Replicas
                } else if node.is_some() {
                    Pinning::Node
                } else {
                    Pinning::None
                };
                let mut theirs = PeerMailbox {
                    id: h32(&mailbox, "hello mailbox")?,
                    key: h32(&mailbox_key, "hello mailbox key")?,
                    access: h32(&access, "hello access")?,
                    node: match (&node, replicas.first()) {
                        (_, Some(first)) => *first,
                        (Some(n), None) => h32(n, "hello node")?,
                        (None, None) => [0u8; 32],
                    },
                    replicas,
                };
                let sig = hex::decode(binding)
                    .ok()
                    .and_then(|b| <[u8; 64]>::try_from(b).ok())
                    .ok_or_else(|| ClientError::Olm("hello binding".to_string()))?;
                self.check_hello(name, sender, (identity, curve), &theirs, pinned, sig)?;
                if pinned == Pinning::None {
                    // A client that does not pin: pin today's placement.
                    let dir = self.dir()?;
                    theirs.node = Self::mailbox_node(&dir, &MailboxId(theirs.id))?.0;
                }
                if let Some(c) = self.state.contacts.iter_mut().find(|c| c.name == name) {
                    c.theirs = Some(theirs);
                }
                self.sync_contact(name);
                self.notice(
                    "contact_established",
                    Some(name),
                    None,
                    format!("{name} accepted your invitation"),
                );
            }
            AppMessage::Text {
                body,
                sent_ms,
                expire_after_ms,
            } => {
                let expires_ms = expire_after_ms.map(|d| sent_ms.min(now).saturating_add(d));
                if expires_ms.is_some_and(|e| e <= now) {
                    // Arrived after its time: deleted unseen.
                    return Ok(());
                }
                let read_elsewhere = match self
                    .state
                    .read_elsewhere
                    .iter()
                    .position(|id| id == message_id)
                {
                    Some(p) => {
                        self.state.read_elsewhere.remove(p);
                        true
                    }
                    None => false,
                };
                self.state.history.push(HistoryEntry {
                    contact: name.to_string(),
                    message_id: message_id.to_string(),
                    text: body,
                    sent_ms,
                    received_ms: now,
                    expires_ms,
                    shown: false,
                    outgoing: false,
                    // Shown on another device of the account already.
                    read_elsewhere,
                });
                let max = self.state.settings.history_max.max(1);
                if self.state.history.len() > max {
                    let excess = self.state.history.len() - max;
                    self.state.history.drain(..excess);
                }
                // One delivery receipt per account: the primary's.
                if self.state.settings.receipts != Receipts::None && self.is_primary() {
                    self.queue_receipt(name, "delivered", message_id.to_string());
                }
            }
            AppMessage::Devices { .. }
            | AppMessage::SyncSent { .. }
            | AppMessage::SyncRead { .. }
            | AppMessage::SyncContact { .. }
            | AppMessage::LinkTransfer { .. }
            | AppMessage::LinkDone { .. }
            | AppMessage::SyncScheduled { .. }
            | AppMessage::SyncCancelled { .. } => {}
            AppMessage::Receipt { kind, of } => {
                let new_state = match kind.as_str() {
                    "delivered" => OutState::Delivered,
                    "read" => OutState::Read,
                    _ => return Ok(()),
                };
                let mut events = Vec::new();
                for o in &mut self.state.outbox {
                    if o.contact == name
                        && of.contains(&hex::encode(o.message_id))
                        && o.state != OutState::Read
                    {
                        o.state = new_state;
                        events.push(o.id);
                    }
                }
                for id in events {
                    self.notice(
                        &kind,
                        Some(name),
                        Some(id),
                        format!("{name}: message {id} {kind}"),
                    );
                }
            }
        }
        Ok(())
    }
}
