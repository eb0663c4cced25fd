//! A devnet's three directory authorities as real processes (issue 14): the nodes route by
//! their consensus, a client accepts it signed 3/3; with one authority killed, the next
//! epoch's consensus is still made (2/3) and accepted, by the client library and by `whispr`
//! (`whispr directory`), even with the dead authority listed first.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;
use std::time::{Duration, Instant};

use whispr_client::devnet::{self, Devnet, DevnetOptions};
use whispr_client::net::Net;
use whispr_protocol::UnixTime;
use whispr_protocol::consensus::{ConsensusInfo, Network};
use whispr_protocol::directory::Directory;

const WHISPR: &str = env!("CARGO_BIN_EXE_whispr");
/// Longest wait for a consensus (a few 5-second epochs; generous for a loaded machine).
const WAIT: Duration = Duration::from_secs(120);

fn now() -> UnixTime {
    UnixTime(whispr_client::now_ms())
}

/// Waits until `url` serves a consensus that verifies and satisfies `done`.
async fn consensus_until(
    net: &Net,
    url: &str,
    network: &Network,
    what: &str,
    done: impl Fn(&ConsensusInfo) -> bool,
) -> Directory {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(d) = net
            .directory(&[url.to_string()], network, now(), None)
            .await
            && d.consensus().is_some_and(&done)
        {
            return d;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_authority_killed_the_next_consensus_is_still_made_and_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("devnet");
    let devnet = Devnet::up(DevnetOptions {
        dir: dir.clone(),
        relays: 2,
        mailboxes: 1,
        timers: 1,
        bin_dir: devnet::default_bin_dir(),
        relaxed_limits: false,
    })
    .await
    .unwrap();
    let nodes = 4;
    let network = Network::parse(&std::fs::read_to_string(devnet.network_file()).unwrap()).unwrap();
    assert_eq!(network.authorities().len(), 3);
    let authority_urls: Vec<String> = network
        .authorities()
        .iter()
        .map(|a| format!("{}/v1/consensus", a.url))
        .collect();
    let net = Net::new().unwrap();

    // Up: the edge mirrors a consensus listing every node, and all three sign one.
    let mirrored = consensus_until(&net, devnet.directory_url(), &network, "the mirror", |_| {
        true
    })
    .await;
    assert_eq!(mirrored.len(), nodes);
    let full = consensus_until(&net, &authority_urls[1], &network, "a 3/3 consensus", |c| {
        c.signers == 3
    })
    .await;
    assert_eq!(full.len(), nodes);
    let before = *full.consensus().unwrap();
    assert_eq!(before.authorities, 3);

    // One authority dies; the next epoch's consensus is made by the other two.
    devnet::kill_node(&dir, "authority1").unwrap();
    let killed_at = now();
    let after = consensus_until(
        &net,
        &authority_urls[1],
        &network,
        "a consensus made after the kill",
        |c| c.valid_after > killed_at,
    )
    .await;
    let info = *after.consensus().unwrap();
    assert_eq!((info.signers, info.authorities), (2, 3), "{info:?}");
    assert!(info.epoch > before.epoch);
    assert_eq!(after.len(), nodes);

    // A client accepts it, asking the dead authority first, and refuses to go back to the
    // epoch before.
    let mut urls = authority_urls.clone();
    urls.push(devnet.directory_url().to_string());
    let accepted = net
        .directory(&urls, &network, now(), Some(before.epoch))
        .await
        .unwrap();
    assert!(accepted.consensus().unwrap().epoch > before.epoch);
    // The nodes take it too: the edge's mirror moves on to a 2/3 consensus.
    consensus_until(
        &net,
        devnet.directory_url(),
        &network,
        "the mirror at 2/3",
        |c| c.signers == 2 && c.epoch > before.epoch,
    )
    .await;

    // And `whispr`, pinning the network file, routes by a consensus signed by 2 of 3.
    let home = tmp.path().join("carol");
    let whispr = |args: &[&str]| {
        let out = Command::new(WHISPR)
            .arg("--home")
            .arg(&home)
            .args(args)
            .env("WHISPR_PASSPHRASE", "carol's passphrase")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "whispr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let network_file = devnet.network_file().display().to_string();
    whispr(&[
        "init",
        "--directory",
        devnet.directory_url(),
        "--network",
        &network_file,
    ]);
    let shown = whispr(&["directory"]);
    assert!(
        shown.contains("directory signed by 2/3 authorities"),
        "{shown}"
    );
    drop(devnet);
}
