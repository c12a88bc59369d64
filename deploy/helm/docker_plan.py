#!/usr/bin/env python3
"""Turns one `helm template` rendering of the Herald chart into Docker containers
(run by docker-check.sh): what a kubelet would do with the StatefulSet's pods and
the helm test pod, as far as `docker run` can imitate it.

Usage: docker_plan.py --manifests FILE --secrets FILE --namespace NS --run-id ID
           --work DIR [--cluster-domain cluster.local] [--test-runs 2]

Reads the rendered objects (StatefulSet, its headless and client Services, the
ConfigMap, the helm test Pod) and the Secrets (dev-secrets.sh's output, as if
applied), then, under DIR:

  volumes/<pod>/<volume>/   every configMap/secret volume of every pod laid out as
                            the kubelet's atomic writer does (a timestamped dir,
                            `..data` -> it, one symlink per item), file modes from
                            the item mode / defaultMode, group fsGroup (mode |= 0440),
  pvc/<claim>, empty/<pod>/<volume>
                            host directories behind the named Docker volumes for the
                            volumeClaimTemplates (root:fsGroup 2775, as fsGroup makes a
                            fresh volume) and emptyDirs (root:fsGroup 2777),
  run/<container>.args      the `docker run` arguments of each container, NUL
                            separated (from --name to the last container argument),
  volumes.tsv               docker volume name <TAB> host directory, to create,
  plan.sh                   facts docker-check.sh needs (bash assignments).

It refuses (exit 1, one line per problem) anything it cannot imitate faithfully: a
volume type, env source or securityContext field it does not know, a config member
whose host is not the DNS name of the pod with that node id, a missing Secret key.
"""

import argparse
import base64
import os
import re
import shlex
import sys
import tomllib

import yaml

PROBLEMS = []


def problem(what):
    PROBLEMS.append(what)


KNOWN_POD_SC = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy",
                "seccompProfile", "supplementalGroups"}
KNOWN_CONTAINER_SC = {"runAsNonRoot", "runAsUser", "runAsGroup", "readOnlyRootFilesystem",
                      "allowPrivilegeEscalation", "privileged", "capabilities", "seccompProfile"}
ATOMIC_DIR = "..2000_01_01_00_00_00.000000001"


def mem(q):
    """A Kubernetes memory quantity as bytes (for docker --memory)."""
    m = re.fullmatch(r"([0-9.]+)([KMGTPE]i?|[kmgtpe]?)", str(q))
    if not m:
        problem(f"memory quantity {q!r} not understood")
        return None
    mult = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}.get(m.group(2))
    if mult is None:
        problem(f"memory quantity {q!r} not understood")
        return None
    return int(float(m.group(1)) * mult)


def cpus(q):
    q = str(q)
    return str(int(q[:-1]) / 1000) if q.endswith("m") else q


