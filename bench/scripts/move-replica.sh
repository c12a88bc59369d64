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
source "$(dirname "$0")/lib.sh"
messages=${1:-100000}
payload=${2:-128}

write_cluster --nodes 4 --initial 3 --groups 1
for k in 1 2 3; do start "$k"; done
for k in 1 2 3; do wait_ready "$k"; done

echo "== publishing $messages messages of $payload bytes to one conversation"
"$bench" publish --addr "$(quic 1),$(quic 2),$(quic 3)" --ca "$dir/c/ca.pem" --secret-file "$dir/c/secret" \
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
grep -h "moved a replica\|new replica caught up" "$dir"/c/node*.log | sed 's/^.*Z *INFO [^ ]* //' || true
"$herald" status --admin "$(admin 1),$(admin 2),$(admin 4)"
echo "== node 4's shared log (the moved replica's history is in it)"
"$herald" status --admin "$(admin 4)" --json | grep -A3 '"log"'
