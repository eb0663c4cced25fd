//! The core's Olm sessions, bounded in memory: at most `olm_sessions_live` of them are kept
//! ready to use (the most recently used); the others wait as pickles (vodozemac's own
//! [`SessionPickle`], JSON-encoded, in zeroized buffers): 1,148 bytes for a new session,
//! 2.5–2.8 KB after twenty exchanges, against 3,752 bytes inline for a ready [`Session`]
//! (vodozemac keeps its receiving chains in an array) plus its hash-map slot. A session taken
//! out of its pickle is the same session: pickling is exact, and nothing random is drawn.
//!
//! A client with a few contacts never notices; one with thousands (a popular user, a bot, the
//! simulator's 100,000 users) holds its idle sessions in about half the memory, at the cost of
//! one unpickle when a cold one is used again.

use std::collections::HashMap;

use vodozemac::olm::{Session, SessionPickle};
use zeroize::Zeroizing;

/// Sessions kept ready when the settings ask for none.
const LIVE_MIN: usize = 1;

/// Olm sessions by key (a contact's name, or `name#device-curve`).
pub(crate) struct Sessions {
    /// Ready sessions and the use count at which each was last used.
    live: HashMap<String, (Session, u64)>,
    /// The others, pickled.
    cold: HashMap<String, Zeroizing<Vec<u8>>>,
    /// Uses so far (orders the ready sessions for eviction).
    uses: u64,
    /// Most ready sessions.
    live_max: usize,
}

impl Sessions {
    /// No sessions; at most `live_max` (at least one) kept ready.
    pub(crate) fn new(live_max: usize) -> Sessions {
        Sessions {
            live: HashMap::new(),
            cold: HashMap::new(),
            uses: 0,
            live_max: live_max.max(LIVE_MIN),
        }
    }

    /// Changes the bound; sessions over it are pickled at once.
    pub(crate) fn set_live_max(&mut self, live_max: usize) {
        self.live_max = live_max.max(LIVE_MIN);
        self.shrink(None);
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.live.contains_key(key) || self.cold.contains_key(key)
    }

