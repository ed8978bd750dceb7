"""The Grafana dashboard and the Prometheus alerting rules of deploy/monitoring/ (issue 18),
checked without a Prometheus or a Grafana: the dashboard against a JSON schema of Grafana's
dashboard model and its own layout rules, every query and alert expression parsed by promtool,
every alert complete (for, severity, summary, description, a runbook section) and unit-tested
(deploy/monitoring/prometheus/domicile-rules.test.yml, run by CTest's monitoring.rules-test),
and the Kubernetes PrometheusRule and PodMonitor in step with the rules. That every metric and
label they read exists in a real gateway's /metrics is tests/integration/test_monitoring.py."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import monitoring as M  # noqa: E402

try:
    import jsonschema
except ImportError:  # pragma: no cover - deploy/deps.sh test installs it
    pytest.fail("python3-jsonschema is missing: run deploy/deps.sh test", pytrace=False)


@pytest.fixture(scope="module")
def dash():
    return M.load_dashboard()


@pytest.fixture(scope="module")
def validator():
    with open(M.SCHEMA) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def promtool():
    tool = M.promtool()
    if not tool:
        pytest.fail("promtool not found: run deploy/deps.sh test", pytrace=False)
    return tool


def test_dashboard_matches_grafanas_dashboard_model(dash, validator):
    errors = sorted(validator.iter_errors(dash), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("breakage", ["no datasource", "another datasource", "no targets", "wide",
                                      "no refId", "no uid"])
def test_schema_refuses_a_broken_dashboard(dash, validator, breakage):
    """The schema is not a formality: each of these is refused."""
    d = copy.deepcopy(dash)
    p = next(p for p in d["panels"] if p["type"] != "row")
    if breakage == "no datasource":
        del p["datasource"]
    elif breakage == "another datasource":
        p["targets"][0]["datasource"] = {"type": "loki", "uid": "x"}
    elif breakage == "no targets":
        p["targets"] = []
    elif breakage == "wide":
        p["gridPos"]["w"] = 25
    elif breakage == "no refId":
        del p["targets"][0]["refId"]
    else:
        del d["uid"]
    assert list(validator.iter_errors(d)), breakage


def test_panel_ids_and_layout(dash):
    panels = M.all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']!r} is wider than the grid: {g}"
        if p["type"] == "row":
            assert (g["x"], g["w"], g["h"]) == (0, 24, 1), f"row {p['title']!r}: {g}"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                cells[(x, y)] = p["title"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "two panels with one title"


def test_every_panel_queries_prometheus_through_the_variable(dash):
    v = M.template_vars(dash)
    assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
    for p in M.all_panels(dash):
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{p['title']!r}: refIds {refs}"
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_variables_used_are_defined(dash):
    defined = set(M.template_vars(dash)) | set(M.DURATIONS)
    for p, t in M.dashboard_targets(dash):
        unknown = M.variables_used(t["expr"]) - defined
        assert not unknown, f"{p['title']!r} {t['refId']}: undefined variables {unknown}"
        # the dashboard's own (multi-value) variables stand in regex matchers only
        for name in M.variables_used(t["expr"]) - set(M.DURATIONS):
            assert re.search(r'=~\s*"\$' + name + '"', t["expr"]), f"{p['title']!r}: ${name} outside a =~ matcher"


def test_every_query_and_alert_expression_parses(promtool):
    queries = M.every_query()
    rc, out = M.promtool_check_exprs([q for _, q, _ in queries])
    assert rc == 0, out
    assert f"SUCCESS: {len(queries)} rules found" in out, out


def test_promtool_parse_check_can_fail(promtool):
    rc, out = M.promtool_check_exprs(['sum by (region) (rate(domicile_calls_total[5m])'])
    assert rc != 0 and "parse error" in out, out


def test_every_alert_is_complete():
    anchors = M.runbook_anchors()
    names = [a["alert"] for a in M.alerts()]
    assert len(names) == len(set(names)), names
    for a in M.alerts():
        where = a["alert"]
        assert re.fullmatch(r"Domicile[A-Z][A-Za-z]+", where), where
        assert "for" in a and re.fullmatch(r"\d+[smh]", a["for"]), f"{where}: for: {a.get('for')}"
        assert a.get("labels", {}).get("severity") in ("critical", "warning"), f"{where}: severity"
        ann = a.get("annotations", {})
        assert set(ann) == {"summary", "description", "runbook_url"}, f"{where}: annotations {sorted(ann)}"
        assert ann["runbook_url"] == f"docs/runbook.md#{where.lower()}", f"{where}: {ann['runbook_url']}"
        assert where.lower() in anchors, f"{where}: no section '{where}' in docs/runbook.md"


def test_one_unit_test_per_alert_silent_and_firing():
    with open(M.RULES_TEST) as f:
        t = yaml.safe_load(f)
    assert t["rule_files"] == [os.path.basename(M.RULES)]
    groups = {g["name"]: g for g in t["tests"]}
    names = {a["alert"] for a in M.alerts()}
    assert set(groups) == names, f"test groups {sorted(groups)} != alerts {sorted(names)}"
    for name, g in groups.items():
        evals = [e for e in g["alert_rule_test"] if e["alertname"] == name]
        assert len(evals) == len(g["alert_rule_test"]), f"{name}: its group tests another alert"
        assert any(not e.get("exp_alerts") for e in evals), f"{name}: never checked silent"
        assert any(e.get("exp_alerts") for e in evals), f"{name}: never checked firing"


def test_prometheusrule_holds_the_rules_file():
    with open(M.PROMETHEUSRULE) as f:
        (pr,) = list(yaml.safe_load_all(f))
    assert (pr["apiVersion"], pr["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert pr["metadata"]["namespace"] == "domicile"
    assert pr["spec"]["groups"] == M.load_rules()["groups"], "deploy/monitoring/gen-prometheusrule was not run"
    r = subprocess.run([sys.executable, M.GEN_PROMETHEUSRULE, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gen_prometheusrule_check_finds_a_difference(tmp_path):
    other = tmp_path / "prometheusrule.yaml"
    with open(M.PROMETHEUSRULE) as f:
        other.write_text(f.read().replace("for: 5m", "for: 6m", 1))
    r = subprocess.run([sys.executable, M.GEN_PROMETHEUSRULE, "--check", "--out", str(other)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "differs" in r.stderr, r.stdout + r.stderr


def test_podmonitor_gives_the_labels_the_rules_expect():
    """The rules read job="domicile-gateway" and the target label gateway_region: the
    PodMonitor takes the job from the pods' app.kubernetes.io/name and gateway_region from their
    domicile.io/region, on the gateways' container port "metrics"."""
    with open(os.path.join(M.K8S_MONITORING, "podmonitor.yaml")) as f:
        (pm,) = list(yaml.safe_load_all(f))
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    spec = pm["spec"]
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/name"] == "domicile-gateway"
    jobs = {m for _, q, _ in M.every_query() for m in re.findall(r'job="([^"]+)"', q)}
    assert jobs == {"domicile-gateway"}, jobs
    (ep,) = spec["podMetricsEndpoints"]
    assert ep["port"] == "metrics" and ep.get("path", "/metrics") == "/metrics"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in ep["relabelings"]}
    assert relabel["gateway_region"] == ["__meta_kubernetes_pod_label_domicile_io_region"]
    with open(os.path.join(M.K8S_MONITORING, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    assert sorted(k["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]
    # every region's gateway pods: the labels above and the port
    for code in ("us", "eu", "in"):
        with open(os.path.join(M.REPO, "deploy", "kubernetes", f"gateway-{code}.yaml")) as f:
            (dep,) = [d for d in yaml.safe_load_all(f) if d and d["kind"] == "Deployment"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "domicile-gateway" and labels["domicile.io/region"] == code
        (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "domiciled"]
        assert "metrics" in {p["name"] for p in c["ports"]}, f"gateway-{code}.yaml: no metrics port"


def test_readme_scrape_config_names_the_job_and_the_target_label():
    with open(os.path.join(M.MONITORING, "README.md")) as f:
        text = f.read()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    (scrape,) = [b for b in blocks if isinstance(b, dict) and "scrape_configs" in b]
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "domicile-gateway"
    regions = {sc["labels"]["gateway_region"] for sc in job["static_configs"]}
    assert regions == {"us", "eu", "in"}
    assert scrape["rule_files"] and all(r.endswith("domicile-rules.yml") for r in scrape["rule_files"])
