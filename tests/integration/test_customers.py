"""
Issue 3 ("Residency routing"): the Customers API and the directory (DESIGN.md §4) against the
three real local regions.

Each test makes its own customers (uuid4 ids); nothing is wiped between tests. A directory row
lives only in its residency region: the tests check that with `regions.psql` in all three.
Tests that need an empty directory cache use a dedicated gateway (`gateways.start()`).
"""

import time

import grpc
import pytest

from conftest import NOT_SERVING, REGION_CODES, SERVING, wait_health
from helpers import Api, assert_invalid, bulk_stream, footprint, limits_case, lit, pb_bytes, pb_label, put, register, rows, rpc_error, uid
from domicile.v1 import customers_pb2, records_pb2

RegReq = customers_pb2.RegisterCustomerRequest
GetCReq = customers_pb2.GetCustomerRequest
CloseReq = customers_pb2.CloseCustomerRequest
SC = grpc.StatusCode
ACTIVE = customers_pb2.CUSTOMER_STATE_ACTIVE
CLOSED = customers_pb2.CUSTOMER_STATE_CLOSED
DAY_MS = 86400 * 1000
RETENTION_DAYS = 30  # customer_retention_days: the default; deploy/local does not set it
EMPTY = dict(customers=0, records=0, data_keys=0, idempotency=0)

# --------------------------------------------------------------------------------------------
# local helpers


def new_id(tag="c"):
    return f"{tag}-{uid()}"


def directory_rows(regions, cid):
    """{region: [state, residency]} of every region holding a directory row for `cid`."""
    out = {}
    for r in REGION_CODES:
        got = rows(regions, r, f"SELECT state, residency FROM domicile.customers WHERE customer_id = {lit(cid)}")
        if got:
            out[r] = got[0]
    return out


def close_to_now_ms(t_ms, slack_s=120):
    return abs(t_ms - time.time() * 1000) < slack_s * 1000


# --------------------------------------------------------------------------------------------
# registration and placement of the directory row


def test_register_writes_the_directory_row_only_in_the_residency_region(regions, api):
    for residency in REGION_CODES:
        cid = new_id(f"cust-{residency}")
        c = api.register(
            RegReq(request_id=f"reg-{uid()}", customer_id=cid, residency=residency, display_name="Acme Ünïcode", labels={"tier": "gold"}),
            timeout=15,
        ).customer
        assert (c.customer_id, c.residency, c.state, c.display_name, dict(c.labels)) == (cid, residency, ACTIVE, "Acme Ünïcode", {"tier": "gold"})
        assert close_to_now_ms(c.created_at_unix_ms)
        assert (c.closed_at_unix_ms, c.purge_after_unix_ms, c.purged_at_unix_ms, c.close_reason) == (0, 0, 0, "")
        assert directory_rows(regions, cid) == {residency: ["active", residency]}
        got = rows(regions, residency, f"SELECT display_name, labels FROM domicile.customers WHERE customer_id = {lit(cid)}")
        assert got == [["Acme Ünïcode", '{"tier": "gold"}']]
        g = api.get_customer(GetCReq(customer_id=cid), timeout=10).customer
        assert (g.customer_id, g.residency, g.state, g.created_at_unix_ms, g.display_name) == (cid, residency, ACTIVE, c.created_at_unix_ms, c.display_name)


def test_a_fresh_gateway_resolves_customers_by_asking_every_region(regions, api, gateways):
    """No cache: the gateway asks all regions, finds the one that holds the customer, and
    routes records there."""
    custs = {r: register(api, r) for r in REGION_CODES}
    gw = gateways.start(name="fresh")
    fresh = Api(gw.channel())
    for r in REGION_CODES:
        wait_health(fresh.channel, f"domicile.region.{r}", SERVING, timeout=30)
    for r, cid in custs.items():
        assert fresh.get_customer(GetCReq(customer_id=cid), timeout=10).customer.residency == r
        rep = put(fresh, cid, "via-fresh", b"x")
        assert rep.record.region == r
    # A record call as the first call for a customer resolves it as well.
    gw2 = gateways.start(name="fresh2")
    fresh2 = Api(gw2.channel())
    for r in REGION_CODES:
        wait_health(fresh2.channel, f"domicile.region.{r}", SERVING, timeout=30)
    for r, cid in custs.items():
        rec = fresh2.get(records_pb2.GetRecordRequest(customer_id=cid, record_id="via-fresh"), timeout=10).record
        assert (rec.region, rec.payload) == (r, b"x")
        assert rows(regions, r, f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)}") == [["1"]]


