#!/usr/bin/env bash
# One command to a running 3-node Herald cluster in Docker:
#   1. builds the static binary and the herald:<version>/herald:latest image
#      (deploy/docker/build.sh; cargo and docker skip what is up to date),
#   2. writes the cluster's CA, node certificate (names node1..3, localhost,
#      127.0.0.1), secrets and node configs into deploy/compose/generated/ (kept
#      when present, so re-running keeps the CA clients already trust),
#   3. docker compose up -d, then polls every node's /readyz until all answer 200
#      (deadline: HERALD_READY_TIMEOUT seconds, default 90),
#   4. prints `herald status` and how to talk to the cluster.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

gen="$here/generated"
admins=(127.0.0.1:7511 127.0.0.1:7521 127.0.0.1:7531)
quics=127.0.0.1:7510,127.0.0.1:7520,127.0.0.1:7530
timeout="${HERALD_READY_TIMEOUT:-90}"

"$root/deploy/docker/build.sh"
# The CLI on the host is the same static binary the image holds (it runs on any
# x86_64 Linux); HERALD_BIN picks another.
herald="${HERALD_BIN:-$root/target/static/x86_64-unknown-linux-gnu/release/herald}"

echo "==> herald dev-cluster --hosts node1,node2,node3 into ${gen#$root/}"
"$herald" dev-cluster --nodes 3 --hosts node1,node2,node3 --base-port 7400 \
    --data-dir "$gen" >/dev/null
# The nodes run as uid 10001 and read these files through a bind mount, so they
# must be readable by others. Development material only: do not reuse it.
chmod 0755 "$gen"
chmod 0644 "$gen"/*
cat >"$gen/env.sh" <<ENV
# source this: client flags for the compose cluster (herald pub/sub/history/status)
export HERALD_ADDR=$quics
export HERALD_CA=$gen/ca.pem
export HERALD_ADMIN=$(IFS=,; echo "${admins[*]}")
ENV

echo "==> ${compose[*]} up -d"
start=$(date +%s)
"${compose[@]}" up -d

echo "==> waiting for /readyz on ${admins[*]} (deadline ${timeout}s)"
deadline=$((start + timeout))
pending=("${admins[@]}")
while ((${#pending[@]})); do
    still=()
    for a in "${pending[@]}"; do
        code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$a/readyz" || true)"
        if [[ "$code" == 200 ]]; then
            echo "    $a ready after $(($(date +%s) - start))s"
        else
            still+=("$a")
        fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]})) || break
    if (($(date +%s) >= deadline)); then
        echo "not ready after ${timeout}s: ${pending[*]}; logs:" >&2
        "${compose[@]}" logs --tail 30 >&2
        exit 1
    fi
    sleep 0.5
done

echo "==> herald status --admin $(IFS=,; echo "${admins[*]}")"
"$herald" status --admin "$(IFS=,; echo "${admins[*]}")"
cat <<EOF2

The cluster is up. From the repository root:
  source deploy/compose/generated/env.sh        # HERALD_ADDR, HERALD_CA, HERALD_ADMIN
  export HERALD_TOKEN=\$($herald token --secret-file deploy/compose/generated/secret --service cli)
  herald conv create --id 1 --kind group --members 1,2 && herald pub --conv 1 hello
  curl -s 127.0.0.1:7511/metrics | grep ^herald_
Stop it with deploy/compose/down.sh (add --volumes to delete the nodes' data too).
EOF2
