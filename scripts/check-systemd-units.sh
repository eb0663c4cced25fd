#!/usr/bin/env bash
# `make observability` (part of `make test`): the systemd units in deploy/systemd load
# without a warning (`systemd-analyze verify`) and keep their hardening
# (`systemd-analyze security --offline=true`, exposure at most SECURITY_MAX).
#
# `verify` needs each ExecStart binary to exist, so it checks copies of the units whose
# /usr/local/bin/ is replaced by the workspace's binary directory. Works without a running
# systemd (containers, CI): it only reads the unit files. Needs systemd-analyze (Debian
# package systemd, installed by `make deps`).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${WHISPR_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"
SECURITY_MAX="${SECURITY_MAX:-2.0}"
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found: run 'make deps' (Debian package systemd)"; exit 1; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/whispr-units.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

units=()
for unit in deploy/systemd/*.service; do
  name="$(basename "$unit")"
  binary="$(sed -n 's|^ExecStart=/usr/local/bin/\([^ ]*\).*|\1|p' "$unit")"
  [ -n "$binary" ] || { echo "$unit: ExecStart is not /usr/local/bin/<binary>"; exit 1; }
  [ -x "$BIN/$binary" ] || { echo "no $BIN/$binary: build the binaries first (cargo build --workspace --bins --profile test)"; exit 1; }
  sed "s|/usr/local/bin/|$BIN/|" "$unit" >"$WORK/$name"
  units+=("$WORK/$name")
done
[ "${#units[@]}" -gt 0 ] || { echo "no unit in deploy/systemd"; exit 1; }

# `verify` exits 0 on unknown keys or bad values (it only warns): any output fails.
out="$(systemd-analyze verify "${units[@]}" 2>&1)" || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "$out"; echo "systemd-analyze verify is not clean"; exit 1; fi
echo "systemd-analyze verify: ${#units[@]} units clean"

for unit in "${units[@]}"; do
  level="$(systemd-analyze security --offline=true "$unit" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
  [ -n "$level" ] || { systemd-analyze security --offline=true "$unit"; exit 1; }
  echo "$(basename "$unit"): exposure $level"
  awk -v l="$level" -v m="$SECURITY_MAX" 'BEGIN { exit !(l <= m) }' \
    || { echo "$(basename "$unit"): exposure $level is above $SECURITY_MAX"; exit 1; }
done
