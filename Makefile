# Whispr Mesh — every command the project needs. `make deps` then `make test` on a fresh
# Debian machine; CI runs exactly that (.ci/run).

SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the build needs: a C/C++ toolchain for RocksDB, libclang for its bindings.
APT_PACKAGES := build-essential pkg-config libclang-dev
FUZZ_SECONDS ?= 30
# cargo-deny, installed by `make deps` when missing (deny.toml is written for this version);
# built in cargo's own temporary directory, not in CARGO_TARGET_DIR (which .ci/run sets).
CARGO_DENY_VERSION := 0.20.2
# The one platform deny.toml checks ([graph] targets); `make deny` fetches its crates.
DENY_TARGET := x86_64-unknown-linux-gnu
# Schemathesis, the API fuzzer of `make api-fuzz` (mailbox/tests/api_fuzz.rs,
# timer-service/tests/api_fuzz.rs), installed by `make deps` into its own virtual environment
# (PyPI through pip).
SCHEMATHESIS_VERSION := 4.32.5
SCHEMATHESIS_VENV := $(HOME)/.cache/whispr-mesh/schemathesis-$(SCHEMATHESIS_VERSION)
# Forbidden in whispr-protocol's normal dependency tree.
PROTOCOL_FORBIDDEN := tokio|libp2p|rocksdb|librocksdb-sys|axum|hyper|mio
# Forbidden in the client core (client/src/core): a clock, I/O, a runtime or a task.
CORE_FORBIDDEN := tokio|reqwest|tungstenite|SystemTime|Instant|std::fs|std::net|std::thread|std::io|async |\.await|now_ms|crate::(net|vault|devnet|client)

.PHONY: deps demo test fmt-check clippy check-deps deny audit unit fuzz bench observability-checks sim-build sim-docs sim-bench sim-bench-build bench-config flaky-hunt observability api-fuzz dos-budget

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends $$missing; \
	else echo "system packages present"; fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@$(CARGO) deny --version >/dev/null 2>&1 || env -u CARGO_TARGET_DIR $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION)
	@# promtool and prometheus (Debian package prometheus) and systemd-analyze (package systemd) for
	@# `make observability`. Installing the package also enables its server (prometheus.service,
	@# port 9090), which nothing here needs: where systemd runs, it is disabled and stopped again.
	@if ! command -v promtool >/dev/null || ! command -v systemd-analyze >/dev/null; then \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends prometheus systemd && \
	  if [ -d /run/systemd/system ]; then $$SUDO systemctl disable --now prometheus.service || true; fi; \
	fi
	@if ! $(SCHEMATHESIS_VENV)/bin/schemathesis --version >/dev/null 2>&1; then \
	  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then \
	    SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO=sudo; \
	    $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends python3 python3-venv; \
	  fi; \
	  rm -rf $(SCHEMATHESIS_VENV) && python3 -m venv $(SCHEMATHESIS_VENV) && \
	  $(SCHEMATHESIS_VENV)/bin/pip install --quiet schemathesis==$(SCHEMATHESIS_VERSION); \
	fi

# A local network of real node processes and two users talking through it (scripts/demo.sh).
# Same profile as the tests (`test`, in target/debug), so the demo reuses their build.
demo: deps
	$(CARGO) build --workspace --bins --profile test
	bash scripts/demo.sh

# `observability-checks`, not `observability`: `unit` has just built every binary (cargo test
# builds them for the process-level tests), and a `cargo build --bins` would compile our crates
# again without the dev-dependencies' features (about 3 minutes on 2 cores) for the same code.
test: deps fmt-check clippy check-deps deny unit observability-checks api-fuzz

fmt-check:
	$(CARGO) fmt --all -- --check

# `--profile test`: the same profile as `cargo test`, so that clippy and the tests share one
# build of every dependency (cargo keys build-script output by profile name, so a `dev`-profile
# clippy would compile RocksDB's C++ a second time). With it, the export below gives build
# scripts the debug info of the crates they share with the targets; together they make
# clippy's and the tests' RocksDB the same build.
clippy:
	$(CARGO) clippy --workspace --all-targets --profile test -- -D warnings

