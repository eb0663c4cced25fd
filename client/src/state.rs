//! What the client keeps in its (encrypted) home directory. Plain data, serialised as JSON
//! inside the sealed state file (`vault.rs`); every table is bounded by [`Settings`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vodozemac::olm::{AccountPickle, SessionPickle};

/// Serde helpers: fixed-size byte arrays as hex, byte strings as base64.
pub(crate) mod hexa {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; N];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Serde helper: a list of 32-byte ids as hex strings.
pub(crate) mod hexes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(t, &mut out).map(|()| out)
            })
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Which receipts this client sends (it always accepts the ones it gets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Receipts {
    /// None.
    None,
    /// "Delivered" when a message is received and decrypted.
    Delivery,
    /// "Delivered", and "read" when it is shown.
    Read,
}

/// The user's settings and the bounds of every table in the state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Receipts sent to contacts.
    pub receipts: Receipts,
    /// Mix layers per route; `None` uses every layer the directory has (at most 3).
    pub mix_layers: Option<u32>,
    /// Mean mixing delay per hop (exponential, Loopix), in ms. 0 turns mixing off.
    pub mix_delay_ms: u64,
    /// A fragment not acknowledged within this is retransmitted on a fresh route.
    pub retransmit_after_ms: u64,
    /// Sends of one fragment before the message is reported as failed.
    pub attempts_max: u32,
    /// Retention asked for new mailboxes (the node caps it).
    pub retention_ms: u64,
    /// Cover traffic while `recv --follow` runs: Poisson rate in packets per minute (0: off).
    pub cover_per_min: f64,
    /// Long-poll wait per mailbox, in ms.
    pub poll_wait_ms: u64,
    /// Most received messages kept in the local history.
    pub history_max: usize,
    /// Most outstanding reply blocks (acks awaited).
    pub surbs_max: usize,
    /// Most outgoing messages tracked (sending, or finished and kept for `status`).
    pub outbox_max: usize,
    /// Most bytes of partly received messages kept.
    pub partial_bytes_max: usize,
    /// Message ids remembered per contact to drop duplicates.
    pub seen_max: usize,
    /// Largest message accepted for sending, in bytes.
    pub message_bytes_max: usize,
    /// Messages per contact in flight (sent, not yet stored) at once; later ones wait. The
    /// mixnet reorders packets and an Olm receiver keeps only 40 skipped message keys per
    /// chain, so more than that in flight could make messages undecryptable. Keep it below 40.
    pub olm_window: usize,
    /// Olm sessions kept ready in memory (the most recently used, at least one); the
    /// others are kept pickled (1.1–2.8 KB each against 3.7 KiB ready) and unpickled when
    /// used again. Matters to a client with many contacts.
    pub olm_sessions_live: usize,
    /// Mean of the random delay before a receipt leaves (exponential, at most six times the
    /// mean), so that a deposit does not follow the poll that fetched the message it answers
    /// (security review finding 5). 0 sends receipts in the same round.
    pub receipt_delay_ms: u64,
    /// The pinned directory authorities: the network file's text (`whispr-network 1`, the
    /// threshold, one `authority KEY URL` line each; `docs/protocol.md`). When set, a
    /// directory is accepted only as a consensus with the threshold of their signatures,
    /// fetched from `directory_url` (a mere mirror) or from the authorities themselves.
    /// When unset, no directory is accepted at all (a client never trusts an unsigned one),
    /// so the client can neither send nor receive: `whispr init` requires `--network`.
    pub network: Option<String>,
    /// Replicas of each new mailbox (R; `docs/replication.md`): the owner creates it on this
    /// many mailbox nodes (at most `REPLICAS_MAX`, and no more than the directory has).
    pub replicas: usize,
}

/// Mean mixing delay per hop of a client whose network states none (ms).
pub const DEFAULT_MIX_DELAY_MS: u64 = 200;
/// Cover packets per minute while following, for a client whose network states none.
pub const DEFAULT_COVER_PER_MIN: f64 = 2.0;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            receipts: Receipts::Read,
            mix_layers: None,
            // Security review finding 5: 50 ms and no cover let a global passive observer
            // name the sender of about one message in four (docs/security-review-status.md,
            // "5 — the defaults"). A network's file may state its own (`mixing` line).
            mix_delay_ms: DEFAULT_MIX_DELAY_MS,
            retransmit_after_ms: 10_000,
            attempts_max: 5,
            retention_ms: 7 * 24 * 3600 * 1000,
            cover_per_min: DEFAULT_COVER_PER_MIN,
            poll_wait_ms: 1_000,
            history_max: 1_000,
            surbs_max: 20_000,
            outbox_max: 1_000,
            partial_bytes_max: 8 * 1024 * 1024,
            seen_max: 10_000,
            message_bytes_max: 1024 * 1024 - 4096,
            olm_window: 32,
            olm_sessions_live: 64,
            receipt_delay_ms: 10_000,
            network: None,
            replicas: 3,
        }
    }
}

