"""
Issue 3 ("Residency routing"): the Records API against the three real local regions.

Every test makes its own customers (uuid4 ids), so the tests do not depend on each other or on
their order; nothing is wiped between tests. Where placement or encryption is the point, the
test reads the regions' databases directly (`regions.psql`, superuser on each primary).
"""

import concurrent.futures
import hashlib
import hmac
import os
import re
import threading
import time

import grpc
import pytest

from conftest import (
    NOT_SERVING,
    REGION_CODES,
    SERVING,
    health_check,
    wait_health,
)
from helpers import Api, assert_invalid, bulk_stream, footprint, limits_case, lit, pb_bytes, pb_label, put, register, rows, rpc_error, scalar, subject_pepper, uid
from domicile.v1 import customers_pb2, records_pb2

PutReq = records_pb2.PutRecordRequest
GetReq = records_pb2.GetRecordRequest
ListReq = records_pb2.ListRecordsRequest
DelReq = records_pb2.DeleteRecordRequest
SC = grpc.StatusCode

PAYLOAD_MAX = 1048576

# --------------------------------------------------------------------------------------------
# local helpers


def list_page(api, timeout=30, **kw):
    """One ListRecords call: (records, next_page_token). Checks the stream's shape: records,
    then exactly one `end`, last."""
    items = list(api.list(ListReq(**kw), timeout=timeout))
    kinds = [m.WhichOneof("item") for m in items]
    assert kinds and kinds[-1] == "end" and kinds.count("end") == 1, kinds
    assert set(kinds[:-1]) <= {"record"}, kinds
    return [m.record for m in items[:-1]], items[-1].end.next_page_token


def with_raw_field(msg, field, data):
    """`msg` serialized, then `field` again with raw `data`: for a singular field the last
    occurrence wins on the wire, so the receiver sees `data`."""
    return msg.SerializeToString() + pb_bytes(field, data)


# --------------------------------------------------------------------------------------------
# 1. placement


def test_region_identity_of_each_primary(regions):
    """The databases the tests inspect are the regions they claim to be."""
    for region in REGION_CODES:
        assert scalar(regions, region, "SELECT code FROM domicile.region_identity") == region


def test_placement_each_region_holds_exactly_its_own_customers_records(regions, api):
    custs = {r: register(api, r) for r in REGION_CODES}
    msgs = []
    for i in range(100):
        for r, cid in custs.items():  # interleaved: one stream, each message routed on its own
            msgs.append(
                PutReq(
                    request_id=f"place-{i}",
                    customer_id=cid,
                    record_id=f"rec-{i:03d}",
                    kind="note",
                    subject=f"user{i}@example.com" if i % 2 else "",
                    payload=f"{r}:{i}".encode(),
                )
            )
    rep = api.bulk(bulk_stream(iter(msgs)), timeout=120)
    assert (rep.written, rep.created, rep.replayed, list(rep.failures)) == (300, 300, 0, [])

    ids = ", ".join(lit(c) for c in custs.values())
    for region in REGION_CODES:
        own = custs[region]
        got = dict(
            rows(regions, region, f"SELECT customer_id, count(*) FROM domicile.records WHERE customer_id IN ({ids}) GROUP BY 1")
        )
        assert got == {own: "100"}, f"records in {region}: {got}"
        got = rows(regions, region, f"SELECT customer_id, residency, state FROM domicile.customers WHERE customer_id IN ({ids})")
        assert got == [[own, region, "active"]], f"customers in {region}: {got}"
        for table in ("data_keys", "idempotency"):
            got = {r[0] for r in rows(regions, region, f"SELECT customer_id FROM domicile.{table} WHERE customer_id IN ({ids})")}
            assert got == {own}, f"{table} in {region}: {got}"
        # Every record of the region's own customer: ids rec-000..rec-099, nothing else.
        got = [r[0] for r in rows(regions, region, f"SELECT record_id FROM domicile.records WHERE customer_id = {lit(own)} ORDER BY 1")]
        assert got == [f"rec-{i:03d}" for i in range(100)]

    for r, cid in custs.items():
        rec = api.get(GetReq(customer_id=cid, record_id="rec-042"), timeout=10).record
        assert (rec.region, rec.payload, rec.version) == (r, f"{r}:42".encode(), 1)


# --------------------------------------------------------------------------------------------
# 2. encryption at rest


def _dump_all_tables(regions, region):
    tables = scalar(regions, region, "SELECT tablename FROM pg_tables WHERE schemaname = 'domicile' ORDER BY 1").split()
    assert {"records", "data_keys", "customers", "idempotency"} <= set(tables), tables
    return {t: regions.psql(region, f"COPY (SELECT * FROM domicile.{t}) TO STDOUT") for t in tables}


def test_payload_and_subject_never_stored_in_clear(regions, api, gateway):
    marker = f"MARKER-{uid()}"
    subject = f"alice-{uid()}@example.com"
    payload = f"confidential {marker} end".encode()
    binary = bytes(range(256)) + marker.encode() + b"\x00\xff"
    written = {}
    for region in REGION_CODES:
        cid = register(api, region)
        # The subject as a caller might send it: other case, surrounding blanks.
        r1 = put(api, cid, "with-subject", payload, subject=f"  {subject.upper()} ", content_type="text/plain")
        r2 = put(api, cid, "no-subject", binary, content_type="application/octet-stream")
        r3 = put(api, cid, "same-subject", b"x", subject=subject)
        assert r1.record.has_subject and not r2.record.has_subject
        assert r1.record.subject_key_hex == r3.record.subject_key_hex  # normalised before HMAC
        written[region] = (cid, r1.record.subject_key_hex)

    pepper = subject_pepper(regions)
    expected_key = hmac.new(pepper, subject.encode(), hashlib.sha256).hexdigest()
    for region, (cid, sk_hex) in written.items():
        assert sk_hex == expected_key
        rec = api.get(GetReq(customer_id=cid, record_id="with-subject"), timeout=10).record
        assert rec.payload == payload and rec.payload_size == len(payload)
        assert rec.subject_key_hex == expected_key and rec.has_subject
        assert api.get(GetReq(customer_id=cid, record_id="no-subject"), timeout=10).record.payload == binary
        col = rows(
            regions,
            region,
            f"SELECT encode(subject_key, 'hex'), payload_size, length(payload) FROM domicile.records "
            f"WHERE customer_id = {lit(cid)} AND record_id = 'with-subject'",
        )
        assert col[0][0] == sk_hex, (col, sk_hex)
        # AES-GCM: at least nonce (12) + tag (16) more than the clear text.
        assert int(col[0][1]) == len(payload)
        assert int(col[0][2]) >= len(payload) + 28, col
        # The subject's own data key, besides the customer's.
        keys = rows(regions, region, f"SELECT 'k:' || encode(subject_key, 'hex') FROM domicile.data_keys WHERE customer_id = {lit(cid)} ORDER BY 1")
        assert sorted(k[0] for k in keys) == sorted(["k:", "k:" + sk_hex]), keys

    needles = {
        "marker": marker,
        "marker (hex)": marker.encode().hex(),
        "subject": subject,
        "subject (hex)": subject.encode().hex(),
        "SUBJECT": subject.upper(),
        "SUBJECT (hex)": subject.upper().encode().hex(),
    }
    for region in REGION_CODES:
        cid = written[region][0]
        dump = _dump_all_tables(regions, region)
        # The dumps are real: the customer's rows and its subject key are in them.
        assert cid in dump["customers"] and cid in dump["records"] and "with-subject" in dump["records"]
        assert written[region][1] in dump["records"]
        for table, text in dump.items():
            low = text.lower()
            for what, needle in needles.items():
                assert needle.lower() not in low, f"{what} found in {region}.{table}"

    # Nor in any log line: the gateway's, or the PostgreSQL servers'.
    for what, needle in needles.items():
        assert needle not in gateway.log, f"{what} found in the gateway log"
    for path in regions.pg_logs():
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace").lower()
        for what, needle in needles.items():
            assert needle.lower() not in text, f"{what} found in {path}"


