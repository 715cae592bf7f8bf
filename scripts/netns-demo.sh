#!/usr/bin/env bash
# Real clients (curl, wrk) and servers (testbackend) through switchyard on
# AF_PACKET ports in network namespaces it builds and removes.
# Usage: scripts/netns-demo.sh [nat|dr|tunnel|compare [SECONDS]]   (as root)
# compare: wrk direct, through switchyard nat/dr/tunnel and through HAProxy
# (mode tcp), keep-alive and short connections, in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
tools=(ip:iproute2 ethtool:ethtool curl:curl wrk:wrk python3:python3)
[ "${1:-}" = compare ] && tools+=(haproxy:haproxy)
for t in "${tools[@]}"; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --workspace --bins --quiet
exec target/release/netns-demo "${@:-nat}"
