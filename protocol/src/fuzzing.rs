//! Entry points shared by the fuzz targets in `fuzz/` and the corpus-replay test
//! (`tests/fuzz_corpus.rs`), so that `make test` runs every committed corpus input through
//! exactly the code the fuzzers exercise. Each returns nothing: the property is "no panic".

use crate::directory::{Directory, SignedDescriptor};
use crate::envelope::{Envelope, MailboxSecretKey};
use crate::fragment::{Fragment, FragmentInfo, Reassembler, ReassemblyLimits};
use crate::payload::{FinalMessage, Reply};
use crate::sphinx::{SphinxSecretKey, Surb, SurbRecovery, process_packet};
use crate::{MessageId, UnixTime, wire};

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of the corpus dirs).
pub const TARGETS: &[&str] = &[
    "wire",
    "packet",
    "envelope",
    "fragment",
    "descriptor",
    "consensus",
    "replica",
    "mailbox_http",
    "timer_http",
];

/// Runs the target called `name` on `data`; false if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "wire" => wire_messages(data),
        "packet" => packet(data),
        "envelope" => envelope(data),
        "fragment" => fragment(data),
        "descriptor" => descriptor(data),
        "consensus" => consensus(data),
        "replica" => replica(data),
        "mailbox_http" => mailbox_http(data),
        "timer_http" => timer_http(data),
        _ => return false,
    }
    true
}

/// Every top-level wire decoder.
pub fn wire_messages(data: &[u8]) {
    let _ = FinalMessage::decode(data);
    let _ = Reply::decode(data);
    let _ = wire::decode::<wire::EnvelopeContent>(data, wire::MESSAGE_LEN_MAX);
    let _ = wire::decode::<wire::DescriptorBody>(data, wire::MESSAGE_LEN_MAX);
}

/// Sphinx packets at a hop, SURBs and SURB recovery material.
pub fn packet(data: &[u8]) {
    let key = SphinxSecretKey::from([7u8; 32]);
    let _ = process_packet(&[&key], data);
    let _ = Surb::from_bytes(data);
    // Recovery material (16-byte id and two seeds) followed by a sealed reply.
    if let (Some(material), Some(sealed)) = (data.get(..48), data.get(48..))
        && let Ok(recovery) = SurbRecovery::from_bytes(material)
    {
        let _ = recovery.open(sealed);
    }
}

/// Sealed envelopes: decode, then try to open with a fixed key.
pub fn envelope(data: &[u8]) {
    if let Ok(envelope) = Envelope::decode(data) {
        let key = MailboxSecretKey::from_bytes(&[9u8; 32]);
        if let Ok(key) = key {
            let _ = envelope.open(&key);
        }
        let _ = Envelope::decode(&envelope.encode());
    }
}

/// Fragment info and reassembly: the input is a sequence of (wire FragmentInfo, data) records.
pub fn fragment(data: &[u8]) {
    let mut reassembler = Reassembler::<MessageId>::new(ReassemblyLimits {
        messages_max: 4,
        bytes_max: 64 * 1024,
        age_max: std::time::Duration::from_secs(60),
        completed_max: 4,
    });
    let mut rest = data;
    let mut now = 0u64;
    while let [info_len, data_len_hi, data_len_lo, tail @ ..] = rest {
        let info_len = usize::from(*info_len);
        let data_len = usize::from(u16::from_be_bytes([*data_len_hi, *data_len_lo]));
        let Some(info_bytes) = tail.get(..info_len) else {
            return;
        };
        let Some(frag_data) = tail.get(info_len..info_len.saturating_add(data_len)) else {
            return;
        };
        rest = tail.get(info_len.saturating_add(data_len)..).unwrap_or(&[]);
        now = now.saturating_add(1000);
        let Ok(info) = <wire::FragmentInfo as prost::Message>::decode(info_bytes) else {
            continue;
        };
        let Ok(info) = FragmentInfo::from_wire(Some(&info)) else {
            continue;
        };
        // Fragments of one message share their count, so they land under one key; a few
        // keys exercise the message bound.
        let key = MessageId([(info.count % 3) as u8; 16]);
        let _ = reassembler.insert(
            UnixTime(now),
            key,
            Fragment {
                message_id: key,
                info,
                data: frag_data.to_vec(),
            },
        );
    }
}

/// Signed descriptors and whole directories.
pub fn descriptor(data: &[u8]) {
    let now = UnixTime(1_800_000_000_000);
    if let Ok(signed) = SignedDescriptor::decode(data) {
        let _ = signed.verify(now);
    }
    let _ = Directory::decode(now, data);
}

