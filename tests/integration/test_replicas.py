"""
Issue 15, promise 6 (replicas): a region may have several gateways; a gateway keeps a list of each
peer region's gateways, health-checks them, and tries another one only when the call is safe to
repeat (reads, writes carrying a request_id, internal Exec) and only when no gateway answered the
attempt (src/peer/client.c, src/peer/README.md "Failures and retries").

- Kill one of eu's two gateways under load (reads and writes with request ids, through the us
  gateway): only calls in flight at the kill may fail, none after; every acknowledged write is in
  eu's database exactly once.
- A write without a request_id never leaves the gateway it reached: every public write requires
  one, so every forwarded write is safe to repeat (there is no forwarded write to refuse a retry).
- An attempt a gateway answered is never tried on the other gateway, even for a call safe to
  repeat; an attempt no gateway answered is (a fake eu gateway answers with or without the
  trailer every real answer carries).
"""

import collections
import concurrent.futures
import os
import random
import re
import threading
import time
import urllib.request

import grpc

from conftest import SERVING, _config_string, wait_health, wait_until
from domicile.v1 import records_pb2
from grpc.health.v1 import health_pb2
from helpers import Api, get, lit, put, register, rpc_error, rows, uid

# The us gateway health-checks its peers once a minute in the kill test: what it learns of the dead
# gateway it should learn from its own attempts, the worst case for the retry rule. (While
# src/peer/client.c's health thread is woken by every peer call that ends, it checks far more
# often than that.)
SLOW_HEALTH = {"us": {"peer_health_interval_ms": 60000}}
PUT = "/domicile.v1.RecordsService/PutRecord"
RETRIED = "did not answer; trying the next one"


def _metrics_port(g):
    m = wait_until(lambda: re.search(r"serving /metrics on [0-9.]+:(\d+)", g.raw_log), lambda m: m, timeout=10)
    assert m, g.log
    return int(m.group(1))


def _peer_puts(port, peer="eu"):
    """domicile_peer_calls_total of PutRecord calls made to `peer` (every attempt counts)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    n = 0
    for m in re.finditer(r'domicile_peer_calls_total\{method="([^"]+)",call="([^"]+)",peer="([^"]+)"\} (\d+)', text):
        if m.group(1) == PUT and m.group(2) == PUT and m.group(3) == peer:
            n += int(m.group(4))
    return n


def _stored(regions, cid):
    """{record_id: version} of the customer's records in eu, and its PutRecord request ids."""
    recs = {r[0]: int(r[1]) for r in rows(regions, "eu", f"select record_id, version from domicile.records"
                                                        f" where customer_id = {lit(cid)}")}
    rids = [r[0] for r in rows(regions, "eu", f"select request_id from domicile.idempotency"
                                              f" where customer_id = {lit(cid)} and method like '%PutRecord'")]
    return recs, rids


class Load:
    """`n` threads calling the us gateway: a PutRecord with a fresh request_id, then a GetRecord of
    an acknowledged record, over and over. Every call is recorded as (started, ended, kind, code)
    on time.monotonic(); a write that fails is kept for a retry with the same request_id."""

    def __init__(self, gateway, cid, n=6):
        self.gateway, self.cid, self.n = gateway, cid, n
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls = []  # (started, ended, kind, code name or "OK", details)
        self.acked = {}  # record_id -> request_id
        self.pending = {}  # record_id -> request_id
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i):
        api = Api(self.gateway.channel())
        rng = random.Random(i)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            rid, req = f"w{i}-{seq}", f"load-{uid()}"
            self._call(api, "put", rid, req)
            with self.lock:
                known = list(self.acked)
            if known:
                self._call(api, "get", rng.choice(known), None)

    def _call(self, api, kind, rid, req):
        t0 = time.monotonic()
        try:
            if kind == "put":
                put(api, self.cid, rid, payload=rid.encode(), request_id=req, timeout=10)
            else:
                assert get(api, self.cid, rid, timeout=10).payload == rid.encode()
            code, details = "OK", ""
        except grpc.RpcError as e:
            code, details = e.code().name, e.details()
        t1 = time.monotonic()
        with self.lock:
            self.calls.append((t0, t1, kind, code, details))
            if kind == "put":
                (self.acked if code == "OK" else self.pending)[rid] = req

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        # Writes never acknowledged: retried with their request_id (they may have committed).
        api = Api(self.gateway.channel())
        for rid, req in list(self.pending.items()):
            put(api, self.cid, rid, payload=rid.encode(), request_id=req, timeout=15)
            self.acked[rid] = req
            del self.pending[rid]


