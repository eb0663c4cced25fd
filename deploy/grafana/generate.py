# Writes the Grafana dashboards deploy/grafana/whispr-{relay,mailbox,timer,authority}.json (run
# from the repository root: `python3 deploy/grafana/generate.py`; commit its output). Every
# metric a query names must be exported by the nodes: `make observability` checks it.
import json

DS = {"type": "prometheus", "uid": "${datasource}"}

def templating(job):
    return {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "instance", "type": "query", "label": "Instance", "datasource": DS,
         "query": {"query": f'label_values(up{{job="{job}"}}, instance)', "refId": "instance"},
         "definition": f'label_values(up{{job="{job}"}}, instance)',
         "multi": True, "includeAll": True, "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1, "hide": 0, "options": []},
    ]}

class Dash:
    def __init__(self, uid, title, job, description):
        self.uid, self.title, self.job, self.description = uid, title, job, description
        self.panels = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def row(self, title):
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self.next_id,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self._newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def panel(self, kind, title, targets, unit="short", w=12, h=8, description="", thresholds=None,
              stack=False, mappings=None):
        p = {
            "id": self.next_id, "type": kind, "title": title, "description": description,
            "datasource": DS, "gridPos": self._place(w, h),
            "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                        for i, (e, l) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if thresholds:
            p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
        if mappings:
            p["fieldConfig"]["defaults"]["mappings"] = mappings
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                       "calcs": ["lastNotNull", "max"]},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
        if kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "background", "graphMode": "none", "textMode": "auto"}
        self.next_id += 1
        self.panels.append(p)

    def ts(self, title, targets, **kw):
        self.panel("timeseries", title, targets, **kw)

    def stat(self, title, targets, **kw):
        kw.setdefault("w", 6)
        kw.setdefault("h", 4)
        self.panel("stat", title, targets, **kw)

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["whispr", self.job], "timezone": "utc", "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "1m", "graphTooltip": 1,
            "time": {"from": "now-6h", "to": "now"},
            "annotations": {"list": []},
            "links": [{"title": "Whispr dashboards", "type": "dashboards", "tags": ["whispr"], "asDropdown": True}],
            "templating": templating(self.job),
            "panels": self.panels,
        }

I = 'instance=~"$instance"'
OK_BAD = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
HEALTH = [{"type": "value", "options": {"0": {"text": "ok", "color": "green"},
                                        "1": {"text": "FAILED", "color": "red"}}}]
PAUSED = [{"type": "value", "options": {"0": {"text": "running", "color": "green"},
                                        "1": {"text": "PAUSED", "color": "orange"}}}]
UP = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                    "1": {"text": "up", "color": "green"}}}]

