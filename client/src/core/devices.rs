//! Devices: an account is a primary device and up to five linked ones
//! ([`crate::state::DEVICES_MAX`]), each with its own Olm account, sealed-sender key and
//! mailbox logins, named in a device list the account's identity key signs
//! (`docs/clients.md`, *Several devices*).
//!
//! - **Fan-out.** A message to a contact with several devices (or from an account with
//!   several) is encrypted once under a fresh content key (XChaCha20-Poly1305), and that key
//!   once per device of the contact with the pairwise Olm session ([`FORMAT_MULTI`]). Sessions
//!   with a device never heard from start from its fallback key, which the signed list
//!   carries. The mailbox stores one envelope; every device of the account reads it with its
//!   own login and cursor.
//! - **Sync.** The account's devices share a sync mailbox (the reserved contact
//!   [`SELF_CONTACT`]): a device that sends a message, reads one, or (the primary) makes a
//!   contact tells the others there.
//! - **Linking.** The primary's `link` makes a link mailbox and a code (mailbox, its secret
//!   key, the account's public keys, an expiry); the new device deposits its public keys
//!   there, bound to the code ([`FORMAT_LINK`]); both show a short code derived from the
//!   code and the new keys, the user types the new device's on the primary, which registers
//!   the device's login keys on every mailbox of the account, signs the new list, and sends the
//!   account (contacts, mailboxes, settings, login secret) through the mesh, Olm-encrypted to
//!   the new device's keys.
//! - **Removal.** The primary deletes the device's login keys from every mailbox and signs a
//!   list without it; contacts stop encrypting for it and refuse what it sends.

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use ed25519_dalek::ed25519::signature::Signer;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{OlmMessage, SessionConfig};
use whispr_protocol::envelope::MailboxSecretKey;
use whispr_protocol::mailbox_api::REPLICAS_MAX;

use super::{AppMessage, ClientCore, owner_key};
use crate::error::{ClientError, Result};
use crate::state::{
    Contact, DEVICES_MAX, DeviceEntry, DeviceList, DeviceLogin, HistoryEntry, LinkRequest,
    LinkedTo, OutKind, OwnedMailbox, PeerMailbox, PendingLink, Replica, Settings,
};

/// The reserved contact of the account's own devices (its mailbox is the sync mailbox).
pub const SELF_CONTACT: &str = "~me";
/// The reserved contact of a link in progress (its mailbox is the link mailbox).
pub const LINK_CONTACT: &str = "~link";
/// Message bytes: a content key per device, then the message under it.
pub(super) const FORMAT_MULTI: u8 = 2;
/// Message bytes: a new device's link request (public keys, in clear inside the envelope).
const FORMAT_LINK: u8 = 3;
const DEVICES_PREFIX: &[u8] = b"whispr-devices-v1";
const LOGIN_PREFIX: &[u8] = b"whispr-device-login-v1";
const LINK_KEY_PREFIX: &[u8] = b"whispr-link-key-v1";
const LINK_SAS_PREFIX: &[u8] = b"whispr-link-sas-v1";
const CODE_PREFIX: &str = "WHISPRL1:";
const CODE_VERSION: u8 = 1;
/// How long a linking code works.
pub const LINK_TTL_MS: u64 = 10 * 60 * 1000;
/// Longest device name.
const DEVICE_NAME_MAX: usize = 32;

/// Whether `name` is one of the reserved contacts (not the user's).
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('~')
}

/// What the identity key signs: the keys and the version (names are not sent to contacts).
fn devices_transcript(identity: &[u8; 32], version: u64, devices: &[DeviceEntry]) -> Vec<u8> {
    let mut t = Vec::with_capacity(DEVICES_PREFIX.len() + 41 + devices.len() * 96);
    t.extend_from_slice(DEVICES_PREFIX);
    t.extend_from_slice(identity);
    t.extend_from_slice(&version.to_be_bytes());
    t.push(u8::try_from(devices.len()).unwrap_or(u8::MAX));
    for d in devices {
        t.extend_from_slice(&d.ed);
        t.extend_from_slice(&d.curve);
        t.extend_from_slice(&d.fallback);
    }
    t
}

/// Checks a device list against the account's identity key: its signature, its size, its
/// devices distinct, and the primary (the identity key's own device, `primary_curve`) first.
pub(super) fn verify_list(
    identity: &[u8; 32],
    primary_curve: &[u8; 32],
    list: &DeviceList,
) -> Result<()> {
    let bad = |why: &str| ClientError::Olm(format!("device list: {why}"));
    if list.devices.is_empty() || list.devices.len() > DEVICES_MAX {
        return Err(bad("1 to 6 devices"));
    }
    let first = list.devices.first().ok_or_else(|| bad("empty"))?;
    if first.ed != *identity || first.curve != *primary_curve {
        return Err(bad("the primary device is not first"));
    }
    for (i, d) in list.devices.iter().enumerate() {
        if list
            .devices
            .iter()
            .skip(i + 1)
            .any(|o| o.curve == d.curve || o.ed == d.ed)
        {
            return Err(bad("a device twice"));
        }
    }
    VerifyingKey::from_bytes(identity)
        .and_then(|k| {
            k.verify_strict(
                &devices_transcript(identity, list.version, &list.devices),
                &Signature::from_bytes(&list.signature),
            )
        })
        .map_err(|_| bad("bad signature"))
}

/// The login key seed of a linked device for mailbox `id` (one key per mailbox, so that nodes
/// cannot link an account's mailboxes by a device's key).
pub(super) fn login_seed(secret: &[u8; 32], id: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LOGIN_PREFIX);
    h.update(secret);
    h.update(id);
    h.finalize().into()
}

fn login_public(secret: &[u8; 32], id: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(&login_seed(secret, id))
        .verifying_key()
        .to_bytes()
}

/// The key a link request is authenticated with: from the link mailbox's secret key, which
/// only the code carries.
fn link_key(mailbox_secret: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LINK_KEY_PREFIX);
    h.update(mailbox_secret);
    h.finalize().into()
}

/// Keyed SHA-256 over the request's fixed-length fields (a prefix MAC is sound on inputs of
/// one fixed length).
fn request_mac(key: &[u8; 32], r: &LinkRequest) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key);
    h.update(r.ed);
    h.update(r.curve);
    h.update(r.fallback);
    h.update(r.login);
    h.finalize().into()
}

/// The short code both devices show: six digits from the code's secret and the new device's
/// keys (a code holder who swapped in its own keys shows other digits).
fn short_code(mailbox_secret: &[u8; 32], r: &LinkRequest) -> String {
    let mut h = Sha256::new();
    h.update(LINK_SAS_PREFIX);
    h.update(mailbox_secret);
    h.update(r.ed);
    h.update(r.curve);
    h.update(r.fallback);
    h.update(r.login);
    let d: [u8; 32] = h.finalize().into();
    let v = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1_000_000;
    format!("{:03}-{:03}", v / 1000, v % 1000)
}

/// A linking code: everything a new device needs to reach the link mailbox and to check the
/// account. Text: `WHISPRL1:` then RFC 4648 base32 (QR alphanumeric) of version `1` ‖ mailbox
/// id ‖ mailbox secret key ‖ access key ‖ reply key ‖ identity key ‖ primary's Olm key ‖ expiry (ms, u64
/// BE) ‖ n (1 to 5) ‖ n × replica node id ‖ first 4 bytes of SHA-256 of what precedes.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkCode {
    /// The link mailbox.
    pub mailbox_id: [u8; 32],
    /// Its HPKE secret key (the code is the secret: whoever holds it can write there).
    pub secret: [u8; 32],
    /// Its access key.
    pub access: [u8; 32],
    /// Its reply key (the new device's deposit acks come back there).
    pub reply_key: [u8; 32],
    /// The account's identity key.
    pub identity: [u8; 32],
    /// The primary's Olm identity key.
    pub curve: [u8; 32],
    /// The code works until then, ms.
    pub expires_ms: u64,
    /// The link mailbox's replica set.
    pub replicas: Vec<[u8; 32]>,
}

impl std::fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCode").finish_non_exhaustive()
    }
}

