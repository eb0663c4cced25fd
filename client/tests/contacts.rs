//! Contact and data management through the `whispr` command over a devnet of real processes
//! (issue 20, `docs/clients.md`, *Removing, blocking, erasing, exporting*): three mailbox
//! nodes, so every mailbox has all three as its replica set.
//!
//! * `export`: the file holds no plaintext; `export --decrypt` with the passphrase gives the
//!   history and contacts; a wrong passphrase fails.
//! * `block`: bob blocks alice; alice's next message is refused by the mailbox nodes and
//!   ends `failed` on her side, never delivered; a new invitation from her is refused, and so
//!   is her answer to a new one of bob's; bob's other contacts are unaffected.
//! * `remove`: likewise for carol (without the block), with one replica of her mailbox down:
//!   it is erased there by bob's client once the replica is back.
//! * `erase`: every mailbox of bob's is gone from every replica (the owner key's login is
//!   refused where it succeeded before) and his home has no client any more.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

use std::time::Instant;

use serde_json::{Value, json};
use whispr_client::devnet::{self, Devnet, DevnetOptions};
use whispr_client::net::Net;
use whispr_client::{Client, ClientError};

mod common;
use common::{User, WAIT};

fn names(contacts: &Value, list: &str) -> Vec<String> {
    contacts[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_remove_erase_and_export_through_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let mut devnet = Devnet::up(DevnetOptions {
        dir: tmp.path().join("devnet"),
        relays: 3,
        mailboxes: 3,
        timers: 1,
        bin_dir: devnet::default_bin_dir(),
        relaxed_limits: false,
    })
    .await
    .unwrap();
    let url = devnet.directory_url().to_string();
    let network = devnet.network_file().display().to_string();
    let user = |name: &str, pass: &'static str| User {
        home: tmp.path().join(name),
        pass,
    };
    let (alice, bob, carol, dave) = (
        user("alice", "pass-a"),
        user("bob", "pass-b"),
        user("carol", "pass-c"),
        user("dave", "pass-d"),
    );
    // The senders that will be refused give up quickly: 5 attempts, 2 s apart.
    for u in [&alice, &carol] {
        u.ok(&[
            "init",
            "--directory",
            &url,
            "--network",
            &network,
            "--retransmit-after-ms",
            "2000",
        ]);
    }
    for u in [&bob, &dave] {
        u.ok(&["init", "--directory", &url, "--network", &network]);
    }
    alice.befriend("alice", &bob, "bob");
    bob.befriend("bob", &carol, "carol");
    dave.befriend("dave", &bob, "bob");
    for (u, text) in [
        (&alice, "hello bob, from alice"),
        (&carol, "hello bob, from carol"),
        (&dave, "hello bob, from dave"),
    ] {
        u.send_stored("bob", text);
        bob.recv_texts(&[text]);
    }

    // Export: encrypted under the passphrase, the history and contacts inside.
    let file = tmp.path().join("bob-export");
    let file_arg = file.display().to_string();
    let made = bob.ok(&["export", "--to", &file_arg]);
    assert_eq!(made[0]["messages"], 3, "{made:?}");
    let raw = std::fs::read(&file).unwrap();
    for needle in ["hello bob", "alice", "carol"] {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} in clear in the export"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the export is readable by others");
    }
    let doc = bob.ok(&["export", "--decrypt", &file_arg]).remove(0);
    assert_eq!(doc["format"], "whispr-export");
    let mut contact_names = names(&doc, "contacts");
    contact_names.sort();
    assert_eq!(contact_names, ["alice", "carol", "dave"]);
    let texts: Vec<&str> = doc["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3, "{doc}");
    assert!(texts.contains(&"hello bob, from alice"));
    let wrong = User {
        home: bob.home.clone(),
        pass: "not bob's passphrase",
    };
    let o = wrong.cmd(&["export", "--decrypt", &file_arg]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("wrong passphrase"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // An export is never written over an existing file.
    assert!(!bob.cmd(&["export", "--to", &file_arg]).status.success());

    // Block: alice's next message is refused by the nodes (it fails on her side) and never
    // reaches bob; bob's other contacts are unaffected.
    let blocked = bob.ok(&["block", "alice"]);
    assert_eq!(blocked[0]["erased"], blocked[0]["replicas"], "{blocked:?}");
    assert_eq!(blocked[0]["replicas"], 3, "{blocked:?}");
    let c = bob.contacts();
    assert_eq!(names(&c, "blocked"), ["alice"]);
    assert!(!names(&c, "contacts").contains(&"alice".to_string()));
    let started = Instant::now();
    let (first, ok) = alice.send("bob", "after the block");
    assert_eq!(
        (first["state"].as_str().unwrap_or_default(), ok),
        ("failed", false),
        "a message to a blocked contact"
    );
    eprintln!(
        "block: alice's message failed after {:?}",
        started.elapsed()
    );
    dave.send_stored("bob", "dave after the block");
    let got = bob.recv_texts(&["dave after the block"]);
    assert!(!got.iter().any(|t| t == "after the block"), "{got:?}");
    // A new invitation from alice is refused; her answer to a new one of bob's too.
    let from_alice = alice.ok(&["invite", "--name", "bob-again"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    let o = bob.cmd(&["accept", &from_alice, "--name", "alice-again"]);
    assert!(
        !o.status.success(),
        "bob accepted a blocked identity's invitation"
    );
    let to_alice = bob.ok(&["invite", "--name", "friend"])[0]["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    alice.ok(&["accept", &to_alice, "--name", "bob-2"]);
    bob.recv_notice("blocked");
    let c = bob.contacts();
    let friend = c["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "friend")
        .unwrap();
    assert_eq!(friend["state"], "pending", "{c}");

    // Remove: the same for carol, without a block, and with one replica of her mailbox down:
    // the two others erase it at once, the third once it is back (bob's client tries again).
    let carols = {
        let c = Client::open(&bob.home, bob.pass.as_bytes()).unwrap();
        c.core().contact_mailbox("carol").unwrap()
    };
    devnet.kill("mailbox3").unwrap();
    let removed = bob.ok(&["remove", "carol"]);
    assert_eq!(
        (&removed[0]["erased"], &removed[0]["replicas"]),
        (&json!(2), &json!(3)),
        "{removed:?}"
    );
    let c = bob.contacts();
    assert!(!names(&c, "contacts").contains(&"carol".to_string()));
    assert!(names(&c, "blocked") == ["alice"]);
    assert_eq!(c["erasures_pending"], 1, "{c}");
    let (first, ok) = carol.send("bob", "after the removal");
    assert_eq!(
        (first["state"].as_str().unwrap_or_default(), ok),
        ("failed", false)
    );
    devnet.restart("mailbox3", false).unwrap();
    let deadline = Instant::now() + WAIT;
    while bob.contacts()["erasures_pending"] != 0 {
        assert!(Instant::now() < deadline, "the third replica never erased");
        bob.recv();
    }
    let net = Net::for_mailbox().unwrap();
    for r in &carols.replicas {
        match net.login((&carols, r)).await {
            Err(ClientError::Node { status: 401, .. }) => {}
            other => panic!("a replica still has carol's mailbox: {other:?}"),
        }
    }
    dave.send_stored("bob", "dave after the removal");
    let got = bob.recv_texts(&["dave after the removal"]);
    assert!(!got.iter().any(|t| t == "after the removal"), "{got:?}");

    // Erase: every mailbox of bob's, on every replica. First, the control: the owner keys
    // log in everywhere.
    let mailboxes = {
        let c = Client::open(&bob.home, bob.pass.as_bytes()).unwrap();
        c.core().owned_mailboxes()
    };
    assert_eq!(mailboxes.len(), 2, "dave's and the pending invitation's");
    for m in &mailboxes {
        for r in &m.replicas {
            net.login((m, r)).await.unwrap();
        }
    }
    assert!(!bob.cmd(&["erase"]).status.success(), "erase without --yes");
    let erased = bob.ok(&["erase", "--yes"]);
    assert_eq!(erased[0]["replicas"], 6, "{erased:?}");
    for m in &mailboxes {
        for r in &m.replicas {
            match net.login((m, r)).await {
                Err(ClientError::Node { status: 401, .. }) => {}
                other => panic!("a replica still has an erased mailbox: {other:?}"),
            }
        }
    }
    let o = bob.cmd(&["contacts"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("whispr init"));
    assert!(
        devnet.exited().is_empty(),
        "a node died: {:?}",
        devnet.exited()
    );
    devnet.stop();
}
