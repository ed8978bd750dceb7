"""
Issue 14, item 4 ("Replies that differ from the proto's words"): a client generated from
proto/domicile/v1/*.proto is all most users read, so every comment there must say what the
gateway does. Each test here pins one comment that was changed (its words, or the behaviour
behind them): the docstring quotes the words it holds the gateway to.

Shared regions and the session gateway, like the other modules; tests that need other
principals (a privacy officer with a limited tenant scope) start their own gateway. Data is
made per test (uuid4 ids); rows written into the databases directly are removed again.
"""

import hashlib
import json
import re

import grpc
import pytest

from conftest import SERVING, wait_health, wait_until
from helpers import Api, Principals, get, list_once, lit, md, paged, put, register, rpc_error, stream_stub, uid, unary_stub
from domicile.v1 import customers_pb2 as C
from domicile.v1 import records_pb2 as R
from domicile.v1 import regions_pb2 as G
from domicile.v1 import subject_rights_pb2 as SR
from domicile.v1 import transfers_pb2 as T

SC = grpc.StatusCode
REGION_ORDER = ("eu", "in", "us")


# --------------------------------------------------------------------------------------------
# helpers


class Dsr:
    """SubjectRightsService on one channel; the filing calls and GetRequest return the
    DsrRequest of their response."""

    def __init__(self, channel):
        def u(method):
            stub = unary_stub(channel, "SubjectRightsService", method, getattr(SR, f"{method}Request"), getattr(SR, f"{method}Response"))

            def call(req, timeout=15, **kw):
                rep = stub(req, timeout=timeout, **kw)
                assert rep.HasField("request"), rep
                return rep.request

            return call

        self.erase = u("Erase")
        self.restrict = u("RestrictProcessing")
        self.unrestrict = u("UnrestrictProcessing")
        self.object = u("Object")
        self.get_request = u("GetRequest")
        self.extend = u("ExtendDeadline")
        self.locate = unary_stub(channel, "SubjectRightsService", "Locate", SR.LocateRequest, SR.LocateResponse)
        self.export_stream = stream_stub(channel, "SubjectRightsService", "Export", SR.ExportRequest, SR.ExportResponse)
        self.list_stream = stream_stub(channel, "SubjectRightsService", "ListRequests", SR.ListRequestsRequest, SR.ListRequestsResponse)

    def status(self, request_id):
        return self.get_request(SR.GetRequestRequest(request_id=request_id))

    def export(self, **kw):
        msgs = list(self.export_stream(SR.ExportRequest(**kw), timeout=60))
        kinds = [m.WhichOneof("item") for m in msgs]
        assert kinds and kinds[-1] == "manifest" and kinds.count("manifest") == 1, kinds
        return [m.line for m in msgs[:-1]], msgs[-1].manifest

    def list(self, **filters):
        return paged(self.list_stream, SR.ListRequestsRequest, "request", max_pages=100, **filters)

    def page(self, **req):
        msgs = list(self.list_stream(SR.ListRequestsRequest(**req), timeout=30))
        return [m.request for m in msgs[:-1]], msgs[-1].end.next_page_token


class Ops:
    def __init__(self, channel):
        self.list = unary_stub(channel, "RegionsService", "ListRegions", G.ListRegionsRequest, G.ListRegionsResponse)
        self.fence_stub = unary_stub(channel, "RegionsService", "Fence", G.FenceRequest, G.FenceResponse)
        self.unfence_stub = unary_stub(channel, "RegionsService", "Unfence", G.UnfenceRequest, G.UnfenceResponse)

    def status(self, region):
        return {s.code: s for s in self.list(G.ListRegionsRequest(), timeout=15).regions}[region]

    def fence(self, region, reason, request_id):
        return self.fence_stub(G.FenceRequest(region=region, reason=reason, request_id=request_id), timeout=15).region

    def unfence(self, region, request_id=None):
        return self.unfence_stub(G.UnfenceRequest(region=region, request_id=request_id or f"unfence-{uid()}"), timeout=15).region


@pytest.fixture(scope="module")
def who(session_gateway):
    ch = session_gateway.channel(token=None)
    for r in REGION_ORDER:
        wait_health(ch, f"domicile.region.{r}", SERVING, timeout=60)
    return Principals(session_gateway)


@pytest.fixture(scope="module")
def po(session_gateway):
    return Dsr(session_gateway.channel(token="privacy-officer"))


def subject():
    return f"words-{uid()}@example.org"


def wait_done(dsr, request_id, timeout=30.0):
    def status():
        try:
            return dsr.status(request_id)
        except grpc.RpcError as e:
            return f"{e.code()} {e.details()}"

    last = wait_until(status, lambda r: not isinstance(r, str) and r.state == SR.DSR_STATE_DONE, timeout)
    assert not isinstance(last, str) and last.state == SR.DSR_STATE_DONE, f"{request_id}: not DONE after {timeout}s: {last}"
    return last


def ledger_rows(regions, region, where):
    """Ledger rows of `region` matching `where` (SQL), in append order, record_ids split."""
    out = regions.psql(
        region,
        "SELECT coalesce(json_agg(t ORDER BY t.entry_id), '[]') FROM (SELECT entry_id, request_id, principal, method, "
        "customer_id, encode(subject_key, 'hex') AS subject_key, record_count, bytes, from_region, to_region, direction, "
        f"purpose, outcome, record_ids FROM domicile.ledger WHERE {where}) t",
    )
    rows = json.loads(out)
    for r in rows:
        r["record_ids"] = r["record_ids"].split("\x1f") if r["record_ids"] else []
    return rows


def transfers_of(auditor, **filters):
    return paged(auditor.list_transfers, T.ListTransfersRequest, "entry", **filters)


