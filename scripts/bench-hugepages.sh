#!/usr/bin/env bash
# `lbgen bench` with the shared region on huge pages, without changing the
# host: a private mount namespace gets its own tmpfs on /dev/shm mounted
# huge=advise (switchyard's mappings ask for huge pages; nothing else in
# the namespace does). Root. Arguments go to `lbgen bench`.
#
#   scripts/bench-hugepages.sh [--frames 64 --verbose ...]
#
# Production does the same with `mount -o remount,huge=advise /dev/shm`
# (docs/OPERATIONS.md, Sizing a switch).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins -q
exec unshare --mount --propagation private -- sh -c '
    mount -t tmpfs -o huge=advise,mode=1777,size=50% tmpfs /dev/shm &&
    exec target/release/lbgen bench "$@"' lbgen-bench "$@"
