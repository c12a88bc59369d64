#!/usr/bin/env bash
# Checks the Grafana dashboard against what a node really exports: starts `herald dev`
# on free loopback ports, publishes a few messages (so histograms and labelled series
# exist), saves its /metrics and runs check.py on the dashboard and that text.
#
#   deploy/grafana/check.sh          # env: HERALD (a built herald; default: cargo build)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ -z "${HERALD:-}" ]]; then
    (cd "$root" && cargo build --quiet --locked --bin herald)
    HERALD="$root/target/debug/herald"
fi
work="$(mktemp -d)"
pid=""
cleanup() {
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Two free ports from the kernel (bind to port 0, read, close).
read -r quic admin < <(python3 -c '
import socket
a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
"$HERALD" dev --data-dir "$work/data" --listen "127.0.0.1:$quic" --admin "127.0.0.1:$admin" \
    >"$work/node.log" 2>&1 &
pid=$!
for _ in $(seq 300); do
    curl -sf "127.0.0.1:$admin/readyz" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/node.log" >&2; exit 1; }
    sleep 0.1
done
curl -sf "127.0.0.1:$admin/readyz" >/dev/null || { echo "herald dev never became ready" >&2; exit 1; }
client=(--addr "127.0.0.1:$quic" --ca "$work/data/dev/ca.pem")
HERALD_TOKEN="$("$HERALD" token --secret-file "$work/data/dev/secret" --service grafana-check)"
export HERALD_TOKEN
"$HERALD" conv create --id 1 --kind group --members 1 "${client[@]}" >/dev/null
"$HERALD" pub --conv 1 --count 5 check "${client[@]}" >/dev/null
"$HERALD" history --conv 1 --from 1 "${client[@]}" >/dev/null
curl -sf "127.0.0.1:$admin/metrics" >"$work/metrics.txt"
python3 "$here/check.py" "$here/herald-dashboard.json" "$work/metrics.txt"
