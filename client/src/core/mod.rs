//! The client core: every decision the client makes, with no clock, socket, file or task
//! (the shape of `relay/src/router.rs`, after quinn-proto and str0m).
//!
//! The caller — the `whispr` command's [`crate::Client`] over HTTP, or the simulator over its
//! simulated network — does the I/O and tells the core what happened; the core changes its
//! state and queues what to do:
//!
//! - **Commands** are methods that take the current time: [`ClientCore::send`],
//!   [`ClientCore::cancel`], [`ClientCore::prepare_invite`], [`ClientCore::accept_start`], …
//! - **Inputs** are methods too: [`ClientCore::set_directory`] (a fresh directory),
//!   [`ClientCore::handle_fetched`] (messages a mailbox returned, by poll or stream),
//!   [`ClientCore::note_refused`] (what an edge relay refused), [`ClientCore::set_token`].
//! - **Timers**: [`ClientCore::poll_timeout`] says when the core wants
//!   [`ClientCore::handle_timeout`] called next (retransmissions, receipts, queued sends).
//! - **Outputs** come out of [`ClientCore::poll_output`]: packets for an edge relay, mailbox
//!   acknowledgements, and "save the state now" (always before the acknowledgements that
//!   depend on it). User events are the notices ([`ClientCore::take_notices`]) and received
//!   messages ([`ClientCore::take_unread`]).
//!
//! All randomness comes from two injected RNGs: `rng` for decisions and ids (routes, delays,
//! mailbox and message ids, timer choice) and `crypto_rng` for key material and the
//! randomness inside packets and envelopes, so that a caller that swaps the crypto (the
//! simulator's fast mode) makes the same decisions from the same seed. Olm is the exception:
//! vodozemac draws its own keys and nonces (that changes ciphertext bytes, never a decision).
//!
//! Modules, one sentence each: [`routes`] picks routes, delays and reply blocks and judges
//! relays by their acks; [`contacts`] creates invitations, accepts them and answers them;
//! [`sending`] encrypts, fragments and sends messages, retransmits them and sends cover;
//! [`scheduling`] hands messages to timer nodes and cancels them; [`receiving`] opens what
//! mailboxes return (acks, messages, receipts) and reassembles it; [`manage`] removes and
//! blocks contacts, keeps the mailboxes still to erase and builds the export.

mod codec;
mod contacts;
mod devices;
mod manage;
mod receiving;
mod routes;
mod scheduling;
mod sending;
mod sessions;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use vodozemac::olm::{Account, Session};
use whispr_protocol::directory::Directory;
use whispr_protocol::{KEY_EPOCH_LEN, KeyEpoch, NodeId, UnixTime};

pub use codec::{PacketCodec, SphinxCodec};
pub use devices::{DeviceInfo, LINK_TTL_MS, LinkCode, LinkPlan, SELF_CONTACT, is_reserved};

/// Longest delay before an own mailbox's long poll starts in a round
/// ([`ClientCore::poll_schedule`]).
pub const POLL_SPREAD_MAX_MS: u64 = 2_000;
pub use contacts::{AcceptPlan, InvitePlan};
pub use manage::{BlockedInfo, Revoked};

use crate::error::{ClientError, Result};
use crate::state::{
    Notice, OutKind, OutState, OwnedMailbox, PeerMailbox, Receipts, Settings, State,
};

/// One-time keys uploaded to a new mailbox for anonymous prekey fetches (at least one per
/// replica), split into disjoint slices, one per replica.
const PREKEYS_UPLOADED: usize = 4;
/// How long a SURB is remembered beyond its expected use.
const SURB_TTL_MS: u64 = 3600 * 1000;
/// Fragments of an incomplete message are dropped after this.
const PARTIAL_AGE_MAX_MS: u64 = 24 * 3600 * 1000;
const HELLO_PREFIX: &[u8] = b"whispr-hello-v1";
/// The binding of a hello that names a replica set.
const HELLO_PREFIX_V2: &[u8] = b"whispr-hello-v2";

const SAFETY_PREFIX: &[u8] = b"whispr-safety-v1";
/// How long after a release time a scheduled fragment may be retransmitted directly.
const RELEASE_GRACE_MS: u64 = 5_000;
/// Route outcomes older than this do not count towards a relay's health.
const RELAY_HEALTH_WINDOW_MS: u64 = 60 * 1000;
/// Relays whose health is tracked.
const RELAY_HEALTH_MAX: usize = 10_000;