def stream_error(stream_call):
    """The gRPC error a server stream ends with (it must end with one)."""
    return rpc_error(lambda: list(stream_call()))


# --------------------------------------------------------------------------------------------
# common.proto


def test_region_codes_are_2_to_16_bytes_and_unknown_ones_are_refused_where_they_name_a_region(session_gateway, who):
    """common.proto: region codes "of 2..16 bytes, [a-z][a-z0-9]*"; "An unknown code in a field
    that names a region to act on (residency, region) is INVALID_ARGUMENT naming the field;
    RegisterCustomer's message also lists the known codes. The from_region/to_region filters of
    TransfersService are not checked against the loaded regions ...: an unknown code matches
    nothing." (It said "at most 32 bytes", and that every unknown code is refused with the
    known codes listed.)"""
    admin, auditor = who["admin"], who["auditor"]
    ops = Ops(session_gateway.channel(token="operator"))
    for bad in ("zz", "a" * 17, "a" * 32):
        e = rpc_error(register, admin, bad)
        assert e.code() == SC.INVALID_ARGUMENT and e.details().startswith("residency: unknown region"), (bad, e.details())
        assert "known regions: " in e.details() and all(r in e.details() for r in REGION_ORDER), e.details()
    for call in (
        lambda: auditor.verify_ledger(T.VerifyLedgerRequest(region="zz"), timeout=15),
        lambda: list(auditor.list_transfers(T.ListTransfersRequest(region="zz"), timeout=15)),
        lambda: ops.fence("zz", "no such region", f"fence-{uid()}"),
    ):
        e = rpc_error(call)
        assert e.code() == SC.INVALID_ARGUMENT and e.details().startswith("region: "), e.details()
    # filters: any code up to 16 bytes, matching nothing when unknown; longer ones are refused
    for f in ({"from_region": "zz"}, {"to_region": "a" * 16}):
        assert transfers_of(auditor, **f) == [], f
    e = rpc_error(lambda: list(auditor.list_transfers(T.ListTransfersRequest(to_region="a" * 17), timeout=15)))
    assert e.code() == SC.INVALID_ARGUMENT and "16" in e.details(), e.details()


def test_fence_request_id_is_checked_but_not_stored(regions, session_gateway):
    """common.proto: "RegionsService.Fence/Unfence check request_id's form but keep no record of
    it: they are idempotent by the state they set"; regions.proto Fence: "a retry after the
    region was unfenced fences it again". (It said a retry with the same request_id returns
    the first result, and another request under it is INVALID_ARGUMENT.)"""
    ops = Ops(session_gateway.channel(token="operator"))
    rid = f"fence-{uid()}"
    try:
        first = ops.fence("in", "words test: first", rid)
        assert first.fenced and first.fence_reason == "words test: first", first
        # the same request_id, another reason, while fenced: the state decides (first reason kept)
        again = ops.fence("in", "words test: other", rid)
        assert again.fenced and again.fence_reason == "words test: first", again
        assert not ops.unfence("in").fenced
        # the same request_id after the lift: fenced again, with this call's reason
        retry = ops.fence("in", "words test: second", rid)
        assert retry.fenced and retry.fence_reason == "words test: second", retry
        e = rpc_error(ops.fence, "in", "words test", "has space")
        assert e.code() == SC.INVALID_ARGUMENT and "request_id" in e.details(), e.details()
    finally:
        wait_until(lambda: _unfenced(ops, "in"), bool, timeout=60)
        wait_until(
            lambda: regions.psql("in", "SELECT count(*) FROM domicile.fences WHERE region = 'in' AND NOT lifted"),
            lambda n: n == "0",
            timeout=30,
        )


def _unfenced(ops, region):
    try:
        return not ops.unfence(region).fenced
    except grpc.RpcError:
        return False


def test_reason_is_not_compared_when_a_request_id_is_reused(who, po):
    """common.proto: "the `reason` of CloseCustomer and of a data-subject request is not
    compared (a retry with another reason returns the first call's result)"; customers.proto
    CloseCustomer: "a retry returns the customer as it is now (the reason is not compared)"."""
    admin = who["admin"]
    cid = register(admin, "eu", prefix="words")
    rid = f"close-{uid()}"
    first = admin.close_customer(C.CloseCustomerRequest(request_id=rid, customer_id=cid, reason="first reason"), timeout=15).customer
    again = admin.close_customer(C.CloseCustomerRequest(request_id=rid, customer_id=cid, reason="other reason"), timeout=15).customer
    assert first.state == again.state == C.CUSTOMER_STATE_CLOSED and again.close_reason == "first reason", again
    e = rpc_error(admin.close_customer, C.CloseCustomerRequest(request_id=f"close-{uid()}", customer_id=cid, reason="x"), timeout=15)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())

    s, drid = subject(), f"erase-{uid()}"
    q1 = po.erase(SR.EraseRequest(request_id=drid, subject=s, customer_id=cid, reason="ticket 1"))
    q2 = po.erase(SR.EraseRequest(request_id=drid, subject=s, customer_id=cid, reason="ticket 2"))
    assert q1.reason == q2.reason == "ticket 1" and q2.received_at_unix_ms == q1.received_at_unix_ms, (q1, q2)
    e = rpc_error(po.erase, SR.EraseRequest(request_id=drid, subject=subject(), customer_id=cid))
    assert e.code() == SC.INVALID_ARGUMENT and "request_id" in e.details(), e.details()
    wait_done(po, drid)


