#!/usr/bin/env bash
# Every test of the workspace (`make unit`), in two lanes at once. `cargo test` runs its test
# binaries one after the other, and the longest ones (devnets of real processes driven
# through the `whispr` command) spend most of their time waiting on the mesh, not computing;
# so they run in a lane of their own beside every other binary. Each lane is `cargo test
# --workspace` on a list of targets (never `-p`: one feature set, one build of RocksDB), the
# build is done once before, and a lane's failure fails the whole. Output lines carry the
# lane's name; each lane's log is also kept under $UNIT_LOG_DIR (default target/unit-logs).
#
#   bash scripts/unit-tests.sh            # both lanes (what `make unit` runs)
#   SERIAL=1 bash scripts/unit-tests.sh   # one lane after the other (for timing or debugging)
#
# An integration test binary not named in DEVNET below runs in the "rest" lane, so a new test
# is never left out; the targets come from `cargo metadata`.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

# The devnet binaries, by target name (a name shared by two packages runs both, in this lane).
DEVNET=(devices e2e replication)

mapfile -t ALL < <($CARGO metadata --no-deps --format-version 1 | python3 -c '
import json, sys
names = set()
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"]:
            names.add(t["name"])
print("\n".join(sorted(names)))
')

devnet_args=()
rest_args=()
for t in "${ALL[@]}"; do
    if printf '%s\n' "${DEVNET[@]}" | grep -qx -- "$t"; then
        devnet_args+=(--test "$t")
    else
        rest_args+=(--test "$t")
    fi
done
for t in "${DEVNET[@]}"; do
    printf '%s\n' "${ALL[@]}" | grep -qx -- "$t" || { echo "unit-tests.sh: no test target $t" >&2; exit 1; }
done

# One build of everything `cargo test --workspace` builds (examples included).
$CARGO test --workspace --no-run

LOG_DIR=${UNIT_LOG_DIR:-${CARGO_TARGET_DIR:-target}/unit-logs}
mkdir -p "$LOG_DIR"

lane_devnet() { $CARGO test --workspace "${devnet_args[@]}"; }
lane_rest() {
    local rc=0
    $CARGO test --workspace --lib --bins "${rest_args[@]}" || rc=$?
    $CARGO test --workspace --doc || rc=$?
    return "$rc"
}

# Runs lane $1 with its output prefixed and kept in $LOG_DIR/$1.log; its exit code.
run_lane() {
    local name=$1 start rc
    start=$(date +%s)
    set +e
    "lane_$name" 2>&1 | tee "$LOG_DIR/$name.log" | sed -u "s/^/[$name] /"
    rc=${PIPESTATUS[0]}
    set -e
    echo "[$name] lane finished in $(($(date +%s) - start)) s, exit code $rc"
    return "$rc"
}

if [ -n "${SERIAL:-}" ]; then
    run_lane devnet && run_lane rest
    exit $?
fi

run_lane devnet &
devnet_pid=$!
rc_rest=0
run_lane rest || rc_rest=$?
rc_devnet=0
wait "$devnet_pid" || rc_devnet=$?
if [ "$rc_devnet" -ne 0 ] || [ "$rc_rest" -ne 0 ]; then
    echo "unit tests failed: devnet lane exit $rc_devnet, rest lane exit $rc_rest" \
        "(logs in $LOG_DIR; the failures are under 'failures:' in each)" >&2
    exit 1
fi
echo "unit tests: both lanes passed"
