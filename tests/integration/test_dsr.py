"""
Issue 6 ("Data-subject rights across every region"): durable requests with one leg per region,
workers that run and retry the legs, erasure with crypto-shredding, export with a manifest,
restriction and objection, deadlines, and `domicilectl dsr ...`, against the three real local
regions and real gateways.

Every test makes its own customers and subjects (uuid4). Records are written by the admin
principal (region us); data-subject requests are filed by the privacy officer (region eu,
default purpose `dsr`). Legs run asynchronously in the gateways' workers: a test waits for a
request by polling GetRequest until the state it needs (conftest's wait_until), never with a
fixed sleep.

Requests that must stay unfinished (deadline extension, overdue listings, retries) are held by
a fault injected in region `in`: a trigger (schema `dsrtest`, created and dropped by this
module) makes every DELETE of a record of a listed customer fail, so the erasure leg of that
region fails and is retried with backoff until the customer is released.

The database is read directly too (`regions.psql`, superuser on each region's primary), and the
crypto-shredding test decrypts saved ciphertext itself with the region's KEK
(AES-256-GCM: format byte 0x01 || nonce(12) || ciphertext || tag(16); AAD = length-prefixed
parts, as in src/crypto/crypto.c and src/api/common.c).
"""

import base64
import calendar
import datetime
import hashlib
import json
import os
import pty
import select
import signal
import subprocess
from concurrent import futures

import grpc
import pytest

from conftest import BUILD_DIR, DOMICILE_LOCAL, NOT_SERVING, SERVING, demo_token, wait_health, wait_until
from helpers import Api, bulk_stream, get, list_once, lit, md, now_ms, paged, put, register, rpc_error, stream_stub, uid, unary_stub
from domicile.v1 import common_pb2, customers_pb2, records_pb2
from domicile.v1 import subject_rights_pb2 as SR

SC = grpc.StatusCode
DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")
OFFSET_ENV = "DOMICILE_TEST_CLOCK_OFFSET_MS"
DAY_MS = 86400000
REGION_ORDER = ("eu", "in", "us")  # region code order (legs, export, locate)
HOLD_REGION = "in"  # where the test fault holds erasures

RECEIVED = SR.DSR_STATE_RECEIVED
IN_PROGRESS = SR.DSR_STATE_IN_PROGRESS
DONE = SR.DSR_STATE_DONE
LEG_PENDING = SR.DSR_LEG_STATE_PENDING
LEG_RUNNING = SR.DSR_LEG_STATE_RUNNING
LEG_DONE = SR.DSR_LEG_STATE_DONE
LEG_FAILED = SR.DSR_LEG_STATE_FAILED
LEG_SKIPPED = SR.DSR_LEG_STATE_SKIPPED

def subject():
    return f"dsr-{uid()}@example.org"


def bytea(hexstr):
    return f"'\\x{hexstr}'::bytea"


# --------------------------------------------------------------------------------------------
# API (CustomersService and RecordsService: helpers.Api)


class Dsr:
    """SubjectRightsService on one channel. The methods answering `{ DsrRequest request = 1; }`
    (each rpc its own response type) return that DsrRequest."""

    def __init__(self, channel):
        def u(method):
            stub = unary_stub(channel, "SubjectRightsService", method, getattr(SR, f"{method}Request"), getattr(SR, f"{method}Response"))

            def call(*args, **kw):
                rep = stub(*args, **kw)
                assert rep.HasField("request"), rep
                return rep.request

            return call

        self.erase = u("Erase")
        self.restrict = u("RestrictProcessing")
        self.unrestrict = u("UnrestrictProcessing")
        self.object = u("Object")
        self.withdraw = u("Withdraw")
        self.get = u("GetRequest")
        self.extend = u("ExtendDeadline")
        self.locate = unary_stub(channel, "SubjectRightsService", "Locate", SR.LocateRequest, SR.LocateResponse)
        self.export_stream = stream_stub(channel, "SubjectRightsService", "Export", SR.ExportRequest, SR.ExportResponse)
        self.list_stream = stream_stub(channel, "SubjectRightsService", "ListRequests", SR.ListRequestsRequest, SR.ListRequestsResponse)

    def status(self, request_id):
        return self.get(SR.GetRequestRequest(request_id=request_id), timeout=15)

    def export(self, timeout=60, **kw):
        """One Export call: (chunks, lines, manifest); asserts lines then exactly one manifest."""
        chunks = list(self.export_stream(SR.ExportRequest(**kw), timeout=timeout))
        kinds = [c.WhichOneof("item") for c in chunks]
        assert kinds and kinds[-1] == "manifest" and kinds.count("manifest") == 1, kinds
        return chunks, [c.line for c in chunks[:-1]], chunks[-1].manifest

    def list(self, **filters):
        """Every request matching the filters, following next_page_token."""
        return paged(self.list_stream, SR.ListRequestsRequest, "request", max_pages=100, **filters)


@pytest.fixture(scope="module")
def admin(session_gateway):
    return Api(session_gateway.channel(token="admin"))


@pytest.fixture(scope="module")
def po(session_gateway):
    """The privacy officer on the shared gateway."""
    return Dsr(session_gateway.channel(token="privacy-officer"))


def list_records(api, cid, purpose=None, **kw):
    records = list_once(api, records_pb2.ListRecordsRequest(customer_id=cid, page_size=1000, **kw), metadata=md(purpose))
    return {r.record_id: r for r in records}


def bulk_put(api, cid, subj, n, prefix="bulk", size=64):
    def msgs():
        for i in range(n):
            yield records_pb2.PutRecordRequest(
                request_id=f"{prefix}-{uid()}",
                customer_id=cid,
                record_id=f"{prefix}-{i:05d}",
                kind="event",
                subject=subj,
                payload=(b"%05d-" % i) + b"x" * (size - 6),
                content_type="text/plain",
            )

    rep = api.bulk(bulk_stream(msgs()), timeout=300)
    assert rep.written == n and not rep.failures, rep


def legs(req):
    return {leg.region: leg for leg in req.legs}


def leg_states(req):
    return {leg.region: SR.DsrLegState.Name(leg.state) for leg in req.legs}


def wait_request(dsr, request_id, pred, timeout=30.0, what="the wanted state"):
    """GetRequest until pred(request) holds; returns that request."""

    def status():
        try:
            return dsr.status(request_id)
        except grpc.RpcError as e:
            return f"{e.code()} {e.details()}"

    def reached(r):
        return not isinstance(r, str) and pred(r)

    last = wait_until(status, reached, timeout)
    assert reached(last), f"request {request_id}: not {what} after {timeout}s; last: {last}"
    return last


def wait_done(dsr, request_id, timeout=30.0):
    return wait_request(dsr, request_id, lambda r: r.state == DONE, timeout, "DONE")


def pg(regions, region, sql):
    return regions.psql(region, sql)


def pg_json(regions, region, sql):
    """Rows of `sql` as a list of dicts (json_agg)."""
    out = pg(regions, region, f"SELECT coalesce(json_agg(t), '[]') FROM ({sql}) t")
    return json.loads(out)


def subject_rows(regions, region, sk_hex):
    """(records, data keys) of the subject in the region, every customer."""
    out = pg(
        regions,
        region,
        f"SELECT (SELECT count(*) FROM domicile.records WHERE subject_key = {bytea(sk_hex)}) || '|' || "
        f"(SELECT count(*) FROM domicile.data_keys WHERE subject_key = {bytea(sk_hex)})",
    )
    return tuple(int(x) for x in out.split("|"))


def receipt_hex(request_id, region, kind, matched, deleted, keys, finished_ms):
    """The receipt hash as regions/schema/004_dsr.sql writes it."""
    text = "|".join(["domicile-receipt-v1", request_id, region, kind, str(matched), str(deleted), str(keys), str(finished_ms)])
    return hashlib.sha256(text.encode()).hexdigest()


def add_months(ms, months):
    """Calendar months, day clamped to the month's last (31 Jan + 1 = 28/29 Feb)."""
    t = datetime.datetime.fromtimestamp(ms // 1000, tz=datetime.timezone.utc)
    m = t.month - 1 + months
    y, m = t.year + m // 12, m % 12 + 1
    d = min(t.day, calendar.monthrange(y, m)[1])
    return int(t.replace(year=y, month=m, day=d).timestamp()) * 1000 + ms % 1000


def utc(ms):
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)


def clock_at(when):
    """Env for a gateway whose clock reads `when` (an aware datetime) now."""
    return {OFFSET_ENV: str(int(when.timestamp() * 1000) - now_ms())}


def clock_shift(ms):
    return {OFFSET_ENV: str(int(ms))}


# --------------------------------------------------------------------------------------------
# decryption with the region's KEK (what a thief holding a backup and the region's token with
# its PIN could do: the KEK itself never leaves the token)


def _aad(*parts):
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def gcm_open(key, blob, aad):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert blob[0] == 0x01 and len(blob) >= 29, blob[:1]
    return AESGCM(key).decrypt(blob[1:13], blob[13:], aad)


def unwrap_in_token(regions, region, wrapped, aad):
    from tokens import RegionToken

    version = int.from_bytes(wrapped[1:5], "big")
    return RegionToken(regions, region).unwrap(f"domicile-kek-{region}.v{version}", wrapped, aad)