def test_a_retried_cross_border_put_is_logged_again(regions, who):
    """common.proto: "a retried cross-border PutRecord is still a transfer: the payload crossed
    again, and the ledger logs it again"; records.proto PutRecord: "writes no record (a
    cross-border retry is logged in the ledger again ...)"."""
    cid = register(who["admin"], "eu", prefix="words")
    rid = f"put-{uid()}"
    a = put(who["service-us"], cid, "w-1", b"12345", request_id=rid)
    b = put(who["service-us"], cid, "w-1", b"12345", request_id=rid)
    assert (a.replayed, b.replayed, a.record.version, b.record.version) == (False, True, 1, 1), (a, b)
    rows = ledger_rows(regions, "eu", f"request_id = {lit(rid)}")
    assert [(r["outcome"], r["direction"], r["method"], r["record_count"], r["bytes"], r["record_ids"]) for r in rows] == [
        ("allowed", "write", "PutRecord", 1, 5, ["w-1"])
    ] * 2, rows


def test_subjects_are_normalised_in_ascii_only(who):
    """common.proto: subjects are "normalised: ASCII whitespace trimmed at both ends, ASCII
    letters A-Z lower-cased, every other byte kept as sent (so "José" and "josé" are different
    subjects, and control characters inside are kept); 1..320 bytes of UTF-8 after trimming".
    (It said "trimmed, lower-cased".)"""
    admin = who["admin"]
    cid = register(admin, "us", prefix="words")
    tag = uid()[:8]

    def key(rid, s):
        rep = put(admin, cid, rid, b"x", subject=s)
        assert rep.record.has_subject, rep
        return rep.record.subject_key_hex

    assert key("a1", f" \t Ann.{tag}@Example.ORG\r\n") == key("a2", f"ann.{tag}@example.org")
    assert key("j1", f"José.{tag}@x.org") == key("j2", f"josé.{tag}@x.org")
    assert key("j3", f"JOSÉ.{tag}@x.org") != key("j4", f"josé.{tag}@x.org")  # É is not A-Z
    assert key("c1", f"a\x01b.{tag}") != key("c2", f"ab.{tag}")  # kept, not refused
    key("l1", "  " + "a" * 320 + "\t")
    e = rpc_error(put, admin, cid, "l2", b"x", subject="a" * 321)
    assert e.code() == SC.INVALID_ARGUMENT and "subject" in e.details() and "320" in e.details(), e.details()


# --------------------------------------------------------------------------------------------
# customers.proto


def test_register_refusals_named_in_the_proto(regions, session_gateway, who):
    """customers.proto RegisterCustomer errors: "PERMISSION_DENIED customer_id is outside the
    caller's tenant scope" is pinned by test_security; "ABORTED the same customer_id is being
    registered at the same time (retry)" here: a fresh pending row for the id in another region
    (another gateway's registration in progress) makes this one ABORTED, nothing kept."""
    cid = f"words-{uid()}"
    regions.psql("eu", f"INSERT INTO domicile.customers (customer_id, residency, state, request_id, fingerprint) VALUES ({lit(cid)}, 'eu', 'pending', 'other', '\\x00')")
    try:
        e = rpc_error(register, who["admin"], "us", cid=cid)
        assert e.code() == SC.ABORTED and "retry" in e.details(), (e.code(), e.details())
        assert regions.psql("us", f"SELECT count(*) FROM domicile.customers WHERE customer_id = {lit(cid)}") == "0"
    finally:
        regions.psql("eu", f"DELETE FROM domicile.customers WHERE customer_id = {lit(cid)} AND state = 'pending'")
    assert register(who["admin"], "us", cid=cid) == cid  # the retry, once the other is gone


def test_get_customer_returns_the_purged_tombstone(regions, who):
    """customers.proto GetCustomer: "Returns a customer in any state, PURGED included (a
    tombstone: its records, data keys, display name and labels are gone; purged_at_unix_ms says
    when)"; PURGED: "Writes answer NOT_FOUND; there is nothing left to read (GetRecord
    NOT_FOUND, ListRecords empty)". (GetCustomer answered NOT_FOUND for a purged customer,
    while RegisterCustomer refused its id.)"""
    admin = who["admin"]
    cid = register(admin, "us", prefix="words", display_name="Acme Ltd", labels={"tier": "gold"})
    put(admin, cid, "r1", b"data", subject=subject())
    close_rid = f"close-{uid()}"
    admin.close_customer(C.CloseCustomerRequest(request_id=close_rid, customer_id=cid, reason="contract ended"), timeout=15)
    # the purge, as the region's executor runs it once purge_after has passed
    regions.psql("us", f"UPDATE domicile.customers SET purge_after = now() WHERE customer_id = {lit(cid)}")
    regions.psql("us", "SELECT domicile.purge_due_customers(100)")

    c = admin.get_customer(C.GetCustomerRequest(customer_id=cid), timeout=15).customer
    assert (c.customer_id, c.residency, c.state) == (cid, "us", C.CUSTOMER_STATE_PURGED), c
    assert c.purged_at_unix_ms >= c.closed_at_unix_ms > 0 and c.close_reason == "contract ended", c
    assert (c.display_name, dict(c.labels)) == ("", {}), c
    # the close's retry reads the same tombstone
    again = admin.close_customer(C.CloseCustomerRequest(request_id=close_rid, customer_id=cid, reason="contract ended"), timeout=15).customer
    assert again.state == C.CUSTOMER_STATE_PURGED and again.purged_at_unix_ms == c.purged_at_unix_ms, again

    e = rpc_error(get, admin, cid, "r1")
    assert e.code() == SC.NOT_FOUND, (e.code(), e.details())
    assert list_once(admin, R.ListRecordsRequest(customer_id=cid)) == []
    for write in (
        lambda: put(admin, cid, "r2", b"x"),
        lambda: admin.delete(R.DeleteRecordRequest(request_id=f"del-{uid()}", customer_id=cid, record_id="r1"), timeout=15),
    ):
        e = rpc_error(write)
        assert (e.code(), e.details()) == (SC.NOT_FOUND, "customer not found"), (e.code(), e.details())
    e = rpc_error(register, admin, "us", cid=cid)
    assert e.code() == SC.ALREADY_EXISTS, (e.code(), e.details())