# whispr-protocol must not depend on a runtime, network or storage crate; the client core
# (client/src/core) must not read a clock or do I/O.
check-deps:
	@found=$$($(CARGO) tree -p whispr-protocol -e normal --prefix none | sed 's/ .*//' | grep -xE '$(PROTOCOL_FORBIDDEN)' | sort -u); \
	if [ -n "$$found" ]; then echo "whispr-protocol depends on forbidden crates: $$found"; exit 1; fi; \
	echo "whispr-protocol: no runtime, network or storage dependency"
	@found=$$(grep -nE '$(CORE_FORBIDDEN)' client/src/core/*.rs); \
	if [ -n "$$found" ]; then echo "the client core reads a clock or does I/O:"; echo "$$found"; exit 1; fi; \
	echo "client core: no clock, socket, file or task"

# Supply chain (deny.toml; docs/dependencies.md, "Supply chain"): licences against the
# allow-list, banned crates and wildcard versions, crates.io as the only source. The check
# itself is offline (`--frozen`); `cargo fetch` only downloads what the build downloads anyway
# from crates.io (a no-op after a build), so `make deny` also works before the first build.
deny:
	$(CARGO) fetch --locked --target $(DENY_TARGET)
	$(CARGO) deny --frozen check --hide-inclusion-graph licenses bans sources

# Known advisories (RustSec) against Cargo.lock. Needs github.com to clone or update the
# advisory database into $CARGO_HOME/advisory-dbs, so it is not part of `make test`; it fails
# with "failed to fetch advisory database" where GitHub is unreachable (docs/dependencies.md).
audit:
	$(CARGO) deny --locked check --hide-inclusion-graph advisories

# The whole test suite, doc tests included; also replays the committed fuzz corpus
# (protocol/tests/fuzz_corpus.rs). What `cargo test --workspace` runs, in two lanes at once:
# the devnet tests of the `whispr` command beside everything else (scripts/unit-tests.sh;
# SERIAL=1 for one after the other).
unit:
	CARGO=$(CARGO) bash scripts/unit-tests.sh

# Operations files in deploy/: the Prometheus rules (`promtool check rules` and their unit
# tests), the Grafana dashboards (JSON, PromQL), every metric name they use against a devnet of
# real nodes (scripts/check-observability.sh), and the systemd units (`systemd-analyze verify`
# and `security`; scripts/check-systemd-units.sh). docs/operators.md, "Alerts, dashboards
# and incidents".
observability:
	$(CARGO) build --workspace --bins --profile test
	$(MAKE) observability-checks

# The same checks on the binaries already built (by `cargo build --bins` or `cargo test`).
observability-checks:
	bash scripts/check-observability.sh
	bash scripts/check-systemd-units.sh

# The mailbox API and the timer's admin API against their OpenAPI documents: Schemathesis
# fuzzes a live whispr-mailbox and a live whispr-timer process (`--test api_fuzz` runs both
# packages' tests/api_fuzz.rs; docs/mailbox.md and docs/timer.md, "API contract and fuzzing").
# About a minute and a quarter; API_FUZZ_EXAMPLES (default 30 per operation and phase) and
# API_FUZZ_SEED (default 1).
api-fuzz:
	SCHEMATHESIS=$(SCHEMATHESIS_VENV)/bin/schemathesis $(CARGO) test --workspace --profile test --test api_fuzz -- --ignored --nocapture

# Runs every fuzz target for FUZZ_SECONDS seconds each (needs cargo-fuzz; uses the nightly
# toolchain when installed, otherwise RUSTC_BOOTSTRAP on stable).
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

# `--workspace --bench NAME`, never `-p PACKAGE`: cargo unifies features over the packages it
# is asked for, so each `-p` would be its own feature set and its own build of RocksDB's C++.
# Every table of docs/benchmarks.md that issue 19 sets a target for: the protocol's per-hop
# crypto, 1M timers and durable deposits against Redis, the relay (per hop, one relay alone,
# the 3-hop chain windowed and paced at 1000/s), and last the simulator's `large.toml`
# (sim-bench: 22 GiB resident, 25 GiB with what was swapped out, and 1 h 15 min of CPU in its
# run of 2026-12-06: give it a machine with >= 32 GiB or swap).
# Every bench is built in the tests' profile with our crates raised to opt-level 3 on the
# command line (BENCH_CARGO_ARGS, the same flags as the simulator's): release-grade code where
# the CPU goes, and RocksDB's C++ and every other dependency keep the tests' build (no second
# 18-minute build in cargo's `bench` profile; `cargo build -v` shows `Fresh librocksdb-sys`).
# Our crates keep the test profile's debug assertions and overflow checks.
BENCH_CARGO_ARGS = --profile test $(SIM_OPT_CONFIG)
# Prints the --config flags, for a bench run by hand:
#   cargo bench --workspace --profile test $(make -s bench-config) --bench mesh -- ...
bench-config:
	@echo $(SIM_OPT_CONFIG)

bench:
	$(CARGO) bench --workspace $(BENCH_CARGO_ARGS) --bench protocol -- --noplot
	BENCH_PROFILE=test BENCH_CARGO_ARGS="$(SIM_OPT_CONFIG)" bash timer-service/bench/run.sh
	BENCH_PROFILE=test BENCH_CARGO_ARGS="$(SIM_OPT_CONFIG)" bash mailbox/bench/run.sh
	$(CARGO) bench --workspace $(BENCH_CARGO_ARGS) --bench mesh
	$(MAKE) sim-bench

# The DoS budget (docs/dos-budget.md): a load generator (client/examples/dos_budget.rs) attacks
# one resource at a time of a devnet of real nodes while an honest client keeps using it
# (scripts/dos-budget.sh, about 10 minutes; not part of `make test`). PHASES (default all):
# connections,challenges,creation,mixqueue,replay.
PHASES ?= connections,challenges,creation,mixqueue,replay
dos-budget:
	$(CARGO) build --workspace --bins --examples --profile test
	bash scripts/dos-budget.sh $(PHASES)

# The process-level tests N times in a row beside two CPU burners, failures per test
# (scripts/flaky-hunt.sh; docs/testing.md).
N ?= 10
flaky-hunt:
	bash scripts/flaky-hunt.sh $(N)

# The simulator's binary, in the tests' profile (target/debug/whispr-sim, or under
# $CARGO_TARGET_DIR). `target/debug/whispr-sim run simulator/scenarios/small.toml --out DIR`.
SIM_BIN = $${CARGO_TARGET_DIR:-target}/debug/whispr-sim
sim-build:
	$(CARGO) build --workspace --bins --profile test

# Regenerates the sweep plots shown in docs/simulator.md.
sim-docs: sim-build
	rm -rf target/sim/loopix-sweep
	$(SIM_BIN) sweep simulator/scenarios/loopix-like.toml --param mixing.delay_ms_mean=10,20,50,100,200 --seed 1 --out target/sim/loopix-sweep
	mkdir -p docs/simulator
	cp target/sim/loopix-sweep/sweep.csv target/sim/loopix-sweep/*.svg target/sim/loopix-sweep/*.png docs/simulator/
	cp target/sim/loopix-sweep/mixing.delay_ms_mean=50/latency_cdf.png target/sim/loopix-sweep/mixing.delay_ms_mean=50/entropy.png target/sim/loopix-sweep/mixing.delay_ms_mean=50/delivery.png docs/simulator/

# The large scenario (10k nodes, 100k users, >1M messages): the benchmark in docs/benchmarks.md.
# Its binary is the tests' profile with our crates at opt-level 3, set on the command line
# (`--config`), so that RocksDB's C++ and every other dependency keep the tests' build
# (`cargo build -v` shows `Fresh librocksdb-sys`) and `make test`'s artifacts are left alone
# (ours get artifacts of their own); copied to target/sim/whispr-sim-opt.
SIM_OPT_CRATES = whispr-protocol whispr-relay whispr-mailbox whispr-timer-service whispr-client whispr-simulator
SIM_OPT_CONFIG = $(foreach p,$(SIM_OPT_CRATES),--config profile.test.package.$(p).opt-level=3)
SIM_OPT_BIN = $${CARGO_TARGET_DIR:-target}/sim/whispr-sim-opt
sim-bench-build:
	$(CARGO) build --workspace --profile test --bin whispr-sim $(SIM_OPT_CONFIG)
	mkdir -p $${CARGO_TARGET_DIR:-target}/sim
	cp $(SIM_BIN) $(SIM_OPT_BIN)

sim-bench: sim-bench-build
	rm -rf target/sim/large
	/usr/bin/time -v $(SIM_OPT_BIN) run simulator/scenarios/large.toml --seed 1 --out target/sim/large
	cat target/sim/large/run.json