/// One replica of an own mailbox: a mailbox node that holds it, and this client's reading
/// state there (cursors and tokens are per node: each numbers what it stores).
#[derive(Clone, Serialize, Deserialize)]
pub struct Replica {
    /// The node.
    #[serde(with = "hexa")]
    pub node: [u8; 32],
    /// Its API.
    pub api_url: String,
    /// Last sequence number processed from this node.
    #[serde(default)]
    pub cursor: u64,
    /// Session token on this node.
    #[serde(default)]
    pub token: Option<String>,
    /// When the token expires (ms).
    #[serde(default)]
    pub token_expires_ms: u64,
    /// The mailbox exists there. False while its creation failed (the node was down):
    /// retried by the driver until it succeeds.
    #[serde(default = "yes")]
    pub created: bool,
    /// The `PUT /prekeys` body still to upload there (its slice of the one-time keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prekeys: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// A mailbox this client owns (one per contact relationship).
#[derive(Clone, Serialize, Deserialize)]
pub struct OwnedMailbox {
    /// Mailbox id.
    #[serde(with = "hexa")]
    pub id: [u8; 32],
    /// HPKE secret key envelopes are sealed to.
    #[serde(with = "hexa")]
    pub secret: [u8; 32],
    /// Owner (and only device) Ed25519 seed; a fresh key per mailbox, so that nodes cannot
    /// link a user's mailboxes.
    #[serde(with = "hexa")]
    pub owner_seed: [u8; 32],
    /// The access key given to the contact.
    #[serde(with = "hexa")]
    pub access: [u8; 32],
    /// Mints the ids of SURBs leading back here.
    #[serde(with = "hexa")]
    pub reply_key: [u8; 32],
    /// The first node of the replica set (the only node of a mailbox made before
    /// replication).
    #[serde(with = "hexa")]
    pub node: [u8; 32],
    /// The replica set, pinned at creation, in its pinned order (states from before
    /// replication have none: it is made from the single node's fields when the state is
    /// read, see [`OwnedMailbox::upgrade`]).
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// Index in `replicas` of the replica read from (the next one on a failure).
    #[serde(default)]
    pub reading: usize,
    /// Retention asked for at creation (to create it later on a replica that was down).
    #[serde(default)]
    pub retention_ms: u64,
    /// The node's API (states from before replication only).
    #[serde(default, rename = "api_url", skip_serializing)]
    pub(crate) legacy_api_url: String,
    /// Last sequence number processed (states from before replication only).
    #[serde(default, rename = "cursor", skip_serializing)]
    pub(crate) legacy_cursor: u64,
    /// Session token (states from before replication only).
    #[serde(default, rename = "token", skip_serializing)]
    pub(crate) legacy_token: Option<String>,
    /// Token expiry (states from before replication only).
    #[serde(default, rename = "token_expires_ms", skip_serializing)]
    pub(crate) legacy_token_expires_ms: u64,
}

impl OwnedMailbox {
    /// Moves the single node of a state from before replication into a replica set of one.
    pub(crate) fn upgrade(&mut self) {
        if self.replicas.is_empty() {
            self.replicas.push(Replica {
                node: self.node,
                api_url: std::mem::take(&mut self.legacy_api_url),
                cursor: self.legacy_cursor,
                token: self.legacy_token.take(),
                token_expires_ms: self.legacy_token_expires_ms,
                created: true,
                prekeys: None,
            });
        }
        if self.reading >= self.replicas.len() {
            self.reading = 0;
        }
    }

    /// The replica read from now.
    pub fn current(&self) -> Option<&Replica> {
        self.replicas.get(self.reading).or(self.replicas.first())
    }

    /// Replica on `node`.
    pub fn replica(&self, node: &[u8; 32]) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.node == *node)
    }

    /// The node ids of the replica set, in pinned order.
    pub fn replica_nodes(&self) -> Vec<[u8; 32]> {
        self.replicas.iter().map(|r| r.node).collect()
    }
}

