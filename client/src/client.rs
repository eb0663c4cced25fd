//! The client's driver: the I/O around [`ClientCore`] — HTTP to the directory, edge relays
//! and mailbox nodes, the encrypted vault, the clock. Every decision is the core's; this file
//! only carries its outputs out and what happened back in. One [`Client`] holds the home
//! directory's lock while it lives.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use rand::rngs::StdRng;
use serde_json::Value;
use whispr_protocol::consensus::Network;
use whispr_protocol::{NodeId, UnixTime};

use crate::core::{ClientCore, ContactInfo, OutgoingInfo, Output, Received, SendOptions};
use crate::error::{ClientError, Result};
use crate::invite::Invitation;
use crate::net::{Net, StoredMessage};
use crate::state::{Notice, OutState, OwnedMailbox, Settings};
use crate::vault::{KdfParams, LockGuard, Vault};

/// A directory fetched longer ago than this is fetched again before it is used.
const DIRECTORY_MAX_AGE_MS: u64 = 10_000;
/// Packets per ingress request.
const SUBMIT_BATCH: usize = 64;

/// Milliseconds since the Unix epoch: the client's only clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn os_rng() -> StdRng {
    rand::make_rng()
}

/// The client.
pub struct Client {
    vault: Vault,
    _lock: LockGuard,
    core: ClientCore,
    net: Net,
    /// One HTTP client per own mailbox (see [`Client::net_for`]).
    mailbox_nets: BTreeMap<[u8; 32], Net>,
    /// When the core's directory was fetched, ms.
    directory_at: Option<u64>,
    /// Epoch of the newest consensus accepted (an older one is refused: replay).
    consensus_epoch: Option<u64>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Creates a client in `home` (which must not have one), encrypted under `passphrase`.
    pub fn init(
        home: &Path,
        passphrase: &[u8],
        directory_url: &str,
        settings: Settings,
        kdf: KdfParams,
    ) -> Result<Client> {
        let vault = Vault::create(home, passphrase, kdf)?;
        let lock = vault.lock()?;
        let mut c = Client {
            vault,
            _lock: lock,
            core: ClientCore::new(directory_url, settings, os_rng(), os_rng()),
            net: Net::new()?,
            mailbox_nets: BTreeMap::new(),
            directory_at: None,
            consensus_epoch: None,
        };
        c.save()?;
        Ok(c)
    }

    /// Opens the client in `home`.
    pub fn open(home: &Path, passphrase: &[u8]) -> Result<Client> {
        let (vault, _) = Vault::open(home, passphrase)?;
        Self::reopen(&vault)
    }

    /// Opens the client again with an already derived key (takes the lock, reloads).
    pub fn reopen(vault: &Vault) -> Result<Client> {
        let lock = vault.lock()?;
        let bytes = vault.load(&lock)?;
        let core = ClientCore::decode_state(&bytes, now_ms(), os_rng(), os_rng())?;
        Ok(Client {
            vault: vault.clone(),
            _lock: lock,
            core,
            net: Net::new()?,
            mailbox_nets: BTreeMap::new(),
            directory_at: None,
            consensus_epoch: None,
        })
    }

    /// The opened vault (to reopen without deriving the key again).
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The core (read-only: its state and decisions).
    pub fn core(&self) -> &ClientCore {
        &self.core
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        self.core.settings()
    }

    /// Changes the settings.
    pub fn settings_mut(&mut self) -> &mut Settings {
        self.core.settings_mut()
    }

    /// Writes the state (encrypted, atomically).
    pub fn save(&mut self) -> Result<()> {
        let bytes = self.core.encode_state()?;
        self.vault.save(&self._lock, &bytes)
    }

    /// Gives the core a directory no older than [`DIRECTORY_MAX_AGE_MS`].
    async fn refresh_directory(&mut self) -> Result<()> {
        let now = now_ms();
        if self
            .directory_at
            .is_some_and(|at| now.saturating_sub(at) < DIRECTORY_MAX_AGE_MS)
        {
            return Ok(());
        }
        let url = self.core.directory_url().to_string();
        let d = match self.settings().network.as_deref() {
            Some(text) => {
                let network = Network::parse(text)?;
                // The mirror first, then each pinned authority.
                let mut urls = vec![url];
                urls.extend(
                    network
                        .authorities()
                        .iter()
                        .map(|a| format!("{}/v1/consensus", a.url.trim_end_matches('/'))),
                );
                let d = self
                    .net
                    .directory(&urls, &network, UnixTime(now), self.consensus_epoch)
                    .await?;
                self.consensus_epoch = d.consensus().map(|c| c.epoch);
                d
            }
            None => self.net.unpinned_directory(&url, UnixTime(now)).await?,
        };
        self.core.set_directory(std::sync::Arc::new(d));
        self.directory_at = Some(now);
        Ok(())
    }

