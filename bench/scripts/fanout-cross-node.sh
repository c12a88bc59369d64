#!/usr/bin/env bash
# Cross-node fan-out: a local 3-node cluster of 1 data group led by node 1, one
# publisher on node 1, 1,000 subscribers on nodes 2 and 3 (none has a session on the
# leader), at a few rates. Prints each run's result line and how many copies node 1
# sent to other nodes per message (herald_fanout_node_copies_total; 2 = one per
# interested node).
#
#   bench/scripts/fanout-cross-node.sh [SUBSCRIBERS]
source "$(dirname "$0")/lib.sh"
subscribers=${1:-1000}
write_cluster --nodes 3 --groups 1
for k in 1 2 3; do start "$k"; done
for k in 1 2 3; do wait_ready "$k"; done
copies() {
    local hostport=$(admin 1) line total=0
    exec 3<>"/dev/tcp/127.0.0.1/${hostport##*:}"
    printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
    while read -r line <&3; do
        if [[ $line == herald_fanout_node_copies_total* ]]; then
            total=$((total + ${line##* }))
        fi
    done
    exec 3<&-
    echo "$total"
}
conv=500
for spec in "2 20" "100 1000" "flat 2000"; do
    read -r rate messages <<<"$spec"
    conv=$((conv + 1))
    rate_arg=()
    [[ $rate != flat ]] && rate_arg=(--rate "$rate")
    before=$(copies)
    line=$("$bench" fanout --addr "$(quic 1)" --subscriber-addr "$(quic 2),$(quic 3)" \
        --ca "$dir/c/ca.pem" --secret-file "$dir/c/secret" --subscribers "$subscribers" \
        --publishers 1 --payload-bytes 128 --messages "$messages" "${rate_arg[@]}" \
        --conv "$conv" --quiet | tail -1)
    after=$(copies)
    echo "rate=$rate messages=$messages copies_between_nodes=$((after - before)) per_message=$(awk -v c=$((after - before)) -v m="$messages" 'BEGIN { printf "%.2f", c / m }')"
    echo "  $line"
done
