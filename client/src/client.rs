//! The client: contacts, sending (seal, fragment, route, Sphinx, SURB acks, retransmission),
//! receiving (poll, reassemble, decrypt, ack), scheduled and disappearing messages, receipts
//! and cover traffic. One [`Client`] holds the home directory's lock while it lives.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ed25519_dalek::ed25519::signature::Signer;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256, Sha512};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};
use whispr_protocol::directory::{Directory, Role, sample_delays};
use whispr_protocol::envelope::{
    Envelope, EnvelopeContent, MailboxPublicKey, MailboxSecretKey, OuterFields,
};
use whispr_protocol::fragment::{Fragment, FragmentInfo, Inserted, Reassembler, ReassemblyLimits};
use whispr_protocol::payload::{CancelHold, FinalMessage, HeldPacketPart, PrekeyRequest, Reply};
use whispr_protocol::prekeys::{PrekeyBundle, SignedPrekey, sign_identity};
use whispr_protocol::sphinx::{
    PACKET_SIZE, RouteHop, Surb, SurbRecovery, build_packet, create_surb,
};
use whispr_protocol::{
    AccessToken, CancelCapability, DedupId, DestinationAddress, HoldId, KEY_EPOCH_LEN, KeyEpoch,
    MailboxId, MessageId, NodeId, ReplyKey, UnixTime, fragment::fragment_message,
};

use crate::error::{ClientError, Result};
use crate::invite::Invitation;
use crate::net::{Net, StoredMessage, owner_key};
use crate::state::{
    Contact, HistoryEntry, Hold, Notice, OutFragment, OutKind, OutState, Outgoing, OwnedMailbox,
    PeerMailbox, PendingInvitation, PendingSurb, Receipts, RelayHealth, Settings, State,
    StoredFragment, SurbPurpose,
};
use crate::vault::{KdfParams, LockGuard, Vault};

/// One-time keys uploaded to a new mailbox for anonymous prekey fetches.
const PREKEYS_UPLOADED: usize = 4;
/// How long a SURB is remembered beyond its expected use.
const SURB_TTL_MS: u64 = 3600 * 1000;
/// Fragments of an incomplete message are dropped after this.
const PARTIAL_AGE_MAX_MS: u64 = 24 * 3600 * 1000;
const HELLO_PREFIX: &[u8] = b"whispr-hello-v1";
const SAFETY_PREFIX: &[u8] = b"whispr-safety-v1";
/// How long after a release time a scheduled fragment may be retransmitted directly.
const RELEASE_GRACE_MS: u64 = 5_000;
/// Route outcomes older than this do not count towards a relay's health.
const RELAY_HEALTH_WINDOW_MS: u64 = 60 * 1000;
/// Relays whose health is tracked.
const RELAY_HEALTH_MAX: usize = 10_000;

/// What to send again for one outgoing message: (its id, fragments, holds, cancels).
type Resend = (u64, Vec<usize>, Vec<usize>, Vec<usize>);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
    },
    /// A text.
    Text {
        body: String,
        sent_ms: u64,
        expire_after_ms: Option<u64>,
    },
    /// Receipts for message ids (hex).
    Receipt { kind: String, of: Vec<String> },
}

/// Options of [`Client::send`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SendOptions {
    /// Release time (ms): hand the message to a timer node until then.
    pub at_ms: Option<u64>,
    /// Disappearing message: the mailbox drops it and the recipient deletes it this long
    /// after it is sent (or released).
    pub expire_after: Option<Duration>,
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

/// The client.
pub struct Client {
    vault: Vault,
    _lock: LockGuard,
    state: State,
    account: Account,
    sessions: HashMap<String, Session>,
    net: Net,
    rng: StdRng,
    directory: Option<(Directory, u64)>,
    receipts_due: BTreeMap<(String, String), Vec<String>>,
    last_surb_route: Vec<String>,
    refused: BTreeMap<String, u64>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
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

fn api_of(dir: &Directory, node: &NodeId) -> Result<String> {
    dir.get(node)
        .and_then(|d| d.api_url.clone())
        .ok_or_else(|| ClientError::NoRoute("a node publishes no API address".to_string()))
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

fn hello_transcript(curve: &[u8; 32], mailbox: &PeerMailbox) -> Vec<u8> {
    [
        HELLO_PREFIX,
        curve.as_slice(),
        mailbox.id.as_slice(),
        mailbox.key.as_slice(),
        mailbox.access.as_slice(),
    ]
    .concat()
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
        let mut identity_seed = [0u8; 32];
        rand::rng().fill_bytes(&mut identity_seed);
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
        };
        let mut c = Client {
            vault,
            _lock: lock,
            state,
            account: Account::new(),
            sessions: HashMap::new(),
            net: Net::new()?,
            rng: rand::make_rng(),
            directory: None,
            receipts_due: BTreeMap::new(),
            last_surb_route: Vec::new(),
            refused: BTreeMap::new(),
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
        let mut state: State = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::CorruptState(format!("state: {e}")))?;
        let account = state
            .account
            .take()
            .map(Account::from_pickle)
            .ok_or_else(|| ClientError::CorruptState("no Olm account".to_string()))?;
        let mut sessions = HashMap::new();
        for c in &mut state.contacts {
            if let Some(p) = c.session.take() {
                sessions.insert(c.name.clone(), Session::from_pickle(p));
            }
        }
        let mut c = Client {
            vault: vault.clone(),
            _lock: lock,
            state,
            account,
            sessions,
            net: Net::new()?,
            rng: rand::make_rng(),
            directory: None,
            receipts_due: BTreeMap::new(),
            last_surb_route: Vec::new(),
            refused: BTreeMap::new(),
        };
        c.purge_expired(now_ms());
        Ok(c)
    }

