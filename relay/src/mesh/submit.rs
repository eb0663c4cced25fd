//! With a pinned network: this node submits its own signed descriptor to every pinned
//! authority (`POST /v1/descriptors`), so that an authority whose allow list names it admits
//! it into the next consensus without reading any node's gossip.
//!
//! One task per authority, each with its own [`Submission`] (the decisions, no I/O): it
//! submits as soon as the node has a descriptor, again when the descriptor's content changes
//! (addresses, Sphinx keys: not for a mere re-signature), once per consensus epoch the node
//! sees (an authority that restarted has forgotten it), and before the authority's copy
//! expires (at half its validity). A failed submission (no answer, or an authority error) is
//! retried with a doubling back-off, [`ATTEMPTS_MAX`] times, then after [`PAUSE`]. Results
//! are counted (`whispr_mesh_descriptor_submissions_total{result}`); nothing is logged with
//! a node id or an address.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use whispr_protocol::UnixTime;
use whispr_protocol::consensus::Network;
use whispr_protocol::directory::{NodeDescriptor, SignedDescriptor};

use super::shared::Shared;

/// Attempts of one submission before pausing.
pub(crate) const ATTEMPTS_MAX: u32 = 6;
/// First retry after a failed attempt; it doubles with each failure.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay between attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Wait after [`ATTEMPTS_MAX`] failed attempts before trying again.
pub(crate) const PAUSE: Duration = Duration::from_secs(10 * 60);
/// Longest answer read from an authority (`{"admitted": bool}`, or an error).
const ANSWER_LEN_MAX: usize = 4096;

/// This node's descriptor as last published by the swarm task.
#[derive(Clone, Debug)]
pub(crate) struct OwnDescriptor {
    /// The signed body.
    pub(crate) descriptor: NodeDescriptor,
    /// As published.
    pub(crate) signed: SignedDescriptor,
}

/// An authority's answer to one submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Taken, and its policy admits this node.
    Admitted,
    /// Taken, but its policy does not admit this node (not on its allow list).
    NotAdmitted,
    /// Refused as invalid or stale (HTTP 4xx): not retried until the next trigger.
    Refused,
    /// No answer, or a server error: retried with back-off.
    Failed,
}

impl Outcome {
    /// Every outcome, in the metrics' order.
    pub(crate) const ALL: [Outcome; 4] = [
        Outcome::Admitted,
        Outcome::NotAdmitted,
        Outcome::Refused,
        Outcome::Failed,
    ];

    /// The `result` label of `whispr_mesh_descriptor_submissions_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::NotAdmitted => "not_admitted",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// What [`Submission::next`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Submit the current descriptor now.
    Send,
    /// Nothing to do for this long (`None`: until the descriptor or the epoch changes).
    Wait(Option<Duration>),
}

/// What the authority was last told.
#[derive(Clone, Debug)]
struct Sent {
    /// The descriptor without its timestamps (a re-signature alone is not news).
    content: NodeDescriptor,
    /// The consensus epoch it was sent in (the first one seen, if sent before any).
    epoch: Option<u64>,
    /// When the authority's copy has lived half its validity.
    refresh_at: UnixTime,
}

/// One authority's submission state (no I/O: the time is passed in).
#[derive(Clone, Debug, Default)]
pub(crate) struct Submission {
    sent: Option<Sent>,
    failures: u32,
    retry_at: Option<UnixTime>,
}

fn content(d: &NodeDescriptor) -> NodeDescriptor {
    NodeDescriptor {
        published_at: UnixTime(0),
        expires_at: UnixTime(0),
        ..d.clone()
    }
}

fn until(now: UnixTime, at: UnixTime) -> Duration {
    Duration::from_millis(at.0.saturating_sub(now.0))
}

