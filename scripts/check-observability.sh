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
# 4. A real Prometheus server loads the rules and scrapes the devnet: on the healthy network
#    no alert's condition holds for 20 s, and once a mix relay is killed with SIGKILL,
#    WhisprNodeDown is pending for it (and for no other node).
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
# kind, HTTP port and name of every node, from devnet.json
perl -MJSON::PP -e '
  local $/; my $d = JSON::PP->new->decode(<STDIN>);
  print "$_->{kind} $_->{http_port} $_->{name}\n" for @{ $d->{nodes} };
' <"$WORK/net/devnet.json" >"$WORK/nodes"
: >"$WORK/exported"
kinds=""
while read -r kind port _name; do
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

echo "== the rules in a real Prometheus scraping the devnet: none fires on a healthy network; a killed node is seen"
PROMETHEUS="${PROMETHEUS:-prometheus}"
command -v "$PROMETHEUS" >/dev/null || { echo "prometheus not found: run 'make deps' (Debian package prometheus)"; exit 1; }
# http GET on 127.0.0.1: body on stdout, fails unless 200.
get() {
  perl -MIO::Socket::INET -e '
    my ($port, $path) = @ARGV;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port, Timeout => 10) or exit 1;
    print $s "GET $path HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    my $r = do { local $/; <$s> };
    $r =~ m{^HTTP/1\.[01] 200 } or exit 1;
    print +(split /\r\n\r\n/, $r, 2)[1];
  ' "$@"
}
# alertname, state and instance of every pending or firing alert, one per line; with an
# argument N, only those active (pending or firing) for N seconds or more.
alerts() {
  get "$PROM_PORT" /api/v1/alerts | perl -MJSON::PP -MTime::Local=timegm -e '
    local $/; my $d = JSON::PP->new->decode(<STDIN>);
    my $min = $ARGV[0] // 0;
    for (@{ $d->{data}{alerts} }) {
      my ($y, $mo, $da, $h, $mi, $s) = $_->{activeAt} =~ /^(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)/;
      next if time() - timegm($s, $mi, $h, $da, $mo - 1, $y) < $min;
      print "$_->{labels}{alertname} $_->{state} $_->{labels}{instance}\n";
    }' "$@"
}
PROM_PORT="$(perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1:0")->sockport')"
cp deploy/prometheus/alerts.yml "$WORK/alerts.yml"
{
  printf 'global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\nrule_files:\n  - alerts.yml\nscrape_configs:\n'
  for kind in relay mailbox timer authority; do
    printf '  - job_name: whispr-%s\n    static_configs:\n      - targets: [%s]\n' "$kind" \
      "$(awk -v k="$kind" '$1 == k { printf "%s\"127.0.0.1:%s\"", (n++ ? ", " : ""), $2 }' "$WORK/nodes")"
  done
} >"$WORK/prometheus.yml"
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
trap 'kill "$PROM_PID" 2>/dev/null || true; wait "$PROM_PID" 2>/dev/null || true; cleanup' EXIT
targets="$(wc -l <"$WORK/nodes")"
up=0
for _ in $(seq 1 60); do
  up="$(get "$PROM_PORT" '/api/v1/query?query=count(up%3D%3D1)' 2>/dev/null \
    | perl -MJSON::PP -e 'local $/; my $d = eval { JSON::PP->new->decode(<STDIN>) }; print $d ? $d->{data}{result}[0]{value}[1] // 0 : 0')" || up=0
  [ "$up" = "$targets" ] && break
  sleep 1
done
[ "$up" = "$targets" ] || { tail -5 "$WORK/prometheus.log"; echo "Prometheus scrapes $up of $targets nodes"; exit 1; }
# 40 s of scrapes every 2 s: enough for every rate() and ratio to be computed. An alert whose
# condition held for 20 s or more fails the check; shorter ones are shown (the devnet's epochs
# last 5 s, so an authority's consensus can lag its epoch for a few seconds: a `for:` covers it).
sleep 40
held="$(alerts 20)"
[ -z "$held" ] || { echo "alerts pending or firing for 20 s or more on a healthy devnet:"; echo "$held"; exit 1; }
echo "$targets nodes scraped, every rule evaluated for 40 s: no alert condition held for 20 s"
alerts | sed 's/^/  transient: /'
mix_port="$(awk '$3 == "mix1" { print $2 }' "$WORK/nodes")"
"$BIN/whispr" devnet kill --dir "$WORK/net" mix1 >/dev/null
seen=""
for _ in $(seq 1 30); do
  seen="$(alerts | grep "^WhisprNodeDown pending 127.0.0.1:" || true)"
  [ -n "$seen" ] && break
  sleep 1
done
[ "$seen" = "WhisprNodeDown pending 127.0.0.1:$mix_port" ] \
  || { echo "after killing mix1 (port $mix_port), expected WhisprNodeDown pending for it; got:"; alerts; exit 1; }
echo "mix1 killed: WhisprNodeDown pending for it (firing after 3 min); all alerts now:"
alerts | sed 's/^/  /'
