"""
Issue 5 ("Cross-border transfer ledger"): legal bases as data, write-ahead logging of every
cross-border transfer, tamper evidence (VerifyLedger), retention, ListTransfers and Report,
against the three real local regions.

Transfers: a record of a customer resident in R read by a principal whose region is C != R is
a transfer R -> C, logged in R's ledger; a write by a principal in C into R is C -> R, logged in
R's ledger. The demo principals' regions: service-us us, service-eu eu, service-in in, admin us.

Every test makes its own customers (uuid4 ids) and leaves each region's ledger verifying: a
tampering test repairs exactly what it changed (the saved row contents) in `finally`, so that
VerifyLedger, which reports the FIRST damage, stays meaningful for the next test. The ledgers
are read directly too (`regions.psql`, superuser on each region's primary).

Order matters in one place: the retention test runs first, because a purge removes a prefix of
the chain and its old entries must be that prefix (see _retention_region). Gateways with other
policy files or a shifted clock (DOMICILE_TEST_CLOCK_OFFSET_MS, through conftest's `env`) are
started per test. The strict-xfail tests at the end pin product bugs found while writing these
tests; each turns into a failure once the bug is fixed, so its marker gets removed.

Waits poll for the state they need (VerifyLedger, the witness table; conftest's wait_until) or
read Health/Watch; there is no fixed sleep.
"""

import datetime
import json
import os
import re
import subprocess

import grpc
import pytest

from conftest import REGION_CODES, REGIONS_STATE, SERVING, wait_health, wait_until
from helpers import Api, Principals, bulk_stream, get, list_once, lit, md, now_ms, paged, put, register, rpc_error, scalar, uid
from domicile.v1 import records_pb2, transfers_pb2

SC = grpc.StatusCode
T = transfers_pb2

DPF = "eu-us-dpf-2023-1795"
SCC2 = "scc-2021-914-m2"
DPDP = "dpdp-s16"
USNR = "us-no-restriction"

DAY_MS = 86400000
OFFSET_ENV = "DOMICILE_TEST_CLOCK_OFFSET_MS"

# demo principals (deploy/local/domicile-local DEMO_PRINCIPALS): admin and service-us are in
# us, service-eu and auditor in eu, service-in in in
OWNER = {"us": "service-us", "eu": "service-eu", "in": "service-in"}  # a same-region principal
READER_OF = {"us": "service-eu", "eu": "service-in", "in": "service-us"}  # a cross-border reader

ALLOWED = T.TRANSFER_OUTCOME_ALLOWED
REFUSED = T.TRANSFER_OUTCOME_REFUSED
READ = T.TRANSFER_DIRECTION_READ
WRITE = T.TRANSFER_DIRECTION_WRITE

# --------------------------------------------------------------------------------------------
# API (helpers.Api: Customers, Records and Transfers)


def serving(gw):
    """Waits until the gateway serves every region (its executors connected): READY means
    listening, and under load the first connections to the regions can take a while."""
    ch = gw.channel(token=None)
    for r in REGION_CODES:
        wait_health(ch, f"domicile.region.{r}", SERVING, timeout=60)
    return gw


def start(gateways, **kw):
    """A dedicated gateway (conftest's factory), once it serves every region."""
    return serving(gateways.start(**kw))


@pytest.fixture(scope="module")
def p(session_gateway):
    """The demo principals on the shared gateway."""
    return Principals(serving(session_gateway))


def list_records(api, cid, purpose=None, **kw):
    """One ListRecords call: the records streamed (raises on a failed stream)."""
    return list_once(api, records_pb2.ListRecordsRequest(customer_id=cid, **kw), metadata=md(purpose))


def list_transfers(api, **filters):
    """Every entry matching the filters, following next_page_token."""
    return paged(api.list_transfers, T.ListTransfersRequest, "entry", **filters)


def verify(api, region):
    return api.verify_ledger(T.VerifyLedgerRequest(region=region), timeout=30)


def wait_sealed(api, region, timeout=30.0):
    """VerifyLedger until no entry is waiting for the sealer; returns that response. (One
    answer is enough: VerifyLedger reads the chain's last links and the unsealed rows in one
    snapshot, so an entry sealed meanwhile is counted once.)"""
    v = wait_until(lambda: verify(api, region), lambda v: v.unsealed_entries == 0, timeout)
    assert v.unsealed_entries == 0, f"{region}: entries still unsealed after {timeout}s: {v}"
    return v


def assert_verifies(api, region):
    v = wait_sealed(api, region)
    assert v.ok and v.damage == T.LEDGER_DAMAGE_NONE and v.first_bad_seq == 0, v
    return v


# --------------------------------------------------------------------------------------------
# the ledgers in SQL

LEDGER_COLUMNS = (
    "entry_id, entry_uuid, at, request_id, principal, method, customer_id, subject_key, record_count, bytes, "
    "from_region, to_region, direction, purpose, basis_id, outcome, refusal_reason, record_ids, entry_mac"
)
CONTENT_COLUMNS = LEDGER_COLUMNS.split(", ")[1:]  # every column but entry_id


def sql_json(regions, region, query):
    """Runs `query` (rows) and returns them as a list of dicts (json_agg)."""
    out = regions.psql(region, f"SELECT coalesce(json_agg(t), '[]') FROM ({query}) t")
    return json.loads(out)


def ledger_rows(regions, region, where):
    """Ledger rows of `region` matching `where`, by entry_id, with at_ms and record_ids split."""
    rows = sql_json(
        regions,
        region,
        "SELECT l.entry_id, (extract(epoch FROM l.at) * 1000)::bigint AS at_ms, l.request_id, l.principal, l.method, "
        "l.customer_id, encode(l.subject_key, 'hex') AS subject_key, l.record_count, l.bytes, l.from_region, "
        "l.to_region, l.direction, l.purpose, l.basis_id, l.outcome, l.refusal_reason, l.record_ids, "
        "encode(l.entry_mac, 'hex') AS entry_mac, c.seq "
        f"FROM domicile.ledger l LEFT JOIN domicile.ledger_chain c USING (entry_id) WHERE {where} ORDER BY l.entry_id",
    )
    for r in rows:
        r["record_ids"] = r["record_ids"].split("\x1f") if r["record_ids"] else []
    return rows


def customer_rows(regions, region, cid):
    return ledger_rows(regions, region, f"l.customer_id = {lit(cid)}")


def jlit(obj):
    """A JSON value as a dollar-quoted SQL literal."""
    text = json.dumps(obj)
    assert "$j$" not in text
    return f"$j${text}$j$::json"


def saved_row(regions, region, table, key, value):
    """One row of domicile.<table> as JSON (row_to_json: exact bytea and timestamps)."""
    rows = sql_json(regions, region, f"SELECT * FROM domicile.{table} WHERE {key} = {int(value)}")
    assert len(rows) == 1, rows
    return rows[0]


def restore_sql(saved):
    """SQL (one string, run as one transaction) that puts ledger rows back to their saved
    contents, by entry_id: rows that exist are overwritten (their uuids first moved aside, so
    that swapped contents pass the UNIQUE constraint), missing ones are inserted with their
    original entry_id."""
    ids = ", ".join(str(int(r["entry_id"])) for r in saved)
    stmts = [
        f"UPDATE domicile.ledger SET entry_uuid = decode(md5('ledger-test-aside-' || entry_id), 'hex') WHERE entry_id IN ({ids})"
    ]
    cols = ", ".join(CONTENT_COLUMNS)
    for r in saved:
        src = f"json_populate_record(NULL::domicile.ledger, {jlit(r)})"
        stmts.append(
            f"INSERT INTO domicile.ledger OVERRIDING SYSTEM VALUE SELECT * FROM {src} "
            f"ON CONFLICT (entry_id) DO UPDATE SET ({cols}) = (SELECT {cols} FROM {src})"
        )
    return "; ".join(stmts)


def restore_ledger_rows(regions, region, saved, extra=""):
    regions.psql(region, restore_sql(saved) + (f"; {extra}" if extra else ""))


def chain_of(regions, region, cid):
    """(seq, entry_id, chain_hash hex) of the sealed entries of customer `cid`, by seq."""
    rows = sql_json(
        regions,
        region,
        "SELECT c.seq, c.entry_id, encode(c.chain_hash, 'hex') AS hash FROM domicile.ledger_chain c "
        f"JOIN domicile.ledger l USING (entry_id) WHERE l.customer_id = {lit(cid)} ORDER BY c.seq",
    )
    return [(r["seq"], r["entry_id"], r["hash"]) for r in rows]


def ledger_size(regions, region):
    return tuple(
        int(x)
        for x in scalar(
            regions,
            region,
            "SELECT (SELECT count(*) FROM domicile.ledger) || '|' || (SELECT count(*) FROM domicile.ledger_chain) "
            "|| '|' || (SELECT count(*) FROM domicile.ledger_checkpoints)",
        ).split("|")
    )


# --------------------------------------------------------------------------------------------
# policy files and test clocks


def utc_day(delta_days=0):
    return (datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=delta_days)).isoformat()


def write_policy(regions, workdir, name, revoke=None, drop_routes=()):
    """Copies of STATE/etc/bases.conf and routes.conf: bases in `revoke` ({id: "YYYY-MM-DD"})
    get that revocation date; routes (from, to) in `drop_routes` are removed. Returns the
    gateway config overrides that use them."""
    etc = os.path.join(regions.state, "etc")
    with open(os.path.join(etc, "bases.conf")) as f:
        bases = f.read()
    for basis, day in (revoke or {}).items():
        pattern = re.compile(r'(id = "' + re.escape(basis) + r'";.*?revoked = )""', re.S)
        bases, n = pattern.subn(lambda m: m.group(1) + f'"{day}"', bases, count=1)
        assert n == 1, f"basis {basis} not found in bases.conf"
    with open(os.path.join(etc, "routes.conf")) as f:
        lines = f.read().splitlines()
    for frm, to in drop_routes:
        keep = [ln for ln in lines if not re.search(rf'from = "{frm}"; to = "{to}";', ln)]
        assert len(keep) == len(lines) - 1, f"route {frm} -> {to} not found in routes.conf"
        lines = keep
    bpath = os.path.join(workdir, f"{name}-bases.conf")
    rpath = os.path.join(workdir, f"{name}-routes.conf")
    with open(bpath, "w") as f:
        f.write(bases)
    with open(rpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"bases_file": bpath, "routes_file": rpath}