impl Submission {
    /// Whether to submit `own` now, with `epoch` the consensus epoch the node holds.
    pub(crate) fn next(
        &mut self,
        now: UnixTime,
        own: Option<&NodeDescriptor>,
        epoch: Option<u64>,
    ) -> Next {
        let Some(own) = own else {
            return Next::Wait(None);
        };
        if let Some(at) = self.retry_at
            && now < at
        {
            return Next::Wait(Some(until(now, at)));
        }
        let Some(sent) = &mut self.sent else {
            return Next::Send;
        };
        if sent.epoch.is_none() {
            sent.epoch = epoch;
        }
        let new_epoch = epoch.is_some() && sent.epoch != epoch;
        if sent.content != content(own) || new_epoch || now >= sent.refresh_at {
            return Next::Send;
        }
        Next::Wait(Some(until(now, sent.refresh_at)))
    }

    /// Records the outcome of submitting `own` at `now`, in `epoch`.
    pub(crate) fn done(
        &mut self,
        now: UnixTime,
        own: &NodeDescriptor,
        epoch: Option<u64>,
        outcome: Outcome,
    ) {
        if outcome == Outcome::Failed {
            self.failures = self.failures.saturating_add(1);
            let wait = if self.failures >= ATTEMPTS_MAX {
                self.failures = 0;
                PAUSE
            } else {
                BACKOFF_MIN
                    .saturating_mul(1u32 << self.failures.saturating_sub(1).min(16))
                    .min(BACKOFF_MAX)
            };
            self.retry_at = Some(now.saturating_add(wait));
            return;
        }
        let half = own.expires_at.0.saturating_sub(own.published_at.0) / 2;
        self.sent = Some(Sent {
            content: content(own),
            epoch,
            refresh_at: UnixTime(own.published_at.0.saturating_add(half)),
        });
        self.failures = 0;
        self.retry_at = None;
    }
}

/// Spawns one submitting task per authority of `network`.
pub(crate) fn spawn(
    tasks: &mut tokio::task::JoinSet<()>,
    network: &whispr_protocol::consensus::Network,
    own: watch::Receiver<Option<Arc<OwnDescriptor>>>,
    epochs: watch::Receiver<Option<u64>>,
    shared: Arc<Shared>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(http) = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
    else {
        tracing::error!("cannot build the HTTP client for descriptor submission");
        return;
    };
    for authority in Network::authorities(network) {
        let url = format!("{}/v1/descriptors", authority.url.trim_end_matches('/'));
        tasks.spawn(submit_to(
            url,
            http.clone(),
            own.clone(),
            epochs.clone(),
            shared.clone(),
        ));
    }
}

