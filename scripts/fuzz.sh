#!/usr/bin/env bash
# Coverage-guided fuzzing of switchyard's parsers with libFuzzer on the
# stable toolchain (no cargo-fuzz, no nightly): the targets in fuzz/ are built
# with LLVM's sanitizer-coverage passes, which is what libfuzzer-sys needs.
#
#   scripts/fuzz.sh build                 build every target
#   scripts/fuzz.sh run TARGET SECONDS    fuzz one target (corpus kept in fuzz/corpus/TARGET)
#   scripts/fuzz.sh smoke [SECONDS]       every target for SECONDS (default 15): the CI step
#   scripts/fuzz.sh list                  the targets
#
# A crash leaves its input in fuzz/artifacts/TARGET/; turn it into a
# regression test beside the code it broke, then keep the input in
# fuzz/regressions/TARGET/ where every run replays it first.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
fz=$here/fuzz
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$here/target/fuzz}
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' "$fz/Cargo.toml" | grep -v '^switchyard-fuzz$'; }

# An explicit --target keeps the instrumentation out of build scripts and
# proc macros, which run on the host and have no libFuzzer to link.
triple=$(rustc -vV | sed -n 's/^host: //p')
build() { (cd "$fz" && cargo build --release --bins --quiet --target "$triple"); }

run() {
    local t=$1 secs=$2
    local corpus=$fz/corpus/$t art=$fz/artifacts/$t reg=$fz/regressions/$t seeds=$fz/seeds/$t
    mkdir -p "$corpus" "$art" "$reg"
    local dirs=("$corpus")
    [[ -d $seeds ]] && dirs+=("$seeds")
    [[ -n $(ls -A "$reg" 2>/dev/null) ]] && dirs+=("$reg")
    local dict=()
    [[ -f $fz/dicts/$t.dict ]] && dict=(-dict="$fz/dicts/$t.dict")
    "$CARGO_TARGET_DIR/$triple/release/$t" "${dirs[@]}" "${dict[@]}" -max_total_time="$secs" \
        -artifact_prefix="$art/" -print_final_stats=1 -max_len=4096 -timeout=10 -rss_limit_mb=2048 2>&1 |
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added|#[0-9]+ *DONE|==[0-9]+==|.*(panicked|ERROR|SUMMARY|Test unit written)).*' || true
    [[ -z $(ls -A "$art" 2>/dev/null) ]] || { echo "fuzz: $t found a failing input: $art" >&2; return 1; }
}

case ${1:-smoke} in
    build) build ;;
    list) targets ;;
    run) build; run "$2" "${3:-60}" ;;
    smoke)
        build
        failed=0
        for t in $(targets); do
            if run "$t" "${2:-15}"; then echo "fuzz $t: ok"; else echo "fuzz $t: FAILED"; failed=1; fi
        done
        exit "$failed" ;;
    *) echo "usage: $0 build|list|run TARGET SECONDS|smoke [SECONDS]" >&2; exit 2 ;;
esac