/// A contact's mailbox, where this client deposits.
#[derive(Clone, Serialize, Deserialize)]
pub struct PeerMailbox {
    /// Mailbox id.
    #[serde(with = "hexa")]
    pub id: [u8; 32],
    /// HPKE public key.
    #[serde(with = "hexa")]
    pub key: [u8; 32],
    /// Access key.
    #[serde(with = "hexa")]
    pub access: [u8; 32],
    /// The node holding it, pinned when the relationship was made (all zero in states
    /// written before pinning: placement from the directory then); the first replica of a
    /// replicated one.
    #[serde(with = "hexa", default)]
    pub node: [u8; 32],
    /// Its replica set, pinned (in order: attempt k of a deposit goes to replica k mod R).
    /// Empty in states from before replication: the single `node` then.
    #[serde(with = "hexes", default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<[u8; 32]>,
}

impl PeerMailbox {
    /// The pinned replica set: `replicas`, or the single pinned `node`; empty when nothing is
    /// pinned (a relationship from before pinning).
    pub fn replica_set(&self) -> Vec<[u8; 32]> {
        if !self.replicas.is_empty() {
            self.replicas.clone()
        } else if self.node != [0u8; 32] {
            vec![self.node]
        } else {
            Vec::new()
        }
    }
}

/// A contact relationship.
#[derive(Serialize, Deserialize)]
pub struct Contact {
    /// Local name.
    pub name: String,
    /// Where the contact deposits for us.
    pub mine: OwnedMailbox,
    /// Where we deposit for the contact (unknown until their hello arrives).
    pub theirs: Option<PeerMailbox>,
    /// Their Ed25519 identity key (sealed-sender certificates).
    #[serde(with = "hexa")]
    pub their_identity: [u8; 32],
    /// Their Curve25519 Olm identity key.
    #[serde(with = "hexa")]
    pub their_curve: [u8; 32],
    /// The Olm session (taken out while the client runs; see `Client::save`). Boxed: a
    /// pickle is ≈ 3.7 KiB inline (vodozemac keeps its receiving chains in an array), which
    /// every contact would otherwise carry while it is `None`. Same JSON either way.
    pub session: Option<Box<SessionPickle>>,
    /// True once something from them was decrypted.
    pub heard_from: bool,
    /// Set by the user after comparing safety numbers.
    pub verified: bool,
    /// Message ids already received (bounded), newest last.
    pub seen: VecDeque<String>,
    /// For a contact who answered our invitation: its one-time key (to recognise a second
    /// acceptor of the same invitation).
    pub invitation_key: Option<[u8; 32]>,
    /// Created, ms.
    pub created_ms: u64,
    /// The replica of the contact's mailbox that acknowledged our last deposit (hex node id):
    /// the first attempt of the next deposit goes there, so that a dead replica costs one
    /// retransmission timeout once, not on every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deposit_replica: Option<String>,
    /// The contact's devices, as their account's identity key signed them (`None` until a
    /// list arrives: the contact is then one device, `their_curve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub their_devices: Option<DeviceList>,
    /// The version of our own device list this contact was last sent (0: never).
    #[serde(default)]
    pub devices_sent: u64,
    /// Olm sessions with the contact's devices other than `their_curve`'s (taken out while
    /// the client runs): (device Curve25519 key, hex; the session).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_sessions: Vec<(String, SessionPickle)>,
}

/// One device of an account, as the account's signed device list names it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The name its user gave it (sent to the account's own devices only; not signed).
    #[serde(default)]
    pub name: String,
    /// Its sealed-sender Ed25519 key (the account's identity key for the primary device).
    #[serde(with = "hexa")]
    pub ed: [u8; 32],
    /// Its Olm identity key (Curve25519).
    #[serde(with = "hexa")]
    pub curve: [u8; 32],
    /// Its Olm fallback key: anyone holding the list can start a session with it.
    #[serde(with = "hexa")]
    pub fallback: [u8; 32],
    /// Linked, ms (the device's own clock at the primary).
    #[serde(default)]
    pub added_ms: u64,
}

/// An account's devices (at most [`DEVICES_MAX`]), signed by its identity key: contacts
/// encrypt for every device listed and accept messages from those only.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceList {
    /// Grows by one at every change; an older list is ignored.
    pub version: u64,
    /// The devices, the primary first.
    pub devices: Vec<DeviceEntry>,
    /// The identity key's signature over the list's transcript (keys and version).
    #[serde(with = "hexa")]
    pub signature: [u8; 64],
}

/// Most devices of one account (the primary and five linked ones, as Signal allows).
pub const DEVICES_MAX: usize = 6;