impl LinkCode {
    /// The code as text.
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(1 + 6 * 32 + 9 + self.replicas.len() * 32 + 4);
        b.push(CODE_VERSION);
        for k in [
            &self.mailbox_id,
            &self.secret,
            &self.access,
            &self.reply_key,
            &self.identity,
            &self.curve,
        ] {
            b.extend_from_slice(k);
        }
        b.extend_from_slice(&self.expires_ms.to_be_bytes());
        b.push(u8::try_from(self.replicas.len()).unwrap_or(u8::MAX));
        for r in &self.replicas {
            b.extend_from_slice(r);
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(sum.get(..4).unwrap_or_default());
        format!("{CODE_PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&b))
    }

    /// Reads a code (typed, pasted or scanned: spaces and case do not matter).
    pub fn decode(text: &str) -> Result<LinkCode> {
        let bad = |why: &str| ClientError::Link(format!("not a linking code ({why})"));
        let clean: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_uppercase();
        let body = clean
            .strip_prefix(CODE_PREFIX)
            .ok_or_else(|| bad("prefix"))?;
        let b = data_encoding::BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| bad("base32"))?;
        let (data, sum) = b
            .split_at_checked(b.len().saturating_sub(4))
            .ok_or_else(|| bad("length"))?;
        if b.len() < 4 || Sha256::digest(data).get(..4) != Some(sum) {
            return Err(bad("checksum"));
        }
        let mut r = data;
        let mut take = |n: usize| -> Result<&[u8]> {
            let (head, rest) = r.split_at_checked(n).ok_or_else(|| bad("length"))?;
            r = rest;
            Ok(head)
        };
        let k32 = |s: &[u8]| -> [u8; 32] {
            let mut out = [0u8; 32];
            out.copy_from_slice(s);
            out
        };
        if take(1)? != [CODE_VERSION] {
            return Err(bad("version"));
        }
        let mailbox_id = k32(take(32)?);
        let secret = k32(take(32)?);
        let access = k32(take(32)?);
        let reply_key = k32(take(32)?);
        let identity = k32(take(32)?);
        let curve = k32(take(32)?);
        let mut e = [0u8; 8];
        e.copy_from_slice(take(8)?);
        let n = usize::from(*take(1)?.first().ok_or_else(|| bad("length"))?);
        if n == 0 || n > REPLICAS_MAX {
            return Err(bad("replica count"));
        }
        let mut replicas = Vec::with_capacity(n);
        for _ in 0..n {
            replicas.push(k32(take(32)?));
        }
        if !take(0)?.is_empty() || !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(LinkCode {
            mailbox_id,
            secret,
            access,
            reply_key,
            identity,
            curve,
            expires_ms: u64::from_be_bytes(e),
            replicas,
        })
    }
}

/// A linking code made by [`ClientCore::link_prepare`]: the driver creates `mailbox` (and
/// `sync`, the account's sync mailbox, when there is none yet) on their replicas, then
/// commits it ([`ClientCore::link_commit`]).
pub struct LinkPlan {
    /// The new device's name.
    pub name: String,
    /// The link mailbox.
    pub mailbox: OwnedMailbox,
    /// Its HPKE public key.
    pub mailbox_key: [u8; 32],
    /// The sync mailbox to create first, with its HPKE public key.
    pub sync: Option<(OwnedMailbox, [u8; 32])>,
    /// Retention to ask for.
    pub retention_ms: u64,
    code: LinkCode,
}

impl std::fmt::Debug for LinkPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPlan")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A device as `whispr devices` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    /// Its name.
    pub name: String,
    /// The primary (holds the identity key; makes contacts, links and removes devices).
    pub primary: bool,
    /// This device.
    pub this: bool,
    /// Linked, ms.
    pub added_ms: u64,
}

/// A contact as the primary sends it to its other devices (its `Debug` shows the name only).
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct ContactRecord {
    name: String,
    /// Our mailbox for them (its owner seed is not sent: each device derives its login).
    mine: OwnedMailbox,
    theirs: Option<PeerMailbox>,
    #[serde(with = "crate::state::hexa")]
    their_identity: [u8; 32],
    #[serde(with = "crate::state::hexa")]
    their_curve: [u8; 32],
    their_devices: Option<DeviceList>,
    verified: bool,
    heard_from: bool,
    created_ms: u64,
}

impl ContactRecord {
    /// Contact `c` as sent to the account's other devices (without our mailbox's owner
    /// seed: each device derives its own login).
    fn of(c: &Contact) -> ContactRecord {
        ContactRecord {
            name: c.name.clone(),
            mine: OwnedMailbox {
                owner_seed: [0; 32],
                ..c.mine.clone()
            },
            theirs: c.theirs.clone(),
            their_identity: c.their_identity,
            their_curve: c.their_curve,
            their_devices: c.their_devices.clone(),
            verified: c.verified,
            heard_from: c.heard_from,
            created_ms: c.created_ms,
        }
    }
}

impl std::fmt::Debug for ContactRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactRecord").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer").finish_non_exhaustive()
    }
}

/// The account, as the primary sends it to a new device (Olm-encrypted to it).
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Transfer {
    #[serde(with = "crate::state::hexa")]
    identity: [u8; 32],
    #[serde(with = "crate::state::hexa")]
    curve: [u8; 32],
    #[serde(with = "crate::state::hexa")]
    login_secret: [u8; 32],
    name: String,
    devices: DeviceList,
    contacts: Vec<ContactRecord>,
    sync: ContactRecord,
    settings: Settings,
}

/// A scheduled send as another device of the account gets it (its `Debug` hides the cancel
/// capabilities).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub(super) struct ScheduledCopy(pub crate::state::Outgoing);

impl std::fmt::Debug for ScheduledCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScheduledCopy(..)")
    }
}

fn peer_of(m: &OwnedMailbox) -> Result<PeerMailbox> {
    Ok(PeerMailbox {
        id: m.id,
        key: MailboxSecretKey::from_bytes(&m.secret)?
            .public_key()
            .to_bytes(),
        access: m.access,
        node: m.node,
        replicas: m.replica_nodes(),
    })
}

fn new_contact(name: &str, mine: OwnedMailbox, theirs: Option<PeerMailbox>, now: u64) -> Contact {
    Contact {
        name: name.to_string(),
        mine,
        theirs,
        their_identity: [0; 32],
        their_curve: [0; 32],
        session: None,
        heard_from: true,
        verified: true,
        seen: Default::default(),
        invitation_key: None,
        created_ms: now,
        deposit_replica: None,
        their_devices: None,
        devices_sent: 0,
        device_sessions: Vec::new(),
    }
}

/// Reads the parts of a [`FORMAT_MULTI`] message: (to, from, Olm type, Olm body) each, then
/// the nonce and the sealed message.
type Part<'a> = ([u8; 32], [u8; 32], u8, &'a [u8]);

fn parse_multi(b: &[u8]) -> Result<(Vec<Part<'_>>, &[u8], &[u8])> {
    let bad = || ClientError::Olm("malformed multi-device message".to_string());
    let mut r = b.get(1..).ok_or_else(bad)?;
    let mut take = |n: usize| -> Result<&[u8]> {
        let (head, rest) = r.split_at_checked(n).ok_or_else(bad)?;
        r = rest;
        Ok(head)
    };
    let n = usize::from(*take(1)?.first().ok_or_else(bad)?);
    if n == 0 || n > 2 * DEVICES_MAX {
        return Err(bad());
    }
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        let mut to = [0u8; 32];
        to.copy_from_slice(take(32)?);
        let mut from = [0u8; 32];
        from.copy_from_slice(take(32)?);
        let t = *take(1)?.first().ok_or_else(bad)?;
        let len = take(2)?;
        let len = usize::from(u16::from_be_bytes([
            *len.first().ok_or_else(bad)?,
            *len.get(1).ok_or_else(bad)?,
        ]));
        parts.push((to, from, t, take(len)?));
    }
    let nonce = take(24)?;
    Ok((parts, nonce, r))
}

impl ClientCore {
    /// Whether this device is its account's primary (or its only device).
    pub fn is_primary(&self) -> bool {
        self.state.linked_to.is_none()
    }

