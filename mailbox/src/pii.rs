//! Wrappers that keep personal data out of logs (after str0m's `Pii<T>`).
//!
//! [`Pii`] prints `[redacted]` through both `Debug` and `Display`, so a mailbox id, token,
//! key or address wrapped in it cannot reach a log line by accident. When an operator needs
//! to correlate log lines about the same object, [`Tag`] prints a short keyed hash instead
//! (keyed per process, so it links nothing across restarts or nodes).

use std::fmt;
use std::sync::OnceLock;

use hmac::Mac;

/// A value that must never be printed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pii<T>(pub T);

impl<T> fmt::Debug for Pii<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Pii<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

static TAG_KEY: OnceLock<[u8; 32]> = OnceLock::new();

/// A 4-byte keyed hash of some bytes, printable in logs to correlate lines about the same
/// object within one process run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tag([u8; 4]);

impl Tag {
    /// The tag of `bytes`.
    pub fn of(bytes: &[u8]) -> Tag {
        let key = TAG_KEY.get_or_init(|| {
            let mut k = [0u8; 32];
            rand::fill(&mut k);
            k
        });
        let mut out = [0u8; 4];
        if let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(key) {
            mac.update(bytes);
            let full = mac.finalize().into_bytes();
            for (o, b) in out.iter_mut().zip(full.iter()) {
                *o = *b;
            }
        }
        Tag(out)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pii_never_prints_its_value() {
        let secret = "203.0.113.7:4433";
        assert_eq!(format!("{}", Pii(secret)), "[redacted]");
        assert_eq!(format!("{:?}", Pii(secret)), "[redacted]");
        assert_eq!(format!("{:#?}", Pii([7u8; 32])), "[redacted]");
    }

    #[test]
    fn tags_are_stable_within_a_process_and_hide_the_value() {
        let id = [0x42u8; 32];
        let a = Tag::of(&id);
        assert_eq!(a, Tag::of(&id));
        assert_ne!(a, Tag::of(&[0x43u8; 32]));
        let shown = a.to_string();
        assert!(shown.starts_with("t:") && shown.len() == 10);
        assert!(!shown.contains(&hex::encode(&id[..4])));
    }
}
