//! The client's driver: the I/O around [`ClientCore`] — HTTP to the directory, edge relays
//! and mailbox nodes, the encrypted vault, the clock. Every decision is the core's; this file
//! only carries its outputs out and what happened back in. One [`Client`] holds the home
//! directory's lock while it lives.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use serde_json::Value;
use whispr_protocol::consensus::Network;
use whispr_protocol::{NodeId, UnixTime};

use crate::core::{
    BlockedInfo, ClientCore, ContactInfo, OutgoingInfo, Output, Received, Revoked, SendOptions,
};
use crate::error::{ClientError, Result};
use crate::invite::Invitation;
use crate::net::{Net, StoredMessage};
use crate::state::{Notice, OutState, OwnedMailbox, Replica, Settings};
use crate::vault::{KdfParams, LockGuard, Vault};

/// A directory fetched longer ago than this is fetched again before it is used.
const DIRECTORY_MAX_AGE_MS: u64 = 10_000;
/// Packets per ingress request.
const SUBMIT_BATCH: usize = 64;
/// A replica the mailbox could not be created on (it was down) is tried again this often.
const CREATE_RETRY_MS: u64 = 10_000;
/// When replicas missing their mailbox were last tried, ms, in this process (`recv --follow`
/// reopens its `Client` every round).
static CREATIONS_TRIED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Erasures of removed contacts' mailboxes that a replica has not confirmed are tried again
/// this often.
const ERASE_RETRY_MS: u64 = 10_000;
/// When those erasures were last tried, ms, in this process.
static ERASURES_TRIED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Milliseconds since the Unix epoch: the client's only clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The error of a client that pins no directory authority.
fn no_network() -> ClientError {
    ClientError::InvalidArgument(
        "no directory authorities pinned: this client accepts a directory only as a consensus \
         signed by the authorities of a network file (create the client with \
         `whispr init --network FILE`)"
            .to_string(),
    )
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
    /// Long polls still running from an earlier round, per mailbox (finding 8: a round that
    /// ends when one mailbox has something lets the others' polls run out on their own
    /// schedule instead of dropping them all at that instant, which linked them).
    in_flight: BTreeMap<[u8; 32], PollTask>,
}

/// A mailbox's long poll, running on its own: the replica polled and the outcome.
type PollTask = tokio::task::JoinHandle<(Replica, Result<Vec<StoredMessage>>)>;

