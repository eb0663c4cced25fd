//! Sending: a message is encrypted (Olm), fragmented and sealed once; each send of a fragment
//! gets a fresh route and a fresh ack SURB; a contact's window bounds what is in flight;
//! what is not acknowledged in time is sent again, up to a bound; cover and receipts.

use rand::{Rng, RngExt};
use whispr_protocol::directory::Directory;
use whispr_protocol::envelope::{
    Envelope, EnvelopeContent, MailboxPublicKey, MailboxSecretKey, OuterFields,
};
use whispr_protocol::payload::FinalMessage;
use whispr_protocol::{
    AccessToken, DedupId, DestinationAddress, MailboxId, MessageId, NodeId, UnixTime,
    fragment::fragment_message,
};

use super::{
    AppMessage, ClientCore, Output, RELEASE_GRACE_MS, SURB_TTL_MS, SendOptions, active, epoch_at,
};
use crate::error::{ClientError, Result};
use crate::state::{OutFragment, OutKind, OutState, Outgoing, SurbPurpose};

/// What to send again for one outgoing message: (its id, fragments, holds, cancels).
pub(super) type Resend = (u64, Vec<usize>, Vec<usize>, Vec<usize>);

impl ClientCore {
    /// Sends `text` to contact `name` at `now`; the local id. The packets come out of
    /// [`Self::poll_output`] (within the contact's window; the rest later), or the holds of a
    /// scheduled send (`opts.at_ms`). Refused (and forgotten) when it cannot be sent at all.
    pub fn send(&mut self, now: u64, name: &str, text: &str, opts: SendOptions) -> Result<u64> {
        self.at(now);
        if super::is_reserved(name) {
            return Err(ClientError::UnknownContact(name.to_string()));
        }
        if let Some(at) = opts.at_ms {
            if at <= now + 1_000 {
                return Err(ClientError::InvalidArgument(
                    "the release time must be at least a second ahead".to_string(),
                ));
            }
            if at > now + 11 * 3600 * 1000 {
                return Err(ClientError::InvalidArgument(
                    "the release time may be at most 11 hours ahead (relays publish their keys 12 hours ahead)"
                        .to_string(),
                ));
            }
        }
        let start = opts.at_ms.unwrap_or(now);
        let expire_after_ms = opts
            .expire_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let app = AppMessage::Text {
            body: text.to_string(),
            sent_ms: start,
            expire_after_ms,
        };
        let expires = expire_after_ms.map(|d| start.saturating_add(d));
        let id = self.queue(name, OutKind::Text, &app, expires, opts.at_ms)?;
        let queued = self.outputs.len();
        // The account's other devices show it in their history too.
        let synced = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map(|o| o.message_id)
            .and_then(|m| self.sync_sent(name, &m, text, start, expire_after_ms));
        let result = match opts.at_ms {
            Some(at) => self.schedule(id, at),
            None => self.pump(),
        };
        if result.is_err() {
            // Not handed to the mesh: forget it rather than send it later behind the user's
            // back (the error is reported; sending again is the user's call).
            self.outputs.truncate(queued);
            self.state
                .outbox
                .retain(|o| o.id != id && Some(o.id) != synced);
            self.state.surbs.retain(|s| match &s.purpose {
                SurbPurpose::DepositAck { out, .. } | SurbPurpose::HoldAck { out, .. } => {
                    *out != id && Some(*out) != synced
                }
                _ => true,
            });
        }
        self.save();
        result.map(|()| id)
    }

    /// Sends several (contact, text) messages at once, as [`Self::send`] without options
    /// does; their local ids.
    pub fn send_batch(&mut self, now: u64, messages: &[(String, String)]) -> Result<Vec<u64>> {
        self.at(now);
        let mut ids = Vec::with_capacity(messages.len());
        for (name, text) in messages {
            if super::is_reserved(name) {
                return Err(ClientError::UnknownContact(name.to_string()));
            }
            let app = AppMessage::Text {
                body: text.clone(),
                sent_ms: now,
                expire_after_ms: None,
            };
            let id = self.queue(name, OutKind::Text, &app, None, None)?;
            if let Some(m) = self
                .out_index(id)
                .and_then(|i| self.state.outbox.get(i))
                .map(|o| o.message_id)
            {
                self.sync_sent(name, &m, text, now, None);
            }
            ids.push(id);
        }
        let result = self.pump();
        self.save();
        result.map(|()| ids)
    }

