# A local cluster of release `herald serve` processes for the measurement scripts
# (sourced, not run). Sets: herald, bench, dir; functions: write_cluster, start,
# wait_ready, admin, quic. Every process it starts is killed on exit; the directory is
# removed unless HERALD_BENCH_KEEP is set. Nodes are stopped with SIGKILL: a measurement
# cluster is thrown away, and SIGTERM would wait out the graceful drain (up to 30 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
base=${HERALD_BENCH_BASE_PORT:-7610}
dir=$(mktemp -d -t herald-bench-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -z ${HERALD_BENCH_KEEP:-} ]]; then rm -rf "$dir"; else echo "kept $dir"; fi
}
trap cleanup EXIT

cargo build -q --release -p herald-broker -p herald-bench
herald=target/release/herald
bench=target/release/herald-bench
admin() { echo "127.0.0.1:$((base + 10 * ($1 - 1) + 1))"; }
quic() { echo "127.0.0.1:$((base + 10 * ($1 - 1)))"; }

# write_cluster DEV-CLUSTER-ARGS…: the cluster's files into a fresh $dir/c.
write_cluster() {
    rm -rf "$dir/c"
    "$herald" dev-cluster --data-dir "$dir/c" --base-port "$base" "$@" >/dev/null
}

# start K: runs node K (log in $dir/c/nodeK.log).
start() {
    RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$herald" serve --config "$dir/c/node$1.toml" \
        >/dev/null 2>"$dir/c/node$1.log" &
    pids+=($!)
}

# stop_all: kills every node started so far.
stop_all() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}

# GET /readyz of node K with bash alone (no curl on a fresh machine): true on 200.
ready() {
    local hostport=$(admin "$1") status
    { exec 3<>"/dev/tcp/127.0.0.1/${hostport##*:}"; } 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
    read -r _ status _ <&3 || true
    exec 3<&-
    [[ $status == 200 ]]
}

# wait_ready K: up to 60 s.
wait_ready() {
    for _ in $(seq 1 600); do
        if ready "$1"; then return 0; fi
        sleep 0.1
    done
    echo "node $1 not ready after 60 s; its log: $dir/c/node$1.log" >&2
    exit 1
}