    /// Sessions held, ready and pickled.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live.len() + self.cold.len()
    }

    /// Sessions ready.
    #[cfg(test)]
    pub(crate) fn live_len(&self) -> usize {
        self.live.len()
    }

    /// The session `key`, made ready if it was pickled (another one may be pickled in its
    /// place). A pickle that does not decode (it cannot: this module wrote it) is dropped.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Session> {
        self.uses += 1;
        if !self.live.contains_key(key) {
            let pickled = self.cold.remove(key)?;
            let pickle: SessionPickle = serde_json::from_slice(&pickled).ok()?;
            self.live
                .insert(key.to_string(), (Session::from_pickle(pickle), self.uses));
            self.shrink(Some(key));
        }
        let (session, used) = self.live.get_mut(key)?;
        *used = self.uses;
        Some(session)
    }

    /// Adds (or replaces) session `key`, ready.
    pub(crate) fn insert(&mut self, key: String, session: Session) {
        self.uses += 1;
        self.cold.remove(&key);
        self.live.insert(key.clone(), (session, self.uses));
        self.shrink(Some(&key));
    }

    /// Takes session `key` out.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Session> {
        if let Some((s, _)) = self.live.remove(key) {
            return Some(s);
        }
        let pickled = self.cold.remove(key)?;
        serde_json::from_slice::<SessionPickle>(&pickled)
            .ok()
            .map(Session::from_pickle)
    }

    /// Keeps only the sessions whose key `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.live.retain(|k, _| keep(k));
        self.cold.retain(|k, _| keep(k));
    }

    /// The pickle of session `key` (for the saved state).
    pub(crate) fn pickle(&self, key: &str) -> Option<SessionPickle> {
        match self.live.get(key) {
            Some((s, _)) => Some(s.pickle()),
            None => serde_json::from_slice(self.cold.get(key)?).ok(),
        }
    }

    /// Every key, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.live.keys().chain(self.cold.keys()).map(String::as_str)
    }

    /// Pickles the least recently used ready sessions (never `keep`) until at most
    /// `live_max` are ready.
    fn shrink(&mut self, keep: Option<&str>) {
        while self.live.len() > self.live_max {
            let Some(oldest) = self
                .live
                .iter()
                .filter(|(k, _)| Some(k.as_str()) != keep)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            let Some((session, _)) = self.live.remove(&oldest) else {
                return;
            };
            // Serialising vodozemac's pickle (keys and counters) cannot fail; if it ever
            // did, the session stays ready rather than being lost.
            match serde_json::to_vec(&session.pickle()) {
                Ok(bytes) => {
                    self.cold.insert(oldest, Zeroizing::new(bytes));
                }
                Err(_) => {
                    self.live.insert(oldest, (session, 0));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vodozemac::olm::{Account, OlmMessage, SessionConfig};

    /// A pair of sessions between a new account and `bob`: (Alice's outbound, Bob's inbound),
    /// the first message read.
    fn pair(bob: &mut Account) -> (Session, Session) {
        let alice = Account::new();
        bob.generate_one_time_keys(1);
        let otk = *bob.one_time_keys().values().next().unwrap();
        bob.mark_keys_as_published();
        let mut out = alice
            .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
            .unwrap();
        let Ok(OlmMessage::PreKey(pre)) = out.encrypt(b"hello") else {
            panic!("first message is a prekey message");
        };
        let created = bob
            .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &pre)
            .unwrap();
        assert_eq!(created.plaintext, b"hello");
        (out, created.session)
    }

    #[test]
    fn sessions_beyond_the_bound_are_pickled_and_come_back_the_same() {
        let mut bob = Account::new();
        let mut theirs = HashMap::new();
        let mut ours = Sessions::new(2);
        for i in 0..5 {
            let (alice, bob_side) = pair(&mut bob);
            theirs.insert(format!("c{i}"), alice);
            ours.insert(format!("c{i}"), bob_side);
        }
        assert_eq!((ours.len(), ours.live_len()), (5, 2));
        // Every contact writes twice, round robin, so each read takes a pickled session out
        // and puts another one away: the ratchets must go on where they were.
        for round in 0..2 {
            for i in 0..5 {
                let key = format!("c{i}");
                let text = format!("{key} round {round}");
                let msg = theirs
                    .get_mut(&key)
                    .unwrap()
                    .encrypt(text.as_bytes())
                    .unwrap();
                let session = ours.get_mut(&key).expect("session kept");
                assert_eq!(session.decrypt(&msg).unwrap(), text.as_bytes());
                assert!(ours.live_len() <= 2);
            }
        }
        // And the other way, from a pickled session.
        let key = "c0";
        ours.get_mut("c4").unwrap();
        ours.get_mut("c3").unwrap();
        assert!(!ours.live.contains_key(key));
        let reply = ours.get_mut(key).unwrap().encrypt(b"back").unwrap();
        assert_eq!(
            theirs.get_mut(key).unwrap().decrypt(&reply).unwrap(),
            b"back"
        );
    }

    #[test]
    fn remove_retain_and_pickle_see_pickled_sessions_too() {
        let mut bob = Account::new();
        let mut ours = Sessions::new(1);
        let mut ids = HashMap::new();
        for i in 0..3 {
            let (_, s) = pair(&mut bob);
            ids.insert(format!("c{i}"), s.session_id());
            ours.insert(format!("c{i}"), s);
        }
        assert_eq!(ours.live_len(), 1);
        assert!(ours.contains_key("c0") && ours.contains_key("c2"));
        assert_eq!(
            ours.pickle("c0")
                .map(|p| Session::from_pickle(p).session_id()),
            ids.get("c0").cloned()
        );
        let mut keys: Vec<&str> = ours.keys().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["c0", "c1", "c2"]);
        assert_eq!(
            ours.remove("c1").map(|s| s.session_id()),
            ids.get("c1").cloned()
        );
        ours.retain(|k| k != "c0");
        assert_eq!(ours.keys().collect::<Vec<_>>(), ["c2"]);
        assert!(ours.remove("c1").is_none());
        ours.set_live_max(0);
        assert_eq!(ours.live_len(), 1, "one is always kept ready");
    }
}
