"""
Issue 5 ("Cross-border transfer ledger"), item 5: `domicilectl transfers report|list|verify`
against the real gateway and regions.

The test makes its own cross-border traffic under a purpose of its own (`rpt-<random>`), so the
report filtered by that purpose has exact, known numbers whatever other tests did in the
session; the unfiltered report is checked for consistency between its formats (JSON, CSV,
HTML table and SVG chart) rather than for fixed numbers.
"""

import csv
import io
import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET

import grpc
import pytest

from conftest import BUILD_DIR, demo_token
from helpers import uid
from domicile.v1 import customers_pb2, records_pb2, transfers_pb2

DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")
DPF = "eu-us-dpf-2023-1795"
SCC2 = "scc-2021-914-m2"
US_OUT = "us-no-restriction"
ARROW = "\u2192"
SVG = "{http://www.w3.org/2000/svg}"
XHTML = "{http://www.w3.org/1999/xhtml}"
PAYLOAD = b"report-cli payload " * 7  # 133 bytes


def unary(channel, path, req_cls, rep_cls):
    return channel.unary_unary(path, request_serializer=req_cls.SerializeToString, response_deserializer=rep_cls.FromString)


def month_now():
    return time.strftime("%Y-%m", time.gmtime())


@pytest.fixture(scope="module")
def traffic(session_gateway, tmp_path_factory):
    """One EU customer with one record, read twice by a US principal and once by an IN principal,
    written once by the US principal, all under this module's own purpose; and one read with the
    forbidden purpose model-training (refused). Returns what the report must show."""
    gw = session_gateway
    purpose = f"rpt-{uid()[:12]}"
    md = (("x-purpose", purpose),)
    # Each principal calls its own region's gateway, as services do (a call through a third
    # region's gateway adds a transit entry, test_sovereign.py).
    eu, us, inn = (gw.peers[r].channel(token=f"service-{r}") for r in ("eu", "us", "in"))
    cid = f"cust-rpt-{uid()}"
    months = {month_now()}

    register = unary(eu, "/domicile.v1.CustomersService/RegisterCustomer", customers_pb2.RegisterCustomerRequest, customers_pb2.RegisterCustomerResponse)
    register(customers_pb2.RegisterCustomerRequest(request_id=f"reg-{uid()}", customer_id=cid, residency="eu"), timeout=15)
    put_eu = unary(eu, "/domicile.v1.RecordsService/PutRecord", records_pb2.PutRecordRequest, records_pb2.PutRecordResponse)
    put_eu(
        records_pb2.PutRecordRequest(request_id=f"put-{uid()}", customer_id=cid, record_id="r1", kind="note", payload=PAYLOAD),
        timeout=15,
        metadata=md,
    )
    get_us = unary(us, "/domicile.v1.RecordsService/GetRecord", records_pb2.GetRecordRequest, records_pb2.GetRecordResponse)
    get_in = unary(inn, "/domicile.v1.RecordsService/GetRecord", records_pb2.GetRecordRequest, records_pb2.GetRecordResponse)
    for _ in range(2):
        assert get_us(records_pb2.GetRecordRequest(customer_id=cid, record_id="r1"), timeout=15, metadata=md).record.payload == PAYLOAD
    assert get_in(records_pb2.GetRecordRequest(customer_id=cid, record_id="r1"), timeout=15, metadata=md).record.payload == PAYLOAD
    # A write by a US principal into the EU customer's region: route us -> eu.
    put_us = unary(us, "/domicile.v1.RecordsService/PutRecord", records_pb2.PutRecordRequest, records_pb2.PutRecordResponse)
    put_us(
        records_pb2.PutRecordRequest(request_id=f"put-{uid()}", customer_id=cid, record_id="r2", kind="note", payload=PAYLOAD[:40]),
        timeout=15,
        metadata=md,
    )
    with pytest.raises(grpc.RpcError) as ei:
        get_us(records_pb2.GetRecordRequest(customer_id=cid, record_id="r1"), timeout=15, metadata=(("x-purpose", "model-training"),))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED, ei.value.details()
    months.add(month_now())

    token_file = tmp_path_factory.mktemp("report-cli") / "auditor.token"
    token_file.write_text(demo_token(gw.config, "auditor") + "\n")
    os.chmod(token_file, 0o600)
    return {
        "gateway": gw,
        "purpose": purpose,
        "customer": cid,
        "months": months,
        "token_file": str(token_file),
        "workdir": token_file.parent,
        # (from, to, basis) -> (transfers, records, bytes)
        "rows": {
            ("eu", "us", DPF): (2, 2, 2 * len(PAYLOAD)),
            ("eu", "in", SCC2): (1, 1, len(PAYLOAD)),
            ("us", "eu", US_OUT): (1, 1, 40),
        },
    }