def decrypt_record(regions, region, cid, rid, ciphertext, wrapped, key_subject_key):
    dek = unwrap_in_token(regions, region, wrapped, _aad(b"domicile-dek-v1", region.encode(), cid.encode(), key_subject_key))
    return gcm_open(dek, ciphertext, _aad(b"domicile-record-v1", region.encode(), cid.encode(), rid.encode()))


# --------------------------------------------------------------------------------------------
# held erasures (fault injection in region HOLD_REGION)


class Holds:
    def __init__(self, regions):
        self.regions = regions

    def add(self, cid):
        pg(self.regions, HOLD_REGION, f"INSERT INTO dsrtest.held VALUES ({lit(cid)})")

    def release(self, cid):
        pg(self.regions, HOLD_REGION, f"DELETE FROM dsrtest.held WHERE customer_id = {lit(cid)}")


@pytest.fixture(scope="module")
def holds(regions):
    setup = """
        CREATE SCHEMA dsrtest;
        CREATE TABLE dsrtest.held (customer_id text PRIMARY KEY);
        CREATE FUNCTION dsrtest.hold_erasure() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM dsrtest.held h WHERE h.customer_id = OLD.customer_id) THEN
                RAISE EXCEPTION 'test fault: erasure held';
            END IF;
            RETURN OLD;
        END $$;
        CREATE TRIGGER dsrtest_hold BEFORE DELETE ON domicile.records
            FOR EACH ROW EXECUTE FUNCTION dsrtest.hold_erasure();
    """
    pg(regions, HOLD_REGION, setup)
    try:
        yield Holds(regions)
    finally:
        pg(regions, HOLD_REGION, "DROP TRIGGER IF EXISTS dsrtest_hold ON domicile.records; DROP SCHEMA IF EXISTS dsrtest CASCADE")


def held_erase(admin, dsr, holds, request_id=None, reason="held by the test"):
    """An erasure that stays IN_PROGRESS: its HOLD_REGION leg fails until released. Returns
    (customer, subject, request after the first failed attempt)."""
    cid = register(admin, HOLD_REGION, prefix="dsrhold")
    s = subject()
    put(admin, cid, "held-1", b"held", subject=s, content_type="text/plain")
    holds.add(cid)
    rid = request_id or f"held-{uid()}"
    dsr.erase(SR.EraseRequest(request_id=rid, subject=s, customer_id=cid, reason=reason), timeout=15)
    r = wait_request(
        dsr,
        rid,
        lambda q: legs(q)[HOLD_REGION].state == LEG_FAILED and all(leg.state == LEG_SKIPPED for reg, leg in legs(q).items() if reg != HOLD_REGION),
        what=f"failed in {HOLD_REGION} and skipped elsewhere",
    )
    assert r.state == IN_PROGRESS, r
    return cid, s, r


# --------------------------------------------------------------------------------------------
# 1. erasure everywhere, crypto-shredding, receipts


def test_erase_reaches_every_region_and_shreds_the_keys(regions, admin, po):
    s, other = subject(), subject()
    customers = {r: register(admin, r, prefix="dsr") for r in ("us", "eu", "in")}
    saved = {}  # region -> what a backup would have kept of one record
    expected = {}
    sk = None
    for region, cid in customers.items():
        n = {"us": 2, "eu": 3, "in": 1}[region]
        for i in range(n):
            rec = put(admin, cid, f"rec-{i}", f"{region} secret {i} of the subject \u00e9".encode(), subject=s, content_type="text/plain").record
            assert rec.has_subject and rec.region == region
            sk = sk or rec.subject_key_hex
            assert rec.subject_key_hex == sk
        put(admin, cid, "no-subject", b"customer data", content_type="text/plain")  # under the customer's own key
        put(admin, cid, "other", b"another subject", subject=other, content_type="text/plain")
        expected[region] = n
        assert subject_rows(regions, region, sk) == (n, 1)
        (row,) = pg_json(
            regions,
            region,
            "SELECT encode(r.payload, 'hex') AS ct, r.key_id, encode(k.wrapped, 'hex') AS wrapped, row_to_json(r) AS row "
            f"FROM domicile.records r JOIN domicile.data_keys k USING (key_id) WHERE r.customer_id = {lit(cid)} AND r.record_id = 'rec-0'",
        )
        ct, wrapped = bytes.fromhex(row["ct"]), bytes.fromhex(row["wrapped"])
        # The saved ciphertext decrypts with the saved key row and the KEK: this is what
        # erasure must make impossible.
        assert decrypt_record(regions, region, cid, "rec-0", ct, wrapped, bytes.fromhex(sk)) == f"{region} secret 0 of the subject \u00e9".encode()
        saved[region] = {"ct": ct, "key_id": row["key_id"], "row": row["row"]}

    t0 = now_ms()
    rid = f"erase-{uid()}"
    r = po.erase(SR.EraseRequest(request_id=rid, subject=s, reason="ticket DSR-1"), timeout=15)
    t1 = now_ms()
    assert r.request_id == rid and r.kind == SR.DSR_KIND_ERASE and r.subject_key_hex == sk
    assert r.customer_id == "" and r.reason == "ticket DSR-1" and r.principal == "privacy-officer"
    assert r.state in (RECEIVED, IN_PROGRESS, DONE), r  # legs start at once: any may be done
    assert sorted(leg.region for leg in r.legs) == list(REGION_ORDER)
    assert t0 - 1000 <= r.received_at_unix_ms <= t1 + 1000
    assert s not in str(r)  # the subject itself is never echoed

    done = wait_done(po, rid)
    assert done.completed_at_unix_ms == max(leg.finished_at_unix_ms for leg in done.legs)
    for region, leg in legs(done).items():
        assert leg.state == LEG_DONE and leg.attempts >= 1 and leg.last_error == "", leg
        rc = leg.receipt
        assert (rc.records_deleted, rc.keys_destroyed, rc.records_matched) == (expected[region], 1, expected[region]), (region, rc)
        assert rc.finished_at_unix_ms == leg.finished_at_unix_ms > 0
        # (the hashed time may be the reported one rounded up: see the strict test below)
        assert rc.receipt_sha256_hex in [
            receipt_hex(rid, region, "erase", expected[region], expected[region], 1, rc.finished_at_unix_ms + d) for d in (0, 1)
        ], (region, rc)

    for region, cid in customers.items():
        # psql finds none of the subject's rows, and no key of the subject
        assert subject_rows(regions, region, sk) == (0, 0), region
        assert pg(regions, region, f"SELECT count(*) FROM domicile.data_keys WHERE key_id = {saved[region]['key_id']}") == "0"
        left = pg_json(regions, region, f"SELECT record_id FROM domicile.records WHERE customer_id = {lit(cid)} ORDER BY 1")
        assert [x["record_id"] for x in left] == ["no-subject", "other"], region
        # ... and none of the keys that remain opens the saved ciphertext
        keys = pg_json(regions, region, f"SELECT encode(subject_key, 'hex') AS sk, encode(wrapped, 'hex') AS w FROM domicile.data_keys WHERE customer_id = {lit(cid)}")
        assert len(keys) == 2, keys  # the customer's key and the other subject's
        for k in keys:
            with pytest.raises(Exception) as ei:
                decrypt_record(regions, region, cid, "rec-0", saved[region]["ct"], bytes.fromhex(k["w"]), bytes.fromhex(k["sk"]))
            assert type(ei.value).__name__ == "InvalidTag"
        # The other records are untouched.
        assert get(admin, cid, "other").payload == b"another subject"
        assert get(admin, cid, "no-subject").payload == b"customer data"

    # A backup copy of the ciphertext row, put back: the gateway cannot read it any more.
    region, cid = "eu", customers["eu"]
    pg(regions, region, "INSERT INTO domicile.records SELECT * FROM json_populate_record(NULL::domicile.records, " f"$j${json.dumps(saved[region]['row'])}$j$::json)")
    try:
        assert subject_rows(regions, region, sk) == (1, 0)
        e = rpc_error(get, admin, cid, "rec-0")
        assert e.code() in (SC.NOT_FOUND, SC.DATA_LOSS), (e.code(), e.details())
    finally:
        pg(regions, region, f"DELETE FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = 'rec-0'")

    # The subject can come back later: a new record gets a new key.
    rec = put(admin, customers["us"], "after", b"new", subject=s, content_type="text/plain").record
    new_key = pg(regions, "us", f"SELECT key_id FROM domicile.records WHERE customer_id = {lit(customers['us'])} AND record_id = 'after'")
    assert int(new_key) != saved["us"]["key_id"] and rec.subject_key_hex == sk
    assert get(admin, customers["us"], "after").payload == b"new"


def test_erase_one_customer_only_and_skipped_legs(regions, admin, po):
    s = subject()
    c1, c2 = register(admin, "eu", prefix="dsr"), register(admin, "eu", prefix="dsr")
    put(admin, c1, "a", b"1", subject=s, content_type="text/plain")
    put(admin, c2, "b", b"2", subject=s, content_type="text/plain")
    sk = get(admin, c1, "a").subject_key_hex
    rid = f"erase-{uid()}"
    po.erase(SR.EraseRequest(request_id=rid, subject=s, customer_id=c1), timeout=15)
    done = wait_done(po, rid)
    assert done.customer_id == c1
    st = legs(done)
    assert st["eu"].state == LEG_DONE and st["eu"].receipt.records_deleted == 1 and st["eu"].receipt.keys_destroyed == 1
    for region in ("in", "us"):  # no data of the subject there: nothing to do
        assert st[region].state == LEG_SKIPPED and st[region].receipt.records_deleted == 0, st[region]
        assert len(st[region].receipt.receipt_sha256_hex) == 64
    assert subject_rows(regions, "eu", sk) == (1, 1)  # c2's record and key remain
    assert get(admin, c2, "b").payload == b"2"
    assert rpc_error(get, admin, c1, "a").code() == SC.NOT_FOUND


