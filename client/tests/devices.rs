//! Several devices per account through the `whispr` command over a devnet of real processes
//! (issue 18, `docs/clients.md`, *Several devices*):
//!
//! * bob links a second device (`link` on his primary, `init --link` on the new one, the
//!   short code typed on the primary); both list two devices, and alice's client learns it
//!   with nothing to do.
//! * alice sends 5 messages: both of bob's devices get all 5, each once.
//! * bob replies from device 2: alice gets it, and device 1 shows it in its history.
//! * bob schedules a message on device 2 and cancels it from device 1: alice never gets it.
//! * bob reads a message on device 1: alice gets one read receipt, device 2 shows it as read.
//! * device 2 removed: it can no longer fetch; alice's client drops it from bob's devices.
//! * the used code is refused; a wrong short code aborts linking.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr,
    missing_docs
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Instant;

use common::{User, WAIT, lines};
use serde_json::Value;
use whispr_client::devnet::{self, Devnet, DevnetOptions};

/// Links a new device `new` (named `name`) to `primary`'s account; `typed` is what the user
/// types on the primary (the new device's short code when `None`). Whether each side
/// succeeded, and the primary's and the new device's output.
fn link(
    primary: &User,
    new: &User,
    name: &str,
    init: &[&str],
    typed: Option<&str>,
) -> (bool, bool, String, String) {
    let mut p = primary
        .command(&["link", "--name", name, "--timeout", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(p.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let code: Value = serde_json::from_str(&first).unwrap_or_default();
    let code = code["code"].as_str().expect(&first).to_string();
    let mut args = init.to_vec();
    args.extend(["--link", &code, "--device-name", name, "--timeout", "30"]);
    let mut n = new
        .command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut new_out = BufReader::new(n.stdout.take().unwrap());
    let mut short = String::new();
    new_out.read_line(&mut short).unwrap();
    let short: Value = serde_json::from_str(&short).unwrap_or_default();
    let short = short["short_code"].as_str().unwrap_or_default().to_string();
    // The primary asks once the request came.
    let mut asked = String::new();
    out.read_line(&mut asked).unwrap();
    let mut stdin = p.stdin.take().unwrap();
    let _ = writeln!(stdin, "{}", typed.unwrap_or(&short));
    drop(stdin);
    let mut rest = String::new();
    for l in out.lines() {
        rest.push_str(&l.unwrap());
        rest.push('\n');
    }
    let mut new_rest = String::new();
    for l in new_out.lines() {
        new_rest.push_str(&l.unwrap());
        new_rest.push('\n');
    }
    let ps = p.wait_with_output().unwrap();
    let ns = n.wait_with_output().unwrap();
    (
        ps.status.success(),
        ns.status.success(),
        format!(
            "{first}{asked}{rest}{}",
            String::from_utf8_lossy(&ps.stderr)
        ),
        format!("{new_rest}{}", String::from_utf8_lossy(&ns.stderr)),
    )
}

fn devices(u: &User) -> Vec<String> {
    u.ok(&["devices"])[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

/// How many devices `u`'s client knows `contact` has.
fn their_devices(u: &User, contact: &str) -> u64 {
    u.ok(&["contacts"])[0]["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == contact)
        .map(|c| c["devices"].as_u64().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_stay_in_sync_and_one_is_revoked() {
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
    let (alice, bob, phone) = (
        user("alice", "pass-a"),
        user("bob", "pass-b"),
        user("bob-phone", "pass-b2"),
    );
    // Receipts leave within a second or two.
    let init = ["init", "--directory", &url, "--network", &network];
    alice.ok(&init);
    bob.ok(&[&init[..], &["--device-name", "laptop"]].concat());
    alice.befriend("alice", &bob, "bob");

    // Linking: the short code typed on the primary.
    let (ok_p, ok_n, p_out, n_out) = link(&bob, &phone, "phone", &init, None);
    assert!(ok_p && ok_n, "primary:\n{p_out}\nnew device:\n{n_out}");
    let used_code = serde_json::from_str::<Value>(p_out.lines().next().unwrap()).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(devices(&bob), ["laptop", "phone"]);
    assert_eq!(devices(&phone), ["laptop", "phone"]);
    // Safety numbers are per account: the same on both devices.
    let safety = |u: &User| u.ok(&["safety", "alice"])[0]["safety_number"].clone();
    assert_eq!(safety(&bob), safety(&phone));
    // alice's client learns bob's second device by itself.
    let deadline = Instant::now() + WAIT;
    while their_devices(&alice, "bob") != 2 {
        alice.recv();
        assert!(Instant::now() < deadline, "alice never learnt bob's phone");
    }

    // Five messages: both devices get each once.
    let texts: Vec<String> = (1..=5).map(|i| format!("message {i} from alice")).collect();
    let want: Vec<&str> = texts.iter().map(String::as_str).collect();
    for t in &want {
        alice.send_stored("bob", t);
    }
    for device in [&bob, &phone] {
        let mut got = device.recv_texts(&want);
        // Nothing more comes.
        got.extend(device.recv().0.iter().map(|m| m["text"].to_string()));
        for t in &want {
            assert_eq!(
                got.iter().filter(|g| g == t).count(),
                1,
                "{t} on {}: {got:?}",
                device.home.display()
            );
        }
    }

    // A reply from the phone: alice gets it, the laptop shows it in its history.
    phone.send_stored("alice", "reply from bob's phone");
    alice.recv_texts(&["reply from bob's phone"]);
    let deadline = Instant::now() + WAIT;
    loop {
        bob.recv();
        let history = bob.ok(&["history", "alice"]);
        let mine: Vec<&Value> = history[0]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["text"] == "reply from bob's phone")
            .collect();
        if let Some(m) = mine.first() {
            assert_eq!(m["outgoing"], true, "{m}");
            assert_eq!(mine.len(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "the laptop never saw the reply");
    }

    // Scheduled on the phone, cancelled from the laptop: alice never gets it.
    let held = phone.ok(&["send", "alice", "scheduled on the phone", "--in", "20s"]);
    assert_eq!(held[0]["state"], "held", "{held:?}");
    let phone_id = held[0]["id"].as_u64().unwrap();
    let release = Instant::now() + std::time::Duration::from_secs(20);
    let deadline = Instant::now() + WAIT;
    let laptop_id = loop {
        bob.recv();
        let status = bob.ok(&["status"]);
        if let Some(o) = status[0]["outgoing"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["state"] == "held" && o["contact"] == "alice")
        {
            break o["id"].as_u64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the laptop never learnt of the scheduled send"
        );
    };
    bob.ok(&["cancel", &laptop_id.to_string()]);
    let deadline = Instant::now() + WAIT;
    loop {
        phone.recv();
        let status = phone.ok(&["status"]);
        let state = status[0]["outgoing"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["id"] == phone_id)
            .map(|o| o["state"].clone());
        if state.as_ref().is_some_and(|s| s == "cancelled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the phone never learnt of the cancel: {state:?}"
        );
    }
    // Until the release time has passed (plus a margin), every message alice receives is
    // checked for the cancelled send; the read-receipt steps below run meanwhile.
    let not_cancelled = |m: &[serde_json::Value]| {
        assert!(
            m.iter().all(|m| m["text"] != "scheduled on the phone"),
            "a send cancelled from the other device arrived"
        );
    };

    // Read on the laptop: one read receipt at alice; the phone shows it as read.
    let id = alice.send_stored("bob", "read me on the laptop");
    bob.recv_texts(&["read me on the laptop"]);
    let deadline = Instant::now() + WAIT;
    let mut reads = 0;
    while reads == 0 {
        // Receipts leave after a random delay, from a running client.
        bob.recv();
        let (m, notices) = alice.recv();
        not_cancelled(&m);
        reads += notices
            .iter()
            .filter(|n| n["kind"] == "read" && n["id"] == id)
            .count();
        assert!(Instant::now() < deadline, "no read receipt");
    }
    // The phone catches up: it shows the message as read elsewhere (and sends no receipt).
    let deadline = Instant::now() + WAIT;
    loop {
        let (m, _) = phone.recv();
        if let Some(m) = m.iter().find(|m| m["text"] == "read me on the laptop") {
            assert_eq!(m["read_elsewhere"], true, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "the phone never got it");
    }
    for _ in 0..3 {
        let (m, notices) = alice.recv();
        not_cancelled(&m);
        reads += notices
            .iter()
            .filter(|n| n["kind"] == "read" && n["id"] == id)
            .count();
    }
    assert_eq!(reads, 1, "one read receipt");
    while Instant::now() < release + std::time::Duration::from_secs(5) {
        let (m, _) = alice.recv();
        not_cancelled(&m);
    }
    // Also what alice's client took in while it was sending.
    let history = alice.ok(&["history", "bob"]);
    not_cancelled(history[0]["messages"].as_array().unwrap());

    // Removal: the phone can no longer fetch; alice's client drops it.
    bob.ok(&["devices", "remove", "phone"]);
    assert_eq!(devices(&bob), ["laptop"]);
    let o = phone.cmd(&["recv", "--wait", "1"]);
    assert!(
        !o.status.success(),
        "the removed phone still fetches: {:?}",
        lines(&o)
    );
    let deadline = Instant::now() + WAIT;
    while their_devices(&alice, "bob") != 1 {
        alice.recv();
        assert!(
            Instant::now() < deadline,
            "alice still encrypts for the phone"
        );
    }
    alice.send_stored("bob", "after the phone left");
    bob.recv_texts(&["after the phone left"]);
    let o = phone.cmd(&["history", "alice"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("after the phone left"),
        "the removed phone read a later message"
    );

    // The used code cannot link another device; a wrong short code aborts linking.
    let thief = user("thief", "pass-t");
    let o = thief.cmd(
        &[
            &init[..],
            &[
                "--link",
                &used_code,
                "--device-name",
                "thief",
                "--timeout",
                "60",
            ],
        ]
        .concat(),
    );
    assert!(!o.status.success(), "a used code linked a device");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("did not arrive"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let tablet = user("bob-tablet", "pass-b3");
    let (ok_p, ok_n, p_out, n_out) = link(&bob, &tablet, "tablet", &init, Some("000-000"));
    assert!(
        !ok_p && !ok_n,
        "a wrong short code linked:\nprimary:\n{p_out}\nnew device:\n{n_out}"
    );
    assert!(p_out.contains("differ"), "{p_out}");
    assert_eq!(devices(&bob), ["laptop"]);

    devnet.stop();
}
