#!/usr/bin/env bash
# `make observability` (part of `make test`): checks deploy/prometheus and deploy/grafana.
#
# 1. promtool: the alerting rules load (`check rules`) and pass their unit tests
#    (deploy/prometheus/alerts_test.yml), and the example scrape configuration loads; every
#    alert's runbook link points at a heading of docs/operators.md.
# 2. The Grafana dashboards are valid JSON with unique panel ids, and every PromQL query in
#    them parses (checked by promtool as a recording rule, with $instance replaced).
# 3. Every metric name the rules and dashboards use is exported by a real node: a devnet of
#    real processes (3 authorities, 3 relays, 3 mailbox nodes, 1 timer node; `whispr devnet
#    up`) is started and every node's /metrics scraped.
#
# Needs promtool (Debian package `prometheus`, installed by `make deps`), perl (with JSON::PP,
# part of build-essential's dependencies) and the workspace binaries
# (`cargo build --workspace --bins --profile test`).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${WHISPR_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"
PROMTOOL="${PROMTOOL:-promtool}"
command -v "$PROMTOOL" >/dev/null || { echo "promtool not found: run 'make deps' (Debian package prometheus)"; exit 1; }
[ -x "$BIN/whispr" ] || { echo "no $BIN/whispr: build the binaries first (cargo build --workspace --bins --profile test)"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/whispr-observability.XXXXXX")"
DEVNET_PID=""
cleanup() {
  if [ -n "$DEVNET_PID" ]; then
    "$BIN/whispr" devnet down --dir "$WORK/net" >/dev/null 2>&1 || kill "$DEVNET_PID" 2>/dev/null || true
    wait "$DEVNET_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== promtool: rules, their unit tests, the example scrape configuration"
"$PROMTOOL" check rules deploy/prometheus/alerts.yml
"$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
"$PROMTOOL" check config --syntax-only deploy/prometheus/prometheus.yml

echo "== runbook: every alert's runbook anchor is a heading of docs/operators.md"
anchors="$(sed -n 's|.*runbook: "docs/operators.md#\([a-z0-9-]*\)".*|\1|p' deploy/prometheus/alerts.yml | sort -u)"
headings="$(sed -n 's/^#\{1,6\} \(.*\)$/\1/p' docs/operators.md | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9 -]//g; s/ /-/g')"
for anchor in $anchors; do
  grep -qx -- "$anchor" <<<"$headings" || { echo "runbook anchor #$anchor: no such heading in docs/operators.md"; exit 1; }
done
echo "$(wc -w <<<"$anchors") runbook anchors found"

echo "== dashboards: JSON, panel ids, PromQL"
perl -MJSON::PP -e '
  my $out = shift @ARGV;
  open(my $rules, ">", $out) or die "$out: $!";
  print $rules "groups:\n  - name: dashboards\n    rules:\n";
  my ($n, %uids) = (0);
  for my $file (@ARGV) {
    open(my $fh, "<", $file) or die "$file: $!";
    my $d = eval { JSON::PP->new->decode(do { local $/; <$fh> }) } or die "$file: invalid JSON: $@";
    die "$file: no uid\n" unless $d->{uid};
    die "$file: uid $d->{uid} used twice\n" if $uids{$d->{uid}}++;
    my %ids;
    my @panels = @{ $d->{panels} || [] };
    while (my $p = shift @panels) {
      push @panels, @{ $p->{panels} || [] };
      die "$file: panel id $p->{id} used twice\n" if defined $p->{id} && $ids{$p->{id}}++;
      for my $t (@{ $p->{targets} || [] }) {
        my $e = $t->{expr} // next;
        $e =~ s/\$instance/.*/g;
        $e =~ s/\$\{?__\w+\}?/5m/g;
        $e =~ s/\n/ /g;
        $e =~ s/\x27/\x27\x27/g;
        $n++;
        print $rules "      - record: dashboard:query:$n\n        expr: \x27$e\x27\n";
      }
    }
    printf "%s: %d panels\n", $file, scalar keys %ids;
  }
  close $rules;
  print "$n queries\n";
' "$WORK/dashboard-queries.yml" deploy/grafana/*.json
"$PROMTOOL" check rules "$WORK/dashboard-queries.yml" >/dev/null || {
  "$PROMTOOL" check rules "$WORK/dashboard-queries.yml"; echo "a dashboard query does not parse"; exit 1; }

echo "== metric names: every name used is exported by a running node"
grep -ohE '\bwhispr_[a-z0-9_]+' deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml deploy/grafana/*.json \
  | sort -u >"$WORK/used"
"$BIN/whispr" devnet up --dir "$WORK/net" >"$WORK/devnet.out" 2>&1 &
DEVNET_PID=$!
for _ in $(seq 1 240); do
  [ -s "$WORK/net/directory-url" ] && break
  kill -0 "$DEVNET_PID" 2>/dev/null || { cat "$WORK/devnet.out"; echo "the devnet did not start"; exit 1; }
  sleep 0.5
done
[ -s "$WORK/net/directory-url" ] || { cat "$WORK/devnet.out"; echo "the devnet did not come up in 2 minutes"; exit 1; }
# kind and HTTP port of every node, from devnet.json
perl -MJSON::PP -e '
  local $/; my $d = JSON::PP->new->decode(<STDIN>);
  print "$_->{kind} $_->{http_port}\n" for @{ $d->{nodes} };
' <"$WORK/net/devnet.json" >"$WORK/nodes"
: >"$WORK/exported"
kinds=""
while read -r kind port; do
  perl -MIO::Socket::INET -e '
    my ($port, $kind) = @ARGV;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port, Timeout => 10)
      or die "$kind on port $port: $!\n";
    print $s "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    my $r = do { local $/; <$s> };
    $r =~ m{^HTTP/1\.[01] 200 } or die "$kind on port $port: /metrics did not answer 200\n";
    my (undef, $body) = split /\r\n\r\n/, $r, 2;
    for (split /\n/, $body) {
      next if /^#/ || !/^(whispr_[a-z0-9_]+)/;
      my $name = $1;
      print "$name\n";
      print "$1\n" if $name =~ /^(.*)_(bucket|count|sum)$/;
    }
  ' "$port" "$kind" >>"$WORK/exported"
  kinds="$kinds$kind "
done <"$WORK/nodes"
sort -u -o "$WORK/exported" "$WORK/exported"
echo "scraped$(echo "$kinds" | tr ' ' '\n' | sed '/^$/d' | sort | uniq -c | awk '{printf " %s×%s", $1, $2}'): $(wc -l <"$WORK/exported") names exported, $(wc -l <"$WORK/used") used"
missing="$(comm -23 "$WORK/used" "$WORK/exported")"
if [ -n "$missing" ]; then
  echo "used in deploy/ but exported by no node:"
  echo "$missing" | sed 's/^/  /'
  exit 1
fi
echo "every metric name used in deploy/prometheus and deploy/grafana is exported"
