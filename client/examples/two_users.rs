//! Two users, Alice and Bob, on a local devnet of real node processes: Alice invites Bob, Bob
//! accepts, they exchange one message each through the mixnet, and both print the safety
//! number they share.
//!
//! The devnet starts the node binaries (`whispr-relay`, `whispr-mailbox`, `whispr-timer`),
//! which must be built first; they are looked for next to this example's executable and in its
//! parent directory (or in `$WHISPR_BIN_DIR`):
//!
//! ```sh
//! cargo build --workspace --bins && cargo run -p whispr-client --example two_users
//! ```
//!
//! Everything (devnet directory, both home directories) lives in temporary directories that
//! are removed at the end. It takes a few seconds.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use whispr_client::devnet::{Devnet, DevnetOptions, default_bin_dir};
use whispr_client::{Client, KdfParams, Notice, OutState, Received, SendOptions, Settings};

/// Longest wait for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Syncs `client` until it has received at least one message, and returns the new ones.
async fn receive(client: &mut Client, who: &str) -> anyhow::Result<Vec<Received>> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        client.sync(Duration::from_secs(1)).await?;
        print_notices(who, client.take_notices());
        let unread = client.take_unread();
        if !unread.is_empty() {
            // Sends the read receipts queued by `take_unread` and saves.
            client.flush().await?;
            return Ok(unread);
        }
        if Instant::now() > deadline {
            bail!("{who}: nothing arrived within {STEP_TIMEOUT:?}");
        }
    }
}

/// Syncs `client` until a notice of `kind` arrives.
async fn wait_notice(client: &mut Client, who: &str, kind: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        client.sync(Duration::from_secs(1)).await?;
        let notices = client.take_notices();
        let found = notices.iter().any(|n| n.kind == kind);
        print_notices(who, notices);
        if found {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{who}: no {kind} notice within {STEP_TIMEOUT:?}");
        }
    }
}

fn print_notices(who: &str, notices: Vec<Notice>) {
    for n in notices {
        println!("  {who}: * [{}] {}", n.kind, n.text);
    }
}

/// Sends `text` to `to` and waits until the contact's mailbox node acknowledged every fragment.
async fn send(client: &mut Client, who: &str, to: &str, text: &str) -> anyhow::Result<()> {
    let id = client.send(to, text, SendOptions::default()).await?;
    let state = client.wait_stored(id, STEP_TIMEOUT).await?;
    ensure!(
        state == OutState::Stored,
        "{who}: message {id} to {to} is {state:?}"
    );
    println!("{who} -> {to}: {text:?} (message {id}, stored in {to}'s mailbox)");
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    // Declared before the devnet and the clients, so dropped after them.
    let devnet_dir = tempfile::tempdir()?;
    let alice_home = tempfile::tempdir()?;
    let bob_home = tempfile::tempdir()?;

    let devnet = Devnet::up(DevnetOptions {
        dir: devnet_dir.path().to_path_buf(),
        relays: 3,
        mailboxes: 3,
        timers: 1,
        bin_dir: default_bin_dir(),
        relaxed_limits: false,
    })
    .await
    .context("starting the devnet (are the node binaries built?)")?;
    println!(
        "devnet up: {} nodes; directory {}",
        devnet.record().nodes.len(),
        devnet.directory_url()
    );

    // Both pin the devnet's directory authorities (its network file).
    let pinned = Settings {
        network: Some(std::fs::read_to_string(devnet.network_file())?),
        ..Settings::default()
    };
    // Each client holds its own home directory's lock; two homes, so both can be open at once.
    let mut alice = Client::init(
        alice_home.path(),
        b"alice's passphrase",
        devnet.directory_url(),
        pinned.clone(),
        KdfParams::default(),
    )?;
    let mut bob = Client::init(
        bob_home.path(),
        b"bob's passphrase",
        devnet.directory_url(),
        pinned,
        KdfParams::default(),
    )?;

    // Alice invites Bob (with a one-time key inline); the text goes to Bob out of band.
    let invitation = alice.invite(Some("bob"), true).await?;
    println!("alice's invitation: {invitation}");

    // Bob accepts: his mailbox for Alice, an Olm session, and the hello into Alice's mailbox.
    let hello = bob.accept(&invitation, "alice").await?;
    let state = bob.wait_stored(hello, STEP_TIMEOUT).await?;
    ensure!(state == OutState::Stored, "bob's hello is {state:?}");
    println!("bob accepted; his hello is in alice's mailbox");

    // Alice reads the hello: Bob is now a contact she can write to.
    wait_notice(&mut alice, "alice", "contact_established").await?;

    send(&mut alice, "alice", "bob", "Hi Bob! Mixnets are fun.").await?;
    for m in receive(&mut bob, "bob").await? {
        println!("bob received from {}: {:?}", m.from, m.text);
    }

    send(&mut bob, "bob", "alice", "Hi Alice, loud and clear.").await?;
    for m in receive(&mut alice, "alice").await? {
        println!("alice received from {}: {:?}", m.from, m.text);
    }

    // Both sides compute the same number from both identity keys; users compare them.
    let alice_number = alice.safety_number("bob")?;
    let bob_number = bob.safety_number("alice")?;
    println!("alice's safety number with bob: {alice_number}");
    println!("bob's safety number with alice: {bob_number}");
    ensure!(alice_number == bob_number, "the safety numbers differ");

    for (who, client) in [("alice", &alice), ("bob", &bob)] {
        for c in client.contacts() {
            println!("{who}'s contact {}: {}", c.name, c.state);
        }
    }
    drop(alice);
    drop(bob);
    drop(devnet);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
