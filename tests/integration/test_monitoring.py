"""Issue 18, part 3: every metric, label and label value that the Grafana dashboard and the
Prometheus alerting rules of deploy/monitoring/ read exists in the /metrics of real gateways
(a federation of three, each serving /metrics, after a workload that makes every series
appear: calls, allowed and refused transfers, ledger verifications, an open leg). This is the
test that catches drift between the gateway and its dashboards: rename a metric or a label in
src/api/metrics.c and it fails, naming the panel or the alert. The files' own checks (schema,
promtool, unit tests of the alerts) are tests/monitoring/."""

import os
import re
import sys
import urllib.request
import uuid

import grpc
import pytest

from conftest import wait_until
from domicile.v1 import customers_pb2, records_pb2, transfers_pb2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "monitoring"))
import monitoring as M  # noqa: E402
from test_metrics import free_port  # noqa: E402

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def index(texts):
    """{metric: {label: {values}}} over every sample of these exposition texts."""
    out = {}
    for text in texts:
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            assert m, f"not an exposition line: {line!r}"
            labels = out.setdefault(m.group(1), {})
            for k, v in _LABEL.findall(m.group(2) or ""):
                labels.setdefault(k, set()).add(v)
    return out


# Label values a workload cannot all make appear: the gRPC status codes, as the gateway spells
# them (checked against what the scrape shows).
GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
              "UNAUTHENTICATED"}
UNIVERSE = {("domicile_calls_total", "status"): GRPC_CODES}


def unary(ch, path, req, resp, metadata=None):
    return ch.unary_unary(path, request_serializer=req.SerializeToString,
                          response_deserializer=resp.FromString)(req, timeout=30, metadata=metadata)


def literal_alternatives(regex):
    """The values a =~ matcher names when it is a plain alternation (a|b|c), else None."""
    parts = regex.split("|")
    return parts if all(re.fullmatch(r"[\w.+-]+", p) for p in parts) else None


def drift(idx, where, expr, out_labels):
    """What of `expr` the scraped series do not have (empty: nothing)."""
    problems = []
    referenced = set()
    for metric, matchers in M.selectors(expr):
        if metric in M.SYNTHETIC:
            have = {k: None for k in M.TARGET_LABELS}
        elif metric not in idx:
            problems.append(f"{where}: metric {metric} is not exported")
            continue
        else:
            have = idx[metric]
        referenced.add(metric)
        for label, op, val in matchers:
            if label in M.TARGET_LABELS or label == "__name__":
                continue
            if label not in have:
                problems.append(f"{where}: {metric} has no label {label}")
                continue
            want = [val] if op in ("=", "!=") else literal_alternatives(val) if op == "=~" else None
            for v in want or []:
                if have[label] is not None and v not in have[label] | UNIVERSE.get((metric, label), set()):
                    problems.append(f"{where}: {metric}{{{label}=...}} never has the value {v!r} "
                                    f"(seen: {sorted(have[label])})")
    known = set(M.TARGET_LABELS) | {"le"} | M.made_labels(expr)
    for metric in referenced:
        known |= set(idx.get(metric, {}))
    for label in (M.grouping_labels(expr) | M.label_replace_sources(expr) | out_labels) - known:
        problems.append(f"{where}: label {label} is on none of {sorted(referenced)}")
    return problems