def clock(offset_ms):
    return {OFFSET_ENV: str(int(offset_ms))}


# --------------------------------------------------------------------------------------------
# 5. retention (first in the module: it needs a ledger whose chain starts with its old entries)


def _retention_region(regions):
    """A data region whose ledger is empty (this module runs this test first, but other test
    files may have logged transfers before). If none is, the US ledger is emptied (test
    environment only): a retention purge removes a prefix of the chain, so entries dated a
    year back can only be purged when nothing newer precedes them in the chain."""
    for r in ("us", "in", "eu"):
        if ledger_size(regions, r) == (0, 0, 0):
            return r
    # The heads of the US chain witnessed in the other regions go too (else VerifyLedger
    # rightly reports the emptied chain as cut short).
    for w in ("eu", "in"):
        regions.psql(w, "DELETE FROM domicile.ledger_witness WHERE region = 'us'")
    regions.psql("us", "TRUNCATE domicile.ledger_chain, domicile.ledger_checkpoints, domicile.ledger")
    for w in ("eu", "in"):  # a witness write in flight at the truncation
        regions.psql(w, "DELETE FROM domicile.ledger_witness WHERE region = 'us'")
    assert ledger_size(regions, "us") == (0, 0, 0)
    return "us"


OLD_DAYS, MID_DAYS, RETENTION_DAYS = 400, 300, 365
_RETENTION = {}  # what the retention test purged, for test_checkpoint_says_when_and_how_many


def test_retention_purge_leaves_a_verifying_chain(regions, gateways, p):
    """Entries dated 400 days back (written by a gateway whose clock is 400 days behind) are
    purged by a gateway with ledger_retention_days = 365 behind a signed checkpoint; entries
    dated 300 days back and today remain, and the chain still verifies from the checkpoint.
    (365, not the default 730: gateways with the default window, such as the shared one,
    must not purge these entries before the test looks at them.)"""
    region = _retention_region(regions)
    reader = READER_OF[region]
    cid = register(p["admin"], region, prefix="led")
    put(p[OWNER[region]], cid, "r1", b"retained-payload")

    def reads(api, tag, n):
        ids = []
        for i in range(n):
            rid = f"{tag}-{i}-{uid()}"
            assert get(api, cid, "r1", request_id=rid).payload == b"retained-payload"
            ids.append(rid)
        return ids

    old = start(gateways, name="clock-400d", env=clock(-OLD_DAYS * DAY_MS))
    old_ids = reads(Principals(old)[reader], "old", 3)
    wait_sealed(Principals(old)["auditor"], region)
    old.stop()
    mid = start(gateways, name="clock-300d", env=clock(-MID_DAYS * DAY_MS))
    mid_ids = reads(Principals(mid)[reader], "mid", 2)
    wait_sealed(Principals(mid)["auditor"], region)
    mid.stop()
    new_ids = reads(p[reader], "new", 2)
    wait_sealed(p["auditor"], region)

    rows = customer_rows(regions, region, cid)
    assert [r["request_id"] for r in rows] == old_ids + mid_ids + new_ids
    t = now_ms()
    for r in rows[:3]:
        assert abs(r["at_ms"] - (t - OLD_DAYS * DAY_MS)) < 10 * 60000, r
    for r in rows[3:5]:
        assert abs(r["at_ms"] - (t - MID_DAYS * DAY_MS)) < 10 * 60000, r
    for r in rows[5:]:
        assert abs(r["at_ms"] - t) < 10 * 60000, r
    chain = chain_of(regions, region, cid)
    assert [c[1] for c in chain] == [r["entry_id"] for r in rows]
    # the chain starts with the old entries (nothing precedes them), so the purge cuts there
    assert chain[0][0] == 1, chain
    last_old_seq, _, last_old_hash = chain[2]

    purger = start(gateways, name="purger", overrides={"ledger_retention_days": RETENTION_DAYS})
    auditor = Principals(purger)["auditor"]
    # the purger's retention pass runs in the background: poll until its checkpoint is there
    v = wait_until(lambda: verify(auditor, region), lambda v: v.HasField("checkpoint"), timeout=90, interval=1.0)
    assert v.HasField("checkpoint"), f"no retention checkpoint within 90 s: {v}\n{purger.log}"
    t = now_ms()
    assert v.ok and v.damage == T.LEDGER_DAMAGE_NONE and v.first_bad_seq == 0, v
    cp = v.checkpoint
    assert cp.valid, v
    assert cp.seq == last_old_seq, (cp, chain)
    assert cp.chain_hash_hex == last_old_hash, (cp, chain)
    assert abs(cp.purged_before_unix_ms - (t - RETENTION_DAYS * DAY_MS)) < 10 * 60000, cp
    assert v.sealed_up_to_seq == chain[-1][0], v
    assert v.entries_checked == len(chain) - 3, v
    assert v.unsealed_entries == 0, v
    _RETENTION.update(region=region, purged=3, purged_at_ms=t)

    # the old entries (and their links) are gone, the newer ones remain
    left = customer_rows(regions, region, cid)
    assert [r["request_id"] for r in left] == mid_ids + new_ids
    assert scalar(regions, region, f"SELECT count(*) FROM domicile.ledger_chain WHERE seq <= {last_old_seq}") == "0"
    listed = list_transfers(auditor, region=region, customer_id=cid)
    assert [e.request_id for e in listed] == mid_ids + new_ids
    assert [e.seq for e in listed] == [c[0] for c in chain[3:]]

    # the checkpoint itself is tamper-evident: a forged signature is CHECKPOINT_INVALID
    cp_row = sql_json(regions, region, "SELECT checkpoint_id, encode(mac, 'hex') AS mac FROM domicile.ledger_checkpoints ORDER BY upto_seq DESC LIMIT 1")[0]
    try:
        regions.psql(region, f"UPDATE domicile.ledger_checkpoints SET mac = '\\x{os.urandom(32).hex()}' WHERE checkpoint_id = {cp_row['checkpoint_id']}")
        bad = verify(auditor, region)
        assert not bad.ok and bad.damage == T.LEDGER_DAMAGE_CHECKPOINT_INVALID, bad
        assert bad.first_bad_seq == last_old_seq and not bad.checkpoint.valid, bad
    finally:
        regions.psql(region, f"UPDATE domicile.ledger_checkpoints SET mac = '\\x{cp_row['mac']}' WHERE checkpoint_id = {cp_row['checkpoint_id']}")
    assert verify(auditor, region).ok


# --------------------------------------------------------------------------------------------
# 1. allowed transfers: one entry per transfer, with its basis and byte count


def test_cross_border_reads_are_logged_with_their_basis(regions, p):
    """An EU customer's record read by a US principal: allowed by the DPF, one entry in the EU
    ledger with the right bytes; by an IN principal: SCC module 2; same region: no entry."""
    cid = register(p["admin"], "eu", prefix="led")
    payload = os.urandom(1234)
    subject = f"alice-{uid()}@example.com"
    put(p["service-eu"], cid, "rec-1", payload, subject=subject)
    assert customer_rows(regions, "eu", cid) == [], "a same-region write must not be logged"

    t0 = now_ms()
    rid_us = f"req-us-{uid()}"
    rec = get(p["service-us"], cid, "rec-1", request_id=rid_us)
    t1 = now_ms()
    assert rec.payload == payload and rec.region == "eu"
    rows = customer_rows(regions, "eu", cid)
    assert len(rows) == 1, rows
    e = rows[0]
    assert e["request_id"] == rid_us
    assert e["principal"] == "service-us"
    assert e["customer_id"] == cid
    assert (e["from_region"], e["to_region"], e["direction"]) == ("eu", "us", "read")
    assert (e["purpose"], e["basis_id"], e["outcome"], e["refusal_reason"]) == ("support", DPF, "allowed", "")
    assert (e["record_count"], e["bytes"], e["record_ids"]) == (1, len(payload), ["rec-1"])
    assert t0 - 1000 <= e["at_ms"] <= t1 + 1000, (t0, e["at_ms"], t1)
    # no personal data in clear: the subject only as its HMAC key, no payload
    assert e["subject_key"] == rec.subject_key_hex and len(e["subject_key"]) == 64
    raw = regions.psql("eu", f"SELECT l::text FROM domicile.ledger l WHERE customer_id = {lit(cid)}")
    assert subject not in raw and subject.split("@")[0] not in raw
    assert payload.hex() not in raw
    for none in ("model-training", "sale"):
        assert none not in raw

    # none in the other regions' ledgers
    for r in ("us", "in"):
        assert customer_rows(regions, r, cid) == []

    # the same entry through ListTransfers, sealed
    wait_sealed(p["auditor"], "eu")
    listed = list_transfers(p["auditor"], region="eu", customer_id=cid)
    assert len(listed) == 1, listed
    x = listed[0]
    assert (x.region, x.entry_id, x.request_id, x.principal, x.customer_id) == ("eu", e["entry_id"], rid_us, "service-us", cid)
    assert (x.from_region, x.to_region, x.direction, x.outcome) == ("eu", "us", READ, ALLOWED)
    assert (x.purpose, x.basis_id, x.record_count, x.bytes, list(x.record_ids)) == ("support", DPF, 1, len(payload), ["rec-1"])
    assert x.at_unix_ms == e["at_ms"] and x.seq > 0 and len(x.entry_hash_hex) == 64
    assert x.subject_key_hex == rec.subject_key_hex

    # an IN principal: SCC module 2 (no EU adequacy for India)
    rid_in = f"req-in-{uid()}"
    assert get(p["service-in"], cid, "rec-1", request_id=rid_in).payload == payload
    rows = customer_rows(regions, "eu", cid)
    assert len(rows) == 2, rows
    e = rows[1]
    assert (e["request_id"], e["principal"], e["from_region"], e["to_region"]) == (rid_in, "service-in", "eu", "in")
    assert (e["direction"], e["purpose"], e["basis_id"], e["outcome"]) == ("read", "support", SCC2, "allowed")
    assert (e["record_count"], e["bytes"], e["record_ids"]) == (1, len(payload), ["rec-1"])

    # same region: no entry, anywhere
    assert get(p["service-eu"], cid, "rec-1").payload == payload
    assert len(customer_rows(regions, "eu", cid)) == 2
    for r in ("us", "in"):
        assert customer_rows(regions, r, cid) == []

    # the purpose comes from x-purpose when given
    get(p["service-us"], cid, "rec-1", purpose="billing")
    e = customer_rows(regions, "eu", cid)[-1]
    assert (e["purpose"], e["basis_id"], e["outcome"]) == ("billing", DPF, "allowed")