/// A message as a mailbox returns it (poll or stream), the input of
/// [`ClientCore::handle_fetched`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct StoredMessage {
    /// Sequence number.
    pub seq: u64,
    /// `envelope` or `surb_reply`.
    pub kind: String,
    /// Base64 `SealedEnvelope` (kind `envelope`).
    #[serde(default)]
    pub envelope: Option<String>,
    /// SURB id, hex (kind `surb_reply`).
    #[serde(default)]
    pub surb_id: Option<String>,
    /// Base64 sealed reply (kind `surb_reply`).
    #[serde(default)]
    pub payload: Option<String>,
    /// When the node drops it, ms.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// What the core asks its driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Hand `packet` to the ingress of edge relay `edge` (drivers batch by edge). What the
    /// edge refuses is reported with [`ClientCore::note_refused`]; a lost packet is
    /// retransmitted when its ack does not come.
    Transmit {
        /// The edge relay.
        edge: NodeId,
        /// A Sphinx packet.
        packet: Vec<u8>,
    },
    /// Persist the state ([`ClientCore::encode_state`]) before going on with the outputs
    /// after this one.
    Save,
    /// Acknowledge to mailbox `mailbox` on its replica `node` every message up to `up_to`
    /// (sequence numbers of that node; it may delete them, and tells its peers); only after
    /// the preceding [`Output::Save`] is durable.
    Ack {
        /// Mailbox id.
        mailbox: [u8; 32],
        /// The replica the messages were read from.
        node: [u8; 32],
        /// Last sequence number processed.
        up_to: u64,
    },
}

/// What travels end to end, inside Olm.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AppMessage {
    /// The acceptor's first message: where to answer, bound to its identity key.
    Hello {
        identity: String,
        curve: String,
        mailbox: String,
        mailbox_key: String,
        access: String,
        binding: String,
        /// The node of the acceptor's mailbox, pinned (absent from hellos of clients that
        /// did not pin; the receiver then pins the directory's placement).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The replica set of the acceptor's mailbox, pinned (hellos since replication; the
        /// binding then signs [`HELLO_PREFIX_V2`]'s transcript).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replicas: Option<Vec<String>>,
    },
    /// A text.
    Text {
        body: String,
        sent_ms: u64,
        expire_after_ms: Option<u64>,
    },
    /// Receipts for message ids (hex).
    Receipt { kind: String, of: Vec<String> },
    /// The sender's account's devices, signed by its identity key.
    Devices { list: crate::state::DeviceList },
    /// To the account's other devices: this one sent `body` to the contact whose mailbox (ours
    /// for them) is `contact`.
    SyncSent {
        contact: String,
        id: String,
        body: String,
        sent_ms: u64,
        expire_after_ms: Option<u64>,
    },
    /// To the account's other devices: these messages were shown here.
    SyncRead { contact: String, of: Vec<String> },
    /// To the account's other devices, from the primary: a contact made or changed.
    SyncContact {
        contact: Box<devices::ContactRecord>,
    },
    /// To a new device, from the primary: the account.
    LinkTransfer { transfer: Box<devices::Transfer> },
    /// From a new device to the primary: it has the account.
    LinkDone { curve: String },
    /// To the account's other devices: a scheduled send is held by timer nodes (with what
    /// cancelling it takes).
    SyncScheduled {
        contact: String,
        out: Box<devices::ScheduledCopy>,
    },
    /// To the account's other devices: a scheduled send was cancelled.
    SyncCancelled { id: String },
}

/// Options of [`ClientCore::send`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SendOptions {
    /// Release time (ms): hand the message to a timer node until then.
    pub at_ms: Option<u64>,
    /// Disappearing message: the mailbox drops it and the recipient deletes it this long
    /// after it is sent (or released).
    pub expire_after: Option<std::time::Duration>,
}

/// A received message, as shown to the user.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Received {
    /// Contact name.
    pub from: String,
    /// The text.
    pub text: String,
    /// Sender's clock, ms.
    pub sent_ms: u64,
    /// Arrival, ms.
    pub received_ms: u64,
    /// Deleted locally at this time (disappearing message).
    pub expires_ms: Option<u64>,
    /// Sent by the user (from another of their devices) to `from`, not received from them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub outgoing: bool,
    /// Already read on another device of the account.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_elsewhere: bool,
}

/// A contact as listed.
#[derive(Clone, Debug, Serialize)]
pub struct ContactInfo {
    /// Name.
    pub name: String,
    /// `pending` (our invitation, not answered), `waiting` (we accepted, no answer yet),
    /// `answering` (they answered our invitation; their hello, which says where to write to
    /// them, has not arrived yet) or `established`.
    pub state: String,
    /// Safety number verified by the user.
    pub verified: bool,
    /// The contact's devices this client encrypts for (1 until their list arrives).
    pub devices: usize,
}