    /// The directory the client routes by (fetched now if the one held is too old): its node
    /// count, and what it keeps of the consensus (signers, epoch) when a network is pinned.
    pub async fn directory_summary(
        &mut self,
    ) -> Result<(usize, Option<whispr_protocol::consensus::ConsensusInfo>)> {
        self.refresh_directory().await?;
        Ok(self
            .core
            .directory()
            .map(|d| (d.len(), d.consensus().copied()))
            .unwrap_or((0, None)))
    }

    /// The HTTP client for mailbox `id`: one per mailbox, with its own connections, so that
    /// no two of a user's mailboxes share a connection by which their node could link them
    /// (security review finding 8).
    fn net_for(&mut self, id: &[u8; 32]) -> Result<Net> {
        if let Some(n) = self.mailbox_nets.get(id) {
            return Ok(n.clone());
        }
        let n = Net::new()?;
        self.mailbox_nets.insert(*id, n.clone());
        Ok(n)
    }

    fn mailbox(&self, id: &[u8; 32]) -> Option<OwnedMailbox> {
        self.core
            .owned_mailboxes()
            .into_iter()
            .find(|m| m.id == *id)
    }

    /// A valid session token for mailbox `m` (logs in when there is none or it is about to
    /// expire).
    async fn token(&mut self, m: &OwnedMailbox) -> Result<String> {
        if let Some(t) = &m.token
            && m.token_expires_ms > now_ms() + 60_000
        {
            return Ok(t.clone());
        }
        let (token, expires) = self.net_for(&m.id)?.login(m).await?;
        self.core.set_token(&m.id, Some((token.clone(), expires)));
        Ok(token)
    }