def test_unknown_residency_is_refused_and_lists_the_known_regions(regions, api):
    for residency in ("xx", "US", "eu ", "mars", "uk", "u" * 40, 'a"b'):
        cid = new_id()
        e = rpc_error(api.register, RegReq(request_id=uid(), customer_id=cid, residency=residency), timeout=10)
        assert_invalid(e, "residency")
        assert "known regions: us, eu, in" in e.details(), e.details()
        for r in REGION_CODES:
            assert footprint(regions, r, cid) == EMPTY, (residency, r)
    cid = new_id()
    e = rpc_error(api.register, RegReq(request_id=uid(), customer_id=cid), timeout=10)
    assert_invalid(e, "residency")
    raw = RegReq(request_id=uid(), customer_id=cid, residency="us").SerializeToString() + pb_bytes(3, b"u\xffs")
    assert_invalid(rpc_error(api.raw("CustomersService", "RegisterCustomer", rep=customers_pb2.RegisterCustomerResponse), raw, timeout=10), "residency")
    for r in REGION_CODES:
        assert footprint(regions, r, cid) == EMPTY, r


def test_an_id_held_by_any_region_cannot_be_registered_again(regions, api, gateways):
    cid = register(api, "us")
    for residency in ("eu", "in", "us"):
        e = rpc_error(api.register, RegReq(request_id=f"again-{uid()}", customer_id=cid, residency=residency), timeout=10)
        assert e.code() == SC.ALREADY_EXISTS, (residency, e.code(), e.details())
    # Also from a gateway that has never heard of it (no cache: the regions are asked).
    gw = gateways.start(name="fresh")
    fresh = Api(gw.channel())
    for r in REGION_CODES:
        wait_health(fresh.channel, f"domicile.region.{r}", SERVING, timeout=30)
    for residency in ("in", "eu"):
        e = rpc_error(fresh.register, RegReq(request_id=f"fresh-{uid()}", customer_id=cid, residency=residency), timeout=10)
        assert e.code() == SC.ALREADY_EXISTS, (residency, e.code(), e.details())
    assert directory_rows(regions, cid) == {"us": ["active", "us"]}
    for r in ("eu", "in"):
        assert footprint(regions, r, cid) == EMPTY, r


def test_a_closed_customers_id_is_never_registered_again(regions, api):
    cid = register(api, "in")
    api.close_customer(CloseReq(request_id=uid(), customer_id=cid, reason="contract ended"), timeout=10)
    for residency in REGION_CODES:
        e = rpc_error(api.register, RegReq(request_id=uid(), customer_id=cid, residency=residency), timeout=10)
        assert e.code() == SC.ALREADY_EXISTS, (residency, e.code(), e.details())
    assert directory_rows(regions, cid) == {"in": ["closed", "in"]}


def test_registration_retry_with_the_same_request_id_returns_the_customer(regions, api, gateways):
    cid = new_id()
    req = RegReq(request_id="reg-once", customer_id=cid, residency="eu", display_name="Once GmbH", labels={"a": "b"})
    first = api.register(req, timeout=10).customer
    again = api.register(req, timeout=10).customer
    assert again == first
    gw = gateways.start(name="fresh")
    fresh = Api(gw.channel())
    for r in REGION_CODES:
        wait_health(fresh.channel, f"domicile.region.{r}", SERVING, timeout=30)
    assert fresh.register(req, timeout=10).customer == first
    assert directory_rows(regions, cid) == {"eu": ["active", "eu"]}
    # Same request_id, other content: refused, nothing changed.
    for change in (dict(display_name="Other"), dict(labels={"a": "c"})):
        other = RegReq()
        other.CopyFrom(req)
        if "labels" in change:
            other.labels.clear()
            other.labels.update(change["labels"])
        else:
            other.display_name = change["display_name"]
        assert_invalid(rpc_error(api.register, other, timeout=10), "request_id")
    assert rows(regions, "eu", f"SELECT display_name, labels FROM domicile.customers WHERE customer_id = {lit(cid)}") == [["Once GmbH", '{"a": "b"}']]