/// An outgoing message, as reported by `status`.
#[derive(Clone, Debug, Serialize)]
pub struct OutgoingInfo {
    /// Local id.
    pub id: u64,
    /// Contact.
    pub contact: String,
    /// `text`, `hello` or `receipt`.
    pub kind: OutKind,
    /// State.
    pub state: OutState,
    /// Fragments acknowledged by the mailbox.
    pub fragments_acked: usize,
    /// Fragments.
    pub fragments: usize,
    /// Retransmitted fragments.
    pub retransmissions: u32,
    /// Release time of a scheduled send.
    pub release_ms: Option<u64>,
}

/// The client core (see the module documentation).
pub struct ClientCore {
    state: State,
    /// `state.identity_seed`'s key (derived once: it is needed for every envelope sealed
    /// or opened, and the seed never changes).
    identity_key: SigningKey,
    account: Account,
    /// Olm sessions, at most `settings.olm_sessions_live` of them ready ([`sessions`]).
    sessions: sessions::Sessions,
    rng: StdRng,
    crypto_rng: StdRng,
    codec: Box<dyn PacketCodec>,
    directory: Option<Arc<Directory>>,
    last_surb_route: Vec<String>,
    refused: BTreeMap<String, u64>,
    outputs: VecDeque<Output>,
    /// The time of the input being handled, ms.
    now: u64,
    /// Queued messages could not be sent (no route): not tried again before this, ms.
    pump_blocked_until: u64,
    /// Prekey requests sent per contact being accepted (each goes to the next replica).
    prekey_requests: BTreeMap<String, u32>,
}

impl std::fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCore")
            .field("contacts", &self.state.contacts.len())
            .finish_non_exhaustive()
    }
}

fn h32(s: &str, what: &'static str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| ClientError::Olm(format!("{what}: not 32 hex bytes")))?;
    Ok(out)
}

fn epoch_at(ms: u64) -> KeyEpoch {
    KeyEpoch::containing(UnixTime(ms), KEY_EPOCH_LEN)
}

fn fingerprint(ed: &[u8; 32], curve: &[u8; 32]) -> String {
    let mut h: Vec<u8> = [SAFETY_PREFIX, ed, curve].concat();
    for _ in 0..5200 {
        let mut d = Sha512::new();
        d.update(&h);
        d.update(ed);
        d.update(curve);
        h = d.finalize().to_vec();
    }
    h.chunks(5)
        .take(6)
        .map(|c| {
            let v = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", v % 100_000)
        })
        .collect()
}

/// How a hello pins where to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pinning {
    /// Nothing pinned (clients from before pinning).
    None,
    /// One node (`PeerMailbox::node`).
    Node,
    /// A replica set (`PeerMailbox::replicas`).
    Replicas,
}

/// What a hello's binding signs: where to answer, and (when pinned) on which node(s):
/// `"whispr-hello-v1" ‖ curve ‖ mailbox ‖ key ‖ access [‖ node]`, or for a replica set
/// `"whispr-hello-v2" ‖ curve ‖ mailbox ‖ key ‖ access ‖ n (u8) ‖ n × node`.
fn hello_transcript(curve: &[u8; 32], mailbox: &PeerMailbox, pinned: Pinning) -> Vec<u8> {
    let head = |prefix: &[u8]| {
        [
            prefix,
            curve.as_slice(),
            mailbox.id.as_slice(),
            mailbox.key.as_slice(),
            mailbox.access.as_slice(),
        ]
        .concat()
    };
    match pinned {
        Pinning::None => head(HELLO_PREFIX),
        Pinning::Node => [head(HELLO_PREFIX), mailbox.node.to_vec()].concat(),
        Pinning::Replicas => {
            let mut t = head(HELLO_PREFIX_V2);
            t.push(u8::try_from(mailbox.replicas.len()).unwrap_or(u8::MAX));
            for n in &mailbox.replicas {
                t.extend_from_slice(n);
            }
            t
        }
    }
}

/// The owner signing key of a mailbox.
pub fn owner_key(m: &OwnedMailbox) -> SigningKey {
    SigningKey::from_bytes(&m.owner_seed)
}

/// Whether an outgoing message still needs work (acks, holds or a cancel).
fn active(state: OutState) -> bool {
    matches!(
        state,
        OutState::Sending | OutState::Scheduled | OutState::Held | OutState::Cancelling
    )
}

