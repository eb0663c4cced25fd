#!/usr/bin/env bash
# Hunts flaky tests: runs the process-level test binaries N times in a row with CPU burners
# beside them (a loaded machine is where timing assumptions break), and reports, per test, how
# many runs failed.
#
#   bash scripts/flaky-hunt.sh [N]            # N rounds (default 10) of the default tests
#   FLAKY_TESTS="mesh_processes e2e" bash scripts/flaky-hunt.sh 3
#   FLAKY_BURNERS=4 bash scripts/flaky-hunt.sh 5  # more load (default: 2 burners)
#
# `make flaky-hunt N=10` runs it the same way. The tests are built once, in the tests' profile
# (the same build as `make test`), and each test binary is then run directly from its package
# directory, as `cargo test` would. Logs of failed runs are kept under $FLAKY_OUT (default
# target/flaky-hunt); the summary goes to stdout and to $FLAKY_OUT/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-10}"
TESTS="${FLAKY_TESTS:-mesh_processes mesh_driver node_process holds_node e2e http_api}"
BURNERS="${FLAKY_BURNERS:-2}"
RUN_TIMEOUT="${FLAKY_TIMEOUT:-1200}"
CARGO="${CARGO:-cargo}"
TARGET="${CARGO_TARGET_DIR:-target}"
OUT="${FLAKY_OUT:-$TARGET/flaky-hunt}"
rm -rf "$OUT"
mkdir -p "$OUT"

# Build every test binary named in $TESTS (with --workspace, as `make test` does, so the
# features and therefore the RocksDB build are the same) and collect (binary, package dir).
args=()
for t in $TESTS; do args+=(--test "$t"); done
echo "building: ${args[*]}"
"$CARGO" test --workspace "${args[@]}" --no-run --message-format=json 2>"$OUT/build.log" |
    python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        pkg = os.path.dirname(m["manifest_path"])
        print(m["target"]["name"] + "\t" + os.path.basename(pkg) + "\t" + m["executable"] + "\t" + pkg)
' >"$OUT/binaries.tsv" || { cat "$OUT/build.log" >&2; exit 1; }
if [ ! -s "$OUT/binaries.tsv" ]; then
    cat "$OUT/build.log" >&2
    echo "no test binary built for: $TESTS" >&2
    exit 1
fi

burners=()
stop_burners() {
    for p in "${burners[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap stop_burners EXIT
for _ in $(seq 1 "$BURNERS"); do
    # A busy loop in its own process: one core's worth of load each.
    bash -c 'while :; do :; done' &
    burners+=("$!")
done
echo "$BURNERS CPU burners running; $ROUNDS rounds of: $(cut -f1,2 "$OUT/binaries.tsv" | tr '\t' '/' | tr '\n' ' ')"

# results.tsv: round, binary, test, outcome (ok/FAILED), seconds of the whole binary's run
: >"$OUT/results.tsv"
start_all=$(date +%s)
for round in $(seq 1 "$ROUNDS"); do
    while IFS=$'\t' read -r name pkg exe dir; do
        log="$OUT/round$round-$pkg-$name.log"
        t0=$(date +%s)
        set +e
        (cd "$dir" && timeout "$RUN_TIMEOUT" "$exe" --test-threads 2) >"$log" 2>&1
        rc=$?
        set -e
        secs=$(( $(date +%s) - t0 ))
        # Every test's own verdict, from libtest's lines.
        grep -E '^test .* \.\.\. (ok|FAILED|ignored)$' "$log" |
            sed -E 's/^test (.*) \.\.\. (ok|FAILED|ignored)$/\1\t\2/' |
            while IFS=$'\t' read -r test outcome; do
                printf '%s\t%s/%s\t%s\t%s\t%s\n' "$round" "$pkg" "$name" "$test" "$outcome" "$secs"
            done >>"$OUT/results.tsv"
        if [ "$rc" -ne 0 ]; then
            # A crash, a timeout or a failed test: keep the log, and make sure the binary itself
            # counts as a failure even when no per-test line says so (timeout: rc 124).
            printf '%s\t%s/%s\t%s\t%s\t%s\n' "$round" "$pkg" "$name" "(binary exit $rc)" "FAILED" "$secs" >>"$OUT/results.tsv"
            echo "round $round: $pkg/$name FAILED (exit $rc, ${secs}s), log: $log"
        else
            rm -f "$log"
            echo "round $round: $pkg/$name ok (${secs}s)"
        fi
    done <"$OUT/binaries.tsv"
done
elapsed=$(( $(date +%s) - start_all ))

{
    echo "flaky hunt: $ROUNDS rounds, $BURNERS CPU burners, $(nproc) cores, ${elapsed}s in all ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    printf '%-34s %-58s %5s %6s %9s\n' "binary" "test" "runs" "failed" "binary s"
    python3 - "$OUT/results.tsv" <<'EOF'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs = collections.Counter(); fails = collections.Counter(); secs = collections.defaultdict(list)
for rnd, binary, test, outcome, s in rows:
    if outcome == "ignored":
        continue
    runs[(binary, test)] += 1
    if outcome == "FAILED":
        fails[(binary, test)] += 1
    secs[(binary, test)].append(int(s))
for key in sorted(runs):
    b, t = key
    s = sorted(secs[key])
    print(f"{b:<34} {t[:58]:<58} {runs[key]:>5} {fails[key]:>6} {s[len(s)//2]:>9}")
print(f"total failures: {sum(fails.values())}")
EOF
} | tee "$OUT/summary.txt"
! grep -q "^total failures: [1-9]" "$OUT/summary.txt"