def mesh_sections(d, job):
    J = f'job="{job}", {I}'
    d.row("Mesh health")
    d.stat("Up", [(f'up{{{J}}}', "{{instance}}")], mappings=UP,
           thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    d.stat("Replay store poisoned", [(f'whispr_mesh_replay_store_poisoned{{{J}}}', "{{instance}}")],
           mappings=HEALTH, thresholds=OK_BAD)
    d.stat("Key rotation failing", [(f'whispr_mesh_key_rotation_failing{{{J}}}', "{{instance}}")],
           mappings=HEALTH, thresholds=OK_BAD)
    d.stat("Mesh stopped", [(f'whispr_mesh_stopped{{{J}}}', "{{instance}}")],
           mappings=HEALTH, thresholds=OK_BAD)
    d.stat("Consensus expires in", [(f'(whispr_mesh_consensus_valid_until_seconds{{{J}}} - time()) and on (job, instance) (whispr_mesh_consensus_pinned{{{J}}} == 1)', "{{instance}}")],
           unit="s", thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0},
                                 {"color": "green", "value": 3600}],
           description="With network_file: time left on the consensus the node routes by (negative: expired).")
    d.stat("Peers connected", [(f'whispr_mesh_peers_connected{{{J}}}', "{{instance}}")],
           thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    d.stat("Directory nodes", [(f'whispr_mesh_directory_nodes{{{J}}}', "{{instance}}")])
    d.stat("Queue fill", [(f'whispr_mesh_queue_depth{{{J}}} / whispr_mesh_queue_max{{{J}}}', "{{instance}}")],
           unit="percentunit", thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.5},
                                           {"color": "red", "value": 0.8}])
    d.row("Packets")
    d.ts("Packets in, by source", [(f'sum by (instance, source) (rate(whispr_mesh_packets_in_total{{{J}}}[5m]))', "{{instance}} {{source}}")],
         unit="pps")
    d.ts("Packets out and delivered", [
        (f'rate(whispr_mesh_packets_out_total{{{J}}}[5m])', "{{instance}} out"),
        (f'rate(whispr_mesh_packets_delivered_total{{{J}}}[5m])', "{{instance}} delivered"),
        (f'rate(whispr_mesh_send_failed_total{{{J}}}[5m])', "{{instance}} send failed"),
        (f'rate(whispr_mesh_rate_delayed_total{{{J}}}[5m])', "{{instance}} rate-delayed")], unit="pps")
    d.ts("Drops by reason", [(f'sum by (reason) (rate(whispr_mesh_packets_dropped_total{{{J}}}[5m])) > 0', "{{reason}}")],
         unit="pps", stack=True, description="docs/operators.md, drop reasons.")
    d.ts("Drop share by reason (alert: > 5 %)", [(f'whispr:packets_dropped:ratio_10m{{{J}}} > 0', "{{instance}} {{reason}}")],
         unit="percentunit", description="Recording rule of deploy/prometheus/alerts.yml.")
    d.ts("Mixing queue", [(f'whispr_mesh_queue_depth{{{J}}}', "{{instance}} held"),
                          (f'whispr_mesh_queue_max{{{J}}}', "{{instance}} queue_max")])
    d.ts("Hold time (p50, p99)", [
        (f'histogram_quantile(0.5, sum by (instance, le) (rate(whispr_mesh_hold_seconds_bucket{{{J}}}[10m])))', "{{instance}} p50"),
        (f'histogram_quantile(0.99, sum by (instance, le) (rate(whispr_mesh_hold_seconds_bucket{{{J}}}[10m])))', "{{instance}} p99")],
        unit="s", description="Coarse buckets (0.1, 1, 10, 60, 300, 600 s) by design: quantiles are bucket interpolations.")
    d.row("Mesh connections and directory")
    d.ts("Peers and directory", [(f'whispr_mesh_peers_connected{{{J}}}', "{{instance}} peers"),
                                 (f'whispr_mesh_directory_nodes{{{J}}}', "{{instance}} directory"),
                                 (f'whispr_mesh_descriptors_held{{{J}}}', "{{instance}} held")])
    d.ts("Refusals", [
        (f'rate(whispr_mesh_connections_denied_total{{{J}}}[5m])', "{{instance}} connections denied"),
        (f'rate(whispr_mesh_peer_streams_refused_total{{{J}}}[5m])', "{{instance}} peer streams refused"),
        (f'rate(whispr_mesh_client_streams_refused_total{{{J}}}[5m])', "{{instance}} client streams refused"),
        (f'rate(whispr_mesh_peer_streams_idle_closed_total{{{J}}}[5m])', "{{instance}} idle closed"),
        (f'rate(whispr_mesh_descriptors_rejected_total{{{J}}}[5m])', "{{instance}} descriptors rejected")], unit="ops")
    d.ts("Descriptor submissions to the authorities", [
        (f'sum by (instance, result) (increase(whispr_mesh_descriptor_submissions_total{{{J}}}[1h]))', "{{instance}} {{result}}")],
        description="Per hour, by result (admitted, not_admitted, refused, failed).")
    d.ts("Replay store fsync p99", [
        (f'whispr:sync_seconds:p99_10m{{{J}, store="replay"}}', "{{instance}} fsync p99"),
    ], unit="s")
    d.ts("Replay tags and client streams", [(f'whispr_mesh_replay_tags{{{J}}}', "{{instance}} replay tags"),
                                            (f'whispr_mesh_client_streams{{{J}}}', "{{instance}} client streams")])

def node_messages(d, job):
    J = f'job="{job}", {I}'
    d.ts("Node messages (replication transport)", [
        (f'rate(whispr_mesh_node_messages_sent_total{{{J}}}[5m])', "{{instance}} sent"),
        (f'rate(whispr_mesh_node_messages_received_total{{{J}}}[5m])', "{{instance}} received"),
        (f'sum by (instance, reason) (rate(whispr_mesh_node_messages_dropped_total{{{J}}}[5m])) > 0', "{{instance}} dropped {{reason}}"),
        (f'sum by (instance, reason) (rate(whispr_mesh_node_message_streams_closed_total{{{J}}}[5m])) > 0', "{{instance}} stream closed {{reason}}")],
        unit="ops")