def test_cross_border_writes_are_logged(regions, p):
    """PutRecord and BulkPutRecords by a US principal into an EU customer: C -> R entries
    (us -> eu, direction write, basis us-no-restriction) with the payload bytes written."""
    cid = register(p["admin"], "eu", prefix="led")
    payload = os.urandom(777)
    req_id = f"put-{uid()}"
    r = p["service-us"].put(
        records_pb2.PutRecordRequest(request_id=req_id, customer_id=cid, record_id="w-1", kind="note", payload=payload), timeout=15
    )
    assert r.created
    rows = customer_rows(regions, "eu", cid)
    assert len(rows) == 1, rows
    e = rows[0]
    assert (e["request_id"], e["principal"], e["from_region"], e["to_region"]) == (req_id, "service-us", "us", "eu")
    assert (e["direction"], e["purpose"], e["basis_id"], e["outcome"]) == ("write", "support", USNR, "allowed")
    assert (e["record_count"], e["bytes"], e["record_ids"]) == (1, 777, ["w-1"])
    assert get(p["service-eu"], cid, "w-1").payload == payload
    for other in ("us", "in"):
        assert customer_rows(regions, other, cid) == []

    # an IN principal writing: in -> eu under DPDP s.16
    put(p["service-in"], cid, "w-2", b"x" * 10)
    e = customer_rows(regions, "eu", cid)[-1]
    assert (e["from_region"], e["to_region"], e["direction"], e["basis_id"], e["bytes"]) == ("in", "eu", "write", DPDP, 10)

    # a bulk put: one write entry per record, each committed before the record is written
    sizes = [5, 0, 300, 41]
    resp = p["service-us"].bulk(
        bulk_stream(iter(
            records_pb2.PutRecordRequest(request_id=f"bulk-{uid()}", customer_id=cid, record_id=f"b-{i}", kind="note", payload=b"b" * n)
            for i, n in enumerate(sizes)
        )),
        timeout=30,
    )
    assert resp.written == len(sizes) and not resp.failures, resp
    bulk_rows = [x for x in customer_rows(regions, "eu", cid) if x["record_ids"] and x["record_ids"][0].startswith("b-")]
    assert sorted((x["record_ids"][0], x["bytes"]) for x in bulk_rows) == [(f"b-{i}", n) for i, n in enumerate(sizes)]
    for x in bulk_rows:
        assert (x["direction"], x["from_region"], x["to_region"], x["basis_id"], x["record_count"]) == ("write", "us", "eu", USNR, 1)

    # same region writes: nothing more
    n = len(customer_rows(regions, "eu", cid))
    put(p["service-eu"], cid, "w-3", b"local")
    assert len(customer_rows(regions, "eu", cid)) == n


def test_list_records_entries_add_up_to_what_was_streamed(regions, p):
    """ListRecords by an IN principal of an EU customer: one entry per chunk (up to 200
    records; with payloads, those that start within 4 MiB of payload), committed before the
    chunk; their record counts, bytes and record ids add up exactly to what the stream
    carried."""
    cid = register(p["admin"], "eu", prefix="led")
    sizes = [(i * 37) % 500 + 1 for i in range(40)]
    resp = p["service-eu"].bulk(
        bulk_stream(iter(
            records_pb2.PutRecordRequest(request_id=f"bulk-{uid()}", customer_id=cid, record_id=f"r{i:03d}", kind="note", payload=os.urandom(n))
            for i, n in enumerate(sizes)
        )),
        timeout=60,
    )
    assert resp.written == 40 and not resp.failures, resp
    assert customer_rows(regions, "eu", cid) == []

    got = list_records(p["service-in"], cid, include_payload=True, page_size=1000)
    assert len(got) == 40
    rows = customer_rows(regions, "eu", cid)
    assert [r["record_count"] for r in rows] == [40], rows
    assert sum(r["bytes"] for r in rows) == sum(len(r.payload) for r in got) == sum(sizes)
    assert [i for r in rows for i in r["record_ids"]] == [r.record_id for r in got]
    for r in rows:
        assert (r["from_region"], r["to_region"], r["direction"], r["basis_id"], r["principal"]) == ("eu", "in", "read", SCC2, "service-in")

    # without payloads: chunks of up to 200 records, 0 payload bytes sent
    got = list_records(p["service-in"], cid, page_size=1000)
    assert len(got) == 40 and all(r.payload == b"" for r in got)
    rows = customer_rows(regions, "eu", cid)[1:]
    assert [(r["record_count"], r["bytes"]) for r in rows] == [(40, 0)], rows
    assert rows[0]["record_ids"] == [r.record_id for r in got]

    # a page smaller than a chunk: the entry covers exactly that page
    got = list_records(p["service-in"], cid, include_payload=True, page_size=5)
    rows = customer_rows(regions, "eu", cid)[2:]
    assert [(r["record_count"], r["bytes"], r["record_ids"]) for r in rows] == [(5, sum(sizes[:5]), [f"r{i:03d}" for i in range(5)])]
    assert [r.record_id for r in got] == [f"r{i:03d}" for i in range(5)]

    # the same-region listing is not logged
    list_records(p["service-eu"], cid, include_payload=True, page_size=1000)
    assert len(customer_rows(regions, "eu", cid)) == 3

    # payloads of 1 MiB: a chunk holds the records that start within 4 MiB of payload
    big = register(p["admin"], "eu", prefix="led")
    for i in range(6):
        put(p["service-eu"], big, f"b{i}", bytes([i]) * 1048576, timeout=60)
    got = list_records(p["service-in"], big, include_payload=True, page_size=1000)
    assert [(r.record_id, r.payload) for r in got] == [(f"b{i}", bytes([i]) * 1048576) for i in range(6)]
    rows = customer_rows(regions, "eu", big)
    assert [(r["record_count"], r["bytes"]) for r in rows] == [(4, 4 * 1048576), (2, 2 * 1048576)], rows


def test_entry_method_names_the_rpc(regions, p):
    """transfers.proto TransferEntry.method: "The rpc that moved the data, by its name, e.g.
    "GetRecord", "ListRecords", "PutRecord", "BulkPutRecords"" (as of c645aeb)."""
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"m")
    get(p["service-us"], cid, "rec-1")
    put(p["service-us"], cid, "rec-2", b"m")
    list_records(p["service-us"], cid)
    p["service-in"].bulk(bulk_stream(iter([records_pb2.PutRecordRequest(request_id=f"bulk-{uid()}", customer_id=cid, record_id="rec-3", kind="note", payload=b"b")])), timeout=30)
    wait_sealed(p["auditor"], "eu")
    methods = [e.method for e in list_transfers(p["auditor"], region="eu", customer_id=cid)]
    assert methods == ["GetRecord", "PutRecord", "ListRecords", "BulkPutRecords"], methods


# --------------------------------------------------------------------------------------------
# 2. refusals


@pytest.mark.parametrize("purpose", ["model-training", "sale"])
def test_forbidden_purpose_is_refused_everywhere(regions, p, purpose):
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"secret payload")

    # cross-border: PERMISSION_DENIED naming the route and the purpose, a refused entry
    e = rpc_error(get, p["service-in"], cid, "rec-1", purpose=purpose)
    assert e.code() == SC.PERMISSION_DENIED, (e.code(), e.details())
    assert "eu -> in" in e.details() and purpose in e.details(), e.details()
    assert "secret payload" not in e.details()
    rows = customer_rows(regions, "eu", cid)
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["outcome"], r["purpose"], r["from_region"], r["to_region"], r["direction"]) == ("refused", purpose, "eu", "in", "read")
    assert (r["bytes"], r["principal"]) == (0, "service-in")
    assert "forbidden" in r["refusal_reason"], r

    # a cross-border write for that purpose: refused, logged, nothing written
    e = rpc_error(put, p["service-us"], cid, "rec-2", b"new data", metadata=md(purpose))
    assert e.code() == SC.PERMISSION_DENIED and "us -> eu" in e.details() and purpose in e.details(), e.details()
    r = customer_rows(regions, "eu", cid)[-1]
    assert (r["outcome"], r["direction"], r["from_region"], r["to_region"], r["bytes"]) == ("refused", "write", "us", "eu", 0)
    assert rpc_error(get, p["service-eu"], cid, "rec-2").code() == SC.NOT_FOUND

    # a cross-border listing: refused before any record is streamed
    e = rpc_error(list_records, p["service-us"], cid, purpose=purpose, include_payload=True)
    assert e.code() == SC.PERMISSION_DENIED and "eu -> us" in e.details(), e.details()
    assert customer_rows(regions, "eu", cid)[-1]["outcome"] == "refused"
    n = len(customer_rows(regions, "eu", cid))
    assert n == 3

    # same region: PERMISSION_DENIED too, and nothing logged (no transfer took place)
    e = rpc_error(get, p["service-eu"], cid, "rec-1", purpose=purpose)
    assert e.code() == SC.PERMISSION_DENIED and purpose in e.details(), e.details()
    e = rpc_error(list_records, p["service-eu"], cid, purpose=purpose)
    assert e.code() == SC.PERMISSION_DENIED
    assert len(customer_rows(regions, "eu", cid)) == n

    # the refusals are in ListTransfers' REFUSED filter
    wait_sealed(p["auditor"], "eu")
    refused = list_transfers(p["auditor"], region="eu", customer_id=cid, outcome=REFUSED)
    assert len(refused) == 3 and all(x.outcome == REFUSED and x.bytes == 0 for x in refused)
    assert list_transfers(p["auditor"], region="eu", customer_id=cid, outcome=ALLOWED) == []


