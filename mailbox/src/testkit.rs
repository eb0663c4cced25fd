//! Deterministic owner identities and envelopes for tests, benchmarks and the
//! `stress-deposit` load tool. Not for production keys: everything derives from a seed.

use ed25519_dalek::SigningKey;
use ed25519_dalek::ed25519::signature::Signer;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};
use whispr_protocol::envelope::{Envelope, EnvelopeContent, MailboxSecretKey, OuterFields};
use whispr_protocol::fragment::FragmentInfo;
use whispr_protocol::sphinx::Surb;
use whispr_protocol::{AccessToken, DedupId, MailboxId, MessageId, ReplyKey, UnixTime};

use crate::auth::login_transcript;
use crate::core::{CreateMailbox, create_transcript, device_transcript};

/// Everything an owner holds for one mailbox, derived from a seed.
pub struct Owner {
    /// Mailbox id.
    pub mailbox_id: MailboxId,
    /// HPKE secret key of the mailbox.
    pub mailbox_secret: MailboxSecretKey,
    /// Owner (first device) signing key.
    pub owner: SigningKey,
    /// Access key handed to contacts.
    pub access_token: AccessToken,
    /// Reply key.
    pub reply_key: ReplyKey,
    /// A sender identity used to seal test envelopes.
    pub sender: SigningKey,
}

fn derive(seed: u64, label: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"whispr-mailbox-testkit");
    h.update(seed.to_be_bytes());
    h.update(label.as_bytes());
    h.finalize().into()
}

impl Owner {
    /// The owner for `seed`.
    pub fn from_seed(seed: u64) -> Owner {
        let mut rng = StdRng::from_seed(derive(seed, "mailbox-key"));
        Owner {
            mailbox_id: MailboxId(derive(seed, "mailbox-id")),
            mailbox_secret: MailboxSecretKey::generate(&mut rng),
            owner: SigningKey::from_bytes(&derive(seed, "owner")),
            access_token: AccessToken(derive(seed, "access")),
            reply_key: ReplyKey(derive(seed, "reply")),
            sender: SigningKey::from_bytes(&derive(seed, "sender")),
        }
    }

    /// A device key of this owner (index 0 is the owner key itself).
    pub fn device(&self, index: u32) -> SigningKey {
        if index == 0 {
            return self.owner.clone();
        }
        let mut h = Sha256::new();
        h.update(self.owner.to_bytes());
        h.update(index.to_be_bytes());
        SigningKey::from_bytes(&h.finalize().into())
    }

    /// SHA-256 of the access key.
    pub fn access_key_hash(&self) -> [u8; 32] {
        Sha256::digest(self.access_token.as_bytes()).into()
    }

    /// A signed creation request.
    pub fn create_request(&self, retention_ms: u64) -> CreateMailbox {
        let mailbox_key = self.mailbox_secret.public_key().to_bytes();
        let owner_key = self.owner.verifying_key().to_bytes();
        let hash = self.access_key_hash();
        let transcript = create_transcript(
            &self.mailbox_id,
            &mailbox_key,
            &owner_key,
            &hash,
            Some(&self.reply_key.0),
            retention_ms,
        );
        CreateMailbox {
            mailbox_id: self.mailbox_id,
            mailbox_key,
            owner_key,
            access_key_hash: hash,
            reply_key: Some(self.reply_key.0),
            retention_ms,
            signature: self.owner.sign(&transcript).to_bytes(),
        }
    }

    /// A signed creation request of a mailbox replicated on `replicas` (v2 transcript).
    pub fn create_request_replicated(
        &self,
        retention_ms: u64,
        replicas: &[whispr_protocol::NodeId],
    ) -> CreateMailbox {
        let mut req = self.create_request(retention_ms);
        let transcript = whispr_protocol::mailbox_api::create_transcript_v2(
            &req.mailbox_id,
            &req.mailbox_key,
            &req.owner_key,
            &req.access_key_hash,
            req.reply_key.as_ref(),
            retention_ms,
            replicas,
        )
        .unwrap_or_default();
        req.signature = self.owner.sign(&transcript).to_bytes();
        req
    }

    /// The owner's signature registering `device`.
    pub fn sign_device(&self, device: &SigningKey) -> [u8; 64] {
        self.owner
            .sign(&device_transcript(
                &self.mailbox_id,
                &device.verifying_key().to_bytes(),
            ))
            .to_bytes()
    }

    /// `device`'s login signature over `challenge` for a node named `audience`.
    pub fn sign_login(
        &self,
        device: &SigningKey,
        audience: &str,
        challenge: &[u8; 32],
    ) -> [u8; 64] {
        device
            .sign(&login_transcript(
                audience,
                &self.mailbox_id,
                &device.verifying_key().to_bytes(),
                challenge,
            ))
            .to_bytes()
    }

    /// An envelope for this mailbox carrying `body` (at most one fragment's worth).
    pub fn envelope<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        dedup_id: DedupId,
        expires_at: Option<UnixTime>,
        ack_surb: Option<Surb>,
        body: &[u8],
    ) -> whispr_protocol::Result<Envelope> {
        let outer = OuterFields {
            mailbox_id: self.mailbox_id,
            access_token: self.access_token,
            dedup_id,
            expires_at,
            ack_surb,
        };
        let content = EnvelopeContent {
            message_id: MessageId::random(rng),
            fragment: FragmentInfo {
                index: 0,
                count: 1,
                total_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
                message_digest: Sha256::digest(body).into(),
            },
            content: body.to_vec(),
        };
        Envelope::seal(
            rng,
            &self.mailbox_secret.public_key(),
            &self.sender,
            outer,
            &content,
        )
    }
}

/// The JSON body of `POST /v1/mailboxes` for a replicated `req` (`replicas` as hex).
pub fn create_body_replicated(
    req: &CreateMailbox,
    replicas: &[whispr_protocol::NodeId],
) -> serde_json::Value {
    let mut body = create_body(req);
    if let Some(map) = body.as_object_mut() {
        let hex: Vec<String> = replicas.iter().map(|r| hex::encode(r.0)).collect();
        map.insert("replicas".into(), serde_json::json!(hex));
    }
    body
}

/// The JSON body of `POST /v1/mailboxes` for `req`.
pub fn create_body(req: &CreateMailbox) -> serde_json::Value {
    serde_json::json!({
        "mailbox_id": hex::encode(req.mailbox_id.as_bytes()),
        "mailbox_key": hex::encode(req.mailbox_key),
        "owner_key": hex::encode(req.owner_key),
        "access_key_hash": hex::encode(req.access_key_hash),
        "reply_key": req.reply_key.map(hex::encode),
        "retention_ms": req.retention_ms,
        "signature": hex::encode(req.signature),
    })
}
