#!/usr/bin/env bash
# `make dos-budget`: the measurements behind docs/dos-budget.md (tracker issue 16). Runs the
# load generator client/examples/dos_budget.rs, which starts a devnet of real node processes
# (the code of `whispr devnet up`: 3 authorities, edge, mix1, mailbox1, timer1; nodes are
# restarted with the config changes each phase needs), attacks one resource at a time at
# increasing rates or numbers of source addresses while an honest probe does the legitimate
# operation, and prints a Markdown table (stdout) and JSON lines (results.jsonl).
#
# About 10 minutes on 2 cores (one devnet per phase, ~20 s each to start). Not part of `make test`. Binaries from the tests' profile
# (`cargo build --workspace --bins --examples --profile test`, which `make dos-budget` runs).
#
#   bash scripts/dos-budget.sh [PHASES]    # PHASES: comma-separated, default all:
#                                          # connections,challenges,creation,mixqueue,replay
# Environment: DOS_DIR (work directory, kept; default a new temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${WHISPR_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"
export WHISPR_BIN_DIR="$BIN"
TOOL="$BIN/examples/dos_budget"
[ -x "$TOOL" ] || { echo "no $TOOL: run 'make dos-budget' (it builds it first)"; exit 1; }
[ -x "$BIN/whispr-relay" ] || { echo "no $BIN/whispr-relay: cargo build --workspace --bins --profile test"; exit 1; }

PHASES="${1:-connections,challenges,creation,mixqueue,replay}"
DIR="${DOS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/whispr-dos.XXXXXX")}"
mkdir -p "$DIR"
# The connection phase holds over 4,096 sockets in the generator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "dos-budget: work directory $DIR (devnet logs in $DIR/PHASE/devnet/logs)" >&2
echo "dos-budget: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start" >&2
START=$(date +%s)
# Each phase on a devnet of its own (a phase restarts nodes with its own configuration, and
# the mix-queue attack leaves the honest client and the edge in a state the next phase should
# not inherit: in one run, the replay phase's warm-up message right after it was not
# acknowledged within 90 s).
: >"$DIR/results.jsonl"
: >"$DIR/table.md"
for phase in ${PHASES//,/ }; do
  rm -rf "$DIR/$phase"
  "$TOOL" --dir "$DIR/$phase" --json "$DIR/$phase.jsonl" --phases "$phase" >"$DIR/$phase.md"
  cat "$DIR/$phase.jsonl" >>"$DIR/results.jsonl"
  if [ ! -s "$DIR/table.md" ]; then head -2 "$DIR/$phase.md" >>"$DIR/table.md"; fi
  tail -n +3 "$DIR/$phase.md" >>"$DIR/table.md"
done
cat "$DIR/table.md"
echo "dos-budget: done in $(( $(date +%s) - START )) s; load average $(cut -d' ' -f1-3 /proc/loadavg) at the end; results in $DIR/results.jsonl and $DIR/table.md" >&2
