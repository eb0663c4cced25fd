//! The client's home directory: one state file encrypted at rest under a key derived from the
//! user's passphrase (Argon2id), and a lock file so that two `whispr` processes never write the
//! state at once.
//!
//! `state.enc` is JSON: the KDF parameters and salt in clear, then the state sealed with
//! XChaCha20-Poly1305 (random 24-byte nonce per write, the header bound as associated data).
//! Writes go to a temporary file that is synced and renamed over the old one, so a crash leaves
//! either the old or the new state, never a torn one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};

const STATE_FILE: &str = "state.enc";
const LOCK_FILE: &str = "lock";
const FORMAT: &str = "whispr-client-state";
const AAD_PREFIX: &[u8] = b"whispr-client-state-v1";
const EXPORT_FORMAT: &str = "whispr-export-file";
const EXPORT_AAD_PREFIX: &[u8] = b"whispr-export-v1";

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for KdfParams {
    /// OWASP's first Argon2id recommendation (19 MiB, 2 passes, 1 lane).
    fn default() -> Self {
        KdfParams {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    kdf: String,
    params: KdfParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    header: Header,
    nonce: String,
    ciphertext: String,
}

/// An opened home directory: its path and the derived key.
#[derive(Clone)]
pub struct Vault {
    dir: PathBuf,
    params: KdfParams,
    salt: [u8; 16],
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// Holds the home directory's lock; released when dropped.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

fn derive(passphrase: &[u8], salt: &[u8; 16], params: KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|e| ClientError::CorruptState(format!("argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|e| ClientError::CorruptState(format!("argon2: {e}")))?;
    Ok(key)
}

fn aad(header: &Header) -> Vec<u8> {
    aad_for(AAD_PREFIX, header)
}

/// The associated data of a sealed file: `prefix` (which says what the file is, so that an
/// export never opens as a state, nor a state as an export) and the clear header.
fn aad_for(prefix: &[u8], header: &Header) -> Vec<u8> {
    let mut a = prefix.to_vec();
    a.extend_from_slice(&header.version.to_be_bytes());
    a.extend_from_slice(&header.params.m_kib.to_be_bytes());
    a.extend_from_slice(&header.params.t.to_be_bytes());
    a.extend_from_slice(&header.params.p.to_be_bytes());
    a.extend_from_slice(header.salt.as_bytes());
    a
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ClientError::io("syncing the home directory"))
}

impl Vault {
    /// The path of the state file in `dir`.
    pub fn state_path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// True when `dir` holds a client.
    pub fn exists(dir: &Path) -> bool {
        Self::state_path(dir).exists()
    }

    /// Prepares a new home directory (mode 0700); fails if one exists. Nothing is written
    /// until the first [`Vault::save`].
    pub fn create(dir: &Path, passphrase: &[u8], params: KdfParams) -> Result<Vault> {
        if Self::exists(dir) {
            return Err(ClientError::AlreadyInitialized(dir.display().to_string()));
        }
        std::fs::create_dir_all(dir).map_err(ClientError::io("creating the home directory"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(ClientError::io("restricting the home directory"))?;
        }
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let key = derive(passphrase, &salt, params)?;
        Ok(Vault {
            dir: dir.to_path_buf(),
            params,
            salt,
            key,
        })
    }

    /// Opens the home directory in `dir` with `passphrase`: derives the key and checks it by
    /// decrypting the state, which it returns.
    pub fn open(dir: &Path, passphrase: &[u8]) -> Result<(Vault, Zeroizing<Vec<u8>>)> {
        let text = match std::fs::read(Self::state_path(dir)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::NotInitialized(dir.display().to_string()));
            }
            Err(e) => return Err(ClientError::io("reading the state file")(e)),
        };
        let file: StateFile = serde_json::from_slice(&text)
            .map_err(|e| ClientError::CorruptState(format!("not a state file: {e}")))?;
        if file.header.format != FORMAT || file.header.version != 1 || file.header.kdf != "argon2id"
        {
            return Err(ClientError::CorruptState(
                "unknown format or version".to_string(),
            ));
        }
        let mut salt = [0u8; 16];
        hex::decode_to_slice(&file.header.salt, &mut salt)
            .map_err(|_| ClientError::CorruptState("salt".to_string()))?;
        let key = derive(passphrase, &salt, file.header.params)?;
        let vault = Vault {
            dir: dir.to_path_buf(),
            params: file.header.params,
            salt,
            key,
        };
        let plaintext = vault.decrypt(&file)?;
        Ok((vault, plaintext))
    }

    /// Reads and decrypts the current state (the caller holds the lock).
    pub fn load(&self, _lock: &LockGuard) -> Result<Zeroizing<Vec<u8>>> {
        let text = std::fs::read(Self::state_path(&self.dir))
            .map_err(ClientError::io("reading the state file"))?;
        let file: StateFile = serde_json::from_slice(&text)
            .map_err(|e| ClientError::CorruptState(format!("not a state file: {e}")))?;
        self.decrypt(&file)
    }

    fn decrypt(&self, file: &StateFile) -> Result<Zeroizing<Vec<u8>>> {
        let nonce = hex::decode(&file.nonce)
            .ok()
            .and_then(|n| <[u8; 24]>::try_from(n).ok())
            .ok_or_else(|| ClientError::CorruptState("nonce".to_string()))?;
        let ciphertext = base64::engine::general_purpose::STANDARD
            .decode(&file.ciphertext)
            .map_err(|_| ClientError::CorruptState("ciphertext encoding".to_string()))?;
        let aead = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*self.key));
        aead.decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &ciphertext,
                aad: &aad(&file.header),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| ClientError::WrongPassphrase)
    }

    /// Takes the home directory's lock, waiting for another process to release it.
    pub fn lock(&self) -> Result<LockGuard> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE))
            .map_err(ClientError::io("opening the lock file"))?;
        file.lock()
            .map_err(ClientError::io("locking the home directory"))?;
        Ok(LockGuard { _file: file })
    }

    /// Encrypts `plaintext` and replaces the state file atomically (the caller holds the lock).
    pub fn save(&self, _lock: &LockGuard, plaintext: &[u8]) -> Result<()> {
        let header = Header {
            format: FORMAT.to_string(),
            version: 1,
            kdf: "argon2id".to_string(),
            params: self.params,
            salt: hex::encode(self.salt),
        };
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let aead = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*self.key));
        let ciphertext = aead
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad(&header),
                },
            )
            .map_err(|_| ClientError::CorruptState("encryption failed".to_string()))?;
        let file = StateFile {
            header,
            nonce: hex::encode(nonce),
            ciphertext: base64::engine::general_purpose::STANDARD.encode(ciphertext),
        };
        let bytes = serde_json::to_vec(&file)
            .map_err(|e| ClientError::CorruptState(format!("encoding: {e}")))?;
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut options = OpenOptions::new();
        options.create(true).truncate(true).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options
            .open(&tmp)
            .map_err(ClientError::io("writing the state file"))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(ClientError::io("writing the state file"))?;
        drop(f);
        std::fs::rename(&tmp, Self::state_path(&self.dir))
            .map_err(ClientError::io("replacing the state file"))?;
        sync_dir(&self.dir)
    }

    /// The home directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes the state file (after `whispr erase`): the home then has no client. The file
    /// was only ever written encrypted; the lock file stays (the caller holds it).
    pub fn wipe(&self, _lock: &LockGuard) -> Result<()> {
        for name in [format!("{STATE_FILE}.tmp"), STATE_FILE.to_string()] {
            match std::fs::remove_file(self.dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ClientError::io("deleting the state file")(e)),
            }
        }
        sync_dir(&self.dir)
    }
}