    /// Carries out what the core asked for, in order: packets to their edges (batched),
    /// saves, acknowledgements.
    async fn drive(&mut self) -> Result<()> {
        let mut packets: BTreeMap<NodeId, Vec<Vec<u8>>> = BTreeMap::new();
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Transmit { edge, packet } => {
                    packets.entry(edge).or_default().push(packet);
                }
                Output::Save => self.save()?,
                Output::Ack { mailbox, up_to } => {
                    if let Some(m) = self.mailbox(&mailbox)
                        && let Ok(token) = self.token(&m).await
                    {
                        // A lost ack only means the messages are read again (and dropped as
                        // duplicates).
                        if let Ok(net) = self.net_for(&m.id) {
                            let _ = net.ack(&m, &token, up_to).await;
                        }
                    }
                }
            }
        }
        self.submit(packets).await;
        // Tokens got while acknowledging are kept.
        self.save()
    }

    async fn submit(&mut self, packets: BTreeMap<NodeId, Vec<Vec<u8>>>) {
        for (edge, all) in packets {
            let api = self
                .core
                .directory()
                .and_then(|d| d.get(&edge))
                .and_then(|d| d.api_url.clone());
            let Some(api) = api else {
                self.core.note_refused(
                    "no_api_address",
                    u64::try_from(all.len()).unwrap_or(u64::MAX),
                );
                continue;
            };
            for batch in all.chunks(SUBMIT_BATCH) {
                match self.net.submit(&api, batch).await {
                    Ok(results) => {
                        for r in results.iter().filter(|r| *r != "ok") {
                            self.core.note_refused(r, 1);
                        }
                    }
                    Err(e) => {
                        let reason = match e {
                            ClientError::Node { status, kind, .. } => format!("{status} {kind}"),
                            _ => "unreachable".to_string(),
                        };
                        self.core
                            .note_refused(&reason, u64::try_from(batch.len()).unwrap_or(u64::MAX));
                    }
                }
            }
        }
    }

    /// Creates a mailbox for a new contact and returns the invitation text for them. With
    /// `inline_prekey` false the invitation is shorter and the contact fetches a one-time key
    /// anonymously through the mesh.
    pub async fn invite(&mut self, name: Option<&str>, inline_prekey: bool) -> Result<String> {
        self.refresh_directory().await?;
        let mut plan = self.core.prepare_invite(now_ms(), name, inline_prekey)?;
        if plan.mailbox.api_url.is_empty() {
            return Err(ClientError::NoRoute(
                "a node publishes no API address".to_string(),
            ));
        }
        let net = self.net_for(&plan.mailbox.id)?;
        net.create_mailbox(&plan.mailbox, plan.mailbox_key, plan.retention_ms)
            .await?;
        let (token, expires) = net.login(&plan.mailbox).await?;
        net.put_prekeys(&plan.mailbox, &token, &plan.prekeys)
            .await?;
        plan.mailbox.token = Some(token);
        plan.mailbox.token_expires_ms = expires;
        let text = self.core.commit_invite(now_ms(), plan);
        self.drive().await?;
        Ok(text)
    }

    /// Accepts an invitation: creates our mailbox for the contact, starts the Olm session and
    /// sends the hello that tells them where to answer.
    pub async fn accept(&mut self, text: &str, name: &str) -> Result<u64> {
        self.refresh_directory().await?;
        let plan = self.core.accept_start(now_ms(), text, name)?;
        let name = plan.name.clone();
        let otk = match self.accept_mailbox(&plan).await {
            Ok(k) => k,
            Err(e) => {
                self.core.abandon_accept(&name);
                return Err(e);
            }
        };
        let id = self
            .core
            .accept_finish(now_ms(), &name, &plan.invitation, otk);
        if id.is_err() {
            self.core.abandon_accept(&name);
        }
        self.drive().await?;
        id
    }

    /// Creates our mailbox of an acceptance and gets the inviter's one-time key.
    async fn accept_mailbox(&mut self, plan: &crate::core::AcceptPlan) -> Result<[u8; 32]> {
        if plan.mailbox.api_url.is_empty() {
            return Err(ClientError::NoRoute(
                "a node publishes no API address".to_string(),
            ));
        }
        self.net_for(&plan.mailbox.id)?
            .create_mailbox(&plan.mailbox, plan.mailbox_key, plan.retention_ms)
            .await?;
        match plan.invitation.one_time_key {
            Some(k) => Ok(k),
            None => self.fetch_prekey(&plan.name, &plan.invitation).await,
        }
    }

    /// Fetches one of the inviter's one-time keys anonymously: a prekey request through the
    /// mesh whose answer comes back through a SURB into our new mailbox.
    async fn fetch_prekey(&mut self, name: &str, inv: &Invitation) -> Result<[u8; 32]> {
        for _attempt in 0..3 {
            self.refresh_directory().await?;
            let surb_id = self.core.request_prekey(now_ms(), name, inv)?;
            self.drive().await?;
            let deadline = now_ms() + 10_000;
            while now_ms() < deadline {
                self.sync(Duration::from_millis(1000)).await?;
                if let Some(key) = self.core.take_prekey_reply(&surb_id, inv) {
                    return key;
                }
            }
        }
        Err(ClientError::Unreachable {
            node: "mailbox",
            reason: "no prekey bundle came back through the mesh".to_string(),
        })
    }

    /// Sends several (contact, text) messages at once: each is encrypted and fragmented as by
    /// [`Client::send`], the packets go out in shared requests (within each contact's
    /// `olm_window`; the rest at the next [`Client::sync`]) and the state is saved once.
    /// For bursts (and the end-to-end benchmark); their local ids.
    pub async fn send_batch(&mut self, messages: &[(String, String)]) -> Result<Vec<u64>> {
        self.refresh_directory().await?;
        let ids = self.core.send_batch(now_ms(), messages);
        self.drive().await?;
        ids
    }

    /// Sends `text` to contact `name`; the local id. Returns once the packets are handed to
    /// an edge relay (or the holds to the mesh): use [`Client::wait_stored`] or
    /// [`Client::sync`] for the acks.
    pub async fn send(&mut self, name: &str, text: &str, opts: SendOptions) -> Result<u64> {
        self.refresh_directory().await?;
        let id = self.core.send(now_ms(), name, text, opts);
        self.drive().await?;
        id
    }

    /// Cancels scheduled send `id` before its release: each timer node holding a part of it
    /// is sent the cancel capability.
    pub async fn cancel(&mut self, id: u64) -> Result<()> {
        self.refresh_directory().await?;
        let result = self.core.cancel(now_ms(), id);
        self.drive().await?;
        result
    }

    /// One round: polls every mailbox (waiting up to `wait` for something), processes what
    /// arrived (acks, messages, receipts), acknowledges it to the nodes, sends receipts and
    /// retransmits what is due. The state is saved.
    pub async fn sync(&mut self, wait: Duration) -> Result<()> {
        let boxes = self.core.owned_mailboxes();
        let mut tokens = Vec::new();
        let mut nets = Vec::new();
        for m in &boxes {
            tokens.push(self.token(m).await);
            nets.push(self.net_for(&m.id)?);
        }
        // Long-poll every mailbox at once; as soon as one has something, take what the others
        // return within 5 ms and drop the rest (they are polled again next round), so that
        // a busy mailbox is not held back by the idle ones' waits.
        let mut pending: futures_util::stream::FuturesUnordered<_> = boxes
            .iter()
            .zip(&tokens)
            .zip(nets)
            .enumerate()
            .map(|(i, ((m, t), net))| {
                let t = t.as_ref().ok().cloned();
                async move {
                    let r = match t {
                        Some(t) => net.poll(m, &t, wait).await,
                        None => Err(ClientError::Unreachable {
                            node: "mailbox",
                            reason: "login failed".to_string(),
                        }),
                    };
                    (i, r)
                }
            })
            .collect();
        let mut polls: Vec<Option<Result<Vec<StoredMessage>>>> =
            boxes.iter().map(|_| None).collect();
        while let Some((i, r)) = pending.next().await {
            let got = matches!(&r, Ok(m) if !m.is_empty());
            if let Some(slot) = polls.get_mut(i) {
                *slot = Some(r);
            }
            if got && !wait.is_zero() {
                // The mailboxes that have something answer within a round trip; the idle ones
                // sit in their long poll. (Without a wait, every poll returns at once.)
                while let Ok(Some((i, r))) =
                    tokio::time::timeout(Duration::from_millis(5), pending.next()).await
                {
                    if let Some(slot) = polls.get_mut(i) {
                        *slot = Some(r);
                    }
                }
                break;
            }
        }
        drop(pending);
        let mut first_error = None;
        let mut failures = 0usize;
        let polled = polls.iter().filter(|p| p.is_some()).count();
        let now = now_ms();
        for (m, result) in boxes.iter().zip(polls) {
            let Some(result) = result else { continue };
            match result {
                Ok(messages) => self.core.handle_fetched(now, &m.id, &messages),
                Err(e) => {
                    if let ClientError::Node { status: 401, .. } = e {
                        self.core.set_token(&m.id, None);
                    }
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        self.drive().await?;
        self.tick().await?;
        // One unreachable node must not stop the others from being read; only when every
        // mailbox failed is the round an error.
        match first_error {
            Some(e) if failures == polled => Err(e),
            _ => Ok(()),
        }
    }

    /// Stream endpoints (mailbox id hex, `ws://` URL with a fresh ticket) of every mailbox we
    /// own except those in `skip`, for [`crate::net::run_stream`]; logs in where needed.
    pub async fn stream_endpoints(&mut self, skip: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for m in self.core.owned_mailboxes() {
            if skip.contains(&hex::encode(m.id)) {
                continue;
            }
            let token = self.token(&m).await?;
            let ticket = self.net_for(&m.id)?.stream_ticket(&m, &token).await?;
            out.push((hex::encode(m.id), crate::net::stream_url(&m, &ticket)?));
        }
        self.save()?;
        Ok(out)
    }

    /// Processes messages pushed by mailbox streams (mailbox id hex, message), like a poll
    /// round: durable first, then acknowledged to the nodes; then receipts, retransmissions
    /// and queued sends.
    pub async fn ingest(&mut self, pushed: Vec<(String, StoredMessage)>) -> Result<()> {
        let now = now_ms();
        for (mailbox, msg) in pushed {
            let mut id = [0u8; 32];
            if hex::decode_to_slice(&mailbox, &mut id).is_ok() {
                self.core.handle_fetched(now, &id, &[msg]);
            }
        }
        self.drive().await?;
        self.tick().await
    }

    /// Housekeeping without polling: sends due receipts, retransmits, sends what the windows
    /// allow, forgets what expired; saves.
    pub async fn tick(&mut self) -> Result<()> {
        let now = now_ms();
        let result = if self.core.poll_timeout().is_some_and(|t| t <= now) {
            match self.refresh_directory().await {
                Ok(()) => self.core.handle_timeout(now),
                Err(e) => Err(e),
            }
        } else {
            self.core.handle_timeout(now)
        };
        self.drive().await?;
        result
    }

    /// Cover packets sent by this client so far.
    pub fn cover_sent(&self) -> u64 {
        self.core.cover_sent()
    }

    /// Received messages not shown yet, oldest first; marks them shown and, if the user sends
    /// read receipts, queues them (sent at the next [`Client::sync`] or [`Client::flush`]).
    pub fn take_unread(&mut self) -> Vec<Received> {
        self.core.take_unread()
    }

    /// Sends queued receipts and saves.
    pub async fn flush(&mut self) -> Result<()> {
        self.tick().await
    }

    /// Notices (delivery, failures, identity changes, …) not shown yet; clears them.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        self.core.take_notices()
    }

    /// The local history of `name` (disappearing messages past their time are gone).
    pub fn history(&self, name: &str) -> Vec<Received> {
        self.core.history(name, now_ms())
    }

    /// Waits (syncing) until outgoing `id` leaves the sending state, or `timeout`; its state.
    pub async fn wait_stored(&mut self, id: u64, timeout: Duration) -> Result<OutState> {
        let deadline =
            now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        loop {
            let state = self
                .core
                .out_state(id)
                .ok_or(ClientError::UnknownScheduled(id))?;
            if !matches!(
                state,
                OutState::Sending | OutState::Scheduled | OutState::Cancelling
            ) || now_ms() >= deadline
            {
                return Ok(state);
            }
            self.sync(Duration::from_millis(self.core.settings().poll_wait_ms))
                .await?;
        }
    }

    /// Contacts and pending invitations.
    pub fn contacts(&self) -> Vec<ContactInfo> {
        self.core.contacts()
    }

    /// The safety number shared with `name` (see [`ClientCore::safety_number`]).
    pub fn safety_number(&self, name: &str) -> Result<String> {
        self.core.safety_number(name)
    }

    /// Marks `name` as verified (after comparing safety numbers).
    pub fn set_verified(&mut self, name: &str) -> Result<()> {
        self.core.set_verified(name)?;
        self.save()
    }

    /// Outgoing messages still in flight (sending, scheduled, cancelling) and the last
    /// finished ones.
    pub fn status(&self) -> Vec<OutgoingInfo> {
        self.core.status()
    }

    /// Sends one cover packet: a dummy deposit, sealed by us to one of our own mailboxes,
    /// indistinguishable on the wire from a real one; dropped on receipt.
    pub async fn send_cover(&mut self) -> Result<()> {
        self.refresh_directory().await?;
        let result = self.core.send_cover(now_ms());
        self.drive().await?;
        result
    }

    /// What the mailbox node of our relationship with `name` still stores (its export,
    /// still sealed): the expiry time (ms) of each stored message. Lets a user check that a
    /// disappearing message is gone from the node.
    pub async fn stored_on_node(&mut self, name: &str) -> Result<Vec<u64>> {
        let m = self.core.contact_mailbox(name)?;
        let token = self.token(&m).await?;
        let v = self.net_for(&m.id)?.export(&m, &token).await?;
        self.save()?;
        Ok(v.get("messages")
            .unwrap_or(&Value::Null)
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.get("expires_at_ms").unwrap_or(&Value::Null).as_u64())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The identity keys (Ed25519, Curve25519) as hex, for display.
    pub fn identity_keys(&self) -> (String, String) {
        self.core.identity_keys()
    }

    /// Packets an edge relay did not take since this client was opened, by reason (a drop
    /// reason such as `rate_limited`, an HTTP status, or `unreachable`); they are retransmitted
    /// like lost ones.
    pub fn refused_packets(&self) -> &BTreeMap<String, u64> {
        self.core.refused_packets()
    }

    /// Ids of the own mailboxes (hex) — for tests that check what nodes store.
    pub fn mailbox_ids(&self) -> Vec<String> {
        self.core
            .owned_mailboxes()
            .iter()
            .map(|m| hex::encode(m.id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server that answers every request with an empty JSON object on a kept-alive
    /// connection and counts the connections it accepted.
    async fn counting_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                            if conn.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), count)
    }

    /// Security review finding 8: a node that sees two mailboxes' requests on one connection
    /// links them. Each mailbox has its own HTTP client, hence its own connections; the shared
    /// client (the control) does reuse one connection, which is what linked them before.
    #[tokio::test]
    async fn two_mailboxes_never_share_a_connection() {
        let home = tempfile::tempdir().unwrap();
        let kdf = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let mut c = Client::init(
            home.path(),
            b"pw",
            "http://127.0.0.1:9",
            Settings::default(),
            kdf,
        )
        .unwrap();
        let (url, count) = counting_server().await;
        for _ in 0..2 {
            let _ = c.net.submit(&url, &[]).await;
        }
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "the shared client keeps its connection"
        );
        for id in [[1u8; 32], [2u8; 32], [1u8; 32], [2u8; 32]] {
            let net = c.net_for(&id).unwrap();
            let _ = net.submit(&url, &[]).await;
        }
        assert_eq!(
            count.load(Ordering::SeqCst),
            3,
            "one more connection per mailbox, each kept for that mailbox only"
        );
    }
}