def test_route_without_basis_is_refused_and_logged(regions, gateways, p):
    """A routes file with no EU -> IN route: the read is PERMISSION_DENIED naming the route
    and purpose, no payload, a refused entry with the reason; EU -> US still allowed."""
    policy = write_policy(regions, gateways.workdir, "no-eu-in", drop_routes=[("eu", "in")])
    gw = Principals(start(gateways, name="no-eu-in-route", overrides=policy))
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"payload-no-route")

    e = rpc_error(get, gw["service-in"], cid, "rec-1")
    assert e.code() == SC.PERMISSION_DENIED, (e.code(), e.details())
    assert "eu -> in" in e.details() and '"support"' in e.details() and "no route" in e.details(), e.details()
    rows = customer_rows(regions, "eu", cid)
    assert len(rows) == 1
    r = rows[0]
    assert (r["outcome"], r["from_region"], r["to_region"], r["purpose"], r["basis_id"], r["bytes"]) == ("refused", "eu", "in", "support", "", 0)
    assert r["refusal_reason"] == "no route allows it", r

    e = rpc_error(list_records, gw["service-in"], cid, include_payload=True)
    assert e.code() == SC.PERMISSION_DENIED
    assert len(customer_rows(regions, "eu", cid)) == 2

    # the other routes of that policy still work
    assert get(gw["service-us"], cid, "rec-1").payload == b"payload-no-route"
    assert customer_rows(regions, "eu", cid)[-1]["basis_id"] == DPF
    # and the shared gateway (regions/ policy) allows EU -> IN under SCC module 2
    assert get(p["service-in"], cid, "rec-1").payload == b"payload-no-route"
    assert customer_rows(regions, "eu", cid)[-1]["basis_id"] == SCC2


def test_revoked_basis_allows_nothing(regions, gateways, p):
    """Bases revoked yesterday (by the gateway's clock) allow nothing: with the DPF revoked,
    EU -> US falls back to SCC module 2; with SCC module 2 revoked too, EU -> US and EU -> IN
    are refused and logged. A gateway whose clock is two days behind, same files, still
    allows both; a basis revoked in ten days is refused by a gateway eleven days ahead (the
    gateway's clock against the dates decides, not the file alone)."""
    yesterday = utc_day(-1)
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"payload-revoked")

    # the DPF falls: EU -> US continues under SCCs, and ListTransfers tells which relied on it
    dpf_down = write_policy(regions, gateways.workdir, "dpf-revoked", revoke={DPF: yesterday})
    gw = Principals(start(gateways, name="dpf-revoked", overrides=dpf_down))
    assert get(gw["service-us"], cid, "rec-1").payload == b"payload-revoked"
    r = customer_rows(regions, "eu", cid)[-1]
    assert (r["outcome"], r["basis_id"], r["to_region"]) == ("allowed", SCC2, "us"), r

    # every basis of EU -> US and EU -> IN revoked yesterday
    all_down = write_policy(regions, gateways.workdir, "all-revoked", revoke={DPF: yesterday, SCC2: yesterday})
    gw = Principals(start(gateways, name="all-revoked", overrides=all_down))
    for reader, to in (("service-us", "us"), ("service-in", "in")):
        n = len(customer_rows(regions, "eu", cid))
        e = rpc_error(get, gw[reader], cid, "rec-1")
        assert e.code() == SC.PERMISSION_DENIED, (e.code(), e.details())
        assert f"eu -> {to}" in e.details() and "support" in e.details() and "in force" in e.details(), e.details()
        rows = customer_rows(regions, "eu", cid)
        assert len(rows) == n + 1
        r = rows[-1]
        assert (r["outcome"], r["to_region"], r["bytes"], r["principal"]) == ("refused", to, 0, reader), r
        assert r["refusal_reason"] == "no basis of the route is in force", r
    # other routes are untouched: in -> us (an IN customer read from the US) is DPDP s.16
    cin = register(p["admin"], "in", prefix="led")
    put(p["service-in"], cin, "rec-1", b"in-data")
    assert get(gw["service-us"], cin, "rec-1").payload == b"in-data"
    assert customer_rows(regions, "in", cin)[-1]["basis_id"] == DPDP

    # the same files, two days ago by the gateway's clock: both bases were still in force
    past = Principals(start(gateways, name="all-revoked-2d-ago", overrides=all_down, env=clock(-2 * DAY_MS)))
    t = now_ms()
    assert get(past["service-us"], cid, "rec-1").payload == b"payload-revoked"
    r = customer_rows(regions, "eu", cid)[-1]
    assert (r["outcome"], r["basis_id"]) == ("allowed", DPF), r
    assert abs(r["at_ms"] - (t - 2 * DAY_MS)) < 10 * 60000, r  # the entry carries the gateway's time
    assert get(past["service-in"], cid, "rec-1").payload == b"payload-revoked"
    r = customer_rows(regions, "eu", cid)[-1]
    assert (r["outcome"], r["basis_id"]) == ("allowed", SCC2), r

    # SCC module 2 revoked in ten days: in force today, refused by a gateway eleven days ahead
    later = write_policy(regions, gateways.workdir, "scc-revoked-later", revoke={SCC2: utc_day(10)})
    now_gw = Principals(start(gateways, name="scc-revoked-later", overrides=later))
    assert get(now_gw["service-in"], cid, "rec-1").payload == b"payload-revoked"
    assert customer_rows(regions, "eu", cid)[-1]["basis_id"] == SCC2
    ahead = Principals(start(gateways, name="scc-revoked-later-11d-ahead", overrides=later, env=clock(11 * DAY_MS)))
    e = rpc_error(get, ahead["service-in"], cid, "rec-1")
    assert e.code() == SC.PERMISSION_DENIED and "eu -> in" in e.details(), (e.code(), e.details())
    r = customer_rows(regions, "eu", cid)[-1]
    assert (r["outcome"], r["refusal_reason"], r["to_region"]) == ("refused", "no basis of the route is in force", "in"), r


# --------------------------------------------------------------------------------------------
# 3. write-ahead: no entry, no data


def test_ledger_write_failure_sends_nothing(regions, session_gateway, p):
    """The EU ledger refuses inserts (a NOT VALID check constraint no entry satisfies; the
    region stays up): a cross-border read fails UNAVAILABLE saying nothing was sent, with no
    payload and no record streamed; a cross-border write fails and writes nothing; same-region
    calls still work. Once the ledger accepts entries again, the read goes through."""
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"must-not-leave")
    before = ledger_size(regions, "eu")[0]
    regions.psql("eu", "ALTER TABLE domicile.ledger ADD CONSTRAINT ledger_test_block CHECK (bytes < 0) NOT VALID")
    try:
        e = rpc_error(get, p["service-us"], cid, "rec-1")
        assert e.code() == SC.UNAVAILABLE, (e.code(), e.details())
        assert "nothing sent" in e.details() and "ledger" in e.details(), e.details()
        assert "must-not-leave" not in e.details()

        stream = p["service-in"].list(records_pb2.ListRecordsRequest(customer_id=cid, include_payload=True), timeout=30)
        received = []
        with pytest.raises(grpc.RpcError) as ei:
            for m in stream:
                received.append(m)
        assert ei.value.code() == SC.UNAVAILABLE and "nothing sent" in ei.value.details(), ei.value.details()
        assert received == [], received

        e = rpc_error(put, p["service-us"], cid, "rec-2", b"not-stored")
        assert e.code() == SC.UNAVAILABLE and "nothing sent" in e.details(), (e.code(), e.details())

        # a refusal that cannot be logged is still a refusal
        e = rpc_error(get, p["service-us"], cid, "rec-1", purpose="sale")
        assert e.code() == SC.PERMISSION_DENIED

        # same-region reads and writes are unaffected
        assert get(p["service-eu"], cid, "rec-1").payload == b"must-not-leave"
        put(p["service-eu"], cid, "rec-3", b"local write")
        assert [r.record_id for r in list_records(p["service-eu"], cid)] == ["rec-1", "rec-3"]
        assert ledger_size(regions, "eu")[0] == before
    finally:
        regions.psql("eu", "ALTER TABLE domicile.ledger DROP CONSTRAINT IF EXISTS ledger_test_block")
    assert session_gateway.alive()
    assert rpc_error(get, p["service-eu"], cid, "rec-2").code() == SC.NOT_FOUND  # the failed write wrote nothing
    assert customer_rows(regions, "eu", cid) == []
    assert get(p["service-us"], cid, "rec-1").payload == b"must-not-leave"
    assert [r["basis_id"] for r in customer_rows(regions, "eu", cid)] == [DPF]


# --------------------------------------------------------------------------------------------
# 4. tampering by SQL as a superuser, each found by VerifyLedger at the right position


def _sealed_entries(regions, p, region="in", n=5):
    """A fresh customer of `region` whose record is read n times from another region; waits
    until the entries are sealed and the ledger verifies. Returns (cid, [(seq, entry_id,
    hash)]) with consecutive seqs."""
    assert_verifies(p["auditor"], region)
    cid = register(p["admin"], region, prefix="led")
    put(p[OWNER[region]], cid, "rec-1", b"tamper-test")
    for _ in range(n):
        get(p[READER_OF[region]], cid, "rec-1")
    v = assert_verifies(p["auditor"], region)
    chain = chain_of(regions, region, cid)
    assert len(chain) == n
    assert [c[0] for c in chain] == list(range(chain[0][0], chain[0][0] + n)), chain
    assert chain[-1][0] == v.sealed_up_to_seq, (chain, v)
    return cid, chain, v


def _damaged(p, region, kind, seq, before, sealed_up_to=None):
    """VerifyLedger (and Report's state of that region) finds damage `kind` at `seq`; the chain
    read reaches `sealed_up_to` (default: where it did `before`)."""
    v = verify(p["auditor"], region)
    assert not v.ok, v
    assert v.damage == kind, (T.LedgerDamage.Name(v.damage), v)
    assert v.first_bad_seq == seq, (seq, v)
    assert v.detail, v
    assert v.sealed_up_to_seq == (before.sealed_up_to_seq if sealed_up_to is None else sealed_up_to), v
    # Report shows that region's ledger in the same state
    rep = p["auditor"].report(T.ReportRequest(from_unix_ms=now_ms() - 60000), timeout=60)
    state = {s.region: s for s in rep.ledgers}[region]
    assert state.reachable and not state.verified, state
    assert (state.damage, state.first_bad_seq, state.detail) == (kind, seq, v.detail), state
    return v


def _repaired(p, region, before, added=0):
    """The ledger verifies again as `before`, plus `added` entries sealed meanwhile."""
    v = assert_verifies(p["auditor"], region)
    got = (v.sealed_up_to_seq, v.entries_checked)
    assert got == (before.sealed_up_to_seq + added, before.entries_checked + added), (v, before)