def test_get_customer_of_an_unknown_id_is_not_found(regions, api, gateways):
    ghost = new_id("ghost")
    e = rpc_error(api.get_customer, GetCReq(customer_id=ghost), timeout=10)
    assert e.code() == SC.NOT_FOUND, (e.code(), e.details())
    gw = gateways.start(name="fresh")
    fresh = Api(gw.channel())
    for r in REGION_CODES:
        wait_health(fresh.channel, f"domicile.region.{r}", SERVING, timeout=30)
    e = rpc_error(fresh.get_customer, GetCReq(customer_id=ghost), timeout=10)
    assert e.code() == SC.NOT_FOUND, (e.code(), e.details())
    e = rpc_error(fresh.close_customer, CloseReq(request_id=uid(), customer_id=ghost, reason="x"), timeout=10)
    assert e.code() == SC.NOT_FOUND, (e.code(), e.details())
    for r in REGION_CODES:
        assert footprint(regions, r, ghost) == EMPTY


# --------------------------------------------------------------------------------------------
# closing


def test_close_customer_makes_records_read_only(regions, api):
    cid = register(api, "eu")
    put(api, cid, "kept", b"still readable", request_id="before-close")
    req = CloseReq(request_id="close-1", customer_id=cid, reason="account closed by the customer")
    c = api.close_customer(req, timeout=10).customer
    assert c.state == CLOSED and c.close_reason == req.reason
    assert close_to_now_ms(c.closed_at_unix_ms)
    assert c.purge_after_unix_ms == c.closed_at_unix_ms + RETENTION_DAYS * DAY_MS, (c.closed_at_unix_ms, c.purge_after_unix_ms)
    got = rows(
        regions,
        "eu",
        f"SELECT state, close_reason, purge_after - closed_at FROM domicile.customers WHERE customer_id = {lit(cid)}",
    )
    assert got == [["closed", req.reason, f"{RETENTION_DAYS} days"]]
    assert api.get_customer(GetCReq(customer_id=cid), timeout=10).customer == c
    # retry of the same close: the same answer; another close: refused
    assert api.close_customer(req, timeout=10).customer == c
    e = rpc_error(api.close_customer, CloseReq(request_id="close-2", customer_id=cid, reason="again"), timeout=10)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())

    before = footprint(regions, "eu", cid)
    e = rpc_error(put, api, cid, "new", b"x")
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())
    e = rpc_error(put, api, cid, "kept", b"overwrite")
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())
    e = rpc_error(api.delete, records_pb2.DeleteRecordRequest(request_id=uid(), customer_id=cid, record_id="kept"), timeout=10)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())
    rep = api.bulk(bulk_stream(iter([records_pb2.PutRecordRequest(request_id=uid(), customer_id=cid, record_id="bulk", kind="note")])), timeout=10)
    assert [(f.index, f.code) for f in rep.failures] == [(0, SC.FAILED_PRECONDITION.value[0])] and rep.written == 0
    assert footprint(regions, "eu", cid) == before
    # reads still work
    assert api.get(records_pb2.GetRecordRequest(customer_id=cid, record_id="kept"), timeout=10).record.payload == b"still readable"
    items = list(api.list(records_pb2.ListRecordsRequest(customer_id=cid, include_payload=True), timeout=10))
    assert [m.record.record_id for m in items[:-1]] == ["kept"] and items[-1].WhichOneof("item") == "end"
    # a retry of a write acknowledged before the close returns its first result
    rep = put(api, cid, "kept", b"still readable", request_id="before-close")
    assert rep.replayed and rep.record.version == 1


# --------------------------------------------------------------------------------------------
# a region that cannot answer