# --------------------------------------------------------------------------------------------
# records.proto


def test_delete_record_is_not_a_transfer(regions, who):
    """records.proto RecordsService: "DeleteRecord moves no record data: it is not a transfer
    (no policy check, no ledger entry, whatever the purpose)"."""
    cid = register(who["admin"], "eu", prefix="words")
    put(who["service-eu"], cid, "r1", b"payload")
    rep = who["service-us"].delete(R.DeleteRecordRequest(request_id=f"del-{uid()}", customer_id=cid, record_id="r1"), metadata=md("sale"), timeout=15)
    assert rep.deleted and rep.version == 1, rep
    for region in REGION_ORDER:
        assert ledger_rows(regions, region, f"customer_id = {lit(cid)}") == [], region
    # the same purpose on a read is refused (a forbidden purpose), and that refusal is logged
    put(who["service-eu"], cid, "r2", b"payload")
    assert rpc_error(get, who["service-us"], cid, "r2", purpose="sale").code() == SC.PERMISSION_DENIED


def test_bulk_put_lists_at_most_1000_failures(who):
    """records.proto BulkPutRecordsResponse.failures: "Messages that failed, in stream order: at
    most 1000 of them (the first to fail); how many failed in all is the number of messages sent
    minus written minus replayed"."""
    n = 1005
    rep = who["admin"].bulk(iter([R.BulkPutRecordsRequest()] * n), timeout=120)
    assert (rep.written, rep.replayed, rep.created) == (0, 0, 0), rep
    assert [f.index for f in rep.failures] == list(range(1000)), [f.index for f in rep.failures][:5]
    assert all(f.code == SC.INVALID_ARGUMENT.value[0] and "put" in f.message for f in rep.failures)


def test_list_records_page_token_is_bound_to_its_filters(who):
    """records.proto ListRecordsRequest.page_token: "Valid only with the same customer_id, kind
    and subject (otherwise INVALID_ARGUMENT); page_size and include_payload may change".
    (Any filter was accepted with any token.)"""
    admin = who["admin"]
    cid, other = register(admin, "us", prefix="words"), register(admin, "us", prefix="words")
    s = subject()
    for i in range(4):
        put(admin, cid, f"n{i}", b"x", kind="note", subject=s)
        put(admin, other, f"n{i}", b"x", kind="note")
    first = list(admin.list(R.ListRecordsRequest(customer_id=cid, kind="note", page_size=2), timeout=15))
    token = first[-1].end.next_page_token
    assert token and [m.record.record_id for m in first[:-1]] == ["n0", "n1"]
    for changed in ({"customer_id": other}, {"kind": ""}, {"kind": "other"}, {"subject": s}):
        req = dict(customer_id=cid, kind="note", page_token=token)
        req.update(changed)
        e = stream_error(lambda: admin.list(R.ListRecordsRequest(**req), timeout=15))
        assert e.code() == SC.INVALID_ARGUMENT and e.details().startswith("page_token"), (changed, e.details())
    rest = list_once(admin, R.ListRecordsRequest(customer_id=cid, kind="note", page_size=10, include_payload=True, page_token=token))
    assert [(r.record_id, r.payload) for r in rest] == [("n2", b"x"), ("n3", b"x")]
    # with the subject filter the tokens are that listing's
    page = list(admin.list(R.ListRecordsRequest(customer_id=cid, subject=s, page_size=3), timeout=15))
    rest = list_once(admin, R.ListRecordsRequest(customer_id=cid, subject=f"  {s.upper()}", page_token=page[-1].end.next_page_token))
    assert [r.record_id for r in rest] == ["n3"]


# --------------------------------------------------------------------------------------------
# transfers.proto


def test_refused_transfers_log_the_records_the_call_named(regions, who):
    """transfers.proto TransferEntry.record_count: "For a refusal (nothing moved), the records the
    call named: 1 for GetRecord, PutRecord and a BulkPutRecords message (the id is in
    record_ids), 0 for ListRecords and Export"; bytes stay 0. (Every refusal had 0 and no id,
    where the proto said "Records moved (or refused)".)"""
    cid = register(who["admin"], "eu", prefix="words")
    s = subject()
    put(who["service-eu"], cid, "rec-1", b"secret", subject=s)
    sale = md("sale")
    assert rpc_error(get, who["service-in"], cid, "rec-1", purpose="sale").code() == SC.PERMISSION_DENIED
    assert rpc_error(put, who["service-us"], cid, "rec-2", b"new", subject=s, purpose="sale").code() == SC.PERMISSION_DENIED
    rep = who["service-us"].bulk(iter([R.BulkPutRecordsRequest(put=R.PutRecordRequest(request_id=f"b-{uid()}", customer_id=cid, record_id="rec-3", kind="note", payload=b"x"))]), metadata=sale, timeout=30)
    assert [(f.index, f.code) for f in rep.failures] == [(0, SC.PERMISSION_DENIED.value[0])], rep
    assert stream_error(lambda: who["service-us"].list(R.ListRecordsRequest(customer_id=cid), metadata=sale, timeout=15)).code() == SC.PERMISSION_DENIED

    rows = ledger_rows(regions, "eu", f"customer_id = {lit(cid)}")
    got = [(r["outcome"], r["method"], r["record_count"], r["bytes"], r["record_ids"]) for r in rows]
    assert got == [
        ("refused", "GetRecord", 1, 0, ["rec-1"]),
        ("refused", "PutRecord", 1, 0, ["rec-2"]),
        ("refused", "BulkPutRecords", 1, 0, ["rec-3"]),
        ("refused", "ListRecords", 0, 0, []),
    ], got
    # subject_key_hex: the put's subject; a refused GetRecord did not read its record: empty
    sk = put(who["service-eu"], cid, "rec-1", b"secret", subject=s).record.subject_key_hex
    assert [r["subject_key"] for r in rows] == [None, sk, None, None], rows
    # and through the API
    refused = transfers_of(who["auditor"], customer_id=cid, outcome=T.TRANSFER_OUTCOME_REFUSED)
    assert [(e.method, e.record_count, list(e.record_ids)) for e in refused] == [(m, n, ids) for _, m, n, _, ids in got]