def test_same_payload_encrypts_differently_each_time(regions, api):
    cid = register(api, "eu")
    for rid in ("a", "b"):
        put(api, cid, rid, b"identical clear text")
    put(api, cid, "a", b"identical clear text")  # a replace seals again
    cts = rows(regions, "eu", f"SELECT record_id, encode(payload, 'hex') FROM domicile.records WHERE customer_id = {lit(cid)} ORDER BY 1")
    assert [r[0] for r in cts] == ["a", "b"]
    assert cts[0][1] != cts[1][1]
    assert b"identical clear text".hex() not in cts[0][1] + cts[1][1]


# --------------------------------------------------------------------------------------------
# 3. ciphertext moved between rows does not decrypt


def _ct_hex(regions, region, cid, rid):
    return scalar(regions, region, f"SELECT encode(payload, 'hex') FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = {lit(rid)}")


def _set_ct(regions, region, cid, rid, hex_ct, key_id=None):
    extra = f", key_id = {int(key_id)}" if key_id is not None else ""
    out = regions.psql(
        region,
        f"UPDATE domicile.records SET payload = decode({lit(hex_ct)}, 'hex'){extra} "
        f"WHERE customer_id = {lit(cid)} AND record_id = {lit(rid)} RETURNING 1",
    )
    assert out.splitlines()[0] == "1", out


def _assert_data_loss(api, cid, rid, secret):
    e = rpc_error(api.get, GetReq(customer_id=cid, record_id=rid), timeout=10)
    assert e.code() == SC.DATA_LOSS, (e.code(), e.details())
    assert "authenticat" in e.details(), e.details()
    leaked = [secret.decode(), secret.hex()]
    carried = e.details() + repr(e.trailing_metadata() or ()) + repr(e.initial_metadata() or ())
    for s in leaked:
        assert s not in carried


def test_ciphertext_copied_onto_another_row_does_not_decrypt(regions, api, gateway):
    c1 = register(api, "us")
    c2 = register(api, "us")
    secret_a = f"A-secret-{uid()}".encode()
    put(api, c1, "rec-a", secret_a)
    put(api, c1, "rec-b", b"B's own data")
    put(api, c2, "rec-c", b"C's own data")
    ct_a = _ct_hex(regions, "us", c1, "rec-a")
    ct_b = _ct_hex(regions, "us", c1, "rec-b")
    ct_c = _ct_hex(regions, "us", c2, "rec-c")

    # Same customer, same data key: only the AAD (record id) can tell.
    regions.psql(
        "us",
        f"UPDATE domicile.records SET payload = (SELECT payload FROM domicile.records "
        f"WHERE customer_id = {lit(c1)} AND record_id = 'rec-a') "
        f"WHERE customer_id = {lit(c1)} AND record_id = 'rec-b'",
    )
    assert _ct_hex(regions, "us", c1, "rec-b") == ct_a
    _assert_data_loss(api, c1, "rec-b", secret_a)
    assert api.get(GetReq(customer_id=c1, record_id="rec-a"), timeout=10).record.payload == secret_a
    assert "does not authenticate" in gateway.log
    assert secret_a.decode() not in gateway.log

    # ListRecords with payloads fails rather than stream A's data as B's.
    stream = api.list(ListReq(customer_id=c1, include_payload=True), timeout=10)
    seen = []
    with pytest.raises(grpc.RpcError) as ei:
        for m in stream:
            seen.append(m)
    assert ei.value.code() == SC.DATA_LOSS, (ei.value.code(), ei.value.details())
    assert all(secret_a not in m.record.payload or m.record.record_id == "rec-a" for m in seen), seen
    assert not any(m.record.record_id == "rec-b" for m in seen)
    # Without payloads nothing is decrypted: the listing works.
    recs, _ = list_page(api, customer_id=c1)
    assert [r.record_id for r in recs] == ["rec-a", "rec-b"] and all(not r.payload for r in recs)

    # Another customer, same region: the ciphertext alone, then with A's key id too.
    _set_ct(regions, "us", c2, "rec-c", ct_a)
    _assert_data_loss(api, c2, "rec-c", secret_a)
    key_a = scalar(regions, "us", f"SELECT key_id FROM domicile.records WHERE customer_id = {lit(c1)} AND record_id = 'rec-a'")
    _set_ct(regions, "us", c2, "rec-c", ct_a, key_id=key_a)
    _assert_data_loss(api, c2, "rec-c", secret_a)

    # Another region: an EU ciphertext written over a US row.
    ce = register(api, "eu")
    secret_e = f"E-secret-{uid()}".encode()
    put(api, ce, "rec-b", secret_e)
    _set_ct(regions, "us", c1, "rec-b", _ct_hex(regions, "eu", ce, "rec-b"))
    _assert_data_loss(api, c1, "rec-b", secret_e)

    # Put back, the rows' own ciphertexts decrypt again: the failures were the copies.
    key_c = scalar(regions, "us", f"SELECT key_id FROM domicile.data_keys WHERE customer_id = {lit(c2)} AND subject_key = ''::bytea")
    _set_ct(regions, "us", c1, "rec-b", ct_b)
    _set_ct(regions, "us", c2, "rec-c", ct_c, key_id=key_c)
    assert api.get(GetReq(customer_id=c1, record_id="rec-b"), timeout=10).record.payload == b"B's own data"
    assert api.get(GetReq(customer_id=c2, record_id="rec-c"), timeout=10).record.payload == b"C's own data"


# --------------------------------------------------------------------------------------------
# 4. a region outage


def _timed(fn, *args, **kw):
    t0 = time.monotonic()
    try:
        return fn(*args, **kw), None, time.monotonic() - t0
    except grpc.RpcError as e:
        return None, e, time.monotonic() - t0


