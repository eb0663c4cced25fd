#!/usr/bin/env bash
# `make demo`: a local Whispr network of real node processes and two users, alice and bob,
# talking through it with the `whispr` command. Every step checks its outcome and the script
# fails loudly if one does not hold. The binaries come from the workspace build
# (`cargo build --workspace --bins --profile test`, which `make demo` runs first).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${WHISPR_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"
export WHISPR_BIN_DIR="$BIN"
WHISPR="$BIN/whispr"
[ -x "$WHISPR" ] || { echo "no $WHISPR: run 'make demo' (it builds the binaries first)"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/whispr-demo.XXXXXX")"
NET="$WORK/devnet"
alice() { WHISPR_PASSPHRASE="alice's passphrase" "$WHISPR" --home "$WORK/alice" "$@"; }
bob() { WHISPR_PASSPHRASE="bob's passphrase" "$WHISPR" --home "$WORK/bob" "$@"; }
phone() { WHISPR_PASSPHRASE="bob's phone passphrase" "$WHISPR" --home "$WORK/bob-phone" "$@"; }

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ok() { printf '   \033[32mok\033[0m  %s\n' "$*"; }
fail() { printf '   \033[31mFAILED\033[0m  %s\n' "$*"; exit 1; }
DEVNET_PID=""
cleanup() {
  if [ -n "$DEVNET_PID" ]; then
    "$WHISPR" devnet down --dir "$NET" >/dev/null 2>&1 || true
    wait "$DEVNET_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

bold "Starting a devnet: 3 directory authorities, 3 relays (edge, mix1, mix2), 3 mailbox nodes (every mailbox on all three), 1 timer node"
"$WHISPR" devnet up --dir "$NET" >"$WORK/devnet.out" 2>&1 &
DEVNET_PID=$!
for _ in $(seq 1 240); do
  [ -s "$NET/directory-url" ] && break
  kill -0 "$DEVNET_PID" 2>/dev/null || { cat "$WORK/devnet.out"; fail "the devnet did not start"; }
  sleep 0.5
done
[ -s "$NET/directory-url" ] || fail "the devnet did not come up in 2 minutes"
DIRECTORY="$(cat "$NET/directory-url")"
ok "every node sees the other six, and the authorities' consensus lists all seven; directory mirror at $DIRECTORY"

bold "Two users"
alice init --directory "$DIRECTORY" --network "$NET/network" >/dev/null
bob init --directory "$DIRECTORY" --network "$NET/network" >/dev/null
ok "alice and bob each have keys in an encrypted home directory, and pin the devnet's authorities"
alice directory | tee "$WORK/dir" | sed 's/^/   alice: /'
grep -q "directory signed by 3/3 authorities" "$WORK/dir" || fail "alice's directory is not signed by the 3 authorities"
ok "the directory alice routes by is the consensus of the 3 authorities"

bold "alice invites bob; bob accepts"
INVITATION="$(alice invite --name bob)"
echo "   invitation: ${INVITATION:0:60}… (${#INVITATION} characters, QR-friendly)"
bob accept "$INVITATION" --name alice | sed 's/^/   bob: /'
alice recv | sed 's/^/   alice: /'
alice contacts | grep -q "bob  established" || fail "alice does not have bob as a contact"
ok "contact established in both directions"
SA="$(alice safety bob | sed -n 2p)"; SB="$(bob safety alice | sed -n 2p)"
echo "   safety number: $SA"
[ "$SA" = "$SB" ] || fail "safety numbers differ"
ok "both sides compute the same safety number"

bold "A message and a reply"
bob send alice "Hi Alice, it's Bob. Nobody in the middle knows we talk." | sed 's/^/   bob: /'
alice recv | tee "$WORK/r1" | sed 's/^/   alice sees: /'
grep -q "bob: Hi Alice, it's Bob" "$WORK/r1" || fail "alice did not receive bob's message"
alice send bob "Hello Bob! Loud and clear." | sed 's/^/   alice: /'
bob recv | tee "$WORK/r2" | sed 's/^/   bob sees: /'
grep -q "alice: Hello Bob! Loud and clear." "$WORK/r2" || fail "bob did not receive the reply"
ok "message and reply delivered end to end"

bold "bob links his phone to his account"
mkfifo "$WORK/confirm"
bob link --name phone --json <"$WORK/confirm" >"$WORK/link.out" 2>&1 &
LINK_PID=$!
exec 3>"$WORK/confirm"
for _ in $(seq 1 120); do grep -q '"code"' "$WORK/link.out" && break; sleep 0.5; done
CODE="$(sed -n 's/.*"code":"\([^"]*\)".*/\1/p' "$WORK/link.out" | head -1)"
[ -n "$CODE" ] || { cat "$WORK/link.out"; fail "bob's laptop printed no linking code"; }
echo "   bob's laptop: linking code ${CODE:0:40}… (${#CODE} characters, QR-friendly, works once for 10 minutes)"
phone init --directory "$DIRECTORY" --network "$NET/network" --link "$CODE" --device-name phone \
  >"$WORK/phone.out" 2>&1 &
PHONE_PID=$!
for _ in $(seq 1 120); do grep -q "type this code" "$WORK/phone.out" && break; sleep 0.5; done
SHORT="$(sed -n 's/.*primary device: \(.*\)$/\1/p' "$WORK/phone.out")"
[ -n "$SHORT" ] || { cat "$WORK/phone.out"; fail "the phone showed no short code"; }
echo "   bob's phone shows: $SHORT"
for _ in $(seq 1 120); do grep -q '"request"' "$WORK/link.out" && break; sleep 0.5; done
echo "   bob types it on his laptop"
echo "$SHORT" >&3
exec 3>&-
wait "$LINK_PID" || { cat "$WORK/link.out"; fail "linking failed on the laptop"; }
wait "$PHONE_PID" || { cat "$WORK/phone.out"; fail "linking failed on the phone"; }
sed 's/^/   bob'"'"'s phone: /' "$WORK/phone.out" | tail -1
bob devices | sed 's/^/   bob: /'
[ "$(bob devices | wc -l)" = 2 ] || fail "bob's account does not list two devices"
ok "the account (keys of every contact's mailbox, contacts, settings) went to the phone through the mesh, end to end"
alice recv | sed 's/^/   alice sees: /'
alice contacts --json | grep -q '"devices":2' || fail "alice's client did not learn bob's second device"
alice send bob "Hello Bob, wherever you read this." | sed 's/^/   alice: /'
bob recv | tee "$WORK/rl1" | sed 's/^/   bob'"'"'s laptop sees: /'
phone recv | tee "$WORK/rl2" | sed 's/^/   bob'"'"'s phone sees: /'
grep -q "wherever you read this" "$WORK/rl1" || fail "the laptop did not get the message"
grep -q "wherever you read this" "$WORK/rl2" || fail "the phone did not get the message"
ok "alice's client learnt bob's second device by itself; both devices got the message"
phone send alice "Answering from my phone." | sed 's/^/   bob'"'"'s phone: /'
alice recv | sed 's/^/   alice sees: /'
for _ in $(seq 1 20); do bob recv >/dev/null; bob history alice | grep -q "you → alice: Answering from my phone" && break; done
bob history alice | sed 's/^/   bob'"'"'s laptop, history: /'
bob history alice | grep -q "you → alice: Answering from my phone" || fail "the laptop's history lacks the reply sent from the phone"
ok "what bob sends from one device is in the other's history"

bold "A 100 KiB message in many fragments"
head -c 76800 /dev/urandom | base64 -w 0 | head -c 102400 >"$WORK/big.txt"
alice send bob - <"$WORK/big.txt" | tee "$WORK/s3" | sed 's/^/   alice: /'
bob recv --json >"$WORK/r3"
GOT="$(grep -o '"text":"[^"]*"' "$WORK/r3" | head -1 | sed 's/^"text":"//; s/"$//')"
[ "$GOT" = "$(cat "$WORK/big.txt")" ] || fail "the 100 KiB message did not arrive intact"
ok "bob received all $(wc -c <"$WORK/big.txt") bytes intact in $(grep -o '[0-9]* fragment' "$WORK/s3" | cut -d' ' -f1) fragments"

bold "A scheduled message (in 8 s) and a cancelled one"
alice send bob "This was scheduled 8 seconds ago." --in 8s | sed 's/^/   alice: /'
CANCEL_OUT="$(alice send bob "This one must never arrive." --in 10s)"
echo "   alice: $CANCEL_OUT"
CANCEL_ID="$(echo "$CANCEL_OUT" | sed -n 's/^message \([0-9]*\).*/\1/p')"
alice cancel "$CANCEL_ID" | sed 's/^/   alice: /'
bob recv >"$WORK/r4"
grep -q "scheduled" "$WORK/r4" && fail "the scheduled message arrived early"
ok "nothing yet at bob's (the timer node holds it)"
echo "   waiting for the release time…"
sleep 12
bob recv | tee "$WORK/r5" | sed 's/^/   bob sees: /'
grep -q "This was scheduled 8 seconds ago." "$WORK/r5" || fail "the scheduled message did not arrive"
grep -q "must never arrive" "$WORK/r5" && fail "the cancelled message arrived"
ok "the scheduled message arrived at its time; the cancelled one never did"

bold "Disappearing messages"
alice send bob "This message disappears 5 s after it is sent." --expire-after 5s | sed 's/^/   alice: /'
echo "   bob is offline for 7 s…"
sleep 7
bob recv >"$WORK/r6"
grep -q "disappears" "$WORK/r6" && fail "an expired message was served"
ok "bob's mailbox no longer serves it after its expiry"
alice send bob "Read me: I vanish from your history in 6 s." --expire-after 6s >/dev/null
bob recv | sed 's/^/   bob sees: /'
sleep 7
bob history alice >"$WORK/h7"
grep -q "I vanish" "$WORK/h7" && fail "bob's client kept a disappearing message"
ok "bob's client deleted it from his history at its time"

bold "A mix relay killed mid-conversation"
"$WHISPR" devnet kill --dir "$NET" mix1 | sed 's/^/   /'
head -c 15000 /dev/urandom | base64 -w 0 | head -c 20000 >"$WORK/mid.txt"
alice send bob - <"$WORK/mid.txt" | tee "$WORK/s8" | sed 's/^/   alice: /'
grep -q ": stored" "$WORK/s8" || fail "delivery did not complete after the mix died"
bob recv --json >"$WORK/r8"
GOT="$(grep -o '"text":"[^"]*"' "$WORK/r8" | head -1 | sed 's/^"text":"//; s/"$//')"
[ "$GOT" = "$(cat "$WORK/mid.txt")" ] || fail "bob did not receive the message sent while mix1 was down"
bob send alice "Got it, even with mix1 down." >/dev/null
alice recv | sed 's/^/   alice sees: /'
ok "fragments lost in the dead mix were retransmitted on routes through mix2"

bold "A mailbox node killed: every mailbox lives on three nodes"
alice send bob "Written before mailbox1 died; bob has not read it yet." >/dev/null
"$WHISPR" devnet kill --dir "$NET" mailbox1 | sed 's/^/   /'
alice send bob "Written while mailbox1 is down." | tee "$WORK/s9" | sed 's/^/   alice: /'
grep -q ": stored" "$WORK/s9" || fail "a message sent with mailbox1 down was not acknowledged"
bob recv | tee "$WORK/r9" | sed 's/^/   bob sees: /'
grep -q "before mailbox1 died" "$WORK/r9" || fail "bob did not read the message stored before the crash"
grep -q "while mailbox1 is down" "$WORK/r9" || fail "bob did not read the message sent during the outage"
bob send alice "Still reading and writing with mailbox1 down." | sed 's/^/   bob: /'
alice recv | sed 's/^/   alice sees: /'
ok "the two other replicas hold every acknowledged message (each was on two before its ack); bob reads from them"

bold "bob removes his phone"
bob devices remove phone | sed 's/^/   bob: /'
phone recv >"$WORK/rl3" 2>&1 && fail "the removed phone can still fetch"
sed 's/^/   bob'"'"'s phone: /' "$WORK/rl3"
ok "the phone can no longer log in to any of bob's mailboxes; contacts stop encrypting for it"

bold "alice's outbox"
alice status | sed 's/^/   /'

bold "Stopping the devnet"
"$WHISPR" devnet down --dir "$NET" | sed 's/^/   /'
wait "$DEVNET_PID" 2>/dev/null || true
DEVNET_PID=""
ok "demo complete"
