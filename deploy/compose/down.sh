#!/usr/bin/env bash
# Stops the compose cluster and removes its containers and network.
#   deploy/compose/down.sh            keeps each node's data volume (up.sh resumes it)
#   deploy/compose/down.sh --volumes  also deletes the volumes and generated/ (a fresh
#                                     cluster, with a new CA, on the next up.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
    "") echo "==> ${compose[*]} down"
        "${compose[@]}" down ;;
    --volumes|-v)
        echo "==> ${compose[*]} down --volumes; rm -rf ${here#$root/}/generated"
        "${compose[@]}" down --volumes
        rm -rf "$here/generated" ;;
    *) echo "usage: $0 [--volumes]" >&2; exit 2 ;;
esac