/// Submits to one authority for as long as the mesh runs.
async fn submit_to(
    url: String,
    http: reqwest::Client,
    mut own: watch::Receiver<Option<Arc<OwnDescriptor>>>,
    mut epochs: watch::Receiver<Option<u64>>,
    shared: Arc<Shared>,
) {
    let mut state = Submission::default();
    let (mut own_open, mut epochs_open) = (true, true);
    loop {
        let current = own.borrow_and_update().clone();
        let epoch = *epochs.borrow_and_update();
        let now = whispr_node_kit::clock::now();
        let wait = match state.next(now, current.as_ref().map(|o| &o.descriptor), epoch) {
            Next::Send => {
                let Some(current) = current else { continue };
                let outcome = post(&http, &url, &current.signed).await;
                shared.metrics.descriptor_submitted(outcome);
                if outcome == Outcome::Failed {
                    tracing::debug!("descriptor submission to an authority failed");
                }
                state.done(
                    whispr_node_kit::clock::now(),
                    &current.descriptor,
                    epoch,
                    outcome,
                );
                continue;
            }
            Next::Wait(wait) => wait,
        };
        tokio::select! {
            changed = own.changed(), if own_open => own_open = changed.is_ok(),
            changed = epochs.changed(), if epochs_open => epochs_open = changed.is_ok(),
            () = sleep_or_forever(wait) => {}
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        // Past a far deadline anyway, look again: nothing is lost by waking early.
        Some(d) => tokio::time::sleep(d.min(Duration::from_secs(24 * 3600))).await,
        None => std::future::pending().await,
    }
}

/// `POST url` with the descriptor; the authority's verdict.
async fn post(http: &reqwest::Client, url: &str, signed: &SignedDescriptor) -> Outcome {
    let sent = http
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(signed.encode())
        .send()
        .await;
    let Ok(mut response) = sent else {
        return Outcome::Failed;
    };
    let status = response.status();
    if status.is_client_error() {
        return Outcome::Refused;
    }
    if !status.is_success() {
        return Outcome::Failed;
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len().saturating_add(chunk.len()) <= ANSWER_LEN_MAX => {
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => return Outcome::Failed,
        }
    }
    match serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("admitted").and_then(serde_json::Value::as_bool))
    {
        Some(true) => Outcome::Admitted,
        Some(false) => Outcome::NotAdmitted,
        None => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whispr_protocol::NodeId;

    fn descriptor(published: u64, addresses: &[&str]) -> NodeDescriptor {
        NodeDescriptor {
            node_id: NodeId([7; 32]),
            peer_id: Vec::new(),
            roles: Default::default(),
            mix_layer: 0,
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            api_url: None,
            sphinx_keys: Default::default(),
            published_at: UnixTime(published),
            expires_at: UnixTime(published + 100_000),
        }
    }

    #[test]
    fn submits_at_start_on_news_per_epoch_and_before_expiry_not_per_resignature() {
        let mut s = Submission::default();
        let d = descriptor(1_000, &["/ip4/1.2.3.4/tcp/1"]);
        assert_eq!(s.next(UnixTime(1_000), None, None), Next::Wait(None));
        assert_eq!(s.next(UnixTime(1_000), Some(&d), None), Next::Send);
        s.done(UnixTime(1_000), &d, None, Outcome::Admitted);
        // A re-signature with the same content, and the first consensus seen: nothing new.
        let resigned = descriptor(2_000, &["/ip4/1.2.3.4/tcp/1"]);
        assert_eq!(
            s.next(UnixTime(2_000), Some(&resigned), Some(5)),
            Next::Wait(Some(Duration::from_millis(49_000)))
        );
        // The next epoch: submitted again.
        assert_eq!(
            s.next(UnixTime(3_000), Some(&resigned), Some(6)),
            Next::Send
        );
        s.done(UnixTime(3_000), &resigned, Some(6), Outcome::NotAdmitted);
        assert!(matches!(
            s.next(UnixTime(3_000), Some(&resigned), Some(6)),
            Next::Wait(Some(_))
        ));
        // New addresses: submitted again.
        let moved = descriptor(4_000, &["/ip4/5.6.7.8/tcp/1"]);
        assert_eq!(s.next(UnixTime(4_000), Some(&moved), Some(6)), Next::Send);
        s.done(UnixTime(4_000), &moved, Some(6), Outcome::Admitted);
        // Half the validity of the copy sent: refreshed.
        assert_eq!(s.next(UnixTime(54_000), Some(&moved), Some(6)), Next::Send);
    }

    #[test]
    fn failures_back_off_doubling_then_pause_and_a_refusal_waits_for_news() {
        let mut s = Submission::default();
        let mut d = descriptor(1_000, &[]);
        d.expires_at = UnixTime(10_000_000);
        let mut now = UnixTime(1_000);
        let mut waits = Vec::new();
        for _ in 0..ATTEMPTS_MAX {
            assert_eq!(s.next(now, Some(&d), None), Next::Send);
            s.done(now, &d, None, Outcome::Failed);
            let Next::Wait(Some(wait)) = s.next(now, Some(&d), None) else {
                panic!("a failure waits");
            };
            waits.push(wait.as_secs());
            now = now.saturating_add(wait);
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 600]);
        assert_eq!(s.next(now, Some(&d), None), Next::Send);
        s.done(now, &d, None, Outcome::Refused);
        assert!(matches!(s.next(now, Some(&d), None), Next::Wait(Some(_))));
        // The first epoch seen after the refusal is the one it was made in; the next is news.
        assert!(matches!(
            s.next(now, Some(&d), Some(9)),
            Next::Wait(Some(_))
        ));
        assert_eq!(s.next(now, Some(&d), Some(10)), Next::Send);
    }
}
