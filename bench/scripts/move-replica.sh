#!/usr/bin/env bash
# Measures how long moving one group replica takes when the group holds N messages
# of history (default 100000): a local 4-node cluster (3 initial nodes, 1 data group),
# N messages published to one conversation, node 4 added, then node 3 removed — which
# moves node 3's replica to node 4 (learner, caught up, voter, old replica out).
#
#   bench/scripts/move-replica.sh [MESSAGES] [PAYLOAD_BYTES]
#
# Prints the `herald cluster remove-node --wait` wall time and the metadata leader's
# `moved a replica ... took_ms` log line. Release build; everything on this machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
messages=${1:-100000}
payload=${2:-128}
base=${HERALD_BENCH_BASE_PORT:-7610}
dir=$(mktemp -d -t herald-move-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -z ${HERALD_BENCH_KEEP:-} ]]; then rm -rf "$dir"; else echo "kept $dir"; fi
}
trap cleanup EXIT

cargo build -q --release -p herald-broker -p herald-bench
herald=target/release/herald
bench=target/release/herald-bench
admin() { echo "127.0.0.1:$((base + 10 * ($1 - 1) + 1))"; }
quic() { echo "127.0.0.1:$((base + 10 * ($1 - 1)))"; }

"$herald" dev-cluster --nodes 4 --initial 3 --groups 1 --data-dir "$dir" --base-port "$base" >/dev/null
start() {
    RUST_LOG=info NO_COLOR=1 "$herald" serve --config "$dir/node$1.toml" >/dev/null 2>"$dir/node$1.log" &
    pids+=($!)
}
# GET /readyz with bash alone (no curl on a fresh machine): true on 200.
ready() {
    local hostport port
    hostport=$(admin "$1")
    port=${hostport##*:}
    exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
    local status
    read -r _ status _ <&3 || true
    exec 3<&-
    [[ $status == 200 ]]
}
wait_ready() {
    for _ in $(seq 1 600); do
        if ready "$1"; then return 0; fi
        sleep 0.1
    done
    echo "node $1 not ready" >&2
    exit 1
}
for k in 1 2 3; do start "$k"; done
for k in 1 2 3; do wait_ready "$k"; done

echo "== publishing $messages messages of $payload bytes to one conversation"
"$bench" publish --addr "$(quic 1),$(quic 2),$(quic 3)" --ca "$dir/ca.pem" --secret-file "$dir/secret" \
    --publishers 4 --window 64 --messages "$messages" --payload-bytes "$payload" --conv 77 --quiet \
    | tail -1

echo "== adding node 4 (no move: 1 group of 3 replicas on 4 nodes is balanced)"
start 4
"$herald" cluster add-node --admin "$(admin 1)" --id 4 --addr "$(quic 4)" --wait
wait_ready 4

echo "== removing node 3: its replica moves to node 4"
started=$EPOCHREALTIME
"$herald" cluster remove-node --admin "$(admin 1)" --id 3 --wait
ended=$EPOCHREALTIME
awk -v a="$started" -v b="$ended" 'BEGIN { printf "remove-node --wait took %.2f s\n", b - a }'
grep -h "moved a replica" "$dir"/node*.log | sed 's/^.*moved a replica/moved a replica/' || true
"$herald" status --admin "$(admin 1),$(admin 2),$(admin 4)"
echo "== node 4's shared log (the moved replica's history is in it)"
"$herald" status --admin "$(admin 4)" --json | grep -A3 '"log"'
