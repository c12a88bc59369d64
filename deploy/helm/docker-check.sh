#!/usr/bin/env bash
# Runs the Herald Helm chart's rendered configuration in Docker, as far as Docker can
# imitate the StatefulSet (no Kubernetes needed):
#
#   deploy/helm/docker-check.sh [HELM TEMPLATE ARGS…]
#
# Environment: HERALD_IMAGE (an image already built: skip the build), HERALD (the
# herald binary dev-secrets.sh runs; default the static build, else target/debug, else
# the image's), HERALD_CHART (default deploy/helm/herald), HERALD_READY_TIMEOUT (90),
# HERALD_CLUSTER_DOMAIN (the imitated cluster's DNS domain, default cluster.local),
# HERALD_CATCHUP_MESSAGES (default 0 = off): publish that many messages (the helm test's
# pub step with a larger --count) while the stopped pod is down, and check that when
# it first reports ready after its restart it is caught up (every group's log within
# 1000 entries, Herald's READY_APPLY_LAG_MAX, of the other nodes').
# Extra arguments go to `helm template` (e.g. --set drain.timeout=45s); value sets
# must keep the default Secret names (dev-secrets.sh makes those) and
# initialReplicas = replicas.
#
#  1. builds the image with deploy/docker/build.sh (herald:<version>), unless
#     HERALD_IMAGE names one that is already built;
#  2. `helm template hc deploy/helm/herald -n default` with that image, and
#     docker_plan.py turns the rendered objects into `docker run` arguments: the
#     StatefulSet container's args, env (HOSTNAME = the pod name), securityContext
#     (--user, --read-only, --cap-drop, no-new-privileges), memory limit, volume
#     mounts; the ConfigMap's herald.toml and deploy/helm/dev-secrets.sh's Secrets laid
#     out on the host as the kubelet mounts them (atomic-writer symlinks, defaultMode,
#     group fsGroup), the volumeClaimTemplate as a named volume per pod, the helm test
#     pod's init containers and container, the preStop command and the grace period;
#  3. on a network of its own (herald-helmcheck-<run>), starts the pods as containers
#     hc-herald-0..N-1 with network aliases for the DNS names Kubernetes would give
#     them (<pod>.<headless>.default.svc.cluster.local, and every selecting Service's
#     name on every pod), admin port published on 127.0.0.1 (random port) only;
#  4. checks: every pod's readiness path answers 200 within 90 s, /cluster shows the
#     config's members and a leader for every group (on every pod), and node id =
#     1 + ordinal; the helm test steps, in order, exit 0 (sub gets its --count
#     deliveries); the preStop command (docker exec) on pod 1 exits 0, /readyz turns
#     503 and the pod leads nothing; `docker stop -t <terminationGracePeriodSeconds>`
#     ends it with exit code 0 within the grace period; started again on its volume
#     it is ready again, and the helm test passes again (a re-run, as `helm test`).
#
# Containers, volumes and the network carry the label herald-helmcheck.run=<run> and
# are removed on exit, whatever happened. Prints one line per check, the logs of the
# pods (and test containers) involved in a failure, and exits non-zero if any failed.
# Needs docker, curl, python3 and the venv deploy/helm/check.sh installs (helm, PyYAML).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
chart=${HERALD_CHART:-$here/herald}
venv=${HERALD_TOOLS_DIR:-$root/target/tools}/helm-venv
helm=$venv/bin/helm
py=$venv/bin/python
release=hc
namespace=default
ready_timeout=${HERALD_READY_TIMEOUT:-90}
catchup=${HERALD_CATCHUP_MESSAGES:-0}
[[ $catchup =~ ^[0-9]+$ ]] || die "HERALD_CATCHUP_MESSAGES=$catchup is not a number"
domain=${HERALD_CLUSTER_DOMAIN:-cluster.local}
docker=${DOCKER:-docker}

