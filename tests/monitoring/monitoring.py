"""What tests/monitoring/ and tests/integration/test_monitoring.py share: where the dashboard
and the rules are, promtool, and a small reader of the PromQL they hold (metric selectors,
label matchers, the label names they group or join by)."""

import json
import os
import re
import shutil
import subprocess
import tempfile

import yaml

REPO = os.environ.get("DOMICILE_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MONITORING = os.path.join(REPO, "deploy", "monitoring")
RULES = os.path.join(MONITORING, "prometheus", "domicile-rules.yml")
RULES_TEST = os.path.join(MONITORING, "prometheus", "domicile-rules.test.yml")
DASHBOARD = os.path.join(MONITORING, "grafana", "domicile.json")
GEN_PROMETHEUSRULE = os.path.join(MONITORING, "gen-prometheusrule")
K8S_MONITORING = os.path.join(REPO, "deploy", "kubernetes", "monitoring")
PROMETHEUSRULE = os.path.join(K8S_MONITORING, "prometheusrule.yaml")
RUNBOOK = os.path.join(REPO, "docs", "runbook.md")
SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana-dashboard.schema.json")

# Labels Prometheus adds to every scraped series (deploy/monitoring/README.md: the scrape job).
TARGET_LABELS = {"job", "instance", "gateway_region"}
# Series Prometheus makes itself, not the gateway.
SYNTHETIC = {"up"}
# Grafana's variables that stand for durations, and what to put there to parse the query.
DURATIONS = {"__rate_interval": "5m", "__range": "1h", "__interval": "1m"}


def promtool():
    """promtool as tests/monitoring/promtool-check finds it."""
    if os.environ.get("DOMICILE_PROMTOOL"):
        return os.environ["DOMICILE_PROMTOOL"]
    if shutil.which("promtool"):
        return shutil.which("promtool")
    base = "/var/cache/domicile" if os.geteuid() == 0 else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "domicile")
    path = os.environ.get("DOMICILE_PROMTOOL_DIR") or os.path.join(base, "promtool")
    path = os.path.join(path, "promtool")
    return path if os.access(path, os.X_OK) else None


def load_rules():
    with open(RULES) as f:
        return yaml.safe_load(f)


def alerts(rules=None):
    return [r for g in (rules or load_rules())["groups"] for r in g["rules"] if "alert" in r]


def load_dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(dash):
    """Every panel, those inside collapsed rows too."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_targets(dash):
    """(panel, target) of every query of the dashboard."""
    return [(p, t) for p in all_panels(dash) if p["type"] != "row" for t in p.get("targets", [])]


def template_vars(dash):
    return {v["name"]: v for v in dash.get("templating", {}).get("list", [])}


def grafana_to_promql(expr):
    """The query as Prometheus gets it: durations for Grafana's interval variables, a regex
    matching anything for the dashboard's own variables (used in =~ matchers only)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: DURATIONS.get(m.group(1), ".*"), expr)


def variables_used(expr):
    return set(re.findall(r"\$\{?(\w+)\}?", expr))


_SELECTOR = re.compile(r"\b((?:domicile_[a-z0-9_]+)|up)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_REPLACE = re.compile(r'label_replace\s*\([^,]+,\s*"([^"]+)"\s*,\s*"[^"]*"\s*,\s*"([^"]+)"')


def selectors(expr):
    """[(metric, [(label, op, value)])] of every selector of a domicile_* metric or of up."""
    out = []
    for m in _SELECTOR.finditer(expr):
        matchers = _MATCHER.findall(m.group(2) or "")
        out.append((m.group(1), matchers))
    return out


def grouping_labels(expr):
    """Label names the expression aggregates, joins or groups by."""
    names = set()
    for m in _GROUPING.finditer(expr):
        names |= {n.strip() for n in m.group(1).split(",") if n.strip()}
    return names


def made_labels(expr):
    """Labels an expression makes itself (label_replace's destination)."""
    return {m.group(1) for m in _LABEL_REPLACE.finditer(expr)}


def label_replace_sources(expr):
    return {m.group(2) for m in _LABEL_REPLACE.finditer(expr)}


def legend_labels(legend):
    return set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend or ""))


def every_query():
    """(where, PromQL) of every alert expression and every dashboard query (as Prometheus
    gets it), with the labels the query's output must carry (legend, annotations)."""
    out = []
    for a in alerts():
        used = set()
        for text in a.get("annotations", {}).values():
            used |= set(re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text))
        out.append((f"alert {a['alert']}", a["expr"], used))
    for p, t in dashboard_targets(load_dashboard()):
        out.append((f"panel {p['title']!r} {t['refId']}", grafana_to_promql(t["expr"]),
                    legend_labels(t.get("legendFormat"))))
    return out


def promtool_check_exprs(exprs):
    """Runs `promtool check rules` on a rules file holding each expression as a recording rule:
    promtool parses every one. Returns (returncode, output)."""
    tool = promtool()
    doc = {"groups": [{"name": "parse", "rules": [{"record": f"domicile:parse:{i}", "expr": e}
                                                  for i, e in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(doc, f)
        path = f.name
    try:
        r = subprocess.run([tool, "check", "rules", path], capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout + r.stderr
    finally:
        os.unlink(path)


def runbook_anchors():
    """GitHub's anchors of docs/runbook.md's headings."""
    anchors = set()
    with open(RUNBOOK) as f:
        for line in f:
            m = re.match(r"#+\s+(.*)", line)
            if m:
                a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
                anchors.add(a)
    return anchors
