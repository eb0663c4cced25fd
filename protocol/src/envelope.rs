//! Sealed-sender envelopes: HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, ChaCha20-Poly1305) to the recipient mailbox's key.
//!
//! In clear, only what the mailbox node needs: mailbox id, access token, dedup id, requested
//! expiry and an optional ack SURB. Inside: the sender certificate (identity key and its
//! Ed25519 signature over the envelope), the message id, fragment info and the content. The
//! clear fields but the access token and SURB are the HPKE associated data, so a node that
//! changes them makes the envelope fail to open; the signature binds the sender to this
//! mailbox, so a recipient cannot re-seal a message to someone else in the sender's name.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};

use crate::fragment::FragmentInfo;
use crate::sphinx::{PLAINTEXT_LEN_MAX, Surb};
use crate::wire;
use crate::{AccessToken, DedupId, Error, MailboxId, MessageId, Result, UnixTime};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

const HPKE_INFO: &[u8] = b"whispr-envelope-v1";
const AAD_PREFIX: &[u8] = b"whispr-envelope-aad-v1";
const SIGNATURE_PREFIX: &[u8] = b"whispr-sender-v1";
/// Size of the HPKE encapsulated key.
pub const HPKE_ENC_SIZE: usize = 32;
/// Largest ciphertext an envelope may carry (it must fit in one Sphinx payload).
pub const CIPHERTEXT_LEN_MAX: usize = PLAINTEXT_LEN_MAX;

/// A mailbox's public key: deposits are sealed to it.
#[derive(Clone, PartialEq, Eq)]
pub struct MailboxPublicKey(<Kem as hpke::Kem>::PublicKey);

impl MailboxPublicKey {
    /// Reads 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<MailboxPublicKey> {
        if bytes.len() != 32 {
            return Err(Error::BadLength {
                what: "mailbox public key",
                len: bytes.len(),
                expected: 32,
            });
        }
        <Kem as hpke::Kem>::PublicKey::from_bytes(bytes)
            .map(MailboxPublicKey)
            .map_err(|_| Error::Malformed {
                what: "mailbox public key",
                reason: "not an X25519 public key",
            })
    }

    /// The 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.0.to_bytes());
        out
    }
}

impl std::fmt::Debug for MailboxPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MailboxPublicKey(..)")
    }
}

/// A mailbox's secret key: only its owner's clients hold it. Keeps its public key, which
/// every [`Envelope::open`] needs for the signature transcript.
#[derive(Clone)]
pub struct MailboxSecretKey(<Kem as hpke::Kem>::PrivateKey, MailboxPublicKey);

impl MailboxSecretKey {
    /// A fresh key pair from `rng`.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> MailboxSecretKey {
        let mut ikm = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill_bytes(ikm.as_mut());
        let (secret, public) = Kem::derive_keypair(ikm.as_ref());
        MailboxSecretKey(secret, MailboxPublicKey(public))
    }

    /// The matching public key.
    pub fn public_key(&self) -> MailboxPublicKey {
        self.1.clone()
    }

    /// Reads 32 secret bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<MailboxSecretKey> {
        <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map(|secret| {
                let public = MailboxPublicKey(Kem::sk_to_pk(&secret));
                MailboxSecretKey(secret, public)
            })
            .map_err(|_| Error::Malformed {
                what: "mailbox secret key",
                reason: "not 32 bytes",
            })
    }

    /// The 32 secret bytes.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        let mut out = zeroize::Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&self.0.to_bytes());
        out
    }
}

impl std::fmt::Debug for MailboxSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MailboxSecretKey(..)")
    }
}

/// The fields a mailbox node reads in clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OuterFields {
    /// The recipient mailbox.
    pub mailbox_id: MailboxId,
    /// The mailbox's access key.
    pub access_token: AccessToken,
    /// The mailbox deduplicates by this id.
    pub dedup_id: DedupId,
    /// Requested expiry; `None` lets the mailbox's retention apply.
    pub expires_at: Option<UnixTime>,
    /// Reply block for the deposit acknowledgement.
    pub ack_surb: Option<Surb>,
}

/// What the sender seals.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvelopeContent {
    /// End-to-end message id (the same in every fragment of a message).
    pub message_id: MessageId,
    /// Where this fragment sits in the message.
    pub fragment: FragmentInfo,
    /// The fragment's bytes.
    pub content: Vec<u8>,
}

