"""Metrics and logs (issue 9): /metrics after a known workload shows the right counts; every
log line is one JSON object with the fields the access log promises."""

import json
import os
import time
import socket
import urllib.request
import uuid

import grpc
import pytest

from conftest import wait_until
from domicile.v1 import customers_pb2, records_pb2, transfers_pb2


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
                       - value(before, "domicile_calls_total", method=put, status="OK") >= 5
                       # (a call's duration and its status are two counters: wait for both)
                       and value(a, "domicile_calls_total", method=get, status="NOT_FOUND")
                       - value(before, "domicile_calls_total", method=get, status="NOT_FOUND") >= 2
                       and value(a, "domicile_calls_total", method=get, status="OK")
                       - value(before, "domicile_calls_total", method=get, status="OK") >= 3,
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


# --------------------------------------------------------------------------------------------
# What the dashboard and the alerts (deploy/monitoring/) read: replication, peer gateways'
# health, ledger sealing and verification, legs by time to due, webhooks.


def series(text, name):
    """{frozenset(labels.items()): value} of every sample of `name`."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, v = line.rpartition(" ")
        n, _, rest = head.partition("{")
        if n != name:
            continue
        labels = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv) if rest else {}
        out[frozenset((k, v2.strip('"')) for k, v2 in labels.items())] = float(v)
    return out


def labelled(text, name, **labels):
    """The value of the sample of `name` with exactly these labels, or None when absent."""
    return series(text, name).get(frozenset(labels.items()))


@pytest.fixture(scope="module")
def monitored(regions, tmp_path_factory):
    """A federation whose us gateway serves /metrics and sends webhooks to a receiver that
    fails until told otherwise."""
    from conftest import GatewayFactory
    from test_webhook import Receiver, secret_file

    receiver = Receiver(fail_first=10**9)
    secret, _ = secret_file()
    factory = GatewayFactory(regions, str(tmp_path_factory.mktemp("monitored")))
    port = free_port()
    started = time.time()
    g = factory.start(overrides={"metrics_listen": f"127.0.0.1:{port}",
                                 "webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
                                 "webhook_secret_file": secret}, name="monitored")
    g.metrics_port = port
    g.receiver = receiver
    g.started_at = started
    try:
        yield g
    finally:
        factory.close()
        receiver.close()
        os.unlink(secret)


def test_replication_and_peer_gateways(monitored):
    """The own region's synchronous standby (deploy/local: one per region, sync_state 'sync')
    as pg_stat_replication shows it; each peer gateway's health; nothing read from another
    region's database is exported by this gateway."""
    text = wait_until(lambda: scrape(monitored.metrics_port),
                      lambda t: labelled(t, "domicile_region_sync_standbys", region="us") is not None
                      and all(v == 1 for v in series(t, "domicile_peer_gateway_up").values())
                      and len(series(t, "domicile_peer_gateway_up")) == 2, timeout=20)
    assert labelled(text, "domicile_region_sync_standbys", region="us") == 1, text
    assert labelled(text, "domicile_region_standbys", region="us") == 1
    assert labelled(text, "domicile_region_replication_lag_bytes", region="us") >= 0
    peers = series(text, "domicile_peer_gateway_up")
    assert {dict(k)["peer"] for k in peers} == {"eu", "in"}, peers
    assert all(v == 1 for v in peers.values()), peers
    for other in ("eu", "in"):
        for name in ("domicile_region_sync_standbys", "domicile_ledger_sealed_total",
                     "domicile_dsr_overdue_requests", "domicile_dsr_legs"):
            assert not [k for k in series(text, name) if dict(k).get("region") == other], (name, other)
    # the sealer has caught up since this gateway started: the seal lag's reference time
    sealed_at = labelled(text, "domicile_ledger_sealed_up_to_timestamp_seconds", region="us")
    assert sealed_at is not None and sealed_at >= monitored.started_at, sealed_at


def verify_ledger(g, region):
    return call(g.channel(token="auditor"), "/domicile.v1.TransfersService/VerifyLedger",
                transfers_pb2.VerifyLedgerRequest(region=region), transfers_pb2.VerifyLedgerResponse,
                timeout=60)


def test_ledger_verification_result(regions, monitored):
    """No verification since start: no result exported. A verification that finds a forged
    entry exports 0, the next one after its removal 1, each with its time and entries."""
    port = monitored.metrics_port
    assert labelled(scrape(port), "domicile_ledger_verify_ok", region="us") is None
    forged = regions.psql("us", (
        "INSERT INTO domicile.ledger (entry_uuid, at, request_id, principal, method, customer_id, "
        "record_count, bytes, from_region, to_region, direction, purpose, basis_id, outcome, entry_mac) "
        f"VALUES ('\\x{os.urandom(16).hex()}', now(), 'forged-{uuid.uuid4().hex[:8]}', 'service-us', "
        "'GetRecord', 'metrics-forged', 1, 10, 'us', 'eu', 'read', 'support', 'scc-2021-914-m2', "
        f"'allowed', '\\x{os.urandom(32).hex()}') RETURNING entry_id")).splitlines()[0]
    try:
        v = verify_ledger(monitored, "us")
        assert not v.ok, v
        text = scrape(port)
        assert labelled(text, "domicile_ledger_verify_ok", region="us") == 0, text
        failed_at = labelled(text, "domicile_ledger_verify_timestamp_seconds", region="us")
        assert failed_at >= v.verified_at_unix_ms / 1000 - 1
    finally:
        regions.psql("us", f"DELETE FROM domicile.ledger WHERE entry_id = {forged}")
    v = wait_until(lambda: verify_ledger(monitored, "us"), lambda v: v.ok and v.unsealed_entries == 0)
    assert v.ok, v
    text = scrape(port)
    assert labelled(text, "domicile_ledger_verify_ok", region="us") == 1, text
    assert labelled(text, "domicile_ledger_verify_timestamp_seconds", region="us") >= failed_at
    assert labelled(text, "domicile_ledger_verified_entries", region="us") == v.entries_checked
    # another region's ledger is verified by its own gateways: exported there, not here
    assert verify_ledger(monitored, "eu").ok
    assert labelled(scrape(port), "domicile_ledger_verify_ok", region="eu") is None