def ctl(t, *args, token_file=None, check=True):
    """Runs build/domicilectl against the session gateway with the auditor's token file."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOMICILE_TOKEN", "DOMICILE_ADDR")}
    cmd = [DOMICILECTL, "--addr", t["gateway"].address, "--token-file", token_file or t["token_file"], *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def report_json(t, *args):
    return json.loads(ctl(t, "transfers", "report", "--format", "json", *args).stdout)


def csv_rows(text):
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    for r in rows:
        for k in ("transfers", "records", "bytes", "refusals"):
            r[k] = int(r[k])
    return rows


def totals(rows):
    return {k: sum(r[k] for r in rows) for k in ("transfers", "records", "bytes", "refusals")}


def html_report(t, path, *args):
    ctl(t, "transfers", "report", "--format", "html", "--output", str(path), *args)
    text = path.read_text(encoding="utf-8")
    # The SVG alone, as an XML document ...
    m = re.search(r"<svg\b.*?</svg>", text, re.S)
    assert m, "no <svg> element in the HTML report"
    svg = ET.fromstring(m.group(0))
    assert svg.tag == SVG + "svg"
    # ... and the whole file, written as XHTML-compatible markup.
    root = ET.fromstring(text.replace("<!DOCTYPE html>", "", 1))
    assert root.tag == XHTML + "html"
    assert root.find(f".//{SVG}svg") is not None
    # Self-contained: no external scripts, styles, images or fonts.
    for el in root.iter():
        for attr in ("src", "href"):
            assert attr not in el.attrib, f"external reference {el.tag} {attr}={el.attrib[attr]!r}"
    assert root.find(f".//{XHTML}script") is None
    return text, root, svg


def bars(svg):
    """(month, route) -> transfers for every bar of the chart; each bar must have a height."""
    out = {}
    for rect in svg.iter(SVG + "rect"):
        if rect.get("class") != "bar":
            continue
        key = (rect.get("data-month"), rect.get("data-route"))
        assert key not in out, f"two bars for {key}"
        assert float(rect.get("height")) > 0, f"bar {key} has no height"
        out[key] = int(rect.get("data-transfers"))
    return out


def expected_bars(rows):
    want = {}
    for r in rows:
        if r["transfers"] > 0:
            key = (r["month"], f"{r['from_region']}{ARROW}{r['to_region']}")
            want[key] = want.get(key, 0) + r["transfers"]
    return want


def table_rows(root, cls):
    table = root.find(f".//{XHTML}table[@class='{cls}']")
    assert table is not None, f"no table {cls}"
    return [["".join(td.itertext()) for td in tr.findall(XHTML + "td")] for tr in table.find(XHTML + "tbody").findall(XHTML + "tr")]


# --------------------------------------------------------------------------------------------


def test_report_filtered_by_purpose_is_exact(traffic):
    t = traffic
    rep = report_json(t, "--purpose", t["purpose"])
    assert rep["complete"] is True
    got = {}
    for r in rep["rows"]:
        assert r["purpose"] == t["purpose"]
        assert r["month"] in t["months"]
        key = (r["from_region"], r["to_region"], r["basis_id"])
        prev = got.get(key, (0, 0, 0))
        got[key] = (prev[0] + r["transfers"], prev[1] + r["records"], prev[2] + r["bytes"])
        assert r["refusals"] == 0
    assert got == t["rows"]
    assert rep["totals"] == {"transfers": 4, "records": 4, "bytes": 3 * len(PAYLOAD) + 40, "refusals": 0}
    # One state per region (the proto promises region code order; the order is not checked here).
    assert sorted(led["region"] for led in rep["ledgers"]) == ["eu", "in", "us"]

    # The refused read shows as a refusal on eu -> us under its purpose.
    refused = report_json(t, "--purpose", "model-training", "--from-region", "eu", "--to-region", "us")
    assert sum(r["refusals"] for r in refused["rows"]) >= 1
    assert all((r["from_region"], r["to_region"]) == ("eu", "us") for r in refused["rows"])

    # A window before any traffic: no rows, still a well-formed report.
    empty = report_json(t, "--from", "2000-01-01", "--to", "2000-02-01")
    assert empty["rows"] == [] and empty["from"] == "2000-01-01" and empty["to"] == "2000-02-01"
    assert empty["from_unix_ms"] == 946684800000 and empty["to_unix_ms"] == 949363200000


def test_html_report(traffic, tmp_path):
    t = traffic
    text, root, svg = html_report(t, tmp_path / "report.html")
    rep = report_json(t)
    assert rep["rows"], "the session's traffic is missing from the report"
    # One bar per (month, route) with allowed transfers, each with a height, and none else.
    assert bars(svg) == expected_bars(rep["rows"])
    mine = [k for k in bars(svg) if k[0] in t["months"]]
    assert {route for _, route in mine} >= {f"eu{ARROW}us", f"eu{ARROW}in", f"us{ARROW}eu"}
    # Legend: one swatch per route with a bar, each its own colour.
    routes = {route for _, route in bars(svg)}
    legend = svg.find(f"{SVG}g[@class='legend']")
    swatches = [r.get("fill") for r in legend.iter(SVG + "rect")]
    labels = [x.text for x in legend.iter(SVG + "text")]
    assert sorted(labels) == sorted(routes) and len(set(swatches)) == len(swatches) == len(routes)
    texts = ["".join(x.itertext()) for x in svg.iter(SVG + "text")]
    assert "Month (UTC)" in texts and "Transfers (allowed)" in texts

    # The table lists the eu -> us DPF row of this module's purpose, with its numbers.
    rows = table_rows(root, "rows")
    assert len(rows) == len(rep["rows"])
    dpf = [r for r in rows if r[1] == f"eu{ARROW}us" and r[2] == DPF and r[3] == t["purpose"]]
    assert len(dpf) == 1 and dpf[0][0] in t["months"], rows
    assert dpf[0][4:] == ["2", "2", str(2 * len(PAYLOAD)), "0"]
    # Ledger states: one per region, each marked verified or not, as the JSON says.
    ledgers = table_rows(root, "ledgers")
    assert [r[0] for r in ledgers] == [led["region"] for led in rep["ledgers"]]
    for row, led in zip(ledgers, rep["ledgers"]):
        assert ("\u2713 verified" in row[1]) == bool(led["verified"]), (row, led)
    # Title, generation time and window are in the page.
    assert root.find(f".//{XHTML}title").text.startswith("Domicile transfer report")
    meta = "".join(root.find(f".//{XHTML}p[@class='meta']").itertext())
    assert "Generated" in meta and "window: all time" in meta


def test_html_report_without_rows(traffic, tmp_path):
    text, root, svg = html_report(traffic, tmp_path / "empty.html", "--from", "2000-01-01", "--to", "2000-02-01")
    assert bars(svg) == {}
    assert "No allowed transfers in this window" in ["".join(x.itertext()) for x in svg.iter(SVG + "text")]
    assert table_rows(root, "rows") == [["No transfers in this window"]]
    assert "2000-01-01 to 2000-02-01" in "".join(root.find(f".//{XHTML}p[@class='meta']").itertext())


def test_json_totals_equal_csv_totals(traffic):
    t = traffic
    rep = report_json(t)
    c = csv_rows(ctl(t, "transfers", "report", "--format", "csv").stdout)
    assert totals(c) == rep["totals"] == totals(rep["rows"])
    assert len(c) == len(rep["rows"])
    for a, b in zip(c, rep["rows"]):
        assert {k: a[k] for k in a} == {k: b[k] for k in a}
    # The same through --output, and the other formats carry the same rows.
    out = t["workdir"] / "report.csv"
    ctl(t, "transfers", "report", "--format", "csv", "--output", str(out), "--purpose", t["purpose"])
    assert totals(csv_rows(out.read_text())) == report_json(t, "--purpose", t["purpose"])["totals"]
    md = ctl(t, "transfers", "report", "--format", "markdown", "--purpose", t["purpose"]).stdout
    assert "| Month | Route | Basis | Purpose | Transfers | Records | Bytes | Refusals |" in md
    assert f"| eu{ARROW}us | {DPF} | {t['purpose']} | 2 | 2 | {2 * len(PAYLOAD)} | 0 |" in md
    table = ctl(t, "transfers", "report", "--purpose", t["purpose"]).stdout
    assert re.search(rf"eu{ARROW}us\s+{re.escape(DPF)}\s+{t['purpose']}\s+2\s+2\s+{2 * len(PAYLOAD)}\s+0", table), table
    assert re.search(r"^eu\s+yes\s+(yes|NO)\s+\d+", table, re.M), table


def test_list_by_basis(traffic):
    t = traffic
    p = ctl(t, "transfers", "list", "--basis", DPF)
    lines = [line.split("\t") for line in p.stdout.splitlines()]
    assert lines and all(len(f) == 11 for f in lines), p.stdout
    # region seq time route basis purpose outcome records bytes method principal
    assert {f[4] for f in lines} == {DPF}
    mine = [f for f in lines if f[5] == t["purpose"]]
    assert len(mine) == 2
    for f in mine:
        assert f[0] == "eu" and f[3] == f"eu{ARROW}us" and f[6] == "allowed"
        assert f[7:9] == ["1", str(len(PAYLOAD))]
        # The proto says the full method ("/domicile.v1.RecordsService/GetRecord"); accept the short one.
        assert f[9] in ("/domicile.v1.RecordsService/GetRecord", "GetRecord") and f[10] == "service-us"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", f[2])
        assert f[1] == "-" or int(f[1]) > 0

    # The other filters and the limit.
    p = ctl(t, "transfers", "list", "--customer", t["customer"], "--purpose", t["purpose"], "--region", "eu")
    got = sorted((f[3], f[4]) for f in (line.split("\t") for line in p.stdout.splitlines()))
    assert got == sorted([(f"eu{ARROW}us", DPF)] * 2 + [(f"eu{ARROW}in", SCC2), (f"us{ARROW}eu", US_OUT)])
    p = ctl(t, "transfers", "list", "--customer", t["customer"], "--purpose", t["purpose"], "--limit", "1")
    assert len(p.stdout.splitlines()) == 1 and "raise --limit" in p.stderr
    p = ctl(t, "transfers", "list", "--customer", t["customer"], "--outcome", "refused")
    refused = [line.split("\t") for line in p.stdout.splitlines()]
    assert len(refused) == 1 and refused[0][5] == "model-training" and refused[0][6] == "refused"
    p = ctl(t, "transfers", "list", "--customer", t["customer"], "--outcome", "allowed", "--region", "in")
    assert p.stdout == ""  # the EU customer's transfers are in the EU ledger
    # principal and direction: the reads by service-us are the eu -> us entries
    p = ctl(t, "transfers", "list", "--customer", t["customer"], "--purpose", t["purpose"],
            "--principal", "service-us", "--direction", "read")
    got = [line.split("\t") for line in p.stdout.splitlines()]
    assert len(got) == 2 and {f[3] for f in got} == {f"eu{ARROW}us"} and {f[10] for f in got} == {"service-us"}, p.stdout
    p = ctl(t, "transfers", "list", "--customer", t["customer"], "--direction", "sideways", check=False)
    assert p.returncode == 2 and "--direction: read or write" in p.stderr


def test_verify(traffic):
    t = traffic
    ch = t["gateway"].channel(token="auditor")
    verify = unary(ch, "/domicile.v1.TransfersService/VerifyLedger", transfers_pb2.VerifyLedgerRequest, transfers_pb2.VerifyLedgerResponse)
    for region in ("eu", "in", "us"):
        want = verify(transfers_pb2.VerifyLedgerRequest(region=region), timeout=60)
        p = ctl(t, "transfers", "verify", region, check=False)
        fields = dict(line.split(None, 1) for line in p.stdout.splitlines())
        assert fields["region"] == region
        assert fields["ok"] == ("yes" if want.ok else "NO")
        assert p.returncode == (0 if want.ok else 4), (p.stdout, p.stderr)
        if region == "eu":
            # Nothing in this session may damage the EU ledger before this test: it must verify.
            assert want.ok and p.returncode == 0, p.stdout
            assert fields["damage"] == "none" and fields["first_bad_seq"] == "0"
    p = ctl(t, "transfers", "verify", "zz", check=False)
    assert p.returncode == 10 + grpc.StatusCode.INVALID_ARGUMENT.value[0], p.stderr
    assert "INVALID_ARGUMENT" in p.stderr


def test_bad_arguments_and_roles(traffic, tmp_path):
    t = traffic
    for args in (
        ["transfers", "report", "--from", "2024-02-30"],
        ["transfers", "report", "--to", "2024-01-01", "--from", "2024-01-01"],
        ["transfers", "report", "--format", "pdf"],
        ["transfers", "report", "extra"],
        ["transfers", "list", "--outcome", "maybe"],
        ["transfers", "list", "--limit", "0"],
        ["transfers", "verify"],
        ["transfers", "frobnicate"],
    ):
        p = ctl(t, *args, check=False)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
    # The report is for auditors and admins only.
    svc = tmp_path / "svc.token"
    svc.write_text(demo_token(t["gateway"].config, "service-us"))
    p = ctl(t, "transfers", "report", token_file=str(svc), check=False)
    assert p.returncode == 10 + grpc.StatusCode.PERMISSION_DENIED.value[0], p.stderr
    # An unwritable --output is an error, not a silent loss.
    p = ctl(t, "transfers", "report", "--output", str(tmp_path / "no" / "such" / "dir.html"), check=False)
    assert p.returncode == 1 and "cannot write" in p.stderr