# ---- relay
d = Dash("whispr-relay", "Whispr relay", "whispr-relay",
         "Edge and mix relays (whispr-relay). Alerts: deploy/prometheus/alerts.yml; runbook: docs/operators.md.")
mesh_sections(d, "whispr-relay")
open("deploy/grafana/whispr-relay.json", "w").write(json.dumps(d.json(), indent=2) + "\n")

# ---- mailbox
J = f'job="whispr-mailbox", {I}'
d = Dash("whispr-mailbox", "Whispr mailbox node", "whispr-mailbox",
         "Mailbox nodes (whispr-mailbox): store, API, replication, and the embedded mesh.")
d.row("Store")
d.stat("Up", [(f'up{{{J}}}', "{{instance}}")], mappings=UP,
       thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
d.stat("Store poisoned", [(f'whispr_mailbox_store_poisoned{{{J}}}', "{{instance}}")], mappings=HEALTH, thresholds=OK_BAD)
d.stat("Mailboxes", [(f'sum(whispr_mailbox_mailboxes{{{J}}})', "mailboxes")])
d.stat("Messages stored", [(f'sum(whispr_mailbox_messages{{{J}}})', "messages")])
d.ts("Deposits", [
    (f'rate(whispr_mailbox_deposits_stored_total{{{J}}}[5m])', "{{instance}} stored"),
    (f'rate(whispr_mailbox_deposits_duplicate_total{{{J}}}[5m])', "{{instance}} duplicate"),
    (f'rate(whispr_mailbox_deposits_refused_total{{{J}}}[5m])', "{{instance}} refused")], unit="ops")
d.ts("Store fsync p99 (alert: > 100 ms)", [(f'whispr:sync_seconds:p99_10m{{{J}}}', "{{instance}} {{store}}")], unit="s",
     thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.1}, {"color": "red", "value": 0.5}])
d.ts("Stored bytes", [(f'whispr_mailbox_stored_bytes{{{J}}}', "{{instance}}")], unit="bytes")
d.ts("Disk writes", [(f'rate(whispr_mailbox_wal_bytes_written_total{{{J}}}[5m])', "{{instance}} WAL"),
                     (f'rate(whispr_mailbox_sst_bytes_written_total{{{J}}}[5m])', "{{instance}} SST")], unit="Bps")
d.ts("Group commit", [(f'rate(whispr_mailbox_commit_batches_total{{{J}}}[5m])', "{{instance}} batches"),
                      (f'rate(whispr_mailbox_commit_batched_total{{{J}}}[5m])', "{{instance}} deposits in batches"),
                      (f'rate(whispr_mailbox_synced_writes_total{{{J}}}[5m])', "{{instance}} synced writes")], unit="ops")
d.ts("Retention", [(f'rate(whispr_mailbox_expired_deleted_total{{{J}}}[1h]) * 3600', "{{instance}} expired deleted / h"),
                   (f'rate(whispr_mailbox_unused_erased_total{{{J}}}[1h]) * 3600', "{{instance}} unused erased / h")])
d.row("Owner API")
d.ts("Sessions, streams, polls", [(f'whispr_mailbox_sessions{{{J}}}', "{{instance}} sessions"),
                                  (f'whispr_mailbox_streams_open{{{J}}}', "{{instance}} streams"),
                                  (f'whispr_mailbox_polls_waiting{{{J}}}', "{{instance}} polls")])
d.ts("Refusals", [(f'rate(whispr_mailbox_rate_limited_total{{{J}}}[5m])', "{{instance}} 429"),
                  (f'rate(whispr_mailbox_auth_failures_total{{{J}}}[5m])', "{{instance}} auth failures")], unit="reqps")
d.row("Replication")
d.ts("Write quorum", [
    (f'rate(whispr_mailbox_replica_receipts_held_total{{{J}}}[5m])', "{{instance}} held"),
    (f'rate(whispr_mailbox_replica_receipts_released_total{{{J}}}[5m])', "{{instance}} released"),
    (f'rate(whispr_mailbox_replica_receipts_timed_out_total{{{J}}}[5m])', "{{instance}} timed out"),
    (f'rate(whispr_mailbox_replica_receipts_dropped_total{{{J}}}[5m])', "{{instance}} dropped (table full)")], unit="ops")
