#!/usr/bin/env bash
# Runs a benchmark command beside a throw-away redis-server, for the "ours vs Redis" benchmarks
# (timer-service/bench/run.sh, mailbox/bench/run.sh).
#
#   bash bench/with-redis.sh NAME COMMAND [ARGS...]
#
# Starts Debian's redis-server (installed with apt-get if missing) on a free loopback port with
# an append-only file fsynced on every write (`appendonly yes`, `appendfsync always`,
# `save ""`), `auto-aof-rewrite-percentage 0` (no automatic AOF rewrite, so the AOF's growth is
# what the workload costs and no fork runs during a timed phase) and a pidfile, so that a bench
# can restart Redis from the same config. Then runs COMMAND with
#   WHISPR_BENCH_REDIS=127.0.0.1:PORT  WHISPR_BENCH_REDIS_PORT=PORT
#   WHISPR_BENCH_REDIS_CONF=FILE       WHISPR_BENCH_REDIS_SERVER=BIN
#   WHISPR_BENCH_DIR=DIR (for our own store, on the same filesystem as Redis's data)
# and stops Redis. Everything goes to a temporary directory under $TMPDIR (default /tmp),
# removed at the end (kept if WHISPR_BENCH_KEEP=1).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 NAME COMMAND [ARGS...]" >&2
    exit 2
fi
name=$1
shift

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server missing: installing Debian's redis-server" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y redis-server
fi
server=$(command -v redis-server)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/whispr-$name-bench.XXXXXX")
mkdir -p "$tmp/redis" "$tmp/ours"
conf="$tmp/redis/redis.conf"
pidfile="$tmp/redis/redis.pid"
port=""

stop_redis() {
    if [ -n "$port" ]; then
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
    fi
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile")
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    stop_redis
    if [ "${WHISPR_BENCH_KEEP:-0}" = 1 ]; then
        echo "kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

started=""
for _ in $(seq 20); do
    candidate=$((20000 + RANDOM % 30000))
    port_free "$candidate" || continue
    cat >"$conf" <<EOF
bind 127.0.0.1
port $candidate
dir $tmp/redis
appendonly yes
appendfsync always
save ""
auto-aof-rewrite-percentage 0
daemonize no
pidfile $pidfile
logfile $tmp/redis/redis.log
EOF
    "$server" "$conf" </dev/null >/dev/null 2>&1 &
    port=$candidate
    for _ in $(seq 100); do
        if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
            started=1
            break
        fi
        sleep 0.05
    done
    [ -n "$started" ] && break
    stop_redis
    port=""
done
if [ -z "$started" ]; then
    echo "could not start redis-server; log:" >&2
    cat "$tmp/redis/redis.log" >&2 || true
    exit 1
fi
echo "redis-server $("$server" --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$port, data in $tmp" >&2

export WHISPR_BENCH_REDIS="127.0.0.1:$port"
export WHISPR_BENCH_REDIS_PORT="$port"
export WHISPR_BENCH_REDIS_CONF="$conf"
export WHISPR_BENCH_REDIS_SERVER="$server"
export WHISPR_BENCH_DIR="$tmp/ours"
"$@"