impl ClientCore {
    /// A new client: a fresh identity (from `crypto_rng`) and Olm account, no contacts;
    /// decisions and ids are drawn from `rng`.
    pub fn new(
        directory_url: &str,
        settings: Settings,
        rng: StdRng,
        mut crypto_rng: StdRng,
    ) -> ClientCore {
        use rand::Rng;
        let mut identity_seed = [0u8; 32];
        crypto_rng.fill_bytes(&mut identity_seed);
        let state = State {
            version: 1,
            directory_url: directory_url.trim_end_matches('/').to_string(),
            identity_seed,
            account: None,
            settings,
            contacts: Vec::new(),
            invitations: Vec::new(),
            outbox: Vec::new(),
            surbs: Vec::new(),
            partial: Vec::new(),
            history: Vec::new(),
            notices: Vec::new(),
            prekey_replies: Vec::new(),
            next_id: 1,
            cover_sent: 0,
            relay_health: Vec::new(),
            receipts_due: Vec::new(),
            blocked: Vec::new(),
            erasures: Vec::new(),
            device_name: "primary".to_string(),
            linked_to: None,
            devices: None,
            device_logins: Vec::new(),
            links: Vec::new(),
            read_elsewhere: Default::default(),
            removals: Vec::new(),
        };
        ClientCore::with_state(state, Account::new(), HashMap::new(), rng, crypto_rng)
    }

    fn with_state(
        state: State,
        account: Account,
        sessions: HashMap<String, Session>,
        rng: StdRng,
        crypto_rng: StdRng,
    ) -> ClientCore {
        let mut bounded = sessions::Sessions::new(state.settings.olm_sessions_live);
        for (k, s) in sessions {
            bounded.insert(k, s);
        }
        ClientCore {
            identity_key: SigningKey::from_bytes(&state.identity_seed),
            state,
            account,
            sessions: bounded,
            rng,
            crypto_rng,
            codec: Box::new(SphinxCodec),
            directory: None,
            last_surb_route: Vec::new(),
            refused: BTreeMap::new(),
            outputs: VecDeque::new(),
            now: 0,
            pump_blocked_until: 0,
            prekey_requests: BTreeMap::new(),
        }
    }

    /// A client from the bytes of [`Self::encode_state`]; what expired by `now` is dropped.
    pub fn decode_state(
        bytes: &[u8],
        now: u64,
        rng: StdRng,
        crypto_rng: StdRng,
    ) -> Result<ClientCore> {
        let mut state: State = serde_json::from_slice(bytes)
            .map_err(|e| ClientError::CorruptState(format!("state: {e}")))?;
        let account = state
            .account
            .take()
            .map(Account::from_pickle)
            .ok_or_else(|| ClientError::CorruptState("no Olm account".to_string()))?;
        let mut sessions = HashMap::new();
        for c in &mut state.contacts {
            if let Some(p) = c.session.take() {
                sessions.insert(c.name.clone(), Session::from_pickle(*p));
            }
            for (curve, p) in std::mem::take(&mut c.device_sessions) {
                sessions.insert(format!("{}#{curve}", c.name), Session::from_pickle(p));
            }
        }
        for m in state
            .contacts
            .iter_mut()
            .map(|c| &mut c.mine)
            .chain(state.invitations.iter_mut().map(|i| &mut i.mailbox))
        {
            m.upgrade();
        }
        let mut core = ClientCore::with_state(state, account, sessions, rng, crypto_rng);
        core.now = now;
        core.purge_expired();
        Ok(core)
    }

