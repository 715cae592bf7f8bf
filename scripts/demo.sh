#!/usr/bin/env bash
# The appliance's main job on the embedded default (virtual NICs in shared
# memory): build, start controld (which starts its switchd processes) with
# the demo configuration, drive TCP and UDP flows through it with lbgen,
# print the per-backend distribution, throughput and a shmdump summary, and
# stop, leaving no process or region behind.
set -euo pipefail
cd "$(dirname "$0")/.."

FLOWS=${FLOWS:-50000}
echo "== building (release)"
cargo build --release --workspace --bins --quiet
BIN=target/release

inst="demo-$$"
work=$(mktemp -d)
sed "s/^instance = .*/instance = \"$inst\"/" packaging/examples/demo.toml > "$work/switchyard.toml"

controld_pid=""
cleanup() {
    if [ -n "$controld_pid" ] && kill -0 "$controld_pid" 2>/dev/null; then
        kill -TERM "$controld_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$controld_pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$controld_pid" 2>/dev/null || true
    fi
    pkill -KILL -f -- "--instance $inst " 2>/dev/null || true
    rm -f /dev/shm/switchyard."$inst" /dev/shm/switchyard."$inst".* 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== controld --check"
"$BIN/controld" --config "$work/switchyard.toml" --check
echo "== starting controld (instance $inst)"
RUST_LOG=${RUST_LOG:-info} "$BIN/controld" --config "$work/switchyard.toml" --switchd "$BIN/switchd" 2> "$work/controld.log" &
controld_pid=$!
for _ in $(seq 1 200); do
    if "$BIN/shmdump" --instance "$inst" --json 2>/dev/null | grep -q '"state": "running"'; then break; fi
    sleep 0.05
done
sed 's/^/  controld: /' "$work/controld.log"

echo "== lbgen: $FLOWS flows over every service (TCP: SYN, SYN-ACK, data, reply, FIN; UDP: request/response)"
"$BIN/lbgen" --instance "$inst" --flows "$FLOWS" --concurrency 512 --data-packets 2
echo
echo "== shmdump"
"$BIN/shmdump" --instance "$inst"
echo
echo "== stopping"
kill -TERM "$controld_pid"
wait "$controld_pid" || true
controld_pid=""
sed 's/^/  controld: /' "$work/controld.log" | tail -n 3
left=$(ls /dev/shm | grep -c "^switchyard\.$inst" || true)
echo "left behind in /dev/shm: $left"
