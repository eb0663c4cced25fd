#!/usr/bin/env bash
# Runs every whispr-protocol fuzz target (or the ones named as arguments) for $FUZZ_SECONDS
# seconds each (default 30) with cargo-fuzz/libFuzzer, and exits non-zero if any target
# crashes, times out or runs out of memory. See fuzz/README.md.
#
#   bash fuzz/run.sh                      # all targets, 30 s each
#   FUZZ_SECONDS=300 bash fuzz/run.sh packet envelope
#   bash fuzz/run.sh --update-corpus wire # also merge new coverage into fuzz/corpus/wire/
#
# Environment:
#   FUZZ_SECONDS       seconds per target (default 30)
#   CARGO_TARGET_DIR   build directory (default fuzz/target)
#   FUZZ_JOBS          libFuzzer -fork workers per target (default 1: no fork mode)
#   FUZZ_ARGS          extra libFuzzer options, e.g. "-max_len=16384" (default: none)
#   FUZZ_SANITIZER     cargo-fuzz sanitizer: address (default) or none (3-10x faster; for long
#                      campaigns: safe Rust has no memory errors for ASan to find, and a panic,
#                      hang or memory blow-up is caught either way)
#
# The committed corpus (fuzz/corpus/<target>/) and saved crashes (fuzz/regressions/<target>/)
# are read-only inputs: libFuzzer writes what it discovers into a scratch directory, so a run
# leaves the tree clean. With --update-corpus, the scratch inputs that add coverage are merged
# into fuzz/corpus/<target>/ afterwards (libFuzzer -merge=1), to be reviewed and committed.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_JOBS="${FUZZ_JOBS:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FUZZ_DIR/target}"

update_corpus=0
targets=()
for arg in "$@"; do
    case "$arg" in
        --update-corpus) update_corpus=1 ;;
        -h | --help)
            sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "run.sh: unknown option $arg" >&2
            exit 2
            ;;
        *) targets+=("$arg") ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    # The targets are the files in fuzz_targets/ (the same list as fuzzing::TARGETS, which
    # protocol/tests/fuzz_corpus.rs checks against the corpus directories).
    for file in "$FUZZ_DIR"/fuzz_targets/*.rs; do
        targets+=("$(basename "$file" .rs)")
    done
fi
for target in "${targets[@]}"; do
    if [ ! -f "$FUZZ_DIR/fuzz_targets/$target.rs" ]; then
        echo "run.sh: no fuzz target $target (fuzz/fuzz_targets/$target.rs)" >&2
        exit 2
    fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found: installing it"
    cargo install cargo-fuzz --locked
fi

# libFuzzer needs nightly-only rustc flags (-Zsanitizer, sancov passes): use the nightly
# toolchain when rustup has one, otherwise unlock them on the stable compiler.
if command -v rustup >/dev/null 2>&1 && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
    toolchain="nightly"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    toolchain="stable with RUSTC_BOOTSTRAP=1"
fi

# -O: build with the release profile of fuzz/Cargo.toml, which turns debug assertions and
# overflow checks on for everything but sphinx-packet. Without -O, cargo-fuzz passes
# -Cdebug-assertions in RUSTFLAGS to every crate, sphinx-packet included (see README.md).
build_flags=(-O --fuzz-dir "$FUZZ_DIR" -s "${FUZZ_SANITIZER:-address}")

scratch="$(mktemp -d "${TMPDIR:-/tmp}/whispr-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

echo "fuzzing ${targets[*]} for ${FUZZ_SECONDS}s each ($toolchain, sanitizer ${FUZZ_SANITIZER:-address}, target dir $CARGO_TARGET_DIR)"
"${fuzz[@]}" build "${build_flags[@]}"

failed=()
summary=()
for target in "${targets[@]}"; do
    new="$scratch/$target"
    mkdir -p "$new"
    corpora=("$new" "$FUZZ_DIR/corpus/$target")
    if [ -d "$FUZZ_DIR/regressions/$target" ]; then
        corpora+=("$FUZZ_DIR/regressions/$target")
    fi
    # shellcheck disable=SC2206 # FUZZ_ARGS is a list of options, split on spaces.
    libfuzzer_args=(-max_total_time="$FUZZ_SECONDS" -print_final_stats=1 ${FUZZ_ARGS:-})
    if [ "$FUZZ_JOBS" -gt 1 ]; then
        libfuzzer_args+=(-fork="$FUZZ_JOBS")
    fi
    log="$scratch/$target.log"
    echo "=== $target: ${FUZZ_SECONDS}s"
    status=0
    "${fuzz[@]}" run "${build_flags[@]}" "$target" "${corpora[@]}" -- "${libfuzzer_args[@]}" \
        2>&1 | tee "$log" || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        summary+=("$target: FAILED (exit $status), crash input in fuzz/artifacts/$target/")
        continue
    fi
    summary+=("$target: ok, ${execs:-?} executions in ${FUZZ_SECONDS}s, $(find "$new" -type f | wc -l) new inputs")
    if [ "$update_corpus" -eq 1 ]; then
        "${fuzz[@]}" run "${build_flags[@]}" "$target" "$FUZZ_DIR/corpus/$target" "$new" -- -merge=1 \
            >"$scratch/$target.merge.log" 2>&1
        echo "merged new coverage into fuzz/corpus/$target/"
    fi
done

echo
echo "=== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "crashes in: ${failed[*]}: minimise with \`cargo +nightly fuzz tmin -O <target> <file>\`," >&2
    echo "then copy the input into fuzz/regressions/<target>/ (see fuzz/README.md)" >&2
    exit 1
fi