/// An opened envelope: the content and who sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The sender's identity key, verified against the envelope's signature.
    pub sender: VerifyingKey,
    /// The sealed content.
    pub content: EnvelopeContent,
}

/// A sealed-sender envelope, its clear fields validated.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The clear fields.
    pub outer: OuterFields,
    hpke_enc: [u8; HPKE_ENC_SIZE],
    ciphertext: Vec<u8>,
}

impl std::fmt::Debug for EnvelopeContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeContent")
            .field("message_id", &self.message_id)
            .field("fragment", &(self.fragment.index, self.fragment.count))
            .field("content_len", &self.content.len())
            .finish()
    }
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("outer", &self.outer)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// The length every sealed content of at most one fragment is padded to: the widest encoding
/// of a full fragment (every field at its largest) plus two bytes, so that the smallest
/// padding field always fits.
fn padded_len() -> usize {
    static LEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LEN.get_or_init(|| {
        let widest = wire::EnvelopeContent {
            version: u32::MAX,
            sender: Some(wire::SenderCertificate {
                identity_key: vec![0xFF; 32],
                signature: vec![0xFF; 64],
            }),
            message_id: vec![0xFF; 16],
            fragment: Some(wire::FragmentInfo {
                index: u32::MAX,
                count: u32::MAX,
                total_len: u32::MAX,
                message_digest: vec![0xFF; 32],
            }),
            content: vec![0xFF; crate::fragment::FRAGMENT_DATA_LEN],
            padding: Vec::new(),
        };
        wire::encode(&widest).len() + 2
    })
}

/// Appends `EnvelopeContent.padding` fields (field 6, bytes, zeros) to an encoded content so
/// that it is [`padded_len`] long (security review finding 7: lengths must not tell a receipt
/// from a text or cover). Appending fields to an encoded protobuf message is a valid encoding
/// of the message with those fields; decoders that predate the field skip it. Contents longer
/// than a fragment are left as they are.
fn pad_content(plaintext: &mut Vec<u8>) {
    let mut missing = padded_len().saturating_sub(plaintext.len());
    while missing >= 2 {
        // One field is tag (1) ‖ varint(n) ‖ n zeros; find n for the whole gap, else put an
        // empty field (2 bytes) and try again (a gap of exactly 130 has no single field).
        let fit = (1..=5usize).find_map(|width| {
            let n = missing.checked_sub(1 + width)?;
            (varint_len(n) == width).then_some(n)
        });
        let n = fit.unwrap_or(0);
        plaintext.push(0x32); // field 6, length-delimited
        let mut v = n;
        while v >= 0x80 {
            plaintext.push(u8::try_from(v & 0x7F).unwrap_or(0) | 0x80);
            v >>= 7;
        }
        plaintext.push(u8::try_from(v).unwrap_or(0));
        plaintext.resize(plaintext.len() + n, 0);
        missing -= 1 + varint_len(n) + n;
    }
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn aad(outer: &OuterFields) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + 4 + 32 + 16 + 8);
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(&wire::VERSION.to_be_bytes());
    aad.extend_from_slice(outer.mailbox_id.as_bytes());
    aad.extend_from_slice(outer.dedup_id.as_bytes());
    aad.extend_from_slice(
        &outer
            .expires_at
            .map_or(0, UnixTime::as_millis)
            .to_be_bytes(),
    );
    aad
}

/// The bytes the sender signs: domain, recipient mailbox and key, dedup id, expiry, message
/// id, fragment info and a digest of the content.
fn signed_transcript(
    outer: &OuterFields,
    recipient: &MailboxPublicKey,
    content: &EnvelopeContent,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(SIGNATURE_PREFIX);
    t.extend_from_slice(outer.mailbox_id.as_bytes());
    t.extend_from_slice(&recipient.to_bytes());
    t.extend_from_slice(outer.dedup_id.as_bytes());
    t.extend_from_slice(
        &outer
            .expires_at
            .map_or(0, UnixTime::as_millis)
            .to_be_bytes(),
    );
    t.extend_from_slice(content.message_id.as_bytes());
    t.extend_from_slice(&content.fragment.index.to_be_bytes());
    t.extend_from_slice(&content.fragment.count.to_be_bytes());
    t.extend_from_slice(&content.fragment.total_len.to_be_bytes());
    t.extend_from_slice(&content.fragment.message_digest);
    t.extend_from_slice(&Sha256::digest(&content.content));
    t
}

