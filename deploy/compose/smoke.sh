#!/usr/bin/env bash
# Smoke test of the container path, run by .ci/run when time allows: builds the image,
# brings the 3-node compose cluster up (up.sh waits until every node is ready),
# publishes through node1, reads the history back from node3, kills node1's container
# and publishes through the others, then tears everything down (volumes included).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Never reuse a previous run's data or CA.
"$here/down.sh" --volumes >/dev/null 2>&1 || true
trap '"$here/down.sh" --volumes >/dev/null 2>&1 || true' EXIT

"$here/up.sh"
herald="${HERALD_BIN:-$root/target/static/x86_64-unknown-linux-gnu/release/herald}"
gen="$here/generated"
export HERALD_CA="$gen/ca.pem"
HERALD_TOKEN="$("$herald" token --secret-file "$gen/secret" --service smoke)"
export HERALD_TOKEN

echo "==> publish 3 through node1, read them from node3"
HERALD_ADDR=127.0.0.1:7510 "$herald" conv create --id 1 --kind group --members 1
HERALD_ADDR=127.0.0.1:7510 "$herald" pub --conv 1 --count 3 smoke
history="$(HERALD_ADDR=127.0.0.1:7530 "$herald" history --conv 1 --from 1)"
echo "$history"
count="$(grep -c smoke <<<"$history" || true)"
[[ "$count" == 3 ]] || { echo "smoke: node3 holds $count of 3 messages" >&2; exit 1; }

echo "==> docker kill node1; publish through node2/node3"
"${compose[@]}" kill node1
start=$(date +%s%N)
HERALD_ADDR=127.0.0.1:7520,127.0.0.1:7530 "$herald" pub --conv 1 after-kill
echo "    acked $(( ($(date +%s%N) - start) / 1000000 )) ms after the kill"
history="$(HERALD_ADDR=127.0.0.1:7530 "$herald" history --conv 1 --from 1)"
grep -q after-kill <<<"$history" || { echo "smoke: the publish after the kill is missing" >&2; exit 1; }
echo "==> compose smoke test passed"