d.ts("Anti-entropy: share of peer summaries differing (alert: > 50 % for 1 h)", [
    (f'rate(whispr_mailbox_replica_summaries_differing_total{{{J}}}[30m]) / rate(whispr_mailbox_replica_summaries_received_total{{{J}}}[30m])', "{{instance}}")],
    unit="percentunit")
d.ts("Anti-entropy digests", [
    (f'rate(whispr_mailbox_replica_digests_sent_total{{{J}}}[5m])', "{{instance}} digests sent"),
    (f'rate(whispr_mailbox_replica_digest_mismatches_total{{{J}}}[5m])', "{{instance}} digest mismatches")], unit="ops")
d.ts("Repair traffic", [
    (f'rate(whispr_mailbox_replica_pushed_total{{{J}}}[5m])', "{{instance}} pushed"),
    (f'rate(whispr_mailbox_replica_stored_from_peers_total{{{J}}}[5m])', "{{instance}} stored from peers"),
    (f'rate(whispr_mailbox_replica_pulled_total{{{J}}}[5m])', "{{instance}} pulled"),
    (f'rate(whispr_mailbox_replica_tombstones_applied_total{{{J}}}[5m])', "{{instance}} tombstones"),
    (f'rate(whispr_mailbox_replica_acks_applied_total{{{J}}}[5m])', "{{instance}} acks applied"),
    (f'rate(whispr_mailbox_replica_records_repaired_total{{{J}}}[5m])', "{{instance}} records repaired")], unit="ops")
d.ts("Replica messages", [
    (f'rate(whispr_mailbox_replica_messages_sent_total{{{J}}}[5m])', "{{instance}} sent"),
    (f'rate(whispr_mailbox_replica_messages_received_total{{{J}}}[5m])', "{{instance}} received"),
    (f'rate(whispr_mailbox_replica_messages_send_failed_total{{{J}}}[5m])', "{{instance}} send failed"),
    (f'rate(whispr_mailbox_replica_messages_malformed_total{{{J}}}[5m])', "{{instance}} malformed"),
    (f'rate(whispr_mailbox_replica_refused_total{{{J}}}[5m])', "{{instance}} refused"),
    (f'rate(whispr_mailbox_replica_records_refused_total{{{J}}}[5m])', "{{instance}} records refused")], unit="ops")
node_messages(d, "whispr-mailbox")
d.row("Backups")
d.stat("Last backup age", [(f'time() - whispr_mailbox_backup_last_success_timestamp_seconds{{{J}}} and whispr_mailbox_backup_last_success_timestamp_seconds{{{J}}} > 0', "{{instance}}")],
       unit="s", thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 900}, {"color": "red", "value": 1800}],
       description="Since the last successful backup (empty: none since the node started).")
d.stat("Last backup size", [(f'whispr_mailbox_backup_last_size_bytes{{{J}}}', "{{instance}}")], unit="bytes")
d.stat("Last backup duration", [(f'whispr_mailbox_backup_last_duration_seconds{{{J}}}', "{{instance}}")], unit="s")
d.stat("Backup failures (1 h)", [(f'increase(whispr_mailbox_backup_failures_total{{{J}}}[1h])', "{{instance}}")],
       thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}])
d.ts("Backups", [(f'increase(whispr_mailbox_backups_total{{{J}}}[1h])', "{{instance}} taken / h"),
                 (f'increase(whispr_mailbox_backup_failures_total{{{J}}}[1h])', "{{instance}} failed / h")])
d.row("Mesh side")
d.ts("Deposits and replies through the mesh", [
    (f'rate(whispr_mailbox_mesh_deposits_accepted_total{{{J}}}[5m])', "{{instance}} deposits accepted"),
    (f'rate(whispr_mailbox_mesh_deposits_refused_total{{{J}}}[5m])', "{{instance}} deposits refused"),
    (f'rate(whispr_mailbox_mesh_surb_replies_accepted_total{{{J}}}[5m])', "{{instance}} SURB replies accepted"),
    (f'rate(whispr_mailbox_mesh_surb_replies_refused_total{{{J}}}[5m])', "{{instance}} SURB replies refused"),
    (f'rate(whispr_mailbox_mesh_replies_sent_total{{{J}}}[5m])', "{{instance}} replies sent"),
    (f'rate(whispr_mailbox_mesh_replies_failed_total{{{J}}}[5m])', "{{instance}} replies failed"),
    (f'rate(whispr_mailbox_replies_total{{{J}}}[5m])', "{{instance}} replies handed to the mesh")], unit="ops")