failed=0
passed=0
declare -A blame=()     # containers whose logs to print at the end
ok() { echo "ok    $*"; passed=$((passed + 1)); }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
die() { echo "docker-check.sh: $*" >&2; exit 2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
indent() { sed 's/^/      /'; }

[[ -x $helm && -x $py ]] && "$py" -c 'import yaml' 2>/dev/null \
    || die "no helm/PyYAML in $venv: run deploy/helm/check.sh once (it installs them)"
command -v curl >/dev/null || die "needs curl"
"$docker" info >/dev/null 2>&1 || die "cannot talk to the Docker engine"

t_start=$(now)

# --- image ----------------------------------------------------------------------------
if [[ -n ${HERALD_IMAGE:-} ]]; then
    image=$HERALD_IMAGE
    "$docker" image inspect "$image" >/dev/null 2>&1 || die "HERALD_IMAGE=$image is not a local image"
    echo "==> image $image (HERALD_IMAGE)"
else
    build_log=$(mktemp)
    if ! "$root/deploy/docker/build.sh" >"$build_log" 2>&1; then
        cat "$build_log" >&2
        rm -f "$build_log"
        die "deploy/docker/build.sh failed"
    fi
    image=$(sed -n 's/^==> built \([^ ]*\) and .*/\1/p' "$build_log" | tail -n 1)
    rm -f "$build_log"
    [[ -n $image ]] || die "cannot tell which image deploy/docker/build.sh built"
    echo "==> built $image ($(since "$t_start") s)"
fi
if [[ $image == *@* ]]; then
    image_sets=(--set "image.repository=${image%@*}" --set "image.digest=${image#*@}")
else
    image_sets=(--set "image.repository=${image%:*}" --set "image.tag=${image##*:}")
fi

# --- run identity and teardown ----------------------------------------------------------
run_id=$(date +%Y%m%d%H%M%S)-$$
net=herald-helmcheck-$run_id
label=herald-helmcheck.run=$run_id
work=$(mktemp -d "${TMPDIR:-/tmp}/herald-helmcheck.XXXXXX")
logs_printed=0

print_logs() {
    ((logs_printed)) && return
    logs_printed=1
    local c
    for c in "${!blame[@]}"; do
        "$docker" container inspect "$c" >/dev/null 2>&1 || continue
        echo "---- docker logs $c (last 300 lines) ----"
        "$docker" logs --tail 300 "$c" 2>&1 | indent
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    ((failed > 0 || rc != 0)) && print_logs
    local ids
    ids=$("$docker" ps -aq --filter "label=$label" 2>/dev/null)
    [[ -n $ids ]] && "$docker" rm -f $ids >/dev/null 2>&1
    ids=$("$docker" volume ls -q --filter "label=$label" 2>/dev/null)
    [[ -n $ids ]] && "$docker" volume rm $ids >/dev/null 2>&1
    "$docker" network inspect "$net" >/dev/null 2>&1 && "$docker" network rm "$net" >/dev/null 2>&1
    left=$( { "$docker" ps -aq --filter "label=$label"; "$docker" volume ls -q --filter "label=$label";
              "$docker" network ls -q --filter "name=^$net\$"; } 2>/dev/null)
    [[ -n $left ]] && echo "docker-check.sh: could not remove everything of run $run_id: $left" >&2
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "docker-check.sh: interrupted" >&2; exit 130' INT TERM

# Leftovers of an earlier run that was killed before its trap ran (run id
# <time>-<pid>, that pid gone): only objects with this script's label.
for stale in $( { "$docker" ps -a --filter label=herald-helmcheck.run --format '{{.Label "herald-helmcheck.run"}}';
                  "$docker" volume ls --filter label=herald-helmcheck.run --format '{{.Label "herald-helmcheck.run"}}';
                  "$docker" network ls --filter label=herald-helmcheck.run --format '{{.Label "herald-helmcheck.run"}}'; } 2>/dev/null | sort -u); do
    [[ $stale =~ ^[0-9]+-([0-9]+)$ ]] || continue
    kill -0 "${BASH_REMATCH[1]}" 2>/dev/null && continue
    echo "==> removing the leftovers of run $stale (its docker-check.sh is gone)"
    ids=$("$docker" ps -aq --filter "label=herald-helmcheck.run=$stale")
    [[ -n $ids ]] && "$docker" rm -f $ids >/dev/null
    ids=$("$docker" volume ls -q --filter "label=herald-helmcheck.run=$stale")
    [[ -n $ids ]] && "$docker" volume rm $ids >/dev/null
    ids=$("$docker" network ls -q --filter "label=herald-helmcheck.run=$stale")
    [[ -n $ids ]] && "$docker" network rm $ids >/dev/null
done

finish() {
    echo
    echo "$passed passed, $failed failed ($(since "$t_start") s in all, $(since "$t_run") s after the image)"
    ((failed == 0)) && exit 0
    print_logs
    exit 1
}
t_run=$(now)

# --- render, secrets, plan ----------------------------------------------------------------
if "$helm" template "$release" "$chart" --namespace "$namespace" "${image_sets[@]}" "$@" \
    >"$work/rendered.yaml" 2>"$work/err"; then
    ok "helm template $release ${chart#$root/} (namespace $namespace, image $image${*:+, $*}): $(grep -c '^kind:' "$work/rendered.yaml") objects"
else
    fail "helm template: $(cat "$work/err")"
    finish
fi

herald=${HERALD:-}
if [[ -z $herald ]]; then
    for b in "$root/target/static/x86_64-unknown-linux-gnu/release/herald" "$root/target/debug/herald" "$root/target/release/herald"; do
        [[ -x $b ]] && { herald=$b; break; }
    done
fi
if [[ -z $herald ]]; then
    # The image's own binary, run in a throw-away container writing to $work.
    herald=$work/herald-in-docker
    printf '#!/bin/sh\nexec %q run --rm --network none --user %q -v %q:%q --entrypoint /usr/local/bin/herald %q "$@"\n' \
        "$docker" "$(id -u):$(id -g)" "$work" "$work" "$image" >"$herald"
    chmod +x "$herald"
fi
if DIR=$work/material HERALD=$herald CLUSTER_DOMAIN=$domain "$here/dev-secrets.sh" "$release" "$namespace" \
    >"$work/secrets.yaml" 2>"$work/err"; then
    ok "dev-secrets.sh $release $namespace: $(grep -c '^kind: Secret' "$work/secrets.yaml") Secrets (herald: ${herald#$root/})"
else
    fail "dev-secrets.sh: $(cat "$work/err")"
    finish
fi

# Names the pods will have must be free (another run, or someone else's containers).
names=$("$py" - "$work/rendered.yaml" <<'EOF'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "StatefulSet":
        print("\n".join(f"{d['metadata']['name']}-{k}" for k in range(d["spec"].get("replicas", 1))))
EOF
)
for n in $names; do
    if "$docker" container inspect "$n" >/dev/null 2>&1; then
        die "a container named $n already exists (another docker-check.sh run?); not touching it"
    fi
done

if out=$("$py" "$here/docker_plan.py" --manifests "$work/rendered.yaml" --secrets "$work/secrets.yaml" \
    --namespace "$namespace" --cluster-domain "$domain" --run-id "$run_id" --network "$net" --work "$work/plan" --test-runs 3 2>&1); then
    ok "the rendered pods translate to docker run (volumes laid out as the kubelet mounts them, fsGroup, defaultMode)"
else
    fail "the rendered objects cannot be run as they are:"$'\n'"$(indent <<<"$out")"
    finish
fi
# shellcheck disable=SC1091
source "$work/plan/plan.sh"
[[ $IMAGE == "$image" ]] && ok "the StatefulSet runs the image built ($IMAGE)" \
    || fail "the StatefulSet runs image $IMAGE, not $image"
n=${#PODS[@]}
if [[ ${MEMBERS[*]} == "${NODE_IDS[*]}" ]]; then
    ok "herald.toml: cluster.members are nodes ${MEMBERS[*]} at the pods' DNS names (<pod>.<headless>.$namespace.svc.$domain), node_id_from_ordinal"
else
    fail "herald.toml: cluster.members are nodes ${MEMBERS[*]}, the $n pods are nodes ${NODE_IDS[*]}"
fi

# --- network, volumes, pods ----------------------------------------------------------------
"$docker" network create --driver bridge --label "$label" "$net" >/dev/null || die "docker network create $net failed"
while IFS=$'\t' read -r vname vdir; do
    "$docker" volume create --label "$label" --driver local --opt type=none --opt o=bind \
        --opt "device=$vdir" "$vname" >/dev/null || die "docker volume create $vname failed"
done <"$work/plan/volumes.tsv"

run_args() { mapfile -d '' -t args <"$work/plan/run/$1.args"; }

declare -A admin=()
admin_port() {   # pod -> 127.0.0.1:PORT of its published admin port (changes on restart)
    admin[$1]=$("$docker" port "$1" "$ADMIN_PORT/tcp" 2>/dev/null | grep -m1 '^127\.0\.0\.1:')
}
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://${admin[$1]}$2" 2>/dev/null; }

started=()
for pod in "${PODS[@]}"; do
    run_args "$pod"
    if "$docker" run -d "${args[@]}" >/dev/null 2>"$work/err"; then
        started+=("$pod")
        admin_port "$pod"
    else
        fail "docker run $pod: $(cat "$work/err")"
        blame[$pod]=1
    fi
done
((${#started[@]} == n)) && ok "started $n pods (${PODS[*]}) on $net, read-only, uid:gid from the securityContext, caps dropped"
((${#started[@]} == n)) || finish
bad_uid=""
for pod in "${PODS[@]}"; do
    ug=$("$docker" top "$pod" -o pid,uid,gid 2>/dev/null | awk 'NR > 1 { print $2 ":" $3 }' | sort -u | tr '\n' ' ')
    [[ $ug == "$RUN_AS " ]] || bad_uid+=" $pod runs as ${ug:-?}"
done
[[ -z $bad_uid ]] && ok "every node process runs as uid:gid $RUN_AS (securityContext)" \
    || fail "node processes not running as $RUN_AS:$bad_uid"

# wait_ready DEADLINE_S POD... : every pod answers 200 on the readiness path
wait_ready() {
    local deadline=$1 t0 pod code status; shift
    t0=$(now)
    local -A done_at=()
    while :; do
        for pod in "$@"; do
            [[ -n ${done_at[$pod]:-} ]] && continue
            status=$("$docker" inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$pod" 2>/dev/null)
            if [[ $status != running* ]]; then
                fail "$pod is not running ($status) while waiting for $READY_PATH"
                blame[$pod]=1
                done_at[$pod]=dead
                continue
            fi
            [[ -z ${admin[$pod]} ]] && admin_port "$pod"
            code=$(http_code "$pod" "$READY_PATH")
            [[ $code == 200 ]] && done_at[$pod]=$(since "$t0")
        done
        ((${#done_at[@]} == $#)) && break
        if (($(awk -v s="$(since "$t0")" -v d="$deadline" 'BEGIN { print (s >= d) }'))); then
            for pod in "$@"; do
                if [[ -z ${done_at[$pod]:-} ]]; then
                    fail "$pod: $READY_PATH not 200 within ${deadline}s (last: $(http_code "$pod" "$READY_PATH"))"
                    blame[$pod]=1
                    done_at[$pod]=late
                fi
            done
            break
        fi
        sleep 0.25
    done
    local line="" bad=0
    for pod in "$@"; do
        case ${done_at[$pod]} in dead|late) bad=1 ;; *) line+=" $pod ${done_at[$pod]}s" ;; esac
    done
    ((bad)) || ok "$READY_PATH 200 within ${deadline}s:$line"
    return $bad
}

# cluster_view POD EXPECT_ID DEADLINE_S : /cluster on POD shows the members, a leader
# for every group, and POD's node id; polled until DEADLINE_S.
cluster_view() {
    local pod=$1 expect=$2 deadline=$3 t0 body verdict
    t0=$(now)
    while :; do
        body=$(curl -s --max-time 2 "http://${admin[$pod]}/cluster" 2>/dev/null)
        verdict=$(printf '%s' "$body" | "$py" -c '
import json, sys
expect, members = int(sys.argv[1]), [int(x) for x in sys.argv[2].split()]
try:
    c = json.load(sys.stdin)
except Exception as e:
    print("bad", f"no JSON from /cluster: {e}"); sys.exit()
ids = sorted(n["id"] for n in c.get("nodes", []))
# /cluster lists the data groups (the metadata group is not in it; /readyz covers it).
groups = c.get("groups", [])
leaderless = [g["id"] for g in groups if g.get("leader") not in ids]
leads = {}
for g in groups:
    leads[g.get("leader")] = leads.get(g.get("leader"), 0) + 1
nid = c.get("node_id")
why = []
if nid != expect: why.append(f"node_id {nid}, expected {expect}")
if ids != members: why.append(f"nodes {ids}, expected {members}")
if not groups: why.append("no groups")
if leaderless: why.append(f"groups without a leader: {leaderless}")
if why: print("bad", "; ".join(why))
else: print("good", f"node_id {nid}, nodes {ids}, {len(groups)} groups each with a leader (leaders: " + ", ".join(f"node {k}: {v}" for k, v in sorted(leads.items())) + ")")
' "$expect" "${MEMBERS[*]}" 2>&1)
        [[ $verdict == good* ]] && { echo "${verdict#good }"; return 0; }
        if (($(awk -v s="$(since "$t0")" -v d="$deadline" 'BEGIN { print (s >= d) }'))); then
            echo "${verdict#bad }"
            return 1
        fi
        sleep 0.5
    done
}

check_cluster() {   # after every pod is ready
    local k pod out bad=0
    for k in "${!PODS[@]}"; do
        pod=${PODS[$k]}
        if out=$(cluster_view "$pod" "${NODE_IDS[$k]}" 20); then
            [[ $k == 0 ]] && ok "/cluster on $pod$1: $out"
        else
            fail "/cluster on $pod$1: $out"
            blame[$pod]=1
            bad=1
        fi
    done
    ((bad)) || ok "node ids match the ordinals$1: $(for k in "${!PODS[@]}"; do printf '%s=%s ' "${PODS[$k]}" "${NODE_IDS[$k]}"; done)"
}

# helm_test RUN : the test pod's containers in order (init containers one after the
# other, then the main one), each must exit 0; the deadline is activeDeadlineSeconds.
helm_test() {
    local r=$1 what=$2 step kind cname t0 rc elapsed out line="" bad=0 left
    t0=$(now)
    for step in "${TEST_STEPS[@]}"; do
        [[ ${step%%:*} == "$r" ]] || continue
        kind=${step#*:}; kind=${kind%%:*}
        cname=${step##*:}
        run_args "$cname"
        if ! "$docker" run -d "${args[@]}" >/dev/null 2>"$work/err"; then
            fail "helm test$what: docker run $cname: $(cat "$work/err")"
            bad=1; break
        fi
        left=$(awk -v s="$(since "$t0")" -v d="$TEST_DEADLINE" 'BEGIN { l = int(d - s); print (l > 60 ? 60 : (l < 1 ? 1 : l)) }')
        rc=$(timeout "$left" "$docker" wait "$cname" 2>/dev/null)
        if [[ -z $rc ]]; then
            "$docker" kill "$cname" >/dev/null 2>&1
            fail "helm test$what: $cname ($kind) still running after ${left}s"
            blame[$cname]=1; bad=1; break
        fi
        if [[ $rc != 0 ]]; then
            fail "helm test$what: $cname ($kind) exited $rc: $("$docker" logs "$cname" 2>&1 | tail -n 3 | tr '\n' ' ')"
            blame[$cname]=1; bad=1; break
        fi
        line+=" ${cname#"$TEST_POD_PREFIX"}"
        if [[ $kind == main ]]; then
            out=$("$docker" logs "$cname" 2>/dev/null | "$py" -c '
import json, sys
n = int(sys.argv[1])
rows = [json.loads(l) for l in sys.stdin if l.strip()]
seqs = [r.get("seq") for r in rows]
if seqs != list(range(1, n + 1)):
    print(f"deliveries {seqs}, expected seqs 1..{n}"); sys.exit(1)
first = rows[0].get("payload")
print(f"{n} deliveries, seqs 1..{n}, first payload {first!r}")
' "$SUB_COUNT" 2>&1)
            if [[ $? != 0 ]]; then
                fail "helm test$what: $cname: $out"
                blame[$cname]=1; bad=1; break
            fi
            line+=" ($out)"
        fi
    done
    ((bad)) || ok "helm test$what: exit 0 in order:$line in $(since "$t0")s"
    ((bad)) && for pod in "${PODS[@]}"; do blame[$pod]=1; done
    return $bad
}

# --- checks --------------------------------------------------------------------------------
TEST_POD_PREFIX=$STS-test-pubsub-
ready=0
wait_ready "$ready_timeout" "${PODS[@]}" && ready=1
((ready)) || finish
check_cluster ""
live_ok() {   # POD WHEN : the startup/liveness probe paths answer 200
    local pod=$1 path c bad=""
    for path in "${LIVE_PATHS[@]}"; do
        c=$(http_code "$pod" "$path")
        [[ $c == 200 ]] || bad+=" $path $c"
    done
    if [[ -z $bad ]]; then
        return 0
    fi
    fail "$pod$2: liveness/startup probe path answers:$bad (the kubelet would restart it)"
    blame[$pod]=1
    return 1
}
all_live=1
for pod in "${PODS[@]}"; do live_ok "$pod" "" || all_live=0; done
((all_live)) && ok "startup/liveness probe paths (${LIVE_PATHS[*]}) 200 on every pod"
helm_test 1 ""

if [[ ${#PRESTOP[@]} == 0 ]]; then
    fail "the StatefulSet has no preStop exec command"
    finish
fi
victim=${PODS[1]:-${PODS[0]}}
others=()
for pod in "${PODS[@]}"; do [[ $pod != "$victim" ]] && others+=("$pod"); done

t0=$(now)
t_drain=$t0
out=$(timeout "$GRACE" "$docker" exec "$victim" "${PRESTOP[@]}" 2>&1)
rc=$?
took=$(since "$t0")
if [[ $rc == 0 ]]; then
    ok "preStop on $victim (docker exec ${PRESTOP[*]}): exit 0 in ${took}s: $out"
else
    fail "preStop on $victim (docker exec ${PRESTOP[*]}): exit $rc after ${took}s: $out"
    blame[$victim]=1
fi
code=$(http_code "$victim" "$READY_PATH")
for _ in $(seq 20); do [[ $code == 503 ]] && break; sleep 0.25; code=$(http_code "$victim" "$READY_PATH"); done
if [[ $code == 503 ]]; then
    ok "$victim $READY_PATH 503 after the drain"
else
    fail "$victim $READY_PATH $code after the drain, expected 503"
    blame[$victim]=1
fi
led=$(curl -s --max-time 2 "http://${admin[$victim]}/cluster" | "$py" -c '
import json, sys
c = json.load(sys.stdin)
print(" ".join(str(g["id"]) for g in c["groups"] if g.get("leader") == c["node_id"]))' 2>&1)
if [[ -z $led ]]; then
    ok "$victim leads no group after the drain (leaderships handed to the other nodes)"
else
    fail "$victim still leads groups [$led] after the drain"
    blame[$victim]=1
fi
live_ok "$victim" " while draining" && ok "$victim ${LIVE_PATHS[*]} still 200 while draining (no liveness restart mid-drain)"
others_ok=1
for pod in "${others[@]}"; do
    c=$(http_code "$pod" "$READY_PATH")
    [[ $c == 200 ]] || { others_ok=0; fail "$pod $READY_PATH $c while $victim is drained"; blame[$pod]=1; }
done
((others_ok)) && ok "the other pods stay ready while $victim is drained (${others[*]})"

# Where the victim's Raft logs are before it stops (it must restart from them).
curl -s --max-time 2 "http://${admin[$victim]}/cluster" >"$work/before-stop.json" 2>/dev/null
t0=$(now)
"$docker" stop -t "$GRACE" "$victim" >/dev/null 2>&1
took=$(since "$t0")
stop_total=$(since "$t_drain")
state=$("$docker" inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}' "$victim" 2>/dev/null)
read -r st code oom <<<"$state"
if [[ $st == exited && $code == 0 ]] && (($(awk -v t="$stop_total" -v g="$GRACE" 'BEGIN { print (t < g) }'))); then
    ok "docker stop -t $GRACE (terminationGracePeriodSeconds) $victim: exit code 0 after ${took}s (preStop + stop ${stop_total}s < ${GRACE}s)"
else
    fail "docker stop -t $GRACE $victim: $st, exit code $code (OOM killed: $oom) after ${took}s (preStop + stop ${stop_total}s), expected 0 within ${GRACE}s"
    blame[$victim]=1
fi

if ((catchup > 0)); then
    # Writes the stopped pod misses: the test pod's steps (a third instance), its pub
    # with --count $catchup; then the other nodes' view of every group's log.
    t0=$(now)
    pub_ok=1
    for step in "${TEST_STEPS[@]}"; do
        [[ ${step%%:*} == 3 && ${step#*:} == init:* ]] || continue
        cname=${step##*:}
        run_args "$cname"
        if [[ $cname == *-pub ]]; then
            for i in "${!args[@]}"; do
                [[ ${args[$i]} == --count ]] && { args[$((i + 1))]=$catchup; break; }
            done
        fi
        if ! out=$(timeout 120 "$docker" run "${args[@]}" 2>&1 >/dev/null); then
            fail "catch-up writes: $cname failed: $("$docker" logs "$cname" 2>&1 | tail -n 3 | tr '\n' ' ')$out"
            blame[$cname]=1; pub_ok=0; break
        fi
    done
    for pod in "${others[@]}"; do
        curl -s --max-time 2 "http://${admin[$pod]}/cluster" >"$work/others-$pod.json" 2>/dev/null
    done
    ((pub_ok)) && ok "catch-up writes: $catchup messages published while $victim was down ($(since "$t0")s)"
fi

if "$docker" start "$victim" >/dev/null 2>"$work/err"; then
    admin[$victim]=""
    t_restart=$(now)
    # Its /cluster from the moment the admin port answers until it says ready: the
    # answers before ready show the Raft logs it read back from its volume (each group
    # once its replica has started: the admin port can answer a few ms before that,
    # with the map's groups but no Raft state), the first ready one how far behind it
    # was when it told the kubelet it was ready.
    answers=0 ready_body=""
    while (($(awk -v s="$(since "$t_restart")" -v d="$ready_timeout" 'BEGIN { print (s < d) }'))); do
        [[ -z ${admin[$victim]} ]] && admin_port "$victim"
        b=$(curl -s --max-time 2 "http://${admin[$victim]}/cluster" 2>/dev/null)
        if [[ -n $b ]]; then
            answers=$((answers + 1))
            printf '%s' "$b" >"$work/after-start-$answers.json"
            if [[ $b == *'"ready":true'* ]]; then
                ready_body=$b
                ready_after=$(since "$t_restart")
                break
            fi
        fi
        sleep 0.05
    done
    if ((catchup > 0)) && [[ -n $ready_body ]]; then
        if out=$(printf '%s' "$ready_body" | "$py" -c '
import json, sys
lag_max = 1000
views = [json.load(open(f)) for f in sys.argv[1:]]
me = {g["id"]: g for g in json.load(sys.stdin)["groups"]}
bad, worst = [], 0
for i, g in me.items():
    others = max((g2.get("last_log_index") or 0) for v in views for g2 in v["groups"] if g2["id"] == i)
    mine = g.get("last_log_index") or 0
    worst = max(worst, others - mine)
    if others - mine > lag_max:
        bad.append(f"group {i}: its log ends at {mine}, the other nodes at {others}")
if bad:
    print("; ".join(bad)); sys.exit(1)
print(f"at most {worst} entries behind the other nodes")
' "$work"/others-*.json 2>&1); then
            ok "$victim caught up when it first said ready (${ready_after}s after the start): $out"
        else
            fail "$victim said ready ${ready_after}s after the start while behind: $out"
            blame[$victim]=1
        fi
    fi
    if out=$("$py" -c '
import json, sys
before = {g["id"]: g for g in json.load(open(sys.argv[1]))["groups"]}
# Each group as the restarted node first showed it with its replica started (a "term").
first = {}
for path in sys.argv[2:]:
    for g in json.load(open(path))["groups"]:
        if "term" in g:
            first.setdefault(g["id"], g)
bad, entries = [], 0
for i, g in before.items():
    was = (g.get("last_log_index") or 0, g.get("term") or 0)
    entries += was[0]
    if i not in first:
        bad.append(f"group {i}: no replica started before the node said ready")
        continue
    now = (first[i].get("last_log_index") or 0, first[i].get("term") or 0)
    if now[0] < was[0] or now[1] < was[1]:
        bad.append(f"group {i}: last log index, term {was} before the stop, {now} after")
if bad or not before:
    print("; ".join(bad) or "no groups before the stop"); sys.exit(1)
print(f"{len(before)} groups, {entries} log entries in all")
' "$work/before-stop.json" $(for n in $(seq 1 "$answers"); do echo "$work/after-start-$n.json"; done) 2>&1); then
        ok "$victim restarted from its volume: every group's Raft log and term at least where they were ($out)"
    else
        fail "$victim did not restart from its volume: $out"
        blame[$victim]=1
    fi
    if wait_ready "$ready_timeout" "$victim"; then
        check_cluster " after the restart of $victim"
        helm_test 2 " again after the restart (a re-run: same conversation, first $SUB_COUNT messages)"
    fi
else
    fail "docker start $victim: $(cat "$work/err")"
    blame[$victim]=1
fi

finish