    pub(super) fn require_primary(&self, what: &'static str) -> Result<()> {
        if self.is_primary() {
            Ok(())
        } else {
            Err(ClientError::PrimaryOnly(what))
        }
    }

    /// The account's identity key (the primary's; on a linked device, the account it joined).
    pub(super) fn account_identity(&self) -> [u8; 32] {
        match &self.state.linked_to {
            Some(l) => l.identity,
            None => self.identity().verifying_key().to_bytes(),
        }
    }

    /// The primary's Olm identity key.
    pub(super) fn account_curve(&self) -> [u8; 32] {
        match &self.state.linked_to {
            Some(l) => l.curve,
            None => self.my_curve(),
        }
    }

    pub(super) fn my_curve(&self) -> [u8; 32] {
        self.account.curve25519_key().to_bytes()
    }

    /// Whether the account has other devices than this one.
    pub(super) fn has_siblings(&self) -> bool {
        self.state
            .devices
            .as_ref()
            .is_some_and(|l| l.devices.len() > 1)
            && self.state.contacts.iter().any(|c| c.name == SELF_CONTACT)
    }

    /// This device's fallback key (made once, kept in the list).
    fn own_fallback(&mut self) -> [u8; 32] {
        let me = self.my_curve();
        if let Some(d) = self
            .state
            .devices
            .as_ref()
            .and_then(|l| l.devices.iter().find(|d| d.curve == me))
        {
            return d.fallback;
        }
        self.account.generate_fallback_key();
        let key = self
            .account
            .fallback_key()
            .values()
            .next()
            .map(|k| k.to_bytes())
            .unwrap_or_default();
        self.account.mark_keys_as_published();
        key
    }

    fn sign_list(&self, version: u64, devices: Vec<DeviceEntry>) -> DeviceList {
        let identity = self.identity();
        let signature = identity
            .sign(&devices_transcript(
                &identity.verifying_key().to_bytes(),
                version,
                &devices,
            ))
            .to_bytes();
        DeviceList {
            version,
            devices,
            signature,
        }
    }

    /// The account's device list, made (version 1, this device alone) on the primary when
    /// there is none yet.
    pub(super) fn ensure_device_list(&mut self) -> Option<DeviceList> {
        if self.state.devices.is_none() && self.is_primary() {
            let entry = DeviceEntry {
                name: self.state.device_name.clone(),
                ed: self.identity().verifying_key().to_bytes(),
                curve: self.my_curve(),
                fallback: self.own_fallback(),
                added_ms: self.now,
            };
            let list = self.sign_list(1, vec![entry]);
            self.set_own_list(list);
        }
        self.state.devices.clone()
    }

    /// Takes `list` as the account's, on this device and as the sync contact's devices.
    fn set_own_list(&mut self, list: DeviceList) {
        let listed: Vec<[u8; 32]> = list.devices.iter().map(|d| d.curve).collect();
        if let Some(c) = self
            .state
            .contacts
            .iter_mut()
            .find(|c| c.name == SELF_CONTACT)
        {
            c.their_devices = Some(list.clone());
        }
        self.sessions.retain(|k| {
            k.strip_prefix(SELF_CONTACT)
                .and_then(|rest| rest.strip_prefix('#'))
                .and_then(|hex| super::h32(hex, "session").ok())
                .is_none_or(|curve| listed.contains(&curve))
        });
        self.state.devices = Some(list);
    }

    /// The Ed25519 keys of the account's devices (this one included).
    fn own_eds(&self) -> Vec<[u8; 32]> {
        let mut eds = vec![
            self.identity().verifying_key().to_bytes(),
            self.account_identity(),
        ];
        if let Some(l) = &self.state.devices {
            eds.extend(l.devices.iter().map(|d| d.ed));
        }
        eds
    }

    /// Whether envelope sender `sender` is one of our own devices (its cover traffic, or a
    /// sibling's).
    pub(super) fn is_own_device(&self, sender: &[u8; 32]) -> bool {
        self.own_eds().contains(sender)
    }

    /// Whether `sender` (an envelope's sealed-sender key) may speak for contact `c`.
    pub(super) fn sender_allowed(c: &Contact, sender: &[u8; 32]) -> bool {
        match &c.their_devices {
            Some(l) => l.devices.iter().any(|d| d.ed == *sender),
            None => c.their_identity == *sender,
        }
    }

    /// The session table's key for device `curve` of contact `c`: the contact's name for its
    /// first device (the session made when the contact was made), `name#curve` for others.
    fn session_key(c: &Contact, curve: &[u8; 32]) -> String {
        if *curve == c.their_curve {
            c.name.clone()
        } else {
            format!("{}#{}", c.name, hex::encode(curve))
        }
    }