d.ts("Prekeys and refused payloads", [
    (f'rate(whispr_mailbox_mesh_prekey_requests_total{{{J}}}[5m])', "{{instance}} prekey requests"),
    (f'rate(whispr_mailbox_mesh_prekey_requests_refused_total{{{J}}}[5m])', "{{instance}} prekey requests refused"),
    (f'rate(whispr_mailbox_mesh_payloads_refused_total{{{J}}}[5m])', "{{instance}} payloads refused")], unit="ops")
mesh_sections(d, "whispr-mailbox")
open("deploy/grafana/whispr-mailbox.json", "w").write(json.dumps(d.json(), indent=2) + "\n")

# ---- timer
J = f'job="whispr-timer", {I}'
d = Dash("whispr-timer", "Whispr timer node", "whispr-timer",
         "Timer nodes (whispr-timer): the task queue, holds through the mesh, and the embedded mesh.")
d.row("Queue")
d.stat("Up", [(f'up{{{J}}}', "{{instance}}")], mappings=UP,
       thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
d.stat("Store poisoned", [(f'whispr_timer_store_poisoned{{{J}}}', "{{instance}}")], mappings=HEALTH, thresholds=OK_BAD)
d.stat("Paused categories (emergency stop)", [(f'whispr_timer_paused{{{J}}}', "{{instance}} {{category}}")],
       mappings=PAUSED, thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}], w=12)
d.ts("Tasks by category and state", [(f'sum by (category, state) (whispr_timer_tasks{{{J}}})', "{{category}} {{state}}")])
d.ts("Queue fill by category (alert: > 80 %)", [
    (f'sum by (instance, category) (whispr_timer_tasks{{{J}}}) / on (instance) group_left () whispr_timer_queue_tasks_max{{{J}}}', "{{instance}} {{category}}")],
    unit="percentunit")
d.ts("Fired, failed, quarantined", [
    (f'sum by (category) (rate(whispr_timer_fired_total{{{J}}}[5m]))', "{{category}} fired"),
    (f'sum by (category) (rate(whispr_timer_failures_total{{{J}}}[5m]))', "{{category}} failed"),
    (f'sum by (category) (rate(whispr_timer_quarantined_total{{{J}}}[5m]))', "{{category}} quarantined")], unit="ops")
d.ts("Firing lag (p50, p99; alert: p99 > 60 s)", [
    (f'histogram_quantile(0.5, sum by (category, le) (rate(whispr_timer_fire_lag_ms_bucket{{{J}}}[10m])))', "{{category}} p50"),
    (f'histogram_quantile(0.99, sum by (category, le) (rate(whispr_timer_fire_lag_ms_bucket{{{J}}}[10m])))', "{{category}} p99"),
    (f'sum by (category) (rate(whispr_timer_fire_lag_ms_sum{{{J}}}[10m])) / sum by (category) (rate(whispr_timer_fire_lag_ms_count{{{J}}}[10m]))', "{{category}} mean")],
    unit="ms")
d.ts("Store fsync p99 (alert: > 100 ms)", [(f'whispr:sync_seconds:p99_10m{{{J}}}', "{{instance}} {{store}}")], unit="s")
d.ts("Admin API auth failures and evicted partial holds", [
    (f'rate(whispr_timer_admin_auth_failures_total{{{J}}}[5m])', "{{instance}} admin auth failures"),
    (f'rate(whispr_timer_partial_holds_evicted_total{{{J}}}[5m])', "{{instance}} partial holds evicted")], unit="ops")
d.row("Backups")
d.stat("Last backup age", [(f'time() - whispr_timer_backup_last_success_timestamp_seconds{{{J}}} and whispr_timer_backup_last_success_timestamp_seconds{{{J}}} > 0', "{{instance}}")],
       unit="s", thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 900}, {"color": "red", "value": 1800}],
       description="Since the last successful backup (empty: none since the node started).")
d.stat("Last backup size", [(f'whispr_timer_backup_last_size_bytes{{{J}}}', "{{instance}}")], unit="bytes")
d.stat("Last backup duration", [(f'whispr_timer_backup_last_duration_seconds{{{J}}}', "{{instance}}")], unit="s")
d.stat("Backup failures (1 h)", [(f'increase(whispr_timer_backup_failures_total{{{J}}}[1h])', "{{instance}}")],
       thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}])
