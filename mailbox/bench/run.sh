#!/usr/bin/env bash
# "Durable deposits", ours vs Redis: runs, beside a throw-away redis-server
# (bench/with-redis.sh: Debian's, appendfsync always), the `deposits` bench of
# whispr-mailbox against it, and stops Redis.
#
#   CARGO_TARGET_DIR=/work/target bash mailbox/bench/run.sh [--quick] [--secs S] [...]
#
# Arguments go to the bench (see mailbox/benches/deposits.rs); the script adds
# `--redis-port PORT --redis-conf FILE --redis-server BIN`. Redis's config file sets, besides
# the above, `auto-aof-rewrite-percentage 0` (no automatic AOF rewrite, so no fork runs during
# a timed cell and the AOF's growth is what the deposits cost) and a pidfile; the bench
# restarts Redis from that config to time a restart with 1M stored messages. Redis data and
# RocksDB go to a temporary directory on the same filesystem (under $TMPDIR, default /tmp),
# removed at the end (kept if WHISPR_BENCH_KEEP=1).
#
# BENCH_PROFILE=test builds the bench in the tests' profile (our code at opt-level 1, every
# dependency, RocksDB included, at 3) and so reuses their build of RocksDB's C++ instead of a
# second one in the `bench` profile; the default is cargo's `bench` profile. BENCH_CARGO_ARGS
# adds cargo flags: `make bench` passes `--config profile.test.package.<crate>.opt-level=3`
# for each of our crates, so that with BENCH_PROFILE=test our code is at opt-level 3 too.
set -euo pipefail

cd "$(dirname "$0")/../.."
CARGO=${CARGO:-cargo}

# The bench takes Redis's address as flags; they are known only once Redis runs.
exec bash bench/with-redis.sh mailbox bash -c \
    'exec "$0" bench --workspace ${BENCH_PROFILE:+--profile "$BENCH_PROFILE"} ${BENCH_CARGO_ARGS:-} --bench deposits \
        -- --redis-port "$WHISPR_BENCH_REDIS_PORT" --redis-conf "$WHISPR_BENCH_REDIS_CONF" \
        --redis-server "$WHISPR_BENCH_REDIS_SERVER" "$@"' \
    "$CARGO" "$@"