def test_one_of_two_eu_gateways_killed_under_load(gateways, regions):
    g = gateways.start(name="replicas-kill", replicas={"eu": 2}, region_overrides=SLOW_HEALTH)
    eu1, eu2 = g.federation.replicas["eu"]
    api = Api(g.channel())
    cid = register(api, "eu", prefix="replicas")
    load = Load(g, cid)
    load.start()
    # Load on both eu gateways (the us gateway takes them in turn), then the kill.
    assert wait_until(lambda: len(load.acked), lambda n: n >= 40, timeout=60) >= 40, load.calls[-5:]
    t_kill0 = time.monotonic()
    eu2.kill()  # SIGKILL, reaped
    t_kill1 = time.monotonic()
    wait_until(lambda: sum(1 for c in list(load.calls) if c[0] >= t_kill1), lambda n: n >= 100, timeout=60)
    load.finish()
    assert eu2.returncode == -9

    calls = list(load.calls)
    failed = [c for c in calls if c[3] != "OK"]
    in_flight = [c for c in calls if c[0] < t_kill1 and c[1] >= t_kill0]
    after = [c for c in calls if c[0] >= t_kill1]
    summary = (f"{len(calls)} calls, {len(in_flight)} in flight at the kill, {len(after)} after it; "
               f"failed: {[(round((c[0] - t_kill0) * 1000, 1), c[2], c[3], c[4]) for c in failed]}")
    print(summary)
    # Only calls in flight at the kill may fail; nothing after it.
    assert all(c[0] < t_kill1 and c[1] >= t_kill0 for c in failed), summary
    assert after and all(c[3] == "OK" for c in after), summary
    # Calls the us gateway had sent to the dead one (in flight, or before it knew) went to the
    # survivor (how many depends on timing; test_only_attempts_no_gateway_answered_are_retried
    # holds the rule itself).
    print(f"us gateway: {g.raw_log.count(RETRIED)} attempts tried again on eu's other gateway")
    assert eu1.alive()
    wait_health(g.channel(token=None), "domicile.region.eu", SERVING, timeout=30)

    # Every acknowledged write is in eu's database exactly once: one record at version 1, one
    # request id; nothing that was not acknowledged.
    recs, rids = _stored(regions, cid)
    assert set(recs) == set(load.acked), (len(recs), len(load.acked))
    assert all(v == 1 for v in recs.values()), {k: v for k, v in recs.items() if v != 1}
    assert sorted(rids) == sorted(load.acked.values())


def test_a_write_without_request_id_is_refused_before_it_is_forwarded(gateways):
    """Every public write requires a request_id, checked by the gateway the client called: a
    write without one is refused there and never reaches another region, so every forwarded write
    is safe to repeat (dm_peer_forward retries a unary call with an empty request_id never)."""
    g = gateways.start(name="replicas-noid", replicas={"eu": 2}, overrides={"metrics_listen": "127.0.0.1:0"})
    port = _metrics_port(g)
    api = Api(g.channel())
    cid = register(api, "eu", prefix="noid")
    put(api, cid, "with-id", payload=b"x")
    before = _peer_puts(port)
    e = rpc_error(api.put, records_pb2.PutRecordRequest(customer_id=cid, record_id="no-id", kind="note",
                                                        payload=b"x"), timeout=15)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.details(), e.details()
    assert _peer_puts(port) == before, "a write without a request_id was forwarded"
    e = rpc_error(get, api, cid, "no-id")
    assert e.code() == grpc.StatusCode.NOT_FOUND