/// The authorities `consensus` verifies against: three keys from the seeds `[1; 32]`,
/// `[2; 32]` and `[3; 32]`, threshold 2.
pub fn fuzz_network() -> Option<crate::consensus::Network> {
    use crate::consensus::{Authority, Network};
    let authorities = (1u8..=3)
        .map(|i| Authority {
            key: ed25519_dalek::SigningKey::from_bytes(&[i; 32])
                .verifying_key()
                .to_bytes(),
            url: format!("http://authority{i}.example"),
        })
        .collect();
    Network::new(authorities, None).ok()
}

/// Network files (as text), consensus documents and votes: decode, then verify against
/// [`fuzz_network`] at `UnixTime(1_800_000_000_000)`.
pub fn consensus(data: &[u8]) {
    use crate::consensus::{Consensus, Network, SignedVote};
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Network::parse(text);
    }
    let Some(network) = fuzz_network() else {
        return;
    };
    if let Ok(c) = Consensus::decode(data)
        && let Ok(verified) = c.verify(UnixTime(1_800_000_000_000), &network)
    {
        let _ = Directory::from_consensus(UnixTime(1_800_000_000_000), &verified);
    }
    if let Ok(v) = SignedVote::decode(data) {
        let _ = v.verify(&network);
    }
}

/// Mailbox replica messages (`crate::replica`): decode, and re-encode what decodes (the
/// encoding must decode to the same message).
pub fn replica(data: &[u8]) {
    use crate::replica::ReplicaMessage;
    if let Ok(m) = ReplicaMessage::decode(data) {
        let again = ReplicaMessage::decode(&m.encode());
        assert!(
            again.as_ref() == Ok(&m),
            "replica message does not round-trip"
        );
    }
}

/// The parsers of a mailbox node's HTTP API (`crate::mailbox_api`), as the node runs them:
/// the first byte picks one, the rest is its input. JSON bodies are deserialized like axum's
/// `Json` extractor does (`serde_json::from_slice`) and then validated; query strings like
/// its `Query` extractor (`serde_urlencoded`); WebSocket text frames like the stream loop
/// (`serde_json::from_str`); path ids and bearer tokens by their hex parsers.
pub fn mailbox_http(data: &[u8]) {
    use crate::mailbox_api as api;
    let Some((selector, input)) = data.split_first() else {
        return;
    };
    let text = std::str::from_utf8(input).ok();
    match selector % 10 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<api::CreateMailboxRequest>(input) {
                let _ = r.validate();
            }
        }
        1 => {
            if let Ok(r) = serde_json::from_slice::<api::ChallengeRequest>(input) {
                let _ = r.validate();
            }
        }
        2 => {
            if let Ok(r) = serde_json::from_slice::<api::LoginRequest>(input) {
                let _ = r.validate();
            }
        }
        3 => {
            let _ = serde_json::from_slice::<api::AckRequest>(input);
        }
        4 => {
            if let Ok(r) = serde_json::from_slice::<api::DeviceRequest>(input) {
                let _ = r.validate();
            }
        }
        5 => {
            if let Ok(r) = serde_json::from_slice::<api::PrekeysRequest>(input) {
                let _ = r.validate();
            }
        }
        6 => {
            if let Some(text) = text {
                let _ = serde_json::from_str::<api::StreamCommand>(text);
            }
        }
        7 => {
            if let Some(text) = text {
                let _ = serde_urlencoded::from_str::<api::PollQuery>(text);
            }
        }
        8 => {
            if let Some(text) = text
                && let Ok(q) = serde_urlencoded::from_str::<api::StreamQuery>(text)
            {
                let _ = q.ticket();
            }
        }
        _ => {
            if let Some(text) = text {
                let _ = api::parse_mailbox_id(text);
                let _ = api::parse_token(text);
            }
        }
    }
}

/// The parsers of a timer node's admin HTTP API (`crate::timer_api`): the first byte picks
/// one, the rest is its input. A body is parsed as JSON (axum's `Json<Value>`), then through
/// [`crate::timer_api::object_body`] (and a task body's id through `parse_task_id`); the
/// `fired` query string like axum's `Query` extractor (`serde_urlencoded`).
pub fn timer_http(data: &[u8]) {
    use crate::timer_api as api;
    let Some((selector, input)) = data.split_first() else {
        return;
    };
    if selector % 4 == 3 {
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = serde_urlencoded::from_str::<api::FiredQuery>(text);
        }
        return;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(input) else {
        return;
    };
    match selector % 4 {
        0 => {
            let _ = api::object_body::<api::CategoryBody>(value);
        }
        1 => {
            if let Ok(body) = api::object_body::<api::TaskBody>(value) {
                let _ = api::parse_task_id(&body.task);
            }
        }
        _ => {
            let _ = api::object_body::<api::BackupBody>(value);
        }
    }
}
