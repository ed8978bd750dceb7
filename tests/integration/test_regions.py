"""
domicile.v1.RegionsService: ListRegions, Fence and Unfence (regions.proto), and `domicilectl regions`.

A fence stops every call to one region on every gateway; it is a row in every region's
domicile.fences table (005_regions.sql), versioned (007_fence_versions.sql) so that a lift
stays a lift when a region that missed it comes back, and a fence reaches a region that was
down when it was set. Tests that fence a region lift the fence before they end, whatever
happens: the session gateway and the regions are shared with every other test.
"""

import os
import subprocess

import grpc
import pytest

from conftest import BUILD_DIR, NOT_SERVING, SERVING, demo_token, wait_health, wait_until
from helpers import Api, get, lit, now_ms, put, register, rpc_error, rows, uid, unary_stub
from domicile.v1 import records_pb2, regions_pb2

SC = grpc.StatusCode
CODES = ["eu", "in", "us"]
DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")


class Ops:
    """RegionsService on a channel; fence and unfence return the RegionStatus of their response."""

    def __init__(self, channel):
        self.list = unary_stub(channel, "RegionsService", "ListRegions", regions_pb2.ListRegionsRequest, regions_pb2.ListRegionsResponse)
        self._fence = unary_stub(channel, "RegionsService", "Fence", regions_pb2.FenceRequest, regions_pb2.FenceResponse)
        self._unfence = unary_stub(channel, "RegionsService", "Unfence", regions_pb2.UnfenceRequest, regions_pb2.UnfenceResponse)

    def fence(self, region, reason, **kw):
        kw.setdefault("request_id", f"fence-{uid()}")
        rep = self._fence(regions_pb2.FenceRequest(region=region, reason=reason, **kw), timeout=15)
        assert rep.HasField("region"), rep
        return rep.region

    def unfence(self, region, reason="", **kw):
        kw.setdefault("request_id", f"unfence-{uid()}")
        rep = self._unfence(regions_pb2.UnfenceRequest(region=region, reason=reason, **kw), timeout=15)
        assert rep.HasField("region"), rep
        return rep.region

    def status(self, region):
        return {s.code: s for s in self.list(regions_pb2.ListRegionsRequest(), timeout=15).regions}[region]


@pytest.fixture
def ops(gateway):
    return Ops(gateway.channel(token="operator"))


@pytest.fixture
def admin(gateway):
    return Api(gateway.channel(token="admin"))


def fence_rows(regions, about):
    """What each region's fences table holds about region `about`: {region: (lifted, reason,
    fenced_by)} or None."""
    out = {}
    for r in CODES:
        got = rows(regions, r, f"SELECT lifted, reason, fenced_by FROM domicile.fences WHERE region = {lit(about)}")
        out[r] = (got[0][0] == "t", got[0][1], got[0][2]) if got else None
    return out


def lifted_everywhere(regions, about):
    return all(v is None or v[0] for v in fence_rows(regions, about).values())


@pytest.fixture
def lift(ops, regions):
    """Lifts every fence a test set (also when it failed), and checks the lift took."""
    fenced = []
    yield fenced
    for region in fenced:
        wait_until(lambda: _try_unfence(ops, region), lambda ok: ok, timeout=60)
        wait_until(lambda: lifted_everywhere(regions, region), bool, timeout=30)


def _try_unfence(ops, region):
    try:
        return not ops.unfence(region, "test cleanup").fenced
    except grpc.RpcError:
        return False


def test_list_regions_shows_every_region(ops, regions, gateway):
    got = ops.list(regions_pb2.ListRegionsRequest(), timeout=15).regions
    assert [s.code for s in got] == CODES
    layout = {e["region"]: e for e in regions.status_json() if e["role"] == "primary" and e["running"]}
    for s in got:
        assert s.reachable and s.breaker == regions_pb2.BREAKER_STATE_CLOSED, s
        assert s.primary_host == f"127.0.0.1:{layout[s.code]['port']}", (s.primary_host, layout[s.code])
        assert s.replication_state == "sync", s
        assert s.pool_size >= 1 and 0 <= s.pool_in_use <= s.pool_size, s
        assert not s.fenced and s.fence_reason == "" and s.fenced_at_unix_ms == 0, s
        assert s.name and s.jurisdiction, s
    # roles: operator and admin only
    svc = Ops(gateway.channel(token="service-eu"))
    for call in (lambda: svc.list(regions_pb2.ListRegionsRequest(), timeout=15), lambda: svc.fence("eu", "no"), lambda: svc.unfence("eu")):
        assert rpc_error(call).code() == SC.PERMISSION_DENIED
    assert lifted_everywhere(regions, "eu")