def test_read_entries_carry_the_x_request_id_or_a_made_up_one(regions, who):
    """transfers.proto TransferEntry.request_id: "for other reads, the call's `x-request-id`
    metadata when it is 1..128 bytes of printable ASCII without space (...), else an id the
    gateway made up: "gw-" and 24 lower-case hex digits". (It said "the id the gateway gave
    the call (the one in its log lines)"; the log line has no such id.)"""
    cid = register(who["admin"], "eu", prefix="words")
    put(who["service-eu"], cid, "r1", b"x")
    trace = f"trace-{uid()}"
    get(who["service-us"], cid, "r1", request_id=trace)
    get(who["service-us"], cid, "r1")
    get(who["service-us"], cid, "r1", request_id="has space")
    ids = [r["request_id"] for r in ledger_rows(regions, "eu", f"customer_id = {lit(cid)}")]
    assert len(ids) == 3 and ids[0] == trace, ids
    assert all(re.fullmatch(r"gw-[0-9a-f]{24}", i) for i in ids[1:]) and ids[1] != ids[2], ids


def test_list_transfers_filters_and_token_as_stated(who):
    """transfers.proto ListTransfersRequest: to_unix_ms "must be >= from_unix_ms when both are
    set (equal: an empty range)" (it said >); principal "at most 128 bytes of [A-Za-z0-9._@-]";
    page_token "Valid only with the same filters and region (otherwise INVALID_ARGUMENT)" (a
    token was refused only when its region was outside the listing)."""
    auditor = who["auditor"]
    cid = register(who["admin"], "eu", prefix="words")
    put(who["service-eu"], cid, "r1", b"x")
    for _ in range(3):
        get(who["service-us"], cid, "r1")
    t = 1_700_000_000_000
    assert transfers_of(auditor, from_unix_ms=t, to_unix_ms=t) == []
    for bad in ({"from_unix_ms": t, "to_unix_ms": t - 1}, {"to_unix_ms": -1}, {"principal": "bad name"}, {"principal": "a" * 129}):
        e = stream_error(lambda: auditor.list_transfers(T.ListTransfersRequest(**bad), timeout=15))
        assert e.code() == SC.INVALID_ARGUMENT, (bad, e.details())
    assert len(transfers_of(auditor, customer_id=cid, principal="service-us")) == 3

    base = dict(customer_id=cid, direction=T.TRANSFER_DIRECTION_READ)
    for scope in ({}, {"region": "eu"}):
        page = list(auditor.list_transfers(T.ListTransfersRequest(page_size=1, **base, **scope), timeout=15))
        token = page[-1].end.next_page_token
        assert len(page) == 2 and token, page
        for changed in ({"purpose": "marketing"}, {"outcome": T.TRANSFER_OUTCOME_ALLOWED}, {"region": "eu" if not scope else ""}, {"principal": "service-us"}, {"customer_id": ""}):
            req = dict(base, **scope, page_token=token)
            req.update(changed)
            e = stream_error(lambda: auditor.list_transfers(T.ListTransfersRequest(**req), timeout=15))
            assert e.code() == SC.INVALID_ARGUMENT and e.details().startswith("page_token"), (scope, changed, e.details())
        msgs = list(auditor.list_transfers(T.ListTransfersRequest(page_token=token, page_size=5, **base, **scope), timeout=15))
        assert [m.WhichOneof("item") for m in msgs] == ["entry", "entry", "end"], msgs


# --------------------------------------------------------------------------------------------
# subject_rights.proto


def test_erase_answers_in_progress_with_its_legs_running(who, po):
    """subject_rights.proto Erase: "Returns the request as stored: IN_PROGRESS, each leg RUNNING
    (claimed by this gateway, which starts it at once) or PENDING (...)". (It said "state
    RECEIVED, legs PENDING".)"""
    cid = register(who["admin"], "eu", prefix="words")
    s = subject()
    put(who["admin"], cid, "r1", b"x", subject=s)
    rid = f"erase-{uid()}"
    q = po.erase(SR.EraseRequest(request_id=rid, subject=s, customer_id=cid))
    assert q.state == SR.DSR_STATE_IN_PROGRESS, q
    assert [(l.region, l.state, l.attempts) for l in q.legs] == [(r, SR.DSR_LEG_STATE_RUNNING, 1) for r in REGION_ORDER], q
    assert all(l.claimed_by and l.lease_expires_at_unix_ms > l.started_at_unix_ms > 0 for l in q.legs), q
    wait_done(po, rid)


