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
set -euo pipefail

cd "$(dirname "$0")/../.."
CARGO=${CARGO:-cargo}

exec bash bench/with-redis.sh timer \
    "$CARGO" bench --workspace --bench timers -- "$@"
