#!/usr/bin/env bash
# The whole test suite: installs what a fresh machine lacks, builds the
# binaries the multi-process tests start, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v pkill >/dev/null 2>&1 || missing+=(procps)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v hping3 >/dev/null 2>&1 || missing+=(hping3)
command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}"
    else
        echo "missing packages: ${missing[*]} (install them as root)" >&2
        exit 1
    fi
fi

cargo build --release --workspace --bins
# Multi-process tests start real daemons pinned to CPUs; one test at a time
# keeps them from starving each other on a small machine.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --no-fail-fast -- --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The fuzz targets' smoke run (scripts/fuzz.sh): each target from its seeds
# and regression inputs for a few seconds; a crash fails the suite. Each
# target counts as one test in the closing line.
set +e
bash scripts/fuzz.sh smoke "${FUZZ_SMOKE_SECONDS:-10}" 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
set -e
[ "$fuzz_status" = 0 ] || status=1
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     /^fuzz [a-z_]+: ok/ { p += 1 } /^fuzz [a-z_]+: FAILED/ { f += 1 }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