    /// Encrypts `app` for `name` and adds it to the outbox (not sent yet); its local id.
    pub(super) fn queue(
        &mut self,
        name: &str,
        kind: OutKind,
        app: &AppMessage,
        expires_ms: Option<u64>,
        release_ms: Option<u64>,
    ) -> Result<u64> {
        let contact = self.contact(name)?;
        if contact.theirs.is_none() {
            return Err(ClientError::NotEstablished(name.to_string()));
        }
        let plaintext = zeroize::Zeroizing::new(
            serde_json::to_vec(app).map_err(|e| ClientError::Olm(e.to_string()))?,
        );
        if plaintext.len() > self.state.settings.message_bytes_max {
            return Err(ClientError::InvalidArgument(format!(
                "message of {} bytes is over the limit of {}",
                plaintext.len(),
                self.state.settings.message_bytes_max
            )));
        }
        let busy = self.state.outbox.iter().filter(|o| active(o.state)).count();
        if busy >= self.state.settings.outbox_max {
            return Err(ClientError::Full("the outbox"));
        }
        let bytes = self.encrypt_for(name, plaintext.as_slice())?;
        let len = plaintext.len();
        self.queue_bytes_len(name, kind, &bytes, expires_ms, release_ms, len)
    }

    /// Adds message bytes `bytes` (already encrypted, or a link request) for `name` to the
    /// outbox; its local id.
    pub(super) fn queue_bytes(
        &mut self,
        name: &str,
        kind: OutKind,
        bytes: &[u8],
        expires_ms: Option<u64>,
        release_ms: Option<u64>,
    ) -> Result<u64> {
        self.queue_bytes_len(name, kind, bytes, expires_ms, release_ms, bytes.len())
    }

    fn queue_bytes_len(
        &mut self,
        name: &str,
        kind: OutKind,
        bytes: &[u8],
        expires_ms: Option<u64>,
        release_ms: Option<u64>,
        len: usize,
    ) -> Result<u64> {
        let theirs = self
            .contact(name)?
            .theirs
            .clone()
            .ok_or_else(|| ClientError::NotEstablished(name.to_string()))?;
        let message_id = MessageId::random(&mut self.rng);
        let recipient = MailboxPublicKey::from_bytes(&theirs.key)?;
        let identity = self.identity();
        let mut fragments = Vec::new();
        for f in fragment_message(message_id, bytes)? {
            let dedup = DedupId::random(&mut self.rng);
            let envelope = Envelope::seal(
                &mut self.crypto_rng,
                &recipient,
                &identity,
                OuterFields {
                    mailbox_id: MailboxId(theirs.id),
                    access_token: AccessToken(theirs.access),
                    dedup_id: dedup,
                    expires_at: expires_ms.map(UnixTime),
                    ack_surb: None,
                },
                &EnvelopeContent {
                    message_id,
                    fragment: f.info,
                    content: f.data,
                },
            )?;
            fragments.push(OutFragment {
                dedup: dedup.0,
                envelope: envelope.encode(),
                acked: false,
                attempts: 0,
                sent_ms: 0,
                route: Vec::new(),
                surb_route: Vec::new(),
            });
        }
        let id = self.next_id();
        // Finished messages beyond the bound are forgotten, oldest first.
        let max = self.state.settings.outbox_max.max(1);
        while self.state.outbox.len() >= max {
            match self.state.outbox.iter().position(|o| !active(o.state)) {
                Some(p) => {
                    self.state.outbox.remove(p);
                }
                None => break,
            }
        }
        self.state.outbox.push(Outgoing {
            id,
            contact: name.to_string(),
            kind,
            message_id: message_id.0,
            state: if release_ms.is_some() {
                OutState::Scheduled
            } else {
                OutState::Sending
            },
            created_ms: self.now,
            release_ms,
            expires_ms,
            fragments,
            holds: Vec::new(),
            retransmissions: 0,
            len,
        });
        Ok(id)
    }