class FakePeer:
    """A gateway of eu as far as its peers can tell: on eu's gateway 2's peer port, mutual TLS with
    eu's gateway certificate (eu.gateway.domicile, the federation CA), health SERVING. Every other
    call it answers UNAVAILABLE, with the x-domicile-region trailer that every answer of a real
    gateway carries (answered = True), or without it, as a call no gateway answered looks
    (answered = False). It counts the calls by method."""

    def __init__(self, regions, port):
        self.answered = True
        self.calls = collections.Counter()
        self.health = 0
        state = regions.state
        with open(os.path.join(state, "gw", "eu", "secrets", "peer.key"), "rb") as f:
            key = f.read()
        with open(os.path.join(state, "gw", "eu", "etc", "peer.crt"), "rb") as f:
            cert = f.read()
        with open(os.path.join(state, "ca", "federation", "ca.crt"), "rb") as f:
            ca = f.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16), handlers=[self._Handler(self)])
        self.started = time.monotonic()
        assert self.server.add_secure_port(f"127.0.0.1:{port}", creds) == port, f"port {port} is taken"
        self.server.start()

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, fake):
            self.fake = fake

        def service(self, details):
            fake, method = self.fake, details.method
            if method == "/grpc.health.v1.Health/Check":
                def check(request, context):
                    fake.health += 1
                    return health_pb2.HealthCheckResponse(status=SERVING).SerializeToString()
                return grpc.unary_unary_rpc_method_handler(check)

            def refuse(request, context):
                fake.calls[method] += 1
                if fake.answered:
                    context.set_trailing_metadata((("x-domicile-region", "eu"),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake eu gateway: unavailable")
            return grpc.unary_unary_rpc_method_handler(refuse)

    def stop(self):
        self.server.stop(grace=None)


def test_only_attempts_no_gateway_answered_are_retried(gateways, regions):
    """eu's gateway 2 is replaced by FakePeer. Through the us gateway (which takes eu's serving
    gateways in turn), PutRecords with request ids and GetRecords (both safe to repeat):
    - the fake answers (x-domicile-region trailer): the call fails with its answer and is not tried
      on eu's other gateway: one attempt per call; nothing of it written;
    - the fake fails without the trailer (as when no gateway answered): the call is tried on eu's
      other gateway and succeeds; more attempts than calls.
    The client's own retry of an answered write, same request_id, writes it once."""
    g = gateways.start(name="replicas-answer", replicas={"eu": 2}, overrides={"metrics_listen": "127.0.0.1:0"})
    eu1, eu2 = g.federation.replicas["eu"]
    port = _metrics_port(g)
    api = Api(g.channel())
    cid = register(api, "eu", prefix="answered")
    put(api, cid, "warm", payload=b"w")
    peer_port = int(eu2.peer_address.rsplit(":", 1)[1])
    eu2.stop()
    fake = FakePeer(regions, peer_port)
    try:
        # The us (and in) gateways health-check the fake and take it in turn with eu's gateway 1.
        assert wait_until(lambda: fake.health, lambda n: n >= 10, timeout=30) >= 10

        def puts(prefix, need, method=PUT, most=40):
            """PutRecords until `need` of them reached the fake (or `most` calls)."""
            out, start = {}, fake.calls[method]
            for i in range(most):
                rid, req = f"{prefix}{i}", f"{prefix}-{uid()}"
                try:
                    put(api, cid, rid, payload=rid.encode(), request_id=req, timeout=15)
                    out[rid] = (req, "OK", "")
                except grpc.RpcError as e:
                    out[rid] = (req, e.code().name, e.details())
                if fake.calls[method] - start >= need:
                    break
            return out

        # 1. Answered: never tried again, though safe to repeat.
        log_at = len(g.raw_log)
        before = _peer_puts(port)
        answered = puts("a", 2)
        n = len(answered)
        attempts = _peer_puts(port) - before
        failed = {rid: o for rid, o in answered.items() if o[1] != "OK"}
        print(f"answered: {n} PutRecords, {attempts} attempts, {fake.calls[PUT]} at the fake; failed {failed}")
        assert attempts == n, (attempts, answered)
        assert len(failed) == fake.calls[PUT] >= 2, (fake.calls, answered)
        for req, code, details in failed.values():
            assert code == "UNAVAILABLE" and details == "fake eu gateway: unavailable", details
        assert RETRIED not in g.raw_log[log_at:]
        reads = collections.Counter()
        for _ in range(40):
            if reads["failed"] >= 2:
                break
            try:
                get(api, cid, "warm")
                reads["OK"] += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == "fake eu gateway: unavailable", e
                reads["failed"] += 1
        assert reads["failed"] == fake.calls["/domicile.v1.RecordsService/GetRecord"] > 0, (reads, fake.calls)
        assert RETRIED not in g.raw_log[log_at:]
        recs, _ = _stored(regions, cid)
        assert set(recs) == {"warm"} | (set(answered) - set(failed)), recs
        # The client's own retry (same request ids): each written once, nothing to replay.
        for rid, (req, _, _) in failed.items():
            for _ in range(20):
                try:
                    rep = put(api, cid, rid, payload=rid.encode(), request_id=req, timeout=15)
                    break
                except grpc.RpcError as e:
                    assert e.details() == "fake eu gateway: unavailable", e
            else:
                raise AssertionError(f"{rid}: never acknowledged")
            assert not rep.replayed, rep

        # 2. Not answered: tried on eu's gateway 1, and succeeds.
        fake.answered = False
        at_fake = fake.calls[PUT]
        log_at = len(g.raw_log)
        before = _peer_puts(port)
        # (An attempt without an answer marks that gateway down until its next health check:
        # one such attempt is enough.)
        unanswered = puts("u", 1)
        attempts = _peer_puts(port) - before
        to_fake = fake.calls[PUT] - at_fake
        print(f"not answered: {len(unanswered)} PutRecords, {attempts} attempts, {to_fake} at the fake")
        print(f"the fake: {fake.health} health checks in {time.monotonic() - fake.started:.1f} s")
        assert all(o[1] == "OK" for o in unanswered.values()), unanswered
        assert to_fake > 0 and attempts == len(unanswered) + to_fake, (attempts, to_fake)
        assert RETRIED in g.raw_log[log_at:], g.log

        # Every acknowledged write in eu exactly once.
        recs, rids = _stored(regions, cid)
        want = {"warm"} | set(answered) | set(unanswered)
        assert set(recs) == want and all(v == 1 for v in recs.values()), recs
        assert len(rids) == len(set(rids)) == len(want)
    finally:
        fake.stop()


def test_domicile_local_writes_a_region_with_two_gateways(regions):
    """`domicile-local up --replicas eu=2` on the session's state (files only: the session's
    gateways run on the state's peer ports, so this test starts none): eu's gateway 2 gets its own
    configuration in eu's directory, with its own public and peer ports; every other region's file
    lists both eu gateways; `gateways status` shows it. `up --replicas eu=1` undoes it."""
    state, base = regions.state, regions.port_base
    eu_dir = os.path.join(state, "gw", "eu", "etc")
    conf2 = os.path.join(eu_dir, "domiciled-2.conf")

    def listed(code):
        text = open(os.path.join(state, "gw", code, "etc", "regions", "eu.conf")).read()
        return re.findall(r'"([^"]+)"', re.search(r"^gateways = \[(.*)\];", text, re.M).group(1))

    try:
        regions.run("up", "--replicas", "eu=2", timeout=300)
        assert _config_string(conf2, "gateway_region") == "eu"
        # README Ports: gateway 2 of region i, peer port base + 50 + i; public port the first
        # gateway's + 3.
        assert _config_string(conf2, "peer_listen") == f"127.0.0.1:{base + 51}"
        eu1_port = int(_config_string(regions.gateway_conf("eu"), "listen").rsplit(":", 1)[1])
        assert _config_string(conf2, "listen").endswith(f":{eu1_port + 3}")
        for key in ("regions_dir", "peer_cert_file", "peer_key_file", "subject_pepper_file"):
            assert _config_string(conf2, key) == _config_string(regions.gateway_conf("eu"), key), key
        for code in ("us", "in"):
            assert listed(code) == [f"127.0.0.1:{regions.peer_port('eu')}", f"127.0.0.1:{base + 51}"], code
        with open(os.path.join(state, "gw", "replicas.env")) as f:
            assert "REPLICAS_eu=2" in f.read().split()
        out = regions.run("gateways", "status").stdout
        line = next(l for l in out.splitlines() if l.startswith("eu-2 "))
        assert f"127.0.0.1:{base + 51}" in line and " - " in line, line  # not running
        us_line = next(l for l in out.splitlines() if l.startswith("us "))
        assert f"eu=127.0.0.1:{regions.peer_port('eu')},127.0.0.1:{base + 51}" in us_line, us_line
        p = regions.run("kill-gateway", "eu", "2", check=False)
        assert p.returncode != 0 and "gateway eu-2 is not running" in p.stderr, p.stderr
        p = regions.run("up", "--replicas", "eu=5", check=False)
        assert p.returncode != 0 and "1 to 4 gateways per region" in p.stderr, p.stderr
    finally:
        regions.run("up", "--replicas", "eu=1", timeout=300)
    assert not os.path.exists(conf2)
    for code in ("us", "in"):
        assert listed(code) == [f"127.0.0.1:{regions.peer_port('eu')}"], code