def test_resolution_is_unavailable_when_a_region_cannot_answer(regions, api, gateways, channel):
    cu = register(api, "us")
    ci = register(api, "in")
    ghost = new_id("ghost")
    stopped = False
    try:
        regions.stop("in")
        stopped = True
        gw = gateways.start(name="fresh")  # empty cache; started while `in` is down
        fresh = Api(gw.channel())
        pid = gw.pid
        wait_health(fresh.channel, "domicile.region.in", NOT_SERVING, timeout=30)

        def unavailable(fn, req):
            t0 = time.monotonic()
            e = rpc_error(fn, req, timeout=5)
            took = time.monotonic() - t0
            assert e.code() == SC.UNAVAILABLE, (req, e.code(), e.details())
            assert took < 5, took
            return e

        # Nobody has it, but `in` could not say so: never NOT_FOUND.
        unavailable(fresh.get_customer, GetCReq(customer_id=ghost))
        unavailable(fresh.get, records_pb2.GetRecordRequest(customer_id=ghost, record_id="r"))
        unavailable(fresh.put, records_pb2.PutRecordRequest(request_id="p", customer_id=ghost, record_id="r", kind="note"))
        # The customer of the stopped region.
        unavailable(fresh.get_customer, GetCReq(customer_id=ci))
        # A US customer: us has it, so the answer does not depend on `in`.
        assert fresh.get_customer(GetCReq(customer_id=cu), timeout=5).customer.residency == "us"
        assert put(fresh, cu, "during", b"x").record.region == "us"
        # Registration must hear from every region.
        new = new_id()
        unavailable(fresh.register, RegReq(request_id=uid(), customer_id=new, residency="us"))
        unavailable(fresh.register, RegReq(request_id=uid(), customer_id=new, residency="in"))
        for r in ("us", "eu"):
            assert footprint(regions, r, new) == EMPTY, r

        regions.start("in")
        stopped = False
        wait_health(fresh.channel, "domicile.region.in", SERVING, timeout=60)
        assert gw.alive() and gw.pid == pid
        e = rpc_error(fresh.get_customer, GetCReq(customer_id=ghost), timeout=10)
        assert e.code() == SC.NOT_FOUND, (e.code(), e.details())
        assert fresh.get_customer(GetCReq(customer_id=ci), timeout=10).customer.residency == "in"
        register(fresh, "us", cid=new)
        assert directory_rows(regions, new) == {"us": ["active", "us"]}
    finally:
        if stopped:
            regions.start("in")
        # The session gateway lost `in` too: the next tests need it back.
        wait_health(channel, "domicile.region.in", SERVING, timeout=60)


# --------------------------------------------------------------------------------------------
# limits


def _reg(**kw):
    return limits_case(RegReq, kw, residency="us")


def _reg_raw(field, data):
    return lambda cid: RegReq(request_id=f"lim-{uid()}", customer_id=cid, residency="us").SerializeToString() + pb_bytes(field, data)


def _reg_label(key, value):
    return lambda cid: RegReq(request_id=f"lim-{uid()}", customer_id=cid, residency="us").SerializeToString() + pb_label(5, key, value)


# (case id, body builder given the id the call is about, field named, limit named)
REGISTER_LIMITS = [
    ("request_id-empty", _reg(request_id=""), "request_id", 128),
    ("request_id-129", _reg(request_id="r" * 129), "request_id", 128),
    ("request_id-non-ascii", _reg(request_id="rü"), "request_id", 128),
    ("request_id-control", _reg(request_id="r\x1b"), "request_id", 128),
    ("request_id-invalid-utf8", _reg_raw(1, b"r\xff"), "request_id", "UTF-8"),
    ("customer_id-empty", lambda cid: _reg(customer_id="")(cid), "customer_id", 128),
    ("customer_id-129", lambda cid: _reg(customer_id=(cid + "x" * 129)[:129])(cid), "customer_id", 128),
    ("customer_id-slash", lambda cid: _reg(customer_id=cid + "/x")(cid), "customer_id", 128),
    ("customer_id-space", lambda cid: _reg(customer_id=cid + " ")(cid), "customer_id", 128),
    ("customer_id-non-ascii", lambda cid: _reg(customer_id=cid + "é")(cid), "customer_id", 128),
    ("customer_id-nul", lambda cid: _reg(customer_id=cid + "\x00x")(cid), "customer_id", "UTF-8"),
    ("customer_id-invalid-utf8", _reg_raw(2, b"c\xff"), "customer_id", "UTF-8"),
    ("display_name-257", _reg(display_name="d" * 257), "display_name", 256),
    ("display_name-257-bytes", _reg(display_name="ü" * 128 + "d"), "display_name", 256),
    ("display_name-control", _reg(display_name="Acme\nInc"), "display_name", 256),
    ("display_name-nul", _reg(display_name="Acme\x00Inc"), "display_name", "UTF-8"),
    ("display_name-invalid-utf8", _reg_raw(4, b"Acme\xc3"), "display_name", "UTF-8"),
    ("residency-nul", _reg(residency="us\x00xx"), "residency", "UTF-8"),
    ("labels-33", _reg(labels={f"k{i}": "" for i in range(33)}), "labels", 32),
    ("labels-key-empty", _reg(labels={"": "v"}), "labels", 63),
    ("labels-key-64", _reg(labels={"k" * 64: "v"}), "labels", 63),
    ("labels-key-bad-char", _reg(labels={"k/v": "v"}), "labels", 63),
    ("labels-value-257", _reg(labels={"k": "v" * 257}), "labels", 256),
    ("labels-value-control", _reg(labels={"k": "v\x7f"}), "labels", 256),
    ("labels-value-invalid-utf8", _reg_label(b"k", b"\xff"), "labels", "UTF-8"),
    ("labels-key-invalid-utf8", _reg_label(b"\xffk", b"v"), "labels", "UTF-8"),
]


