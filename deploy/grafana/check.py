#!/usr/bin/env python3
"""Checks deploy/grafana/herald-dashboard.json against a node's /metrics text.

Usage: check.py herald-dashboard.json metrics.txt
  (metrics.txt: e.g. `curl -s 127.0.0.1:7511/metrics > metrics.txt`)

Checks: the JSON parses; every panel (rows and panels nested in collapsed rows
too) has a unique integer id, a title and a datasource; every metric name in
any `expr` (and in label_values() variable queries) is exported by the node;
rate()/irate()/increase() are applied to counter series only, with a
[$__rate_interval] range; histogram_quantile() aggregates keep `le`.

Exported names come from the `# TYPE name kind` lines: a counter `name` is
queried as `name_total` (OpenMetrics drops `_total` from the TYPE line; the
classic format keeps it), a histogram as name_bucket / name_sum / name_count,
a summary as name / name_sum / name_count, anything else as `name`. Names
Prometheus adds at scrape time (`up`, ...) are allowed without appearing there.
Exit status: 0 when every check passes, 1 otherwise, 2 on bad usage.
"""

import json
import re
import sys

# Series Prometheus itself attaches to every scrape target.
SCRAPE_SERIES = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
}

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
    "bool", "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
}

IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
RATE_CALL = re.compile(r"\b(rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")
RANGE = re.compile(r"\[([^\]]*)\]")
VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")


def exported_names(text):
    """Maps every queryable series name to its kind ('counter', 'gauge', ...)."""
    names = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "#" and parts[1] == "TYPE":
            name, kind = parts[2], parts[3]
            if kind == "counter":
                base = name[: -len("_total")] if name.endswith("_total") else name
                names[base + "_total"] = "counter"
                names[base + "_created"] = "gauge"
            elif kind in ("histogram", "gaugehistogram"):
                names[name + "_bucket"] = "counter" if kind == "histogram" else "gauge"
                for suffix in ("_sum", "_count", "_gsum", "_gcount"):
                    names[name + suffix] = "counter" if kind == "histogram" else "gauge"
                names[name + "_created"] = "gauge"
            elif kind == "summary":
                names[name] = "gauge"
                names[name + "_sum"] = "counter"
                names[name + "_count"] = "counter"
                names[name + "_created"] = "gauge"
            elif kind == "info":
                names[name + "_info"] = "gauge"
            else:
                names[name] = kind
    return names


def metric_names(expr):
    """The metric names an expression selects (functions, labels, keywords dropped)."""
    e = STRING.sub('""', expr)
    e = re.sub(r"\{[^{}]*\}", " ", e)       # label matchers
    e = RANGE.sub(" ", e)                   # [5m], [$__rate_interval], subqueries
    e = GROUPING.sub(" ", e)                # by (le, instance) etc.
    e = VARIABLE.sub(" ", e)                # $job, ${datasource}
    found = []
    for m in IDENT.finditer(e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("("):            # a function or aggregation
            continue
        if word.lower() in KEYWORDS:
            continue
        found.append(word)
    return found


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels") or [])


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    errors = []
    try:
        with open(argv[1], encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL {argv[1]}: {e}")
        return 1
    try:
        with open(argv[2], encoding="utf-8") as f:
            known = exported_names(f.read())
    except OSError as e:
        print(f"FAIL {argv[2]}: {e}")
        return 1
    if not known:
        errors.append(f"{argv[2]}: no '# TYPE name kind' lines")

    exprs = []  # (where, expr)
    seen_ids = {}
    panels = list(walk_panels(dash.get("panels") or []))
    if not panels:
        errors.append("dashboard has no panels")
    for p in panels:
        pid = p.get("id")
        where = f"panel {pid!r} ({p.get('title', '?')!r})"
        if not isinstance(pid, int) or isinstance(pid, bool):
            errors.append(f"{where}: id missing or not an integer")
        elif pid in seen_ids:
            errors.append(f"{where}: id also used by {seen_ids[pid]!r}")
        else:
            seen_ids[pid] = p.get("title")
        if not isinstance(p.get("title"), str) or not p["title"].strip():
            errors.append(f"{where}: no title")
        if not p.get("datasource"):
            errors.append(f"{where}: no datasource")
        targets = p.get("targets") or []
        if p.get("type") != "row" and not targets:
            errors.append(f"{where}: no targets")
        for t in targets:
            if not isinstance(t.get("expr"), str) or not t["expr"].strip():
                errors.append(f"{where} target {t.get('refId')!r}: no expr")
                continue
            exprs.append((f"{where} target {t.get('refId')!r}", t["expr"]))

    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", q)
        if m:
            exprs.append((f"variable {v.get('name')!r}", m.group(1)))

    for where, expr in exprs:
        for name in metric_names(expr):
            if name not in known and name not in SCRAPE_SERIES:
                errors.append(f"{where}: metric {name!r} not exported: {expr}")
        for func, name in RATE_CALL.findall(STRING.sub('""', expr)):
            kind = known.get(name)
            if kind is not None and kind != "counter":
                errors.append(f"{where}: {func}() over {name!r}, a {kind}")
        for rng in RANGE.findall(STRING.sub('""', expr)):
            if rng.strip() != "$__rate_interval":
                errors.append(f"{where}: range [{rng}] is not [$__rate_interval]")
        if "histogram_quantile" in expr:
            groupings = re.findall(r"\bby\s*\(([^()]*)\)", expr)
            if not any("le" in [g.strip() for g in gs.split(",")] for gs in groupings):
                errors.append(f"{where}: histogram_quantile without 'by (le, ...)'")

    for e in errors:
        print("FAIL " + e)
    names = {n for _, e in exprs for n in metric_names(e)}
    print(f"{'FAIL' if errors else 'OK'}: {len(panels)} panels, {len(exprs)} "
          f"queries, {len(names)} metric names, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