/// A linked device's mailbox logins, as its primary keeps them: the secret its per-mailbox
/// login keys derive from, and the mailboxes where they are registered.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceLogin {
    /// The device's Olm identity key.
    #[serde(with = "hexa")]
    pub curve: [u8; 32],
    /// The login secret (also held by the device).
    #[serde(with = "hexa")]
    pub secret: [u8; 32],
    /// Own mailboxes where its login key is registered on every replica.
    #[serde(with = "hexes", default)]
    pub registered: Vec<[u8; 32]>,
}

/// The account a linked device belongs to.
#[derive(Clone, Serialize, Deserialize)]
pub struct LinkedTo {
    /// The account's Ed25519 identity key (the primary holds its secret).
    #[serde(with = "hexa")]
    pub identity: [u8; 32],
    /// The primary's Olm identity key (safety numbers are computed from these two).
    #[serde(with = "hexa")]
    pub curve: [u8; 32],
    /// The secret this device's per-mailbox login keys derive from.
    #[serde(with = "hexa")]
    pub login_secret: [u8; 32],
}

/// A linking code this primary issued ([`crate::ClientCore::link_prepare`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingLink {
    /// The name the new device will have.
    pub name: String,
    /// The link mailbox's id (the `~link` contact's).
    #[serde(with = "hexa")]
    pub mailbox: [u8; 32],
    /// The code stops working then, ms.
    pub expires_ms: u64,
    /// The new device's request, once it came (the code then works no more).
    #[serde(default)]
    pub request: Option<LinkRequest>,
    /// Confirmed by the user and the transfer queued.
    #[serde(default)]
    pub confirmed: bool,
    /// The new device said it has the account.
    #[serde(default)]
    pub done: bool,
}

/// What a new device sends to the link mailbox (public keys, bound to the code).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkRequest {
    /// Its sealed-sender Ed25519 key.
    #[serde(with = "hexa")]
    pub ed: [u8; 32],
    /// Its Olm identity key.
    #[serde(with = "hexa")]
    pub curve: [u8; 32],
    /// Its Olm fallback key.
    #[serde(with = "hexa")]
    pub fallback: [u8; 32],
    /// Its login key for the link mailbox (to read the transfer there).
    #[serde(with = "hexa")]
    pub login: [u8; 32],
    /// HMAC-SHA-256 under the code's link key over the fields above.
    #[serde(with = "hexa")]
    pub mac: [u8; 32],
}

/// An invitation this client issued and nobody has answered yet (or that was answered and is
/// kept to recognise reuse).
#[derive(Serialize, Deserialize)]
pub struct PendingInvitation {
    /// Name for the contact who answers.
    pub name: String,
    /// Its mailbox.
    pub mailbox: OwnedMailbox,
    /// The one-time key in it.
    #[serde(with = "hexa")]
    pub one_time_key: [u8; 32],
    /// Created, ms.
    pub created_ms: u64,
}

/// What an outgoing message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutKind {
    /// A text.
    Text,
    /// The first message after accepting an invitation.
    Hello,
    /// A delivery or read receipt.
    Receipt,
    /// Between an account's devices, or its device list to a contact (not shown).
    Sync,
}

/// Where an outgoing message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutState {
    /// Fragments still unacknowledged.
    Sending,
    /// Handed to timer nodes, not yet acknowledged by all of them.
    Scheduled,
    /// Held by timer nodes until its time (every part acknowledged).
    Held,
    /// Cancel sent, not yet acknowledged.
    Cancelling,
    /// Cancelled: the timer node dropped it.
    Cancelled,
    /// Every fragment stored in the contact's mailbox.
    Stored,
    /// The contact's client received it.
    Delivered,
    /// The contact read it.
    Read,
    /// Gave up after `attempts_max` sends of a fragment.
    Failed,
}

/// One fragment of an outgoing message.
#[derive(Clone, Serialize, Deserialize)]
pub struct OutFragment {
    /// Dedup id (the same on every retransmission).
    #[serde(with = "hexa")]
    pub dedup: [u8; 16],
    /// The sealed envelope, without its ack SURB (a fresh one is attached per send).
    #[serde(with = "b64")]
    pub envelope: Vec<u8>,
    /// Acknowledged by the mailbox.
    pub acked: bool,
    /// Sends so far.
    pub attempts: u32,
    /// Last send (or the release time of a scheduled one), ms.
    pub sent_ms: u64,
    /// Relays of the last route (avoided on retransmission).
    pub route: Vec<String>,
    /// Relays of the last ack SURB's route.
    #[serde(default)]
    pub surb_route: Vec<String>,
}