# --------------------------------------------------------------------------------------------
# 2. idempotency by request_id


def test_same_request_id_is_one_request(regions, admin, po):
    s = subject()
    cid = register(admin, "us", prefix="dsr")
    put(admin, cid, "r", b"x", subject=s, content_type="text/plain")
    rid = f"dup-{uid()}"
    first = po.erase(SR.EraseRequest(request_id=rid, subject=s, reason="first"), timeout=15)
    again = po.erase(SR.EraseRequest(request_id=rid, subject=s, reason="first"), timeout=15)
    assert again.request_id == rid and again.received_at_unix_ms == first.received_at_unix_ms
    done = wait_done(po, rid)
    # After completion, a retry returns the finished request and files nothing new.
    late = po.erase(SR.EraseRequest(request_id=rid, subject=s, reason="first"), timeout=15)
    assert late.state == DONE and late.received_at_unix_ms == first.received_at_unix_ms
    assert late.completed_at_unix_ms == done.completed_at_unix_ms
    for region in REGION_ORDER:
        assert pg(regions, region, f"SELECT count(*) FROM domicile.dsr_requests WHERE request_id = {lit(rid)}") == "1"
        assert pg(regions, region, f"SELECT count(*) || '|' || max(attempts) FROM domicile.dsr_legs WHERE request_id = {lit(rid)}") == "1|1"

    # Concurrent duplicates: one request.
    rid2 = f"dup-{uid()}"
    with futures.ThreadPoolExecutor(6) as pool:
        reps = list(pool.map(lambda _: po.erase(SR.EraseRequest(request_id=rid2, subject=s), timeout=15), range(6)))
    assert len({r.received_at_unix_ms for r in reps}) == 1
    wait_done(po, rid2)
    for region in REGION_ORDER:
        # one leg, run once: the receiving gateway claims it as it stores it
        assert pg(regions, region, f"SELECT count(*) || '|' || max(attempts) FROM domicile.dsr_legs WHERE request_id = {lit(rid2)}") == "1|1"

    # The same id for a different request: refused, nothing changes.
    for call, req in [
        (po.erase, SR.EraseRequest(request_id=rid, subject=subject())),
        (po.erase, SR.EraseRequest(request_id=rid, subject=s, customer_id=cid)),
        (po.restrict, SR.RestrictProcessingRequest(request_id=rid, subject=s)),
        (po.object, SR.ObjectRequest(request_id=rid, subject=s, purpose="marketing")),
    ]:
        e = rpc_error(call, req, timeout=15)
        assert e.code() == SC.INVALID_ARGUMENT and "request_id" in e.details(), (e.code(), e.details())
    assert po.status(rid).kind == SR.DSR_KIND_ERASE


def test_bad_requests_and_roles(session_gateway, admin, po):
    s = subject()
    for req in [
        SR.EraseRequest(request_id="", subject=s),
        SR.EraseRequest(request_id=f"x-{uid()}", subject=""),
        SR.EraseRequest(request_id=f"x-{uid()}", subject=s, customer_id="bad customer!"),
        SR.EraseRequest(request_id=f"x-{uid()}", subject=s, reason="r" * 1025),
        SR.EraseRequest(request_id="\x01bad", subject=s),
    ]:
        e = rpc_error(po.erase, req, timeout=15)
        assert e.code() == SC.INVALID_ARGUMENT, (req, e.code(), e.details())
    e = rpc_error(po.object, SR.ObjectRequest(request_id=f"x-{uid()}", subject=s, purpose="Bad Purpose"), timeout=15)
    assert e.code() == SC.INVALID_ARGUMENT
    e = rpc_error(po.object, SR.ObjectRequest(request_id=f"x-{uid()}", subject=s, purpose=""), timeout=15)
    assert e.code() == SC.INVALID_ARGUMENT
    e = rpc_error(po.extend, SR.ExtendDeadlineRequest(request_id=f"x-{uid()}", reason=""), timeout=15)
    assert e.code() == SC.INVALID_ARGUMENT
    assert rpc_error(po.status, f"nope-{uid()}").code() == SC.NOT_FOUND
    e = rpc_error(po.extend, SR.ExtendDeadlineRequest(request_id=f"nope-{uid()}", reason="r"), timeout=15)
    assert e.code() == SC.NOT_FOUND
    e = rpc_error(lambda: po.list(due_within_days=-1))
    assert e.code() == SC.INVALID_ARGUMENT
    # Roles: a service principal files no DSR and reads none.
    svc = Dsr(session_gateway.channel(token="service-eu"))
    for call, req in [
        (svc.erase, SR.EraseRequest(request_id=f"x-{uid()}", subject=s)),
        (svc.restrict, SR.RestrictProcessingRequest(request_id=f"x-{uid()}", subject=s)),
        (svc.locate, SR.LocateRequest(subject=s)),
    ]:
        assert rpc_error(call, req, timeout=15).code() == SC.PERMISSION_DENIED
    assert rpc_error(lambda: svc.export(request_id=f"x-{uid()}", subject=s)).code() == SC.PERMISSION_DENIED
    nobody = Dsr(session_gateway.channel(token=None))
    assert rpc_error(nobody.locate, SR.LocateRequest(subject=s), timeout=15).code() == SC.UNAUTHENTICATED


def test_unknown_customer_is_not_found(po):
    """proto: Erase ... NOT_FOUND customer_id unknown."""
    rid = f"ghost-{uid()}"
    e = rpc_error(po.erase, SR.EraseRequest(request_id=rid, subject=subject(), customer_id=f"no-such-{uid()}"), timeout=15)
    assert e.code() == SC.NOT_FOUND, (e.code(), e.details())


# --------------------------------------------------------------------------------------------
# 3. a region down when the request arrives


def test_erase_with_eu_down_completes_when_eu_returns(regions, session_gateway, admin, po):
    s = subject()
    counts = {"eu": 3, "us": 1, "in": 2}
    customers = {r: register(admin, r, prefix="dsr") for r in counts}
    for region, n in counts.items():
        for i in range(n):
            put(admin, customers[region], f"r{i}", b"payload %d" % i, subject=s, content_type="text/plain")
    sk = get(admin, customers["us"], "r0").subject_key_hex
    rid = f"outage-{uid()}"
    health = session_gateway.channel(token=None)
    regions.stop("eu")
    try:
        wait_health(health, "domicile.region.eu", NOT_SERVING, timeout=30)
        r = po.erase(SR.EraseRequest(request_id=rid, subject=s, reason="eu down"), timeout=30)
        assert r.state in (RECEIVED, IN_PROGRESS), r
        assert legs(r)["eu"].state == LEG_PENDING and legs(r)["eu"].last_error, legs(r)["eu"]
        # The reachable regions do their part; the EU leg is pending and visible.
        r = wait_request(
            po, rid, lambda q: legs(q)["us"].state == LEG_DONE and legs(q)["in"].state == LEG_DONE, what="done in us and in"
        )
        assert r.state == IN_PROGRESS and legs(r)["eu"].state == LEG_PENDING, r
        assert "unreachable" in legs(r)["eu"].last_error, legs(r)["eu"]
        for region in ("us", "in"):
            assert subject_rows(regions, region, sk) == (0, 0)
            assert pg(regions, region, f"SELECT array_to_string(missing, ',') FROM domicile.dsr_requests WHERE request_id = {lit(rid)}") == "eu"
        listed = [q for q in po.list(customer_id="", kind=SR.DSR_KIND_ERASE) if q.request_id == rid]
        assert len(listed) == 1 and listed[0].state == IN_PROGRESS

        # Locate and Export say what they cannot see.
        loc = po.locate(SR.LocateRequest(subject=s), timeout=15)
        assert list(loc.unreachable_regions) == ["eu"] and {c.region: c.records for c in loc.counts} == {"in": 0, "us": 0}
        refused_export = f"exp-{uid()}"
        e = rpc_error(lambda: po.export(request_id=refused_export, subject=s))
        assert e.code() == SC.UNAVAILABLE and '"eu"' in e.details(), (e.code(), e.details())
        _, lines, man = po.export(request_id=f"exp-{uid()}", subject=s, allow_partial=True)
        assert not man.complete and list(man.unreachable_regions) == ["eu"] and man.total_records == 0 and not lines

        # The deadline can be extended while a region is away.
        ext = po.extend(SR.ExtendDeadlineRequest(request_id=rid, reason="eu outage"), timeout=15)
        assert ext.extended and ext.extension_reason == "eu outage"
    finally:
        regions.start("eu")
    wait_health(health, "domicile.region.eu", SERVING, timeout=60)

    # No further call: the workers deliver the request to eu and run its leg there.
    done = wait_done(po, rid, timeout=60)
    eu = legs(done)["eu"]
    assert eu.state == LEG_DONE and eu.receipt.records_deleted == counts["eu"] and eu.receipt.keys_destroyed == 1, eu
    assert subject_rows(regions, "eu", sk) == (0, 0)
    for region in REGION_ORDER:
        assert pg(regions, region, f"SELECT cardinality(missing) FROM domicile.dsr_requests WHERE request_id = {lit(rid)}") == "0", region
    # The refused export, retried with the same request_id once eu is back: complete.
    _, lines, man = po.export(request_id=refused_export, subject=s)
    assert man.complete and man.total_records == 0 and not lines
    assert wait_done(po, refused_export).kind == SR.DSR_KIND_EXPORT
    # The extension recorded during the outage is still the request's.
    assert done.extended and done.extension_reason == "eu outage", done


