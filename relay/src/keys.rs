//! Node keys on disk: the identity key (Ed25519: the node id, the libp2p peer id and the
//! descriptor signing key) and one Sphinx key per key epoch.
//!
//! Every key file is 32 random bytes as hex, created on first use with mode 0600 (written to a
//! temporary file, synced, then renamed, so that a crash never leaves a half-written key), and
//! refused when readable by group or others. Sphinx keys of epochs before the previous one are
//! deleted: once gone, packets built for them can no longer be opened (forward secrecy per
//! epoch).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use whispr_protocol::sphinx::{SphinxPublicKey, SphinxSecretKey};
use whispr_protocol::{KeyEpoch, NodeId, UnixTime};
use zeroize::Zeroizing;

/// A key file problem (the message names the file, never the key).
#[derive(Debug, thiserror::Error)]
#[error("key file {path}: {problem}")]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

fn key_error(path: &Path, problem: impl ToString) -> KeyFileError {
    KeyFileError {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// Reads the 32-byte secret in `path`, or creates the file (0600) with random bytes from
/// `rng` when it does not exist. Refuses a file readable by group or others.
pub fn load_or_create_secret<R: rand::CryptoRng + ?Sized>(
    path: &Path,
    rng: &mut R,
) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(key_error(path, "readable by group or others; chmod 600 it"));
            }
            let text =
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| key_error(path, e))?);
            let mut bytes = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(text.trim(), bytes.as_mut())
                .map_err(|_| key_error(path, "not 64 hex characters"))?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(bytes.as_mut());
            let dir = path
                .parent()
                .ok_or_else(|| key_error(path, "no parent directory"))?;
            std::fs::create_dir_all(dir).map_err(|e| key_error(path, e))?;
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| key_error(&tmp, e))?;
            let text = Zeroizing::new(hex::encode(bytes.as_ref()));
            file.write_all(text.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .map_err(|e| key_error(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| key_error(path, e))?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(bytes)
        }
        Err(e) => Err(key_error(path, e)),
    }
}

/// The node's identity.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?})", self.node_id())
    }
}

impl Identity {
    /// Loads `dir/identity.key`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Identity, KeyFileError> {
        let secret = load_or_create_secret(&dir.join("identity.key"), &mut rand::rng())?;
        Ok(Identity::from_secret(&secret))
    }

    /// From 32 secret bytes (tests).
    pub fn from_secret(secret: &[u8; 32]) -> Identity {
        Identity {
            signing: SigningKey::from_bytes(secret),
        }
    }

    /// The node id (the Ed25519 public key).
    pub fn node_id(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// The descriptor signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The same key as a libp2p keypair (so the peer id is derived from the node id).
    pub fn libp2p_keypair(&self) -> libp2p::identity::Keypair {
        let mut secret = Zeroizing::new(self.signing.to_bytes());
        // Infallible for 32 bytes; the fallback keeps library code panic-free.
        libp2p::identity::Keypair::ed25519_from_bytes(secret.as_mut())
            .unwrap_or_else(|_| libp2p::identity::Keypair::generate_ed25519())
    }
}

/// The node's Sphinx keys, one file per key epoch in a directory.
#[derive(Debug, Clone)]
pub struct EpochKeys {
    dir: PathBuf,
    epoch_len: Duration,
    ahead: u64,
}

impl EpochKeys {
    /// Keys in `dir` for epochs of `epoch_len`, held `ahead` epochs in advance (so that
    /// packets to be released later, e.g. held by a timer node, can be built now).
    pub fn new(dir: &Path, epoch_len: Duration, ahead: u64) -> EpochKeys {
        EpochKeys {
            dir: dir.to_path_buf(),
            epoch_len,
            ahead,
        }
    }

    fn path(&self, epoch: KeyEpoch) -> PathBuf {
        self.dir.join(format!("sphinx-{}.key", epoch.0))
    }

    /// Makes sure the keys of the previous (if present), current and next `ahead` epochs
    /// exist, deletes older ones, and returns the secret keys held, oldest first.
    pub fn rotate(&self, now: UnixTime) -> Result<Vec<(KeyEpoch, SphinxSecretKey)>, KeyFileError> {
        let ahead = self.ahead;
        let current = KeyEpoch::containing(now, self.epoch_len);
        let oldest = current.previous().unwrap_or(current);
        // Delete keys older than the previous epoch.
        let entries = std::fs::read_dir(&self.dir).map_err(|e| key_error(&self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(epoch) = name
                .to_str()
                .and_then(|n| n.strip_prefix("sphinx-"))
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if epoch < oldest.0 {
                std::fs::remove_file(entry.path()).map_err(|e| key_error(&entry.path(), e))?;
            }
        }
        let mut keys = Vec::new();
        let mut rng = rand::rng();
        if oldest != current && self.path(oldest).exists() {
            let secret = load_or_create_secret(&self.path(oldest), &mut rng)?;
            keys.push((oldest, SphinxSecretKey::from(*secret)));
        }
        for e in current.0..=current.0.saturating_add(ahead) {
            let epoch = KeyEpoch(e);
            let secret = load_or_create_secret(&self.path(epoch), &mut rng)?;
            keys.push((epoch, SphinxSecretKey::from(*secret)));
        }
        Ok(keys)
    }
}

/// The public halves, for the descriptor.
pub fn public_keys(keys: &[(KeyEpoch, SphinxSecretKey)]) -> Vec<(KeyEpoch, SphinxPublicKey)> {
    keys.iter()
        .map(|(e, k)| (*e, SphinxPublicKey::from(k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        let peer = a.libp2p_keypair().public().to_peer_id();
        assert_eq!(peer.to_bytes(), a.node_id().libp2p_peer_id_bytes());
        std::fs::set_permissions(
            dir.path().join("identity.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn epoch_keys_rotate_and_old_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let keys = EpochKeys::new(dir.path(), Duration::from_secs(10), 1);
        let first = keys.rotate(UnixTime(100_000)).unwrap();
        assert_eq!(
            first.iter().map(|(e, _)| e.0).collect::<Vec<_>>(),
            vec![10, 11]
        );
        let second = keys.rotate(UnixTime(110_000)).unwrap();
        assert_eq!(
            second.iter().map(|(e, _)| e.0).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        // Same epoch, same key.
        assert_eq!(
            SphinxPublicKey::from(&first[1].1),
            SphinxPublicKey::from(&second[1].1)
        );
        let third = keys.rotate(UnixTime(130_000)).unwrap();
        assert_eq!(
            third.iter().map(|(e, _)| e.0).collect::<Vec<_>>(),
            vec![12, 13, 14]
        );
        assert!(!dir.path().join("sphinx-10.key").exists());
        assert!(!dir.path().join("sphinx-11.key").exists());
    }
}