def test_eu_outage_fails_eu_calls_fast_and_leaves_us_and_in_serving(regions, gateways, channel):
    gw = gateways.start(name="outage")
    ch = gw.channel()
    api = Api(ch)
    pid = gw.pid
    for r in REGION_CODES:
        wait_health(ch, f"domicile.region.{r}", SERVING, timeout=30)
    cu, ce, ci = (register(api, r) for r in REGION_CODES)
    put(api, ce, "before", b"eu before the outage", request_id="eu-before")
    deadline_s = 5.0

    # US and IN traffic from before the stop until after the restart: none of it may fail.
    done = threading.Event()
    background = {"ok": 0, "errors": []}

    def us_and_in_traffic():
        n = 0
        while not done.is_set():
            for cid in (cu, ci):
                rid = f"bg-{n}"
                try:
                    put(api, cid, rid, b"bg", timeout=deadline_s)
                    assert api.get(GetReq(customer_id=cid, record_id=rid), timeout=deadline_s).record.payload == b"bg"
                    background["ok"] += 1
                except (grpc.RpcError, AssertionError) as e:
                    background["errors"].append((cid, rid, repr(e)))
            n += 1

    traffic = threading.Thread(target=us_and_in_traffic, daemon=True)
    traffic.start()
    stopped = False
    try:
        regions.stop("eu")
        stopped = True
        wait_health(ch, "domicile.region.eu", NOT_SERVING, timeout=30)

        def eu_call_fails(fn, req):
            _, e, took = _timed(fn, req, timeout=deadline_s)
            assert e is not None, f"{fn} succeeded with eu down"
            assert e.code() == SC.UNAVAILABLE, (e.code(), e.details(), took)
            assert took < deadline_s, f"UNAVAILABLE only after {took:.2f}s"
            return e

        failed_put = PutReq(request_id="eu-during", customer_id=ce, record_id="during", kind="note", payload=b"eu during")
        for i in range(20):
            # EU: refused, fast, every time (not only once the pool has noticed).
            eu_call_fails(api.put, failed_put)
            eu_call_fails(api.get, GetReq(customer_id=ce, record_id="before"))
            # US and IN: served throughout.
            for cid in (cu, ci):
                rep, e, took = _timed(put, api, cid, f"during-{i}", f"{cid}:{i}".encode(), timeout=deadline_s)
                assert e is None, (cid, i, e.code(), e.details())
                assert rep.record.version == 1
                rec, e, took = _timed(api.get, GetReq(customer_id=cid, record_id=f"during-{i}"), timeout=deadline_s)
                assert e is None, (cid, i, e.code(), e.details())
                assert rec.record.payload == f"{cid}:{i}".encode()
        eu_call_fails(api.delete, DelReq(request_id="eu-del", customer_id=ce, record_id="before"))
        eu_call_fails(api.get_customer, customers_pb2.GetCustomerRequest(customer_id=ce))
        e = rpc_error(lambda: list(api.list(ListReq(customer_id=ce), timeout=deadline_s)))
        assert e.code() == SC.UNAVAILABLE, (e.code(), e.details())
        for r in ("us", "in"):
            assert health_check(ch, f"domicile.region.{r}") == SERVING

        # A registration needs every region's answer: refused, and nothing left behind.
        for residency in ("us", "eu", "in"):
            new = f"new-{residency}-{uid()}"
            e = eu_call_fails(
                api.register,
                customers_pb2.RegisterCustomerRequest(request_id=f"reg-{uid()}", customer_id=new, residency=residency),
            )
            for r in ("us", "in"):
                assert footprint(regions, r, new) == dict(customers=0, records=0, data_keys=0, idempotency=0), (residency, r)

        regions.start("eu")
        stopped = False
        wait_health(ch, "domicile.region.eu", SERVING, timeout=60)
        assert gw.alive() and gw.pid == pid
        # The refused write, retried with its request_id: written once, now.
        rep = api.put(failed_put, timeout=deadline_s)
        assert (rep.created, rep.replayed, rep.record.version, rep.record.region) == (True, False, 1, "eu")
        assert api.get(GetReq(customer_id=ce, record_id="during"), timeout=deadline_s).record.payload == b"eu during"
        assert api.get(GetReq(customer_id=ce, record_id="before"), timeout=deadline_s).record.payload == b"eu before the outage"
        rep = put(api, ce, "after", b"eu after", timeout=deadline_s)
        assert rep.record.region == "eu"
    finally:
        done.set()
        traffic.join(timeout=60)
        if stopped:
            regions.start("eu")
        # The session gateway lost eu too: the next tests need it back.
        wait_health(channel, "domicile.region.eu", SERVING, timeout=60)
    assert gw.alive() and gw.pid == pid
    assert not traffic.is_alive()
    assert background["errors"] == [], background["errors"][:5]
    assert background["ok"] >= 40, background

    # Nothing meant for EU went anywhere else.
    for r in ("us", "in"):
        assert footprint(regions, r, ce) == dict(customers=0, records=0, data_keys=0, idempotency=0), r
    got = [x[0] for x in rows(regions, "eu", f"SELECT record_id FROM domicile.records WHERE customer_id = {lit(ce)} ORDER BY 1")]
    assert got == ["after", "before", "during"]
    for cid, region in ((cu, "us"), (ci, "in")):
        got = int(scalar(regions, region, f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id LIKE 'during-%'"))
        assert got == 20, (region, got)


# --------------------------------------------------------------------------------------------
# 5. idempotency


def test_put_retry_with_same_request_id_replays_and_writes_nothing(regions, api):
    cid = register(api, "in")
    req = PutReq(request_id="r-1", customer_id=cid, record_id="doc", kind="note", payload=b"first", labels={"a": "1"})
    first = api.put(req, timeout=10)
    assert (first.created, first.replayed, first.record.version) == (True, False, 1)

    def row():
        return rows(
            regions,
            "in",
            f"SELECT version, encode(payload, 'hex'), updated_at FROM domicile.records WHERE customer_id = {lit(cid)}",
        )

    before = row()
    assert len(before) == 1 and before[0][0] == "1"
    again = api.put(req, timeout=10)
    assert again.replayed and again.created
    assert again.record.version == 1
    assert again.record.created_at_unix_ms == first.record.created_at_unix_ms
    assert again.record.updated_at_unix_ms == first.record.updated_at_unix_ms
    assert row() == before

    # Same request_id, other content: refused, row unchanged.
    for change in (dict(payload=b"second"), dict(record_id="other"), dict(labels={"a": "2"}), dict(expected_version=0)):
        r2 = PutReq()
        r2.CopyFrom(req)
        for k, v in change.items():
            if k == "labels":
                r2.labels.clear()
                r2.labels.update(v)
            else:
                setattr(r2, k, v)
        e = rpc_error(api.put, r2, timeout=10)
        assert_invalid(e, "request_id")
    assert row() == before
    assert int(scalar(regions, "in", f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)}")) == 1

    # A later write, then the first request again: the first result, nothing written.
    second = put(api, cid, "doc", b"second")
    assert second.record.version == 2 and not second.created
    replay = api.put(req, timeout=10)
    assert replay.replayed and replay.record.version == 1
    assert api.get(GetReq(customer_id=cid, record_id="doc"), timeout=10).record.payload == b"second"
    assert rows(regions, "in", f"SELECT version FROM domicile.records WHERE customer_id = {lit(cid)}") == [["2"]]


def test_concurrent_duplicates_write_once(regions, api):
    cid = register(api, "us")
    req = PutReq(request_id="dup", customer_id=cid, record_id="x", kind="note", payload=b"once")
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        reps = list(ex.map(lambda _: api.put(req, timeout=15), range(16)))
    assert sum(not r.replayed for r in reps) == 1, [r.replayed for r in reps]
    assert {r.record.version for r in reps} == {1}
    assert rows(regions, "us", f"SELECT version FROM domicile.records WHERE customer_id = {lit(cid)}") == [["1"]]


def test_delete_retry_with_same_request_id_replays(regions, api):
    cid = register(api, "eu")
    put(api, cid, "doc", b"v1", request_id="put-1")
    put(api, cid, "doc", b"v2")
    req = DelReq(request_id="del-1", customer_id=cid, record_id="doc")
    first = api.delete(req, timeout=10)
    assert (first.deleted, first.version, first.replayed) == (True, 2, False)
    again = api.delete(req, timeout=10)
    assert (again.deleted, again.version, again.replayed) == (True, 2, True)
    assert footprint(regions, "eu", cid)["records"] == 0
    # The record comes back; the old delete, retried, must not delete it again.
    put(api, cid, "doc", b"reborn")
    again = api.delete(req, timeout=10)
    assert again.replayed and again.deleted
    assert api.get(GetReq(customer_id=cid, record_id="doc"), timeout=10).record.payload == b"reborn"
    # Same request_id, other request; a PutRecord's request_id reused for a delete.
    assert_invalid(rpc_error(api.delete, DelReq(request_id="del-1", customer_id=cid, record_id="other"), timeout=10), "request_id")
    assert_invalid(rpc_error(api.delete, DelReq(request_id="put-1", customer_id=cid, record_id="doc"), timeout=10), "request_id")
    assert rows(regions, "eu", f"SELECT version FROM domicile.records WHERE customer_id = {lit(cid)}") == [["1"]]
    # Deleting what does not exist succeeds with deleted = false.
    gone = api.delete(DelReq(request_id="del-2", customer_id=cid, record_id="never"), timeout=10)
    assert (gone.deleted, gone.version) == (False, 0)
    assert rpc_error(api.get, GetReq(customer_id=cid, record_id="never"), timeout=10).code() == SC.NOT_FOUND


# --------------------------------------------------------------------------------------------
# 6. optimistic concurrency


def test_expected_version(regions, api):
    cid = register(api, "in")

    def version_in_db():
        return rows(regions, "in", f"SELECT version FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = 'doc'")

    r = put(api, cid, "doc", b"v1", expected_version=0)
    assert (r.created, r.record.version) == (True, 1)
    e = rpc_error(put, api, cid, "doc", b"again", expected_version=0)
    assert e.code() == SC.FAILED_PRECONDITION and "1" in e.details(), (e.code(), e.details())
    r = put(api, cid, "doc", b"v2", expected_version=1)
    assert (r.created, r.record.version) == (False, 2)
    e = rpc_error(put, api, cid, "doc", b"v?", expected_version=5)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())
    assert re.search(r"\b2\b", e.details()) and "5" in e.details(), e.details()
    e = rpc_error(put, api, cid, "new", b"x", expected_version=3)
    assert e.code() == SC.FAILED_PRECONDITION and re.search(r"\b0\b", e.details()), (e.code(), e.details())
    assert_invalid(rpc_error(put, api, cid, "doc", b"x", expected_version=-1), "expected_version")
    assert version_in_db() == [["2"]]
    assert api.get(GetReq(customer_id=cid, record_id="doc"), timeout=10).record.payload == b"v2"
    # unconditional replace
    assert put(api, cid, "doc", b"v3").record.version == 3

    # DeleteRecord: 0 is refused, a mismatch is a precondition failure, a match deletes.
    assert_invalid(rpc_error(api.delete, DelReq(request_id=uid(), customer_id=cid, record_id="doc", expected_version=0), timeout=10), "expected_version")
    e = rpc_error(api.delete, DelReq(request_id=uid(), customer_id=cid, record_id="doc", expected_version=2), timeout=10)
    assert e.code() == SC.FAILED_PRECONDITION and re.search(r"\b3\b", e.details()), (e.code(), e.details())
    e = rpc_error(api.delete, DelReq(request_id=uid(), customer_id=cid, record_id="nothing", expected_version=1), timeout=10)
    assert e.code() == SC.FAILED_PRECONDITION, (e.code(), e.details())
    assert version_in_db() == [["3"]]
    d = api.delete(DelReq(request_id=uid(), customer_id=cid, record_id="doc", expected_version=3), timeout=10)
    assert (d.deleted, d.version) == (True, 3)
    assert version_in_db() == []
    # and a new record after a delete starts again at version 1
    assert put(api, cid, "doc", b"again", expected_version=0).record.version == 1


# --------------------------------------------------------------------------------------------
# 7. limits


@pytest.fixture
def limits_customer(api):
    """A US customer of one test that no valid write ever touches: after any refused call its
    footprint must still be the directory row alone."""
    return register(api, "us", cid=f"lim-{uid()}")


def _put_base(cid):
    return PutReq(request_id=f"lim-{uid()}", customer_id=cid, record_id="rec", kind="note", payload=b"p")


def _put_case(**change):
    def build(cid):
        m = _put_base(cid)
        for k, v in change.items():
            if k == "labels":
                m.labels.update(v)
            else:
                setattr(m, k, v)
        return m.SerializeToString()

    return build


def _put_raw(field, data):
    return lambda cid: with_raw_field(_put_base(cid), field, data)


def _put_raw_label(key, value):
    return lambda cid: _put_base(cid).SerializeToString() + pb_label(8, key, value)


# (case id, body builder, field named, limit named)
PUT_LIMITS = [
    ("request_id-empty", _put_case(request_id=""), "request_id", 128),
    ("request_id-129", _put_case(request_id="r" * 129), "request_id", 128),
    ("request_id-non-ascii", _put_case(request_id="réq"), "request_id", 128),
    ("request_id-control", _put_case(request_id="a\tb"), "request_id", 128),
    ("request_id-del", _put_case(request_id="a\x7fb"), "request_id", 128),
    ("request_id-invalid-utf8", _put_raw(1, b"r\xff"), "request_id", "UTF-8"),
    ("request_id-nul", _put_case(request_id="r\x00x"), "request_id", "UTF-8"),
    ("customer_id-empty", _put_case(customer_id=""), "customer_id", 128),
    ("customer_id-129", _put_case(customer_id="c" * 129), "customer_id", 128),
    ("customer_id-slash", _put_case(customer_id="a/b"), "customer_id", 128),
    ("customer_id-space", _put_case(customer_id="a b"), "customer_id", 128),
    ("customer_id-non-ascii", _put_case(customer_id="cüst"), "customer_id", 128),
    ("customer_id-invalid-utf8", _put_raw(2, b"c\xc3"), "customer_id", "UTF-8"),
    ("customer_id-nul", lambda cid: _put_case(customer_id=cid + "\x00x")(cid), "customer_id", "UTF-8"),
    ("record_id-empty", _put_case(record_id=""), "record_id", 256),
    ("record_id-257-bytes", _put_case(record_id="é" * 128 + "x"), "record_id", 256),
    ("record_id-control", _put_case(record_id="a\x01b"), "record_id", 256),
    ("record_id-newline", _put_case(record_id="a\nb"), "record_id", 256),
    ("record_id-del", _put_case(record_id="a\x7fb"), "record_id", 256),
    ("record_id-nul", _put_case(record_id="rec\x00hidden"), "record_id", "UTF-8"),
    ("record_id-invalid-utf8-ff", _put_raw(3, b"rec\xff"), "record_id", "UTF-8"),
    ("record_id-invalid-utf8-overlong", _put_raw(3, b"rec\xc0\xaf"), "record_id", "UTF-8"),
    ("record_id-invalid-utf8-surrogate", _put_raw(3, b"rec\xed\xa0\x80"), "record_id", "UTF-8"),
    ("record_id-invalid-utf8-truncated", _put_raw(3, b"rec\xe2\x82"), "record_id", "UTF-8"),
    ("record_id-invalid-utf8-above-10ffff", _put_raw(3, b"rec\xf4\x90\x80\x80"), "record_id", "UTF-8"),
    ("kind-empty", _put_case(kind=""), "kind", 64),
    ("kind-65", _put_case(kind="k" * 65), "kind", 64),
    ("kind-upper", _put_case(kind="Note"), "kind", 64),
    ("kind-space", _put_case(kind="a b"), "kind", 64),
    ("kind-colon", _put_case(kind="a:b"), "kind", 64),
    ("kind-invalid-utf8", _put_raw(4, b"k\xff"), "kind", "UTF-8"),
    ("kind-nul", _put_case(kind="note\x00x"), "kind", "UTF-8"),
    ("subject-321-bytes", _put_case(subject="s" * 321), "subject", 320),
    ("subject-blank", _put_case(subject="   "), "subject", 320),
    ("subject-invalid-utf8", _put_raw(5, b"alice\xff@example.com"), "subject", "UTF-8"),
    ("subject-nul", _put_case(subject="bob@example.com\x00mallory@example.com"), "subject", "UTF-8"),
    ("payload-1048577", _put_case(payload=b"\0" * (PAYLOAD_MAX + 1)), "payload", PAYLOAD_MAX),
    ("content_type-129", _put_case(content_type="t" * 129), "content_type", 128),
    ("content_type-control", _put_case(content_type="text/plain\n"), "content_type", 128),
    ("content_type-non-ascii", _put_case(content_type="text/plaîn"), "content_type", 128),
    ("content_type-invalid-utf8", _put_raw(7, b"text\xff"), "content_type", "UTF-8"),
    ("content_type-nul", _put_case(content_type="text/plain\x00x"), "content_type", "UTF-8"),
    ("labels-33", _put_case(labels={f"k{i}": "v" for i in range(33)}), "labels", 32),
    ("labels-key-empty", _put_case(labels={"": "v"}), "labels", 63),
    ("labels-key-64", _put_case(labels={"k" * 64: "v"}), "labels", 63),
    ("labels-key-upper", _put_case(labels={"Key": "v"}), "labels", 63),
    ("labels-key-invalid-utf8", _put_raw_label(b"k\xff", b"v"), "labels", "UTF-8"),
    ("labels-value-257-bytes", _put_case(labels={"k": "é" * 128 + "x"}), "labels", 256),
    ("labels-value-control", _put_case(labels={"k": "a\x01b"}), "labels", 256),
    ("labels-value-nul", _put_case(labels={"k": "a\x00b"}), "labels", "UTF-8"),
    ("labels-value-invalid-utf8", _put_raw_label(b"k", b"v\xff"), "labels", "UTF-8"),
    ("expected_version-negative", _put_case(expected_version=-1), "expected_version", 0),
]


def _assert_untouched(regions, cid):
    assert footprint(regions, "us", cid) == dict(customers=1, records=0, data_keys=0, idempotency=0)


@pytest.mark.parametrize("case,build,field,limit", PUT_LIMITS, ids=[c[0] for c in PUT_LIMITS])
def test_put_record_limits(regions, api, limits_customer, case, build, field, limit):
    cid = limits_customer
    put_raw = api.raw("RecordsService", "PutRecord", rep=records_pb2.PutRecordResponse)
    body = build(cid)
    e = rpc_error(put_raw, body, timeout=15)
    assert_invalid(e, field, limit)
    _assert_untouched(regions, cid)
    # The same message inside a bulk stream, between two good ones: it fails alone, with the
    # same status, and does not stop the others (records.proto, BulkPutRecords).
    good = [_put_base(cid) for _ in range(2)]
    for i, m in enumerate(good):
        m.record_id = f"good-{i}"
    # Each BulkPutRecordsRequest carries the PutRecordRequest bytes as its field 1 (`put`).
    stream = [pb_bytes(1, good[0].SerializeToString()), pb_bytes(1, body), pb_bytes(1, good[1].SerializeToString())]
    bulk_raw = api.raw("RecordsService", "BulkPutRecords", "client-stream", rep=records_pb2.BulkPutRecordsResponse)
    try:
        rep = bulk_raw(iter(stream), timeout=15)
    except grpc.RpcError as e:
        pytest.fail(f"the bad message ended the whole BulkPutRecords call: {e.code()} {e.details()!r}")
    assert (rep.written, rep.replayed, len(rep.failures)) == (2, 0, 1), rep
    f = rep.failures[0]
    assert (f.index, f.code) == (1, SC.INVALID_ARGUMENT.value[0]), f
    assert field in f.message, f
    got = rows(regions, "us", f"SELECT record_id FROM domicile.records WHERE customer_id = {lit(cid)} ORDER BY 1")
    assert got == [["good-0"], ["good-1"]]
    assert footprint(regions, "us", cid)["idempotency"] == 2


def test_bulk_failure_of_undecodable_message_is_reported(regions, api, limits_customer):
    body = with_raw_field(_put_base(limits_customer), 3, b"bad\xffid")
    bulk_raw = api.raw("RecordsService", "BulkPutRecords", "client-stream", rep=records_pb2.BulkPutRecordsResponse)
    try:
        rep = bulk_raw(iter([pb_bytes(1, body)]), timeout=15)  # the response parses: valid UTF-8
    except grpc.RpcError as e:
        pytest.fail(f"the bad message ended the whole BulkPutRecords call: {e.code()} {e.details()!r}")
    assert len(rep.failures) == 1 and rep.failures[0].code == 3
    assert rep.failures[0].index == 0
    # proto: a message refused before decoding (invalid UTF-8 in any string field) reports an
    # empty record_id; the message names the field.
    assert rep.failures[0].record_id == "", rep.failures[0].record_id
    assert "record_id" in rep.failures[0].message and "UTF-8" in rep.failures[0].message
    _assert_untouched(regions, limits_customer)


def _get_raw(field, data):
    return lambda cid: with_raw_field(GetReq(customer_id=cid, record_id="rec"), field, data)


GET_LIMITS = [
    ("customer_id-empty", lambda cid: GetReq(customer_id="", record_id="rec").SerializeToString(), "customer_id", 128),
    ("customer_id-129", lambda cid: GetReq(customer_id="c" * 129, record_id="rec").SerializeToString(), "customer_id", 128),
    ("customer_id-bad-char", lambda cid: GetReq(customer_id="c*", record_id="rec").SerializeToString(), "customer_id", 128),
    ("customer_id-invalid-utf8", _get_raw(1, b"\xff"), "customer_id", "UTF-8"),
    ("record_id-empty", lambda cid: GetReq(customer_id=cid, record_id="").SerializeToString(), "record_id", 256),
    ("record_id-257", lambda cid: GetReq(customer_id=cid, record_id="r" * 257).SerializeToString(), "record_id", 256),
    ("record_id-control", lambda cid: GetReq(customer_id=cid, record_id="r\x1b").SerializeToString(), "record_id", 256),
    ("record_id-invalid-utf8", _get_raw(2, b"rec\xff"), "record_id", "UTF-8"),
    ("record_id-nul", lambda cid: GetReq(customer_id=cid, record_id="rec\x00x").SerializeToString(), "record_id", "UTF-8"),
    ("customer_id-nul", lambda cid: GetReq(customer_id=cid + "\x00x", record_id="rec").SerializeToString(), "customer_id", "UTF-8"),
]


@pytest.mark.parametrize("case,build,field,limit", GET_LIMITS, ids=[c[0] for c in GET_LIMITS])
def test_get_record_limits(api, limits_customer, case, build, field, limit):
    get_raw = api.raw("RecordsService", "GetRecord", rep=records_pb2.GetRecordResponse)
    assert_invalid(rpc_error(get_raw, build(limits_customer), timeout=10), field, limit)


def _list_case(**kw):
    return lambda cid: ListReq(customer_id=cid, **kw).SerializeToString()


LIST_LIMITS = [
    ("customer_id-empty", lambda cid: ListReq().SerializeToString(), "customer_id", 128),
    ("customer_id-bad-char", lambda cid: ListReq(customer_id="a b").SerializeToString(), "customer_id", 128),
    ("kind-65", _list_case(kind="k" * 65), "kind", 64),
    ("kind-upper", _list_case(kind="Note"), "kind", 64),
    ("subject-321", _list_case(subject="s" * 321), "subject", 320),
    ("subject-blank", _list_case(subject=" \t "), "subject", 320),
    ("subject-invalid-utf8", lambda cid: with_raw_field(ListReq(customer_id=cid), 3, b"a\xff"), "subject", "UTF-8"),
    ("subject-nul", _list_case(subject="bob@example.com\x00x"), "subject", "UTF-8"),
    ("kind-nul", _list_case(kind="note\x00x"), "kind", "UTF-8"),
    ("page_size-negative", _list_case(page_size=-1), "page_size", 1000),
    ("page_size-1001", _list_case(page_size=1001), "page_size", 1000),
    ("page_token-garbage", _list_case(page_token="garbage"), "page_token", None),
    ("page_token-prefix-only", _list_case(page_token="r1."), "page_token", None),
    ("page_token-odd-hex", _list_case(page_token="r1.abc"), "page_token", None),
    ("page_token-not-hex", _list_case(page_token="r1.zz"), "page_token", None),
    ("page_token-1025", _list_case(page_token="r1." + "61" * 511), "page_token", None),
    ("page_token-hex-of-nul", _list_case(page_token="r1.6100"), "page_token", None),
    ("page_token-invalid-utf8", lambda cid: with_raw_field(ListReq(customer_id=cid), 5, b"r1.\xff"), "page_token", "UTF-8"),
]


@pytest.mark.parametrize("case,build,field,limit", LIST_LIMITS, ids=[c[0] for c in LIST_LIMITS])
def test_list_records_limits(api, limits_customer, case, build, field, limit):
    list_raw = api.raw("RecordsService", "ListRecords", "stream", rep=records_pb2.ListRecordsResponse)
    e = rpc_error(lambda: list(list_raw(build(limits_customer), timeout=10)))
    assert_invalid(e, field, limit)


def _del_case(**kw):
    return limits_case(DelReq, kw, record_id="rec")


DELETE_LIMITS = [
    ("request_id-empty", _del_case(request_id=""), "request_id", 128),
    ("request_id-129", _del_case(request_id="r" * 129), "request_id", 128),
    ("request_id-non-ascii", _del_case(request_id="ré"), "request_id", 128),
    ("customer_id-empty", _del_case(customer_id=""), "customer_id", 128),
    ("customer_id-bad-char", _del_case(customer_id="a/b"), "customer_id", 128),
    ("record_id-empty", _del_case(record_id=""), "record_id", 256),
    ("record_id-257", _del_case(record_id="r" * 257), "record_id", 256),
    ("record_id-invalid-utf8", lambda cid: with_raw_field(DelReq(request_id="x", customer_id=cid, record_id="rec"), 3, b"\xc3("), "record_id", "UTF-8"),
    ("expected_version-0", _del_case(expected_version=0), "expected_version", 1),
    ("expected_version-negative", _del_case(expected_version=-3), "expected_version", None),
]


@pytest.mark.parametrize("case,build,field,limit", DELETE_LIMITS, ids=[c[0] for c in DELETE_LIMITS])
def test_delete_record_limits(regions, api, limits_customer, case, build, field, limit):
    del_raw = api.raw("RecordsService", "DeleteRecord", rep=records_pb2.DeleteRecordResponse)
    assert_invalid(rpc_error(del_raw, build(limits_customer), timeout=10), field, limit)
    _assert_untouched(regions, limits_customer)


def test_nul_inside_an_id_is_refused_not_truncated(regions, api):
    """U+0000 is a control character: an id that contains it is invalid. Cut at the NUL, it
    would name another record, or another customer."""
    cid = register(api, "us")
    put(api, cid, "rec", b"the record named rec")
    for req in (GetReq(customer_id=cid, record_id="rec\x00other"), GetReq(customer_id=cid + "\x00other", record_id="rec")):
        e = rpc_error(api.get, req, timeout=10)
        assert e.code() == SC.INVALID_ARGUMENT, (req, e.code(), e.details())
    for req in (
        PutReq(request_id="n1", customer_id=cid, record_id="rec\x00other", kind="note", payload=b"overwrite?"),
        PutReq(request_id="n2", customer_id=cid + "\x00other", record_id="rec", kind="note", payload=b"overwrite?"),
    ):
        e = rpc_error(api.put, req, timeout=10)
        assert e.code() == SC.INVALID_ARGUMENT, (e.code(), e.details())
    e = rpc_error(api.delete, DelReq(request_id="n3", customer_id=cid, record_id="rec\x00other"), timeout=10)
    assert e.code() == SC.INVALID_ARGUMENT, (e.code(), e.details())
    assert rows(regions, "us", f"SELECT record_id, version FROM domicile.records WHERE customer_id = {lit(cid)}") == [["rec", "1"]]


def test_limits_at_their_maximum_are_accepted(regions, api):
    """The boundaries themselves: every field at its largest allowed size is written and read
    back intact."""
    cid = register(api, "eu", cid=("Ab.9_:-" + uid() * 4)[:128])
    assert len(cid) == 128
    record_id = "é" * 128  # 256 bytes
    labels = {f"{i:02d}" + "k" * 61: "v" * 255 + str(i % 10) for i in range(32)}  # 32 keys of 63 bytes, values of 256
    subject = "s" * 308 + "@example.com"  # 320 bytes
    assert len(subject.encode()) == 320
    payload = os.urandom(PAYLOAD_MAX)
    req = PutReq(
        request_id="~" + "R" * 127,
        customer_id=cid,
        record_id=record_id,
        kind="k" * 60 + "._-9",
        subject=subject,
        payload=payload,
        content_type="a" * 127 + " ",
        labels=labels,
    )
    assert len(req.kind) == 64 and len(req.content_type) == 128 and len(req.request_id) == 128
    rep = api.put(req, timeout=60)
    assert rep.created and rep.record.payload_size == PAYLOAD_MAX
    rec = api.get(GetReq(customer_id=cid, record_id=record_id), timeout=60).record
    assert rec.payload == payload
    assert (rec.kind, rec.content_type, dict(rec.labels), rec.region) == (req.kind, req.content_type, labels, "eu")
    assert rows(regions, "eu", f"SELECT record_id, payload_size FROM domicile.records WHERE customer_id = {lit(cid)}") == [[record_id, str(PAYLOAD_MAX)]]
    # An empty payload, empty content type and no labels are fine too.
    rep = put(api, cid, "empty", b"")
    assert rep.record.payload_size == 0
    assert api.get(GetReq(customer_id=cid, record_id="empty"), timeout=10).record.payload == b""


def test_request_id_refuses_whitespace(regions, api):
    """common.proto: request_id is 1..128 bytes of printable ASCII without space (0x21..0x7E):
    an idempotency key that differs only in a trailing blank must not look like another."""
    cid = register(api, "us")
    e = rpc_error(put, api, cid, "doc", b"x", request_id="retry 1 of job 7")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.details()
    assert put(api, cid, "doc", b"x", request_id="retry-1-of-job-7").record.version == 1


# --------------------------------------------------------------------------------------------
# 8. ListRecords


def test_list_records_pages_filters_and_payloads(regions, api):
    cid = register(api, "in")
    s1 = f"bob-{uid()}@example.com"
    s2 = f"carol-{uid()}@example.com"
    # ids whose byte order differs from a locale's order and from insertion order
    ids = [f"{p}-{i:02d}" for p, i in zip(["Zed", "alpha", "éclair", "~tilde", "Beta", "delta", "_u"] * 4, range(25))]
    ids += ["a", "b", "c", "d", "e"][: 25 - len(ids)]
    assert len(set(ids)) == 25
    spec = {}
    for n, rid in enumerate(reversed(ids)):
        kind = "invoice" if n % 3 == 0 else "note"
        subject = s1 if n % 4 == 0 else (s2 if n % 4 == 1 else "")
        payload = f"payload of {rid}".encode() * (n + 1)
        put(api, cid, rid, payload, kind=kind, subject=subject)
        spec[rid] = (kind, subject, payload)
    order = sorted(ids, key=lambda s: s.encode())

    # page_size 10: 10, 10, 5, chained by tokens, the last token empty
    pages, token, got = [], "", []
    while True:
        recs, token = list_page(api, customer_id=cid, page_size=10, page_token=token)
        pages.append(len(recs))
        got += recs
        if not token:
            break
        assert len(pages) < 5
    assert pages == [10, 10, 5]
    assert [r.record_id for r in got] == order
    for r in got:
        kind, subject, payload = spec[r.record_id]
        assert (r.kind, r.has_subject, r.payload, r.payload_size, r.region, r.customer_id) == (kind, bool(subject), b"", len(payload), "in", cid)
        assert r.version == 1

    # default page size (100): everything at once
    recs, token = list_page(api, customer_id=cid)
    assert [r.record_id for r in recs] == order and token == ""

    # include_payload: decrypted payloads, across pages
    recs, token = list_page(api, customer_id=cid, page_size=20, include_payload=True)
    recs2, token2 = list_page(api, customer_id=cid, page_size=20, include_payload=True, page_token=token)
    assert token and not token2
    assert {r.record_id: r.payload for r in recs + recs2} == {rid: v[2] for rid, v in spec.items()}

    # filters
    by_kind = [rid for rid in order if spec[rid][0] == "invoice"]
    recs, token = list_page(api, customer_id=cid, kind="invoice")
    assert [r.record_id for r in recs] == by_kind and token == ""
    first, token = list_page(api, customer_id=cid, kind="invoice", page_size=3)
    rest, token2 = list_page(api, customer_id=cid, kind="invoice", page_size=100, page_token=token)
    assert [r.record_id for r in first + rest] == by_kind and token2 == ""
    by_s1 = [rid for rid in order if spec[rid][1] == s1]
    recs, _ = list_page(api, customer_id=cid, subject=f"  {s1.upper()}\t")  # normalised like a write
    assert [r.record_id for r in recs] == by_s1
    assert len({r.subject_key_hex for r in recs}) == 1
    both = [rid for rid in order if spec[rid][1] == s2 and spec[rid][0] == "note"]
    recs, _ = list_page(api, customer_id=cid, subject=s2, kind="note", include_payload=True)
    assert [r.record_id for r in recs] == both
    assert all(r.payload == spec[r.record_id][2] for r in recs)
    recs, token = list_page(api, customer_id=cid, subject=f"nobody-{uid()}@example.com")
    assert recs == [] and token == ""
    recs, token = list_page(api, customer_id=cid, kind="nosuchkind")
    assert recs == [] and token == ""

    # a token that was not returned by the server
    e = rpc_error(lambda: list(api.list(ListReq(customer_id=cid, page_token="garbage"), timeout=10)))
    assert_invalid(e, "page_token")


def test_list_records_exact_multiple_of_page_size_ends_cleanly(api):
    cid = register(api, "us")
    for i in range(20):
        put(api, cid, f"r{i:02d}", b"x")
    recs, token = list_page(api, customer_id=cid, page_size=10)
    assert len(recs) == 10 and token
    recs, token = list_page(api, customer_id=cid, page_size=10, page_token=token)
    assert [r.record_id for r in recs] == [f"r{i:02d}" for i in range(10, 20)]
    if token:  # allowed to need one more, empty, page
        recs, token = list_page(api, customer_id=cid, page_size=10, page_token=token)
        assert recs == [] and token == ""


def test_records_of_an_unknown_customer_are_not_found_anywhere(regions, api):
    ghost = f"ghost-{uid()}"
    for call in (
        lambda: put(api, ghost, "r", b"x"),
        lambda: api.get(GetReq(customer_id=ghost, record_id="r"), timeout=10).record,
        lambda: api.delete(DelReq(request_id="d", customer_id=ghost, record_id="r"), timeout=10),
        lambda: list(api.list(ListReq(customer_id=ghost), timeout=10)),
    ):
        e = rpc_error(call)
        assert e.code() == SC.NOT_FOUND, (e.code(), e.details())
    rep = api.bulk(bulk_stream(iter([_put_base(ghost)])), timeout=10)
    assert [(f.index, f.code) for f in rep.failures] == [(0, SC.NOT_FOUND.value[0])]
    for r in REGION_CODES:
        assert footprint(regions, r, ghost) == dict(customers=0, records=0, data_keys=0, idempotency=0)


# --------------------------------------------------------------------------------------------
# 10. BulkPutRecords


def test_bulk_put_one_bad_message_then_replay(regions, api):
    cid = register(api, "eu")
    bad = 137

    def msgs():
        for i in range(500):
            yield PutReq(
                request_id=f"bulk-{i}",
                customer_id=cid,
                record_id=f"r{i:04d}",
                kind="Bad Kind" if i == bad else "event",
                payload=f"#{i}".encode(),
            )

    rep = api.bulk(bulk_stream(msgs()), timeout=120)
    assert (rep.written, rep.created, rep.replayed) == (499, 499, 0)
    assert [(f.index, f.code, f.record_id) for f in rep.failures] == [(bad, 3, f"r{bad:04d}")]
    assert "kind" in rep.failures[0].message
    assert int(scalar(regions, "eu", f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)}")) == 499
    assert rows(regions, "eu", f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = 'r{bad:04d}'") == [["0"]]

    again = api.bulk(bulk_stream(msgs()), timeout=120)
    assert (again.written, again.created, again.replayed) == (0, 0, 499)
    assert [(f.index, f.code) for f in again.failures] == [(bad, 3)]
    assert rows(regions, "eu", f"SELECT count(*), max(version) FROM domicile.records WHERE customer_id = {lit(cid)}") == [["499", "1"]]
    assert api.get(GetReq(customer_id=cid, record_id="r0499"), timeout=10).record.payload == b"#499"


def test_bulk_put_messages_fail_independently(regions, api):
    cid = register(api, "in")
    put(api, cid, "exists", b"v1")
    msgs = [
        PutReq(request_id="a", customer_id=cid, record_id="ok-1", kind="note"),
        PutReq(request_id="b", customer_id=cid, record_id="exists", kind="note", expected_version=0),
        PutReq(request_id="c", customer_id=f"ghost-{uid()}", record_id="x", kind="note"),
        PutReq(request_id="d", customer_id=cid, record_id="exists", kind="note", expected_version=1),
        PutReq(request_id="a", customer_id=cid, record_id="ok-other", kind="note"),  # request_id reused
    ]
    rep = api.bulk(bulk_stream(iter(msgs)), timeout=30)
    assert (rep.written, rep.created, rep.replayed) == (2, 1, 0)
    codes = [(f.index, f.code) for f in rep.failures]
    want = [(1, SC.FAILED_PRECONDITION.value[0]), (2, SC.NOT_FOUND.value[0]), (4, SC.INVALID_ARGUMENT.value[0])]
    assert sorted(codes) == want, rep.failures
    assert [f.record_id for f in sorted(rep.failures, key=lambda f: f.index)] == ["exists", "x", "ok-other"]
    got = rows(regions, "in", f"SELECT record_id, version FROM domicile.records WHERE customer_id = {lit(cid)} ORDER BY 1")
    assert got == [["exists", "2"], ["ok-1", "1"]]


def test_bulk_put_messages_about_one_record_apply_in_stream_order(regions, api):
    """Messages of one stream naming the same record (or reusing a request_id) take effect in
    stream order, whichever pooled connection each write travels on: the last one wins and
    every version is accounted for."""
    cid = register(api, "eu")
    msgs = []
    for i in range(30):
        msgs.append(PutReq(request_id=f"w{i}", customer_id=cid, record_id="same", kind="note", payload=b"v%d" % i))
        msgs.append(PutReq(request_id=f"o{i}", customer_id=cid, record_id=f"other-{i}", kind="note", payload=b"x"))
    msgs.append(PutReq(request_id="w0", customer_id=cid, record_id="same", kind="note", payload=b"v0"))  # a replay
    rep = api.bulk(bulk_stream(iter(msgs)), timeout=60)
    assert (rep.written, rep.replayed, list(rep.failures)) == (60, 1, []), rep
    got = rows(regions, "eu", f"SELECT version FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = 'same'")
    assert got == [["30"]], got
    assert api.get(GetReq(customer_id=cid, record_id="same"), timeout=10).record.payload == b"v29"


def test_bulk_put_failures_are_reported_in_stream_order(api):
    """records.proto, BulkPutRecordsResponse.failures: "Messages that failed, in stream order."
    Failures that take long (an unknown customer: every region is asked) alternate with ones
    that are known at once (a bad field)."""
    msgs = []
    for i in range(40):
        if i % 2 == 0:
            msgs.append(PutReq(request_id=f"o{i}", customer_id=f"ghost-{uid()}", record_id=f"r{i}", kind="note"))
        else:
            msgs.append(PutReq(request_id=f"o{i}", customer_id=f"ghost-{uid()}", record_id=f"r{i}", kind="BAD"))
    rep = api.bulk(bulk_stream(iter(msgs)), timeout=60)
    got = [(f.index, f.code) for f in rep.failures]
    assert sorted(got) == [(i, 5 if i % 2 == 0 else 3) for i in range(40)], got
    assert [i for i, _ in got] == list(range(40)), f"failures not in stream order: {[i for i, _ in got]}"


def test_bulk_put_empty_stream(api):
    rep = api.bulk(bulk_stream(iter([])), timeout=10)
    assert (rep.written, rep.replayed, rep.created, list(rep.failures)) == (0, 0, 0, [])


def test_bulk_put_10001_messages_is_resource_exhausted(regions, api):
    cid = register(api, "us")

    def msgs():
        for i in range(10001):
            yield PutReq(request_id=f"m{i}", customer_id=cid, record_id=f"r{i:05d}", kind="k")

    e = rpc_error(api.bulk, bulk_stream(msgs()), timeout=300)
    assert e.code() == SC.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert "10000" in e.details(), e.details()
    n = int(scalar(regions, "us", f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)}"))
    assert n <= 10000
    assert rows(regions, "us", f"SELECT count(*) FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = 'r10000'") == [["0"]]
