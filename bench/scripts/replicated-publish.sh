#!/usr/bin/env bash
# Acked publishes/s of a local 3-node cluster with one data group (quorum fsync), and
# the CPU each process spent per acked message: the issue-3 measurement.
#
#   bench/scripts/replicated-publish.sh [MESSAGES] [RUNS] [WINDOWS…]
#
# Each run: a fresh cluster, then `herald-bench publish` with 4 publishers straight to
# the group's leader, window W. CPU is utime+stime from /proc/PID/stat before and after;
# packets are the machine's UDP datagrams sent (/proc/net/snmp OutDatagrams) per 100 acks.
source "$(dirname "$0")/lib.sh"
messages=${1:-150000}
runs=${2:-2}
shift 2 || true
windows=("${@:-64 256}")
windows=(${windows[@]})
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# UDP datagrams sent by the whole machine (all of it loopback here): QUIC packets.
udp_out() { awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ {print $5}' /proc/net/snmp; }
for window in "${windows[@]}"; do
    for run in $(seq 1 "$runs"); do
        write_cluster --nodes 3 --groups 1
        for k in 1 2 3; do start "$k"; done
        for k in 1 2 3; do wait_ready "$k"; done
        udp_before=$(udp_out)
        before=(); for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
        line=$("$bench" publish --addr "$(quic 1),$(quic 2),$(quic 3)" --ca "$dir/c/ca.pem" \
            --secret-file "$dir/c/secret" --publishers 4 --window "$window" \
            --messages "$messages" --quiet | tail -1)
        cpu=""
        for i in "${!pids[@]}"; do
            after=$(cpu_ticks "${pids[$i]}")
            us=$(( (after - before[i]) * 1000000 / ticks / messages ))
            cpu+=" node$((i + 1))_cpu_us_per_msg=$us"
        done
        packets=$(( ($(udp_out) - udp_before) * 100 / messages ))
        echo "window=$window run=$run $line$cpu udp_packets_per_100_msgs=$packets"
        stop_all
    done
done