def forge_entry(regions, region, cid, to_region, basis, queued=False):
    """A ledger row inserted by SQL as a superuser (a random MAC: the key is not in the
    database), also put in the sealer's queue when `queued`; returns its entry_id."""
    insert = (
        "INSERT INTO domicile.ledger (entry_uuid, at, request_id, principal, method, customer_id, record_count, "
        "bytes, from_region, to_region, direction, purpose, basis_id, outcome, entry_mac) VALUES "
        f"('\\x{os.urandom(16).hex()}', now(), 'forged-{uid()}', 'service-us', 'GetRecord', {lit(cid)}, 1, 10, "
        f"{lit(region)}, {lit(to_region)}, 'read', 'support', {lit(basis)}, 'allowed', '\\x{os.urandom(32).hex()}') "
        "RETURNING entry_id"
    )
    if queued:
        insert = f"WITH f AS ({insert}) INSERT INTO domicile.ledger_seal_queue SELECT entry_id FROM f RETURNING entry_id"
    return int(regions.psql(region, insert).splitlines()[0])


def test_tamper_insert_one_entry(regions, p):
    """A row inserted by SQL (its MAC cannot be computed without the key, so it is random):
    never chained by the sealer, reported INSERTED at the position after the sealed chain."""
    region = "in"
    cid, chain, before = _sealed_entries(regions, p, region)
    forged = None
    try:
        forged = forge_entry(regions, region, cid, "us", DPDP)
        # give the sealers time to (not) chain it: an honest entry written after it is sealed
        get(p["service-us"], cid, "rec-1")
        v = wait_until(
            lambda: verify(p["auditor"], region),
            lambda v: v.unsealed_entries == 0 and v.sealed_up_to_seq == before.sealed_up_to_seq + 1,
        )
        assert v.unsealed_entries == 0 and v.sealed_up_to_seq == before.sealed_up_to_seq + 1, v
        assert not v.ok and v.damage == T.LEDGER_DAMAGE_INSERTED, v
        assert v.first_bad_seq == v.sealed_up_to_seq + 1, v
        assert str(forged) in v.detail, v.detail
        assert scalar(regions, region, f"SELECT count(*) FROM domicile.ledger_chain WHERE entry_id = {forged}") == "0"
    finally:
        if forged is not None:
            regions.psql(region, f"DELETE FROM domicile.ledger WHERE entry_id = {forged}")
    v = assert_verifies(p["auditor"], region)
    assert v.sealed_up_to_seq == before.sealed_up_to_seq + 1 and v.entries_checked == before.entries_checked + 1


def test_forged_entry_in_the_seal_queue_is_dequeued_not_chained(regions, p):
    """The sealer reads a queue of unchained entries instead of scanning the ledger. A forged
    row put in that queue too (as a holder of the gateway's role could) fails its MAC: the
    sealer drops it from the queue without chaining it, honest entries behind it are still
    sealed, the queue empties, and VerifyLedger reports the row INSERTED."""
    region = "eu"
    cid, chain, before = _sealed_entries(regions, p, region)
    assert scalar(regions, region, "SELECT count(*) FROM domicile.ledger_seal_queue") == "0"
    forged = None
    try:
        forged = forge_entry(regions, region, cid, "us", DPF, queued=True)
        get(p[READER_OF[region]], cid, "rec-1")
        v = wait_until(
            lambda: (verify(p["auditor"], region),
                     scalar(regions, region, "SELECT count(*) FROM domicile.ledger_seal_queue")),
            lambda vq: vq[0].sealed_up_to_seq == before.sealed_up_to_seq + 1 and vq[1] == "0",
        )
        v, queued = v
        assert queued == "0" and v.sealed_up_to_seq == before.sealed_up_to_seq + 1, (queued, v)
        assert not v.ok and v.damage == T.LEDGER_DAMAGE_INSERTED and str(forged) in v.detail, v
        assert scalar(regions, region, f"SELECT count(*) FROM domicile.ledger_chain WHERE entry_id = {forged}") == "0"
    finally:
        if forged is not None:
            regions.psql(region, f"DELETE FROM domicile.ledger WHERE entry_id = {forged}")
    assert_verifies(p["auditor"], region)


# Every tamper kind, with and without a forged chain link (issue 14, item 3). A forged link is
# one the attacker wrote into domicile.ledger_chain: links renumbered, a hash overwritten, or a
# new link (its hash random: the chain key is not in the database). VerifyLedger classifies by
# what the MACs, links and witnesses prove (src/api/transfers.c, "Classifying damage"); each
# case names the kind, the position and the exact message.

WITNESS = "(eu|us)"  # the region that witnessed the chain's head (the first to answer)


def _hash():
    """A random 32-byte value as a bytea literal: a link hash nobody could verify."""
    return f"'\\x{os.urandom(32).hex()}'::bytea"


class Tamper:
    """Five sealed entries of a fresh customer at the head of `region`'s chain, saved before a
    case tampers with them as a superuser: the links from the first of them on, their ledger
    rows, and the chain's head as witnessed in the other regions. restore() puts all of it
    back, removes the forged rows, and queues the honest entries written meanwhile again (the
    sealer then chains them after the restored head); the ledger must verify as `before` plus
    those entries."""

    def __init__(self, regions, p, region):
        self.regions, self.p, self.region = regions, p, region
        self.cid, self.chain, self.before = _sealed_entries(regions, p, region)
        self.head = self.chain[-1][0]
        # the sealer stores the head in the other regions right after the seal, asynchronously
        witnessed = wait_until(
            lambda: [
                scalar(regions, w, f"SELECT seq FROM domicile.ledger_witness WHERE region = {lit(region)}")
                for w in REGION_CODES
                if w != region
            ],
            lambda seqs: all(s == str(self.head) for s in seqs),
            timeout=10,
        )
        assert all(s == str(self.head) for s in witnessed), (self.head, witnessed)
        self.links = sql_json(regions, region, f"SELECT * FROM domicile.ledger_chain WHERE seq >= {self.seq(0)} ORDER BY seq")
        assert [(r["seq"], r["entry_id"]) for r in self.links] == [c[:2] for c in self.chain], self.links
        self.rows = [saved_row(regions, region, "ledger", "entry_id", c[1]) for c in self.chain]
        self.last_entry = int(scalar(regions, region, "SELECT max(entry_id) FROM domicile.ledger"))
        self.witnesses = {
            w: sql_json(regions, w, f"SELECT * FROM domicile.ledger_witness WHERE region = {lit(region)}")
            for w in REGION_CODES
            if w != region
        }
        self.forged = []
        self.honest = 0

    def seq(self, i):
        return self.chain[i][0]

    def entry(self, i):
        return self.chain[i][1]

    def sql(self, sql):
        return self.regions.psql(self.region, sql)

    def forge(self):
        """A ledger row with a random MAC (not in the sealer's queue); its entry_id."""
        f = forge_entry(self.regions, self.region, self.cid, "us", DPDP)
        self.forged.append(f)
        return f

    def link(self, seq, entry_id):
        """A forged link: `entry_id` at `seq` with a random hash."""
        self.sql(f"INSERT INTO domicile.ledger_chain (seq, entry_id, chain_hash) VALUES ({seq}, {entry_id}, {_hash()})")

    def renumber(self, first, by):
        """Links from `first` on moved by `by` positions (in two steps: seq is unique)."""
        self.sql(
            f"UPDATE domicile.ledger_chain SET seq = seq + 1000000000 WHERE seq >= {first}; "
            f"UPDATE domicile.ledger_chain SET seq = seq - 1000000000 + {by} WHERE seq >= 1000000000"
        )

    def cut(self, i):
        """Entry i and its link deleted."""
        self.sql(f"DELETE FROM domicile.ledger_chain WHERE seq = {self.seq(i)}; DELETE FROM domicile.ledger WHERE entry_id = {self.entry(i)}")

    def honest_entry(self, sealed_at):
        """A cross-border read logged by the gateway; waits until the sealer chained it at
        `sealed_at` (after whatever the chain's head is)."""
        get(self.p[READER_OF[self.region]], self.cid, "rec-1")
        self.honest += 1
        v = wait_until(
            lambda: verify(self.p["auditor"], self.region),
            lambda v: v.unsealed_entries == 0 and v.sealed_up_to_seq == sealed_at,
        )
        assert v.unsealed_entries == 0 and v.sealed_up_to_seq == sealed_at, v

    def restore(self):
        lo = self.seq(0)
        stmts = [f"DELETE FROM domicile.ledger_chain WHERE seq >= {lo}"]
        if self.forged:
            stmts.append(f"DELETE FROM domicile.ledger WHERE entry_id IN ({', '.join(map(str, self.forged))})")
        stmts.append(restore_sql(self.rows))
        stmts.append(f"INSERT INTO domicile.ledger_chain SELECT * FROM json_populate_recordset(NULL::domicile.ledger_chain, {jlit(self.links)})")
        stmts.append(
            "INSERT INTO domicile.ledger_seal_queue SELECT l.entry_id FROM domicile.ledger l "
            f"WHERE l.entry_id > {self.last_entry} AND NOT EXISTS "
            "(SELECT 1 FROM domicile.ledger_chain c WHERE c.entry_id = l.entry_id) ON CONFLICT DO NOTHING"
        )
        self.sql("; ".join(stmts))
        # after the chain: a head the sealer witnesses now is one of the restored chain's
        for w, saved in self.witnesses.items():
            self.regions.psql(
                w,
                f"DELETE FROM domicile.ledger_witness WHERE region = {lit(self.region)}; "
                f"INSERT INTO domicile.ledger_witness SELECT * FROM json_populate_recordset(NULL::domicile.ledger_witness, {jlit(saved)})",
            )


# Each case tampers through `t` (a Tamper) and returns (kind, seq, message regex, sealed_up_to
# or None for the chain's head before).
NO_MAC = "carries no valid MAC: inserted outside the gateway"
MOVED = "entries were moved or the chain was rewritten"


def edited(t):
    """An entry's content changed; its MAC and link untouched."""
    t.sql(f"UPDATE domicile.ledger SET bytes = bytes + 1000 WHERE entry_id = {t.entry(2)}")
    return "EDITED", t.seq(2), rf"entry {t.entry(2)} \(link {t.seq(2)}\) was changed after it was written: its content no longer matches the MAC sealed there", None


def edited_link_forged(t):
    """An entry's content changed and its link overwritten (to hide the edit): the next link
    still chains over the MAC the gateway sealed at that position."""
    t.sql(
        f"UPDATE domicile.ledger SET basis_id = 'scc-2021-914-m1' WHERE entry_id = {t.entry(2)}; "
        f"UPDATE domicile.ledger_chain SET chain_hash = {_hash()} WHERE seq = {t.seq(2)}"
    )
    return "EDITED", t.seq(2), rf"entry {t.entry(2)} \(link {t.seq(2)}\) was changed after it was written: its content no longer matches the MAC sealed there", None