    /// The opened vault (to reopen without deriving the key again).
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.state.settings
    }

    /// Changes the settings.
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.state.settings
    }

    /// Writes the state (encrypted, atomically).
    pub fn save(&mut self) -> Result<()> {
        self.state.account = Some(self.account.pickle());
        for c in &mut self.state.contacts {
            c.session = self.sessions.get(&c.name).map(Session::pickle);
        }
        let bytes = zeroize::Zeroizing::new(
            serde_json::to_vec(&self.state)
                .map_err(|e| ClientError::CorruptState(format!("encoding: {e}")))?,
        );
        self.state.account = None;
        for c in &mut self.state.contacts {
            c.session = None;
        }
        self.vault.save(&self._lock, &bytes)
    }

    fn identity(&self) -> SigningKey {
        SigningKey::from_bytes(&self.state.identity_seed)
    }

    fn next_id(&mut self) -> u64 {
        let id = self.state.next_id;
        self.state.next_id = id.saturating_add(1);
        id
    }

    fn notice(&mut self, kind: &str, contact: Option<&str>, id: Option<u64>, text: String) {
        self.state.notices.push(Notice {
            at_ms: now_ms(),
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

    fn purge_expired(&mut self, now: u64) {
        self.state
            .history
            .retain(|h| h.expires_ms.is_none_or(|e| e > now));
        self.state.surbs.retain(|s| s.expires_ms > now);
        self.state
            .partial
            .retain(|p| p.received_ms.saturating_add(PARTIAL_AGE_MAX_MS) > now);
    }

    async fn directory(&mut self) -> Result<Directory> {
        let now = now_ms();
        if let Some((d, at)) = &self.directory
            && now.saturating_sub(*at) < 10_000
        {
            return Ok(d.clone());
        }
        let d = self
            .net
            .directory(&self.state.directory_url.to_string(), UnixTime(now))
            .await?;
        self.directory = Some((d.clone(), now));
        Ok(d)
    }

    fn mix_layers(&self, dir: &Directory) -> u32 {
        if let Some(l) = self.state.settings.mix_layers {
            return l.clamp(1, 3);
        }
        let deepest = dir
            .nodes()
            .filter(|n| n.has_role(Role::Mix))
            .map(|n| n.mix_layer)
            .max()
            .unwrap_or(1);
        deepest.clamp(1, 3)
    }

    /// A route for `epoch` to `destination` that avoids suspect mixes when the directory
    /// allows it (see [`Self::suspects`]), else any route.
    fn route(
        &mut self,
        dir: &Directory,
        epoch: KeyEpoch,
        destination: &NodeId,
    ) -> Result<Vec<RouteHop>> {
        let layers = self.mix_layers(dir);
        let suspects = self.suspects(dir);
        dir.select_route_avoiding(&mut self.rng, epoch, destination, layers, &suspects)
            .or_else(|_| dir.select_route(&mut self.rng, epoch, destination, layers))
            .map_err(|e| ClientError::NoRoute(e.to_string()))
    }

    /// Mix relays judged unhealthy from this client's own routes within the last minute
    /// (at least three `retransmit_after_ms`): those on more lost than acknowledged routes, and
    /// those whose run of losses since their last ack is longer than another mix's of the
    /// same layer (a mix that died after carrying traffic still has old acks; every lost route
    /// charges it, while a live mix's run ends at its next ack). Avoided while another mix of
    /// the same layer exists. Only mixes are judged: the edge relay answers the client
    /// directly, and a route always has one.
    fn suspects(&self, dir: &Directory) -> Vec<NodeId> {
        let now = now_ms();
        let window =
            RELAY_HEALTH_WINDOW_MS.max(self.state.settings.retransmit_after_ms.saturating_mul(3));
        /// (acked routes, lost routes, losses since the last ack) of one mix.
        type Score = (u32, u32, u32);
        let score = |node: &NodeId| -> Score {
            let hex_id = hex::encode(node.0);
            let Some(h) = self.state.relay_health.iter().find(|h| h.node == hex_id) else {
                return (0, 0, 0);
            };
            h.outcomes
                .iter()
                .filter(|(t, _)| now.saturating_sub(*t) < window)
                .fold((0, 0, 0), |(ok, lost, run), (_, good)| {
                    if *good {
                        (ok + 1, lost, 0)
                    } else {
                        (ok, lost + 1, run + 1)
                    }
                })
        };
        let mut layers: BTreeMap<u32, Vec<(NodeId, Score)>> = BTreeMap::new();
        for n in dir.nodes().filter(|n| n.has_role(Role::Mix)) {
            layers
                .entry(n.mix_layer)
                .or_default()
                .push((n.node_id, score(&n.node_id)));
        }
        let mut out = Vec::new();
        for mixes in layers.values() {
            let shortest_run = mixes.iter().map(|(_, s)| s.2).min().unwrap_or(0);
            for (node, (ok, lost, run)) in mixes {
                if (*lost >= 1 && lost > ok) || *run > shortest_run {
                    out.push(*node);
                }
            }
        }
        out
    }

    fn record_health(&mut self, mixes: &[String], ok: bool) {
        let now = now_ms();
        for n in mixes {
            let pos = match self.state.relay_health.iter().position(|h| h.node == *n) {
                Some(p) => p,
                None => {
                    if self.state.relay_health.len() >= RELAY_HEALTH_MAX {
                        self.state.relay_health.remove(0);
                    }
                    self.state.relay_health.push(RelayHealth {
                        node: n.clone(),
                        outcomes: Default::default(),
                    });
                    self.state.relay_health.len() - 1
                }
            };
            if let Some(h) = self.state.relay_health.get_mut(pos) {
                h.outcomes.push_back((now, ok));
                while h.outcomes.len() > 64 {
                    h.outcomes.pop_front();
                }
            }
        }
    }

    fn delays(&mut self, n: usize) -> Vec<Duration> {
        let mean = Duration::from_millis(self.state.settings.mix_delay_ms);
        if mean.is_zero() {
            vec![Duration::ZERO; n]
        } else {
            sample_delays(&mut self.rng, n, mean)
        }
    }

    /// A SURB leading back into `mailbox`, remembered under `purpose`.
    fn new_surb(
        &mut self,
        dir: &Directory,
        mailbox: &OwnedMailbox,
        purpose: SurbPurpose,
        epoch: KeyEpoch,
        expires_ms: u64,
    ) -> Result<Surb> {
        let node = NodeId(mailbox.node);
        let route = self.route(dir, epoch, &node)?;
        // The replier (a mailbox or timer node) sends straight into the first mix layer.
        let hops: Vec<RouteHop> = route.into_iter().skip(1).collect();
        self.last_surb_route = hops
            .iter()
            .take(hops.len().saturating_sub(1))
            .map(|h| hex::encode(h.node.0))
            .collect();
        let delays = self.delays(hops.len().saturating_sub(1));
        let id = MailboxId(mailbox.id);
        let surb_id = ReplyKey(mailbox.reply_key).mint_surb_id(&mut self.rng, &id);
        let (surb, recovery) = create_surb(
            &mut self.rng,
            &hops,
            &delays,
            DestinationAddress::mailbox(&id),
            surb_id,
        )?;
        let max = self.state.settings.surbs_max.max(1);
        if self.state.surbs.len() >= max {
            // The oldest outstanding ack is forgotten: at worst its fragment is retransmitted.
            let excess = self.state.surbs.len() + 1 - max;
            self.state.surbs.drain(..excess);
        }
        self.state.surbs.push(PendingSurb {
            id: hex::encode(surb_id.as_bytes()),
            recovery: recovery.to_bytes().to_vec(),
            purpose,
            expires_ms,
        });
        Ok(surb)
    }

    fn new_owned_mailbox(&mut self, dir: &Directory) -> Result<(OwnedMailbox, [u8; 32])> {
        let mut id = [0u8; 32];
        self.rng.fill_bytes(&mut id);
        let secret = MailboxSecretKey::generate(&mut self.rng);
        let node = dir
            .mailbox_replicas(&MailboxId(id), 1)
            .first()
            .copied()
            .ok_or_else(|| ClientError::NoRoute("no mailbox node in the directory".to_string()))?;
        let api_url = api_of(dir, &node)?;
        let mut m = OwnedMailbox {
            id,
            secret: *secret.to_bytes(),
            owner_seed: [0; 32],
            access: [0; 32],
            reply_key: [0; 32],
            node: node.0,
            api_url,
            cursor: 0,
            token: None,
            token_expires_ms: 0,
        };
        self.rng.fill_bytes(&mut m.owner_seed);
        self.rng.fill_bytes(&mut m.access);
        self.rng.fill_bytes(&mut m.reply_key);
        Ok((m, secret.public_key().to_bytes()))
    }

    fn name_taken(&self, name: &str) -> bool {
        self.state.contacts.iter().any(|c| c.name == name)
            || self.state.invitations.iter().any(|i| i.name == name)
    }

    /// Creates a mailbox for a new contact and returns the invitation text for them. With
    /// `inline_prekey` false the invitation is shorter and the contact fetches a one-time key
    /// anonymously through the mesh.
    pub async fn invite(&mut self, name: Option<&str>, inline_prekey: bool) -> Result<String> {
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
        if name.is_empty() || name.len() > 64 {
            return Err(ClientError::InvalidArgument(
                "a contact name has 1 to 64 characters".to_string(),
            ));
        }
        if self.name_taken(&name) {
            return Err(ClientError::ContactExists(name));
        }
        let dir = self.directory().await?;
        let (mut mailbox, mailbox_key) = self.new_owned_mailbox(&dir)?;
        self.net
            .create_mailbox(&mailbox, mailbox_key, self.state.settings.retention_ms)
            .await?;
        let generated = self.account.generate_one_time_keys(PREKEYS_UPLOADED + 1);
        self.account.mark_keys_as_published();
        let mut keys = generated.created.into_iter();
        let inline = keys
            .next()
            .ok_or_else(|| ClientError::Olm("no one-time key generated".to_string()))?;
        let owner = owner_key(&mailbox);
        let curve = self.account.curve25519_key().to_bytes();
        let id = MailboxId(mailbox.id);
        let prekeys: Vec<serde_json::Value> = keys
            .enumerate()
            .map(|(i, k)| {
                let p = SignedPrekey::sign(
                    &owner,
                    &id,
                    u32::try_from(i).unwrap_or(u32::MAX),
                    false,
                    k.to_bytes(),
                );
                json!({"key_id": p.key_id, "key": hex::encode(p.key), "fallback": false,
                       "signature": hex::encode(p.signature)})
            })
            .collect();
        let token = self.token(&mut mailbox).await?;
        self.net
            .put_prekeys(
                &mailbox,
                &token,
                &json!({
                    "identity_key": hex::encode(curve),
                    "identity_signature": hex::encode(sign_identity(&owner, &id, &curve)),
                    "prekeys": prekeys,
                }),
            )
            .await?;
        let invitation = Invitation {
            mailbox_id: mailbox.id,
            mailbox_key,
            access: mailbox.access,
            owner_key: owner.verifying_key().to_bytes(),
            identity: self.identity().verifying_key().to_bytes(),
            curve,
            one_time_key: inline_prekey.then(|| inline.to_bytes()),
        };
        self.state.invitations.push(PendingInvitation {
            name,
            mailbox,
            one_time_key: inline.to_bytes(),
            created_ms: now_ms(),
        });
        self.save()?;
        Ok(invitation.encode())
    }

    /// A valid session token for `m` (logs in when there is none or it is about to expire).
    async fn token(&self, m: &mut OwnedMailbox) -> Result<String> {
        if let Some(t) = &m.token
            && m.token_expires_ms > now_ms() + 60_000
        {
            return Ok(t.clone());
        }
        let (token, expires) = self.net.login(m).await?;
        m.token = Some(token.clone());
        m.token_expires_ms = expires;
        Ok(token)
    }

    /// Accepts an invitation: creates our mailbox for the contact, starts the Olm session and
    /// sends the hello that tells them where to answer.
    pub async fn accept(&mut self, text: &str, name: &str) -> Result<u64> {
        let name = name.trim();
        if name.is_empty() || name.len() > 64 {
            return Err(ClientError::InvalidArgument(
                "a contact name has 1 to 64 characters".to_string(),
            ));
        }
        if self.name_taken(name) {
            return Err(ClientError::ContactExists(name.to_string()));
        }
        let inv = Invitation::decode(text)?;
        if inv.identity == self.identity().verifying_key().to_bytes() {
            return Err(ClientError::InvalidInvitation("it is your own invitation"));
        }
        let dir = self.directory().await?;
        let (mine, _) = self.new_owned_mailbox(&dir)?;
        let mailbox_key = MailboxSecretKey::from_bytes(&mine.secret)?
            .public_key()
            .to_bytes();
        self.net
            .create_mailbox(&mine, mailbox_key, self.state.settings.retention_ms)
            .await?;
        let contact = Contact {
            name: name.to_string(),
            mine,
            theirs: Some(PeerMailbox {
                id: inv.mailbox_id,
                key: inv.mailbox_key,
                access: inv.access,
            }),
            their_identity: inv.identity,
            their_curve: inv.curve,
            session: None,
            heard_from: false,
            verified: false,
            seen: Default::default(),
            invitation_key: None,
            created_ms: now_ms(),
        };
        self.state.contacts.push(contact);
        let otk = match inv.one_time_key {
            Some(k) => k,
            None => match self.fetch_prekey(&inv, name).await {
                Ok(k) => k,
                Err(e) => {
                    self.state.contacts.retain(|c| c.name != name);
                    return Err(e);
                }
            },
        };
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
            key: mailbox_key,
            access: mine.access,
        };
        let curve = self.account.curve25519_key().to_bytes();
        let identity = self.identity();
        let hello = AppMessage::Hello {
            identity: hex::encode(identity.verifying_key().to_bytes()),
            curve: hex::encode(curve),
            mailbox: hex::encode(me.id),
            mailbox_key: hex::encode(me.key),
            access: hex::encode(me.access),
            binding: hex::encode(identity.sign(&hello_transcript(&curve, &me)).to_bytes()),
        };
        let id = self.queue(name, OutKind::Hello, &hello, None, None)?;
        self.pump().await?;
        self.save()?;
        Ok(id)
    }

    /// Fetches one of the inviter's one-time keys anonymously: a prekey request through the
    /// mesh whose answer comes back through a SURB into our new mailbox.
    async fn fetch_prekey(&mut self, inv: &Invitation, name: &str) -> Result<[u8; 32]> {
        let dir = self.directory().await?;
        let now = now_ms();
        let epoch = epoch_at(now);
        let mine = self.contact(name)?.mine.clone();
        let target = MailboxId(inv.mailbox_id);
        let node = dir
            .mailbox_replicas(&target, 1)
            .first()
            .copied()
            .ok_or_else(|| ClientError::NoRoute("no mailbox node".to_string()))?;
        for _attempt in 0..3 {
            let surb =
                self.new_surb(&dir, &mine, SurbPurpose::Prekeys, epoch, now + SURB_TTL_MS)?;
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
            let delays = self.delays(route.len() - 1);
            let packet = build_packet(
                &mut self.rng,
                &route,
                &delays,
                DestinationAddress::mailbox(&target),
                &plaintext,
            )?;
            let edge = api_of(&dir, &route.first().map(|h| h.node).unwrap_or(node))?;
            self.net.submit(&edge, &[packet.into_bytes()]).await?;
            let deadline = now_ms() + 10_000;
            while now_ms() < deadline {
                self.sync(Duration::from_millis(1000)).await?;
                if let Some(pos) = self
                    .state
                    .prekey_replies
                    .iter()
                    .position(|(id, _)| *id == surb_id)
                {
                    let (_, reply) = self.state.prekey_replies.remove(pos);
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(reply)
                        .map_err(|_| ClientError::Olm("prekey reply encoding".to_string()))?;
                    let Reply::Prekeys(bundle) = Reply::decode(&bytes)? else {
                        return Err(ClientError::Olm("unexpected reply".to_string()));
                    };
                    return check_bundle(&bundle, inv);
                }
            }
        }
        Err(ClientError::Unreachable {
            node: "mailbox",
            reason: "no prekey bundle came back through the mesh".to_string(),
        })
    }

    fn contact(&self, name: &str) -> Result<&Contact> {
        self.state
            .contacts
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ClientError::UnknownContact(name.to_string()))
    }

    /// Encrypts `app` for `name` and adds it to the outbox (not sent yet); its local id.
    fn queue(
        &mut self,
        name: &str,
        kind: OutKind,
        app: &AppMessage,
        expires_ms: Option<u64>,
        release_ms: Option<u64>,
    ) -> Result<u64> {
        let contact = self.contact(name)?;
        let theirs = contact
            .theirs
            .clone()
            .ok_or_else(|| ClientError::NotEstablished(name.to_string()))?;
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
        let active = self
            .state
            .outbox
            .iter()
            .filter(|o| {
                matches!(
                    o.state,
                    OutState::Sending | OutState::Scheduled | OutState::Held | OutState::Cancelling
                )
            })
            .count();
        if active >= self.state.settings.outbox_max {
            return Err(ClientError::Full("the outbox"));
        }
        let session = self
            .sessions
            .get_mut(name)
            .ok_or_else(|| ClientError::NotEstablished(name.to_string()))?;
        let olm = session
            .encrypt(plaintext.as_slice())
            .map_err(|e| ClientError::Olm(e.to_string()))?;
        let (t, body) = olm.to_parts();
        let mut bytes = Vec::with_capacity(body.len() + 1);
        bytes.push(u8::try_from(t).unwrap_or(u8::MAX));
        bytes.extend_from_slice(&body);
        let message_id = MessageId::random(&mut self.rng);
        let recipient = MailboxPublicKey::from_bytes(&theirs.key)?;
        let identity = self.identity();
        let mut fragments = Vec::new();
        for f in fragment_message(message_id, &bytes)? {
            let dedup = DedupId::random(&mut self.rng);
            let envelope = Envelope::seal(
                &mut self.rng,
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
            match self.state.outbox.iter().position(|o| {
                !matches!(
                    o.state,
                    OutState::Sending | OutState::Scheduled | OutState::Held | OutState::Cancelling
                )
            }) {
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
            created_ms: now_ms(),
            release_ms,
            expires_ms,
            fragments,
            holds: Vec::new(),
            retransmissions: 0,
            len: plaintext.len(),
        });
        Ok(id)
    }

    fn out_index(&self, id: u64) -> Option<usize> {
        self.state.outbox.iter().position(|o| o.id == id)
    }

    /// Builds the deposit packet of fragment `f` of outgoing `id`, for keys of `at_ms`'s epoch,
    /// (edge API, packet, route).
    fn deposit_packet(
        &mut self,
        dir: &Directory,
        id: u64,
        f: usize,
        at_ms: u64,
    ) -> Result<(String, Vec<u8>, Vec<NodeId>)> {
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
        let theirs = contact
            .theirs
            .clone()
            .ok_or_else(|| ClientError::NotEstablished(name.clone()))?;
        let epoch = epoch_at(at_ms);
        let mut envelope = Envelope::decode(&frag.envelope)?;
        envelope.outer.ack_surb = Some(self.new_surb(
            dir,
            &mine,
            SurbPurpose::DepositAck {
                out: id,
                fragment: f,
            },
            epoch,
            at_ms + SURB_TTL_MS,
        )?);
        let target = MailboxId(theirs.id);
        let node = dir
            .mailbox_replicas(&target, 1)
            .first()
            .copied()
            .ok_or_else(|| ClientError::NoRoute("no mailbox node".to_string()))?;
        let route = self.route(dir, epoch, &node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let plaintext = FinalMessage::Deposit(envelope).encode()?;
        let packet = build_packet(
            &mut self.rng,
            &route,
            &delays,
            DestinationAddress::mailbox(&target),
            &plaintext,
        )?;
        let nodes: Vec<NodeId> = route.iter().map(|h| h.node).collect();
        let edge = api_of(dir, nodes.first().unwrap_or(&node))?;
        Ok((edge, packet.into_bytes(), nodes))
    }

    async fn submit_all(&mut self, packets: Vec<(String, Vec<u8>)>) -> Vec<bool> {
        let mut by_edge: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (edge, _)) in packets.iter().enumerate() {
            by_edge.entry(edge.clone()).or_default().push(i);
        }
        let mut ok = vec![false; packets.len()];
        for (edge, idx) in by_edge {
            for chunk in idx.chunks(64) {
                let batch: Vec<Vec<u8>> = chunk
                    .iter()
                    .filter_map(|i| packets.get(*i).map(|p| p.1.clone()))
                    .collect();
                match self.net.submit(&edge, &batch).await {
                    Ok(results) => {
                        for (i, r) in chunk.iter().zip(results) {
                            if let Some(slot) = ok.get_mut(*i) {
                                *slot = r == "ok";
                            }
                            if r != "ok" {
                                *self.refused.entry(r).or_default() += 1;
                            }
                        }
                    }
                    Err(e) => {
                        let reason = match e {
                            ClientError::Node { status, kind, .. } => format!("{status} {kind}"),
                            _ => "unreachable".to_string(),
                        };
                        *self.refused.entry(reason).or_default() +=
                            u64::try_from(chunk.len()).unwrap_or(u64::MAX);
                    }
                }
            }
        }
        ok
    }

    /// Sends every unacknowledged fragment of outgoing `id` that is due, on fresh routes.
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
    async fn pump(&mut self) -> Result<()> {
        let window = self.state.settings.olm_window.max(1);
        let mut room: BTreeMap<String, usize> = BTreeMap::new();
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
        let dir = self.directory().await?;
        let now = now_ms();
        let mut items = Vec::new();
        for id in due {
            if let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) {
                items.extend((0..o.fragments.len()).map(|f| (id, f)));
            }
        }
        self.send_many(&dir, items, now).await
    }

    /// Builds and submits the deposit packets of (outgoing id, fragment) pairs in as few
    /// requests as possible, and records each send.
    async fn send_many(
        &mut self,
        dir: &Directory,
        items: Vec<(u64, usize)>,
        now: u64,
    ) -> Result<()> {
        let mut packets = Vec::new();
        let mut routes = Vec::new();
        for (id, f) in items {
            let (edge, packet, route) = self.deposit_packet(dir, id, f, now)?;
            packets.push((edge, packet));
            routes.push((id, f, route, self.last_surb_route.clone()));
        }
        self.submit_all(packets).await;
        for (id, f, route, surb_route) in routes {
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

    /// Sends several (contact, text) messages at once: each is encrypted and fragmented as by
    /// [`Client::send`], the packets go out in shared requests (within each contact's
    /// `olm_window`; the rest at the next [`Client::sync`]) and the state is saved once.
    /// For bursts (and the end-to-end benchmark); their local ids.
    pub async fn send_batch(&mut self, messages: &[(String, String)]) -> Result<Vec<u64>> {
        let now = now_ms();
        let mut ids = Vec::with_capacity(messages.len());
        for (name, text) in messages {
            let app = AppMessage::Text {
                body: text.clone(),
                sent_ms: now,
                expire_after_ms: None,
            };
            ids.push(self.queue(name, OutKind::Text, &app, None, None)?);
        }
        let result = self.pump().await;
        self.save()?;
        result.map(|()| ids)
    }

    /// Sends `text` to contact `name`; the local id. Returns once the packets are handed to
    /// an edge relay (or the holds to the mesh): use [`Client::wait_stored`] or
    /// [`Client::sync`] for the acks.
    pub async fn send(&mut self, name: &str, text: &str, opts: SendOptions) -> Result<u64> {
        let now = now_ms();
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
        let result = match opts.at_ms {
            Some(at) => self.schedule(id, at).await,
            None => self.pump().await,
        };
        if result.is_err() {
            // Not handed to the mesh: forget it rather than send it later behind the user's
            // back (the error is reported; sending again is the user's call).
            self.state.outbox.retain(|o| o.id != id);
            self.state.surbs.retain(|s| match &s.purpose {
                SurbPurpose::DepositAck { out, .. } | SurbPurpose::HoldAck { out, .. } => {
                    *out != id
                }
                _ => true,
            });
        }
        self.save()?;
        result.map(|()| id)
    }

    /// Hands each fragment of outgoing `id`, as a packet built for `release_ms`, to a timer
    /// node (in parts), keeping the cancel capabilities.
    async fn schedule(&mut self, id: u64, release_ms: u64) -> Result<()> {
        let dir = self.directory().await?;
        let timers: Vec<NodeId> = dir
            .nodes()
            .filter(|n| n.has_role(Role::Timer))
            .map(|n| n.node_id)
            .collect();
        if timers.is_empty() {
            return Err(ClientError::NoRoute(
                "no timer node in the directory".to_string(),
            ));
        }
        let count = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map_or(0, |o| o.fragments.len());
        let mut holds = Vec::new();
        for f in 0..count {
            let (_, packet, route) = self.deposit_packet(&dir, id, f, release_ms)?;
            let Some(&timer) = timers.get(self.rng.random_range(0..timers.len())) else {
                continue;
            };
            holds.push(Hold {
                hold_id: HoldId::random(&mut self.rng).0,
                capability: CancelCapability::random(&mut self.rng).0,
                timer: timer.0,
                first_hop: route.first().map(|n| n.0).unwrap_or_default(),
                parts_acked: vec![false; packet.len().div_ceil(PACKET_SIZE / 2 + 1)],
                packet,
                cancel_acked: false,
                attempts: 0,
                sent_ms: 0,
            });
        }
        if let Some(o) = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get_mut(i))
        {
            for fr in &mut o.fragments {
                fr.attempts = 1;
                fr.sent_ms = release_ms;
            }
            o.holds = holds;
        }
        let all: Vec<usize> = (0..count).collect();
        self.send_holds(&dir, id, &all).await
    }

    /// Records a send (parts or cancel) of the holds `which` of outgoing `id`.
    fn holds_sent(&mut self, id: u64, which: &[usize], now: u64) {
        if let Some(o) = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get_mut(i))
        {
            for &h in which {
                if let Some(hold) = o.holds.get_mut(h) {
                    hold.attempts = hold.attempts.saturating_add(1);
                    hold.sent_ms = now;
                }
            }
        }
    }

    async fn send_holds(&mut self, dir: &Directory, id: u64, which: &[usize]) -> Result<()> {
        let now = now_ms();
        let epoch = epoch_at(now);
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return Ok(());
        };
        let contact = o.contact.clone();
        let release = o.release_ms.unwrap_or(now);
        let holds = o.holds.clone();
        let mine = self.contact(&contact)?.mine.clone();
        let mut packets = Vec::new();
        for &h in which {
            let Some(hold) = holds.get(h) else { continue };
            let chunks: Vec<&[u8]> = hold.packet.chunks(PACKET_SIZE / 2 + 1).collect();
            let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            for (p, data) in chunks.iter().enumerate() {
                if hold.parts_acked.get(p).copied().unwrap_or(false) {
                    continue;
                }
                let surb = self.new_surb(
                    dir,
                    &mine,
                    SurbPurpose::HoldAck {
                        out: id,
                        hold: h,
                        part: p,
                    },
                    epoch,
                    now + SURB_TTL_MS,
                )?;
                let part = HeldPacketPart {
                    hold_id: HoldId(hold.hold_id),
                    part_index: u32::try_from(p).unwrap_or(u32::MAX),
                    part_count: count,
                    release_at: UnixTime(release),
                    cancel_hash: Sha256::digest(hold.capability).into(),
                    first_hop: NodeId(hold.first_hop),
                    data: data.to_vec(),
                    ack_surb: Some(surb),
                };
                packets.push(self.service_packet(
                    dir,
                    &NodeId(hold.timer),
                    FinalMessage::Hold(part),
                )?);
            }
        }
        self.submit_all(packets).await;
        self.holds_sent(id, which, now);
        Ok(())
    }

    /// A packet for a node's service address (timer holds and cancels): (edge, packet).
    fn service_packet(
        &mut self,
        dir: &Directory,
        node: &NodeId,
        message: FinalMessage,
    ) -> Result<(String, Vec<u8>)> {
        let epoch = epoch_at(now_ms());
        let route = self.route(dir, epoch, node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let packet = build_packet(
            &mut self.rng,
            &route,
            &delays,
            DestinationAddress::NODE_SERVICE,
            &message.encode()?,
        )?;
        let edge = api_of(dir, &route.first().map(|h| h.node).unwrap_or(*node))?;
        Ok((edge, packet.into_bytes()))
    }

    /// Cancels scheduled send `id` before its release: each timer node holding a part of it
    /// is sent the cancel capability.
    pub async fn cancel(&mut self, id: u64) -> Result<()> {
        let now = now_ms();
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return Err(ClientError::UnknownScheduled(id));
        };
        if !matches!(
            o.state,
            OutState::Scheduled | OutState::Held | OutState::Cancelling
        ) || o.release_ms.is_none_or(|r| r <= now)
        {
            return Err(ClientError::UnknownScheduled(id));
        }
        if let Some(o) = self
            .out_index(id)
            .and_then(|i| self.state.outbox.get_mut(i))
        {
            o.state = OutState::Cancelling;
            for h in &mut o.holds {
                h.attempts = 0;
            }
        }
        let dir = self.directory().await?;
        let all: Vec<usize> = (0..self
            .out_index(id)
            .and_then(|i| self.state.outbox.get(i))
            .map_or(0, |o| o.holds.len()))
            .collect();
        self.send_cancels(&dir, id, &all).await?;
        self.save()
    }

    async fn send_cancels(&mut self, dir: &Directory, id: u64, which: &[usize]) -> Result<()> {
        let now = now_ms();
        let epoch = epoch_at(now);
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return Ok(());
        };
        let holds = o.holds.clone();
        let mine = self.contact(&o.contact.clone())?.mine.clone();
        let mut packets = Vec::new();
        for &h in which {
            let Some(hold) = holds.get(h) else { continue };
            if hold.cancel_acked {
                continue;
            }
            let surb = self.new_surb(
                dir,
                &mine,
                SurbPurpose::HoldAck {
                    out: id,
                    hold: h,
                    part: usize::MAX,
                },
                epoch,
                now + SURB_TTL_MS,
            )?;
            packets.push(self.service_packet(
                dir,
                &NodeId(hold.timer),
                FinalMessage::Cancel(CancelHold {
                    hold_id: HoldId(hold.hold_id),
                    capability: CancelCapability(hold.capability),
                    ack_surb: Some(surb),
                }),
            )?);
        }
        self.submit_all(packets).await;
        self.holds_sent(id, which, now);
        Ok(())
    }

    /// Decides, without I/O, what is due for a resend at `now`: marks as failed what has had
    /// `attempts_max` sends (with a notice), charges the relays of lost routes, and returns
    /// per outgoing message the fragments, holds and cancels to send again.
    fn plan_retransmissions(&mut self, now: u64) -> Vec<Resend> {
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
                        if f.acked || !released || now < f.sent_ms.saturating_add(after) {
                            continue;
                        }
                        if f.attempts >= max {
                            failed.push(o.id);
                            break;
                        }
                        // The relays of the unacknowledged routes (forward and ack) lose a
                        // point; the destination is not a relay.
                        let mut relays: Vec<String> = f
                            .route
                            .iter()
                            .skip(1)
                            .take(f.route.len().saturating_sub(2))
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
    async fn retransmit_due(&mut self) -> Result<()> {
        let now = now_ms();
        let work = self.plan_retransmissions(now);
        if work.is_empty() {
            return Ok(());
        }
        let dir = self.directory().await?;
        for (id, frags, holds, cancels) in work {
            if !frags.is_empty() {
                self.send_many(&dir, frags.into_iter().map(|f| (id, f)).collect(), now)
                    .await?;
            }
            if !holds.is_empty() {
                self.send_holds(&dir, id, &holds).await?;
            }
            if !cancels.is_empty() {
                self.send_cancels(&dir, id, &cancels).await?;
            }
        }
        Ok(())
    }

    fn owned_mailboxes(&self) -> Vec<OwnedMailbox> {
        self.state
            .contacts
            .iter()
            .map(|c| c.mine.clone())
            .chain(self.state.invitations.iter().map(|i| i.mailbox.clone()))
            .collect()
    }

    fn store_mailbox(&mut self, m: &OwnedMailbox) {
        for c in &mut self.state.contacts {
            if c.mine.id == m.id {
                c.mine = m.clone();
            }
        }
        for i in &mut self.state.invitations {
            if i.mailbox.id == m.id {
                i.mailbox = m.clone();
            }
        }
    }

    /// One round: polls every mailbox (waiting up to `wait` for something), processes what
    /// arrived (acks, messages, receipts), acknowledges it to the nodes, sends receipts and
    /// retransmits what is due. The state is saved.
    pub async fn sync(&mut self, wait: Duration) -> Result<()> {
        let mut boxes = self.owned_mailboxes();
        let mut tokens = Vec::new();
        for m in &mut boxes {
            let t = self.token(m).await;
            tokens.push(t);
        }
        for m in &boxes {
            self.store_mailbox(m);
        }
        // Long-poll every mailbox at once; as soon as one has something, take what the others
        // return within 5 ms and drop the rest (they are polled again next round), so that
        // a busy mailbox is not held back by the idle ones' waits.
        let mut pending: futures_util::stream::FuturesUnordered<_> = boxes
            .iter()
            .zip(&tokens)
            .enumerate()
            .map(|(i, (m, t))| {
                let net = self.net.clone();
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
        let mut acks = Vec::new();
        let polled = polls.iter().filter(|p| p.is_some()).count();
        for (m, result) in boxes.iter().zip(polls) {
            let Some(result) = result else { continue };
            match result {
                Ok(messages) => {
                    let Some(last) = messages.last().map(|x| x.seq) else {
                        continue;
                    };
                    for msg in &messages {
                        self.process(m, msg);
                    }
                    let mut m2 = m.clone();
                    m2.cursor = last;
                    self.store_mailbox(&m2);
                    acks.push((m2, last));
                }
                Err(e) => {
                    if let ClientError::Node { status: 401, .. } = e {
                        let mut m2 = m.clone();
                        m2.token = None;
                        self.store_mailbox(&m2);
                    }
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        // Durable first, then acknowledged: a crash in between re-reads messages, which the
        // seen-ids and the SURB table make harmless.
        self.save()?;
        for (m, up_to) in acks {
            if let Some(t) = &m.token {
                let _ = self.net.ack(&m, t, up_to).await;
            }
        }
        self.send_receipts().await;
        self.retransmit_due().await?;
        self.pump().await?;
        self.purge_expired(now_ms());
        self.save()?;
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
        for mut m in self.owned_mailboxes() {
            if skip.contains(&hex::encode(m.id)) {
                continue;
            }
            let token = self.token(&mut m).await?;
            self.store_mailbox(&m);
            let ticket = self.net.stream_ticket(&m, &token).await?;
            out.push((hex::encode(m.id), crate::net::stream_url(&m, &ticket)?));
        }
        self.save()?;
        Ok(out)
    }

    /// Processes messages pushed by mailbox streams (mailbox id hex, message), like a poll
    /// round: durable first, then acknowledged to the nodes; then receipts, retransmissions
    /// and queued sends.
    pub async fn ingest(&mut self, pushed: Vec<(String, StoredMessage)>) -> Result<()> {
        let mut acks: BTreeMap<String, u64> = BTreeMap::new();
        for (mailbox, msg) in pushed {
            let Some(m) = self
                .owned_mailboxes()
                .into_iter()
                .find(|m| hex::encode(m.id) == mailbox)
            else {
                continue;
            };
            if msg.seq <= m.cursor {
                continue;
            }
            self.process(&m, &msg);
            let mut m2 = m.clone();
            m2.cursor = msg.seq;
            self.store_mailbox(&m2);
            acks.insert(mailbox, msg.seq);
        }
        self.save()?;
        for (mailbox, up_to) in acks {
            if let Some(mut m) = self
                .owned_mailboxes()
                .into_iter()
                .find(|m| hex::encode(m.id) == mailbox)
            {
                let token = self.token(&mut m).await?;
                self.store_mailbox(&m);
                let _ = self.net.ack(&m, &token, up_to).await;
            }
        }
        self.tick().await
    }

    /// Housekeeping without polling: sends due receipts, retransmits, sends what the windows
    /// allow, forgets what expired; saves.
    pub async fn tick(&mut self) -> Result<()> {
        self.send_receipts().await;
        self.retransmit_due().await?;
        self.pump().await?;
        self.purge_expired(now_ms());
        self.save()
    }

    /// Cover packets sent by this client so far.
    pub fn cover_sent(&self) -> u64 {
        self.state.cover_sent
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
                let surb = self.state.surbs.remove(pos);
                let Ok(sealed) = b64.decode(payload) else {
                    return;
                };
                let Ok(recovery) = SurbRecovery::from_bytes(&surb.recovery) else {
                    return;
                };
                let Ok(opened) = recovery.open(&sealed) else {
                    return;
                };
                let Ok(reply) = Reply::decode(&opened) else {
                    return;
                };
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
                if let Some(o) = self.state.outbox.get_mut(i) {
                    if let Some(f) = o.fragments.get_mut(*fragment)
                        && f.dedup == dedup_id.0
                        && !f.acked
                    {
                        f.acked = true;
                        carried = f
                            .route
                            .iter()
                            .skip(1)
                            .take(f.route.len().saturating_sub(2))
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
            // Our own cover traffic.
            return Ok(());
        }
        let Some(name) = self.owner_name(m) else {
            return Ok(());
        };
        let message_id = hex::encode(opened.content.message_id.as_bytes());
        let is_contact = self.state.contacts.iter().any(|c| c.mine.id == m.id);
        if is_contact {
            let c = self.contact(&name)?;
            if c.their_identity != sender {
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
        let olm = OlmMessage::from_parts(usize::from(t), body)
            .map_err(|e| ClientError::Olm(e.to_string()))?;
        let plaintext = if is_contact {
            let session = self
                .sessions
                .get_mut(&name)
                .ok_or_else(|| ClientError::NotEstablished(name.clone()))?;
            match session.decrypt(&olm) {
                Ok(p) => p,
                Err(e) => {
                    // A retransmitted copy whose first copy was already read, or garbage.
                    return Err(ClientError::Olm(e.to_string()));
                }
            }
        } else {
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
        self.on_app(&name, &message_id, app, sender)
    }

    /// A prekey message on an invitation's mailbox: creates the contact.
    fn answer_invitation(
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
            created_ms: now_ms(),
        });
        self.sessions.insert(name.to_string(), created.session);
        Ok(created.plaintext)
    }

    fn reassemble(
        &mut self,
        name: &str,
        message_id: &str,
        content: &EnvelopeContent,
    ) -> Result<Option<Vec<u8>>> {
        let now = now_ms();
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
        let now = now_ms();
        match app {
            AppMessage::Hello {
                identity,
                curve,
                mailbox,
                mailbox_key,
                access,
                binding,
            } => {
                let identity = h32(&identity, "hello identity")?;
                let curve = h32(&curve, "hello curve")?;
                let theirs = PeerMailbox {
                    id: h32(&mailbox, "hello mailbox")?,
                    key: h32(&mailbox_key, "hello mailbox key")?,
                    access: h32(&access, "hello access")?,
                };
                let sig = hex::decode(binding)
                    .ok()
                    .and_then(|b| <[u8; 64]>::try_from(b).ok())
                    .ok_or_else(|| ClientError::Olm("hello binding".to_string()))?;
                let c = self.contact(name)?;
                if identity != sender || curve != c.their_curve {
                    return Err(ClientError::IdentityChanged(name.to_string()));
                }
                VerifyingKey::from_bytes(&identity)
                    .and_then(|k| {
                        k.verify_strict(
                            &hello_transcript(&curve, &theirs),
                            &Signature::from_bytes(&sig),
                        )
                    })
                    .map_err(|_| ClientError::Olm("hello binding does not verify".to_string()))?;
                if let Some(c) = self.state.contacts.iter_mut().find(|c| c.name == name) {
                    c.theirs = Some(theirs);
                }
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
                self.state.history.push(HistoryEntry {
                    contact: name.to_string(),
                    message_id: message_id.to_string(),
                    text: body,
                    sent_ms,
                    received_ms: now,
                    expires_ms,
                    shown: false,
                });
                let max = self.state.settings.history_max.max(1);
                if self.state.history.len() > max {
                    let excess = self.state.history.len() - max;
                    self.state.history.drain(..excess);
                }
                if self.state.settings.receipts != Receipts::None {
                    self.receipts_due
                        .entry((name.to_string(), "delivered".to_string()))
                        .or_default()
                        .push(message_id.to_string());
                }
            }
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

    async fn send_receipts(&mut self) {
        let due = std::mem::take(&mut self.receipts_due);
        for ((name, kind), ids) in due {
            let app = AppMessage::Receipt { kind, of: ids };
            // A contact we can no longer write to simply gets no receipt.
            let _ = self.queue(&name, OutKind::Receipt, &app, None, None);
        }
        // Failures are retried by the next round's pump.
        let _ = self.pump().await;
    }

    /// Received messages not shown yet, oldest first; marks them shown and, if the user sends
    /// read receipts, queues them (sent at the next [`Client::sync`] or [`Client::flush`]).
    pub fn take_unread(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        for h in &mut self.state.history {
            if !h.shown {
                h.shown = true;
                out.push(Received {
                    from: h.contact.clone(),
                    text: h.text.clone(),
                    sent_ms: h.sent_ms,
                    received_ms: h.received_ms,
                    expires_ms: h.expires_ms,
                });
                if self.state.settings.receipts == Receipts::Read {
                    self.receipts_due
                        .entry((h.contact.clone(), "read".to_string()))
                        .or_default()
                        .push(h.message_id.clone());
                }
            }
        }
        out
    }

    /// Sends queued receipts and saves.
    pub async fn flush(&mut self) -> Result<()> {
        self.send_receipts().await;
        self.save()
    }

    /// Notices (delivery, failures, identity changes, …) not shown yet; clears them.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.state.notices)
    }

    /// The local history of `name` (disappearing messages past their time are gone).
    pub fn history(&self, name: &str) -> Vec<Received> {
        let now = now_ms();
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
            })
            .collect()
    }

    /// Waits (syncing) until outgoing `id` leaves the sending state, or `timeout`; its state.
    pub async fn wait_stored(&mut self, id: u64, timeout: Duration) -> Result<OutState> {
        let deadline =
            now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        loop {
            let state = self
                .out_index(id)
                .and_then(|i| self.state.outbox.get(i))
                .map(|o| o.state)
                .ok_or(ClientError::UnknownScheduled(id))?;
            if !matches!(
                state,
                OutState::Sending | OutState::Scheduled | OutState::Cancelling
            ) || now_ms() >= deadline
            {
                return Ok(self
                    .out_index(id)
                    .and_then(|i| self.state.outbox.get(i))
                    .map_or(state, |o| o.state));
            }
            self.sync(Duration::from_millis(self.state.settings.poll_wait_ms))
                .await?;
        }
    }

    /// Contacts and pending invitations.
    pub fn contacts(&self) -> Vec<ContactInfo> {
        self.state
            .contacts
            .iter()
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
            })
            .chain(self.state.invitations.iter().map(|i| ContactInfo {
                name: i.name.clone(),
                state: "pending".to_string(),
                verified: false,
            }))
            .collect()
    }

    /// The safety number shared with `name`: 60 digits that both sides compute from both
    /// identity keys (Ed25519 and Curve25519); compare them out of band.
    pub fn safety_number(&self, name: &str) -> Result<String> {
        let c = self.contact(name)?;
        let mine = fingerprint(
            &self.identity().verifying_key().to_bytes(),
            &self.account.curve25519_key().to_bytes(),
        );
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
        self.save()
    }

    /// Outgoing messages still in flight (sending, scheduled, cancelling) and the last
    /// finished ones.
    pub fn status(&self) -> Vec<OutgoingInfo> {
        self.state
            .outbox
            .iter()
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

    /// Sends one cover packet: a dummy deposit, sealed by us to one of our own mailboxes,
    /// indistinguishable on the wire from a real one; dropped on receipt.
    pub async fn send_cover(&mut self) -> Result<()> {
        let boxes = self.owned_mailboxes();
        if boxes.is_empty() {
            return Ok(());
        }
        let m = boxes
            .get(self.rng.random_range(0..boxes.len()))
            .cloned()
            .ok_or(ClientError::Full("mailboxes"))?;
        let dir = self.directory().await?;
        let now = now_ms();
        let epoch = epoch_at(now);
        let secret = MailboxSecretKey::from_bytes(&m.secret)?;
        let mut filler = vec![0u8; 1200];
        self.rng.fill_bytes(&mut filler);
        let message_id = MessageId::random(&mut self.rng);
        let fragment = fragment_message(message_id, &filler)?
            .into_iter()
            .next()
            .ok_or(ClientError::Full("fragments"))?;
        let surb = self.new_surb(&dir, &m, SurbPurpose::Cover, epoch, now + SURB_TTL_MS)?;
        let identity = self.identity();
        let dedup_id = DedupId::random(&mut self.rng);
        let envelope = Envelope::seal(
            &mut self.rng,
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
        let node = NodeId(m.node);
        let route = self.route(&dir, epoch, &node)?;
        let delays = self.delays(route.len().saturating_sub(1));
        let packet = build_packet(
            &mut self.rng,
            &route,
            &delays,
            DestinationAddress::mailbox(&MailboxId(m.id)),
            &FinalMessage::Deposit(envelope).encode()?,
        )?;
        let edge = api_of(&dir, &route.first().map(|h| h.node).unwrap_or(node))?;
        self.net.submit(&edge, &[packet.into_bytes()]).await?;
        self.state.cover_sent = self.state.cover_sent.saturating_add(1);
        Ok(())
    }

    /// What the mailbox node of our relationship with `name` still stores (its export,
    /// still sealed): the expiry time (ms) of each stored message. Lets a user check that a
    /// disappearing message is gone from the node.
    pub async fn stored_on_node(&mut self, name: &str) -> Result<Vec<u64>> {
        let mut m = self.contact(name)?.mine.clone();
        let token = self.token(&mut m).await?;
        self.store_mailbox(&m);
        let v = self.net.export(&m, &token).await?;
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
        (
            hex::encode(self.identity().verifying_key().to_bytes()),
            hex::encode(self.account.curve25519_key().to_bytes()),
        )
    }

    /// Packets an edge relay did not take since this client was opened, by reason (a drop
    /// reason such as `rate_limited`, an HTTP status, or `unreachable`); they are retransmitted
    /// like lost ones.
    pub fn refused_packets(&self) -> &BTreeMap<String, u64> {
        &self.refused
    }

    /// Ids of the own mailboxes (hex) — for tests that check what nodes store.
    pub fn mailbox_ids(&self) -> Vec<String> {
        self.owned_mailboxes()
            .iter()
            .map(|m| hex::encode(m.id))
            .collect()
    }
}

fn check_bundle(bundle: &PrekeyBundle, inv: &Invitation) -> Result<[u8; 32]> {
    let owner = VerifyingKey::from_bytes(&inv.owner_key)
        .map_err(|_| ClientError::InvalidInvitation("owner key"))?;
    bundle.verify(&owner, &MailboxId(inv.mailbox_id))?;
    if bundle.identity_key != inv.curve {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn client(dir: &Path) -> Client {
        let kdf = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        Client::init(
            dir,
            b"pw",
            "http://127.0.0.1:9/v1/directory",
            Settings::default(),
            kdf,
        )
        .unwrap()
    }

    fn fragment(acked: bool, attempts: u32, sent_ms: u64) -> OutFragment {
        OutFragment {
            dedup: [1; 16],
            envelope: Vec::new(),
            acked,
            attempts,
            sent_ms,
            route: vec!["ed".into(), "m1".into(), "dest".into()],
            surb_route: vec!["m2".into()],
        }
    }

    fn outgoing(id: u64, fragments: Vec<OutFragment>) -> Outgoing {
        Outgoing {
            id,
            contact: "bob".into(),
            kind: OutKind::Text,
            message_id: [2; 16],
            state: OutState::Sending,
            created_ms: 0,
            release_ms: None,
            expires_ms: None,
            fragments,
            holds: Vec::new(),
            retransmissions: 0,
            len: 10,
        }
    }

    #[test]
    fn retransmission_plan_resends_what_is_overdue_and_gives_up_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = client(dir.path());
        let now = 1_000_000;
        let after = c.state.settings.retransmit_after_ms;
        let max = c.state.settings.attempts_max;
        c.state.outbox.push(outgoing(
            1,
            vec![
                fragment(true, 1, 0),
                fragment(false, 1, now - after),
                fragment(false, 1, now - after + 1),
            ],
        ));
        c.state
            .outbox
            .push(outgoing(2, vec![fragment(false, max, 0)]));
        let plan = c.plan_retransmissions(now);
        // Only the overdue, unacknowledged fragment of message 1; message 2 failed.
        assert_eq!(plan, vec![(1, vec![1], vec![], vec![])]);
        assert_eq!(c.state.outbox[1].state, OutState::Failed);
        let notices = c.take_notices();
        assert_eq!(notices.len(), 1);
        assert_eq!(
            (notices[0].kind.as_str(), notices[0].id),
            ("failed", Some(2))
        );
        // The mixes of the lost route (forward and ack) are charged, not the edge or the
        // destination.
        let charged: Vec<&str> = c
            .state
            .relay_health
            .iter()
            .map(|h| h.node.as_str())
            .collect();
        assert_eq!(charged, ["m1", "m2"]);
        // Planning again at once plans nothing new for the failed message.
        assert!(c.plan_retransmissions(now).iter().all(|w| w.0 != 2));
    }
}