class Planner:
    def __init__(self, a, docs, secrets):
        self.a = a
        self.docs = docs
        self.secrets = {s["metadata"]["name"]: s for s in secrets}
        self.configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        self.volumes_tsv = []
        os.makedirs(os.path.join(a.work, "run"), exist_ok=True)

    def vol_name(self, *parts):
        return "-".join(("herald-helmcheck", self.a.run_id) + parts)

    # --- volumes ------------------------------------------------------------------------
    def atomic_volume(self, dest, files, fs_group):
        """Lays out {path: (bytes, mode)} the way the kubelet's AtomicWriter does."""
        os.makedirs(dest)
        ts = os.path.join(dest, ATOMIC_DIR)
        os.makedirs(ts)
        tops = set()
        for path, (data, mode) in files.items():
            full = os.path.join(ts, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
            tops.add(path.split("/")[0])
            if fs_group is not None:
                mode |= 0o440
            os.chmod(full, mode)
            os.chown(full, 0, fs_group if fs_group is not None else 0)
        os.symlink(ATOMIC_DIR, os.path.join(dest, "..data"))
        for top in sorted(tops):
            os.symlink(os.path.join("..data", top), os.path.join(dest, top))
        for root, dirs, _ in os.walk(ts):
            for d in [root] + [os.path.join(root, x) for x in dirs]:
                os.chown(d, 0, fs_group if fs_group is not None else 0)
                os.chmod(d, 0o2755 if fs_group is not None else 0o755)
        os.chown(dest, 0, fs_group if fs_group is not None else 0)
        os.chmod(dest, 0o3777 if fs_group is not None else 0o1777)

    def source_files(self, vol, kind, where):
        """The files of a configMap or secret volume: {path: (bytes, mode)}."""
        src = vol[kind]
        if kind == "configMap":
            name = src["name"]
            obj = self.configmaps.get(name)
            data = {k: v.encode() for k, v in (obj or {}).get("data", {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj or {}).get("binaryData", {}).items()})
        else:
            name = src["secretName"]
            obj = self.secrets.get(name)
            data = {k: base64.b64decode(v) for k, v in (obj or {}).get("data", {}).items()}
            data.update({k: v.encode() for k, v in (obj or {}).get("stringData", {}).items()})
        if obj is None:
            if not src.get("optional"):
                problem(f"{where}: volume {vol['name']}: no {kind} {name} (the pod would not start)")
            return {}
        mode = src.get("defaultMode", 0o644)
        files = {}
        for item in src.get("items") or [{"key": k, "path": k} for k in sorted(data)]:
            if item["key"] not in data:
                if not src.get("optional"):
                    problem(f"{where}: volume {vol['name']}: {kind} {name} has no key {item['key']}")
                continue
            files[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return files

    def pod_mounts(self, pod_name, spec, claims, fs_group):
        """Sets up every volume of one pod; returns {volume name: docker --mount spec
        without dst}."""
        out = {}
        for vol in spec.get("volumes", []):
            where = f"pod {pod_name}"
            kinds = set(vol) - {"name"}
            if kinds & {"configMap", "secret"}:
                kind = "configMap" if "configMap" in vol else "secret"
                dest = os.path.join(self.a.work, "volumes", pod_name, vol["name"])
                self.atomic_volume(dest, self.source_files(vol, kind, where), fs_group)
                out[vol["name"]] = f"type=bind,src={dest}"
            elif kinds == {"emptyDir"}:
                if vol["emptyDir"].get("medium"):
                    problem(f"{where}: emptyDir medium {vol['emptyDir']['medium']} not imitated")
                dest = os.path.join(self.a.work, "empty", pod_name, vol["name"])
                os.makedirs(dest)
                os.chown(dest, 0, fs_group if fs_group is not None else 0)
                os.chmod(dest, 0o2777 if fs_group is not None else 0o777)
                name = self.vol_name(pod_name, vol["name"])
                self.volumes_tsv.append((name, dest))
                out[vol["name"]] = f"type=volume,src={name},volume-nocopy"
            else:
                problem(f"{where}: volume {vol['name']} of type {sorted(kinds)} not imitated")
        for claim in claims:
            cname = f"{claim['metadata']['name']}-{pod_name}"
            dest = os.path.join(self.a.work, "pvc", cname)
            os.makedirs(dest)
            # A fresh file system's root (root:root 0755), then the fsGroup change.
            os.chown(dest, 0, fs_group if fs_group is not None else 0)
            os.chmod(dest, 0o2775 if fs_group is not None else 0o755)
            name = self.vol_name(cname)
            self.volumes_tsv.append((name, dest))
            out[claim["metadata"]["name"]] = f"type=volume,src={name},volume-nocopy"
        return out

    # --- containers -----------------------------------------------------------------------
    def security(self, pod_sc, c, where):
        sc = c.get("securityContext", {})
        for k in set(pod_sc) - KNOWN_POD_SC:
            problem(f"{where}: pod securityContext.{k} not imitated")
        for k in set(sc) - KNOWN_CONTAINER_SC:
            problem(f"{where}: securityContext.{k} not imitated")
        args = []
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if uid is None:
            problem(f"{where}: no runAsUser (the image's USER would apply; not checked here)")
        else:
            args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
            problem(f"{where}: runAsNonRoot with runAsUser 0 (the kubelet refuses to start it)")
        groups = list(pod_sc.get("supplementalGroups", []))
        if pod_sc.get("fsGroup") is not None:
            groups.append(pod_sc["fsGroup"])
        for g in dict.fromkeys(groups):
            args += ["--group-add", str(g)]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("privileged"):
            args.append("--privileged")
        # allowPrivilegeEscalation defaults to true (unless privileged / CAP_SYS_ADMIN).
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        caps = sc.get("capabilities", {})
        for cap in caps.get("drop", []):
            args += ["--cap-drop", cap]
        for cap in caps.get("add", []):
            args += ["--cap-add", cap]
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp not in (None, "RuntimeDefault"):
            problem(f"{where}: seccompProfile {seccomp} not imitated")
        elif seccomp is None:
            problem(f"{where}: no seccompProfile (the kubelet's default is Unconfined; Docker's is its default profile)")
        return args

    def env(self, c, pod_name, where):
        out = []
        for e in c.get("env", []):
            if "value" in e:
                out.append(f"{e['name']}={e['value']}")
                continue
            ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            field = {"metadata.name": pod_name, "metadata.namespace": self.a.namespace}.get(ref)
            if field is None:
                problem(f"{where}: env {e['name']} from {e.get('valueFrom')} not imitated")
                continue
            out.append(f"{e['name']}={field}")
        if c.get("envFrom"):
            problem(f"{where}: envFrom not imitated")
        return [x for kv in out for x in ("--env", kv)]

    def container(self, c, pod_name, cname, hostname, pod_sc, mounts, extra, where):
        args = ["--name", cname, "--hostname", hostname,
                "--label", f"herald-helmcheck.run={self.a.run_id}",
                "--network", self.a.network]
        args += extra
        args += self.security(pod_sc, c, where)
        args += self.env(c, pod_name, where)
        for m in c.get("volumeMounts", []):
            src = mounts.get(m["name"])
            if src is None:
                problem(f"{where}: mount of unknown volume {m['name']}")
                continue
            if m.get("subPath") or m.get("subPathExpr"):
                problem(f"{where}: subPath mounts not imitated")
            spec = f"{src},dst={m['mountPath']}"
            if m.get("readOnly"):
                spec += ",readonly"
            args += ["--mount", spec]
        limits = c.get("resources", {}).get("limits", {})
        if "memory" in limits:
            b = mem(limits["memory"])
            if b:
                args += ["--memory", str(b)]
        if "cpu" in limits:
            args += ["--cpus", cpus(limits["cpu"])]
        if c.get("workingDir"):
            args += ["--workdir", c["workingDir"]]
        command = c.get("command") or []
        if command:
            args += ["--entrypoint", command[0]]
        image = c.get("image")
        args.append(image)
        args += command[1:] + (c.get("args") or [])
        with open(os.path.join(self.a.work, "run", cname + ".args"), "wb") as f:
            f.write(b"".join(x.encode() + b"\0" for x in args))
        return image


def named_port(c, port):
    if isinstance(port, int):
        return port
    for p in c.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    problem(f"probe port {port!r} is not a port of the container")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", required=True)
    ap.add_argument("--secrets", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--cluster-domain", default="cluster.local")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--network", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--test-runs", type=int, default=2)
    a = ap.parse_args()
    with open(a.manifests) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(a.secrets) as f:
        secrets = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "Secret"]
    p = Planner(a, docs, secrets)
    ns, domain = a.namespace, a.cluster_domain
    facts = {}

    stss = [d for d in docs if d["kind"] == "StatefulSet"]
    if len(stss) != 1:
        print(f"expected one StatefulSet, rendered {len(stss)}")
        return 1
    sts = stss[0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    name = sts["metadata"]["name"]
    replicas = spec.get("replicas", 1)
    headless = spec["serviceName"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    labels = spec["template"]["metadata"].get("labels", {})
    hs = services.get(headless)
    if not hs or hs["spec"].get("clusterIP") != "None":
        problem(f"serviceName {headless} is not a rendered headless Service")
    elif not hs["spec"].get("publishNotReadyAddresses"):
        problem(f"headless Service {headless} does not publish not-ready pods: peers could not find each other before they are ready")
    # Services whose selector matches the pods: their DNS names resolve to every pod
    # (a ClusterIP Service only to ready ones; Docker's DNS cannot tell readiness).
    svc_names = []
    for sname, s in sorted(services.items()):
        sel = s["spec"].get("selector") or {}
        if sel and all(labels.get(k) == v for k, v in sel.items()):
            svc_names += [f"{sname}.{ns}.svc.{domain}", f"{sname}.{ns}.svc", f"{sname}.{ns}", sname]
    if headless not in services or not services[headless]["spec"].get("selector"):
        problem(f"headless Service {headless} selects no pods")

    containers = pod.get("containers", [])
    if len(containers) != 1 or pod.get("initContainers"):
        problem(f"StatefulSet pod has {len(containers)} containers and {len(pod.get('initContainers', []))} init containers; the checker imitates exactly one")
        return report()
    c = containers[0]
    pod_sc = pod.get("securityContext", {})
    fs_group = pod_sc.get("fsGroup")

    # The node config, as the pods read it: the file `serve --config` names, from the
    # configMap volume mounted at its directory.
    serve_args = (c.get("command") or []) + (c.get("args") or [])
    cfg_path = serve_args[serve_args.index("--config") + 1] if "--config" in serve_args else None
    config_text, cm_doc = None, None
    for m in c.get("volumeMounts", []):
        if cfg_path and os.path.dirname(cfg_path) == m["mountPath"].rstrip("/"):
            vol = next((v for v in pod.get("volumes", []) if v["name"] == m["name"]), {})
            if "configMap" not in vol:
                continue
            cm_doc = p.configmaps.get(vol["configMap"]["name"]) or {}
            key = os.path.basename(cfg_path)
            items = vol["configMap"].get("items")
            if items:
                key = next((i["key"] for i in items if i["path"] == key), None)
            config_text = cm_doc.get("data", {}).get(key)
    if config_text is None:
        problem(f"the node container's config {cfg_path} is not a key of a mounted ConfigMap")
        return report()
    try:
        config = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as e:
        problem(f"the node config {cfg_path} is not TOML: {e}")
        return report()
    cluster = config.get("cluster", {})
    if not cluster.get("node_id_from_ordinal"):
        problem("cluster.node_id_from_ordinal is not set: every pod would have the same node id")
    members = {}
    for m in cluster.get("members", []):
        nid, _, addr = m.partition("=")
        members[int(nid)] = addr.rpartition(":")[0]
    pods = [f"{name}-{k}" for k in range(replicas)]
    aliases = {}
    for k, pod_name in enumerate(pods):
        fqdn = f"{pod_name}.{headless}.{ns}.svc.{domain}"
        want = members.get(k + 1)
        if want is not None and want != fqdn:
            problem(f"cluster.members: node {k + 1} is {want}, but pod {pod_name} (node {k + 1}) is {fqdn}")
        aliases[pod_name] = [fqdn, f"{pod_name}.{headless}.{ns}.svc", f"{pod_name}.{headless}.{ns}",
                             f"{pod_name}.{headless}"] + svc_names
    for nid in members:
        if not 1 <= nid <= replicas:
            problem(f"cluster.members has node {nid}, which no pod is (replicas {replicas})")

    probe = c.get("readinessProbe", {}).get("httpGet")
    if not probe:
        problem("the node container has no HTTP readiness probe")
        return report()
    admin = named_port(c, probe["port"])
    live_paths = []
    for kind in ("startupProbe", "livenessProbe"):
        pr = c.get(kind)
        if not pr:
            continue
        if not pr.get("httpGet"):
            problem(f"{kind} is not an HTTP probe (not imitated)")
        elif named_port(c, pr["httpGet"]["port"]) != admin:
            problem(f"{kind} uses port {pr['httpGet']['port']}, not the readiness probe's {admin} (not imitated)")
        elif pr["httpGet"]["path"] not in live_paths:
            live_paths.append(pr["httpGet"]["path"])
    facts.update(
        IMAGE=c["image"], STS=name, PODS=pods, NODE_IDS=[str(k + 1) for k in range(replicas)],
        MEMBERS=[str(k) for k in sorted(members)],
        ADMIN_PORT=str(admin), READY_PATH=probe["path"],
        # Startup and liveness probes: paths that must answer 200 (on the same port).
        LIVE_PATHS=live_paths,
        RUN_AS=f"{(c.get('securityContext') or {}).get('runAsUser', pod_sc.get('runAsUser'))}:"
               f"{(c.get('securityContext') or {}).get('runAsGroup', pod_sc.get('runAsGroup'))}",
        GRACE=str(pod.get("terminationGracePeriodSeconds", 30)),
        PRESTOP=c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []),
        CONFIG_PATH=cfg_path, CONFIG_MAP=(cm_doc or {}).get("metadata", {}).get("name", ""),
        SERVICE_NAMES=svc_names,
    )
    claims = spec.get("volumeClaimTemplates", [])
    for pod_name in pods:
        mounts = p.pod_mounts(pod_name, pod, claims, fs_group)
        extra = [x for al in aliases[pod_name] for x in ("--network-alias", al)]
        extra += ["--publish", f"127.0.0.1::{admin}/tcp"]
        p.container(c, pod_name, pod_name, pod_name, pod_sc, mounts, extra, f"pod {pod_name}")

    # The helm test pod(s).
    tests = [d for d in docs if d["kind"] == "Pod"
             and "test" in d["metadata"].get("annotations", {}).get("helm.sh/hook", "").split(",")]
    steps = []
    for t in tests:
        tname = t["metadata"]["name"]
        tspec = t["spec"]
        if tspec.get("restartPolicy") != "Never":
            problem(f"test pod {tname}: restartPolicy {tspec.get('restartPolicy')} (a failed step would be retried)")
        facts["TEST_DEADLINE"] = str(tspec.get("activeDeadlineSeconds", 300))
        for r in range(1, a.test_runs + 1):
            instance = f"{tname}-{r}"
            mounts = p.pod_mounts(instance, tspec, [], tspec.get("securityContext", {}).get("fsGroup"))
            for kind, key in (("init", "initContainers"), ("main", "containers")):
                for tc in tspec.get(key, []):
                    cname = f"{instance}-{tc['name']}"
                    p.container(tc, instance, cname, tname, tspec.get("securityContext", {}), mounts, [],
                                f"test pod {tname} container {tc['name']}")
                    steps.append(f"{r}:{kind}:{cname}")
                    if kind == "main" and r == 1:
                        targs = tc.get("args") or []
                        if "--count" in targs:
                            facts["SUB_COUNT"] = targs[targs.index("--count") + 1]
    if not tests:
        problem("no helm test pod rendered")
    facts["TEST_STEPS"] = steps

    with open(os.path.join(a.work, "volumes.tsv"), "w") as f:
        for n, d in p.volumes_tsv:
            f.write(f"{n}\t{d}\n")
    with open(os.path.join(a.work, "plan.sh"), "w") as f:
        for k, v in facts.items():
            if isinstance(v, list):
                f.write(f"{k}=({' '.join(shlex.quote(x) for x in v)})\n")
            else:
                f.write(f"{k}={shlex.quote(v)}\n")
    return report()


def report():
    for what in PROBLEMS:
        print(what)
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