def edited_newest_link_forged(t):
    """The newest entry changed and its link overwritten: no next link, but the head witnessed
    in another region is the link the gateway sealed over its MAC."""
    t.sql(
        f"UPDATE domicile.ledger SET record_count = 0 WHERE entry_id = {t.entry(4)}; "
        f"UPDATE domicile.ledger_chain SET chain_hash = {_hash()} WHERE seq = {t.head}"
    )
    return "EDITED", t.head, rf"entry {t.entry(4)} \(link {t.head}\) was changed after it was written: its content no longer matches the MAC sealed there", None


def edited_with_its_mac(t):
    """Content and MAC both overwritten, link kept: nothing of the gateway's entry is left, and
    a link the sealer chained over proves nothing (it chains over whatever head it finds, as
    after inserted_linked_at_head_then_chained_over). The entry at that position is not the
    gateway's: INSERTED there."""
    t.sql(f"UPDATE domicile.ledger SET bytes = 1, entry_mac = {_hash()} WHERE entry_id = {t.entry(2)}")
    return "INSERTED", t.seq(2), rf"entry {t.entry(2)} at link {t.seq(2)} {NO_MAC}", None


def edited_newest_with_its_mac(t):
    """The same to the newest entry: the head witnessed in another region is the link kept
    there, and this entry's MAC does not give it, so the gateway's entry there is gone."""
    t.sql(f"UPDATE domicile.ledger SET bytes = 1, entry_mac = {_hash()} WHERE entry_id = {t.entry(4)}")
    return (
        "DELETED",
        t.head,
        rf"the entry sealed at link {t.head} is missing \(region {WITNESS} witnessed a link there that is not this entry's\): "
        rf"entry {t.entry(4)} now at it carries no valid MAC",
        None,
    )


def deleted(t):
    """An entry deleted, its link kept."""
    t.sql(f"DELETE FROM domicile.ledger WHERE entry_id = {t.entry(1)}")
    return "DELETED", t.seq(1), rf"entry {t.entry(1)} \(link {t.seq(1)}\) was deleted", None


def deleted_with_link(t):
    """An entry and its link deleted: a gap."""
    t.cut(3)
    return "DELETED", t.seq(3), rf"chain link {t.seq(3)} is missing", None


def deleted_links_renumbered(t):
    """An entry and its link deleted, the links after it renumbered to close the gap: the next
    link still chains over the moved one at one position further."""
    t.cut(1)
    t.renumber(t.seq(2), -1)
    return (
        "DELETED",
        t.seq(1),
        rf"link {t.seq(1)} is missing: the links after it were renumbered \(entry {t.entry(2)}, now at link {t.seq(1)}, was sealed at link {t.seq(2)}\)",
        t.head - 1,
    )


def deleted_two_links_renumbered(t):
    """Two entries and their links deleted, the links after them renumbered."""
    t.cut(1)
    t.cut(2)
    t.renumber(t.seq(3), -2)
    return (
        "DELETED",
        t.seq(1),
        rf"links {t.seq(1)} to {t.seq(2)} are missing: the links after them were renumbered "
        rf"\(entry {t.entry(3)}, now at link {t.seq(1)}, was sealed at link {t.seq(3)}\)",
        t.head - 2,
    )


def deleted_replaced_by_forged_link(t):
    """An entry deleted and a forged one linked in its place (random hash): the next entry,
    the gateway's, was sealed after a link that is not there."""
    t.sql(f"DELETE FROM domicile.ledger WHERE entry_id = {t.entry(2)}")
    f = t.forge()
    t.sql(f"UPDATE domicile.ledger_chain SET entry_id = {f}, chain_hash = {_hash()} WHERE seq = {t.seq(2)}")
    return (
        "DELETED",
        t.seq(2),
        rf"the entry sealed at link {t.seq(2)} is missing \(link {t.seq(3)} was sealed after another link\): entry {f} now at it carries no valid MAC",
        None,
    )


def inserted(t):
    """A forged entry without a link: never chained."""
    f = t.forge()
    return "INSERTED", t.head + 1, rf"entry {f} {NO_MAC}", None


def inserted_linked_at_head(t):
    """A forged entry with a forged link at head+1 (the case issue 14 found reported EDITED)."""
    f = t.forge()
    t.link(t.head + 1, f)
    return "INSERTED", t.head + 1, rf"entry {f} at link {t.head + 1} {NO_MAC}", t.head + 1


def inserted_linked_at_head_then_chained_over(t):
    """The same, then an honest entry that the sealer chains after the forged link."""
    f = t.forge()
    t.link(t.head + 1, f)
    t.honest_entry(sealed_at=t.head + 2)
    return "INSERTED", t.head + 1, rf"entry {f} at link {t.head + 1} {NO_MAC}", t.head + 2


def inserted_linked_in_the_middle(t):
    """A forged entry linked in the middle, the links after it moved one position on: the next
    entry was sealed at the forged one's position."""
    t.renumber(t.seq(2), 1)
    f = t.forge()
    t.link(t.seq(2), f)
    return "INSERTED", t.seq(2), rf"entry {f} at link {t.seq(2)} {NO_MAC}", t.head + 1


def _swap_contents(t, i, j):
    restore_ledger_rows(t.regions, t.region, [dict(t.rows[j], entry_id=t.entry(i)), dict(t.rows[i], entry_id=t.entry(j))])


def reordered(t):
    """Two entries' contents exchanged under their entry ids (each keeps a valid MAC)."""
    _swap_contents(t, 1, 2)
    return "REORDERED", t.seq(1), rf"link {t.seq(1)} does not follow link {t.seq(1) - 1}: {MOVED}", None


def reordered_links_moved(t):
    """Two links exchanged positions."""
    s0, s3 = t.seq(0), t.seq(3)
    t.sql(
        f"UPDATE domicile.ledger_chain SET seq = seq + 1000000000 WHERE seq IN ({s0}, {s3}); "
        f"UPDATE domicile.ledger_chain SET seq = {s3} WHERE seq = {s0 + 1000000000}; "
        f"UPDATE domicile.ledger_chain SET seq = {s0} WHERE seq = {s3 + 1000000000}"
    )
    return "REORDERED", s0, rf"link {s0} does not follow link {s0 - 1}: {MOVED}", None


def reordered_links_forged(t):
    """Two entries' contents exchanged and both their links overwritten."""
    _swap_contents(t, 1, 2)
    t.sql(f"UPDATE domicile.ledger_chain SET chain_hash = {_hash()} WHERE seq IN ({t.seq(1)}, {t.seq(2)})")
    return "REORDERED", t.seq(1), rf"link {t.seq(1)} does not follow link {t.seq(1) - 1}: {MOVED}", None


def tail_cut(t):
    """The newest entry and its link deleted: the chain ends before the witnessed head."""
    t.cut(4)
    return "DELETED", t.head, rf"link {t.head} is missing: region {WITNESS} witnessed the chain up to link {t.head}", t.head - 1


def tail_cut_forged_in_its_place(t):
    """The newest entry and its link deleted, a forged entry linked in their place: the head
    witnessed in another region is another link."""
    t.cut(4)
    f = t.forge()
    t.link(t.head, f)
    return (
        "DELETED",
        t.head,
        rf"the entry sealed at link {t.head} is missing \(region {WITNESS} witnessed a link there that is not this entry's\): "
        rf"entry {f} now at it carries no valid MAC",
        None,
    )


def tail_cut_sealed_again(t):
    """The newest entry and its link deleted, then an honest entry sealed in its place by the
    gateway: a valid link, but not the one witnessed."""
    t.cut(4)
    t.honest_entry(sealed_at=t.head)
    return "DELETED", t.head, rf"link {t.head} is not the one region {WITNESS} witnessed: the chain was cut at or before it and sealed again", None


TAMPERS = [
    edited,
    edited_link_forged,
    edited_newest_link_forged,
    edited_with_its_mac,
    edited_newest_with_its_mac,
    deleted,
    deleted_with_link,
    deleted_links_renumbered,
    deleted_two_links_renumbered,
    deleted_replaced_by_forged_link,
    inserted,
    inserted_linked_at_head,
    inserted_linked_at_head_then_chained_over,
    inserted_linked_in_the_middle,
    reordered,
    reordered_links_moved,
    reordered_links_forged,
    tail_cut,
    tail_cut_forged_in_its_place,
    tail_cut_sealed_again,
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[f.__name__ for f in TAMPERS])
def test_tamper_is_classified_with_and_without_a_forged_link(regions, p, tamper):
    t = Tamper(regions, p, "in")
    try:
        kind, seq, message, sealed_up_to = tamper(t)
        v = _damaged(p, t.region, getattr(T, "LEDGER_DAMAGE_" + kind), seq, t.before, sealed_up_to)
        assert re.fullmatch(message, v.detail), (message, v.detail)
    finally:
        t.restore()
    _repaired(p, t.region, t.before, added=t.honest)


def test_report_ledger_state_names_the_damage(regions, p):
    """transfers.proto LedgerState.damage: "Kind of damage; NONE when verified" (fixed in
    c645aeb; before it, the field was never set)."""
    rep = p["auditor"].report(T.ReportRequest(from_unix_ms=now_ms() - 1000), timeout=60)
    for s in rep.ledgers:
        assert s.verified, s
        assert s.damage == T.LEDGER_DAMAGE_NONE, (s.region, T.LedgerDamage.Name(s.damage))
    cid, chain, before = _sealed_entries(regions, p, "in", n=2)
    saved = saved_row(regions, "in", "ledger", "entry_id", chain[0][1])
    try:
        regions.psql("in", f"UPDATE domicile.ledger SET bytes = bytes + 1 WHERE entry_id = {chain[0][1]}")
        rep = p["auditor"].report(T.ReportRequest(from_unix_ms=now_ms() - 1000), timeout=60)
        state = {s.region: s for s in rep.ledgers}["in"]
        assert state.damage == T.LEDGER_DAMAGE_EDITED, T.LedgerDamage.Name(state.damage)
    finally:
        restore_ledger_rows(regions, "in", [saved])
        _repaired(p, "in", before)


# --------------------------------------------------------------------------------------------
# 6. reports: a known mixed workload across the three regions