# --------------------------------------------------------------------------------------------
# 4. a gateway killed in the middle of an erasure


class AdvisoryLock:
    """A psql session holding the exclusive advisory lock that an erasure leg takes for
    (customer, subject) in domicile.dsr_run_leg: the leg blocks inside its transaction, RUNNING
    under its claimant's lease, until the lock is released."""

    def __init__(self, regions, region, cid, sk_hex):
        self.proc = subprocess.Popen(
            [DOMICILE_LOCAL, "--state", regions.state, "psql", region, "-At", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.proc.stdin.write(f"SELECT pg_backend_pid(), pg_advisory_lock(domicile.subject_lock_key({lit(cid)}, {bytea(sk_hex)}));\n")
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert r, "psql did not take the advisory lock within 30 s"
        line = self.proc.stdout.readline().strip()
        assert line.endswith("|"), (line, self.proc.poll())
        self.pid = int(line.split("|")[0])

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def test_gateway_killed_mid_erase_completes_after_restart(regions, gateways, admin):
    region = "in"
    cid = register(admin, region, prefix="dsr")
    subjects = [subject(), subject()]
    for i, s in enumerate(subjects):
        bulk_put(admin, cid, s, 1000, prefix=f"s{i}")
    sks = [get(admin, cid, f"s{i}-00000").subject_key_hex for i in range(2)]
    assert [subject_rows(regions, region, sk) for sk in sks] == [(1000, 1), (1000, 1)]

    # A region's legs are run by that region's own gateways: g1 is an `in` gateway.
    g1 = gateways.start(name="dsr-crash-1", entry=region)
    d1 = Dsr(g1.channel(token="privacy-officer"))
    me = f":{g1.pid}:"
    locks = [AdvisoryLock(regions, region, cid, sk) for sk in sks]
    rids = [f"crash-{i}-{uid()}" for i in range(2)]
    target = None
    try:
        # Whichever worker claims the first erasure blocks on its lock. If that is not g1 (the
        # shared gateway's worker took it and is now stuck in this region), g1 is the only free
        # worker left for the second one.
        for i in range(2):
            d1.erase(SR.EraseRequest(request_id=rids[i], subject=subjects[i], customer_id=cid), timeout=15)
            r = wait_request(d1, rids[i], lambda q: legs(q)[region].state == LEG_RUNNING, what=f"RUNNING in {region}")
            if me in legs(r)[region].claimed_by:
                target = i
                break
        assert target is not None, "g1's worker claimed neither leg"
        running = legs(r)[region]
        assert running.lease_expires_at_unix_ms > 0 and running.attempts == 1
        lease = running.lease_expires_at_unix_ms
        waiting = pg(regions, region, f"SELECT count(*) FROM pg_stat_activity WHERE {locks[target].pid} = ANY(pg_blocking_pids(pid))")
        assert waiting == "1", "the leg is not blocked inside its transaction"

        g1.kill()  # SIGKILL
        assert g1.returncode == -signal.SIGKILL
        # PostgreSQL notices a vanished client only when it next talks to it; a backend waiting
        # on a lock never does. Production relies on TCP keepalives for that; here the dead
        # gateway's backend is ended the way the server would end it.
        ended = pg(regions, region, f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {locks[target].pid} = ANY(pg_blocking_pids(pid))")
        assert ended == "1"
    finally:
        for lock in locks:
            lock.release()

    g2 = gateways.start(name="dsr-crash-2", entry=region)
    d2 = Dsr(g2.channel(token="privacy-officer"))
    st = d2.status(rids[target])
    assert legs(st)[region].state == LEG_RUNNING and me in legs(st)[region].claimed_by, legs(st)[region]
    done = wait_done(d2, rids[target], timeout=90)
    leg = legs(done)[region]
    assert leg.receipt.records_deleted == 1000 and leg.receipt.keys_destroyed == 1, leg
    assert leg.attempts == 2, leg  # g1's claim, then the takeover
    assert leg.finished_at_unix_ms >= lease, (leg.finished_at_unix_ms, lease)  # not before the lease expired
    claimant = pg(regions, region, f"SELECT claimed_by FROM domicile.dsr_legs WHERE request_id = {lit(rids[target])}")
    assert me not in claimant, claimant
    for i in range(target + 1):
        wait_done(d2, rids[i], timeout=90)
        assert subject_rows(regions, region, sks[i]) == (0, 0)


# --------------------------------------------------------------------------------------------
# 5. export


def _expected_line(region, rec, payload):
    line = {
        "region": region,
        "customer_id": rec.customer_id,
        "record_id": rec.record_id,
        "kind": rec.kind,
        "content_type": rec.content_type,
        "labels": dict(sorted(rec.labels.items())),
        "version": rec.version,
        "created_at_unix_ms": rec.created_at_unix_ms,
        "updated_at_unix_ms": rec.updated_at_unix_ms,
        "restricted": rec.restricted,
    }
    textual = rec.content_type.startswith("text/") or rec.content_type.startswith("application/json")
    try:
        text = payload.decode("utf-8") if textual else None
    except UnicodeDecodeError:
        text = None
    if text is not None:
        line["payload_text"] = text
    else:
        line["payload_base64"] = base64.b64encode(payload).decode()
    return line


def check_export(lines, manifest, expected, request_id):
    """Recomputes the counts and the SHA-256 from the stream and compares with the manifest;
    checks every line against `expected` (list of (region, Record, payload) in stream order)."""
    raw = b"".join(l.line for l in lines)
    assert manifest.request_id == request_id
    assert manifest.sha256_hex == hashlib.sha256(raw).hexdigest()
    assert manifest.total_records == len(lines) == len(expected)
    assert manifest.total_bytes == len(raw)
    per = {}
    for l in lines:
        c = per.setdefault(l.region, [0, 0])
        c[0] += 1
        c[1] += len(l.line)
    assert [(c.region, c.records, c.bytes) for c in manifest.regions] == [(r, *per.get(r, [0, 0])) for r in REGION_ORDER]
    assert manifest.complete and not manifest.unreachable_regions
    for l, (region, rec, payload) in zip(lines, expected):
        assert l.line.endswith(b"\n") and l.line.count(b"\n") == 1
        pairs = json.loads(l.line, object_pairs_hook=list)
        want = _expected_line(region, rec, payload)
        assert [k for k, _ in pairs] == list(want), pairs
        got = dict(pairs)
        assert [k for k, _ in got["labels"]] == sorted(k for k, _ in got["labels"])
        got["labels"] = dict(got["labels"])
        assert got == want
        assert (l.region, l.customer_id, l.record_id) == (region, rec.customer_id, rec.record_id)


def test_export_streams_every_region_with_a_matching_manifest(regions, admin, po):
    s, other = subject(), subject()
    base = uid()
    # Two customers in eu (ids ordered the same in any collation), one in each other region.
    custs = {
        ("eu", 0): f"dsrx-{base}-a",
        ("eu", 1): f"dsrx-{base}-b",
        ("in", 0): f"dsrx-{base}-c",
        ("us", 0): f"dsrx-{base}-d",
    }
    for (region, _), cid in custs.items():
        admin.register(customers_pb2.RegisterCustomerRequest(request_id=f"reg-{uid()}", customer_id=cid, residency=region), timeout=15)
    contents = [
        ("Zeta", b"plain text \xc3\xa9\n", "text/plain; charset=utf-8", {"b": "2", "a": "1"}),
        ("alpha", b'{"json": [1, 2]}', "application/json", {}),
        ("bin", bytes(range(256)), "application/octet-stream", {"kind": "blob"}),
        ("bad-utf8", b"\xff\xfe text", "text/plain", {}),
        ("empty", b"", "", {}),
    ]
    written = []  # (region, Record, payload)
    for (region, k), cid in custs.items():
        for rid, payload, ctype, labels in contents[: 5 if (region, k) == ("eu", 0) else 2]:
            rec = put(admin, cid, rid, payload, subject=s, content_type=ctype, labels=labels).record
            written.append((region, rec, payload))
        put(admin, cid, "not-the-subject", b"x", subject=other, content_type="text/plain")
    # Stream order: region code order, then customer_id, then record_id in byte order.
    written.sort(key=lambda w: (REGION_ORDER.index(w[0]), w[1].customer_id.encode(), w[1].record_id.encode()))

    rid = f"export-{uid()}"
    t0 = now_ms()
    _, lines, man = po.export(request_id=rid, subject=s, reason="access request")
    check_export(lines, man, written, rid)
    assert man.generated_at_unix_ms >= t0 - 1000
    assert [(c.region, c.records) for c in man.regions] == [("eu", 7), ("in", 2), ("us", 2)]

    req = wait_done(po, rid, timeout=15)
    assert req.kind == SR.DSR_KIND_EXPORT and req.reason == "access request"
    assert {leg.region: leg.receipt.records_matched for leg in req.legs} == {"eu": 7, "in": 2, "us": 2}

    # Ledger: the us and in parts left their regions for the officer's (eu): logged there,
    # before they left; the eu part did not cross a border to the officer. The officer called
    # the us gateway, so the eu and in parts also passed through us: a transit each, logged
    # in their regions too (the us part was already there).
    sizes = {}
    for region, rec, payload in written:
        n, b = sizes.get(region, (0, 0))
        sizes[region] = (n + 1, b + len(payload))
    routes = {
        "us": {("us", "eu"): "us-no-restriction"},
        "in": {("in", "eu"): "dpdp-s16", ("in", "us"): "dpdp-s16"},
        "eu": {("eu", "us"): "eu-us-dpf-2023-1795"},
    }
    for region, want in routes.items():
        entries = pg_json(
            regions,
            region,
            "SELECT record_count, bytes, from_region, to_region, direction, purpose, basis_id, outcome, principal, method, "
            f"encode(subject_key, 'hex') AS sk FROM domicile.ledger WHERE request_id = {lit(rid)}",
        )
        assert {(e["from_region"], e["to_region"]) for e in entries} == set(want), (region, entries)
        for route in want:
            legs = [e for e in entries if (e["from_region"], e["to_region"]) == route]
            assert sum(e["record_count"] for e in legs) == sizes[region][0], (route, legs)
            assert sum(e["bytes"] for e in legs) == sizes[region][1], (route, legs)
        for e in entries:
            assert (e["direction"], e["purpose"], e["outcome"]) == ("read", "dsr-export", "allowed"), e
            assert (e["method"], e["principal"], e["basis_id"], e["sk"]) == (
                "Export", "privacy-officer", want[(e["from_region"], e["to_region"])], written[0][1].subject_key_hex), e

    # A retry with the same request_id streams the same export again.
    _, again, man2 = po.export(request_id=rid, subject=s, reason="access request")
    assert [l.line for l in again] == [l.line for l in lines] and man2.sha256_hex == man.sha256_hex

    # One customer only; a subject with no records: an empty, complete export.
    _, one, man3 = po.export(request_id=f"export-{uid()}", subject=s, customer_id=custs[("in", 0)])
    check_export(one, man3, [w for w in written if w[1].customer_id == custs[("in", 0)]], man3.request_id)
    _, none, man4 = po.export(request_id=f"export-{uid()}", subject=subject())
    assert not none and man4.total_records == 0 and man4.complete
    assert man4.sha256_hex == hashlib.sha256(b"").hexdigest()


def test_export_of_many_records_is_streamed_in_order(admin, po):
    """More records than one query chunk (16), with payloads near the limit: flow control and
    the chunk boundaries keep every line, in order, once."""
    s = subject()
    cid = register(admin, "us", prefix="dsr")
    big = b"y" * (512 * 1024)
    for i in range(6):
        put(admin, cid, f"big-{i}", big + b"%d" % i, subject=s, content_type="application/octet-stream")
    bulk_put(admin, cid, s, 90, prefix="small")
    _, lines, man = po.export(request_id=f"export-{uid()}", subject=s, timeout=120)
    ids = [l.record_id for l in lines]
    assert ids == sorted(ids, key=str.encode) and len(ids) == len(set(ids)) == 96
    raw = b"".join(l.line for l in lines)
    assert man.total_records == 96 and man.sha256_hex == hashlib.sha256(raw).hexdigest()
    first = json.loads(lines[0].line)
    assert base64.b64decode(first["payload_base64"]) == big + b"0"


# --------------------------------------------------------------------------------------------
# 6. restriction and objection


def test_restrict_then_unrestrict(regions, admin, po):
    s, other = subject(), subject()
    ceu, cus = register(admin, "eu", prefix="dsr"), register(admin, "us", prefix="dsr")
    for cid in (ceu, cus):
        put(admin, cid, "s1", b"subject data 1", subject=s, content_type="text/plain")
        put(admin, cid, "s2", b"subject data 2", subject=s, content_type="text/plain")
        put(admin, cid, "o1", b"other data", subject=other, content_type="text/plain")

    rid = f"restrict-{uid()}"
    r = po.restrict(SR.RestrictProcessingRequest(request_id=rid, subject=s, reason="accuracy contested"), timeout=15)
    assert r.kind == SR.DSR_KIND_RESTRICT
    done = wait_done(po, rid)
    assert {reg: leg.receipt.records_matched for reg, leg in legs(done).items()} == {"eu": 2, "in": 0, "us": 2}
    for cid in (ceu, cus):
        for rec in ("s1", "s2"):
            e = rpc_error(get, admin, cid, rec)
            assert e.code() == SC.FAILED_PRECONDITION and "restricted" in e.details(), (e.code(), e.details())
        assert get(admin, cid, "o1").payload == b"other data"
        listed = list_records(admin, cid, include_payload=True)
        for rec in ("s1", "s2"):
            assert listed[rec].restricted and listed[rec].payload == b"" and listed[rec].payload_size == 14, listed[rec]
        assert not listed["o1"].restricted and listed["o1"].payload == b"other data"
    # A record of the subject written after the restriction is stored restricted.
    new = put(admin, ceu, "s3", b"written later", subject=s, content_type="text/plain").record
    assert new.restricted
    assert rpc_error(get, admin, ceu, "s3").code() == SC.FAILED_PRECONDITION
    # Export and Locate still see them, with their payloads.
    _, lines, man = po.export(request_id=f"export-{uid()}", subject=s)
    got = [json.loads(l.line) for l in lines]
    assert len(got) == 5 and all(g["restricted"] for g in got)
    assert {g["payload_text"] for g in got} == {"subject data 1", "subject data 2", "written later"}
    loc = po.locate(SR.LocateRequest(subject=s), timeout=15)
    assert {c.region: c.records for c in loc.counts} == {"eu": 3, "in": 0, "us": 2}

    rid2 = f"unrestrict-{uid()}"
    po.unrestrict(SR.UnrestrictProcessingRequest(request_id=rid2, subject=s), timeout=15)
    done = wait_done(po, rid2)
    assert done.kind == SR.DSR_KIND_UNRESTRICT
    for cid, recs in ((ceu, ("s1", "s2", "s3")), (cus, ("s1", "s2"))):
        for rec in recs:
            got = get(admin, cid, rec)
            assert not got.restricted and got.payload
    assert pg(regions, "eu", f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(ceu)} AND restricted") == "0"

    # One customer only; then erasure reaches the restricted records.
    rid3 = f"restrict-{uid()}"
    po.restrict(SR.RestrictProcessingRequest(request_id=rid3, subject=s, customer_id=ceu), timeout=15)
    wait_done(po, rid3)
    assert rpc_error(get, admin, ceu, "s1").code() == SC.FAILED_PRECONDITION
    assert get(admin, cus, "s1").payload == b"subject data 1"
    rid4 = f"erase-{uid()}"
    po.erase(SR.EraseRequest(request_id=rid4, subject=s), timeout=15)
    done = wait_done(po, rid4)
    assert legs(done)["eu"].receipt.records_deleted == 3 and legs(done)["us"].receipt.records_deleted == 2
    assert rpc_error(get, admin, ceu, "s1").code() == SC.NOT_FOUND
    assert get(admin, ceu, "o1").payload == b"other data"


def test_object_then_withdraw(admin, po):
    s, other = subject(), subject()
    c1, c2 = register(admin, "us", prefix="dsr"), register(admin, "us", prefix="dsr")
    for cid in (c1, c2):
        put(admin, cid, "s1", b"subject data", subject=s, content_type="text/plain")
        put(admin, cid, "o1", b"other data", subject=other, content_type="text/plain")

    rid = f"object-{uid()}"
    r = po.object(SR.ObjectRequest(request_id=rid, subject=s, purpose="marketing", reason="Art. 21(2)"), timeout=15)
    assert r.kind == SR.DSR_KIND_OBJECT and r.purpose == "marketing"
    wait_done(po, rid)
    for cid in (c1, c2):
        e = rpc_error(get, admin, cid, "s1", purpose="marketing")
        assert e.code() == SC.FAILED_PRECONDITION and "objected" in e.details(), (e.code(), e.details())
        assert get(admin, cid, "s1", purpose="support").payload == b"subject data"
        assert get(admin, cid, "s1").payload == b"subject data"  # the principal's default purpose
        assert get(admin, cid, "o1", purpose="marketing").payload == b"other data"
        listed = list_records(admin, cid, purpose="marketing", include_payload=True)
        assert listed["s1"].purpose_objected and listed["s1"].payload == b"" and listed["s1"].payload_size == 12
        assert not listed["o1"].purpose_objected and listed["o1"].payload == b"other data"
        listed = list_records(admin, cid, purpose="support", include_payload=True)
        assert not listed["s1"].purpose_objected and listed["s1"].payload == b"subject data"
    rid2 = f"withdraw-{uid()}"
    po.withdraw(SR.WithdrawRequest(request_id=rid2, subject=s, purpose="marketing"), timeout=15)
    assert wait_done(po, rid2).kind == SR.DSR_KIND_WITHDRAW
    for cid in (c1, c2):
        assert get(admin, cid, "s1", purpose="marketing").payload == b"subject data"

    # An objection for one customer only.
    rid3 = f"object-{uid()}"
    po.object(SR.ObjectRequest(request_id=rid3, subject=s, customer_id=c1, purpose="analytics"), timeout=15)
    wait_done(po, rid3)
    assert rpc_error(get, admin, c1, "s1", purpose="analytics").code() == SC.FAILED_PRECONDITION
    assert get(admin, c2, "s1", purpose="analytics").payload == b"subject data"
    assert get(admin, c1, "s1", purpose="marketing").payload == b"subject data"


def test_objection_refuses_writes_for_that_purpose(admin, po):
    """proto: after Object, "reads and writes of the subject's records in scope with that
    x-purpose are refused with FAILED_PRECONDITION" (PutRecord: "or the subject objected to the
    call's purpose")."""
    s = subject()
    cid = register(admin, "us", prefix="dsr")
    put(admin, cid, "s1", b"subject data", subject=s, content_type="text/plain")
    rid = f"object-{uid()}"
    po.object(SR.ObjectRequest(request_id=rid, subject=s, purpose="marketing"), timeout=15)
    wait_done(po, rid)
    put(admin, cid, "s2", b"new", subject=s, content_type="text/plain", purpose="support")  # another purpose writes
    refused = {}
    for rec in ("s1", "s3"):  # a replace, a new record
        try:
            put(admin, cid, rec, b"written for marketing", subject=s, content_type="text/plain", purpose="marketing")
            refused[rec] = "written"
        except grpc.RpcError as e:
            refused[rec] = e.code()
    assert refused == {"s1": SC.FAILED_PRECONDITION, "s3": SC.FAILED_PRECONDITION}, refused


def test_receipt_hash_is_reproducible_from_the_reported_fields(po, admin):
    """Receipt.receipt_sha256_hex lets an auditor check a receipt kept elsewhere: it must be
    computable from the fields GetRequest reports (here: the format of 004_dsr.sql with the
    reported finished_at_unix_ms). Six legs: a rounding difference shows up in one of them."""
    s = subject()
    for region in REGION_ORDER:
        put(admin, register(admin, region, prefix="dsr"), "r", b"x", subject=s, content_type="text/plain")
    rids = [f"receipt-{uid()}" for _ in range(2)]
    po.erase(SR.EraseRequest(request_id=rids[0], subject=s), timeout=15)
    po.erase(SR.EraseRequest(request_id=rids[1], subject=subject()), timeout=15)
    bad = []
    for rid in rids:
        for leg in wait_done(po, rid).legs:
            rc = leg.receipt
            kind_counts = (rc.records_matched, rc.records_deleted, rc.keys_destroyed)
            want = receipt_hex(rid, leg.region, "erase", *kind_counts, rc.finished_at_unix_ms)
            if rc.receipt_sha256_hex != want:
                bad.append((rid, leg.region, rc.finished_at_unix_ms, rc.receipt_sha256_hex == receipt_hex(rid, leg.region, "erase", *kind_counts, rc.finished_at_unix_ms + 1)))
    assert not bad, f"receipts not reproducible (request, region, finished_at, matches finished_at+1): {bad}"


def test_locate_counts_per_region(regions, admin, po):
    s = subject()
    sizes = {"eu": [10, 20], "in": [5], "us": []}
    cids = {}
    for region, payloads in sizes.items():
        if payloads:
            cids[region] = register(admin, region, prefix="dsr")
        for i, n in enumerate(payloads):
            put(admin, cids[region], f"r{i}", b"z" * n, subject=s, content_type="text/plain")
    before = pg(regions, "us", "SELECT count(*) FROM domicile.dsr_requests")
    loc = po.locate(SR.LocateRequest(subject=s), timeout=15)
    assert sorted((c.region, c.records, c.bytes) for c in loc.counts) == [("eu", 2, 30), ("in", 1, 5), ("us", 0, 0)]
    assert not loc.unreachable_regions
    one = po.locate(SR.LocateRequest(subject=s, customer_id=cids["in"]), timeout=15)
    assert sorted((c.region, c.records) for c in one.counts) == [("eu", 0), ("in", 1), ("us", 0)]
    # Normalised subject: case and surrounding spaces do not matter.
    norm = po.locate(SR.LocateRequest(subject=f"  {s.upper()} "), timeout=15)
    assert {c.region: c.records for c in norm.counts} == {"eu": 2, "in": 1, "us": 0}
    assert pg(regions, "us", "SELECT count(*) FROM domicile.dsr_requests") == before  # files nothing


def test_legs_and_locate_counts_are_in_region_code_order(po):
    """proto: DsrRequest.legs "in region code order"; LocateResponse.counts "in region code
    order" (as the export is)."""
    s = subject()
    rid = f"order-{uid()}"
    r = po.erase(SR.EraseRequest(request_id=rid, subject=s), timeout=15)
    loc = po.locate(SR.LocateRequest(subject=s), timeout=15)
    got = {"legs": [leg.region for leg in r.legs], "locate": [c.region for c in loc.counts], "legs when done": [leg.region for leg in wait_done(po, rid).legs]}
    assert got == {k: list(REGION_ORDER) for k in got}, got


def test_finished_legs_hold_no_lease(po, admin):
    """proto: DsrLeg.claimed_by "Gateway instance holding the leg's lease while RUNNING; empty
    otherwise"; lease_expires_at_unix_ms "0 when not RUNNING"."""
    s = subject()
    put(admin, register(admin, "eu", prefix="dsr"), "r", b"x", subject=s, content_type="text/plain")
    rid = f"lease-{uid()}"
    po.erase(SR.EraseRequest(request_id=rid, subject=s), timeout=15)
    done = wait_done(po, rid)
    held = {leg.region: (leg.claimed_by, leg.lease_expires_at_unix_ms) for leg in done.legs if leg.claimed_by or leg.lease_expires_at_unix_ms}
    assert not held, held


def test_undoing_nothing_ends_skipped(po, admin):
    """proto: Unrestrict "A leg with nothing restricted ends SKIPPED"; Withdraw "A leg with no
    such objection ends SKIPPED"."""
    s = subject()
    put(admin, register(admin, "us", prefix="dsr"), "r", b"x", subject=s, content_type="text/plain")
    rids = {"unrestrict": f"unr-{uid()}", "withdraw": f"wd-{uid()}"}
    po.unrestrict(SR.UnrestrictProcessingRequest(request_id=rids["unrestrict"], subject=s), timeout=15)
    po.withdraw(SR.WithdrawRequest(request_id=rids["withdraw"], subject=s, purpose="marketing"), timeout=15)
    got = {k: leg_states(wait_done(po, rid)) for k, rid in rids.items()}
    want = {k: {r: "DSR_LEG_STATE_SKIPPED" for r in REGION_ORDER} for k in rids}
    assert got == want, got


def test_list_requests_ordered_by_received_at(admin, po):
    """proto: ListRequests streams requests "ordered by received_at_unix_ms then request_id"."""
    cid = register(admin, "us", prefix="dsr")
    first, second = f"zz-{uid()}", f"aa-{uid()}"
    for rid in (first, second):
        po.erase(SR.EraseRequest(request_id=rid, subject=subject(), customer_id=cid), timeout=15)
    got = [(q.request_id, q.received_at_unix_ms) for q in po.list(customer_id=cid)]
    assert got[0][1] < got[1][1] or got[0][0] == first, f"filed {first} then {second}; listed {got}"


# --------------------------------------------------------------------------------------------
# 7. deadlines, extension, overdue (injectable clock), retries


def test_deadlines_on_31_january_and_the_extension(regions, gateways, admin, holds):
    jan31 = datetime.datetime(2027, 1, 31, 12, 0, 0, tzinfo=datetime.timezone.utc)
    g = gateways.start(name="clock-2027-01-31", env=clock_at(jan31))
    d = Dsr(g.channel(token="privacy-officer"))

    _, _, r = held_erase(admin, d, holds, reason="held: extended")
    _, _, r2 = held_erase(admin, d, holds, reason="held: not extended")
    for q in (r, r2):
        received = utc(q.received_at_unix_ms)
        assert received.date() == datetime.date(2027, 1, 31) and received >= jan31, received
        assert utc(q.gdpr_due_at_unix_ms).date() == datetime.date(2027, 2, 28)
        assert q.gdpr_due_at_unix_ms == add_months(q.received_at_unix_ms, 1) == q.received_at_unix_ms + 28 * DAY_MS
        assert q.due_at_unix_ms == q.received_at_unix_ms + 30 * DAY_MS  # 2 March
        assert utc(q.due_at_unix_ms).date() == datetime.date(2027, 3, 2)
        assert not q.extended and q.extended_due_at_unix_ms == 0 and not q.overdue

    ext = d.extend(SR.ExtendDeadlineRequest(request_id=r.request_id, reason="complex request: 9 systems"), timeout=15)
    assert ext.extended and ext.extension_reason == "complex request: 9 systems"
    # one month + two further months: 28 Feb -> 28 Apr
    assert ext.extended_due_at_unix_ms == add_months(r.gdpr_due_at_unix_ms, 2)
    assert utc(ext.extended_due_at_unix_ms).date() == datetime.date(2027, 4, 28)
    assert ext.extended_at_unix_ms > 0
    assert (ext.due_at_unix_ms, ext.gdpr_due_at_unix_ms) == (r.due_at_unix_ms, r.gdpr_due_at_unix_ms)
    e = rpc_error(d.extend, SR.ExtendDeadlineRequest(request_id=r.request_id, reason="once more"), timeout=15)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())
    again = d.status(r.request_id)
    assert again.extension_reason == "complex request: 9 systems" and again.extended_due_at_unix_ms == ext.extended_due_at_unix_ms

    # 1 March 2027: past the GDPR month (28 Feb) though not past the policy's 30 days (2 Mar):
    # the unextended request is overdue; the extended one is not.
    mar1 = Dsr(gateways.start(name="clock-2027-03-01", env=clock_at(jan31 + datetime.timedelta(days=29))).channel(token="privacy-officer"))
    assert mar1.status(r2.request_id).overdue
    assert not mar1.status(r.request_id).overdue
    over = {q.request_id for q in mar1.list(overdue_only=True, kind=SR.DSR_KIND_ERASE)}
    assert r2.request_id in over and r.request_id not in over

    # Leap year, and the end of a year.
    for when, gdpr in [
        (datetime.datetime(2028, 1, 31, 23, 30, tzinfo=datetime.timezone.utc), datetime.date(2028, 2, 29)),
        (datetime.datetime(2027, 12, 31, 8, 0, tzinfo=datetime.timezone.utc), datetime.date(2028, 1, 31)),
        (datetime.datetime(2027, 3, 31, 8, 0, tzinfo=datetime.timezone.utc), datetime.date(2027, 4, 30)),
    ]:
        gw = Dsr(gateways.start(name=f"clock-{when.date()}", env=clock_at(when)).channel(token="privacy-officer"))
        q = gw.erase(SR.EraseRequest(request_id=f"clock-{uid()}", subject=subject()), timeout=15)
        assert utc(q.received_at_unix_ms).date() == when.date()
        assert utc(q.gdpr_due_at_unix_ms).date() == gdpr and q.gdpr_due_at_unix_ms == add_months(q.received_at_unix_ms, 1)
        assert q.due_at_unix_ms == q.received_at_unix_ms + 30 * DAY_MS


def test_overdue_and_due_within_listing(gateways, admin, po, holds):
    _, _, held = held_erase(admin, po, holds)  # received now, not done
    s = subject()
    fin = f"done-{uid()}"
    po.erase(SR.EraseRequest(request_id=fin, subject=s), timeout=15)
    wait_done(po, fin)
    # Filed 40 days ago by a gateway living then: overdue today.
    past = Dsr(gateways.start(name="clock-minus-40d", env=clock_shift(-40 * DAY_MS)).channel(token="privacy-officer"))
    _, _, old = held_erase(admin, past, holds)
    assert now_ms() - 40 * DAY_MS - 60000 < old.received_at_unix_ms < now_ms() - 40 * DAY_MS + 60000

    # Today: only the old one is overdue.
    assert po.status(old.request_id).overdue and not po.status(held.request_id).overdue
    over = {q.request_id for q in po.list(overdue_only=True)}
    assert old.request_id in over and held.request_id not in over and fin not in over
    assert all(q.overdue for q in po.list(overdue_only=True))

    # Near-due: effective deadline (the stricter of 30 days and one month) within N days.
    eff = min(held.due_at_unix_ms, held.gdpr_due_at_unix_ms)
    days_left = (eff - now_ms()) / DAY_MS
    assert 27 < days_left <= 31, days_left
    within = {q.request_id for q in po.list(due_within_days=int(days_left) + 1)}
    assert held.request_id in within and old.request_id in within and fin not in within  # overdue ones included
    within = {q.request_id for q in po.list(due_within_days=int(days_left) - 1)}
    assert held.request_id not in within and old.request_id in within

    # State filter.
    states = {q.request_id: q.state for q in po.list(state=IN_PROGRESS)}
    assert states.get(held.request_id) == IN_PROGRESS and fin not in states
    assert fin in {q.request_id for q in po.list(state=DONE, kind=SR.DSR_KIND_ERASE)}

    # 40 days on: the request filed today is overdue, the finished one never is.
    future = Dsr(gateways.start(name="clock-plus-40d", env=clock_shift(40 * DAY_MS)).channel(token="privacy-officer"))
    over = {q.request_id for q in future.list(overdue_only=True)}
    assert held.request_id in over and old.request_id in over and fin not in over
    st = future.status(held.request_id)
    assert st.overdue and st.state == IN_PROGRESS
    # Customer filter and paging.
    only = future.list(overdue_only=True, customer_id=held.customer_id)
    assert [q.request_id for q in only] == [held.request_id]
    paged = future.list(overdue_only=True, page_size=1)
    assert [q.request_id for q in paged] == [q.request_id for q in future.list(overdue_only=True)]


def test_extension_retry_with_the_same_reason_is_idempotent(admin, po, holds):
    """proto: ExtendDeadline is idempotent: repeating it with the same reason returns the
    request unchanged (a client retry after a lost answer)."""
    _, _, r = held_erase(admin, po, holds)
    first = po.extend(SR.ExtendDeadlineRequest(request_id=r.request_id, reason="two more months"), timeout=15)
    assert first.extended
    again = po.extend(SR.ExtendDeadlineRequest(request_id=r.request_id, reason="two more months"), timeout=15)
    assert again.extended_due_at_unix_ms == first.extended_due_at_unix_ms and again.extension_reason == "two more months"


def test_extension_after_the_first_month_is_refused(gateways, admin, holds, po):
    """proto: ExtendDeadline FAILED_PRECONDITION when the first month (gdpr_due_at) has passed."""
    past = Dsr(gateways.start(name="clock-minus-40d", env=clock_shift(-40 * DAY_MS)).channel(token="privacy-officer"))
    _, _, old = held_erase(admin, past, holds)
    assert old.gdpr_due_at_unix_ms < now_ms()
    e = rpc_error(po.extend, SR.ExtendDeadlineRequest(request_id=old.request_id, reason="too late"), timeout=15)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details(), po.status(old.request_id))


def test_failed_leg_is_retried_with_backoff(regions, admin, po, holds):
    cid, s, r = held_erase(admin, po, holds)
    leg = legs(r)[HOLD_REGION]
    assert leg.attempts == 1 and leg.last_error and leg.next_attempt_at_unix_ms > 0 and leg.receipt.receipt_sha256_hex == ""
    assert s not in leg.last_error
    first_next = leg.next_attempt_at_unix_ms
    r = wait_request(po, r.request_id, lambda q: legs(q)[HOLD_REGION].attempts >= 2 and legs(q)[HOLD_REGION].state == LEG_FAILED, what="failed twice")
    second_next = legs(r)[HOLD_REGION].next_attempt_at_unix_ms
    # The second wait is about twice the first: next2 - next1 = (time to the 2nd attempt
    # after next1, up to a worker period) + the longer backoff.
    gap1 = first_next - legs(r)[HOLD_REGION].started_at_unix_ms
    assert second_next - first_next >= 1.5 * gap1 - 200, (first_next, second_next, gap1)
    assert r.state == IN_PROGRESS and not r.overdue
    holds.release(cid)
    done = wait_done(po, r.request_id, timeout=60)
    leg = legs(done)[HOLD_REGION]
    assert leg.state == LEG_DONE and leg.attempts == 3 and leg.last_error == "" and leg.receipt.records_deleted == 1, leg
    assert pg(regions, HOLD_REGION, f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)}") == "0"