def test_fence_stops_one_region_on_every_gateway_and_unfence_resumes(ops, admin, regions, gateways, lift):
    eu_cid, us_cid = register(admin, "eu", prefix="fence"), register(admin, "us", prefix="fence")
    put(admin, eu_cid, "before", b"x")
    t0 = now_ms()
    lift.append("eu")
    st = ops.fence("eu", "drill: eu maintenance")
    assert (st.code, st.fenced, st.fence_reason, st.fenced_by) == ("eu", True, "drill: eu maintenance", "operator"), st
    assert t0 <= st.fenced_at_unix_ms <= now_ms(), st
    # stored in every region, as a fence
    assert fence_rows(regions, "eu") == {r: (False, "drill: eu maintenance", "operator") for r in CODES}

    # eu's calls fail at once naming the reason, and write nothing; us serves
    e = rpc_error(put, admin, eu_cid, "during", b"y")
    assert e.code() == SC.UNAVAILABLE and "fenced: drill: eu maintenance" in e.details(), e.details()
    assert rpc_error(get, admin, eu_cid, "before").code() == SC.UNAVAILABLE
    assert rows(regions, "eu", f"SELECT 1 FROM domicile.records WHERE customer_id = {lit(eu_cid)} AND record_id = 'during'") == []
    put(admin, us_cid, "during", b"z")
    assert get(admin, us_cid, "during").payload == b"z"

    # a gateway started now finds the fence in the regions' tables
    gw2 = gateways.start(name="fence-second")
    ops2, admin2 = Ops(gw2.channel(token="operator")), Api(gw2.channel(token="admin"))
    wait_until(lambda: ops2.status("eu").fenced, bool, timeout=15)
    assert rpc_error(get, admin2, eu_cid, "before").code() == SC.UNAVAILABLE

    # fencing again keeps the first reason
    again = ops.fence("eu", "another reason")
    assert (again.fenced, again.fence_reason, again.fenced_at_unix_ms) == (True, "drill: eu maintenance", st.fenced_at_unix_ms)

    # lifted: here at once, on the other gateway within seconds; the rows say lifted
    un = ops.unfence("eu", "drill over")
    assert (un.fenced, un.fence_reason, un.fenced_by, un.fenced_at_unix_ms) == (False, "", "", 0), un
    assert get(admin, eu_cid, "before").payload == b"x"
    wait_until(lambda: not ops2.status("eu").fenced, bool, timeout=15)
    assert get(admin2, eu_cid, "before").payload == b"x"
    assert fence_rows(regions, "eu") == {r: (True, "drill over", "operator") for r in CODES}
    # unfencing an unfenced region returns its status
    assert not ops.unfence("eu").fenced