d.ts("Backups", [(f'increase(whispr_timer_backups_total{{{J}}}[1h])', "{{instance}} taken / h"),
                 (f'increase(whispr_timer_backup_failures_total{{{J}}}[1h])', "{{instance}} failed / h")])
d.row("Holds through the mesh")
d.ts("Holds", [
    (f'rate(whispr_timer_mesh_parts_accepted_total{{{J}}}[5m])', "{{instance}} parts accepted"),
    (f'rate(whispr_timer_mesh_holds_scheduled_total{{{J}}}[5m])', "{{instance}} holds scheduled"),
    (f'rate(whispr_timer_mesh_holds_duplicate_total{{{J}}}[5m])', "{{instance}} duplicates"),
    (f'rate(whispr_timer_mesh_parts_refused_total{{{J}}}[5m])', "{{instance}} parts refused"),
    (f'rate(whispr_timer_mesh_parts_of_cancelled_total{{{J}}}[5m])', "{{instance}} parts of cancelled"),
    (f'rate(whispr_timer_mesh_deliveries_shed_total{{{J}}}[5m])', "{{instance}} deliveries shed")], unit="ops")
d.ts("Cancels and acknowledgements", [
    (f'rate(whispr_timer_mesh_cancels_total{{{J}}}[5m])', "{{instance}} cancels"),
    (f'rate(whispr_timer_mesh_cancels_refused_total{{{J}}}[5m])', "{{instance}} cancels refused"),
    (f'rate(whispr_timer_mesh_acks_sent_total{{{J}}}[5m])', "{{instance}} acks sent"),
    (f'rate(whispr_timer_mesh_acks_failed_total{{{J}}}[5m])', "{{instance}} acks failed"),
    (f'rate(whispr_timer_mesh_payloads_refused_total{{{J}}}[5m])', "{{instance}} payloads refused")], unit="ops")
mesh_sections(d, "whispr-timer")
open("deploy/grafana/whispr-timer.json", "w").write(json.dumps(d.json(), indent=2) + "\n")

# ---- authority
J = f'job="whispr-authority", {I}'
d = Dash("whispr-authority", "Whispr directory authority", "whispr-authority",
         "Directory authorities (whispr-authority): votes, signatures and the consensus.")
d.row("Consensus")
d.stat("Up", [(f'up{{{J}}}', "{{instance}}")], mappings=UP,
       thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
d.stat("Epochs behind", [(f'whispr_authority_epoch{{{J}}} - whispr_authority_consensus_epoch{{{J}}}', "{{instance}}")],
       thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}, {"color": "red", "value": 2}],
       description="Current epoch minus the epoch of the newest consensus with the threshold of signatures.")
d.stat("Consensus expires in", [(f'whispr_authority_consensus_valid_until_seconds{{{J}}} - time()', "{{instance}}")],
       unit="s", thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0}, {"color": "green", "value": 3600}])
d.stat("Signatures / threshold", [(f'whispr_authority_signatures{{{J}}} / whispr_authority_threshold{{{J}}}', "{{instance}}")],
       unit="percentunit", thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
d.ts("Epochs", [(f'whispr_authority_epoch{{{J}}}', "{{instance}} current"),
                (f'whispr_authority_consensus_epoch{{{J}}}', "{{instance}} newest consensus")], unit="none")
d.ts("Votes and signatures this epoch", [
    (f'whispr_authority_votes{{{J}}}', "{{instance}} votes"),
    (f'whispr_authority_signatures{{{J}}}', "{{instance}} signatures"),
    (f'whispr_authority_threshold{{{J}}}', "{{instance}} threshold"),
    (f'whispr_authority_authorities{{{J}}}', "{{instance}} authorities")])
d.ts("Descriptors", [(f'whispr_authority_descriptors{{{J}}}', "{{instance}} held"),
                     (f'whispr_authority_descriptors_admitted{{{J}}}', "{{instance}} admitted")])
d.ts("Nodes: descriptor submissions (all node kinds)", [
    (f'sum by (result) (increase(whispr_mesh_descriptor_submissions_total[1h]))', "{{result}}")],
    description="What the nodes report about their own submissions, per hour.")
open("deploy/grafana/whispr-authority.json", "w").write(json.dumps(d.json(), indent=2) + "\n")
