#!/usr/bin/env bash
# Development TLS material and secrets for the Herald chart, as Kubernetes Secrets.
#
#   deploy/helm/dev-secrets.sh RELEASE [NAMESPACE] | kubectl apply -n NAMESPACE -f -
#
# Writes a fresh CA, one node certificate naming every DNS name the chart's pods and
# client Service answer to, an HS256 token key and a cluster secret (with
# `herald dev-cluster`) into DIR (default herald-data/k8s/NAMESPACE/RELEASE; kept, so
# re-running prints the same Secrets and clients can use DIR/ca.pem and DIR/secret),
# then prints the three Secrets the chart reads with its default names:
#   <fullname>-tls (tls.crt, tls.key, ca.crt), <fullname>-token (secret),
#   <fullname>-cluster (secret).
# <fullname> is computed as the chart does (RELEASE if it contains "herald", else
# RELEASE-herald); set FULLNAME if you use fullnameOverride / nameOverride.
#
# Environment: HERALD (the herald binary; default target/debug/herald, then PATH),
# DIR, FULLNAME, CLUSTER_DOMAIN (default cluster.local).
# For production use cert-manager (tls.certManager in values.yaml) or your own PKI.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || $1 == -* ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
release=$1
namespace=${2:-default}
root=$(cd "$(dirname "$0")/../.." && pwd)

herald=${HERALD:-}
if [[ -z $herald ]]; then
    if [[ -x $root/target/debug/herald ]]; then
        herald=$root/target/debug/herald
    elif command -v herald >/dev/null; then
        herald=herald
    else
        echo "dev-secrets.sh: no herald binary (cargo build --bin herald, or set HERALD)" >&2
        exit 1
    fi
fi

if [[ -n ${FULLNAME:-} ]]; then
    fullname=$FULLNAME
elif [[ $release == *herald* ]]; then
    fullname=$release
else
    fullname=$release-herald
fi
fullname=${fullname:0:40}
fullname=${fullname%%-}
domain=${CLUSTER_DOMAIN:-cluster.local}
headless=$fullname-headless

names=(
    "*.$headless.$namespace.svc.$domain"
    "*.$headless.$namespace.svc"
    "$fullname.$namespace.svc.$domain"
    "$fullname.$namespace.svc"
    "$fullname.$namespace"
    "$fullname"
)
dir=${DIR:-$root/herald-data/k8s/$namespace/$release}
mkdir -p "$dir"
# `dev-cluster --hosts` puts one name per node into the shared node certificate; the
# node configs it also writes are not used here.
hosts=$(IFS=,; echo "${names[*]}")
"$herald" dev-cluster --nodes "${#names[@]}" --data-dir "$dir" --base-port 7400 \
    --hosts "$hosts" >/dev/null

b64() { base64 <"$1" | tr -d '\n'; }
labels="    app.kubernetes.io/instance: $release
    app.kubernetes.io/part-of: herald"

cat <<EOF
# Herald development secrets for release $release in namespace $namespace
# (material in $dir; clients trust $dir/ca.pem).
apiVersion: v1
kind: Secret
metadata:
  name: $fullname-tls
  namespace: $namespace
  labels:
$labels
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$dir/node.pem")
  tls.key: $(b64 "$dir/node.key")
  ca.crt: $(b64 "$dir/ca.pem")
---
apiVersion: v1
kind: Secret
metadata:
  name: $fullname-token
  namespace: $namespace
  labels:
$labels
type: Opaque
data:
  secret: $(b64 "$dir/secret")
---
apiVersion: v1
kind: Secret
metadata:
  name: $fullname-cluster
  namespace: $namespace
  labels:
$labels
type: Opaque
data:
  secret: $(b64 "$dir/cluster-secret")
EOF