def test_a_lift_survives_a_region_that_missed_it(ops, admin, regions, gateway, lift):
    """Unfence while `in` is down: eu stays unfenced when `in` returns with its old fence row,
    and that row is brought up to date. Then the converse: a fence set while `in` is down
    reaches `in` when it returns."""
    cid = register(admin, "eu", prefix="fence")
    health = gateway.channel()
    lift.append("eu")
    ops.fence("eu", "before the outage")
    regions.stop("in")
    try:
        wait_health(health, "domicile.region.in", NOT_SERVING, timeout=30)
        un = ops.unfence("eu", "lifted during the outage")
        assert not un.fenced, un
        put(admin, cid, "a", b"1")
        regions.start("in")
        wait_health(health, "domicile.region.in", SERVING, timeout=60)
        # in's row is rewritten as lifted by the gateway's maintenance task
        wait_until(lambda: fence_rows(regions, "eu")["in"], lambda v: v and v[0], timeout=30)
        assert fence_rows(regions, "eu") == {r: (True, "lifted during the outage", "operator") for r in CODES}
        # still lifted after the gateway has read in's table again
        wait_until(lambda: ops.status("eu"), lambda s: s.reachable, timeout=15)
        assert not ops.status("eu").fenced
        assert get(admin, cid, "a").payload == b"1"

        # a fence set while in is down reaches in when it returns
        regions.stop("in")
        wait_health(health, "domicile.region.in", NOT_SERVING, timeout=30)
        assert ops.fence("eu", "set during the outage").fenced
        regions.start("in")
        wait_health(health, "domicile.region.in", SERVING, timeout=60)
        wait_until(lambda: fence_rows(regions, "eu")["in"], lambda v: v and not v[0], timeout=30)
        assert fence_rows(regions, "eu")["in"] == (False, "set during the outage", "operator")
        assert ops.status("eu").fenced
    finally:
        regions.start("in")
    assert not ops.unfence("eu", "done").fenced
    wait_until(lambda: lifted_everywhere(regions, "eu"), bool, timeout=30)


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda o: o.fence("", "why"), "region"),
        (lambda o: o.fence("mars", "why"), "region"),
        (lambda o: o.fence("EU", "why"), "region"),
        (lambda o: o.fence("eu", ""), "reason"),
        (lambda o: o.fence("eu", "r" * 1025), "reason"),
        (lambda o: o.fence("eu", "line\nbreak"), "reason"),
        (lambda o: o.fence("eu", "why", request_id=""), "request_id"),
        (lambda o: o.fence("eu", "why", request_id="x" * 129), "request_id"),
        (lambda o: o.unfence("mars"), "region"),
        (lambda o: o.unfence("eu", "r" * 1025), "reason"),
        (lambda o: o.unfence("eu", request_id=""), "request_id"),
    ],
    ids=["empty-region", "unknown-region", "upper-case-region", "empty-reason", "reason-1025", "reason-control", "empty-request-id", "request-id-129", "unfence-unknown", "unfence-reason-1025", "unfence-empty-request-id"],
)
def test_bad_fence_requests_change_nothing(ops, regions, call, field):
    before = {r: rows(regions, r, "SELECT region, lifted, version FROM domicile.fences ORDER BY region") for r in CODES}
    e = rpc_error(call, ops)
    assert e.code() == SC.INVALID_ARGUMENT and field in e.details(), (e.code(), e.details())
    assert {r: rows(regions, r, "SELECT region, lifted, version FROM domicile.fences ORDER BY region") for r in CODES} == before
    assert not ops.status("eu").fenced


def test_domicilectl_regions(gateway, regions, lift):
    def ctl(*args):
        env = dict(os.environ, DOMICILE_TOKEN=demo_token(gateway.config, "operator"))
        # -o tsv: the table's cells, tab-separated (docs/cli.md)
        return subprocess.run([DOMICILECTL, "--addr", gateway.address, "-o", "tsv", "regions", *args], capture_output=True, text=True, timeout=30, env=env)

    out = ctl("list")
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.splitlines()]
    assert [f[0] for f in lines] == CODES and all(f[1] == "reachable" and f[-1] == "-" for f in lines), out.stdout
    lift.append("in")
    out = ctl("fence", "in", "cli drill")
    assert out.returncode == 0 and out.stdout.startswith("in\treachable\t"), (out.stdout, out.stderr)
    assert "\tfenced:cli drill by:operator at:" in out.stdout, out.stdout
    out = ctl("unfence", "in", "cli drill over")
    assert out.returncode == 0 and out.stdout.rstrip("\n").endswith("\t-"), (out.stdout, out.stderr)
    out = ctl("fence", "mars", "x")
    assert out.returncode == 10 + SC.INVALID_ARGUMENT.value[0] and "region" in out.stderr, (out.returncode, out.stderr)
    assert ctl("fence", "in").returncode == 2  # usage
    assert lifted_everywhere(regions, "in")
