#!/usr/bin/env bash
# Aggregate acked publishes/s of a local 3-node cluster with 1 data group and with 12,
# same bench command: the scaling factor of sharding on this machine.
#
#   bench/scripts/shard-scaling.sh [MESSAGES] [RUNS]
#
# Each run: a fresh cluster, then `herald-bench publish` with 12 publishers on 12
# conversations (spread over the groups; the client routes each to its leader).
source "$(dirname "$0")/lib.sh"
messages=${1:-200000}
runs=${2:-2}
for groups in 1 12; do
    for run in $(seq 1 "$runs"); do
        write_cluster --nodes 3 --groups "$groups"
        for k in 1 2 3; do start "$k"; done
        for k in 1 2 3; do wait_ready "$k"; done
        line=$("$bench" publish --addr "$(quic 1),$(quic 2),$(quic 3)" --ca "$dir/c/ca.pem" \
            --secret-file "$dir/c/secret" --publishers 12 --conversations 12 --window 64 \
            --messages "$messages" --quiet | tail -1)
        echo "groups=$groups run=$run $line"
        stop_all
    done
done