def test_finished_legs_and_an_unconfigured_webhook_plan_no_attempt(who, po):
    """subject_rights.proto DsrLeg and WebhookDelivery.next_attempt_at_unix_ms: "When the next
    attempt is due; 0 when none is planned" (a DONE or SKIPPED leg, a webhook NOT_CONFIGURED);
    WEBHOOK_STATE_FAILED / DSR_LEG_STATE_FAILED: retried at next_attempt_at_unix_ms (the "or
    never if that is 0" was never true). Both carried the time the row was last touched."""
    cid = register(who["admin"], "us", prefix="words")
    s = subject()
    put(who["admin"], cid, "r1", b"x", subject=s)
    rid = f"erase-{uid()}"
    po.erase(SR.EraseRequest(request_id=rid, subject=s, customer_id=cid))
    q = wait_done(po, rid)
    assert [(l.region, l.state, l.next_attempt_at_unix_ms) for l in q.legs] == [
        ("eu", SR.DSR_LEG_STATE_SKIPPED, 0),
        ("in", SR.DSR_LEG_STATE_SKIPPED, 0),
        ("us", SR.DSR_LEG_STATE_DONE, 0),
    ], q.legs
    assert (q.webhook.state, q.webhook.next_attempt_at_unix_ms, q.webhook.attempts) == (SR.WEBHOOK_STATE_NOT_CONFIGURED, 0, 0), q.webhook


def test_skipped_means_nothing_to_do(who, po):
    """subject_rights.proto DSR_LEG_STATE_SKIPPED: "an erasure found no record or data key of the
    subject in scope, or an unrestriction or withdrawal found no restriction or objection to
    lift ... (A restriction or an objection is recorded even where the subject has no record
    yet ...: that leg is DONE.)" (It said SKIPPED meant "The region holds no data of the
    subject in scope".)"""
    nobody = subject()
    rids = {
        "restrict": po.restrict(SR.RestrictProcessingRequest(request_id=f"rs-{uid()}", subject=nobody)).request_id,
        "object": po.object(SR.ObjectRequest(request_id=f"ob-{uid()}", subject=nobody, purpose="marketing")).request_id,
        "erase": po.erase(SR.EraseRequest(request_id=f"er-{uid()}", subject=nobody)).request_id,
    }
    want = {"restrict": SR.DSR_LEG_STATE_DONE, "object": SR.DSR_LEG_STATE_DONE, "erase": SR.DSR_LEG_STATE_SKIPPED}
    for kind, rid in rids.items():
        q = wait_done(po, rid)
        assert [(l.state, l.receipt.records_matched) for l in q.legs] == [(want[kind], 0)] * 3, (kind, q.legs)
    # the restriction recorded without records covers a record written later
    cid = register(who["admin"], "eu", prefix="words")
    assert put(who["admin"], cid, "later", b"x", subject=nobody).record.restricted
    # data of the subject, but nothing to lift: SKIPPED
    s = subject()
    put(who["admin"], cid, "r1", b"x", subject=s)
    rid = po.unrestrict(SR.UnrestrictProcessingRequest(request_id=f"un-{uid()}", subject=s)).request_id
    assert [l.state for l in wait_done(po, rid).legs] == [SR.DSR_LEG_STATE_SKIPPED] * 3


def test_restriction_and_objection_reach_reads_as_stated(who, po):
    """subject_rights.proto RestrictProcessing: "GetRecord refuses restricted records
    (FAILED_PRECONDITION) and ListRecords streams them without payload (`restricted` set);
    they are still exported, erasable and deletable"; Object: "GetRecord and PutRecord ... are
    refused with FAILED_PRECONDITION, and ListRecords streams those records without payload
    (`purpose_objected` set). Other purposes, DeleteRecord and the data-subject requests are
    unaffected". (Both said every "read" was refused.)"""
    admin = who["admin"]
    cid = register(admin, "us", prefix="words")
    s, o = subject(), subject()
    for rid, subj in (("s1", s), ("s2", s), ("o1", o), ("o2", o)):
        put(admin, cid, rid, b"payload", subject=subj)
    wait_done(po, po.restrict(SR.RestrictProcessingRequest(request_id=f"rs-{uid()}", subject=s, customer_id=cid)).request_id)
    wait_done(po, po.object(SR.ObjectRequest(request_id=f"ob-{uid()}", subject=o, customer_id=cid, purpose="marketing")).request_id)

    assert rpc_error(get, admin, cid, "s1").code() == SC.FAILED_PRECONDITION
    assert rpc_error(get, admin, cid, "o1", purpose="marketing").code() == SC.FAILED_PRECONDITION
    assert rpc_error(put, admin, cid, "o3", b"x", subject=o, purpose="marketing").code() == SC.FAILED_PRECONDITION
    assert get(admin, cid, "o1").payload == b"payload"  # another purpose
    listed = {r.record_id: r for r in list_once(admin, R.ListRecordsRequest(customer_id=cid, include_payload=True), metadata=md("marketing"))}
    assert {k: (r.restricted, r.purpose_objected, r.payload, r.payload_size) for k, r in listed.items()} == {
        "s1": (True, False, b"", 7),
        "s2": (True, False, b"", 7),
        "o1": (False, True, b"", 7),
        "o2": (False, True, b"", 7),
    }, listed
    for rid in ("s1", "o1"):
        rep = admin.delete(R.DeleteRecordRequest(request_id=f"del-{uid()}", customer_id=cid, record_id=rid), metadata=md("marketing"), timeout=15)
        assert rep.deleted, (rid, rep)
    lines, manifest = po.export(request_id=f"ex-{uid()}", subject=s, customer_id=cid)
    assert [json.loads(l.line)["record_id"] for l in lines] == ["s2"] and manifest.complete