def open_legs(text):
    return {dict(k)["due"]: v for k, v in series(text, "domicile_dsr_open_legs").items()
            if dict(k)["region"] == "us"}


def test_open_legs_by_time_to_due(regions, monitored):
    """Two legs left open in us (failed, next attempt tomorrow), one due in 3 days and one
    2 days overdue: counted in their buckets, and the earliest due date is exported."""
    port = monitored.metrics_port
    before = open_legs(scrape(port))
    ids = [f"metrics-due-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    rows = ", ".join(
        f"('{rid}', 'erase', '\\x00', '\\x{os.urandom(32).hex()}', 'metrics-test', "
        f"now() - interval '1 day', now() + interval '{days} days', now() + interval '{days} days')"
        for rid, days in zip(ids, (3, -2)))
    due_s = float(regions.psql("us", (
        "INSERT INTO domicile.dsr_requests (request_id, kind, fingerprint, subject_key, principal, "
        f"received_at, due_at, gdpr_due_at) VALUES {rows}; "
        "INSERT INTO domicile.dsr_legs (request_id, state, attempts, last_error, next_attempt_at) "
        "SELECT request_id, 'failed', 1, 'metrics test', now() + interval '1 day' FROM "
        f"domicile.dsr_requests WHERE request_id IN ('{ids[0]}', '{ids[1]}'); "
        f"SELECT extract(epoch FROM due_at) FROM domicile.dsr_requests WHERE request_id = '{ids[1]}'"
    )).splitlines()[-1])
    try:
        text = wait_until(lambda: scrape(port),
                          lambda t: open_legs(t).get("5d", 0) - before.get("5d", 0) == 1
                          and open_legs(t).get("overdue", 0) - before.get("overdue", 0) == 1, timeout=30)
        after = open_legs(text)
        assert after["5d"] - before["5d"] == 1 and after["overdue"] - before["overdue"] == 1, (before, after)
        assert {k: after[k] - before[k] for k in ("1d", "10d", "30d", "later")} == dict.fromkeys(("1d", "10d", "30d", "later"), 0)
        assert labelled(text, "domicile_dsr_overdue_requests", region="us") == after["overdue"]
        assert labelled(text, "domicile_dsr_legs", region="us", state="failed") >= 2
        # the earliest due date of an open leg: ours, unless an older one is open
        assert labelled(text, "domicile_dsr_next_due_timestamp_seconds", region="us") <= due_s + 0.001
    finally:
        regions.psql("us", f"DELETE FROM domicile.dsr_legs WHERE request_id IN ('{ids[0]}', '{ids[1]}'); "
                           f"DELETE FROM domicile.dsr_requests WHERE request_id IN ('{ids[0]}', '{ids[1]}')")
    text = wait_until(lambda: scrape(port), lambda t: open_legs(t) == before, timeout=30)
    assert open_legs(text) == before


def test_webhook_failing_then_delivered(monitored):
    """A receiver answering 500: the failures are counted and the failing receiver's first
    failure is exported; once it answers 200, the delivery is counted and nothing fails."""
    from test_webhook import erase_for

    port = monitored.metrics_port
    text = scrape(port)
    assert value(text, "domicile_webhook_failing_receivers") == 0
    assert value(text, "domicile_webhook_failing_since_timestamp_seconds") == 0
    delivered = value(text, "domicile_webhook_deliveries_total", outcome="delivered")
    started = time.time()
    erase_for(monitored, "whm-" + uuid.uuid4().hex[:10], "eu", scoped=False)
    text = wait_until(lambda: scrape(port),
                      lambda t: value(t, "domicile_webhook_failing_receivers") == 1, timeout=60)
    assert value(text, "domicile_webhook_failing_receivers") == 1, monitored.log
    assert value(text, "domicile_webhook_deliveries_total", outcome="failed") >= 1
    assert value(text, "domicile_webhook_failing_since_timestamp_seconds") >= started - 1
    monitored.receiver.fail_first = 0
    text = wait_until(lambda: scrape(port),
                      lambda t: value(t, "domicile_webhook_failing_receivers") == 0, timeout=60)
    assert value(text, "domicile_webhook_failing_receivers") == 0, monitored.log
    assert value(text, "domicile_webhook_failing_since_timestamp_seconds") == 0
    # At least once: an attempt that timed out while the receiver was slow (the sanitizer
    # build) is sent again, and both may be answered 200.
    assert value(text, "domicile_webhook_deliveries_total", outcome="delivered") >= delivered + 1
