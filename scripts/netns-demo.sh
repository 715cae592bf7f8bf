#!/usr/bin/env bash
# Real clients (curl, wrk) and servers (testbackend) through switchyard on
# AF_PACKET ports in network namespaces it builds and removes.
# Usage: scripts/netns-demo.sh [nat|dr]   (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for t in ip:iproute2 ethtool:ethtool curl:curl wrk:wrk; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --workspace --bins --quiet
exec target/release/netns-demo "${1:-nat}"