/// A packet held by a timer node.
#[derive(Clone, Serialize, Deserialize)]
pub struct Hold {
    /// Hold id.
    #[serde(with = "hexa")]
    pub hold_id: [u8; 16],
    /// Cancel capability.
    #[serde(with = "hexa")]
    pub capability: [u8; 32],
    /// The timer node.
    #[serde(with = "hexa")]
    pub timer: [u8; 32],
    /// First hop of the held packet.
    #[serde(with = "hexa")]
    pub first_hop: [u8; 32],
    /// The held packet.
    #[serde(with = "b64")]
    pub packet: Vec<u8>,
    /// Which parts the timer acknowledged.
    pub parts_acked: Vec<bool>,
    /// Cancel acknowledged.
    pub cancel_acked: bool,
    /// Sends of the parts (or of the cancel).
    pub attempts: u32,
    /// Last send, ms.
    pub sent_ms: u64,
}

/// An outgoing message.
#[derive(Clone, Serialize, Deserialize)]
pub struct Outgoing {
    /// Local id (shown to the user; `cancel` takes it).
    pub id: u64,
    /// Contact name.
    pub contact: String,
    /// What it is.
    pub kind: OutKind,
    /// End-to-end message id.
    #[serde(with = "hexa")]
    pub message_id: [u8; 16],
    /// Where it is.
    pub state: OutState,
    /// Created, ms.
    pub created_ms: u64,
    /// Release time of a scheduled send.
    pub release_ms: Option<u64>,
    /// Mailbox expiry asked for.
    pub expires_ms: Option<u64>,
    /// Its fragments.
    pub fragments: Vec<OutFragment>,
    /// Timer holds of a scheduled send (one per fragment).
    pub holds: Vec<Hold>,
    /// Fragment sends beyond the first.
    pub retransmissions: u32,
    /// Bytes of the message before encryption.
    pub len: usize,
}

/// What an awaited reply is for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "for", rename_all = "snake_case")]
pub enum SurbPurpose {
    /// The deposit ack of a fragment.
    DepositAck {
        /// Outgoing id.
        out: u64,
        /// Fragment index.
        fragment: usize,
    },
    /// A timer's ack of a hold part or cancel.
    HoldAck {
        /// Outgoing id.
        out: u64,
        /// Hold index.
        hold: usize,
        /// Part index (ignored for cancels).
        part: usize,
    },
    /// A prekey bundle.
    Prekeys,
    /// The ack of a cover packet.
    Cover,
}

/// An outstanding reply block.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingSurb {
    /// SURB id (hex).
    pub id: String,
    /// What opens the reply.
    #[serde(with = "b64")]
    pub recovery: Vec<u8>,
    /// What it is for.
    pub purpose: SurbPurpose,
    /// Forgotten after this, ms.
    pub expires_ms: u64,
}

/// A fragment of a message not complete yet.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredFragment {
    /// The contact's name.
    pub contact: String,
    /// Message id (hex).
    pub message_id: String,
    /// Index, count, total length.
    pub index: u32,
    /// Fragment count.
    pub count: u32,
    /// Message length.
    pub total_len: u32,
    /// SHA-256 of the message.
    #[serde(with = "hexa")]
    pub digest: [u8; 32],
    /// The fragment's data.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Arrival, ms.
    pub received_ms: u64,
}

/// A message in the local history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Contact name.
    pub contact: String,
    /// Message id (hex).
    pub message_id: String,
    /// The text.
    pub text: String,
    /// The sender's clock when sent, ms.
    pub sent_ms: u64,
    /// When it arrived here, ms.
    pub received_ms: u64,
    /// Disappearing message: deleted from the history at this time, ms.
    pub expires_ms: Option<u64>,
    /// Shown to the user by `recv`.
    pub shown: bool,
    /// Sent by the user from another of their devices (a synced copy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outgoing: bool,
    /// Another device of the account showed it first (no read receipt from here).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_elsewhere: bool,
}

/// Something to tell the user at the next `recv`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Notice {
    /// When, ms.
    pub at_ms: u64,
    /// Kind: `contact_established`, `delivered`, `read`, `stored`, `failed`, `cancelled`,
    /// `scheduled`, `identity_changed`, `invitation_reused`, `undecryptable`, `blocked`.
    pub kind: String,
    /// The contact.
    pub contact: Option<String>,
    /// The outgoing message's local id.
    pub id: Option<u64>,
    /// A sentence for people.
    pub text: String,
}

