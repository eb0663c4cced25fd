//! `whispr`: the Whispr Mesh command-line client, and `whispr devnet` to run a local network.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use rand::RngExt;
use serde_json::{Value, json};
use whispr_client::devnet::{self, Devnet, DevnetOptions};
use whispr_client::{
    Client, ClientError, KdfParams, Notice, OutKind, OutState, Receipts, Received, SendOptions,
    Settings, now_ms,
};

#[derive(Parser)]
#[command(
    name = "whispr",
    version,
    about = "Whispr Mesh: private messages over a mixnet"
)]
struct Cli {
    /// The client's home directory (keys, contacts, state; encrypted at rest).
    /// (Default: $WHISPR_HOME, else ~/.whispr.)
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    /// Machine-readable output: one JSON object per result.
    #[arg(long, global = true)]
    json: bool,
    /// File holding the passphrase (otherwise the WHISPR_PASSPHRASE environment variable).
    #[arg(long, global = true)]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates a client: identity keys, encrypted home directory.
    Init {
        /// The directory URL (an edge relay's `/v1/directory`).
        #[arg(long)]
        directory: String,
        /// Mean mixing delay per hop in ms (0 turns mixing off). Default: the network file's
        /// `mixing` line, else 200. A value unlike other clients' makes this one stand out.
        #[arg(long)]
        mix_delay_ms: Option<u64>,
        /// Receipts to send: read, delivery or none.
        #[arg(long)]
        receipts: Option<String>,
        /// A fragment not acknowledged within this many ms is sent again on a fresh route.
        #[arg(long)]
        retransmit_after_ms: Option<u64>,
        /// Cover traffic while `recv --follow` runs, packets per minute (Poisson). Default:
        /// the network file's `mixing` line, else 2.
        #[arg(long)]
        cover_per_min: Option<f64>,
        /// The network file pinning the directory authorities (`whispr devnet up` writes one;
        /// required): a directory is accepted only with the threshold of their signatures,
        /// and `--directory` is a mere mirror.
        #[arg(long, required = true)]
        network: Option<std::path::PathBuf>,
        /// Joins an existing account as a linked device: the code `whispr link` printed on
        /// its primary. Prints a short code to type there, then waits for the account.
        #[arg(long)]
        link: Option<String>,
        /// This device's name (default: "primary", or with --link, "device").
        #[arg(long)]
        device_name: Option<String>,
        /// With --link: longest wait for the account, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Links a new device to this account (on the primary): prints a one-time code for
    /// `whispr init --link CODE` on the new device, then asks for the short code the new
    /// device shows (from standard input, or --confirm).
    Link {
        /// The new device's name.
        #[arg(long)]
        name: String,
        /// The short code the new device shows (otherwise it is read from standard input).
        #[arg(long)]
        confirm: Option<String>,
        /// Longest wait for each step, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Lists the account's devices; `devices remove NAME` revokes one (on the primary).
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Creates a mailbox for a new contact and prints the invitation to give them.
    Invite {
        /// The name the contact will have here.
        #[arg(long)]
        name: Option<String>,
        /// A shorter invitation without a one-time key: the contact fetches one through the
        /// mesh.
        #[arg(long)]
        short: bool,
    },
    /// Accepts an invitation.
    Accept {
        /// The invitation text (`WHISPR1:…`).
        invitation: String,
        /// The name the inviter will have here.
        #[arg(long)]
        name: String,
        /// Longest wait for the hello's ack, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Sends a message (TEXT `-` reads it from standard input).
    Send {
        /// Contact name.
        name: String,
        /// The text.
        text: String,
        /// Release time (RFC 3339, e.g. 2026-11-21T18:00:00Z): a timer node holds it till then.
        #[arg(long, conflicts_with = "in_")]
        at: Option<String>,
        /// Release after this long (e.g. 30s, 5m, 2h).
        #[arg(long = "in", id = "in_")]
        in_: Option<String>,
        /// Disappearing message: gone from the mailbox and the recipient's history after this
        /// long (e.g. 10s, 1h).
        #[arg(long)]
        expire_after: Option<String>,
        /// Return once handed to the mesh, without waiting for the mailbox's ack.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the acks, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Fetches, decrypts and shows new messages and notices.
    Recv {
        /// Keep receiving until interrupted.
        #[arg(long)]
        follow: bool,
        /// Long-poll wait in seconds.
        #[arg(long)]
        wait: Option<u64>,
        /// With --follow: have the mailbox nodes push messages over WebSocket streams instead
        /// of long-polling (`wss://` for nodes served over HTTPS, `ws://` for plain-HTTP ones).
        #[arg(long, requires = "follow")]
        stream: bool,
    },
    /// Cancels a scheduled send before its release.
    Cancel {
        /// Its id (from `send` or `status`).
        id: u64,
    },
    /// Lists contacts.
    Contacts,
    /// Shows the safety number shared with a contact.
    Safety {
        /// Contact name.
        name: String,
        /// Records that you compared it with the contact and it matched.
        #[arg(long)]
        verified: bool,
    },
    /// Pending acks, scheduled sends and recent outgoing messages.
    Status,
    /// The directory the client routes by: how many authorities signed it, its epoch and
    /// node count (fetched now if the one held is old).
    Directory,
    /// The messages received from a contact (disappearing ones vanish at their time).
    History {
        /// Contact name.
        name: String,
    },
    /// Removes a contact: the mailbox it writes to is erased on every replica (its later
    /// messages are refused), and it is forgotten. Also withdraws a pending invitation.
    Remove {
        /// Contact name.
        name: String,
    },
    /// Blocks a contact: removes it as `remove` does, and refuses any later invitation or
    /// answer from its identity.
    Block {
        /// Contact name.
        name: String,
    },
    /// Lifts a block (`block`): invitations from that identity are accepted again.
    Unblock {
        /// The name the blocked contact had.
        name: String,
    },
    /// Erases the account: every mailbox on every replica (crypto-erasure on the nodes),
    /// then the home's state. Cannot be undone.
    Erase {
        /// Confirms the erasure.
        #[arg(long)]
        yes: bool,
    },
    /// Writes your history and contacts to FILE, encrypted with your passphrase; or, with
    /// --decrypt, prints the JSON inside an export.
    Export {
        /// The file to write (it must not exist).
        #[arg(long, required_unless_present = "decrypt", conflicts_with = "decrypt")]
        to: Option<PathBuf>,
        /// An export to decrypt (with the passphrase it was made with); needs no client.
        #[arg(long)]
        decrypt: Option<PathBuf>,
    },
    /// A local network of real node processes.
    Devnet {
        #[command(subcommand)]
        command: DevnetCommand,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Revokes a linked device: it can no longer log in to any mailbox of the account, and
    /// contacts stop encrypting for it.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum DevnetCommand {
    /// Starts relays, mailbox and timer nodes on loopback; stops them on Ctrl-C or `down`.
    Up {
        /// Devnet directory (configs, data, logs, `directory-url`).
        #[arg(long)]
        dir: PathBuf,
        /// Relays: the first is the edge, the others mixes.
        #[arg(long, default_value_t = 3)]
        relays: usize,
        /// Mailbox nodes.
        #[arg(long, default_value_t = 3)]
        mailboxes: usize,
        /// Timer nodes.
        #[arg(long, default_value_t = 1)]
        timers: usize,
        /// Raise rate limits far above the policy's (load benchmarks only).
        #[arg(long)]
        relaxed_limits: bool,
    },
    /// Stops the devnet running in DIR.
    Down {
        /// Devnet directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Kills one node with SIGKILL (to watch the network route around it).
    Kill {
        /// Devnet directory.
        #[arg(long)]
        dir: PathBuf,
        /// Node name (edge, mix1, mailbox2, timer1, …).
        node: String,
    },
}

fn home(cli: &Cli) -> PathBuf {
    cli.home.clone().unwrap_or_else(|| {
        if let Some(h) = std::env::var_os("WHISPR_HOME") {
            return PathBuf::from(h);
        }
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".whispr")
    })
}

fn passphrase(cli: &Cli) -> Result<Vec<u8>, ClientError> {
    if let Some(f) = &cli.passphrase_file {
        let text = std::fs::read_to_string(f).map_err(|source| ClientError::Io {
            what: "reading the passphrase file",
            source,
        })?;
        return Ok(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec());
    }
    match std::env::var("WHISPR_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(p.into_bytes()),
        _ => Err(ClientError::InvalidArgument(
            "no passphrase: set WHISPR_PASSPHRASE or pass --passphrase-file".to_string(),
        )),
    }
}

fn parse_duration(what: &str, s: &str) -> Result<Duration, ClientError> {
    humantime::parse_duration(s)
        .map_err(|e| ClientError::InvalidArgument(format!("{what}: {e} (e.g. 30s, 5m, 2h)")))
}

fn time_text(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_received(json_out: bool, r: &Received) {
    if json_out {
        println!(
            "{}",
            json!({"type": "message", "from": r.from, "text": r.text, "sent_ms": r.sent_ms,
                   "received_ms": r.received_ms, "expires_ms": r.expires_ms,
                   "outgoing": r.outgoing, "read_elsewhere": r.read_elsewhere})
        );
    } else {
        let expiry = r
            .expires_ms
            .map(|e| format!("  (disappears at {})", time_text(e)))
            .unwrap_or_default();
        if r.outgoing {
            println!(
                "[{}] you → {}: {}{expiry}",
                time_text(r.sent_ms),
                r.from,
                r.text
            );
        } else {
            println!("[{}] {}: {}{expiry}", time_text(r.sent_ms), r.from, r.text);
        }
    }
}

fn print_notice(json_out: bool, n: &Notice) {
    if json_out {
        println!(
            "{}",
            json!({"type": "notice", "kind": n.kind, "contact": n.contact, "id": n.id,
                   "text": n.text, "at_ms": n.at_ms})
        );
    } else {
        println!("  * {}", n.text);
    }
}

fn out(json_out: bool, v: Value, text: String) {
    if json_out {
        println!("{v}");
    } else {
        println!("{text}");
    }
}

fn state_name(s: OutState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn recv(cli: &Cli, follow: bool, wait: Option<u64>) -> Result<(), ClientError> {
    let pass = passphrase(cli)?;
    let mut client = Client::open(&home(cli), &pass)?;
    let vault = client.vault().clone();
    let cover = client.settings().cover_per_min;
    let wait = Duration::from_secs(wait.unwrap_or(if follow { 2 } else { 1 }));
    let mut next_cover_at = None;
    let mut stop_signals = StopSignals::new()?;
    loop {
        client.sync(wait).await?;
        // A one-shot receive also takes the polls still running when the round ended (a
        // round ends as soon as one mailbox has something): at most two more rounds, as
        // each poll ends within its wait.
        for _ in 0..2 {
            if follow || !client.polls_in_flight() {
                break;
            }
            client.sync(wait).await?;
        }
        for r in client.take_unread() {
            print_received(cli.json, &r);
        }
        for n in client.take_notices() {
            print_notice(cli.json, &n);
        }
        client.flush().await?;
        if !follow {
            return Ok(());
        }
        if cover > 0.0 {
            let now = now_ms();
            let due = *next_cover_at.get_or_insert_with(|| next_cover(now, cover));
            if now >= due {
                let _ = client.send_cover().await;
                next_cover_at = Some(next_cover(now, cover));
            }
        }
        // Release the home directory between rounds so that other commands can run.
        drop(client);
        let stop = tokio::select! {
            () = stop_signals.recv() => true,
            () = tokio::time::sleep(Duration::from_millis(100)) => false,
        };
        if stop {
            return Ok(());
        }
        client = Client::reopen(&vault)?;
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, listened to from the start: a signal that arrives while the
/// loop is busy is kept until the loop next waits (a fresh `ctrl_c()` per wait would miss it).
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals, ClientError> {
        use tokio::signal::unix::{SignalKind, signal};
        let io = |source| ClientError::Io {
            what: "installing signal handlers",
            source,
        };
        Ok(StopSignals {
            int: signal(SignalKind::interrupt()).map_err(io)?,
            term: signal(SignalKind::terminate()).map_err(io)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Cover traffic: the next send time of a Poisson process of `per_min` packets a minute.
fn next_cover(from: u64, per_min: f64) -> u64 {
    let u: f64 = rand::rng().random_range(f64::MIN_POSITIVE..1.0);
    from + (-u.ln() * 60_000.0 / per_min) as u64
}

/// `recv --follow --stream`: one WebSocket stream per mailbox; pushed messages are processed
/// as they come, housekeeping (retransmissions, receipts, cover) runs every second, and the
/// streams are reopened when they end or when mailboxes are added.
async fn recv_stream(cli: &Cli) -> Result<(), ClientError> {
    let pass = passphrase(cli)?;
    let mut client = Client::open(&home(cli), &pass)?;
    let vault = client.vault().clone();
    let cover = client.settings().cover_per_min;
    // Whatever is already stored is fetched once by polling.
    client.sync(Duration::ZERO).await?;
    for r in client.take_unread() {
        print_received(cli.json, &r);
    }
    for n in client.take_notices() {
        print_notice(cli.json, &n);
    }
    client.flush().await?;
    drop(client);
    let mut stop_signals = StopSignals::new()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let mut streams: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
        Default::default();
    let mut next = if cover > 0.0 {
        Some(next_cover(now_ms(), cover))
    } else {
        None
    };
    loop {
        // (Re)open a stream for every mailbox that has none running.
        streams.retain(|_, h| !h.is_finished());
        let running: Vec<String> = streams.keys().cloned().collect();
        let mut client = Client::reopen(&vault)?;
        if client.mailbox_ids().iter().any(|m| !running.contains(m)) {
            let endpoints = client.stream_endpoints(&running).await?;
            // Each stream reads one replica of its mailbox; its tag names both, so that what
            // it pushes is acknowledged there (a stream that ends is reopened, on the next
            // replica if this one no longer answers).
            for (tag, url) in endpoints {
                let mailbox = tag.split('/').next().unwrap_or_default().to_string();
                if streams.contains_key(&mailbox) {
                    continue;
                }
                let tx = tx.clone();
                streams.insert(
                    mailbox,
                    tokio::spawn(async move {
                        let _ = whispr_client::net::run_stream(url, tag, tx).await;
                    }),
                );
            }
        }
        drop(client);
        let mut pushed = Vec::new();
        let stop = tokio::select! {
            () = stop_signals.recv() => true,
            got = rx.recv() => {
                if let Some(x) = got {
                    pushed.push(x);
                    while let Ok(x) = rx.try_recv() {
                        pushed.push(x);
                    }
                }
                false
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        if stop {
            for h in streams.values() {
                h.abort();
            }
            return Ok(());
        }
        let mut client = Client::reopen(&vault)?;
        if pushed.is_empty() {
            client.tick().await?;
        } else {
            client.ingest(pushed).await?;
        }
        if let Some(due) = next
            && now_ms() >= due
        {
            let _ = client.send_cover().await;
            next = Some(next_cover(now_ms(), cover));
        }
        for r in client.take_unread() {
            print_received(cli.json, &r);
        }
        for n in client.take_notices() {
            print_notice(cli.json, &n);
        }
        client.flush().await?;
    }
}

async fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    let j = cli.json;
    match &cli.command {
        Command::Init {
            directory,
            mix_delay_ms,
            receipts,
            retransmit_after_ms,
            cover_per_min,
            network,
            link,
            device_name,
            timeout,
        } => {
            let mut settings = Settings::default();
            if let Some(path) = network {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ClientError::InvalidArgument(format!("--network {}: {e}", path.display()))
                })?;
                let pinned = whispr_protocol::consensus::Network::parse(&text)?;
                if let Some(r) = pinned.replicas() {
                    settings.replicas = r;
                }
                // Every client of a network mixes alike: its file's parameters, unless the
                // user overrides them below.
                if let Some(m) = pinned.mixing() {
                    settings.mix_delay_ms = m.delay_ms;
                    settings.cover_per_min = m.cover_per_min();
                }
                settings.network = Some(text);
            }
            if let Some(d) = mix_delay_ms {
                settings.mix_delay_ms = *d;
            }
            if let Some(r) = retransmit_after_ms {
                settings.retransmit_after_ms = *r;
            }
            if let Some(c) = cover_per_min {
                settings.cover_per_min = c.max(0.0);
            }
            if let Some(r) = receipts {
                settings.receipts = match r.as_str() {
                    "read" => Receipts::Read,
                    "delivery" => Receipts::Delivery,
                    "none" => Receipts::None,
                    _ => {
                        return Err(ClientError::InvalidArgument(
                            "--receipts takes read, delivery or none".to_string(),
                        ));
                    }
                };
            }
            let pass = passphrase(&cli)?;
            let mut client = Client::init(
                &home(&cli),
                &pass,
                directory,
                settings,
                KdfParams::default(),
            )?;
            let default_name = if link.is_some() { "device" } else { "primary" };
            client.set_device_name(device_name.as_deref().unwrap_or(default_name))?;
            if let Some(code) = link {
                let joined = async {
                    let short = client.link_request(code).await?;
                    out(
                        j,
                        json!({"type": "short_code", "short_code": short}),
                        format!("type this code on your primary device: {short}"),
                    );
                    client.wait_linked(Duration::from_secs(*timeout)).await
                }
                .await;
                if let Err(e) = joined {
                    // Nothing of the account is here: the home is removed, so that init can
                    // be run again.
                    drop(client);
                    let _ = std::fs::remove_dir_all(home(&cli));
                    return Err(e);
                }
                let devices = client.devices();
                out(
                    j,
                    json!({"type": "linked", "home": home(&cli), "devices": devices,
                           "contacts": client.contacts()}),
                    format!(
                        "this device joined the account ({} devices, {} contacts)",
                        devices.len(),
                        client.contacts().len()
                    ),
                );
                return Ok(ExitCode::SUCCESS);
            }
            let (ed, curve) = client.identity_keys();
            out(
                j,
                json!({"home": home(&cli), "identity_key": ed, "olm_identity_key": curve}),
                format!("client created in {}", home(&cli).display()),
            );
        }
        Command::Link {
            name,
            confirm,
            timeout,
        } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            let code = client.link(name).await?;
            out(
                j,
                json!({"type": "code", "code": code}),
                format!("on the new device, run: whispr init --link {code} ..."),
            );
            let wait = Duration::from_secs(*timeout);
            let short = client.link_wait_request(wait).await?;
            let typed = match confirm {
                Some(c) => c.clone(),
                None => {
                    out(
                        j,
                        json!({"type": "request"}),
                        "a device asks to join: type the code it shows".to_string(),
                    );
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .map_err(|source| ClientError::Io {
                            what: "reading the code",
                            source,
                        })?;
                    line
                }
            };
            drop(short);
            client.link_confirm(&typed).await?;
            let done = client.link_wait_done(wait).await?;
            // This command told the user what those notices say.
            client
                .take_notices()
                .retain(|n| !matches!(n.kind.as_str(), "link_request" | "device_linked"));
            client.save()?;
            out(
                j,
                json!({"type": "linked", "device": name, "confirmed": done}),
                if done {
                    format!("{name} is linked")
                } else {
                    format!("{name} was sent the account; it has not confirmed yet")
                },
            );
        }
        Command::Devices { command } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            if let Some(DevicesCommand::Remove { name }) = command {
                client.remove_device(name).await?;
                out(
                    j,
                    json!({"removed": name}),
                    format!("{name} removed: it can no longer log in or read new messages"),
                );
            } else {
                let list = client.devices();
                if j {
                    println!("{}", json!({"devices": list}));
                } else {
                    for d in &list {
                        println!(
                            "{}{}{}",
                            d.name,
                            if d.primary { " (primary)" } else { "" },
                            if d.this { " (this device)" } else { "" }
                        );
                    }
                }
            }
        }
        Command::Invite { name, short } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            let text = client.invite(name.as_deref(), !short).await?;
            out(j, json!({"invitation": text}), text.clone());
        }
        Command::Accept {
            invitation,
            name,
            timeout,
        } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            let id = client.accept(invitation, name).await?;
            let state = client
                .wait_stored(id, Duration::from_secs(*timeout))
                .await?;
            out(
                j,
                json!({"contact": name, "hello": state_name(state)}),
                format!("{name} added; hello {}", state_name(state)),
            );
            if state != OutState::Stored && state != OutState::Delivered && state != OutState::Read
            {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Send {
            name,
            text,
            at,
            in_,
            expire_after,
            no_wait,
            timeout,
        } => {
            let pass = passphrase(&cli)?;
            let body = if text == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .map_err(|source| ClientError::Io {
                        what: "reading standard input",
                        source,
                    })?;
                s
            } else {
                text.clone()
            };
            let at_ms = match (at, in_) {
                (Some(t), _) => Some(
                    humantime::parse_rfc3339_weak(t)
                        .map_err(|e| ClientError::InvalidArgument(format!("--at: {e}")))?
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                        .map_err(|_| {
                            ClientError::InvalidArgument("--at: before 1970".to_string())
                        })?,
                ),
                (None, Some(d)) => Some(
                    now_ms()
                        + u64::try_from(parse_duration("--in", d)?.as_millis()).unwrap_or(u64::MAX),
                ),
                _ => None,
            };
            let expire_after = expire_after
                .as_deref()
                .map(|d| parse_duration("--expire-after", d))
                .transpose()?;
            let mut client = Client::open(&home(&cli), &pass)?;
            let id = client
                .send(
                    name,
                    &body,
                    SendOptions {
                        at_ms,
                        expire_after,
                    },
                )
                .await?;
            let state = if *no_wait {
                None
            } else {
                Some(
                    client
                        .wait_stored(id, Duration::from_secs(*timeout))
                        .await?,
                )
            };
            let info = client.status().into_iter().find(|o| o.id == id);
            let fragments = info.as_ref().map_or(0, |o| o.fragments);
            let retrans = info.as_ref().map_or(0, |o| o.retransmissions);
            for n in client.take_notices() {
                if n.kind == "failed" && !j {
                    print_notice(j, &n);
                }
            }
            client.save()?;
            let state_text = state
                .map(state_name)
                .unwrap_or_else(|| "sending".to_string());
            let what = if state == Some(OutState::Held) {
                "held by a timer node".to_string()
            } else {
                state_text.clone()
            };
            out(
                j,
                json!({"id": id, "state": state_text, "fragments": fragments,
                       "retransmissions": retrans, "release_ms": at_ms}),
                format!(
                    "message {id} ({fragments} fragment(s), {retrans} retransmission(s)): {what}"
                ),
            );
            if state == Some(OutState::Failed) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Recv {
            follow,
            wait,
            stream,
        } => {
            if *stream {
                recv_stream(&cli).await?;
            } else {
                recv(&cli, *follow, *wait).await?;
            }
        }
        Command::Cancel { id } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            client.cancel(*id).await?;
            let state = client.wait_stored(*id, Duration::from_secs(60)).await?;
            out(
                j,
                json!({"id": id, "state": state_name(state)}),
                format!("message {id}: {}", state_name(state)),
            );
            if state != OutState::Cancelled {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Contacts => {
            let pass = passphrase(&cli)?;
            let client = Client::open(&home(&cli), &pass)?;
            let list = client.contacts();
            let blocked = client.blocked();
            let pending = client.erasures_pending();
            let text = list
                .iter()
                .map(|c| {
                    format!(
                        "{}  {}{}",
                        c.name,
                        c.state,
                        if c.verified { "  verified" } else { "" }
                    )
                })
                .chain(blocked.iter().map(|b| format!("{}  blocked", b.name)))
                .chain((pending > 0).then(|| {
                    format!(
                        "({pending} replica(s) of removed contacts' mailboxes still to erase: \
                         retried at every `recv`)"
                    )
                }))
                .collect::<Vec<_>>()
                .join("\n");
            out(
                j,
                json!({"contacts": list, "blocked": blocked, "erasures_pending": pending}),
                text,
            );
        }
        Command::Safety { name, verified } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            if *verified {
                client.set_verified(name)?;
            }
            let number = client.safety_number(name)?;
            out(
                j,
                json!({"contact": name, "safety_number": number}),
                format!(
                    "safety number with {name}:\n{number}\nCompare it with {name}'s, in person or over a trusted channel."
                ),
            );
        }
        Command::Directory => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            let (nodes, consensus) = client.directory_summary().await?;
            let text = match &consensus {
                Some(c) => format!(
                    "directory signed by {}/{} authorities (consensus epoch {}, {nodes} nodes)",
                    c.signers, c.authorities, c.epoch
                ),
                None => format!(
                    "directory not signed by authorities (no network pinned): {nodes} nodes"
                ),
            };
            out(
                j,
                json!({
                    "nodes": nodes,
                    "signers": consensus.map(|c| c.signers),
                    "authorities": consensus.map(|c| c.authorities),
                    "epoch": consensus.map(|c| c.epoch),
                }),
                text,
            );
        }
        Command::Status => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            // Take in the acks that arrived since the last command (no waiting).
            client.sync(Duration::ZERO).await?;
            let list: Vec<_> = client
                .status()
                .into_iter()
                .filter(|o| {
                    o.kind != OutKind::Receipt
                        || matches!(o.state, OutState::Sending | OutState::Failed)
                })
                .collect();
            let text = list
                .iter()
                .map(|o| {
                    let release = o
                        .release_ms
                        .map(|r| format!(", release {}", time_text(r)))
                        .unwrap_or_default();
                    format!(
                        "{:>4}  to {}  {:?}  {}  {}/{} acked, {} retransmission(s){release}",
                        o.id,
                        o.contact,
                        o.kind,
                        state_name(o.state),
                        o.fragments_acked,
                        o.fragments,
                        o.retransmissions
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            out(j, json!({"outgoing": list}), text);
        }
        Command::History { name } => {
            let pass = passphrase(&cli)?;
            let client = Client::open(&home(&cli), &pass)?;
            let list = client.history(name);
            if j {
                println!("{}", json!({"messages": list}));
            } else {
                for r in &list {
                    print_received(false, r);
                }
            }
        }
        Command::Remove { name } | Command::Block { name } => {
            let block = matches!(cli.command, Command::Block { .. });
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            let r = client.remove_contact(name, block).await?;
            let what = if block { "blocked" } else { "removed" };
            let pending = if r.erased < r.replicas {
                "; the others are tried again at every `recv`"
            } else {
                ""
            };
            out(
                j,
                json!({"contact": name, "blocked": block, "replicas": r.replicas,
                       "erased": r.erased}),
                format!(
                    "{name} {what}: its mailbox erased on {}/{} replica(s){pending}",
                    r.erased, r.replicas
                ),
            );
            if r.erased == 0 {
                // No replica confirmed: the contact can still deposit until one does.
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Unblock { name } => {
            let pass = passphrase(&cli)?;
            let mut client = Client::open(&home(&cli), &pass)?;
            client.unblock(name)?;
            out(
                j,
                json!({"contact": name, "blocked": false}),
                format!("{name} unblocked"),
            );
        }
        Command::Erase { yes } => {
            if !yes {
                return Err(ClientError::InvalidArgument(
                    "`whispr erase` erases every mailbox of this client on every node and then                      the client itself; it cannot be undone: pass --yes"
                        .to_string(),
                ));
            }
            let pass = passphrase(&cli)?;
            let client = Client::open(&home(&cli), &pass)?;
            let e = client.erase_account().await?;
            out(
                j,
                json!({"erased": true, "mailboxes": e.mailboxes, "replicas": e.replicas}),
                format!(
                    "erased: {} mailbox(es) on {} replica(s), and the client in {}",
                    e.mailboxes,
                    e.replicas,
                    home(&cli).display()
                ),
            );
        }
        Command::Export { to, decrypt } => {
            let pass = passphrase(&cli)?;
            if let Some(path) = decrypt {
                let bytes = std::fs::read(path).map_err(|source| ClientError::Io {
                    what: "reading the export",
                    source,
                })?;
                let plain = whispr_client::vault::open_export(&pass, &bytes)?;
                let doc: Value = serde_json::from_slice(&plain).map_err(|_| {
                    ClientError::InvalidArgument("the export holds no JSON document".to_string())
                })?;
                // The document itself, with or without --json.
                println!("{doc}");
            } else if let Some(path) = to {
                let client = Client::open(&home(&cli), &pass)?;
                let doc = client.export();
                let plain =
                    zeroize::Zeroizing::new(serde_json::to_vec(&doc).map_err(|e| {
                        ClientError::CorruptState(format!("encoding the export: {e}"))
                    })?);
                let sealed =
                    whispr_client::vault::seal_export(&pass, KdfParams::default(), &plain)?;
                write_new(path, &sealed)?;
                let count = |k: &str| doc.get(k).and_then(Value::as_array).map_or(0, Vec::len);
                out(
                    j,
                    json!({"file": path, "contacts": count("contacts"),
                           "messages": count("history")}),
                    format!(
                        "exported {} contact(s) and {} message(s) to {} (encrypted with your passphrase; `whispr export --decrypt {}` reads it)",
                        count("contacts"),
                        count("history"),
                        path.display(),
                        path.display()
                    ),
                );
            }
        }
        Command::Devnet { command } => match command {
            DevnetCommand::Up {
                dir,
                relays,
                mailboxes,
                timers,
                relaxed_limits,
            } => {
                let mut net = Devnet::up(DevnetOptions {
                    dir: dir.clone(),
                    relays: *relays,
                    mailboxes: *mailboxes,
                    timers: *timers,
                    bin_dir: devnet::default_bin_dir(),
                    relaxed_limits: *relaxed_limits,
                })
                .await?;
                out(
                    j,
                    json!({
                        "directory_url": net.directory_url(),
                        "network_file": net.network_file(),
                        "nodes": net.record().nodes,
                    }),
                    format!(
                        "devnet up: {} nodes ({} directory authorities); directory {}\nclients: whispr init --directory {} --network {}\n(Ctrl-C or `whispr devnet down --dir {}` stops it)",
                        net.record().nodes.len(),
                        devnet::AUTHORITIES,
                        net.directory_url(),
                        net.directory_url(),
                        net.network_file().display(),
                        dir.display()
                    ),
                );
                wait_for_stop(&mut net).await;
                net.stop();
                out(j, json!({"stopped": true}), "devnet stopped".to_string());
            }
            DevnetCommand::Down { dir } => {
                devnet::down(dir)?;
                out(j, json!({"stopped": true}), "devnet stopped".to_string());
            }
            DevnetCommand::Kill { dir, node } => {
                devnet::kill_node(dir, node)?;
                out(
                    j,
                    json!({"killed": node}),
                    format!("{node} killed (SIGKILL)"),
                );
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` to a new file `path` (mode 0600; an existing file is not overwritten).
fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<(), ClientError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let io = |source| ClientError::Io {
        what: "writing the export",
        source,
    };
    let mut f = options.open(path).map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}

async fn wait_for_stop(net: &mut Devnet) {
    let Ok(mut stop) = StopSignals::new() else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    let mut reported = 0;
    loop {
        tokio::select! {
            () = stop.recv() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let exited = net.exited();
                if exited.len() > reported {
                    for e in exited.iter().skip(reported) {
                        eprintln!("devnet: node exited: {e}");
                    }
                    reported = exited.len();
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_out = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if json_out {
                println!("{}", json!({"error": e.to_string()}));
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