def _report_groups(rep):
    """Report rows summed over months: {(from, to, basis, purpose): [transfers, records, bytes, refusals]}."""
    out = {}
    for r in rep.rows:
        assert re.fullmatch(r"\d{4}-\d{2}", r.month), r
        g = out.setdefault((r.from_region, r.to_region, r.basis_id, r.purpose), [0, 0, 0, 0])
        for i, v in enumerate((r.transfers, r.records, r.bytes, r.refusals)):
            g[i] += v
    return {k: tuple(v) for k, v in out.items()}


def test_report_totals_equal_a_known_workload(regions, p):
    ceu, cus, cin = (register(p["admin"], r, prefix="led") for r in ("eu", "us", "in"))
    eu_payload, us_payload = os.urandom(1000), os.urandom(300)
    in_payloads = [os.urandom(n) for n in (11, 222, 3333)]
    put(p["service-eu"], ceu, "e1", eu_payload)
    put(p["service-us"], cus, "u1", us_payload)
    for i, pl in enumerate(in_payloads):
        put(p["service-in"], cin, f"i{i}", pl)
    for r in ("eu", "us", "in"):
        assert_verifies(p["auditor"], r)

    expected = {}

    def add(key, transfers=0, records=0, nbytes=0, refusals=0):
        g = expected.setdefault(key, [0, 0, 0, 0])
        for i, v in enumerate((transfers, records, nbytes, refusals)):
            g[i] += v

    t0 = now_ms() - 1
    dpf_ids = []
    for _ in range(3):  # eu -> us, DPF, support
        rid = f"dpf-{uid()}"
        assert get(p["service-us"], ceu, "e1", request_id=rid).payload == eu_payload
        dpf_ids.append(rid)
    add(("eu", "us", DPF, "support"), 3, 3, 3 * len(eu_payload))
    for _ in range(2):  # eu -> in, SCC module 2, analytics
        get(p["service-in"], ceu, "e1", purpose="analytics")
    add(("eu", "in", SCC2, "analytics"), 2, 2, 2 * len(eu_payload))
    for i, n in enumerate((40, 50)):  # in -> us writes into a US customer, DPDP s.16
        put(p["service-in"], cus, f"w{i}", b"w" * n)
    add(("in", "us", DPDP, "support"), 2, 2, 90)
    got = list_records(p["service-us"], cin, include_payload=True)  # in -> us, one chunk
    assert len(got) == 3
    add(("in", "us", DPDP, "support"), 1, 3, sum(len(x) for x in in_payloads))
    get(p["service-eu"], cin, "i1")  # in -> eu
    add(("in", "eu", DPDP, "support"), 1, 1, len(in_payloads[1]))
    get(p["service-eu"], cus, "u1", purpose="billing")  # us -> eu
    add(("us", "eu", USNR, "billing"), 1, 1, len(us_payload))
    put(p["service-us"], ceu, "w-from-us", b"z" * 64)  # us -> eu write
    add(("us", "eu", USNR, "support"), 1, 1, 64)
    for _ in range(2):  # refusals
        rpc_error(get, p["service-in"], ceu, "e1", purpose="model-training")
    add(("eu", "in", "", "model-training"), refusals=2)
    rpc_error(put, p["service-us"], ceu, "e-sale", b"s", metadata=md("sale"))
    add(("us", "eu", "", "sale"), refusals=1)
    rpc_error(get, p["service-eu"], cin, "i0", purpose="sale")
    add(("in", "eu", "", "sale"), refusals=1)
    # same-region traffic: not transfers, not in the report
    get(p["service-eu"], ceu, "e1")
    get(p["service-in"], cin, "i2")
    list_records(p["service-us"], cus, include_payload=True)
    rpc_error(get, p["service-eu"], ceu, "e1", purpose="sale")
    t1 = now_ms() + 1
    for r in ("eu", "us", "in"):
        wait_sealed(p["auditor"], r)

    expected = {k: tuple(v) for k, v in expected.items()}
    rep = p["auditor"].report(T.ReportRequest(from_unix_ms=t0, to_unix_ms=t1), timeout=60)
    assert _report_groups(rep) == expected
    assert rep.complete and (rep.from_unix_ms, rep.to_unix_ms) == (t0, t1)
    assert [s.region for s in rep.ledgers] == ["eu", "in", "us"]  # region code order
    for s in rep.ledgers:
        assert s.reachable and s.verified and s.damage == T.LEDGER_DAMAGE_NONE and s.first_bad_seq == 0 and s.detail == "", s
        assert s.entries == ledger_size(regions, s.region)[0], s
    keys = [(r.month, r.from_region, r.to_region, r.basis_id, r.purpose) for r in rep.rows]
    assert keys == sorted(keys)  # (one row per group: see test_report_has_one_row_per_group)
    this_month = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m")
    assert {r.month for r in rep.rows} <= {this_month, datetime.datetime.fromtimestamp(t0 / 1000, datetime.timezone.utc).strftime("%Y-%m")}

    # the same through the admin principal, and filtered
    assert _report_groups(p["admin"].report(T.ReportRequest(from_unix_ms=t0, to_unix_ms=t1), timeout=60)) == expected
    for f in ({"basis_id": DPF}, {"basis_id": DPDP}, {"purpose": "sale"}, {"from_region": "in"}, {"to_region": "eu"}):
        sub = p["auditor"].report(T.ReportRequest(from_unix_ms=t0, to_unix_ms=t1, **f), timeout=60)
        want = {
            k: v
            for k, v in expected.items()
            if all({"from_region": k[0], "to_region": k[1], "basis_id": k[2], "purpose": k[3]}[n] == x for n, x in f.items())
        }
        assert want and _report_groups(sub) == want, f
    # the window's bounds hold: nothing of the workload before t0 or from t1 on
    for c in (ceu, cus, cin):
        assert list_transfers(p["auditor"], customer_id=c, to_unix_ms=t0) == []
        assert list_transfers(p["auditor"], customer_id=c, from_unix_ms=t1) == []

    # "every transfer that relied on basis X": ListTransfers(basis_id) in that window
    relied = list_transfers(p["auditor"], basis_id=DPF, from_unix_ms=t0, to_unix_ms=t1)
    assert sorted(e.request_id for e in relied) == sorted(dpf_ids)
    for e in relied:
        assert (e.region, e.basis_id, e.outcome, e.from_region, e.to_region, e.customer_id) == ("eu", DPF, ALLOWED, "eu", "us", ceu)
        assert (e.record_count, e.bytes, list(e.record_ids)) == (1, len(eu_payload), ["e1"])
        assert e.seq > 0 and len(e.entry_hash_hex) == 64
    # paging returns the same entries
    paged = list_transfers(p["auditor"], basis_id=DPF, from_unix_ms=t0, to_unix_ms=t1, page_size=1)
    assert [e.entry_id for e in paged] == [e.entry_id for e in relied]
    # all entries in the window, every region merged: exactly the workload
    window = list_transfers(p["auditor"], from_unix_ms=t0, to_unix_ms=t1)
    assert len(window) == sum(v[0] + v[3] for v in expected.values())
    assert sum(e.bytes for e in window) == sum(v[2] for v in expected.values())
    assert {e.customer_id for e in window} == {ceu, cus, cin}
    assert len(list_transfers(p["auditor"], from_unix_ms=t0, to_unix_ms=t1, outcome=REFUSED)) == 4
    assert len(list_transfers(p["auditor"], from_unix_ms=t0, to_unix_ms=t1, customer_id=cin)) == 3


# --------------------------------------------------------------------------------------------
# 7. the gateway's database role cannot rewrite the ledger


def _as_gateway_role(regions, region, sql):
    """Runs `sql` connected as domicile_gateway, the way the gateway connects (TLS,
    verify-full, its password); returns the completed process."""
    state = REGIONS_STATE[0]
    port = [n["port"] for n in regions.status_json() if n["region"] == region and n.get("role") == "primary" and n["running"]][0]
    with open(os.path.join(state, "gw", region, "secrets", "db.password")) as f:
        password = f.read().strip()
    conninfo = (
        f"host=127.0.0.1 port={port} dbname=domicile user=domicile_gateway sslmode=verify-full "
        f"sslrootcert={os.path.join(state, 'ca', 'ca.crt')}"
    )
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="10")
    return subprocess.run(
        ["psql", conninfo, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_gateway_role_cannot_update_or_delete_ledger_rows(regions, p):
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"x")
    get(p["service-us"], cid, "rec-1")
    before = assert_verifies(p["auditor"], "eu")
    (seq, entry_id, _), = chain_of(regions, "eu", cid)

    ok = _as_gateway_role(regions, "eu", f"SELECT current_user, (SELECT count(*) FROM domicile.ledger WHERE entry_id = {entry_id})")
    assert ok.returncode == 0 and ok.stdout.strip() == "domicile_gateway|1", (ok.stdout, ok.stderr)

    attempts = [
        ("ledger", f"UPDATE domicile.ledger SET bytes = 0 WHERE entry_id = {entry_id}"),
        ("ledger", f"DELETE FROM domicile.ledger WHERE entry_id = {entry_id}"),
        ("ledger", "TRUNCATE domicile.ledger"),
        ("ledger_chain", f"UPDATE domicile.ledger_chain SET chain_hash = chain_hash WHERE seq = {seq}"),
        ("ledger_chain", f"DELETE FROM domicile.ledger_chain WHERE seq = {seq}"),
        ("ledger_checkpoints", "UPDATE domicile.ledger_checkpoints SET mac = mac"),
        ("ledger_checkpoints", "DELETE FROM domicile.ledger_checkpoints"),
    ]
    for table, sql in attempts:
        r = _as_gateway_role(regions, "eu", sql)
        assert r.returncode != 0, (sql, r.stdout)
        assert f"permission denied for table {table}" in r.stderr, (sql, r.stderr)
        # and the same through SET ROLE on the superuser's session
        r = regions.run("psql", "eu", "-At", "-c", f"SET ROLE domicile_gateway; {sql}", timeout=60, check=False)
        assert r.returncode != 0 and f"permission denied for table {table}" in r.stderr, (sql, r.stderr)

    privs = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
    for table in ("ledger", "ledger_chain", "ledger_checkpoints"):
        got = scalar(
            regions,
            "eu",
            "SELECT " + " || ',' || ".join(f"has_table_privilege('domicile_gateway', 'domicile.{table}', '{x}')::text" for x in privs),
        )
        assert got == "true,true,false,false,false", (table, dict(zip(privs, got.split(","))))
    assert customer_rows(regions, "eu", cid)[0]["entry_id"] == entry_id
    v = assert_verifies(p["auditor"], "eu")
    assert v.sealed_up_to_seq >= before.sealed_up_to_seq


def test_gateway_role_cannot_purge_recent_entries(regions, p):
    """ledger_purge() runs with the owner's rights; whoever holds the gateway's role must not
    be able to erase recent entries through it: a cut-off less than 365 days old is refused
    and nothing is deleted (nor any checkpoint written)."""
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"x")
    get(p["service-us"], cid, "rec-1")
    before = assert_verifies(p["auditor"], "eu")
    (seq, entry_id, h), = chain_of(regions, "eu", cid)
    size = ledger_size(regions, "eu")
    for cutoff in ("now()", "now() + interval '1 day'", "now() - interval '364 days'"):
        r = _as_gateway_role(regions, "eu", f"SELECT domicile.ledger_purge({seq}, '\\x{h}'::bytea, {cutoff}, '\\x{'00' * 32}'::bytea)")
        assert r.returncode != 0, (cutoff, r.stdout)
        assert "less than 365 days old" in r.stderr, (cutoff, r.stderr)
    assert ledger_size(regions, "eu") == size
    assert customer_rows(regions, "eu", cid)[0]["entry_id"] == entry_id
    v = assert_verifies(p["auditor"], "eu")
    assert v.sealed_up_to_seq == before.sealed_up_to_seq and v.HasField("checkpoint") == before.HasField("checkpoint"), v