/// Encrypts an export (`whispr export`) under `passphrase`: the same construction as the
/// state file (Argon2id with `params` and a fresh random salt, XChaCha20-Poly1305 with a
/// random nonce, the clear header bound as associated data) with its own format name and
/// associated-data prefix, so that neither file opens as the other. The file's bytes (JSON).
pub fn seal_export(passphrase: &[u8], params: KdfParams, plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let key = derive(passphrase, &salt, params)?;
    let header = Header {
        format: EXPORT_FORMAT.to_string(),
        version: 1,
        kdf: "argon2id".to_string(),
        params,
        salt: hex::encode(salt),
    };
    let mut nonce = [0u8; 24];
    rand::rng().fill_bytes(&mut nonce);
    let aead = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*key));
    let ciphertext = aead
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad_for(EXPORT_AAD_PREFIX, &header),
            },
        )
        .map_err(|_| ClientError::CorruptState("encryption failed".to_string()))?;
    serde_json::to_vec(&StateFile {
        header,
        nonce: hex::encode(nonce),
        ciphertext: base64::engine::general_purpose::STANDARD.encode(ciphertext),
    })
    .map_err(|e| ClientError::CorruptState(format!("encoding: {e}")))
}

/// Decrypts an export made by [`seal_export`] with `passphrase`: the JSON document inside.
/// A wrong passphrase or an altered file fails (`InvalidArgument`, saying so); so does a file
/// that is not an export (a state file included).
pub fn open_export(passphrase: &[u8], bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let not_export = || ClientError::InvalidArgument("not a whispr export file".to_string());
    let file: StateFile = serde_json::from_slice(bytes).map_err(|_| not_export())?;
    if file.header.format != EXPORT_FORMAT
        || file.header.version != 1
        || file.header.kdf != "argon2id"
    {
        return Err(not_export());
    }
    // Bounded cost: an export names its own KDF parameters, so a crafted file could ask for
    // any amount of memory.
    if file.header.params.m_kib > 1024 * 1024
        || file.header.params.t > 16
        || file.header.params.p > 16
    {
        return Err(ClientError::InvalidArgument(
            "the export's key derivation parameters are out of bounds".to_string(),
        ));
    }
    let mut salt = [0u8; 16];
    hex::decode_to_slice(&file.header.salt, &mut salt).map_err(|_| not_export())?;
    let key = derive(passphrase, &salt, file.header.params)?;
    let nonce = hex::decode(&file.nonce)
        .ok()
        .and_then(|n| <[u8; 24]>::try_from(n).ok())
        .ok_or_else(not_export)?;
    let ciphertext = base64::engine::general_purpose::STANDARD
        .decode(&file.ciphertext)
        .map_err(|_| not_export())?;
    let aead = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*key));
    aead.decrypt(
        &XNonce::from(nonce),
        Payload {
            msg: &ciphertext,
            aad: &aad_for(EXPORT_AAD_PREFIX, &file.header),
        },
    )
    .map(Zeroizing::new)
    .map_err(|_| {
        ClientError::InvalidArgument("wrong passphrase, or the export file was altered".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    #[test]
    fn state_round_trips_and_only_opens_with_the_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let v = Vault::create(&home, b"right", FAST).unwrap();
        let lock = v.lock().unwrap();
        v.save(&lock, b"{\"secret\": 1}").unwrap();
        drop(lock);
        let (_, plain) = Vault::open(&home, b"right").unwrap();
        assert_eq!(plain.as_slice(), b"{\"secret\": 1}");
        assert!(matches!(
            Vault::open(&home, b"wrong"),
            Err(ClientError::WrongPassphrase)
        ));
        // The plaintext is nowhere on disk.
        let raw = std::fs::read(Vault::state_path(&home)).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        // A second client cannot be created over it.
        assert!(matches!(
            Vault::create(&home, b"right", FAST),
            Err(ClientError::AlreadyInitialized(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(Vault::state_path(&home))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "state file readable by others");
        }
    }

    #[test]
    fn altered_state_or_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_path_buf();
        let v = Vault::create(&home, b"pw", FAST).unwrap();
        let lock = v.lock().unwrap();
        v.save(&lock, b"state").unwrap();
        let path = Vault::state_path(&home);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut file: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Lower the KDF cost in the clear header: bound as associated data, so refused.
        file["params"]["t"] = serde_json::json!(2);
        std::fs::write(&path, file.to_string()).unwrap();
        assert!(Vault::open(&home, b"pw").is_err());
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(
            Vault::open(&home, b"pw"),
            Err(ClientError::CorruptState(_))
        ));
        assert!(matches!(
            Vault::open(&dir.path().join("none"), b"pw"),
            Err(ClientError::NotInitialized(_))
        ));
    }

    #[test]
    fn an_export_opens_only_with_its_passphrase_and_never_as_a_state() {
        let sealed = seal_export(b"pw", FAST, b"{\"text\": \"hello bob\"}").unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"hello bob"));
        assert_eq!(
            open_export(b"pw", &sealed).unwrap().as_slice(),
            b"{\"text\": \"hello bob\"}"
        );
        assert!(matches!(
            open_export(b"wrong", &sealed),
            Err(ClientError::InvalidArgument(_))
        ));
        // Altered ciphertext or header: refused.
        let mut file: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        file["params"]["t"] = serde_json::json!(2);
        assert!(open_export(b"pw", file.to_string().as_bytes()).is_err());
        // A state file is not an export, and an export is not a state file.
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(dir.path(), b"pw", FAST).unwrap();
        let lock = v.lock().unwrap();
        v.save(&lock, b"state").unwrap();
        let state = std::fs::read(Vault::state_path(dir.path())).unwrap();
        assert!(open_export(b"pw", &state).is_err());
        std::fs::write(Vault::state_path(dir.path()), &sealed).unwrap();
        assert!(v.load(&lock).is_err());
        // Unbounded KDF parameters from a crafted file: refused before deriving.
        let mut file: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        file["params"]["m_kib"] = serde_json::json!(u32::MAX);
        assert!(matches!(
            open_export(b"pw", file.to_string().as_bytes()),
            Err(ClientError::InvalidArgument(_))
        ));
        // Wiping the home removes the state.
        v.wipe(&lock).unwrap();
        assert!(!Vault::exists(dir.path()));
    }

    #[test]
    fn the_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(dir.path(), b"pw", FAST).unwrap();
        let held = v.lock().unwrap();
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(LOCK_FILE))
            .unwrap();
        assert!(file.try_lock().is_err(), "a second lock was granted");
        drop(held);
        assert!(file.try_lock().is_ok());
    }
}
