#!/usr/bin/env bash
# Instructions per packet of a whole switchd process (poll loop, vnic
# driver and filter together), counted by callgrind while `lbgen bench`
# drives it: one run per scenario, 64-byte frames.
#
#   scripts/switchd-instructions.sh [SECONDS]
#
# Prints, per scenario, the instructions switchd executed inside its poll
# loop divided by the frames it received. Instruction counts do not depend
# on what else the machine runs, so this compares builds on a noisy box;
# it says nothing about cache misses (see docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-2}"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
cargo build --release --workspace --bins -q
work="$(mktemp -d /tmp/switchd-instructions.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cp target/release/controld "$work/"
real="$(pwd)/target/release/switchd"
cat >"$work/switchd" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/cg.%p \
  "--toggle-collect=switchd::engine::run*" "$real" "\$@"
EOF
chmod +x "$work/switchd"
SWITCHYARD_BIN_DIR="$work" target/release/lbgen bench --runs 1 --seconds "$secs" --frames 64 --verbose 2>"$work/frames" >/dev/null
python3 - "$work" <<'EOF'
import glob, re, sys
work = sys.argv[1]
names = ["null", "established", "new_flows", "mix", "established_full_queue"]
frames = dict(re.findall(r"^run \d+ \d+ B (\w+): .*received (\d+) frames", open(work + "/frames").read(), re.M))
for k, name in enumerate(names):
    for f in glob.glob(work + "/cg.*"):
        text = open(f, errors="replace").read()
        if not re.search(r"--instance bench-\d+-\d+-\d+-%d " % k, text):
            continue
        total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))
        n = int(frames.get(name, 0))
        per = total / n if n else float("nan")
        print(f"{name:<12} {per:8.0f} instructions/frame   ({total} over {n} frames)")
EOF