def test_export_legs_are_run_by_the_call(who, po):
    """subject_rights.proto DsrLeg: "An EXPORT leg is run by the exporting call, not by workers:
    it is RUNNING (claimed_by "export-stream") from filing until its part was sent, then DONE
    with records_matched = the lines sent; its attempts and started_at_unix_ms stay 0";
    Receipt.receipt_sha256_hex: "Empty for an EXPORT leg". (The finished leg's
    next_attempt_at_unix_ms was the year 294247: the column's 'infinity'.)"""
    admin = who["admin"]
    s = subject()
    for region, n in (("eu", 2), ("in", 1)):
        cid = register(admin, region, prefix="words")
        for i in range(n):
            put(admin, cid, f"r{i}", b"x", subject=s)
    rid = f"ex-{uid()}"
    lines, manifest = po.export(request_id=rid, subject=s)
    per_region = {c.region: c.records for c in manifest.regions}
    assert per_region == {"eu": 2, "in": 1, "us": 0} and len(lines) == 3, manifest
    q = po.status(rid)
    assert (q.kind, q.state) == (SR.DSR_KIND_EXPORT, SR.DSR_STATE_DONE), q
    for l in q.legs:
        assert (l.state, l.attempts, l.started_at_unix_ms, l.claimed_by, l.lease_expires_at_unix_ms, l.next_attempt_at_unix_ms) == (SR.DSR_LEG_STATE_DONE, 0, 0, "", 0, 0), l
        assert l.finished_at_unix_ms > 0 and l.receipt.records_matched == per_region[l.region], l
        assert l.receipt.receipt_sha256_hex == "" and l.receipt.finished_at_unix_ms == l.finished_at_unix_ms, l


def test_export_and_locate_of_an_unknown_customer_are_not_found(who, po):
    """subject_rights.proto: "`customer_id` names one customer, which must exist and be in the
    caller's tenant scope"; common errors "NOT_FOUND customer_id unknown". (Export streamed an
    empty, complete export and marked the request DONE; Locate counted 0 everywhere.)"""
    ghost = f"ghost-{uid()}"
    rid = f"ex-{uid()}"
    e = stream_error(lambda: po.export_stream(SR.ExportRequest(request_id=rid, subject=subject(), customer_id=ghost), timeout=30))
    assert (e.code(), e.details()) == (SC.NOT_FOUND, "customer not found"), (e.code(), e.details())
    assert rpc_error(po.status, rid).code() == SC.NOT_FOUND  # nothing was filed
    e = rpc_error(po.locate, SR.LocateRequest(subject=subject(), customer_id=ghost), timeout=15)
    assert (e.code(), e.details()) == (SC.NOT_FOUND, "customer not found"), (e.code(), e.details())
    # a customer that exists, without data of the subject: zeros, and an empty export
    cid = register(who["admin"], "in", prefix="words")
    rep = po.locate(SR.LocateRequest(subject=subject(), customer_id=cid), timeout=15)
    assert [(c.region, c.records) for c in rep.counts] == [(r, 0) for r in REGION_ORDER], rep
    lines, manifest = po.export(request_id=f"ex-{uid()}", subject=subject(), customer_id=cid)
    assert lines == [] and manifest.complete


def _principals_file(regions, path, extra):
    """The demo principals file plus `extra` principals (name, roles, tenants, region, token)."""
    with open(f"{regions.state}/etc/principals.conf") as f:
        demo = f.read().rstrip()
    assert demo.endswith(");"), demo[-200:]
    entries = []
    for p in extra:
        tenants = ", ".join(f'"{t}"' for t in p["tenants"])
        roles = ", ".join(f'"{r}"' for r in p["roles"])
        sha = hashlib.sha256(p["token"].encode()).hexdigest()
        entries.append(
            f'  {{ name = "{p["name"]}"; roles = [ {roles} ]; tenants = [ {tenants} ]; region = "{p["region"]}"; '
            f'default_purpose = "dsr"; token_sha256 = "{sha}"; }}'
        )
    with open(path, "w") as f:
        f.write(demo[:-2].rstrip() + ",\n" + ",\n".join(entries) + "\n);\n")
    return path


def test_requests_are_visible_within_the_tenant_scope(regions, gateways, who):
    """subject_rights.proto: "A request about one customer is visible (GetRequest, ListRequests,
    ExtendDeadline) to principals whose scope holds that customer, one about every customer to
    its filer and to scope `*`; to others it does not exist (NOT_FOUND, not listed)"; "empty
    means every customer, and only a principal whose scope is `*` may send it". (GetRequest,
    ListRequests and ExtendDeadline showed any request to any privacy officer or auditor.)"""
    admin = who["admin"]
    mine, theirs = register(admin, "eu", prefix="words"), register(admin, "us", prefix="words")
    tokens = {"po": f"tok-{uid()}", "aud": f"tok-{uid()}"}
    pfile = _principals_file(regions, f"{gateways.workdir}/principals.conf", [
        {"name": f"po-{mine}", "roles": ["privacy-officer"], "tenants": [mine], "region": "eu", "token": tokens["po"]},
        {"name": f"aud-{mine}", "roles": ["auditor"], "tenants": [mine], "region": "eu", "token": tokens["aud"]},
    ])
    g = gateways.start(overrides={"principals_file": pfile}, name="scoped-dsr")
    ch = g.channel(token=None)
    for r in REGION_ORDER:
        wait_health(ch, f"domicile.region.{r}", SERVING, timeout=60)
    full = Dsr(g.channel(token="privacy-officer"))
    scoped, aud = Dsr(g.channel(token=tokens["po"])), Dsr(g.channel(token=tokens["aud"]))
    s = subject()
    filed = {
        "mine": full.erase(SR.EraseRequest(request_id=f"w-{uid()}", subject=s, customer_id=mine)).request_id,
        "theirs": full.erase(SR.EraseRequest(request_id=f"w-{uid()}", subject=s, customer_id=theirs)).request_id,
        "all": full.erase(SR.EraseRequest(request_id=f"w-{uid()}", subject=s)).request_id,
        "own": scoped.erase(SR.EraseRequest(request_id=f"w-{uid()}", subject=s, customer_id=mine)).request_id,
    }
    for rid in filed.values():
        wait_done(full, rid)
    for d in (scoped, aud):
        assert d.status(filed["mine"]).customer_id == mine and d.status(filed["own"]).request_id == filed["own"]
        for hidden in ("theirs", "all"):
            e = rpc_error(d.status, filed[hidden])
            assert (e.code(), e.details()) == (SC.NOT_FOUND, "request not found"), (hidden, e.code(), e.details())
        listed = {q.request_id for q in d.list()}
        assert {filed["mine"], filed["own"]} <= listed and not {filed["theirs"], filed["all"]} & listed, listed
        assert d.list(customer_id=theirs) == []
    e = rpc_error(scoped.extend, SR.ExtendDeadlineRequest(request_id=filed["theirs"], reason="more time"))
    assert (e.code(), e.details()) == (SC.NOT_FOUND, "request not found"), (e.code(), e.details())
    assert not full.status(filed["theirs"]).extended
    # filing: one customer in scope, never every customer
    e = rpc_error(scoped.erase, SR.EraseRequest(request_id=f"w-{uid()}", subject=s))
    assert e.code() == SC.INVALID_ARGUMENT and "customer_id" in e.details(), e.details()
    for call in (
        lambda: scoped.erase(SR.EraseRequest(request_id=f"w-{uid()}", subject=s, customer_id=theirs)),
        lambda: list(scoped.export_stream(SR.ExportRequest(request_id=f"w-{uid()}", subject=s, customer_id=theirs), timeout=30)),
        lambda: scoped.locate(SR.LocateRequest(subject=s, customer_id=theirs), timeout=15),
    ):
        e = rpc_error(call)
        assert (e.code(), e.details()) == (SC.NOT_FOUND, "customer not found"), (e.code(), e.details())


