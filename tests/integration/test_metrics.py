"""Metrics and logs (issue 9): /metrics after a known workload shows the right counts; every
log line is one JSON object with the fields the access log promises."""

import json
import socket
import urllib.request
import uuid

import grpc
import pytest

from conftest import wait_until
from domicile.v1 import customers_pb2, records_pb2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def value(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def call(ch, path, req, resp, token_md=None, timeout=10):
    return ch.unary_unary(path, request_serializer=req.SerializeToString,
                          response_deserializer=resp.FromString)(req, timeout=timeout)


def test_metrics_count_a_known_workload(gateways):
    port, eu_port = free_port(), free_port()
    # Calls are counted by the gateway called (us); transfers and eu's commits by eu's own
    # gateway, which decides and logs them (promise 10).
    g = gateways.start(overrides={"metrics_listen": f"127.0.0.1:{port}", "log_level": "debug"},
                       region_overrides={"eu": {"metrics_listen": f"127.0.0.1:{eu_port}"}},
                       name="metrics")
    ch = g.channel(token="admin")             # admin runs in us
    ch_in = g.channel(token="service-in")     # a principal in "in": reads of eu data are transfers
    cid = "m-" + uuid.uuid4().hex[:12]
    before = scrape(port)
    eu_before = scrape(eu_port)
    call(ch, "/domicile.v1.CustomersService/RegisterCustomer",
         customers_pb2.RegisterCustomerRequest(request_id="r-" + cid, customer_id=cid,
                                               residency="eu"), customers_pb2.RegisterCustomerResponse)
    for i in range(5):
        call(ch, "/domicile.v1.RecordsService/PutRecord",
             records_pb2.PutRecordRequest(request_id=f"p{i}-{cid}", customer_id=cid,
                                          record_id=f"r{i}", kind="note", payload=b"x" * 10),
             records_pb2.PutRecordResponse)
    for i in range(3):
        call(ch_in, "/domicile.v1.RecordsService/GetRecord",
             records_pb2.GetRecordRequest(customer_id=cid, record_id=f"r{i}"), records_pb2.GetRecordResponse)
    for i in range(2):
        with pytest.raises(grpc.RpcError) as ei:
            call(ch, "/domicile.v1.RecordsService/GetRecord",
                 records_pb2.GetRecordRequest(customer_id=cid, record_id="missing"),
                 records_pb2.GetRecordResponse)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    put = "/domicile.v1.RecordsService/PutRecord"
    get = "/domicile.v1.RecordsService/GetRecord"
    # A call is counted when the server has finished it, which can be just after the client
    # has its status: scrape until the ten calls are in.
    after = wait_until(lambda: scrape(port),
                       lambda a: value(a, "domicile_call_duration_seconds_count", method=get)
                       - value(before, "domicile_call_duration_seconds_count", method=get) >= 5
                       and value(a, "domicile_calls_total", method=put, status="OK")
                       - value(before, "domicile_calls_total", method=put, status="OK") >= 5,
                       timeout=10)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    eu_after = wait_until(lambda: scrape(eu_port),
                          lambda a: value(a, "domicile_transfers_total", **{"from": "eu", "to": "in",
                                                                             "basis": "scc-2021-914-m2",
                                                                             "outcome": "allowed"})
                          - value(eu_before, "domicile_transfers_total", **{"from": "eu", "to": "in",
                                                                              "basis": "scc-2021-914-m2",
                                                                              "outcome": "allowed"}) >= 3,
                          timeout=10)

    def eu_delta(name, **labels):
        return value(eu_after, name, **labels) - value(eu_before, name, **labels)

    assert delta("domicile_calls_total", method=put, status="OK") == 5
    assert delta("domicile_calls_total", method=get, status="OK") == 3
    assert delta("domicile_calls_total", method=get, status="NOT_FOUND") == 2
    assert delta("domicile_call_duration_seconds_count", method=get) == 5
    # writes us -> eu (admin in us) and reads eu -> in (service-in) are transfers, counted
    # where they are logged: eu's gateway
    assert eu_delta("domicile_transfers_total", **{"from": "us", "to": "eu",
                                                   "basis": "us-no-restriction",
                                                   "outcome": "allowed"}) == 5
    assert eu_delta("domicile_transfers_total", **{"from": "eu", "to": "in",
                                                   "basis": "scc-2021-914-m2",
                                                   "outcome": "allowed"}) == 3
    assert eu_delta("domicile_transfer_bytes_total", **{"from": "eu", "to": "in",
                                                        "basis": "scc-2021-914-m2",
                                                        "outcome": "allowed"}) == 30
    assert delta("domicile_transfers_total", **{"from": "us", "to": "eu", "basis": "us-no-restriction",
                                                "outcome": "allowed"}) == 0
    # service-in called the us gateway: each read also passed through us, a transit eu -> us
    # logged with it (test_sovereign.py)
    assert eu_delta("domicile_transfers_total", **{"from": "eu", "to": "us",
                                                   "basis": "eu-us-dpf-2023-1795",
                                                   "outcome": "allowed"}) == 3
    # Group commit counters: in eu, 5 puts + 5 ledger entries for them (written from us) +
    # 3 + 3 ledger entries for the reads (to in, through us), each a batched write; calls one
    # after another, the two entries of a read at once, so at most one batch each.
    assert eu_delta("domicile_region_batched_writes_total", region="eu") == 16
    assert 1 <= eu_delta("domicile_region_write_batches_total", region="eu") <= 16
    # Every eu call went to eu's gateway once: 5 puts, 5 gets (the customer was registered
    # through this gateway, so it is known here).
    assert delta("domicile_peer_calls_total", method=put, call=put, peer="eu") == 5
    assert delta("domicile_peer_calls_total", method=get, call=get, peer="eu") == 5
    for region in ("us", "eu", "in"):
        assert value(after, "domicile_region_up", region=region) == 1
        assert value(after, "domicile_region_breaker_open", region=region) == 0
    assert value(after, "domicile_region_pool_size", region="us") >= 1
    assert value(eu_after, "domicile_region_pool_size", region="eu") >= 1
    # Unknown paths are 404, not a crash.
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert ei.value.code == 404
    assert g.stop() == 0, g.log

    # Logs: one JSON object per line, with the access-log fields on call lines.
    calls = []
    for line in g.raw_log.splitlines():
        if not line.startswith("{"):
            continue  # gRPC core's own lines
        o = json.loads(line)
        assert {"time", "level", "component", "msg"} <= o.keys(), o
        if o["component"] == "call":
            calls.append(o)
    gets = [o for o in calls if o["method"] == get]
    assert len(gets) == 5, calls
    for o in gets:
        assert o["principal"] in ("admin", "service-in")
        assert o["region"] == "eu"
        assert o["status"] in ("OK", "NOT_FOUND")
        assert isinstance(o["duration_us"], int) and o["duration_us"] > 0