# --------------------------------------------------------------------------------------------
# 8. domicilectl dsr ...


@pytest.fixture(scope="module")
def ctl_env(session_gateway, tmp_path_factory):
    d = tmp_path_factory.mktemp("dsr-cli")
    token = d / "privacy-officer.token"
    token.write_text(demo_token(session_gateway.config, "privacy-officer") + "\n")
    os.chmod(token, 0o600)
    return {"addr": session_gateway.address, "token": str(token), "dir": d}


def ctl(env, *args, check=True, stdin=None, addr=None, stderr=None):
    """Runs build/domicilectl as the privacy officer; stderr=<fd> sends its stderr there."""
    e = {k: v for k, v in os.environ.items() if k not in ("DOMICILE_TOKEN", "DOMICILE_ADDR")}
    cmd = [DOMICILECTL, "--addr", addr or env["addr"], "--token-file", env["token"], *args]
    io = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.PIPE, timeout=120, env=e, **io)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout!r}\n--- stderr\n{p.stderr!r}")
    return p


def fields(out):
    """`domicilectl dsr status` output: {first word: rest}; legs as {"leg eu": ...}."""
    res = {}
    for line in out.decode().splitlines():
        key, _, rest = line.partition(" ")
        if key == "leg":
            region, _, rest = rest.strip().partition(" ")
            key = f"leg {region}"
        res[key] = rest.strip()
    return res