/// The whole client state.
#[derive(Serialize, Deserialize)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Where the directory is fetched.
    pub directory_url: String,
    /// Ed25519 identity seed (sealed-sender certificates).
    #[serde(with = "hexa")]
    pub identity_seed: [u8; 32],
    /// The Olm account (Curve25519 identity and one-time keys; taken out while the client
    /// runs).
    pub account: Option<AccountPickle>,
    /// Settings.
    pub settings: Settings,
    /// Contacts.
    pub contacts: Vec<Contact>,
    /// Invitations issued.
    pub invitations: Vec<PendingInvitation>,
    /// Outgoing messages.
    pub outbox: Vec<Outgoing>,
    /// Outstanding SURBs.
    pub surbs: Vec<PendingSurb>,
    /// Fragments of incomplete messages.
    pub partial: Vec<StoredFragment>,
    /// Received messages.
    pub history: Vec<HistoryEntry>,
    /// Things to tell the user.
    pub notices: Vec<Notice>,
    /// Prekey bundles received through the mesh (wire bytes), by SURB id.
    pub prekey_replies: Vec<(String, String)>,
    /// Next local id.
    pub next_id: u64,
    /// Cover packets sent.
    pub cover_sent: u64,
    /// What this client saw of each relay lately: routes acknowledged and routes lost.
    #[serde(default)]
    pub relay_health: Vec<RelayHealth>,
    /// Receipts waiting for their time (kept across runs, so that a one-shot `recv` does not
    /// lose them).
    #[serde(default)]
    pub receipts_due: Vec<DueReceipts>,
    /// Identities the user blocked: a hello or an invitation from one is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<Blocked>,
    /// Mailboxes of removed or blocked contacts still to erase on some of their replicas
    /// (those listed; the others confirmed it). Retried by the driver until every replica
    /// has confirmed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub erasures: Vec<OwnedMailbox>,
    /// This device's name among the account's devices.
    #[serde(default = "primary_name")]
    pub device_name: String,
    /// Set on a linked device: the account it belongs to (`identity_seed` is then this
    /// device's own sealed-sender key). Unset on the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked_to: Option<LinkedTo>,
    /// The account's device list (none until a device is linked or a contact asks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<DeviceList>,
    /// The primary's record of its linked devices' logins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_logins: Vec<DeviceLogin>,
    /// Linking codes issued and not finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<PendingLink>,
    /// Message ids (hex) another device of the account showed before this one got them
    /// (bounded by `seen_max`): they arrive here as read.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub read_elsewhere: VecDeque<String>,
    /// Device logins still to remove on replicas that were down at `devices remove`:
    /// (mailbox id, replica node, login key), retried by the driver.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals: Vec<([u8; 32], [u8; 32], [u8; 32])>,
}

fn primary_name() -> String {
    "primary".to_string()
}

/// A blocked identity (`whispr block`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Blocked {
    /// The name the contact had.
    pub name: String,
    /// Its Ed25519 identity key (sealed-sender certificates, invitations, hellos).
    #[serde(with = "hexa")]
    pub identity: [u8; 32],
    /// Its Curve25519 Olm identity key.
    #[serde(with = "hexa")]
    pub curve: [u8; 32],
    /// When it was blocked, ms.
    pub blocked_ms: u64,
}

/// Receipts of one kind to one contact, sent together at `due_ms`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DueReceipts {
    /// The contact.
    pub contact: String,
    /// `delivered` or `read`.
    pub kind: String,
    /// Message ids (hex).
    pub ids: Vec<String>,
    /// When they leave, ms.
    pub due_ms: u64,
}

/// The latest outcomes of routes through one mix relay: (time in ms, acknowledged).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayHealth {
    /// Node id (hex).
    pub node: String,
    /// Newest last, at most 64.
    pub outcomes: VecDeque<(u64, bool)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_settings_mix_and_send_cover() {
        // Security review finding 5: the defaults were 50 ms per hop and no cover, the
        // weakest point of the simulator's table (a timing attack named the sender of 23.8 %
        // of messages; docs/security-review-status.md, "5 — the defaults").
        let s = Settings::default();
        assert!(s.mix_delay_ms >= 200, "mix_delay_ms {}", s.mix_delay_ms);
        assert!(s.cover_per_min >= 2.0, "cover_per_min {}", s.cover_per_min);
        assert!(s.receipt_delay_ms > 0, "receipts leave with the fetch");
    }
}