@pytest.mark.parametrize("case,build,field,limit", REGISTER_LIMITS, ids=[c[0] for c in REGISTER_LIMITS])
def test_register_customer_limits(regions, api, case, build, field, limit):
    cid = new_id("lim")
    e = rpc_error(api.raw("CustomersService", "RegisterCustomer", rep=customers_pb2.RegisterCustomerResponse), build(cid), timeout=10)
    assert_invalid(e, field, limit)
    for r in REGION_CODES:
        assert footprint(regions, r, cid) == EMPTY, r


def test_register_customer_limits_at_their_maximum(regions, api):
    cid = ("Az09._:-" + uid() * 4)[:128]
    labels = {f"{i:02d}" + "k" * 61: "ü" * 128 for i in range(32)}
    c = api.register(
        RegReq(request_id="~" * 128, customer_id=cid, residency="in", display_name="ü" * 128, labels=labels),
        timeout=10,
    ).customer
    assert (c.customer_id, c.display_name, dict(c.labels)) == (cid, "ü" * 128, labels)
    assert directory_rows(regions, cid) == {"in": ["active", "in"]}
    c = api.close_customer(CloseReq(request_id="~" * 128, customer_id=cid, reason="r" * 1024), timeout=10).customer
    assert c.close_reason == "r" * 1024


GET_CUSTOMER_LIMITS = [
    ("customer_id-empty", lambda cid: GetCReq().SerializeToString(), "customer_id", 128),
    ("customer_id-129", lambda cid: GetCReq(customer_id="c" * 129).SerializeToString(), "customer_id", 128),
    ("customer_id-bad-char", lambda cid: GetCReq(customer_id=cid + "#").SerializeToString(), "customer_id", 128),
    ("customer_id-nul", lambda cid: GetCReq(customer_id=cid + "\x00x").SerializeToString(), "customer_id", "UTF-8"),
    ("customer_id-invalid-utf8", lambda cid: pb_bytes(1, cid.encode() + b"\xff"), "customer_id", "UTF-8"),
]


@pytest.mark.parametrize("case,build,field,limit", GET_CUSTOMER_LIMITS, ids=[c[0] for c in GET_CUSTOMER_LIMITS])
def test_get_customer_limits(api, case, build, field, limit):
    cid = register(api, "us")  # an existing customer: an id cut short must not find it
    assert_invalid(rpc_error(api.raw("CustomersService", "GetCustomer", rep=customers_pb2.GetCustomerResponse), build(cid), timeout=10), field, limit)


def _close(**kw):
    return limits_case(CloseReq, kw, reason="because")


CLOSE_LIMITS = [
    ("request_id-empty", _close(request_id=""), "request_id", 128),
    ("request_id-129", _close(request_id="r" * 129), "request_id", 128),
    ("request_id-non-ascii", _close(request_id="ré"), "request_id", 128),
    ("customer_id-empty", _close(customer_id=""), "customer_id", 128),
    ("customer_id-bad-char", lambda cid: _close(customer_id=cid + "!")(cid), "customer_id", 128),
    ("customer_id-nul", lambda cid: _close(customer_id=cid + "\x00x")(cid), "customer_id", "UTF-8"),
    ("reason-empty", _close(reason=""), "reason", 1024),
    ("reason-1025", _close(reason="r" * 1025), "reason", 1024),
    ("reason-control", _close(reason="a\x02b"), "reason", 1024),
    ("reason-invalid-utf8", lambda cid: _close()(cid) + pb_bytes(3, b"bad\xe0\x80\x80"), "reason", "UTF-8"),
]


@pytest.mark.parametrize("case,build,field,limit", CLOSE_LIMITS, ids=[c[0] for c in CLOSE_LIMITS])
def test_close_customer_limits(regions, api, case, build, field, limit):
    cid = register(api, "eu")
    assert_invalid(rpc_error(api.raw("CustomersService", "CloseCustomer", rep=customers_pb2.CloseCustomerResponse), build(cid), timeout=10), field, limit)
    assert rows(regions, "eu", f"SELECT state, close_reason IS NULL FROM domicile.customers WHERE customer_id = {lit(cid)}") == [["active", "t"]]
    assert api.get_customer(GetCReq(customer_id=cid), timeout=10).customer.state == ACTIVE
