#!/usr/bin/env bash
# "Schedule and fire 1M timers", ours vs Redis: runs, beside a throw-away redis-server
# (bench/with-redis.sh: Debian's, appendfsync always), the `timers` bench of
# whispr-timer-service against it, and stops Redis.
#
#   CARGO_TARGET_DIR=/work/target bash timer-service/bench/run.sh [--timers N] [--batch B] [...]
#
# Arguments go to the bench (see timer-service/benches/timers.rs). Redis's config file sets,
# besides the above, `auto-aof-rewrite-percentage 0` (no automatic AOF rewrite, so the AOF's
# growth is what the timers cost and no fork runs during a timed phase) and a pidfile; the bench
# restarts Redis from that config to time restart-to-first-fire. Redis data and RocksDB go to a
# temporary directory on the same filesystem (under $TMPDIR, default /tmp), removed at the end
# (kept if WHISPR_BENCH_KEEP=1).
#
# BENCH_PROFILE=test builds the bench in the tests' profile, so that it reuses their build of
# RocksDB's C++ (every dependency is at opt-level 3 there) instead of a second one in the
# `bench` profile, with this crate (the queue, the store and the bench) raised to opt-level 3
# by `--config` (only this crate is rebuilt). The default is cargo's `bench` profile.
# BENCH_CARGO_ARGS adds cargo flags (`make bench` raises each of our crates to opt-level 3).
set -euo pipefail

cd "$(dirname "$0")/../.."
CARGO=${CARGO:-cargo}

profile=()
if [ -n "${BENCH_PROFILE:-}" ]; then
    profile=(--profile "$BENCH_PROFILE")
    if [ "$BENCH_PROFILE" = test ]; then
        profile+=(--config 'profile.test.package.whispr-timer-service.opt-level=3')
    fi
fi

# shellcheck disable=SC2206 # BENCH_CARGO_ARGS is a list of flags, split on spaces
extra=(${BENCH_CARGO_ARGS:-})
exec bash bench/with-redis.sh timer \
    "$CARGO" bench --workspace "${profile[@]}" "${extra[@]}" --bench timers -- "$@"