# --------------------------------------------------------------------------------------------
# Contract deviations found while writing these tests: product bugs, reported to the lead.
# strict xfail: each of these fails the run once the product is fixed, so that its marker
# gets removed and the test becomes a plain regression test.


def test_report_has_one_row_per_group(regions, p):
    """transfers.proto: Report rows are "grouped by UTC calendar month x route x basis_id x
    purpose". in -> us transfers are logged in IN's ledger (reads of IN data from the US) and
    in US's ledger (writes from IN into US customers): they form one group, one row."""
    cin, cus = register(p["admin"], "in", prefix="led"), register(p["admin"], "us", prefix="led")
    put(p["service-in"], cin, "i1", b"abc")
    t0 = now_ms() - 1
    get(p["service-us"], cin, "i1")  # in -> us read: IN's ledger
    put(p["service-in"], cus, "u1", b"defg")  # in -> us write: US's ledger
    t1 = now_ms() + 1
    rep = p["auditor"].report(T.ReportRequest(from_unix_ms=t0, to_unix_ms=t1, basis_id=DPDP), timeout=60)
    rows = [(r.month, r.from_region, r.to_region, r.basis_id, r.purpose, r.transfers, r.records, r.bytes) for r in rep.rows]
    assert len(rows) == 1 and rows[0][1:] == ("in", "us", DPDP, "support", 2, 2, 7), rows


def test_refusal_names_the_basis_not_in_force(regions, gateways, p):
    """transfers.proto TransferEntry.basis_id: "for a refusal, the basis that was considered but
    not in force (e.g. revoked), else empty"."""
    policy = write_policy(regions, gateways.workdir, "scc-revoked", revoke={SCC2: utc_day(-1)})
    gw = Principals(start(gateways, name="scc-revoked", overrides=policy))
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "rec-1", b"r")
    assert rpc_error(get, gw["service-in"], cid, "rec-1").code() == SC.PERMISSION_DENIED
    r = customer_rows(regions, "eu", cid)[-1]
    assert r["outcome"] == "refused" and r["refusal_reason"] == "no basis of the route is in force", r
    assert r["basis_id"] == SCC2, r


def test_checkpoint_says_when_and_how_many(p):
    """transfers.proto LedgerCheckpoint: created_at_unix_ms "When the checkpoint was written",
    entries_purged "Entries purged under this checkpoint"."""
    if not _RETENTION:
        pytest.skip("needs test_retention_purge_leaves_a_verifying_chain to have run first")
    cp = verify(p["auditor"], _RETENTION["region"]).checkpoint
    assert cp.valid
    assert abs(cp.created_at_unix_ms - _RETENTION["purged_at_ms"]) < 5 * 60000, cp
    assert cp.entries_purged == _RETENTION["purged"], cp


def test_list_transfers_merges_regions_by_time(regions, p):
    """transfers.proto ListTransfers: entries "ordered by at_unix_ms, then region, then
    entry_id"; with an empty region "the ledgers of every region are merged"."""
    ceu, cus = register(p["admin"], "eu", prefix="led"), register(p["admin"], "us", prefix="led")
    put(p["service-eu"], ceu, "e", b"1")
    put(p["service-us"], cus, "u", b"2")
    t0 = now_ms() - 1
    get(p["service-us"], ceu, "e")  # EU ledger
    get(p["service-eu"], cus, "u")  # US ledger
    get(p["service-us"], ceu, "e")  # EU ledger
    t1 = now_ms() + 1
    got = list_transfers(p["auditor"], from_unix_ms=t0, to_unix_ms=t1)
    assert len(got) == 3
    keys = [(e.at_unix_ms, e.region, e.entry_id) for e in got]
    assert keys == sorted(keys), keys
    assert [e.region for e in got] == ["eu", "us", "eu"], keys
    # pages resume after the last entry sent, in every region
    for size in (1, 2):
        paged = list_transfers(p["auditor"], from_unix_ms=t0, to_unix_ms=t1, page_size=size)
        assert [(e.at_unix_ms, e.region, e.entry_id) for e in paged] == keys, (size, paged)


def test_list_transfers_filters_by_subject_principal_and_direction(regions, p):
    """ListTransfers' subject (matched by its HMAC key, after normalising), principal and
    direction filters, alone and together; bad values are INVALID_ARGUMENT."""
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "a", b"alice's", subject="alice@example.com")
    put(p["service-eu"], cid, "b", b"bob's", subject="bob@example.com")
    t0 = now_ms() - 1
    get(p["service-us"], cid, "a")  # read eu -> us, alice
    get(p["service-us"], cid, "b")  # read eu -> us, bob
    get(p["service-in"], cid, "a")  # read eu -> in, alice
    put(p["admin"], cid, "c", b"more", subject="alice@example.com")  # write us -> eu, alice
    t1 = now_ms() + 1

    def ids(**f):
        got = list_transfers(p["auditor"], from_unix_ms=t0, to_unix_ms=t1, customer_id=cid, **f)
        return sorted((e.principal, T.TransferDirection.Name(e.direction), e.record_ids[0]) for e in got)

    R, W = "TRANSFER_DIRECTION_READ", "TRANSFER_DIRECTION_WRITE"
    assert ids() == [("admin", W, "c"), ("service-in", R, "a"), ("service-us", R, "a"), ("service-us", R, "b")]
    alice = [("admin", W, "c"), ("service-in", R, "a"), ("service-us", R, "a")]
    assert ids(subject="alice@example.com") == alice
    assert ids(subject="  ALICE@example.com ") == alice  # normalised as on PutRecord
    assert ids(subject="carol@example.com") == []
    assert ids(principal="service-us") == [("service-us", R, "a"), ("service-us", R, "b")]
    assert ids(direction=T.TRANSFER_DIRECTION_WRITE) == [("admin", W, "c")]
    assert ids(direction=T.TRANSFER_DIRECTION_READ, subject="alice@example.com",
               principal="service-in") == [("service-in", R, "a")]
    for bad in ({"principal": "no spaces"}, {"principal": "x" * 129}, {"subject": "s" * 400},
                {"direction": 7}):
        e = rpc_error(list_transfers, p["auditor"], **bad)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, e.details())
        assert next(iter(bad)) in e.details(), (bad, e.details())


def test_list_transfers_pages_walk_an_index(regions, p):
    """Every ListTransfers filter reads its page as one index range in (at, entry_id) order,
    from where the previous page ended: ledger_page() (006_ledger_page.sql) plans the query
    with only the filters given. The single statement it replaced ("$n = '' OR column = $n"
    per filter) could not use an index once it had a generic plan: every page scanned and
    sorted the whole ledger. Seq scans, bitmap scans and sorts are switched off so that the
    plan shows what an index can serve, whatever the table's size."""
    cid = register(p["admin"], "eu", prefix="led")
    put(p["service-eu"], cid, "a", b"alice's", subject="alice@example.com")
    get(p["service-us"], cid, "a")
    subject = f"(SELECT subject_key FROM domicile.records WHERE customer_id = {lit(cid)} AND record_id = 'a')"
    after = "(extract(epoch from now()) * 1000)::bigint - 60000, 1"  # a next page
    cases = {  # index: (from_ms, to_ms, ..., customer, after_ms, after_id, limit, direction, principal, subject)
        "ledger_by_time_id": f"0, 0, '', '', '', '', '', '', {after}, 100, '', '', NULL",
        "ledger_by_customer": f"0, 0, '', '', '', '', '', {lit(cid)}, {after}, 100, '', '', NULL",
        "ledger_by_subject": f"0, 0, '', '', '', '', '', '', {after}, 100, '', '', {subject}",
        "ledger_by_principal": f"0, 0, '', '', '', '', '', '', {after}, 100, '', 'service-us', NULL",
        "ledger_by_basis": f"0, 0, '', '', 'scc-2021-m1', '', '', '', {after}, 100, '', '', NULL",
    }
    for index, args in cases.items():
        sql = (
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
            "SET auto_explain.log_nested_statements = on; SET auto_explain.log_level = notice; "
            "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off; "
            f"SELECT count(*) FROM domicile.ledger_page({args})"
        )
        notices = regions.run("psql", "eu", "-At", "-c", sql, timeout=60).stderr
        plan = notices.split("Query Text: SELECT l.entry_id FROM domicile.ledger l", 1)[-1].split("NOTICE:", 1)[0]
        assert f"using {index} on ledger l" in plan, (index, notices)
        assert "ROW(at, entry_id) > ROW(" in plan.split("Index Cond:", 1)[-1], (index, plan)
        assert "Sort" not in plan and "Seq Scan" not in plan, (index, plan)
    # and the gateway lists through it: the same entry, by subject and by principal
    for f in ({"subject": "alice@example.com"}, {"principal": "service-us"}):
        got = list_transfers(p["auditor"], region="eu", customer_id=cid, **f)
        assert [(e.principal, e.record_ids[0]) for e in got] == [("service-us", "a")], (f, got)