    /// The whole state with the Olm account and sessions, for the encrypted vault.
    pub fn encode_state(&mut self) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        self.state.account = Some(self.account.pickle());
        for c in &mut self.state.contacts {
            c.session = self.sessions.pickle(&c.name).map(Box::new);
            let prefix = format!("{}#", c.name);
            c.device_sessions = self
                .sessions
                .keys()
                .filter_map(|k| {
                    Some((
                        k.strip_prefix(&prefix)?.to_string(),
                        self.sessions.pickle(k)?,
                    ))
                })
                .collect();
        }
        let bytes = serde_json::to_vec(&self.state)
            .map_err(|e| ClientError::CorruptState(format!("encoding: {e}")));
        self.state.account = None;
        for c in &mut self.state.contacts {
            c.session = None;
            c.device_sessions = Vec::new();
        }
        bytes.map(zeroize::Zeroizing::new)
    }

    /// Replaces the packet codec (Sphinx by default; the simulator's fast mode swaps it).
    pub fn set_codec(&mut self, codec: Box<dyn PacketCodec>) {
        self.codec = codec;
    }

    /// The dedup ids of outgoing message `id`'s fragments, in order (the mailbox node sees
    /// them; the simulator follows fragments by them).
    pub fn fragment_dedups(&self, id: u64) -> Vec<[u8; 16]> {
        self.out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map(|o| o.fragments.iter().map(|f| f.dedup).collect())
            .unwrap_or_default()
    }

    fn at(&mut self, now: u64) {
        self.now = now;
        // The bound may have changed through `settings_mut` since the last input.
        self.sessions
            .set_live_max(self.state.settings.olm_sessions_live);
    }

    fn push(&mut self, o: Output) {
        if o == Output::Save && self.outputs.back() == Some(&Output::Save) {
            return;
        }
        self.outputs.push_back(o);
    }

    fn save(&mut self) {
        self.push(Output::Save);
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Self::handle_timeout`] should run next (ms): the earliest retransmission, or
    /// now when receipts or queued messages are waiting. `None`: nothing is pending.
    pub fn poll_timeout(&self) -> Option<u64> {
        let after = self.state.settings.retransmit_after_ms;
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        if let Some(due) = self.state.receipts_due.iter().map(|r| r.due_ms).min() {
            at(due);
        }
        let window = self.state.settings.olm_window.max(1);
        let mut in_flight: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &self.state.outbox {
            if o.state == OutState::Sending && o.fragments.iter().any(|f| f.attempts > 0) {
                *in_flight.entry(o.contact.as_str()).or_default() += 1;
            }
        }
        for o in &self.state.outbox {
            match o.state {
                OutState::Sending | OutState::Scheduled | OutState::Held => {
                    let released = o
                        .release_ms
                        .map_or(0, |r| r.saturating_add(RELEASE_GRACE_MS));
                    for f in o.fragments.iter().filter(|f| !f.acked) {
                        if o.state == OutState::Sending && f.attempts == 0 {
                            // Waiting: sent now if the contact's window has room (an ack
                            // opened it), else looked at again a retransmission delay on.
                            let busy = in_flight.get(o.contact.as_str()).copied().unwrap_or(0);
                            at(if busy < window {
                                self.now.max(self.pump_blocked_until)
                            } else {
                                self.now.saturating_add(after)
                            });
                            continue;
                        }
                        at(f.sent_ms.saturating_add(after).max(released));
                    }
                    if o.state == OutState::Scheduled {
                        for h in o.holds.iter().filter(|h| !h.parts_acked.iter().all(|a| *a)) {
                            at(h.sent_ms.saturating_add(after));
                        }
                    }
                }
                OutState::Cancelling => {
                    for h in o.holds.iter().filter(|h| !h.cancel_acked) {
                        at(h.sent_ms.saturating_add(after));
                    }
                }
                _ => {}
            }
        }
        next
    }

    /// Housekeeping at `now`: sends due receipts, retransmits what is overdue, sends what the
    /// windows allow, forgets what expired.
    pub fn handle_timeout(&mut self, now: u64) -> Result<()> {
        self.at(now);
        self.send_receipts();
        let result = self.retransmit_due().and_then(|()| self.pump());
        self.purge_expired();
        self.save();
        result
    }

    /// A directory the driver fetched (and checked); routes are drawn from it from now on.
    /// Shared, not copied: a simulator gives every client the same one.
    pub fn set_directory(&mut self, directory: Arc<Directory>) {
        self.directory = Some(directory);
    }

    /// The directory in use, if any.
    pub fn directory(&self) -> Option<&Directory> {
        self.directory.as_deref()
    }

    fn dir(&self) -> Result<Arc<Directory>> {
        self.directory
            .clone()
            .ok_or_else(|| ClientError::NoRoute("no directory yet".to_string()))
    }

    /// Where the directory is fetched.
    pub fn directory_url(&self) -> &str {
        &self.state.directory_url
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.state.settings
    }

    /// Changes the settings.
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.state.settings
    }

    fn identity(&self) -> SigningKey {
        self.identity_key.clone()
    }

    fn next_id(&mut self) -> u64 {
        let id = self.state.next_id;
        self.state.next_id = id.saturating_add(1);
        id
    }

    fn notice(&mut self, kind: &str, contact: Option<&str>, id: Option<u64>, text: String) {
        self.state.notices.push(Notice {
            at_ms: self.now,
            kind: kind.to_string(),
            contact: contact.map(str::to_string),
            id,
            text,
        });
        let max = self.state.settings.history_max.max(1);
        if self.state.notices.len() > max {
            let excess = self.state.notices.len() - max;
            self.state.notices.drain(..excess);
        }
    }

    fn purge_expired(&mut self) {
        let now = self.now;
        self.state
            .history
            .retain(|h| h.expires_ms.is_none_or(|e| e > now));
        self.state.surbs.retain(|s| s.expires_ms > now);
        self.state
            .partial
            .retain(|p| p.received_ms.saturating_add(PARTIAL_AGE_MAX_MS) > now);
    }

    /// Queues a receipt of `kind` for message `id` of `contact`: with the others of its kind
    /// already waiting, or at a new random time (mean `receipt_delay_ms`, at most six times
    /// it).
    fn queue_receipt(&mut self, contact: &str, kind: &str, id: String) {
        if let Some(r) = self
            .state
            .receipts_due
            .iter_mut()
            .find(|r| r.contact == contact && r.kind == kind)
        {
            if r.ids.len() < 1_000 {
                r.ids.push(id);
            }
            return;
        }
        let mean = self.state.settings.receipt_delay_ms;
        let delay = if mean == 0 {
            0
        } else {
            // 53 random bits → u in (0, 1]; −ln(u) is Exp(1).
            let bits = rand::Rng::next_u64(&mut self.rng) >> 11;
            let u = (bits as f64 + 1.0) / (1u64 << 53) as f64;
            ((-u.ln() * mean as f64) as u64).min(mean.saturating_mul(6))
        };
        self.state.receipts_due.push(crate::state::DueReceipts {
            contact: contact.to_string(),
            kind: kind.to_string(),
            ids: vec![id],
            due_ms: self.now.saturating_add(delay),
        });
    }

    /// Independent schedules for one round of long polls over `n` own mailboxes that waits up
    /// to `wait_ms` (security review finding 8: polls started at one instant, for one wait,
    /// link a user's mailboxes by timing). Per mailbox `(delay_ms, wait_ms)`: the poll starts
    /// after a delay drawn uniformly from `[0, spread]`, `spread = min(wait_ms / 2,`
    /// [`POLL_SPREAD_MAX_MS`]`)`, and waits a time drawn uniformly from `[wait_ms / 2,
    /// wait_ms − delay]`, so neither the starts nor the ends of the polls line up, and the
    /// round still ends within `wait_ms`. A round without a wait (a one-shot fetch) starts
    /// every poll at once.
    pub fn poll_schedule(&mut self, n: usize, wait_ms: u64) -> Vec<(u64, u64)> {
        use rand::RngExt;
        let spread = (wait_ms / 2).min(POLL_SPREAD_MAX_MS);
        (0..n)
            .map(|_| {
                if wait_ms == 0 {
                    return (0, 0);
                }
                let delay = self.rng.random_range(0..=spread);
                let longest = wait_ms.saturating_sub(delay).max(wait_ms / 2);
                (delay, self.rng.random_range(wait_ms / 2..=longest))
            })
            .collect()
    }

    fn out_index(&self, id: u64) -> Option<usize> {
        self.state.outbox.iter().position(|o| o.id == id)
    }

    /// Every mailbox this client owns: one per contact and per pending invitation.
    pub fn owned_mailboxes(&self) -> Vec<OwnedMailbox> {
        self.owned_mailboxes_iter().cloned().collect()
    }

    /// [`Self::owned_mailboxes`] without the copies (a driver that only looks).
    pub fn owned_mailboxes_iter(&self) -> impl Iterator<Item = &OwnedMailbox> {
        self.state
            .contacts
            .iter()
            .map(|c| &c.mine)
            .chain(self.state.invitations.iter().map(|i| &i.mailbox))
    }

    /// Own mailbox `id`, if this client owns it.
    pub fn owned_mailbox(&self, id: &[u8; 32]) -> Option<OwnedMailbox> {
        self.owned_mailbox_ref(id).cloned()
    }

    /// [`Self::owned_mailbox`] without the copy.
    pub fn owned_mailbox_ref(&self, id: &[u8; 32]) -> Option<&OwnedMailbox> {
        self.owned_mailboxes_iter().find(|m| m.id == *id)
    }

    fn mailbox_mut(&mut self, id: &[u8; 32]) -> Option<&mut OwnedMailbox> {
        if let Some(c) = self.state.contacts.iter_mut().find(|c| c.mine.id == *id) {
            return Some(&mut c.mine);
        }
        self.state
            .invitations
            .iter_mut()
            .find(|i| i.mailbox.id == *id)
            .map(|i| &mut i.mailbox)
    }

    /// Records the session token of mailbox `id` on the replica read from now (or forgets
    /// it: `None`, e.g. after a 401).
    pub fn set_token(&mut self, id: &[u8; 32], token: Option<(String, u64)>) {
        let Some(node) = self
            .mailbox_mut(id)
            .and_then(|m| m.current().map(|r| r.node))
        else {
            return;
        };
        self.set_replica_token(id, &node, token);
    }

    /// Records the session token of mailbox `id` on its replica `node` (or forgets it).
    pub fn set_replica_token(
        &mut self,
        id: &[u8; 32],
        node: &[u8; 32],
        token: Option<(String, u64)>,
    ) {
        let Some(r) = self
            .mailbox_mut(id)
            .and_then(|m| m.replicas.iter_mut().find(|r| r.node == *node))
        else {
            return;
        };
        match token {
            Some((t, expires)) => {
                r.token = Some(t);
                r.token_expires_ms = expires;
            }
            None => r.token = None,
        }
    }

    /// Records that mailbox `id` now exists on its replica `node` (created late, after the
    /// node was down at creation), and whether its prekeys are uploaded there.
    pub fn set_replica_created(&mut self, id: &[u8; 32], node: &[u8; 32], prekeys_uploaded: bool) {
        if let Some(r) = self
            .mailbox_mut(id)
            .and_then(|m| m.replicas.iter_mut().find(|r| r.node == *node))
        {
            r.created = true;
            if prekeys_uploaded {
                r.prekeys = None;
            }
        }
        self.save();
    }

    /// What the driver did creating own mailbox `m` (per replica: created, prekeys uploaded,
    /// token; which one to read from) replaces what the core held of its replicas.
    pub fn mailbox_created(&mut self, m: &OwnedMailbox) {
        if let Some(mine) = self.mailbox_mut(&m.id) {
            mine.replicas = m.replicas.clone();
            mine.reading = m.reading;
        }
        self.save();
    }

    /// Own mailboxes with a replica the mailbox was not created on yet (or whose prekeys are
    /// not uploaded there yet): (mailbox, that replica's node), for the driver to retry.
    pub fn replicas_to_create(&self) -> Vec<(OwnedMailbox, [u8; 32])> {
        self.owned_mailboxes()
            .into_iter()
            .flat_map(|m| {
                m.replicas
                    .iter()
                    .filter(|r| !r.created || r.prekeys.is_some())
                    .map(|r| r.node)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(move |n| (m.clone(), n))
            })
            .collect()
    }

    /// Mailbox `id`'s replica `node` refused our cursor as beyond its last message: it lost
    /// its disk and numbers anew (repaired from its peers). It is read from the start again;
    /// what was read before is dropped as duplicates.
    pub fn reset_cursor(&mut self, id: &[u8; 32], node: &[u8; 32]) {
        if let Some(r) = self
            .mailbox_mut(id)
            .and_then(|m| m.replicas.iter_mut().find(|r| r.node == *node))
        {
            r.cursor = 0;
        }
        self.save();
    }

    /// Mailbox `id`'s replica read from failed (an error or a timeout): reading moves to the
    /// next replica of its set that exists and is in the directory (the one after it in
    /// pinned order, cyclically); the replica read from now. With one replica, it stays.
    ///
    /// The new replica is read from the start (cursor 0): while we read elsewhere it may have
    /// lost its disk and been repaired, numbering its messages anew, and a stale cursor would
    /// skip them. It serves only what this device has not acknowledged (acks reach every
    /// replica); what it serves again that was read elsewhere is dropped as duplicates.
    pub fn fail_over(&mut self, id: &[u8; 32]) -> Option<[u8; 32]> {
        let dir = self.directory.clone();
        let m = self.mailbox_mut(id)?;
        let n = m.replicas.len();
        let from = m.reading;
        let next = (1..n).map(|i| (from + i) % n).find(|&i| {
            m.replicas.get(i).is_some_and(|r| {
                r.created
                    && dir
                        .as_deref()
                        .is_none_or(|d| d.get(&NodeId(r.node)).is_some())
            })
        });
        if let Some(i) = next {
            m.reading = i;
            if let Some(r) = m.replicas.get_mut(i) {
                r.cursor = 0;
            }
        }
        let node = m.current().map(|r| r.node);
        self.save();
        node
    }

    /// Counts `count` packets an edge relay did not take, by `reason` (a drop reason such as
    /// `rate_limited`, an HTTP status, or `unreachable`).
    pub fn note_refused(&mut self, reason: &str, count: u64) {
        *self.refused.entry(reason.to_string()).or_default() += count;
    }

    /// Packets an edge relay did not take since this core was made, by reason; they are
    /// retransmitted like lost ones.
    pub fn refused_packets(&self) -> &BTreeMap<String, u64> {
        &self.refused
    }

    /// Cover packets sent by this client so far.
    pub fn cover_sent(&self) -> u64 {
        self.state.cover_sent
    }

    /// The state of outgoing message `id`.
    pub fn out_state(&self, id: u64) -> Option<OutState> {
        self.out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map(|o| o.state)
    }

    /// Received messages not shown yet, oldest first; marks them shown and, if the user sends
    /// read receipts, queues them (sent at the next [`Self::handle_timeout`]).
    pub fn take_unread(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        let mut read = Vec::new();
        let mut shown = Vec::new();
        for h in &mut self.state.history {
            if !h.shown {
                h.shown = true;
                out.push(Received {
                    from: h.contact.clone(),
                    text: h.text.clone(),
                    sent_ms: h.sent_ms,
                    received_ms: h.received_ms,
                    expires_ms: h.expires_ms,
                    outgoing: h.outgoing,
                    read_elsewhere: h.read_elsewhere,
                });
                if h.read_elsewhere {
                    // Its read receipt left from the device that showed it first.
                    continue;
                }
                shown.push((h.contact.clone(), h.message_id.clone()));
                if self.state.settings.receipts == Receipts::Read {
                    read.push((h.contact.clone(), h.message_id.clone()));
                }
            }
        }
        for (contact, id) in read {
            self.queue_receipt(&contact, "read", id);
        }
        // The other devices of the account mark them read too (and send no receipt).
        self.sync_read(&shown);
        out
    }

    /// Notices (delivery, failures, identity changes, …) not shown yet; clears them.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.state.notices)
    }

    /// The local history of `name` at `now` (disappearing messages past their time are gone).
    pub fn history(&self, name: &str, now: u64) -> Vec<Received> {
        self.state
            .history
            .iter()
            .filter(|h| h.contact == name && h.expires_ms.is_none_or(|e| e > now))
            .map(|h| Received {
                from: h.contact.clone(),
                text: h.text.clone(),
                sent_ms: h.sent_ms,
                received_ms: h.received_ms,
                expires_ms: h.expires_ms,
                outgoing: h.outgoing,
                read_elsewhere: h.read_elsewhere,
            })
            .collect()
    }

    /// Contacts and pending invitations.
    pub fn contacts(&self) -> Vec<ContactInfo> {
        self.state
            .contacts
            .iter()
            .filter(|c| !is_reserved(&c.name))
            .map(|c| ContactInfo {
                name: c.name.clone(),
                state: if c.theirs.is_none() {
                    "answering".to_string()
                } else if c.heard_from {
                    "established".to_string()
                } else {
                    "waiting".to_string()
                },
                verified: c.verified,
                devices: c.their_devices.as_ref().map_or(1, |l| l.devices.len()),
            })
            .chain(self.state.invitations.iter().map(|i| ContactInfo {
                name: i.name.clone(),
                state: "pending".to_string(),
                verified: false,
                devices: 0,
            }))
            .collect()
    }

    /// Our mailbox for contact `name` (where they deposit).
    pub fn contact_mailbox(&self, name: &str) -> Result<OwnedMailbox> {
        self.contact(name).map(|c| c.mine.clone())
    }

    /// The safety number shared with `name`: 60 digits that both sides compute from both
    /// identity keys (Ed25519 and Curve25519); compare them out of band.
    pub fn safety_number(&self, name: &str) -> Result<String> {
        let c = self.contact(name)?;
        // Per account, not per device: linking a device changes no safety number.
        let mine = fingerprint(&self.account_identity(), &self.account_curve());
        let theirs = fingerprint(&c.their_identity, &c.their_curve);
        let (a, b) = if mine <= theirs {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        let digits = format!("{a}{b}");
        Ok(digits
            .as_bytes()
            .chunks(5)
            .map(|c| String::from_utf8_lossy(c).to_string())
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Marks `name` as verified (after comparing safety numbers).
    pub fn set_verified(&mut self, name: &str) -> Result<()> {
        let c = self
            .state
            .contacts
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| ClientError::UnknownContact(name.to_string()))?;
        c.verified = true;
        self.save();
        Ok(())
    }

    /// Outgoing messages still in flight (sending, scheduled, cancelling) and the last
    /// finished ones.
    pub fn status(&self) -> Vec<OutgoingInfo> {
        self.state
            .outbox
            .iter()
            .filter(|o| o.kind != OutKind::Sync)
            .map(|o| OutgoingInfo {
                id: o.id,
                contact: o.contact.clone(),
                kind: o.kind,
                state: o.state,
                fragments_acked: o.fragments.iter().filter(|f| f.acked).count(),
                fragments: o.fragments.len(),
                retransmissions: o.retransmissions,
                release_ms: o.release_ms,
            })
            .collect()
    }

    /// The identity keys (Ed25519, Curve25519) as hex, for display.
    pub fn identity_keys(&self) -> (String, String) {
        (
            hex::encode(self.identity().verifying_key().to_bytes()),
            hex::encode(self.account.curve25519_key().to_bytes()),
        )
    }
}

#[cfg(test)]
mod tests;