def test_cli_dsr_commands(regions, admin, po, ctl_env, holds):
    s = subject()
    cids = {r: register(admin, r, prefix="dsr") for r in ("eu", "in", "us")}
    for region, cid in cids.items():
        put(admin, cid, "a", f"{region} a".encode(), subject=s, content_type="text/plain")
        put(admin, cid, "b", b"\x00\x01binary", subject=s, content_type="application/octet-stream")

    # locate
    out = ctl(ctl_env, "-o", "tsv", "dsr", "locate", s).stdout.decode().splitlines()
    assert out == ["eu\t2\t12\treachable", "in\t2\t12\treachable", "us\t2\t12\treachable", "total\t6\t36\tcomplete"], out
    out = ctl(ctl_env, "-o", "tsv", "dsr", "locate", "--customer", cids["in"], "-", stdin=s.encode()).stdout.decode().splitlines()
    assert out[-1] == "total\t2\t12\tcomplete"

    # export to a file: the same lines as the API streams, mode 0600, verified
    path = ctl_env["dir"] / f"export-{uid()}.jsonl"
    p = ctl(ctl_env, "dsr", "export", s, "--output", str(path), "--reason", "cli export", "--request-id", f"cli-exp-{uid()}")
    data = path.read_bytes()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    _, lines, man = po.export(request_id=f"export-{uid()}", subject=s)
    assert data == b"".join(l.line for l in lines) and len(data.splitlines()) == 6
    assert man.sha256_hex in p.stderr.decode() and "verified" in p.stderr.decode(), p.stderr
    assert b"\r" not in p.stderr  # no progress line when stderr is not a terminal
    # to stdout, subject from stdin
    p = ctl(ctl_env, "dsr", "export", "-", stdin=s.encode() + b"\n")
    assert p.stdout == data
    # the progress line on a terminal
    master, slave = pty.openpty()
    try:
        path2 = ctl_env["dir"] / f"export-{uid()}.jsonl"
        p = ctl(ctl_env, "dsr", "export", s, "--output", str(path2), stderr=slave)
        os.close(slave)
        slave = None
        tty = b""
        while True:
            r, _, _ = select.select([master], [], [], 5)
            if not r:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
        assert path2.read_bytes() == data
        assert b"\rexport: eu 2, in 2, us 2" in tty and b"6 records" in tty and b"verified" in tty, tty
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)

    # erase, status, list
    rid = f"cli-erase-{uid()}"
    p = ctl(ctl_env, "dsr", "erase", s, "--reason", "cli ticket", "--request-id", rid)
    f = fields(p.stdout)
    assert f["request_id"] == rid and f["kind"] == "erase" and f["reason"] == "cli ticket" and f["principal"] == "privacy-officer"
    assert f["state"] in ("received", "in_progress", "done") and set(k for k in f if k.startswith("leg ")) == {"leg eu", "leg in", "leg us"}
    wait_done(po, rid)
    f = fields(ctl(ctl_env, "dsr", "status", rid).stdout)
    assert f["state"] == "done" and f["customer"].startswith("*")
    for region in ("eu", "in", "us"):
        assert f[f"leg {region}"].startswith("done, 1 attempts, matched 2, deleted 2, keys destroyed 1"), f
    lines_ = ctl(ctl_env, "-o", "tsv", "dsr", "list", "--state", "done", "--kind", "erase").stdout.decode().splitlines()
    mine = [l.split("\t") for l in lines_ if l.startswith(rid + "\t")]
    assert len(mine) == 1 and mine[0][1:3] == ["erase", "done"] and mine[0][5] == "-" and mine[0][6] == "*"
    assert mine[0][7] == "eu:done,in:done,us:done"
    assert ctl(ctl_env, "-o", "tsv", "dsr", "locate", s).stdout.decode().splitlines()[-1] == "total\t0\t0\tcomplete"
    # a done request cannot be extended: the gRPC status is the exit code (10 + code)
    p = ctl(ctl_env, "dsr", "extend", rid, "late", check=False)
    assert p.returncode == 10 + SC.FAILED_PRECONDITION.value[0], (p.returncode, p.stderr)
    assert b"FAILED_PRECONDITION" in p.stderr

    # list --overdue / --due-within / extend on a held request
    _, _, held = held_erase(admin, po, holds)
    f = fields(ctl(ctl_env, "dsr", "extend", held.request_id, "complex").stdout)
    assert f["extended_due_at"].endswith("complex)") and f["state"] == "in_progress"
    assert f[f"leg {HOLD_REGION}"].startswith(("failed, ", "running, ")), f
    ids = [l.split("\t")[0] for l in ctl(ctl_env, "-o", "tsv", "dsr", "list", "--due-within", "366", "--customer", held.customer_id).stdout.decode().splitlines()]
    assert ids == [held.request_id]
    ids = [l.split("\t")[0] for l in ctl(ctl_env, "-o", "tsv", "dsr", "list", "--overdue", "--customer", held.customer_id).stdout.decode().splitlines()]
    assert ids == []
    listed = ctl(ctl_env, "-o", "tsv", "dsr", "list", "--limit", "1").stdout.decode().splitlines()
    assert len(listed) == 1

    # restrict / unrestrict / object / withdraw
    s2 = subject()
    cid = register(admin, "us", prefix="dsr")
    put(admin, cid, "r", b"data", subject=s2, content_type="text/plain")
    for args, kind in [
        (("restrict", s2, "--customer", cid), "restrict"),
        (("unrestrict", s2, "--customer", cid), "unrestrict"),
        (("object", s2, "marketing", "--customer", cid), "object"),
        (("withdraw", s2, "marketing", "--customer", cid), "withdraw"),
    ]:
        rid = f"cli-{kind}-{uid()}"
        f = fields(ctl(ctl_env, "dsr", *args, "--request-id", rid).stdout)
        assert f["kind"] == kind and f["request_id"] == rid
        wait_done(po, rid)
        if kind == "restrict":
            assert rpc_error(get, admin, cid, "r").code() == SC.FAILED_PRECONDITION
        if kind == "object":
            assert f["purpose"] == "marketing"
            assert rpc_error(get, admin, cid, "r", purpose="marketing").code() == SC.FAILED_PRECONDITION
    assert get(admin, cid, "r", purpose="marketing").payload == b"data"

    # usage errors
    assert ctl(ctl_env, "dsr", "erase", check=False).returncode == 2
    assert ctl(ctl_env, "dsr", "list", "--state", "bogus", check=False).returncode == 2
    assert ctl(ctl_env, "dsr", "frobnicate", check=False).returncode == 2


