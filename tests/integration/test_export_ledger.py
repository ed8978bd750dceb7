"""
An Export with no customer scope logs one ledger entry per customer whose records left a region
(issue 14, item 1): "every transfer of customer C's data" is one ListTransfers filter, exports
included.
"""

from helpers import Api, paged, put, register, stream_stub, uid

from domicile.v1 import subject_rights_pb2 as SR
from domicile.v1 import transfers_pb2 as TR


def _export(channel, **kw):
    stream = stream_stub(channel, "SubjectRightsService", "Export", SR.ExportRequest, SR.ExportResponse)
    chunks = list(stream(SR.ExportRequest(**kw), timeout=60))
    assert chunks[-1].WhichOneof("item") == "manifest"
    return [c.line for c in chunks[:-1]], chunks[-1].manifest


def test_all_customer_export_is_logged_per_customer(session_federation, regions):
    g = session_federation.entry
    admin = Api(g.channel(token="admin"))
    auditor = Api(g.channel(token="auditor"))
    subject = f"person-{uid()}@example.com"
    # Two customers in two regions each (us and in): the officer runs in eu, so every part
    # crosses a border.
    custs = {(r, k): register(admin, r, prefix="exp") for r in ("us", "in") for k in (0, 1)}
    written = {}
    for (r, k), cid in custs.items():
        for n in range(k + 1):  # customer 0: one record, customer 1: two
            rid = f"r{n}"
            put(admin, cid, rid, payload=b"p" * (10 + n), subject=subject)
            written.setdefault(cid, []).append((rid, 10 + n))
    rid = f"export-{uid()}"
    # The officer calls the gateway of its own region (eu): no part passes through a third one.
    lines, manifest = _export(session_federation["eu"].channel(token="privacy-officer"), request_id=rid, subject=subject)
    assert manifest.total_records == 6 and len(lines) == 6

    for (r, _), cid in custs.items():
        entries = [t for t in paged(auditor.list_transfers, TR.ListTransfersRequest, "entry", customer_id=cid)
                   if t.request_id == rid]
        # One entry for this customer's records, in its region's ledger, none named "*".
        assert len(entries) == 1, (cid, entries)
        e = entries[0]
        assert (e.customer_id, e.method, e.from_region, e.to_region) == (cid, "Export", r, "eu"), e
        assert e.record_count == len(written[cid]), e
        assert e.bytes == sum(b for _, b in written[cid]), e
        assert sorted(e.record_ids) == sorted(x for x, _ in written[cid]), e
    for r in ("us", "in"):
        assert regions.psql(r, f"SELECT count(*) FROM domicile.ledger WHERE request_id = '{rid}' "
                               "AND customer_id = '*'") == "0"