impl Envelope {
    /// Seals `content` from `sender` to the mailbox whose public key is `recipient`.
    pub fn seal<R: rand::CryptoRng + ?Sized>(
        rng: &mut R,
        recipient: &MailboxPublicKey,
        sender: &SigningKey,
        outer: OuterFields,
        content: &EnvelopeContent,
    ) -> Result<Envelope> {
        if outer.mailbox_id.0 == [0u8; 32] {
            return Err(Error::InvalidArgument(
                "the all-zero mailbox id is reserved (node service address)",
            ));
        }
        let signature = sender.sign(&signed_transcript(&outer, recipient, content));
        let inner = wire::EnvelopeContent {
            version: wire::VERSION,
            sender: Some(wire::SenderCertificate {
                identity_key: sender.verifying_key().to_bytes().to_vec(),
                signature: signature.to_bytes().to_vec(),
            }),
            message_id: content.message_id.as_bytes().to_vec(),
            fragment: Some(content.fragment.to_wire()),
            content: content.content.clone(),
            padding: Vec::new(),
        };
        let mut plaintext = zeroize::Zeroizing::new(wire::encode(&inner));
        pad_content(&mut plaintext);
        let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(
            &OpModeS::Base,
            &recipient.0,
            HPKE_INFO,
            &plaintext,
            &aad(&outer),
            &mut &mut *rng,
        )
        .map_err(|_| Error::Crypto("hpke seal"))?;
        if ciphertext.len() > CIPHERTEXT_LEN_MAX {
            return Err(Error::TooLarge {
                what: "envelope content",
                len: ciphertext.len(),
                max: CIPHERTEXT_LEN_MAX,
            });
        }
        let mut hpke_enc = [0u8; HPKE_ENC_SIZE];
        hpke_enc.copy_from_slice(&enc.to_bytes());
        Ok(Envelope {
            outer,
            hpke_enc,
            ciphertext,
        })
    }