    /// Builds the deposit packet of fragment `f` of outgoing `id`, for keys of `at_ms`'s epoch:
    /// (edge, packet, route).
    pub(super) fn deposit_packet(
        &mut self,
        dir: &Directory,
        id: u64,
        f: usize,
        at_ms: u64,
    ) -> Result<(NodeId, Vec<u8>, Vec<NodeId>)> {
        let o = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .ok_or(ClientError::UnknownScheduled(id))?;
        let name = o.contact.clone();
        let frag = o
            .fragments
            .get(f)
            .ok_or(ClientError::UnknownScheduled(id))?
            .clone();
        let contact = self.contact(&name)?;
        let mine = contact.mine.clone();
        let start = contact.deposit_replica.clone();
        let theirs = contact
            .theirs
            .clone()
            .ok_or_else(|| ClientError::NotEstablished(name.clone()))?;
        let epoch = epoch_at(at_ms);
        let mut envelope = Envelope::decode(&frag.envelope)?;
        envelope.outer.ack_surb = Some(self.new_surb(
            dir,
            &mine,
            frag.attempts,
            SurbPurpose::DepositAck {
                out: id,
                fragment: f,
            },
            epoch,
            at_ms + SURB_TTL_MS,
        )?);
        let target = MailboxId(theirs.id);
        let node = Self::peer_replica_from(dir, &theirs, start.as_deref(), frag.attempts)?;
        let route = self.route(dir, epoch, &node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let plaintext = FinalMessage::Deposit(envelope).encode()?;
        let packet = self.codec.build_packet(
            &mut self.crypto_rng,
            &route,
            &delays,
            DestinationAddress::mailbox(&target),
            &plaintext,
        )?;
        let nodes: Vec<NodeId> = route.iter().map(|h| h.node).collect();
        let edge = nodes.first().copied().unwrap_or(node);
        Ok((edge, packet, nodes))
    }

    /// Messages to `contact` sent and not yet stored.
    fn in_flight(&self, contact: &str) -> usize {
        self.state
            .outbox
            .iter()
            .filter(|o| {
                o.contact == contact
                    && o.state == OutState::Sending
                    && o.fragments.iter().any(|f| f.attempts > 0)
            })
            .count()
    }

    /// Sends waiting messages, oldest first, as far as each contact's window allows.
    pub(super) fn pump(&mut self) -> Result<()> {
        let window = self.state.settings.olm_window.max(1);
        let mut room: std::collections::BTreeMap<String, usize> = Default::default();
        let mut due = Vec::new();
        for o in &self.state.outbox {
            if o.state != OutState::Sending || o.fragments.iter().any(|f| f.attempts > 0) {
                continue;
            }
            let left = room
                .entry(o.contact.clone())
                .or_insert_with(|| window.saturating_sub(self.in_flight(&o.contact)));
            if *left > 0 {
                *left -= 1;
                due.push(o.id);
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        let mut items = Vec::new();
        for id in due {
            if let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) {
                items.extend((0..o.fragments.len()).map(|f| (id, f)));
            }
        }
        let result = self.dir().and_then(|dir| self.send_many(&dir, items));
        if result.is_err() {
            self.pump_blocked_until = self
                .now
                .saturating_add(self.state.settings.retransmit_after_ms);
        }
        result
    }

    /// Builds the deposit packets of (outgoing id, fragment) pairs, queues them for their
    /// edges and records each send.
    fn send_many(&mut self, dir: &Directory, items: Vec<(u64, usize)>) -> Result<()> {
        let now = self.now;
        for (id, f) in items {
            let (edge, packet, route) = self.deposit_packet(dir, id, f, now)?;
            self.push(Output::Transmit { edge, packet });
            let surb_route = self.last_surb_route.clone();
            let Some(o) = self
                .out_index(id)
                .and_then(|i| self.state.outbox.get_mut(i))
            else {
                continue;
            };
            if let Some(fr) = o.fragments.get_mut(f) {
                if fr.attempts > 0 {
                    o.retransmissions = o.retransmissions.saturating_add(1);
                }
                fr.attempts = fr.attempts.saturating_add(1);
                fr.sent_ms = now;
                fr.route = route.iter().map(|n| hex::encode(n.0)).collect();
                fr.surb_route = surb_route;
            }
        }
        Ok(())
    }

    /// Decides what is due for a resend at `now`: marks as failed what has had `attempts_max`
    /// sends (with a notice), charges the relays of lost routes, and returns per outgoing
    /// message the fragments, holds and cancels to send again.
    pub(super) fn plan_retransmissions(&mut self, now: u64) -> Vec<Resend> {
        self.at(now);
        let after = self.state.settings.retransmit_after_ms;
        let max = self.state.settings.attempts_max;
        let mut failed = Vec::new();
        let mut lost: Vec<Vec<String>> = Vec::new();
        let mut work: Vec<Resend> = Vec::new();
        for o in &self.state.outbox {
            let mut frags = Vec::new();
            let mut holds = Vec::new();
            let mut cancels = Vec::new();
            match o.state {
                OutState::Sending | OutState::Scheduled | OutState::Held => {
                    let released = o.release_ms.is_none_or(|r| now >= r + RELEASE_GRACE_MS);
                    for (i, f) in o.fragments.iter().enumerate() {
                        if f.acked
                            || f.attempts == 0
                            || !released
                            || now < f.sent_ms.saturating_add(after)
                        {
                            continue;
                        }
                        if f.attempts >= max {
                            failed.push(o.id);
                            break;
                        }
                        // Every relay of the unacknowledged routes (forward and ack), the
                        // edge included, loses a point; the destination is not a relay.
                        let mut relays: Vec<String> = f
                            .route
                            .iter()
                            .take(f.route.len().saturating_sub(1))
                            .cloned()
                            .collect();
                        relays.extend(f.surb_route.iter().cloned());
                        lost.push(relays);
                        frags.push(i);
                    }
                    if o.state == OutState::Scheduled && o.release_ms.is_some_and(|r| now < r) {
                        for (i, h) in o.holds.iter().enumerate() {
                            if h.parts_acked.iter().all(|a| *a)
                                || now < h.sent_ms.saturating_add(after)
                            {
                                continue;
                            }
                            if h.attempts >= max {
                                failed.push(o.id);
                                break;
                            }
                            holds.push(i);
                        }
                    }
                }
                OutState::Cancelling => {
                    for (i, h) in o.holds.iter().enumerate() {
                        if !h.cancel_acked && now >= h.sent_ms.saturating_add(after) {
                            if h.attempts >= max {
                                failed.push(o.id);
                                break;
                            }
                            cancels.push(i);
                        }
                    }
                }
                _ => {}
            }
            if !frags.is_empty() || !holds.is_empty() || !cancels.is_empty() {
                work.push((o.id, frags, holds, cancels));
            }
        }
        for relays in lost {
            self.record_health(&relays, false);
        }
        for id in failed {
            if let Some(o) = self
                .out_index(id)
                .and_then(|i| self.state.outbox.get_mut(i))
                && o.state != OutState::Failed
            {
                o.state = OutState::Failed;
                let (contact, kind) = (o.contact.clone(), o.kind);
                self.notice(
                    "failed",
                    Some(&contact),
                    Some(id),
                    format!("gave up on {kind:?} message {id} after {max} attempts"),
                );
            }
            work.retain(|w| w.0 != id);
        }
        work
    }

    /// Retransmits what [`Self::plan_retransmissions`] finds due.
    pub(super) fn retransmit_due(&mut self) -> Result<()> {
        let work = self.plan_retransmissions(self.now);
        if work.is_empty() {
            return Ok(());
        }
        let dir = self.dir()?;
        for (id, frags, holds, cancels) in work {
            if !frags.is_empty() {
                self.send_many(&dir, frags.into_iter().map(|f| (id, f)).collect())?;
            }
            if !holds.is_empty() {
                self.send_holds(&dir, id, &holds)?;
            }
            if !cancels.is_empty() {
                self.send_cancels(&dir, id, &cancels)?;
            }
        }
        Ok(())
    }

    /// Queues the receipts that are due as messages to their contacts and sends what the
    /// windows allow.
    pub(super) fn send_receipts(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.state.receipts_due)
            .into_iter()
            .partition(|r| r.due_ms <= now);
        self.state.receipts_due = later;
        for r in due {
            let (name, kind, ids) = (r.contact, r.kind, r.ids);
            let app = AppMessage::Receipt { kind, of: ids };
            // A contact we can no longer write to simply gets no receipt.
            let _ = self.queue(&name, OutKind::Receipt, &app, None, None);
        }
        // Failures are retried at the next timeout.
        let _ = self.pump();
    }

    /// Sends one cover packet at `now`: a dummy deposit, sealed by us to one of our own
    /// mailboxes, padded like every envelope and acknowledged into another of our mailboxes:
    /// indistinguishable from a real one on the wire and at the mailbox node; dropped on
    /// receipt.
    pub fn send_cover(&mut self, now: u64) -> Result<()> {
        self.at(now);
        let boxes = self.owned_mailboxes();
        // Not into a mailbox the account's devices share (sync, link): the other devices
        // would take it for theirs. Its ack may go there.
        let shared: Vec<[u8; 32]> = self
            .state
            .contacts
            .iter()
            .filter(|c| super::is_reserved(&c.name))
            .map(|c| c.mine.id)
            .collect();
        let targets: Vec<&crate::state::OwnedMailbox> =
            boxes.iter().filter(|m| !shared.contains(&m.id)).collect();
        if targets.is_empty() {
            return Ok(());
        }
        let chosen = self.rng.random_range(0..targets.len());
        let m = targets
            .get(chosen)
            .map(|m| (*m).clone())
            .ok_or(ClientError::Full("mailboxes"))?;
        let pick = boxes.iter().position(|b| b.id == m.id).unwrap_or(chosen);
        // Its ack goes back into another of our mailboxes, as a message's ack comes back into
        // ours while the message went into the contact's: a node holding the deposit's
        // mailbox cannot tell cover by its ack (security review finding 7).
        let ack_box = if boxes.len() > 1 {
            let other = self.rng.random_range(0..boxes.len() - 1);
            boxes.get(if other >= pick { other + 1 } else { other })
        } else {
            boxes.get(pick)
        }
        .cloned()
        .ok_or(ClientError::Full("mailboxes"))?;
        let dir = self.dir()?;
        let epoch = epoch_at(now);
        let secret = MailboxSecretKey::from_bytes(&m.secret)?;
        let mut filler = vec![0u8; 1200];
        self.crypto_rng.fill_bytes(&mut filler);
        let message_id = MessageId::random(&mut self.rng);
        let fragment = fragment_message(message_id, &filler)?
            .into_iter()
            .next()
            .ok_or(ClientError::Full("fragments"))?;
        // Like a message's first attempt: into the first replica, acked into the first.
        let surb = self.new_surb(
            &dir,
            &ack_box,
            0,
            SurbPurpose::Cover,
            epoch,
            now + SURB_TTL_MS,
        )?;
        let identity = self.identity();
        let dedup_id = DedupId::random(&mut self.rng);
        let envelope = Envelope::seal(
            &mut self.crypto_rng,
            &secret.public_key(),
            &identity,
            OuterFields {
                mailbox_id: MailboxId(m.id),
                access_token: AccessToken(m.access),
                dedup_id,
                expires_at: None,
                ack_surb: Some(surb),
            },
            &EnvelopeContent {
                message_id,
                fragment: fragment.info,
                content: fragment.data,
            },
        )?;
        let node = super::routes::own_replica(&dir, &m, 0);
        let route = self.route(&dir, epoch, &node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let packet = self.codec.build_packet(
            &mut self.crypto_rng,
            &route,
            &delays,
            DestinationAddress::mailbox(&MailboxId(m.id)),
            &FinalMessage::Deposit(envelope).encode()?,
        )?;
        let edge = route.first().map_or(node, |h| h.node);
        self.push(Output::Transmit { edge, packet });
        self.state.cover_sent = self.state.cover_sent.saturating_add(1);
        self.save();
        Ok(())
    }
}