@pytest.fixture(scope="module")
def scraped(regions, tmp_path_factory):
    """The three gateways' /metrics after a workload that makes every series appear."""
    from conftest import GatewayFactory

    factory = GatewayFactory(regions, str(tmp_path_factory.mktemp("monitoring")))
    ports = {code: free_port() for code in ("us", "eu", "in")}
    g = factory.start(overrides={"metrics_listen": f"127.0.0.1:{ports['us']}"},
                      region_overrides={c: {"metrics_listen": f"127.0.0.1:{ports[c]}"} for c in ("eu", "in")},
                      name="monitoring")
    leg = f"monitoring-due-{uuid.uuid4().hex[:8]}"
    try:
        admin, reader, auditor = g.channel(token="admin"), g.channel(token="service-in"), g.channel(token="auditor")
        cid = "mon-" + uuid.uuid4().hex[:10]
        unary(admin, "/domicile.v1.CustomersService/RegisterCustomer",
              customers_pb2.RegisterCustomerRequest(request_id="r-" + cid, customer_id=cid, residency="eu"),
              customers_pb2.RegisterCustomerResponse)
        unary(admin, "/domicile.v1.RecordsService/PutRecord",  # us -> eu, allowed
              records_pb2.PutRecordRequest(request_id="p-" + cid, customer_id=cid, record_id="r1",
                                           kind="note", payload=b"x" * 10), records_pb2.PutRecordResponse)
        unary(reader, "/domicile.v1.RecordsService/GetRecord",  # eu -> in, allowed
              records_pb2.GetRecordRequest(customer_id=cid, record_id="r1"), records_pb2.GetRecordResponse)
        with pytest.raises(grpc.RpcError) as e:  # eu -> in for a forbidden purpose: refused
            unary(reader, "/domicile.v1.RecordsService/GetRecord",
                  records_pb2.GetRecordRequest(customer_id=cid, record_id="r1"), records_pb2.GetRecordResponse,
                  metadata=(("x-purpose", "sale"),))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for code in ("us", "eu", "in"):
            unary(auditor, "/domicile.v1.TransfersService/VerifyLedger",
                  transfers_pb2.VerifyLedgerRequest(region=code), transfers_pb2.VerifyLedgerResponse)
        # an open leg in us, so that its next due date is exported
        regions.psql("us", (
            "INSERT INTO domicile.dsr_requests (request_id, kind, fingerprint, subject_key, principal, "
            f"received_at, due_at, gdpr_due_at) VALUES ('{leg}', 'erase', '\\x00', "
            f"'\\x{os.urandom(32).hex()}', 'monitoring-test', now(), now() + interval '20 days', "
            "now() + interval '20 days'); INSERT INTO domicile.dsr_legs (request_id, state, next_attempt_at) "
            f"VALUES ('{leg}', 'failed', now() + interval '1 day')"))

        def ready(texts):
            idx = index(texts.values())
            return ("domicile_dsr_next_due_timestamp_seconds" in idx
                    and "refused" in idx.get("domicile_transfers_total", {}).get("outcome", ())
                    and "domicile_region_sync_standbys" in idx
                    and len(idx.get("domicile_ledger_verify_ok", {}).get("region", ())) == 3)

        texts = wait_until(lambda: {c: scrape(p) for c, p in ports.items()}, ready, timeout=30)
        assert ready(texts), texts
        yield index(texts.values())
    finally:
        regions.psql("us", f"DELETE FROM domicile.dsr_legs WHERE request_id = '{leg}'; "
                           f"DELETE FROM domicile.dsr_requests WHERE request_id = '{leg}'")
        factory.close()


def test_every_metric_and_label_read_exists(scraped):
    queries = M.every_query()
    assert len(queries) > 30, "the dashboard's and the rules' queries were not found"
    problems = [p for where, expr, out in queries for p in drift(scraped, where, expr, out)]
    assert not problems, "\n".join(problems)


def test_status_values_are_grpc_code_names(scraped):
    seen = scraped["domicile_calls_total"]["status"]
    assert {"OK", "PERMISSION_DENIED"} <= seen <= GRPC_CODES, seen


def test_the_check_finds_drift(scraped):
    """Renamed metrics, labels and label values are found (the check can fail)."""
    assert drift(scraped, "x", 'sum(rate(domicile_call_total[5m]))', set())
    assert drift(scraped, "x", 'sum by (regoin) (domicile_region_up)', set())
    assert drift(scraped, "x", 'domicile_dsr_open_legs{due="2d"}', set())
    assert drift(scraped, "x", 'domicile_transfers_total{outcome=~"allowed|denied"}', set())
    assert drift(scraped, "x", 'domicile_calls_total{status="UNAVAILABL"}', set())
    assert drift(scraped, "x", 'domicile_region_up', {"peer"})
    assert not drift(scraped, "x", 'sum by (region, due) (domicile_dsr_open_legs{due=~"1d|5d"})', {"region"})