    /// Opens the envelope with the mailbox's secret key and verifies the sender's signature.
    /// Fails with [`Error::Decrypt`] for a wrong key or any tampering with the sealed part or
    /// the authenticated clear fields, and [`Error::BadSignature`] for a forged sender.
    pub fn open(&self, recipient: &MailboxSecretKey) -> Result<Opened> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&self.hpke_enc)
            .map_err(|_| Error::Decrypt("envelope"))?;
        let plaintext = zeroize::Zeroizing::new(
            hpke::single_shot_open::<Aead, Kdf, Kem>(
                &OpModeR::Base,
                &recipient.0,
                &enc,
                HPKE_INFO,
                &self.ciphertext,
                &aad(&self.outer),
            )
            .map_err(|_| Error::Decrypt("envelope"))?,
        );
        let inner: wire::EnvelopeContent = wire::decode(&plaintext, CIPHERTEXT_LEN_MAX)?;
        let cert = inner.sender.ok_or(Error::Malformed {
            what: "envelope content",
            reason: "missing sender certificate",
        })?;
        let identity =
            <[u8; 32]>::try_from(cert.identity_key.as_slice()).map_err(|_| Error::BadLength {
                what: "sender identity key",
                len: cert.identity_key.len(),
                expected: 32,
            })?;
        let sender = VerifyingKey::from_bytes(&identity).map_err(|_| Error::Malformed {
            what: "sender identity key",
            reason: "not an Ed25519 point",
        })?;
        let signature = ed25519_dalek::Signature::from_slice(&cert.signature).map_err(|_| {
            Error::BadLength {
                what: "sender signature",
                len: cert.signature.len(),
                expected: 64,
            }
        })?;
        let content = EnvelopeContent {
            message_id: MessageId::from_slice("message id", &inner.message_id)?,
            fragment: FragmentInfo::from_wire(inner.fragment.as_ref())?,
            content: inner.content,
        };
        sender
            .verify_strict(
                &signed_transcript(&self.outer, &recipient.1, &content),
                &signature,
            )
            .map_err(|_| Error::BadSignature("sender certificate"))?;
        Ok(Opened { sender, content })
    }

    /// The wire form.
    pub fn to_wire(&self) -> wire::SealedEnvelope {
        wire::SealedEnvelope {
            version: wire::VERSION,
            mailbox_id: self.outer.mailbox_id.as_bytes().to_vec(),
            access_token: self.outer.access_token.as_bytes().to_vec(),
            dedup_id: self.outer.dedup_id.as_bytes().to_vec(),
            expires_at_ms: self.outer.expires_at.map_or(0, UnixTime::as_millis),
            ack_surb: self
                .outer
                .ack_surb
                .as_ref()
                .map(|s| s.as_bytes().to_vec())
                .unwrap_or_default(),
            hpke_enc: self.hpke_enc.to_vec(),
            ciphertext: self.ciphertext.clone(),
        }
    }

    /// Validates a wire envelope (lengths, version, SURB); does not open it.
    pub fn from_wire(w: wire::SealedEnvelope) -> Result<Envelope> {
        if w.version != wire::VERSION {
            return Err(Error::UnknownVersion {
                what: "sealed envelope",
                version: w.version,
            });
        }
        let hpke_enc = <[u8; HPKE_ENC_SIZE]>::try_from(w.hpke_enc.as_slice()).map_err(|_| {
            Error::BadLength {
                what: "hpke encapsulated key",
                len: w.hpke_enc.len(),
                expected: HPKE_ENC_SIZE,
            }
        })?;
        if w.ciphertext.len() > CIPHERTEXT_LEN_MAX {
            return Err(Error::TooLarge {
                what: "envelope ciphertext",
                len: w.ciphertext.len(),
                max: CIPHERTEXT_LEN_MAX,
            });
        }
        if w.ciphertext.len() < 16 {
            return Err(Error::Malformed {
                what: "envelope ciphertext",
                reason: "shorter than the AEAD tag",
            });
        }
        let mailbox_id = MailboxId::from_slice("mailbox id", &w.mailbox_id)?;
        if mailbox_id.0 == [0u8; 32] {
            return Err(Error::Malformed {
                what: "sealed envelope",
                reason: "the all-zero mailbox id is reserved",
            });
        }
        Ok(Envelope {
            outer: OuterFields {
                mailbox_id,
                access_token: AccessToken::from_slice("access token", &w.access_token)?,
                dedup_id: DedupId::from_slice("dedup id", &w.dedup_id)?,
                expires_at: (w.expires_at_ms != 0).then_some(UnixTime(w.expires_at_ms)),
                ack_surb: if w.ack_surb.is_empty() {
                    None
                } else {
                    Some(Surb::from_bytes(&w.ack_surb)?)
                },
            },
            hpke_enc,
            ciphertext: w.ciphertext,
        })
    }

    /// Encodes it as a `SealedEnvelope` protobuf.
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(&self.to_wire())
    }

    /// Decodes and validates a `SealedEnvelope` protobuf.
    pub fn decode(bytes: &[u8]) -> Result<Envelope> {
        Envelope::from_wire(wire::decode(bytes, PLAINTEXT_LEN_MAX)?)
    }

    /// An envelope whose sealed part is `ciphertext_len` zero bytes instead of an HPKE
    /// ciphertext: nobody can open it. For the simulator's `fast` mode only, where nodes
    /// treat the sealed part as opaque bytes and the simulated recipient identifies the
    /// message by its dedup id. Fails like [`Envelope::seal`] on the reserved mailbox id and
    /// on a length above the maximum.
    #[doc(hidden)]
    pub fn filler(outer: OuterFields, ciphertext_len: usize) -> Result<Envelope> {
        if outer.mailbox_id.0 == [0u8; 32] {
            return Err(Error::InvalidArgument(
                "the all-zero mailbox id is reserved (node service address)",
            ));
        }
        if ciphertext_len > CIPHERTEXT_LEN_MAX {
            return Err(Error::TooLarge {
                what: "envelope content",
                len: ciphertext_len,
                max: CIPHERTEXT_LEN_MAX,
            });
        }
        Ok(Envelope {
            outer,
            hpke_enc: [0u8; HPKE_ENC_SIZE],
            ciphertext: vec![0u8; ciphertext_len],
        })
    }

    /// Length of the sealed part.
    pub fn ciphertext_len(&self) -> usize {
        self.ciphertext.len()
    }
}