class FakeExport:
    """A SubjectRightsService server whose Export misbehaves on request (subject = the case name)."""

    LINES = [b'{"region":"eu","n":1}\n', b'{"region":"eu","n":2}\n', b'{"region":"us","n":3}\n']

    def __init__(self):
        import grpc as g

        self.server = g.server(futures.ThreadPoolExecutor(4))
        handler = g.method_handlers_generic_handler(
            "domicile.v1.SubjectRightsService",
            {
                "Export": g.unary_stream_rpc_method_handler(
                    self.export, request_deserializer=SR.ExportRequest.FromString, response_serializer=SR.ExportResponse.SerializeToString
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def export(self, req, ctx):
        case = req.subject
        lines = list(self.LINES)
        for i, line in enumerate(lines):
            region = json.loads(line)["region"]
            yield SR.ExportResponse(line=SR.ExportLine(line=line, region=region, record_id=str(i), customer_id="c"))
        if case == "no-manifest":
            return
        if case == "fail-midway":
            ctx.abort(grpc.StatusCode.UNAVAILABLE, 'region "us" is unavailable')
        raw = b"".join(lines)
        m = SR.ExportManifest(
            request_id=req.request_id,
            regions=[common_pb2.RegionCount(region="eu", records=2, bytes=len(lines[0]) + len(lines[1])), common_pb2.RegionCount(region="us", records=1, bytes=len(lines[2]))],
            total_records=3,
            total_bytes=len(raw),
            sha256_hex=hashlib.sha256(raw).hexdigest(),
            complete=True,
        )
        if case == "bad-sha":
            m.sha256_hex = hashlib.sha256(raw + b"x").hexdigest()
        elif case == "bad-count":
            m.total_records = 4
            m.regions[1].records = 2
        elif case == "region-missing":
            del m.regions[1]
        elif case == "incomplete":
            m.complete = False
            m.unreachable_regions.append("in")
        yield SR.ExportResponse(manifest=m)

    def stop(self):
        self.server.stop(None)


def test_cli_export_verifies_the_manifest(ctl_env):
    fake = FakeExport()
    try:
        addr = f"127.0.0.1:{fake.port}"
        for case, rc, kept in [
            ("ok", 0, True),
            ("bad-sha", 5, False),
            ("bad-count", 5, False),
            ("region-missing", 5, False),
            ("no-manifest", 5, False),
            ("fail-midway", 10 + SC.UNAVAILABLE.value[0], False),
            ("incomplete", 6, True),
        ]:
            path = ctl_env["dir"] / f"fake-{case}.jsonl"
            p = ctl(ctl_env, "dsr", "export", case, "--output", str(path), addr=addr, check=False)
            assert p.returncode == rc, (case, p.returncode, p.stderr)
            assert path.exists() == kept, (case, p.stderr)
            if kept:
                assert path.read_bytes() == b"".join(FakeExport.LINES)
        p = ctl(ctl_env, "dsr", "export", "incomplete", "--output", str(ctl_env["dir"] / "x.jsonl"), addr=addr, check=False)
        assert b"INCOMPLETE" in p.stderr and b" in" in p.stderr
        p = ctl(ctl_env, "dsr", "export", "bad-sha", addr=addr, check=False)
        assert p.returncode == 5 and b"SHA-256" in p.stderr
    finally:
        fake.stop()