    /// The message bytes of `plaintext` for contact `name`: the single Olm message of before
    /// when both sides are one device, else [`FORMAT_MULTI`].
    pub(super) fn encrypt_for(&mut self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let c = self.contact(name)?;
        let single = c.their_devices.is_none() && self.state.devices.is_none();
        if single && !is_reserved(name) {
            let session = self
                .sessions
                .get_mut(name)
                .ok_or_else(|| ClientError::NotEstablished(name.to_string()))?;
            let olm = session
                .encrypt(plaintext)
                .map_err(|e| ClientError::Olm(e.to_string()))?;
            let (t, body) = olm.to_parts();
            let mut bytes = Vec::with_capacity(body.len() + 1);
            bytes.push(u8::try_from(t).unwrap_or(u8::MAX));
            bytes.extend_from_slice(&body);
            return Ok(bytes);
        }
        let me = self.my_curve();
        let targets: Vec<([u8; 32], Option<[u8; 32]>, String)> = match &c.their_devices {
            Some(l) => l
                .devices
                .iter()
                .map(|d| (d.curve, Some(d.fallback), Self::session_key(c, &d.curve)))
                .collect(),
            None => vec![(c.their_curve, None, c.name.clone())],
        };
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        self.crypto_rng.fill_bytes(key.as_mut());
        let mut nonce = [0u8; 24];
        self.crypto_rng.fill_bytes(&mut nonce);
        let sealed = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*key))
            .encrypt(&XNonce::from(nonce), plaintext)
            .map_err(|_| ClientError::Olm("sealing failed".to_string()))?;
        let mut parts = Vec::new();
        for (curve, fallback, k) in targets {
            if curve == me {
                continue;
            }
            if !self.sessions.contains_key(&k) {
                let Some(fallback) = fallback else { continue };
                let s = self
                    .account
                    .create_outbound_session(
                        SessionConfig::version_1(),
                        Curve25519PublicKey::from_bytes(curve),
                        Curve25519PublicKey::from_bytes(fallback),
                    )
                    .map_err(|e| ClientError::Olm(e.to_string()))?;
                self.sessions.insert(k.clone(), s);
            }
            let Some(session) = self.sessions.get_mut(&k) else {
                continue;
            };
            let olm = session
                .encrypt(key.as_slice())
                .map_err(|e| ClientError::Olm(e.to_string()))?;
            let (t, body) = olm.to_parts();
            parts.push((curve, u8::try_from(t).unwrap_or(u8::MAX), body));
        }
        if parts.is_empty() {
            return Err(ClientError::NotEstablished(name.to_string()));
        }
        let mut b = Vec::with_capacity(2 + parts.len() * 300 + 24 + sealed.len());
        b.push(FORMAT_MULTI);
        b.push(u8::try_from(parts.len()).unwrap_or(u8::MAX));
        for (to, t, body) in parts {
            b.extend_from_slice(&to);
            b.extend_from_slice(&me);
            b.push(t);
            let len = u16::try_from(body.len())
                .map_err(|_| ClientError::Olm("key part too long".to_string()))?;
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&body);
        }
        b.extend_from_slice(&nonce);
        b.extend_from_slice(&sealed);
        Ok(b)
    }

    /// Opens a [`FORMAT_MULTI`] message from contact `name` whose envelope `sender` sealed:
    /// the plaintext, or `None` when it carries no part for this device (our own, or sent
    /// before this device was listed).
    pub(super) fn decrypt_multi(
        &mut self,
        name: &str,
        sender: &[u8; 32],
        whole: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let me = self.my_curve();
        let (parts, nonce, sealed) = parse_multi(whole)?;
        let Some(&(_, from, t, body)) = parts.iter().find(|p| p.0 == me) else {
            return Ok(None);
        };
        let c = self.contact(name)?;
        let allowed = match &c.their_devices {
            Some(l) => l.devices.iter().any(|d| d.curve == from && d.ed == *sender),
            None => from == c.their_curve && *sender == c.their_identity,
        };
        if !allowed {
            return Err(ClientError::IdentityChanged(name.to_string()));
        }
        let k = Self::session_key(c, &from);
        let olm = OlmMessage::from_parts(usize::from(t), body)
            .map_err(|e| ClientError::Olm(e.to_string()))?;
        let existing = self.sessions.get_mut(&k).map(|s| s.decrypt(&olm));
        let key = match (existing, &olm) {
            (Some(Ok(p)), _) => p,
            (_, OlmMessage::PreKey(pre)) => {
                if pre.identity_key().to_bytes() != from {
                    return Err(ClientError::IdentityChanged(name.to_string()));
                }
                let created = self
                    .account
                    .create_inbound_session(SessionConfig::version_1(), pre.identity_key(), pre)
                    .map_err(|e| ClientError::Olm(e.to_string()))?;
                self.sessions.insert(k, created.session);
                created.plaintext
            }
            (Some(Err(e)), _) => return Err(ClientError::Olm(e.to_string())),
            (None, _) => return Err(ClientError::NotEstablished(name.to_string())),
        };
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| ClientError::Olm("content key".to_string()))?;
        let key = zeroize::Zeroizing::new(key);
        let nonce: [u8; 24] = nonce
            .try_into()
            .map_err(|_| ClientError::Olm("nonce".to_string()))?;
        XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*key))
            .decrypt(&XNonce::from(nonce), sealed)
            .map(Some)
            .map_err(|_| ClientError::Olm("the message does not open".to_string()))
    }

    /// A message from contact `name` carries nothing for this device: the contact did not
    /// know of it yet (or, on the sync mailbox, it is this device's own).
    pub(super) fn not_for_this_device(&mut self, name: &str) {
        if is_reserved(name) {
            return;
        }
        self.notice(
            "not_for_this_device",
            Some(name),
            None,
            format!(
                "{name} sent a message before learning of this device: read it on another device"
            ),
        );
    }

    /// Sends the account's current device list to contact `name` (names left out), if it has
    /// not had it.
    pub(super) fn send_devices(&mut self, name: &str) -> Result<()> {
        let Some(mut list) = self.ensure_device_list() else {
            return Ok(());
        };
        let c = self.contact(name)?;
        if c.theirs.is_none() || c.devices_sent >= list.version {
            return Ok(());
        }
        if name != SELF_CONTACT {
            for d in &mut list.devices {
                d.name.clear();
            }
        }
        let version = list.version;
        self.queue(
            name,
            OutKind::Sync,
            &AppMessage::Devices { list },
            None,
            None,
        )?;
        if let Some(c) = self.state.contacts.iter_mut().find(|c| c.name == name) {
            c.devices_sent = version;
        }
        Ok(())
    }

    /// Sends the current device list to every contact and to the other devices.
    fn broadcast_devices(&mut self) {
        let names: Vec<String> = self
            .state
            .contacts
            .iter()
            .filter(|c| c.theirs.is_some() && c.name != LINK_CONTACT)
            .map(|c| c.name.clone())
            .collect();
        for n in names {
            // One contact that cannot be reached now gets it with the next change.
            let _ = self.send_devices(&n);
        }
    }

    /// A device list from contact `name` (or, on the sync contact, the account's own).
    pub(super) fn on_devices(&mut self, name: &str, list: DeviceList) -> Result<()> {
        let c = self.contact(name)?;
        verify_list(&c.their_identity, &c.their_curve, &list)?;
        if c.their_devices
            .as_ref()
            .is_some_and(|l| l.version >= list.version)
        {
            return Ok(());
        }
        if name == SELF_CONTACT {
            if self.is_primary() {
                return Ok(());
            }
            let me = self.my_curve();
            if !list.devices.iter().any(|d| d.curve == me) {
                self.notice(
                    "device_removed",
                    None,
                    None,
                    "this device was removed from the account".to_string(),
                );
            }
            self.set_own_list(list);
            return Ok(());
        }
        let listed: Vec<String> = list
            .devices
            .iter()
            .map(|d| Self::session_key(c, &d.curve))
            .collect();
        let prefix = format!("{name}#");
        self.sessions
            .retain(|k| !k.starts_with(&prefix) || listed.iter().any(|l| l == k));
        if let Some(c) = self.state.contacts.iter_mut().find(|c| c.name == name) {
            c.their_devices = Some(list);
        }
        // They told us their devices: they learn ours.
        self.send_devices(name)
    }

    /// The account's devices.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let me = self.my_curve();
        match &self.state.devices {
            Some(l) => l
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| DeviceInfo {
                    name: d.name.clone(),
                    primary: i == 0,
                    this: d.curve == me,
                    added_ms: d.added_ms,
                })
                .collect(),
            None => vec![DeviceInfo {
                name: self.state.device_name.clone(),
                primary: true,
                this: true,
                added_ms: 0,
            }],
        }
    }

    /// This device's name.
    pub fn device_name(&self) -> &str {
        &self.state.device_name
    }

    /// Names this device (before it is linked or links another).
    pub fn set_device_name(&mut self, name: &str) -> Result<()> {
        let name = name.trim();
        if name.is_empty() || name.len() > DEVICE_NAME_MAX || is_reserved(name) {
            return Err(ClientError::InvalidArgument(
                "a device name has 1 to 32 characters and does not start with ~".to_string(),
            ));
        }
        if self.state.devices.is_some() {
            return Err(ClientError::InvalidArgument(
                "this device is already in a device list".to_string(),
            ));
        }
        self.state.device_name = name.to_string();
        Ok(())
    }

    // ---- Linking, on the primary ----

    /// Begins linking a new device named `name`: a link mailbox and its code (and the sync
    /// mailbox, the first time). Refused on a linked device, at six devices, or while
    /// another code is open.
    pub fn link_prepare(&mut self, now: u64, name: &str) -> Result<LinkPlan> {
        self.at(now);
        self.require_primary("linking a device")?;
        let name = name.trim();
        if name.is_empty() || name.len() > DEVICE_NAME_MAX || is_reserved(name) {
            return Err(ClientError::InvalidArgument(
                "a device name has 1 to 32 characters and does not start with ~".to_string(),
            ));
        }
        let list = self.ensure_device_list();
        let count = list.as_ref().map_or(1, |l| l.devices.len());
        if count >= DEVICES_MAX {
            return Err(ClientError::Link(format!(
                "the account has {DEVICES_MAX} devices already (remove one first)"
            )));
        }
        if list
            .as_ref()
            .is_some_and(|l| l.devices.iter().any(|d| d.name == name))
        {
            return Err(ClientError::Link(format!("a device named {name:?} exists")));
        }
        self.state.links.retain(|l| l.expires_ms > now && !l.done);
        if !self.state.links.is_empty() {
            return Err(ClientError::Link(
                "another linking code is open; finish it or wait 10 minutes".to_string(),
            ));
        }
        let dir = self.dir()?;
        let (mut mailbox, mailbox_key) = self.new_owned_mailbox(&dir, &[])?;
        mailbox.retention_ms = LINK_TTL_MS * 6;
        let sync = if self.state.contacts.iter().any(|c| c.name == SELF_CONTACT) {
            None
        } else {
            Some(self.new_owned_mailbox(&dir, &[])?)
        };
        let code = LinkCode {
            mailbox_id: mailbox.id,
            secret: mailbox.secret,
            access: mailbox.access,
            reply_key: mailbox.reply_key,
            identity: self.account_identity(),
            curve: self.my_curve(),
            expires_ms: now + LINK_TTL_MS,
            replicas: mailbox.replica_nodes(),
        };
        Ok(LinkPlan {
            name: name.to_string(),
            mailbox,
            mailbox_key,
            sync,
            retention_ms: LINK_TTL_MS * 6,
            code,
        })
    }

    /// Keeps a link whose mailbox (and sync mailbox) now exist; the code to show.
    pub fn link_commit(&mut self, now: u64, plan: LinkPlan) -> Result<String> {
        self.at(now);
        let list = self.ensure_device_list();
        if let Some((sync, _)) = plan.sync {
            let mut c = new_contact(SELF_CONTACT, sync.clone(), Some(peer_of(&sync)?), now);
            c.their_identity = self.account_identity();
            c.their_curve = self.my_curve();
            c.their_devices = list;
            self.state.contacts.push(c);
        }
        self.state.contacts.retain(|c| c.name != LINK_CONTACT);
        let theirs = peer_of(&plan.mailbox)?;
        self.state.contacts.push(new_contact(
            LINK_CONTACT,
            plan.mailbox.clone(),
            Some(theirs),
            now,
        ));
        self.state.links = vec![PendingLink {
            name: plan.name,
            mailbox: plan.mailbox.id,
            expires_ms: plan.code.expires_ms,
            request: None,
            confirmed: false,
            done: false,
        }];
        self.save();
        Ok(plan.code.encode())
    }

    /// A message in the link mailbox, on the primary: the new device's request.
    pub(super) fn on_link_request(&mut self, sender: &[u8; 32], whole: &[u8]) -> Result<()> {
        let now = self.now;
        let (&format, body) = whole
            .split_first()
            .ok_or_else(|| ClientError::Link("empty request".to_string()))?;
        if format != FORMAT_LINK {
            return Ok(());
        }
        let req: LinkRequest = serde_json::from_slice(body)
            .map_err(|_| ClientError::Link("malformed request".to_string()))?;
        let secret = self
            .state
            .contacts
            .iter()
            .find(|c| c.name == LINK_CONTACT)
            .map(|c| c.mine.secret)
            .ok_or_else(|| ClientError::Link("no link open".to_string()))?;
        let link = self
            .state
            .links
            .first_mut()
            .ok_or_else(|| ClientError::Link("no link open".to_string()))?;
        if let Some(first) = &link.request {
            if *first == req {
                return Ok(());
            }
            self.notice(
                "link_code_reused",
                None,
                None,
                "a second device used the linking code; refused".to_string(),
            );
            return Err(ClientError::Link("the code was used already".to_string()));
        }
        if now > link.expires_ms {
            return Err(ClientError::Link("the code has expired".to_string()));
        }
        if request_mac(&link_key(&secret), &req) != req.mac || req.ed != *sender {
            return Err(ClientError::Link(
                "the request is not bound to the code".to_string(),
            ));
        }
        link.request = Some(req.clone());
        if let Some(c) = self
            .state
            .contacts
            .iter_mut()
            .find(|c| c.name == LINK_CONTACT)
        {
            c.their_identity = req.ed;
            c.their_curve = req.curve;
            c.their_devices = Some(DeviceList {
                version: 0,
                devices: vec![DeviceEntry {
                    name: String::new(),
                    ed: req.ed,
                    curve: req.curve,
                    fallback: req.fallback,
                    added_ms: now,
                }],
                signature: [0; 64],
            });
        }
        self.notice(
            "link_request",
            None,
            None,
            "a new device asks to join this account: compare the code it shows".to_string(),
        );
        Ok(())
    }

    /// The short code of the open link's request, once the new device's request came.
    pub fn link_short_code(&self) -> Option<String> {
        let link = self.state.links.first()?;
        let req = link.request.as_ref()?;
        let c = self
            .state
            .contacts
            .iter()
            .find(|c| c.name == LINK_CONTACT)?;
        Some(short_code(&c.mine.secret, req))
    }

    /// Whether the open link finished (the new device has the account).
    pub fn link_done(&self) -> bool {
        self.state.links.first().is_some_and(|l| l.done)
    }

    /// Forgets the link contact and what it had in flight (its mailbox is kept or erased by
    /// the caller).
    fn drop_link_contact(&mut self) -> Option<Contact> {
        let pos = self
            .state
            .contacts
            .iter()
            .position(|c| c.name == LINK_CONTACT)?;
        let gone: Vec<u64> = self
            .state
            .outbox
            .iter()
            .filter(|o| o.contact == LINK_CONTACT)
            .map(|o| o.id)
            .collect();
        self.state.outbox.retain(|o| o.contact != LINK_CONTACT);
        self.state.surbs.retain(|s| match &s.purpose {
            crate::state::SurbPurpose::DepositAck { out, .. }
            | crate::state::SurbPurpose::HoldAck { out, .. } => !gone.contains(out),
            _ => true,
        });
        self.sessions.retain(|k| !k.starts_with(LINK_CONTACT));
        Some(self.state.contacts.remove(pos))
    }

    /// Drops the open link (aborted, or done): its mailbox is erased.
    fn close_link(&mut self) {
        self.state.links.clear();
        if let Some(c) = self.drop_link_contact()
            && !self.joining()
        {
            self.state.erasures.push(c.mine);
        }
        self.save();
    }

    /// Gives up the open link.
    pub fn link_abort(&mut self) {
        self.close_link();
    }

    /// The user typed `typed`, the code the new device shows: when it matches, the login
    /// keys to register, (mailbox, device key) each — the link mailbox (to read the
    /// transfer) and every mailbox of the account — then [`Self::link_finish`]. When it does
    /// not, the link is aborted.
    pub fn link_confirm(&mut self, now: u64, typed: &str) -> Result<Vec<(OwnedMailbox, [u8; 32])>> {
        self.at(now);
        let expected = self
            .link_short_code()
            .ok_or_else(|| ClientError::Link("no request to confirm".to_string()))?;
        let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
        if digits(typed) != digits(&expected) {
            self.close_link();
            return Err(ClientError::Link(
                "the codes differ: linking aborted (someone else may hold the code)".to_string(),
            ));
        }
        let req = self
            .state
            .links
            .first()
            .and_then(|l| l.request.clone())
            .ok_or_else(|| ClientError::Link("no request to confirm".to_string()))?;
        let mut secret = [0u8; 32];
        self.crypto_rng.fill_bytes(&mut secret);
        self.state.device_logins.retain(|d| d.curve != req.curve);
        self.state.device_logins.push(DeviceLogin {
            curve: req.curve,
            secret,
            registered: Vec::new(),
        });
        let mut regs = Vec::new();
        for c in &self.state.contacts {
            if c.name == LINK_CONTACT {
                regs.push((c.mine.clone(), req.login));
            } else {
                regs.push((c.mine.clone(), login_public(&secret, &c.mine.id)));
            }
        }
        Ok(regs)
    }

    /// After the registrations of [`Self::link_confirm`]: signs the new device list, sends
    /// the account to the new device and the list to every contact.
    pub fn link_finish(&mut self, now: u64) -> Result<()> {
        self.at(now);
        let link = self
            .state
            .links
            .first()
            .cloned()
            .ok_or_else(|| ClientError::Link("no link open".to_string()))?;
        let req = link
            .request
            .clone()
            .ok_or_else(|| ClientError::Link("no request".to_string()))?;
        let login = self
            .state
            .device_logins
            .iter_mut()
            .find(|d| d.curve == req.curve)
            .ok_or_else(|| ClientError::Link("not confirmed".to_string()))?;
        login.registered = self
            .state
            .contacts
            .iter()
            .filter(|c| c.name != LINK_CONTACT)
            .map(|c| c.mine.id)
            .collect();
        let login_secret = login.secret;
        let mut list = self
            .ensure_device_list()
            .ok_or_else(|| ClientError::Link("no device list".to_string()))?;
        list.devices.retain(|d| d.curve != req.curve);
        list.devices.push(DeviceEntry {
            name: link.name.clone(),
            ed: req.ed,
            curve: req.curve,
            fallback: req.fallback,
            added_ms: now,
        });
        let list = self.sign_list(list.version + 1, list.devices);
        self.set_own_list(list.clone());
        let sync = self
            .state
            .contacts
            .iter()
            .find(|c| c.name == SELF_CONTACT)
            .map(ContactRecord::of)
            .ok_or_else(|| ClientError::Link("no sync mailbox".to_string()))?;
        let contacts = self
            .state
            .contacts
            .iter()
            .filter(|c| !is_reserved(&c.name) && c.theirs.is_some())
            .map(ContactRecord::of)
            .collect();
        let transfer = Transfer {
            identity: self.account_identity(),
            curve: self.my_curve(),
            login_secret,
            name: link.name.clone(),
            devices: list,
            contacts,
            sync,
            settings: self.state.settings.clone(),
        };
        self.queue(
            LINK_CONTACT,
            OutKind::Sync,
            &AppMessage::LinkTransfer {
                transfer: Box::new(transfer),
            },
            None,
            None,
        )?;
        // The session the transfer started is the sync session with the new device.
        if let Some(s) = self.sessions.remove(LINK_CONTACT) {
            self.sessions
                .insert(format!("{SELF_CONTACT}#{}", hex::encode(req.curve)), s);
        }
        if let Some(l) = self.state.links.first_mut() {
            l.confirmed = true;
        }
        self.broadcast_devices();
        let result = self.pump();
        self.save();
        result
    }

    /// On the primary: the new device says it has the account.
    pub(super) fn on_link_done(&mut self) {
        if let Some(l) = self.state.links.first_mut()
            && l.confirmed
        {
            l.done = true;
            let name = l.name.clone();
            self.notice("device_linked", None, None, format!("{name} is linked"));
            // Its mailbox is erased; the record stays until the driver sees `done`.
            if let Some(c) = self.drop_link_contact() {
                self.state.erasures.push(c.mine);
            }
        }
    }

    /// Login keys still to register on own mailboxes for linked devices (a contact made after
    /// the device was linked): (mailbox, device curve, login key).
    pub fn registrations_due(&self) -> Vec<(OwnedMailbox, [u8; 32], [u8; 32])> {
        let mut due = Vec::new();
        for d in &self.state.device_logins {
            for c in &self.state.contacts {
                if c.name != LINK_CONTACT
                    && !d.registered.contains(&c.mine.id)
                    && c.mine.replicas.iter().all(|r| r.created)
                {
                    due.push((c.mine.clone(), d.curve, login_public(&d.secret, &c.mine.id)));
                }
            }
        }
        due
    }

    /// The driver registered device `curve`'s login key on every replica of `mailbox`.
    pub fn registration_done(&mut self, mailbox: &[u8; 32], curve: &[u8; 32]) {
        if let Some(d) = self
            .state
            .device_logins
            .iter_mut()
            .find(|d| d.curve == *curve)
            && !d.registered.contains(mailbox)
        {
            d.registered.push(*mailbox);
        }
    }

    /// On the primary, when contact `name` is established: the other devices get it.
    pub(super) fn sync_contact(&mut self, name: &str) {
        if !self.is_primary() || !self.has_siblings() {
            return;
        }
        let Some(c) = self.state.contacts.iter().find(|c| c.name == name) else {
            return;
        };
        let record = ContactRecord::of(c);
        let _ = self.queue(
            SELF_CONTACT,
            OutKind::Sync,
            &AppMessage::SyncContact {
                contact: Box::new(record),
            },
            None,
            None,
        );
        let _ = self.send_devices(name);
    }

    /// Makes a contact from a record the primary sent (the owner seed of its mailbox is this
    /// device's login seed for it).
    fn install_contact(&mut self, r: ContactRecord, login_secret: &[u8; 32]) {
        let mut mine = r.mine;
        mine.owner_seed = login_seed(login_secret, &mine.id);
        for rep in &mut mine.replicas {
            rep.created = true;
            rep.prekeys = None;
            rep.token = None;
            rep.cursor = 0;
        }
        let mut c = new_contact(&r.name, mine, r.theirs, r.created_ms);
        c.their_identity = r.their_identity;
        c.their_curve = r.their_curve;
        c.their_devices = r.their_devices;
        c.verified = r.verified;
        c.heard_from = r.heard_from;
        self.state
            .contacts
            .retain(|o| o.name != c.name && o.mine.id != c.mine.id);
        self.state.contacts.push(c);
    }

    // ---- Linking, on the new device ----

    /// On a new device (fresh state, directory set): sends the request for `code` to the
    /// link mailbox; the short code to show (the user types it on the primary).
    pub fn link_request(&mut self, now: u64, code: &str) -> Result<String> {
        self.at(now);
        if !self.state.contacts.is_empty() || self.state.linked_to.is_some() {
            return Err(ClientError::Link(
                "only a new client can join an account".to_string(),
            ));
        }
        let code = LinkCode::decode(code)?;
        if now > code.expires_ms {
            return Err(ClientError::Link("the code has expired".to_string()));
        }
        let dir = self.dir()?;
        let replicas: Vec<Replica> = code
            .replicas
            .iter()
            .map(|node| Replica {
                node: *node,
                api_url: dir
                    .get(&whispr_protocol::NodeId(*node))
                    .and_then(|d| d.api_url.clone())
                    .unwrap_or_default(),
                cursor: 0,
                token: None,
                token_expires_ms: 0,
                created: true,
                prekeys: None,
            })
            .collect();
        let mut mine = OwnedMailbox {
            id: code.mailbox_id,
            secret: code.secret,
            owner_seed: [0; 32],
            access: code.access,
            reply_key: [0; 32],
            node: code.replicas.first().copied().unwrap_or_default(),
            replicas,
            reading: 0,
            retention_ms: 0,
            legacy_api_url: String::new(),
            legacy_cursor: 0,
            legacy_token: None,
            legacy_token_expires_ms: 0,
        };
        self.crypto_rng.fill_bytes(&mut mine.owner_seed);
        mine.reply_key = code.reply_key;
        let mut req = LinkRequest {
            ed: self.identity().verifying_key().to_bytes(),
            curve: self.my_curve(),
            fallback: self.own_fallback(),
            login: owner_key(&mine).verifying_key().to_bytes(),
            mac: [0; 32],
        };
        req.mac = request_mac(&link_key(&code.secret), &req);
        let theirs = peer_of(&mine)?;
        let mut c = new_contact(LINK_CONTACT, mine.clone(), Some(theirs), now);
        c.their_identity = code.identity;
        c.their_curve = code.curve;
        self.state.contacts.push(c);
        // Its own entry, so that its fallback key is kept.
        let me = DeviceEntry {
            name: self.state.device_name.clone(),
            ed: req.ed,
            curve: req.curve,
            fallback: req.fallback,
            added_ms: now,
        };
        self.state.links = vec![PendingLink {
            name: self.state.device_name.clone(),
            mailbox: code.mailbox_id,
            expires_ms: code.expires_ms,
            request: Some(req.clone()),
            confirmed: false,
            done: false,
        }];
        self.state.devices = Some(DeviceList {
            version: 0,
            devices: vec![me],
            signature: [0; 64],
        });
        let mut bytes = vec![FORMAT_LINK];
        bytes.extend(serde_json::to_vec(&req).map_err(|e| ClientError::Link(e.to_string()))?);
        self.queue_bytes(LINK_CONTACT, OutKind::Sync, &bytes, None, None)?;
        let result = self.pump();
        self.save();
        result.map(|()| short_code(&code.secret, &req))
    }

    /// Whether a link is in progress (on a new device: the request sent, the account not
    /// arrived; false when its code expired).
    pub fn link_pending(&self) -> bool {
        self.state
            .links
            .first()
            .is_some_and(|l| l.expires_ms + LINK_TTL_MS > self.now)
    }

    /// The account's sync mailbox, when it has other devices.
    pub fn sync_mailbox(&self) -> Option<[u8; 32]> {
        if !self.has_siblings() {
            return None;
        }
        self.state
            .contacts
            .iter()
            .find(|c| c.name == SELF_CONTACT)
            .map(|c| c.mine.id)
    }

    /// Whether this device is joining an account (its request sent, the account not arrived).
    pub(super) fn joining(&self) -> bool {
        let me = self.my_curve();
        self.state.linked_to.is_none()
            && self
                .state
                .links
                .first()
                .and_then(|l| l.request.as_ref())
                .is_some_and(|r| r.curve == me)
    }

    /// Whether this device joined its account.
    pub fn is_linked(&self) -> bool {
        self.state.linked_to.is_some()
    }

    /// On the new device: the account arrived.
    pub(super) fn on_transfer(&mut self, t: Transfer) -> Result<()> {
        if self.state.linked_to.is_some() || self.state.links.is_empty() {
            return Ok(());
        }
        verify_list(&t.identity, &t.curve, &t.devices)?;
        let me = self.my_curve();
        if !t.devices.devices.iter().any(|d| d.curve == me) {
            return Err(ClientError::Link(
                "the account does not list this device".to_string(),
            ));
        }
        let network = self.state.settings.network.clone();
        self.state.settings = t.settings;
        if network.is_some() {
            self.state.settings.network = network;
        }
        self.state.device_name = t.name;
        self.state.linked_to = Some(LinkedTo {
            identity: t.identity,
            curve: t.curve,
            login_secret: t.login_secret,
        });
        for r in t.contacts {
            self.install_contact(r, &t.login_secret);
        }
        self.install_contact(t.sync, &t.login_secret);
        self.set_own_list(t.devices);
        // The session the transfer came by is the sync session with the primary.
        if let Some(s) = self.sessions.remove(LINK_CONTACT) {
            self.sessions.insert(SELF_CONTACT.to_string(), s);
        }
        self.state.links.clear();
        self.drop_link_contact();
        self.queue(
            SELF_CONTACT,
            OutKind::Sync,
            &AppMessage::LinkDone {
                curve: hex::encode(me),
            },
            None,
            None,
        )?;
        self.notice(
            "device_linked",
            None,
            None,
            "this device joined the account".to_string(),
        );
        Ok(())
    }

    // ---- Removal, on the primary ----

    /// The login keys of device `name` to delete, (mailbox, key) each, before
    /// [`Self::devices_remove_commit`].
    pub fn devices_remove_plan(&self, name: &str) -> Result<Vec<(OwnedMailbox, [u8; 32])>> {
        self.require_primary("removing a device")?;
        let d = self
            .state
            .devices
            .as_ref()
            .and_then(|l| l.devices.iter().skip(1).find(|d| d.name == name))
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!("no linked device named {name:?}"))
            })?;
        let login = self
            .state
            .device_logins
            .iter()
            .find(|l| l.curve == d.curve)
            .ok_or_else(|| ClientError::InvalidArgument(format!("no logins of {name:?}")))?;
        Ok(self
            .state
            .contacts
            .iter()
            .filter(|c| c.name != LINK_CONTACT)
            .map(|c| (c.mine.clone(), login_public(&login.secret, &c.mine.id)))
            .collect())
    }

    /// A device login removal that replica `node` of `mailbox` did not confirm (it was
    /// down): retried by the driver ([`Self::removals_due`]). Bounded: at most 1,000 kept.
    pub fn removal_pending(&mut self, mailbox: &[u8; 32], node: &[u8; 32], key: &[u8; 32]) {
        if self.state.removals.len() < 1_000 {
            self.state.removals.push((*mailbox, *node, *key));
        }
    }

    /// Login removals still to retry: (own mailbox, its replica node, login key).
    pub fn removals_due(&self) -> Vec<(OwnedMailbox, [u8; 32], [u8; 32])> {
        self.state
            .removals
            .iter()
            .filter_map(|(m, n, k)| Some((self.owned_mailbox(m)?, *n, *k)))
            .collect()
    }

    /// Replica `node` of `mailbox` confirmed the removal of `key` (or the mailbox is gone).
    pub fn removal_done(&mut self, mailbox: &[u8; 32], node: &[u8; 32], key: &[u8; 32]) {
        self.state
            .removals
            .retain(|r| r != &(*mailbox, *node, *key));
        let owned: Vec<[u8; 32]> = self.state.contacts.iter().map(|c| c.mine.id).collect();
        self.state.removals.retain(|(m, _, _)| owned.contains(m));
    }

    /// Device `name`'s logins are deleted: a list without it goes to every contact and the
    /// other devices.
    pub fn devices_remove_commit(&mut self, now: u64, name: &str) -> Result<()> {
        self.at(now);
        self.require_primary("removing a device")?;
        let mut list = self
            .state
            .devices
            .clone()
            .ok_or_else(|| ClientError::InvalidArgument("no linked device".to_string()))?;
        let Some(pos) = list.devices.iter().skip(1).position(|d| d.name == name) else {
            return Err(ClientError::InvalidArgument(format!(
                "no linked device named {name:?}"
            )));
        };
        let gone = list.devices.remove(pos + 1);
        self.state.device_logins.retain(|l| l.curve != gone.curve);
        let list = self.sign_list(list.version + 1, list.devices);
        self.set_own_list(list);
        self.broadcast_devices();
        self.notice(
            "device_removed",
            None,
            None,
            format!("{name} was removed: it can no longer log in or read new messages"),
        );
        let result = self.pump();
        self.save();
        result
    }

    // ---- Sync between own devices ----

    /// Tells the other devices that this one sent `body` to contact `name`.
    pub(super) fn sync_sent(
        &mut self,
        name: &str,
        message_id: &[u8; 16],
        body: &str,
        sent_ms: u64,
        expire_after_ms: Option<u64>,
    ) -> Option<u64> {
        if !self.has_siblings() || is_reserved(name) {
            return None;
        }
        let c = self.contact(name).ok()?;
        let app = AppMessage::SyncSent {
            contact: hex::encode(c.mine.id),
            id: hex::encode(message_id),
            body: body.to_string(),
            sent_ms,
            expire_after_ms,
        };
        self.queue(SELF_CONTACT, OutKind::Sync, &app, None, None)
            .ok()
    }

    /// Tells the other devices that these messages were shown here.
    pub(super) fn sync_read(&mut self, read: &[(String, String)]) {
        if !self.has_siblings() || read.is_empty() {
            return;
        }
        let mut by_contact: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (contact, id) in read {
            if let Ok(c) = self.contact(contact) {
                by_contact
                    .entry(hex::encode(c.mine.id))
                    .or_default()
                    .push(id.clone());
            }
        }
        for (contact, of) in by_contact {
            let _ = self.queue(
                SELF_CONTACT,
                OutKind::Sync,
                &AppMessage::SyncRead { contact, of },
                None,
                None,
            );
        }
    }

    /// Tells the other devices that scheduled send `id` is held (`kind` `scheduled`) or was
    /// cancelled (`cancelled`).
    pub(super) fn sync_scheduled(&mut self, kind: &str, id: u64) {
        if !self.has_siblings() {
            return;
        }
        let Some(o) = self.out_index(id).and_then(|i| self.state.outbox.get(i)) else {
            return;
        };
        let app = if kind == "cancelled" {
            AppMessage::SyncCancelled {
                id: hex::encode(o.message_id),
            }
        } else {
            let Ok(c) = self.contact(&o.contact) else {
                return;
            };
            let mut copy = o.clone();
            // What cancelling takes (hold ids, capabilities, timer nodes), not the packets:
            // only the device that made it sends or retransmits them.
            for f in &mut copy.fragments {
                f.envelope = Vec::new();
                f.acked = true;
            }
            for h in &mut copy.holds {
                h.packet = Vec::new();
                h.parts_acked.iter_mut().for_each(|a| *a = true);
            }
            AppMessage::SyncScheduled {
                contact: hex::encode(c.mine.id),
                out: Box::new(ScheduledCopy(copy)),
            }
        };
        let _ = self.queue(SELF_CONTACT, OutKind::Sync, &app, None, None);
    }

    fn contact_by_mailbox(&self, hex_id: &str) -> Option<String> {
        let id = super::h32(hex_id, "contact").ok()?;
        self.state
            .contacts
            .iter()
            .find(|c| c.mine.id == id)
            .map(|c| c.name.clone())
    }

    /// A sync message from another device of the account.
    pub(super) fn on_sync(&mut self, app: AppMessage) -> Result<()> {
        let now = self.now;
        match app {
            AppMessage::SyncSent {
                contact,
                id,
                body,
                sent_ms,
                expire_after_ms,
            } => {
                let Some(name) = self.contact_by_mailbox(&contact) else {
                    return Ok(());
                };
                let expires_ms = expire_after_ms.map(|d| sent_ms.min(now).saturating_add(d));
                self.state.history.push(HistoryEntry {
                    contact: name,
                    message_id: id,
                    text: body,
                    sent_ms,
                    received_ms: now,
                    expires_ms,
                    shown: true,
                    outgoing: true,
                    read_elsewhere: false,
                });
                let max = self.state.settings.history_max.max(1);
                if self.state.history.len() > max {
                    let excess = self.state.history.len() - max;
                    self.state.history.drain(..excess);
                }
            }
            AppMessage::SyncRead { contact, of } => {
                let Some(name) = self.contact_by_mailbox(&contact) else {
                    return Ok(());
                };
                for h in &mut self.state.history {
                    if h.contact == name && of.contains(&h.message_id) {
                        h.read_elsewhere = true;
                    }
                }
                // Those not here yet arrive as read.
                for id in of.iter().filter(|id| {
                    !self
                        .state
                        .history
                        .iter()
                        .any(|h| h.contact == name && h.message_id == **id)
                }) {
                    self.state.read_elsewhere.push_back(id.clone());
                }
                while self.state.read_elsewhere.len() > self.state.settings.seen_max.max(1) {
                    self.state.read_elsewhere.pop_front();
                }
                // Read elsewhere: no read receipt from here.
                for r in &mut self.state.receipts_due {
                    if r.contact == name && r.kind == "read" {
                        r.ids.retain(|i| !of.contains(i));
                    }
                }
                self.state.receipts_due.retain(|r| !r.ids.is_empty());
            }
            AppMessage::SyncContact { contact } => {
                if let Some(secret) = self.state.linked_to.as_ref().map(|l| l.login_secret) {
                    let name = contact.name.clone();
                    self.install_contact(*contact, &secret);
                    self.notice(
                        "contact_established",
                        Some(&name),
                        None,
                        format!("{name} was added on another device"),
                    );
                }
            }
            AppMessage::LinkDone { .. } => self.on_link_done(),
            AppMessage::SyncScheduled { contact, out } => {
                let mut out = out.0;
                let Some(name) = self.contact_by_mailbox(&contact) else {
                    return Ok(());
                };
                if self
                    .state
                    .outbox
                    .iter()
                    .any(|o| o.message_id == out.message_id)
                    || out.kind != OutKind::Text
                    || out.holds.len() > 10_000
                {
                    return Ok(());
                }
                let busy = self
                    .state
                    .outbox
                    .iter()
                    .filter(|o| super::active(o.state))
                    .count();
                if busy >= self.state.settings.outbox_max {
                    return Err(ClientError::Full("the outbox"));
                }
                let id = self.next_id();
                out.id = id;
                out.contact = name.clone();
                out.state = crate::state::OutState::Held;
                for f in &mut out.fragments {
                    f.envelope = Vec::new();
                    f.acked = true;
                }
                for h in &mut out.holds {
                    h.packet = Vec::new();
                    h.attempts = 0;
                    h.cancel_acked = false;
                }
                self.state.outbox.push(out);
                self.notice(
                    "scheduled",
                    Some(&name),
                    Some(id),
                    format!("message {id} to {name}, scheduled on another device, is held by a timer node"),
                );
            }
            AppMessage::SyncCancelled { id } => {
                let mut cancelled = Vec::new();
                for o in &mut self.state.outbox {
                    if hex::encode(o.message_id) == id
                        && !matches!(o.state, crate::state::OutState::Cancelled)
                    {
                        o.state = crate::state::OutState::Cancelled;
                        for f in &mut o.fragments {
                            f.envelope = Vec::new();
                        }
                        for h in &mut o.holds {
                            h.packet = Vec::new();
                        }
                        cancelled.push((o.id, o.contact.clone()));
                    }
                }
                for (id, name) in cancelled {
                    self.notice(
                        "cancelled",
                        Some(&name),
                        Some(id),
                        format!("scheduled message {id} to {name} was cancelled on another device"),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code() -> LinkCode {
        LinkCode {
            mailbox_id: [1; 32],
            secret: [2; 32],
            access: [3; 32],
            reply_key: [9; 32],
            identity: [4; 32],
            curve: [5; 32],
            expires_ms: 1_800_000_000_000,
            replicas: vec![[6; 32], [7; 32], [8; 32]],
        }
    }

    #[test]
    fn a_link_code_round_trips_and_catches_copy_errors() {
        let c = code();
        let text = c.encode();
        assert!(text.starts_with(CODE_PREFIX));
        assert!(
            text.chars()
                .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == ':')
        );
        assert_eq!(LinkCode::decode(&text.to_lowercase()).ok(), Some(c.clone()));
        // One character changed.
        let mut bad: Vec<char> = text.chars().collect();
        let i = bad.len() / 2;
        bad[i] = if bad[i] == 'A' { 'B' } else { 'A' };
        let bad: String = bad.into_iter().collect();
        assert!(matches!(LinkCode::decode(&bad), Err(ClientError::Link(_))));
        // Truncated, garbage, empty: errors, never a panic.
        for t in [
            &text[..text.len() - 5],
            "WHISPRL1:",
            "WHISPRL1:AAAA",
            "",
            "WHISPR1:AA",
        ] {
            assert!(LinkCode::decode(t).is_err(), "{t}");
        }
    }

    #[test]
    fn a_device_list_verifies_only_as_signed() {
        let id = SigningKey::from_bytes(&[9; 32]);
        let identity = id.verifying_key().to_bytes();
        let entry = |ed: [u8; 32], curve: u8| DeviceEntry {
            name: String::new(),
            ed,
            curve: [curve; 32],
            fallback: [curve + 1; 32],
            added_ms: 0,
        };
        let devices = vec![entry(identity, 10), entry([20; 32], 30)];
        let signature = id
            .sign(&devices_transcript(&identity, 2, &devices))
            .to_bytes();
        let list = DeviceList {
            version: 2,
            devices,
            signature,
        };
        assert!(verify_list(&identity, &[10; 32], &list).is_ok());
        // Names are not signed (contacts get none).
        let mut renamed = list.clone();
        renamed.devices[1].name = "phone".to_string();
        assert!(verify_list(&identity, &[10; 32], &renamed).is_ok());
        // A device slipped in, a replayed version bump, another primary: refused.
        let mut added = list.clone();
        added.devices.push(entry([40; 32], 50));
        assert!(verify_list(&identity, &[10; 32], &added).is_err());
        let mut bumped = list.clone();
        bumped.version = 3;
        assert!(verify_list(&identity, &[10; 32], &bumped).is_err());
        assert!(verify_list(&identity, &[11; 32], &list).is_err());
        // Seven devices: refused whatever the signature.
        let many: Vec<DeviceEntry> = std::iter::once(entry(identity, 10))
            .chain((0..6).map(|i| entry([100 + i; 32], 110 + 2 * i)))
            .collect();
        let signature = id.sign(&devices_transcript(&identity, 4, &many)).to_bytes();
        let too_many = DeviceList {
            version: 4,
            devices: many,
            signature,
        };
        assert!(verify_list(&identity, &[10; 32], &too_many).is_err());
    }

    #[test]
    fn an_expired_code_is_refused_before_anything_is_sent() {
        use rand::SeedableRng;
        let mut core = ClientCore::new(
            "http://127.0.0.1:1/v1/consensus",
            Settings::default(),
            rand::rngs::StdRng::seed_from_u64(1),
            rand::rngs::StdRng::seed_from_u64(2),
        );
        let c = code();
        let err = core
            .link_request(c.expires_ms + 1, &c.encode())
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("linking: the code has expired"));
        assert!(core.poll_output().is_none(), "something left");
        assert!(!core.link_pending() && !core.is_linked());
    }

    #[test]
    fn malformed_multi_messages_are_errors_not_panics() {
        let mut m = vec![FORMAT_MULTI, 1];
        m.extend_from_slice(&[0; 64]);
        m.push(0);
        m.extend_from_slice(&[0, 200]);
        for cut in 0..m.len() {
            assert!(parse_multi(&m[..cut]).is_err());
        }
        assert!(parse_multi(&[FORMAT_MULTI, 0]).is_err());
        assert!(parse_multi(&[FORMAT_MULTI, 255]).is_err());
    }
}