def test_list_requests_page_token_is_bound_to_its_filters(who, po):
    """common.proto: page_token "valid only with the same filters (otherwise INVALID_ARGUMENT;
    page_size may change)". (A ListRequests token was an offset accepted with any filters.)"""
    cid = register(who["admin"], "in", prefix="words")
    rids = [po.restrict(SR.RestrictProcessingRequest(request_id=f"rs-{i}-{uid()}", subject=subject(), customer_id=cid)).request_id for i in range(3)]
    first, token = po.page(customer_id=cid, page_size=1)
    assert len(first) == 1 and token
    for changed in ({"kind": SR.DSR_KIND_RESTRICT}, {"customer_id": ""}, {"state": SR.DSR_STATE_DONE}, {"due_within_days": 30}, {"overdue_only": True}):
        req = dict(customer_id=cid, page_token=token)
        req.update(changed)
        e = stream_error(lambda: po.list_stream(SR.ListRequestsRequest(**req), timeout=30))
        assert e.code() == SC.INVALID_ARGUMENT and e.details().startswith("page_token"), (changed, e.details())
    rest, token = po.page(customer_id=cid, page_size=10, page_token=token)
    assert [q.request_id for q in first + rest] == rids and token == ""


def test_list_requests_looks_at_each_regions_10000_latest(regions, who):
    """subject_rights.proto ListRequests: "Only the 10000 requests each region received last are
    looked at: older ones are not listed (GetRequest still finds them)". 10001 requests of one
    (made-up) customer are written into region `in` directly, finished there."""
    cid = f"words-cap-{uid()}"
    insert = (
        "INSERT INTO domicile.dsr_requests (request_id, kind, fingerprint, subject_key, customer_id, principal, "
        "received_at, due_at, gdpr_due_at) "
        f"SELECT {lit(cid)} || '-' || lpad(g::text, 5, '0'), 'erase', '\\x00', '\\x00', {lit(cid)}, 'words-test', "
        "now() - interval '1 hour' + g * interval '1 millisecond', now() + interval '30 days', now() + interval '30 days' "
        "FROM generate_series(0, 10000) g; "
        "INSERT INTO domicile.dsr_legs (request_id, state, finished_at) "
        f"SELECT request_id, 'done', now() FROM domicile.dsr_requests WHERE customer_id = {lit(cid)}"
    )
    regions.psql("in", insert)
    try:
        admin = Dsr(who["admin"].channel)
        listed = [q.request_id for q in admin.list(customer_id=cid, page_size=1000)]
        assert listed == [f"{cid}-{i:05d}" for i in range(1, 10001)], (len(listed), listed[:2])
        assert admin.status(f"{cid}-00000").request_id == f"{cid}-00000"
    finally:
        regions.psql("in", f"DELETE FROM domicile.dsr_legs WHERE request_id LIKE {lit(cid + '-%')}; DELETE FROM domicile.dsr_requests WHERE customer_id = {lit(cid)}")


# --------------------------------------------------------------------------------------------
# regions.proto


def test_replication_state_none_without_a_standby(regions, session_gateway):
    """regions.proto RegionStatus.replication_state: "none" when no standby is connected (the
    gateway said "no standby"). The standby of region `in` is stopped, then started again."""
    ops = Ops(session_gateway.channel(token="operator"))
    assert ops.status("in").replication_state == "sync"
    standby = next(n["node"] for n in regions.status_json() if n["region"] == "in" and n["role"] == "standby" and n["running"])
    regions.stop("in", standby)
    try:
        got = wait_until(lambda: ops.status("in"), lambda s: s.replication_state != "sync", timeout=30)
        assert got.replication_state == "none" and got.replication_lag_bytes == 0, got
    finally:
        regions.start("in", standby)
    assert wait_until(lambda: ops.status("in").replication_state, lambda v: v == "sync", timeout=60) == "sync"