impl Drop for Client {
    fn drop(&mut self) {
        for poll in self.in_flight.values() {
            poll.abort();
        }
    }
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
            in_flight: BTreeMap::new(),
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
            in_flight: BTreeMap::new(),
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
            // A directory nobody signed is refused from any source (issue 14): a client
            // without a pinned network has no directory, so it builds no route.
            None => return Err(no_network()),
        };
        self.core.set_directory(std::sync::Arc::new(d));
        self.directory_at = Some(now);
        Ok(())
    }

    /// Whether this client pins directory authorities (`Settings::network`): without, it
    /// accepts no directory and cannot send or receive.
    pub fn is_pinned(&self) -> bool {
        self.settings().network.is_some()
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

    /// The HTTP client for mailbox `id` (all its replicas): one per mailbox, with its own
    /// connections, so that no two of a user's mailboxes share a connection by which their
    /// node could link them (security review finding 8).
    fn net_for(&mut self, id: &[u8; 32]) -> Result<Net> {
        if let Some(n) = self.mailbox_nets.get(id) {
            return Ok(n.clone());
        }
        let n = Net::for_mailbox()?;
        self.mailbox_nets.insert(*id, n.clone());
        Ok(n)
    }

    fn mailbox(&self, id: &[u8; 32]) -> Option<OwnedMailbox> {
        self.core
            .owned_mailboxes()
            .into_iter()
            .find(|m| m.id == *id)
    }

    /// A valid session token for mailbox `m` on its replica `r` (logs in when there is none
    /// or it is about to expire).
    async fn token(&mut self, m: &OwnedMailbox, r: &Replica) -> Result<String> {
        if let Some(t) = &r.token
            && r.token_expires_ms > now_ms() + 60_000
        {
            return Ok(t.clone());
        }
        let (token, expires) = self.net_for(&m.id)?.login((m, r)).await?;
        self.core
            .set_replica_token(&m.id, &r.node, Some((token.clone(), expires)));
        // A new session: the node may have restarted since the last one (sessions live in
        // its memory), and with an empty disk, repaired from its peers, numbers its messages
        // anew; a cursor from before would skip the first ones. Read it from the start (it
        // serves only what this device has not acknowledged; what was seen is dropped).
        self.core.reset_cursor(&m.id, &r.node);
        Ok(token)
    }

    /// Creates mailbox `m` on its replica `r` (v2 create request naming the whole set), logs
    /// in there and uploads that replica's slice of the prekeys; records what succeeded in
    /// `m`. An error leaves the replica to be retried.
    async fn create_on(
        &mut self,
        m: &mut OwnedMailbox,
        node: [u8; 32],
        mailbox_key: [u8; 32],
        retention_ms: u64,
    ) -> Result<()> {
        let net = self.net_for(&m.id)?;
        let r = m
            .replica(&node)
            .cloned()
            .ok_or_else(|| ClientError::CorruptState("replica".to_string()))?;
        if r.api_url.is_empty() {
            return Err(ClientError::NoRoute(
                "a node publishes no API address".to_string(),
            ));
        }
        if !r.created {
            net.create_mailbox((m, &r), mailbox_key, retention_ms)
                .await?;
        }
        if let Some(slot) = m.replicas.iter_mut().find(|x| x.node == node) {
            slot.created = true;
        }
        if let Some(body) = &r.prekeys {
            let (token, expires) = net.login((m, &r)).await?;
            net.put_prekeys((m, &r), &token, body).await?;
            if let Some(slot) = m.replicas.iter_mut().find(|x| x.node == node) {
                slot.prekeys = None;
                slot.token = Some(token);
                slot.token_expires_ms = expires;
            }
        }
        Ok(())
    }

    /// Creates mailbox `m` on each of its replicas (at once); fails only when it could be
    /// created on none. Replicas that were down are retried later
    /// ([`Client::create_missing_replicas`]).
    async fn create_replicas(
        &mut self,
        m: &mut OwnedMailbox,
        mailbox_key: [u8; 32],
        retention_ms: u64,
    ) -> Result<()> {
        let mut first_error = None;
        for node in m.replica_nodes() {
            if let Err(e) = self.create_on(m, node, mailbox_key, retention_ms).await {
                first_error.get_or_insert(e);
            }
        }
        if m.replicas.iter().any(|r| r.created) {
            // Read from a replica that has it.
            if let Some(i) = m.replicas.iter().position(|r| r.created) {
                m.reading = i;
            }
            return Ok(());
        }
        Err(first_error.unwrap_or(ClientError::NoRoute(
            "no mailbox node to create the mailbox on".to_string(),
        )))
    }

    /// Retries, at most every [`CREATE_RETRY_MS`], creating own mailboxes on the replicas
    /// that were down when they were made (and uploading their prekeys there).
    async fn create_missing_replicas(&mut self) {
        use std::sync::atomic::Ordering;
        let missing = self.core.replicas_to_create();
        let now = now_ms();
        if missing.is_empty()
            || now.saturating_sub(CREATIONS_TRIED_AT.load(Ordering::Relaxed)) < CREATE_RETRY_MS
        {
            return;
        }
        CREATIONS_TRIED_AT.store(now, Ordering::Relaxed);
        for (m, node) in missing {
            let Ok(secret) = whispr_protocol::envelope::MailboxSecretKey::from_bytes(&m.secret)
            else {
                continue;
            };
            let key = secret.public_key().to_bytes();
            let retention = if m.retention_ms == 0 {
                self.settings().retention_ms
            } else {
                m.retention_ms
            };
            let mut copy = m.clone();
            if self
                .create_on(&mut copy, node, key, retention)
                .await
                .is_ok()
            {
                let uploaded = copy.replica(&node).is_some_and(|r| r.prekeys.is_none());
                self.core.set_replica_created(&m.id, &node, uploaded);
            }
        }
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
                Output::Ack {
                    mailbox,
                    node,
                    up_to,
                } => {
                    if let Some(m) = self.mailbox(&mailbox)
                        && let Some(r) = m.replica(&node).cloned()
                        && let Ok(token) = self.token(&m, &r).await
                    {
                        // A lost ack only means the messages are read again (and dropped as
                        // duplicates).
                        if let Ok(net) = self.net_for(&m.id) {
                            let _ = net.ack((&m, &r), &token, up_to).await;
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
        let mut mailbox = plan.mailbox.clone();
        self.create_replicas(&mut mailbox, plan.mailbox_key, plan.retention_ms)
            .await?;
        plan.mailbox = mailbox;
        let text = self.core.commit_invite(now_ms(), plan);
        self.drive().await?;
        Ok(text)
    }

    /// Accepts an invitation: creates our mailbox for the contact, starts the Olm session and
    /// sends the hello that tells them where to answer.
    pub async fn accept(&mut self, text: &str, name: &str) -> Result<u64> {
        self.refresh_directory().await?;
        let mut plan = self.core.accept_start(now_ms(), text, name)?;
        let name = plan.name.clone();
        let otk = match self.accept_mailbox(&mut plan).await {
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

    /// Creates our mailbox of an acceptance (on each replica that is up) and gets the
    /// inviter's one-time key.
    async fn accept_mailbox(&mut self, plan: &mut crate::core::AcceptPlan) -> Result<[u8; 32]> {
        let mut mailbox = plan.mailbox.clone();
        self.create_replicas(&mut mailbox, plan.mailbox_key, plan.retention_ms)
            .await?;
        self.core.mailbox_created(&mailbox);
        plan.mailbox = mailbox;
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

    /// The replica of `m` to read from now and a token there: the current one, or, when
    /// logging in there fails, the next ones of its set in turn (failover).
    async fn read_target(&mut self, m: &OwnedMailbox) -> Result<(OwnedMailbox, Replica, String)> {
        // The core's view: the replica read from may have changed since `m` was taken.
        let mut m = self.mailbox(&m.id).unwrap_or_else(|| m.clone());
        let mut first_error = None;
        for _ in 0..m.replicas.len().max(1) {
            let Some(r) = m.current().cloned() else { break };
            match self.token(&m, &r).await {
                Ok(token) => {
                    // As the core has it now (a login resets the cursor).
                    let m = self.mailbox(&m.id).unwrap_or(m);
                    let r = m.replica(&r.node).cloned().unwrap_or(r);
                    return Ok((m, r, token));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                    if self.core.fail_over(&m.id) == Some(r.node) {
                        break;
                    }
                    match self.mailbox(&m.id) {
                        Some(next) => m = next,
                        None => break,
                    }
                }
            }
        }
        Err(first_error.unwrap_or(ClientError::Unreachable {
            node: "mailbox",
            reason: "no replica".to_string(),
        }))
    }

    /// Polls each of `boxes` on the replica read from now (logging in, failing over when
    /// that fails), each on its own schedule ([`ClientCore::poll_schedule`]: its own start
    /// delay and wait within `wait`); as soon as one has something, takes what the others
    /// return within 5 ms and returns, so that a busy mailbox is not held back by the idle
    /// ones' waits. The idle ones' polls are not dropped: they run on to the end of their own
    /// wait and are taken by a later round (a mailbox with a poll in flight gets no new one),
    /// so no instant ends every mailbox's poll at once (security review finding 8). Per
    /// mailbox: the replica polled and the outcome (`None`: still in flight).
    async fn poll_all(
        &mut self,
        boxes: &[OwnedMailbox],
        wait: Duration,
    ) -> Vec<Option<(Replica, Result<Vec<StoredMessage>>)>> {
        // Polls of mailboxes no longer owned (removed, erased) are stopped.
        let owned: std::collections::BTreeSet<[u8; 32]> =
            self.core.owned_mailboxes().iter().map(|m| m.id).collect();
        self.in_flight.retain(|id, poll| {
            let keep = owned.contains(id);
            if !keep {
                poll.abort();
            }
            keep
        });
        let mut fresh = Vec::new();
        for m in boxes {
            if self.in_flight.contains_key(&m.id) {
                continue;
            }
            let target = self.read_target(m).await;
            let net = self.net_for(&m.id);
            // Not even logged in anywhere: charged to the replica read from.
            let fallback = m.current().cloned().unwrap_or_else(|| dummy(m));
            fresh.push((m.id, target, net, fallback));
        }
        // Each mailbox's poll starts after its own delay and waits its own time (finding 8:
        // polls started together link the mailboxes).
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let schedule = self.core.poll_schedule(fresh.len(), wait_ms);
        for ((id, target, net, fallback), (delay_ms, wait_ms)) in fresh.into_iter().zip(schedule) {
            let poll = tokio::spawn(async move {
                match (target, net) {
                    (Ok((m, r, t)), Ok(net)) => {
                        if delay_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        }
                        let got = net.poll((&m, &r), &t, Duration::from_millis(wait_ms)).await;
                        (r, got)
                    }
                    (Err(e), _) | (_, Err(e)) => (fallback, Err(e)),
                }
            });
            self.in_flight.insert(id, poll);
        }
        let sync_box = self.core.sync_mailbox();
        let mut waiting: Vec<(usize, [u8; 32], PollTask)> = boxes
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i, m.id, self.in_flight.remove(&m.id)?)))
            .collect();
        let mut polls: Vec<Option<(Replica, Result<Vec<StoredMessage>>)>> =
            boxes.iter().map(|_| None).collect();
        let mut put = |i: usize, outcome: std::result::Result<_, tokio::task::JoinError>| {
            if let (Some(slot), Some(m)) = (polls.get_mut(i), boxes.get(i)) {
                *slot = Some(outcome.unwrap_or_else(|_| {
                    (
                        m.current().cloned().unwrap_or_else(|| dummy(m)),
                        Err(ClientError::Unreachable {
                            node: "mailbox",
                            reason: "the poll stopped".to_string(),
                        }),
                    )
                }));
            }
        };
        while !waiting.is_empty() {
            let (outcome, k, _) =
                futures_util::future::select_all(waiting.iter_mut().map(|(_, _, p)| p)).await;
            let (i, _, _) = waiting.swap_remove(k);
            let got = matches!(&outcome, Ok((_, Ok(m))) if !m.is_empty());
            put(i, outcome);
            if got && !wait.is_zero() {
                // The mailboxes that have something answer within a round trip; the idle ones
                // sit in their long poll. (Without a wait, every poll returns at once.)
                while !waiting.is_empty() {
                    let next =
                        futures_util::future::select_all(waiting.iter_mut().map(|(_, _, p)| p));
                    let Ok((outcome, k, _)) =
                        tokio::time::timeout(Duration::from_millis(5), next).await
                    else {
                        break;
                    };
                    let (i, _, _) = waiting.swap_remove(k);
                    put(i, outcome);
                }
                // The sync mailbox's poll is awaited: what another device of the account did
                // (read a message, sent one) is known before the round shows anything.
                if let Some(k) = sync_box.and_then(|s| waiting.iter().position(|w| w.1 == s)) {
                    let (i, _, poll) = waiting.swap_remove(k);
                    put(i, poll.await);
                }
                break;
            }
        }
        // The others run on, to be taken by a later round.
        for (_, id, poll) in waiting {
            self.in_flight.insert(id, poll);
        }
        polls
    }

    /// One round: polls every mailbox on the replica read from now (waiting up to `wait` for
    /// something), processes what arrived (acks, messages, receipts), acknowledges it there,
    /// sends receipts and retransmits what is due. A replica that fails (an error, or no
    /// answer within [`crate::net::POLL_GRACE`] past the wait) is failed over: the next
    /// replica of the mailbox's set is read at once, from its own cursor. The state is saved.
    pub async fn sync(&mut self, wait: Duration) -> Result<()> {
        let boxes = self.core.owned_mailboxes();
        let polls = self.poll_all(&boxes, wait).await;
        let mut first_error = None;
        let mut failures = 0usize;
        let mut polled = 0usize;
        let mut failed_over = Vec::new();
        let now = now_ms();
        for (m, result) in boxes.iter().zip(polls) {
            let Some((r, result)) = result else { continue };
            polled += 1;
            match result {
                Ok(messages) => self
                    .core
                    .handle_fetched_from(now, &m.id, &r.node, &messages),
                Err(e) => {
                    if let ClientError::Node { status: 401, .. } = e {
                        // The session is gone (it expired, or the node restarted and lost
                        // its sessions, which live in memory): log in again and read the
                        // same replica now.
                        self.core.set_replica_token(&m.id, &r.node, None);
                        failed_over.push(m.id);
                    } else if matches!(&e, ClientError::Node { kind, .. } if kind == "bad_cursor") {
                        // The replica numbers anew (a lost disk, repaired from its peers):
                        // read it from the start, now.
                        self.core.reset_cursor(&m.id, &r.node);
                        failed_over.push(m.id);
                    } else if self.core.fail_over(&m.id).is_some_and(|n| n != r.node) {
                        failed_over.push(m.id);
                    } else {
                        failures += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        // The mailboxes whose replica failed are read from the next one now, without waiting:
        // failover within the round (and those whose session was gone, from the same one
        // after a new login). Bounded: each replica can be tried twice (a stale session, then
        // a fresh one) before the round gives up on the mailbox.
        let mut retry = failed_over;
        for _ in 0..2 * whispr_protocol::mailbox_api::REPLICAS_MAX {
            if retry.is_empty() {
                break;
            }
            let boxes: Vec<OwnedMailbox> = retry.iter().filter_map(|id| self.mailbox(id)).collect();
            retry = Vec::new();
            let polls = self.poll_all(&boxes, Duration::ZERO).await;
            let now = now_ms();
            for (m, result) in boxes.iter().zip(polls) {
                match result {
                    Some((r, Ok(messages))) => {
                        self.core
                            .handle_fetched_from(now, &m.id, &r.node, &messages);
                    }
                    Some((r, Err(ClientError::Node { status: 401, .. }))) if r.token.is_some() => {
                        // A session from before the node restarted: log in again.
                        self.core.set_replica_token(&m.id, &r.node, None);
                        retry.push(m.id);
                    }
                    Some((r, Err(ClientError::Node { kind, .. })))
                        if kind == "bad_cursor" && r.cursor != 0 =>
                    {
                        // The replica renumbered (it lost its disk): read it from the start.
                        self.core.reset_cursor(&m.id, &r.node);
                        retry.push(m.id);
                    }
                    Some((r, Err(e))) => {
                        if self.core.fail_over(&m.id).is_some_and(|n| n != r.node) {
                            retry.push(m.id);
                        } else {
                            failures += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                    None => {}
                }
            }
        }
        if !retry.is_empty() {
            failures += retry.len();
            first_error.get_or_insert(ClientError::Unreachable {
                node: "mailbox",
                reason: "no replica answered".to_string(),
            });
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

    /// Whether long polls of an earlier round are still running (a later round takes them).
    pub fn polls_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Stream endpoints (a tag `mailbox id hex/node id hex` for [`Client::ingest`], `ws://`
    /// URL with a fresh ticket) of every mailbox we own except those in `skip` (mailbox ids
    /// hex), on the replica read from now, for [`crate::net::run_stream`]; logs in where
    /// needed, and fails over to the next replica where that or the ticket fails. A mailbox
    /// with no replica reachable is left out (tried again next time).
    pub async fn stream_endpoints(&mut self, skip: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for m in self.core.owned_mailboxes() {
            if skip.contains(&hex::encode(m.id)) {
                continue;
            }
            for _ in 0..m.replicas.len().max(1) {
                let Ok((m, r, token)) = self.read_target(&m).await else {
                    break;
                };
                let ticket = match self.net_for(&m.id)?.stream_ticket((&m, &r), &token).await {
                    Ok(t) => t,
                    Err(_) => {
                        if self.core.fail_over(&m.id) == Some(r.node) {
                            break;
                        }
                        continue;
                    }
                };
                out.push((
                    format!("{}/{}", hex::encode(m.id), hex::encode(r.node)),
                    crate::net::stream_url((&m, &r), &ticket)?,
                ));
                break;
            }
        }
        self.save()?;
        Ok(out)
    }

    /// Processes messages pushed by mailbox streams (the stream's tag from
    /// [`Client::stream_endpoints`], `mailbox id hex/node id hex`, or a mailbox id hex alone
    /// for the replica read from now; message), like a poll round: durable first, then
    /// acknowledged to the replica that pushed them; then receipts, retransmissions and
    /// queued sends.
    pub async fn ingest(&mut self, pushed: Vec<(String, StoredMessage)>) -> Result<()> {
        let now = now_ms();
        for (tag, msg) in pushed {
            let (mailbox, node) = tag.split_once('/').unwrap_or((tag.as_str(), ""));
            let mut id = [0u8; 32];
            if hex::decode_to_slice(mailbox, &mut id).is_err() {
                continue;
            }
            let mut n = [0u8; 32];
            if hex::decode_to_slice(node, &mut n).is_ok() {
                self.core.handle_fetched_from(now, &id, &n, &[msg]);
            } else {
                self.core.handle_fetched(now, &id, &[msg]);
            }
        }
        self.drive().await?;
        self.tick().await
    }

    /// Housekeeping without polling: sends due receipts, retransmits, sends what the windows
    /// allow, forgets what expired; saves.
    pub async fn tick(&mut self) -> Result<()> {
        self.create_missing_replicas().await;
        self.register_devices().await;
        self.retry_removals().await;
        self.erase_pending().await;
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

    /// Registers `device` on every replica of own mailbox `m`; true when every one has it.
    async fn register_on(&mut self, m: &OwnedMailbox, device: &[u8; 32]) -> bool {
        let mut all = true;
        for r in m.replicas.clone() {
            let done = match (self.token(m, &r).await, self.net_for(&m.id)) {
                (Ok(token), Ok(net)) => net.add_device((m, &r), &token, device).await.is_ok(),
                _ => false,
            };
            all &= done;
        }
        all
    }

    async fn remove_on(&mut self, m: &OwnedMailbox, r: &Replica, device: &[u8; 32]) -> Result<()> {
        let token = self.token(m, r).await?;
        self.net_for(&m.id)?
            .remove_device((m, r), &token, device)
            .await
    }

    /// Retries the device login removals that replicas did not confirm.
    async fn retry_removals(&mut self) {
        for (m, node, key) in self.core.removals_due() {
            let Some(r) = m.replica(&node).cloned() else {
                self.core.removal_done(&m.id, &node, &key);
                continue;
            };
            if self.remove_on(&m, &r, &key).await.is_ok() {
                self.core.removal_done(&m.id, &node, &key);
            }
        }
    }

    /// Registers linked devices on own mailboxes made since they were linked (retried at
    /// every tick until each replica has them).
    async fn register_devices(&mut self) {
        for (m, curve, login) in self.core.registrations_due() {
            if self.register_on(&m, &login).await {
                self.core.registration_done(&m.id, &curve);
            }
        }
    }

    /// On the primary: makes a linking code for a new device named `name` (its link mailbox,
    /// and the sync mailbox the first time) and returns it.
    pub async fn link(&mut self, name: &str) -> Result<String> {
        self.refresh_directory().await?;
        let mut plan = self.core.link_prepare(now_ms(), name)?;
        if let Some((mut sync, key)) = plan.sync.take() {
            let retention = self.settings().retention_ms;
            self.create_replicas(&mut sync, key, retention).await?;
            plan.sync = Some((sync, key));
        }
        let mut mailbox = plan.mailbox.clone();
        self.create_replicas(&mut mailbox, plan.mailbox_key, plan.retention_ms)
            .await?;
        plan.mailbox = mailbox;
        let code = self.core.link_commit(now_ms(), plan)?;
        self.drive().await?;
        Ok(code)
    }

    /// On the primary: waits up to `timeout` for the new device's request; its short code.
    pub async fn link_wait_request(&mut self, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(code) = self.core.link_short_code() {
                return Ok(code);
            }
            if tokio::time::Instant::now() >= deadline {
                self.core.link_abort();
                self.drive().await?;
                return Err(ClientError::Link(
                    "no device used the code in time".to_string(),
                ));
            }
            let _ = self.sync(Duration::from_secs(1)).await;
        }
    }

    /// On the primary: the user typed `typed`, the new device's short code. When it matches,
    /// registers the device on every mailbox of the account and sends it the account; when
    /// not, aborts the link.
    pub async fn link_confirm(&mut self, typed: &str) -> Result<()> {
        let regs = match self.core.link_confirm(now_ms(), typed) {
            Ok(r) => r,
            Err(e) => {
                self.drive().await?;
                self.erase_pending().await;
                return Err(e);
            }
        };
        for (m, device) in regs {
            if !self.register_on(&m, &device).await {
                return Err(ClientError::Link(
                    "a mailbox node did not take the new device's key; run `whispr link` again"
                        .to_string(),
                ));
            }
        }
        self.refresh_directory().await?;
        self.core.link_finish(now_ms())?;
        self.drive().await
    }

    /// On the primary: waits up to `timeout` for the new device to say it has the account.
    pub async fn link_wait_done(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let _ = self.sync(Duration::from_secs(1)).await;
            if self.core.link_done() {
                self.core.link_abort();
                self.erase_pending().await;
                self.save()?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// On a new device: sends the request for linking code `code`; the short code to type on
    /// the primary.
    pub async fn link_request(&mut self, code: &str) -> Result<String> {
        self.refresh_directory().await?;
        let short = self.core.link_request(now_ms(), code)?;
        self.drive().await?;
        Ok(short)
    }

    /// On a new device: waits up to `timeout` for the account to arrive.
    pub async fn wait_linked(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Err(ClientError::Node { status: 404, .. }) =
                self.sync(Duration::from_secs(1)).await
            {
                // The primary erased the link mailbox: it closed the link (the codes differed,
                // or the code was used or expired).
                break;
            }
            if self.core.is_linked() {
                // The "done" to the primary leaves now.
                self.tick().await?;
                return Ok(());
            }
            if !self.core.link_pending() {
                break;
            }
        }
        Err(ClientError::Link(
            "the account did not arrive: the code was refused, expired, or the codes differed"
                .to_string(),
        ))
    }

    /// Names this device (before it joins or links another).
    pub fn set_device_name(&mut self, name: &str) -> Result<()> {
        self.core.set_device_name(name)?;
        self.save()
    }

    /// The account's devices.
    pub fn devices(&self) -> Vec<crate::core::DeviceInfo> {
        self.core.devices()
    }

    /// On the primary: removes linked device `name` (its logins on every mailbox of the
    /// account first, then a device list without it to every contact and device).
    pub async fn remove_device(&mut self, name: &str) -> Result<()> {
        let plan = self.core.devices_remove_plan(name)?;
        for (m, device) in plan {
            // Removals replicate between replicas; one that is down now is retried at every
            // tick until it confirms. Each mailbox needs one replica now.
            let mut removed = false;
            let mut first_error = None;
            for r in m.replicas.clone() {
                match self.remove_on(&m, &r, &device).await {
                    Ok(()) => removed = true,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        self.core.removal_pending(&m.id, &r.node, &device);
                    }
                }
            }
            if !removed && let Some(e) = first_error {
                return Err(e);
            }
        }
        self.refresh_directory().await?;
        self.core.devices_remove_commit(now_ms(), name)?;
        self.drive().await
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
            // A round that failed (every replica of every mailbox unreachable for now, a
            // directory that could not be refreshed, a node's refusal) is tried again until
            // the deadline: the message is still being retransmitted. Only a local failure
            // (the home directory) ends the wait.
            if let Err(e) = self
                .sync(Duration::from_millis(self.core.settings().poll_wait_ms))
                .await
            {
                if e.is_local() {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
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
        let (m, r, token) = self.read_target(&m).await?;
        let v = self.net_for(&m.id)?.export((&m, &r), &token).await?;
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

    /// Erases mailbox `m` on its replica `r` (a fresh owner session, then `DELETE`). Done
    /// when the replica erased it, or no longer has it: its login refuses the owner key (a
    /// mailbox's owner is its device while it exists) or answers 404 `unknown_mailbox`, or the
    /// erasure answers 404 — a peer's erasure reached it first.
    async fn erase_on(&mut self, m: &OwnedMailbox, r: &Replica) -> Result<()> {
        if r.api_url.is_empty() {
            // Never created there by us (creation needs the address); a copy repaired there
            // from a peer is erased by that peer's erasure.
            if !r.created {
                return Ok(());
            }
            return Err(ClientError::NoRoute(
                "a node publishes no API address".to_string(),
            ));
        }
        let net = self.net_for(&m.id)?;
        let mut last = None;
        for _ in 0..2 {
            let token = match net.login((m, r)).await {
                Ok((token, _)) => token,
                Err(ClientError::Node { status: 401, .. }) => return Ok(()),
                // A peer's erasure landed while the node handled the login (after its device
                // check, before it marked the mailbox used): the mailbox is gone there.
                Err(ClientError::Node {
                    status: 404, kind, ..
                }) if kind == "unknown_mailbox" => return Ok(()),
                Err(e) => return Err(e),
            };
            match net.erase((m, r), &token).await {
                Ok(()) | Err(ClientError::Node { status: 404, .. }) => return Ok(()),
                // The session ended between login and erasure (a peer's erasure ends them):
                // log in again, which tells.
                Err(e @ ClientError::Node { status: 401, .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClientError::Unreachable {
            node: "mailbox",
            reason: "the erasure was not confirmed".to_string(),
        }))
    }

    /// Erases mailbox `m` on each of its replicas; the replicas that confirmed, and the first
    /// error of the others.
    async fn erase_replicas(&mut self, m: &OwnedMailbox) -> (Vec<[u8; 32]>, Option<ClientError>) {
        let mut done = Vec::new();
        let mut first_error = None;
        for r in m.replicas.clone() {
            match self.erase_on(m, &r).await {
                Ok(()) => done.push(r.node),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        (done, first_error)
    }

    /// Retries, at most every [`ERASE_RETRY_MS`], the erasures of removed contacts' mailboxes
    /// on the replicas that have not confirmed them.
    async fn erase_pending(&mut self) {
        use std::sync::atomic::Ordering;
        let due = self.core.erasures_due();
        let now = now_ms();
        if due.is_empty()
            || now.saturating_sub(ERASURES_TRIED_AT.load(Ordering::Relaxed)) < ERASE_RETRY_MS
        {
            return;
        }
        ERASURES_TRIED_AT.store(now, Ordering::Relaxed);
        for m in due {
            let (done, _) = self.erase_replicas(&m).await;
            for node in done {
                self.core.erasure_confirmed(&m.id, &node);
            }
        }
    }

    /// Removes contact (or pending invitation) `name`, and with `block` blocks its identity
    /// (a later invitation from it, or a hello from it on one of ours, is refused): the
    /// mailbox it deposits into is erased on each of its replicas — from then on the nodes
    /// refuse its deposits, which it sees fail — and the contact is forgotten. Replicas that
    /// could not be reached are retried at every [`Client::sync`] / [`Client::tick`] until
    /// they confirm (each replica also passes the erasure on to its peers).
    pub async fn remove_contact(&mut self, name: &str, block: bool) -> Result<Revoked> {
        let m = self.core.revoke_plan(name, block)?;
        let (erased, _) = self.erase_replicas(&m).await;
        let revoked = self.core.commit_revoke(now_ms(), name, block, &erased)?;
        self.drive().await?;
        Ok(revoked)
    }

    /// Lifts the block of the identity blocked as `name`.
    pub fn unblock(&mut self, name: &str) -> Result<()> {
        self.core.unblock(name)?;
        self.save()
    }

    /// The blocked identities.
    pub fn blocked(&self) -> Vec<BlockedInfo> {
        self.core.blocked()
    }

    /// Replicas of removed or blocked contacts' mailboxes that have not confirmed their
    /// erasure yet (tried again at every [`Client::tick`], at most every 10 s).
    pub fn erasures_pending(&self) -> usize {
        self.core.erasures_pending()
    }

    /// Erases the whole account: every mailbox (per contact, per pending invitation, and
    /// those of removed contacts not yet erased everywhere) on every one of its replicas
    /// (crypto-erasure on each node), then, when every replica confirmed, the home's state
    /// file. When some replica could not be reached, the state is kept (its keys are what
    /// authenticates the erasure) and the error says so: run it again later.
    pub async fn erase_account(self) -> Result<Erased> {
        let mut this = self;
        let plan = this.core.erase_plan();
        let mut outcome = Erased {
            mailboxes: plan.len(),
            replicas: 0,
            erased: 0,
        };
        let mut first_error = None;
        for m in &plan {
            outcome.replicas += m.replicas.len();
            let (done, error) = this.erase_replicas(m).await;
            outcome.erased += done.len();
            if let Some(e) = error {
                first_error.get_or_insert(e);
            }
        }
        if outcome.erased < outcome.replicas {
            return Err(ClientError::Unreachable {
                node: "mailbox",
                reason: format!(
                    "{} of {} mailbox replicas confirmed the erasure ({}); the client is kept:                      run `whispr erase` again",
                    outcome.erased,
                    outcome.replicas,
                    first_error.map_or_else(|| "no answer".to_string(), |e| e.to_string())
                ),
            });
        }
        this.vault.wipe(&this._lock)?;
        Ok(outcome)
    }

    /// The user's own data as the JSON document of `whispr export` (see
    /// [`ClientCore::export`]); encrypt it with [`crate::vault::seal_export`].
    pub fn export(&self) -> Value {
        self.core.export(now_ms())
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

/// What [`Client::erase_account`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    /// Mailboxes of the account.
    pub mailboxes: usize,
    /// Their replicas, in all.
    pub replicas: usize,
    /// Replicas that confirmed the erasure.
    pub erased: usize,
}

/// A stand-in replica for a mailbox that has none (never the case once a state is read).
fn dummy(m: &OwnedMailbox) -> Replica {
    Replica {
        node: m.node,
        api_url: String::new(),
        cursor: 0,
        token: None,
        token_expires_ms: 0,
        created: false,
        prekeys: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use whispr_protocol::directory::Directory;

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

    /// The next HTTP/1.1 request on `conn` (what is read past it stays in `buf`): method,
    /// path with query, body. `None` when the connection closes.
    async fn next_request(
        conn: &mut tokio::net::TcpStream,
        buf: &mut Vec<u8>,
    ) -> Option<(String, String, String)> {
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
        buf.drain(..end + 4 + len);
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        Some((method, path, body))
    }

    /// What a fake mailbox replica was asked: (method, path with query, body).
    type Seen = Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

    /// A fake mailbox node over HTTP/1.1: logs in anyone, serves `messages` (as a page of
    /// the messages API) and acknowledges acks; records every request. With `hang`, it accepts
    /// connections and never answers.
    async fn fake_replica(messages: Value, hang: bool) -> (String, Seen) {
        fake_replica_numbering(messages, hang, false).await
    }

    /// [`fake_replica`]; with `renumbered`, a replica that lost its disk and numbers anew: a
    /// poll after any cursor but 0 is refused as `bad_cursor`.
    async fn fake_replica_numbering(
        messages: Value,
        hang: bool,
        renumbered: bool,
    ) -> (String, Seen) {
        let (url, seen, _) = fake_replica_with(messages, hang, renumbered, None).await;
        (url, seen)
    }

    /// When a fake replica received each request: (path with query, instant).
    type Times = Arc<std::sync::Mutex<Vec<(String, std::time::Instant)>>>;

    /// The identity key of the fake node serving at `api` (the directory of these tests names
    /// it, and the fake replica asks for its audience).
    fn fake_identity(api: &str) -> ed25519_dalek::SigningKey {
        use sha2::Digest;
        ed25519_dalek::SigningKey::from_bytes(&sha2::Sha256::digest(api.as_bytes()).into())
    }

    fn fake_audience(api: &str) -> String {
        whispr_protocol::mailbox_api::node_audience(&NodeId(
            fake_identity(api).verifying_key().to_bytes(),
        ))
    }

    /// [`fake_replica_numbering`]; its login challenges name `audience` (default: its own).
    async fn fake_replica_with(
        messages: Value,
        hang: bool,
        renumbered: bool,
        audience: Option<String>,
    ) -> (String, Seen, Times) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let audience = audience.unwrap_or_else(|| fake_audience(&format!("http://{addr}")));
        let seen: Seen = Arc::default();
        let times: Times = Arc::default();
        let timed = times.clone();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let log = log.clone();
                let messages = messages.clone();
                let audience = audience.clone();
                let timed = timed.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some((method, path, body)) = next_request(&mut conn, &mut buf).await
                        else {
                            return;
                        };
                        timed
                            .lock()
                            .unwrap()
                            .push((path.clone(), std::time::Instant::now()));
                        log.lock().unwrap().push((method, path.clone(), body));
                        if hang {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        if renumbered && path.contains("/messages") && !path.contains("after=0&") {
                            let body =
                                json!({"error": "bad_cursor", "message": "beyond"}).to_string();
                            let out = format!(
                                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if conn.write_all(out.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let reply = if path.ends_with("/auth/challenge") {
                            json!({"challenge": hex::encode([7u8; 32]), "audience": audience})
                        } else if path.ends_with("/auth/login") {
                            json!({"token": "tok", "expires_at_ms": now_ms() + 3_600_000})
                        } else if path.contains("/messages") {
                            json!({ "messages": messages })
                        } else {
                            json!({})
                        }
                        .to_string();
                        let status = if method_is_create(&log, &path) {
                            "201 Created"
                        } else {
                            "200 OK"
                        };
                        let out = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        if conn.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), seen, times)
    }

    /// Whether the request just logged is a mailbox creation.
    fn method_is_create(log: &Seen, path: &str) -> bool {
        path == "/v1/mailboxes"
            && log
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(m, _, _)| m == "POST")
    }

    /// A directory of mailbox nodes at `apis` (no relays: enough to make a mailbox).
    fn mailbox_directory(apis: &[String]) -> Directory {
        use rand::SeedableRng;
        use whispr_protocol::directory::{NodeDescriptor, Role};
        use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
        use whispr_protocol::{KEY_EPOCH_LEN, KeyEpoch};
        let now = UnixTime(now_ms());
        let epoch = KeyEpoch::containing(now, KEY_EPOCH_LEN);
        let mut rng = StdRng::seed_from_u64(5);
        let descriptors: Vec<_> = apis
            .iter()
            .map(|api| {
                let identity = fake_identity(api);
                let id = NodeId(identity.verifying_key().to_bytes());
                let public = SphinxPublicKey::from(&SphinxSecretKey::random_from_rng(&mut rng));
                NodeDescriptor {
                    node_id: id,
                    peer_id: id.libp2p_peer_id_bytes(),
                    roles: std::collections::BTreeSet::from([Role::Mailbox]),
                    mix_layer: 0,
                    addresses: Vec::new(),
                    api_url: Some(api.clone()),
                    sphinx_keys: (0..4).map(|i| (KeyEpoch(epoch.0 + i), public)).collect(),
                    published_at: UnixTime(now.0 - 1000),
                    expires_at: UnixTime(now.0 + 86_400_000),
                }
                .sign(&identity)
                .unwrap()
            })
            .collect();
        Directory::build(now, &descriptors).0
    }

    /// A client owning one mailbox on two replicas at `apis`, created on both, reading the
    /// first.
    fn client_with_two_replicas(home: &Path, apis: &[String]) -> Client {
        let kdf = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let settings = Settings {
            replicas: 2,
            ..Settings::default()
        };
        let mut c = Client::init(home, b"pw", "http://127.0.0.1:9", settings, kdf).unwrap();
        c.core.set_directory(Arc::new(mailbox_directory(apis)));
        let mut plan = c.core.prepare_invite(now_ms(), Some("bob"), true).unwrap();
        for r in &mut plan.mailbox.replicas {
            r.created = true;
            r.prekeys = None;
        }
        // Read from the replica at apis[0] first.
        plan.mailbox.reading = plan
            .mailbox
            .replicas
            .iter()
            .position(|r| r.api_url == apis[0])
            .unwrap();
        c.core.commit_invite(now_ms(), plan);
        c
    }

    fn page(seqs: &[u64]) -> Value {
        // SURB replies under ids nobody minted: processed (and ignored), so the cursor moves.
        Value::Array(
            seqs.iter()
                .map(|s| {
                    json!({"seq": s, "kind": "surb_reply", "surb_id": hex::encode([9u8; 32]),
                           "payload": "AAAA", "id": hex::encode([*s as u8; 16])})
                })
                .collect(),
        )
    }

    /// A replica that refuses connections: the same sync round reads the next replica, from
    /// its own cursor, and acknowledges there; reading stays there.
    #[tokio::test]
    async fn a_sync_fails_over_to_the_next_replica_at_once_and_acks_there() {
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (live, seen) = fake_replica(page(&[5, 6]), false).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[dead.clone(), live.clone()]);
        let started = std::time::Instant::now();
        c.sync(Duration::from_millis(500)).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let m = &c.core.owned_mailboxes()[0];
        assert_eq!(m.current().unwrap().api_url, live);
        let r = m.current().unwrap();
        assert_eq!(r.cursor, 6);
        assert!(
            m.replicas
                .iter()
                .all(|x| x.api_url == live || x.cursor == 0)
        );
        let log = seen.lock().unwrap().clone();
        assert!(
            log.iter()
                .any(|(m, p, _)| m == "GET" && p.contains("/messages?after=0")),
            "{log:?}"
        );
        assert!(
            log.iter()
                .any(|(m, p, b)| m == "POST" && p.ends_with("/ack") && b.contains("\"up_to\":6")),
            "{log:?}"
        );
        // Reopened, the client still reads the live replica, from its cursor.
        drop(c);
        let mut c = Client::open(home.path(), b"pw").unwrap();
        c.sync(Duration::ZERO).await.unwrap();
        let log = seen.lock().unwrap().clone();
        assert!(
            log.iter().any(|(_, p, _)| p.contains("/messages?after=6")),
            "{log:?}"
        );
    }

    /// Issue 16 ("the client checks the login audience against the node it meant"): a
    /// malicious replica relays another node's login challenge, naming that node's audience.
    /// The client signs only for the audience of the node it is talking to, so the malicious
    /// node gets no signature it could replay to the other node; the client reads the next
    /// replica instead.
    #[tokio::test]
    async fn the_client_signs_a_login_only_for_the_node_it_meant() {
        let (honest, honest_seen) = fake_replica(page(&[4]), false).await;
        // The evil node relays the honest node's challenge, naming the honest node.
        let relayed = fake_audience(&honest);
        let (evil, evil_seen, _) = fake_replica_with(page(&[]), false, false, Some(relayed)).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[evil.clone(), honest.clone()]);
        let _ = c.sync(Duration::ZERO).await;
        let evil_log = evil_seen.lock().unwrap().clone();
        assert!(
            evil_log
                .iter()
                .any(|(_, p, _)| p.ends_with("/auth/challenge")),
            "{evil_log:?}"
        );
        assert!(
            !evil_log.iter().any(|(_, p, _)| p.ends_with("/auth/login")),
            "the client signed a login for another node's audience: {evil_log:?}"
        );
        // The client read the honest replica instead.
        assert_eq!(
            c.core.owned_mailboxes()[0].current().unwrap().api_url,
            honest
        );
        assert!(
            honest_seen
                .lock()
                .unwrap()
                .iter()
                .any(|(_, p, _)| p.ends_with("/auth/login"))
        );
    }

    /// Security review finding 8 (synchronized polling): a round started the long polls of
    /// every own mailbox at the same instant, for the same wait, which links the mailboxes
    /// for a node holding several (or an observer of several). Each mailbox's poll now starts
    /// after its own random delay and waits its own time.
    #[tokio::test]
    async fn the_long_polls_of_own_mailboxes_do_not_start_together() {
        let (api, _, times) = fake_replica_with(page(&[]), false, false, None).await;
        let home = tempfile::tempdir().unwrap();
        let kdf = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let settings = Settings {
            replicas: 1,
            ..Settings::default()
        };
        let mut c = Client::init(home.path(), b"pw", "http://127.0.0.1:9", settings, kdf).unwrap();
        c.core
            .set_directory(Arc::new(mailbox_directory(std::slice::from_ref(&api))));
        for name in ["a", "b", "c"] {
            let mut plan = c.core.prepare_invite(now_ms(), Some(name), true).unwrap();
            for r in &mut plan.mailbox.replicas {
                r.created = true;
                r.prekeys = None;
            }
            c.core.commit_invite(now_ms(), plan);
        }
        let rounds = 4;
        let mut spreads = Vec::new();
        let mut waits = std::collections::BTreeSet::new();
        for _ in 0..rounds {
            times.lock().unwrap().clear();
            c.sync(Duration::from_millis(2_000)).await.unwrap();
            let polls: Vec<(String, std::time::Instant)> = times
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| p.contains("/messages?"))
                .cloned()
                .collect();
            assert_eq!(polls.len(), 3, "{polls:?}");
            for (p, _) in &polls {
                waits.insert(p.rsplit("wait=").next().unwrap_or("").to_string());
            }
            let first = polls.iter().map(|(_, t)| *t).min().unwrap();
            let last = polls.iter().map(|(_, t)| *t).max().unwrap();
            spreads.push(last - first);
        }
        let mean = spreads.iter().sum::<Duration>() / rounds;
        assert!(
            mean > Duration::from_millis(100),
            "the 3 mailboxes' polls started within {mean:?} of each other on average \
             (per round: {spreads:?})"
        );
        assert!(waits.len() > 1, "every poll waited the same: {waits:?}");
    }

    /// What a long-polling fake replica saw of each idle poll: (mailbox id hex, whether the
    /// client hung up before the wait ran out).
    type Outcomes = Arc<std::sync::Mutex<Vec<(String, bool)>>>;

    /// A fake mailbox node that long-polls like a real one: a poll of `hot` after cursor 0 is
    /// answered at once with one message; every other poll is held for its `wait` and then
    /// answered empty, unless the client hangs up first. Logins are not served (the test
    /// sets the tokens).
    async fn long_poll_replica(hot: Arc<std::sync::Mutex<String>>) -> (String, Outcomes, Times) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let outcomes: Outcomes = Arc::default();
        let times: Times = Arc::default();
        let (seen, timed) = (outcomes.clone(), times.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (seen, timed, hot) = (seen.clone(), timed.clone(), hot.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some((_, path, _)) = next_request(&mut conn, &mut buf).await else {
                            return;
                        };
                        timed
                            .lock()
                            .unwrap()
                            .push((path.clone(), std::time::Instant::now()));
                        let id = path.split('/').nth(3).unwrap_or("").to_string();
                        let wait: u64 = path
                            .rsplit("wait=")
                            .next()
                            .and_then(|w| w.parse().ok())
                            .unwrap_or(0);
                        let is_hot = *hot.lock().unwrap() == id;
                        let reply = if !path.contains("/messages?") {
                            json!({}) // an ack
                        } else if is_hot && path.contains("after=0&") {
                            json!({ "messages": page(&[1]) })
                        } else {
                            // Held for the wait, or until the client hangs up.
                            let hung_up = tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(wait)) => false,
                                n = conn.read(&mut chunk) => matches!(n, Ok(0) | Err(_)),
                            };
                            seen.lock().unwrap().push((id, hung_up));
                            if hung_up {
                                return;
                            }
                            json!({ "messages": page(&[]) })
                        }
                        .to_string();
                        let out = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        if conn.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), outcomes, times)
    }

    /// Security review finding 8 (the residual of synchronized polling): when one mailbox has
    /// a message, the other mailboxes' long polls run out on their own schedule instead of
    /// all being dropped at the instant the busy one answered.
    #[tokio::test]
    async fn an_answer_in_one_mailbox_does_not_end_the_others_polls() {
        let home = tempfile::tempdir().unwrap();
        let kdf = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let settings = Settings {
            replicas: 1,
            ..Settings::default()
        };
        let mut c = Client::init(home.path(), b"pw", "http://127.0.0.1:9", settings, kdf).unwrap();
        let hot_id = Arc::new(std::sync::Mutex::new(String::new()));
        let (api, outcomes, times) = long_poll_replica(hot_id.clone()).await;
        c.core
            .set_directory(Arc::new(mailbox_directory(std::slice::from_ref(&api))));
        for name in ["a", "b", "c"] {
            let mut plan = c.core.prepare_invite(now_ms(), Some(name), true).unwrap();
            for r in &mut plan.mailbox.replicas {
                r.created = true;
                r.prekeys = None;
            }
            c.core.commit_invite(now_ms(), plan);
        }
        let boxes = c.core.owned_mailboxes();
        let hot = hex::encode(boxes[0].id);
        *hot_id.lock().unwrap() = hot.clone();
        for m in &boxes {
            let node = m.current().unwrap().node;
            c.core
                .set_replica_token(&m.id, &node, Some(("tok".into(), now_ms() + 3_600_000)));
        }

        c.sync(Duration::from_millis(3_000)).await.unwrap();
        // The two idle polls are still open when the round returns; each ends by its own
        // wait (at most 3 s), not by the client hanging up.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while outcomes.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = outcomes.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "idle polls seen: {seen:?}");
        assert!(
            seen.iter().all(|(id, hung_up)| id != &hot && !hung_up),
            "the idle mailboxes' polls were dropped when one mailbox had a message: {seen:?} (hot {hot}; requests {:?})",
            times.lock().unwrap()
        );
        // The next round takes their outcome and polls each mailbox once more; an idle
        // mailbox had a single poll in flight, never two.
        times.lock().unwrap().clear();
        c.sync(Duration::from_millis(500)).await.unwrap();
        let polls: Vec<String> = times
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .filter(|p| p.contains("/messages?"))
            .collect();
        assert!(polls.len() <= 3, "{polls:?}");
    }

    /// A replica that takes connections and never answers costs one poll's wait plus
    /// POLL_GRACE, not the HTTP client's minute.
    #[tokio::test]
    async fn a_replica_that_hangs_is_failed_over_within_seconds() {
        let (hung, _) = fake_replica(page(&[]), true).await;
        let (live, seen) = fake_replica(page(&[3]), false).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[hung.clone(), live.clone()]);
        // Logged in there already: the poll itself hangs.
        let (id, node) = {
            let m = &c.core.owned_mailboxes()[0];
            (m.id, m.current().unwrap().node)
        };
        c.core
            .set_replica_token(&id, &node, Some(("tok".into(), now_ms() + 3_600_000)));
        let started = std::time::Instant::now();
        c.sync(Duration::from_millis(200)).await.unwrap();
        let took = started.elapsed();
        assert!(
            took < crate::net::POLL_GRACE + Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(c.core.owned_mailboxes()[0].current().unwrap().api_url, live);
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|(_, p, _)| p.contains("/messages?after=0"))
        );
    }

    /// A replica that was down when the mailbox was made gets it later: the create request
    /// names the whole set in pinned order under a valid v2 signature, then its own slice of
    /// the prekeys is uploaded; the core records both.
    #[tokio::test]
    async fn a_replica_down_at_creation_is_created_later_with_the_whole_set() {
        use whispr_protocol::mailbox_api::create_transcript_v2;
        let (first, _) = fake_replica(page(&[]), false).await;
        let (late, seen) = fake_replica(page(&[]), false).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[first.clone(), late.clone()]);
        let mut m = c.core.owned_mailboxes()[0].clone();
        let slice = json!({"identity_key": "00", "prekeys": [{"key_id": 1}]});
        for r in &mut m.replicas {
            if r.api_url == late {
                r.created = false;
                r.prekeys = Some(slice.clone());
            }
        }
        c.core.mailbox_created(&m);
        assert_eq!(c.core.replicas_to_create().len(), 1);
        c.tick().await.unwrap();
        assert!(c.core.replicas_to_create().is_empty());
        let log = seen.lock().unwrap().clone();
        let create = log
            .iter()
            .find(|(m, p, _)| m == "POST" && p == "/v1/mailboxes")
            .expect("a create request");
        let body: Value = serde_json::from_str(&create.2).unwrap();
        let names: Vec<String> = m.replicas.iter().map(|r| hex::encode(r.node)).collect();
        assert_eq!(body["replicas"], json!(names));
        let h = |k: &str| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(body[k].as_str().unwrap(), &mut out).unwrap();
            out
        };
        let nodes: Vec<NodeId> = m.replicas.iter().map(|r| NodeId(r.node)).collect();
        let transcript = create_transcript_v2(
            &whispr_protocol::MailboxId(m.id),
            &h("mailbox_key"),
            &h("owner_key"),
            &h("access_key_hash"),
            Some(&h("reply_key")),
            body["retention_ms"].as_u64().unwrap(),
            &nodes,
        )
        .unwrap();
        let mut sig = [0u8; 64];
        hex::decode_to_slice(body["signature"].as_str().unwrap(), &mut sig).unwrap();
        ed25519_dalek::VerifyingKey::from_bytes(&h("owner_key"))
            .unwrap()
            .verify_strict(&transcript, &ed25519_dalek::Signature::from_bytes(&sig))
            .expect("the v2 signature verifies");
        let put = log
            .iter()
            .find(|(m, p, _)| m == "PUT" && p.ends_with("/prekeys"))
            .expect("its prekeys uploaded");
        assert_eq!(serde_json::from_str::<Value>(&put.2).unwrap(), slice);
    }

    /// A replica that lost its disk numbers anew and refuses our cursor: it is read from the
    /// start at once, in the same round.
    #[tokio::test]
    async fn a_replica_refusing_the_cursor_is_read_from_the_start() {
        let (renumbered, seen) = fake_replica_numbering(page(&[2, 3]), false, true).await;
        let (other, _) = fake_replica(page(&[]), false).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[renumbered.clone(), other]);
        let (id, node) = {
            let m = &c.core.owned_mailboxes()[0];
            (m.id, m.current().unwrap().node)
        };
        // Read up to 50 there before it lost its disk.
        c.core.handle_fetched_from(
            now_ms(),
            &id,
            &node,
            &[serde_json::from_value(page(&[50])[0].clone()).unwrap()],
        );
        while c.core.poll_output().is_some() {}
        // Still logged in there (a new login reads from the start anyway).
        c.core
            .set_replica_token(&id, &node, Some(("00".repeat(32), now_ms() + 3_600_000)));
        c.sync(Duration::ZERO).await.unwrap();
        let m = &c.core.owned_mailboxes()[0];
        assert_eq!(
            m.current().unwrap().node,
            node,
            "no failover for a bad cursor"
        );
        assert_eq!(m.current().unwrap().cursor, 3);
        let log = seen.lock().unwrap().clone();
        let polls: Vec<&String> = log
            .iter()
            .filter(|(_, p, _)| p.contains("/messages"))
            .map(|(_, p, _)| p)
            .collect();
        assert!(polls[0].contains("after=50&"), "{polls:?}");
        assert!(polls[1].contains("after=0&"), "{polls:?}");
    }

    /// A replica wiped and repaired numbers its messages anew, possibly past our cursor (so no
    /// `bad_cursor`): a cursor from an earlier session would skip the first repaired
    /// messages. Such a node restarted, so our session there is gone: a new login reads it
    /// from the start (before: `after=50`, the repaired messages 2 and 3 never served).
    #[tokio::test]
    async fn a_new_session_reads_the_replica_from_the_start() {
        let (replica, seen) = fake_replica(page(&[2, 3]), false).await;
        let (other, _) = fake_replica(page(&[]), false).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[replica, other]);
        let (id, node) = {
            let m = &c.core.owned_mailboxes()[0];
            (m.id, m.current().unwrap().node)
        };
        c.core.handle_fetched_from(
            now_ms(),
            &id,
            &node,
            &[serde_json::from_value(page(&[50])[0].clone()).unwrap()],
        );
        while c.core.poll_output().is_some() {}
        c.core.set_replica_token(&id, &node, None);
        c.sync(Duration::ZERO).await.unwrap();
        let log = seen.lock().unwrap().clone();
        let polls: Vec<&String> = log
            .iter()
            .filter(|(_, p, _)| p.contains("/messages"))
            .map(|(_, p, _)| p)
            .collect();
        assert!(polls[0].contains("after=0&"), "{polls:?}");
        assert_eq!(c.core.owned_mailboxes()[0].current().unwrap().cursor, 3);
    }

    /// A stream cannot be opened on the replica read from (its ticket fails): the stream
    /// endpoint is on the next replica, tagged with it.
    #[tokio::test]
    async fn a_stream_is_opened_on_the_next_replica_when_the_current_one_is_down() {
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (live, _) = fake_replica(page(&[]), false).await;
        let home = tempfile::tempdir().unwrap();
        let mut c = client_with_two_replicas(home.path(), &[dead, live.clone()]);
        let (id, node) = {
            let m = &c.core.owned_mailboxes()[0];
            (m.id, m.current().unwrap().node)
        };
        // Logged in there before it died: the ticket is what fails.
        c.core
            .set_replica_token(&id, &node, Some(("tok".into(), now_ms() + 3_600_000)));
        let endpoints = c.stream_endpoints(&[]).await.unwrap();
        assert_eq!(endpoints.len(), 1);
        let m = &c.core.owned_mailboxes()[0];
        let r = m.current().unwrap();
        assert_eq!(r.api_url, live);
        assert_eq!(
            endpoints[0].0,
            format!("{}/{}", hex::encode(id), hex::encode(r.node))
        );
        assert!(
            endpoints[0]
                .1
                .starts_with(&live.replace("http://", "ws://"))
        );
    }
}
