//! Encryption at rest: the node master key, per-mailbox data keys and the AEAD used for
//! every stored value (XChaCha20-Poly1305 with random 24-byte nonces, so nonces never need
//! state that a crash could roll back).
//!
//! Key hierarchy (see `docs/mailbox.md`):
//! - the **master key** (32 bytes, key file mode 0600, created on first start) derives an
//!   *index key* and a *wrap key* with HMAC-SHA256;
//! - a mailbox's **storage id** is `HMAC(index key, mailbox id)[0..16]`: keys on disk never
//!   carry the mailbox id in clear;
//! - each mailbox has a random **data key**, stored only wrapped (AEAD) under the wrap key;
//!   every record of the mailbox is sealed under it. Deleting the wrapped key erases the
//!   mailbox even before its records are gone.

use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hmac::Mac;
use whispr_protocol::MailboxId;
use zeroize::Zeroizing;

use crate::error::{MailboxError, Result};

/// Bytes added to every sealed value: 24-byte nonce and 16-byte tag.
pub const SEAL_OVERHEAD: usize = 24 + 16;
/// Length of a storage id.
pub const SID_LEN: usize = 16;

/// A mailbox's storage id: the key prefix of all its records.
pub type StorageId = [u8; SID_LEN];

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // HMAC takes keys of any length: this cannot fail.
    if let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(key) {
        for p in parts {
            mac.update(p);
        }
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// The node master key.
pub struct MasterKey {
    index_key: Zeroizing<[u8; 32]>,
    wrap: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Derives the index and wrap keys from 32 secret bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> MasterKey {
        let index_key = Zeroizing::new(hmac(bytes, &[b"whispr-mailbox-index-v1"]));
        let wrap_key = Zeroizing::new(hmac(bytes, &[b"whispr-mailbox-wrap-v1"]));
        MasterKey {
            index_key,
            wrap: XChaCha20Poly1305::new((&*wrap_key).into()),
        }
    }

    /// Reads the key file at `path`, or creates it (mode 0600, 32 random bytes as hex) if it
    /// does not exist. Refuses a file readable by group or others.
    pub fn load_or_create<R: rand::CryptoRng + ?Sized>(
        path: &Path,
        rng: &mut R,
    ) -> Result<MasterKey> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::metadata(path) {
            Ok(meta) => {
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(MailboxError::KeyFile(format!(
                        "{} is readable by group or others; chmod 600 it",
                        path.display()
                    )));
                }
                let text = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| MailboxError::KeyFile(format!("{}: {e}", path.display())))?,
                );
                let mut bytes = Zeroizing::new([0u8; 32]);
                hex::decode_to_slice(text.trim(), bytes.as_mut()).map_err(|_| {
                    MailboxError::KeyFile(format!("{}: not 64 hex characters", path.display()))
                })?;
                Ok(MasterKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = Zeroizing::new([0u8; 32]);
                rng.fill_bytes(bytes.as_mut());
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| MailboxError::KeyFile(format!("{}: {e}", path.display())))?;
                let text = Zeroizing::new(hex::encode(bytes.as_ref()));
                file.write_all(text.as_bytes())
                    .and_then(|()| file.write_all(b"\n"))
                    .and_then(|()| file.sync_all())
                    .map_err(|e| MailboxError::KeyFile(format!("{}: {e}", path.display())))?;
                Ok(MasterKey::from_bytes(&bytes))
            }
            Err(e) => Err(MailboxError::KeyFile(format!("{}: {e}", path.display()))),
        }
    }

    /// The storage id of `mailbox`.
    pub fn storage_id(&self, mailbox: &MailboxId) -> StorageId {
        let full = hmac(self.index_key.as_ref(), &[mailbox.as_bytes()]);
        let mut sid = [0u8; SID_LEN];
        sid.copy_from_slice(full.get(..SID_LEN).unwrap_or(&[0u8; SID_LEN]));
        sid
    }

    /// Wraps a data key for storage under `sid`.
    pub(crate) fn wrap<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        sid: &StorageId,
        key: &DataKey,
    ) -> Vec<u8> {
        seal_with(
            &self.wrap,
            rng,
            &[b"wrap", sid.as_slice()],
            key.bytes.as_ref(),
        )
    }

    /// Unwraps a stored data key.
    pub(crate) fn unwrap_key(&self, sid: &StorageId, wrapped: &[u8]) -> Result<DataKey> {
        let bytes = Zeroizing::new(open_with(&self.wrap, &[b"wrap", sid.as_slice()], wrapped)?);
        let array = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| MailboxError::Corrupt("wrapped data key length"))?;
        Ok(DataKey::from_bytes(array))
    }
}

/// A mailbox's data key.
#[derive(Clone)]
pub struct DataKey {
    bytes: Zeroizing<[u8; 32]>,
    aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A fresh random data key.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> DataKey {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        DataKey::from_bytes(bytes)
    }

    fn from_bytes(bytes: [u8; 32]) -> DataKey {
        let bytes = Zeroizing::new(bytes);
        let aead = XChaCha20Poly1305::new((&*bytes).into());
        DataKey { bytes, aead }
    }

    /// Seals `plaintext`, bound to the associated data parts (the record's key).
    pub fn seal<R: rand::CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        ad: &[&[u8]],
        plaintext: &[u8],
    ) -> Vec<u8> {
        seal_with(&self.aead, rng, ad, plaintext)
    }

    /// Opens a sealed value; fails if it was moved to another key or tampered with.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>> {
        open_with(&self.aead, ad, sealed)
    }

    /// A keyed hash of `parts` under this data key, for record keys that must be found
    /// again without naming what they are about in clear (e.g. a device key).
    pub(crate) fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(b"whispr-mailbox-tag-v1");
        all.extend_from_slice(parts);
        hmac(self.bytes.as_ref(), &all)
    }
}

fn seal_with<R: rand::CryptoRng + ?Sized>(
    aead: &XChaCha20Poly1305,
    rng: &mut R,
    ad: &[&[u8]],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    let ad = ad.concat();
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    // Encryption with a valid key and a buffer-backed payload does not fail; an empty
    // result would be refused by `open`.
    if let Ok(ct) = aead.encrypt(
        &XNonce::from(nonce),
        Payload {
            msg: plaintext,
            aad: &ad,
        },
    ) {
        out.extend_from_slice(&ct);
    }
    out
}

fn open_with(aead: &XChaCha20Poly1305, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(MailboxError::Corrupt("sealed value too short"));
    }
    let (nonce, ct) = sealed.split_at(24);
    let ad = ad.concat();
    let nonce = <&XNonce>::try_from(nonce).map_err(|_| MailboxError::Corrupt("nonce length"))?;
    aead.decrypt(nonce, Payload { msg: ct, aad: &ad })
        .map_err(|_| MailboxError::Corrupt("sealed value does not authenticate"))
}
