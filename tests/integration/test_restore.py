"""
Backups and restores (issue 16): pgBackRest through deploy/local/domicile-local, a restored
region held until it is reconciled from the other regions' copies, and the restore drill.

Each restore takes eu back to a backup taken by the same test, so the tests before and after
this module keep their data (what a test writes between its backup and its restore is lost,
by design). A base backup and a restore of eu cost a few seconds each here; the module runs
three of each (about a minute with the drill).
"""

import json
import os
import subprocess
import time

import grpc
import pytest

from conftest import BUILD_DIR, DOMICILE_LOCAL, REGION_CODES, REGIONS_STATE, SERVING, wait_health, wait_until
from helpers import Api, get, key_aad, put, register, rows, rpc_error, scalar, uid, unary_stub
from tokens import RegionToken

from domicile.v1 import subject_rights_pb2 as SR
from domicile.v1 import transfers_pb2

DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")


def _local(regions, *args, check=True):
    p = subprocess.run([DOMICILE_LOCAL, "--state", REGIONS_STATE[0], *args], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, f"domicile-local {' '.join(args)} exited {p.returncode}:\n{p.stderr}"
    return p


def _erase(channel, subject, cid):
    erase = unary_stub(channel, "SubjectRightsService", "Erase", SR.EraseRequest, SR.EraseResponse)
    status = unary_stub(channel, "SubjectRightsService", "GetRequest", SR.GetRequestRequest, SR.GetRequestResponse)
    rid = f"erase-{uid()}"
    erase(SR.EraseRequest(request_id=rid, subject=subject, customer_id=cid, reason="restore test"), timeout=15)
    state = wait_until(lambda: status(SR.GetRequestRequest(request_id=rid), timeout=15).request.state,
                       lambda st: st == SR.DSR_STATE_DONE, timeout=30)
    assert state == SR.DSR_STATE_DONE, f"erasure {rid} not done after 30 s"
    return rid


def _wait_serving(api, cid, rid, timeout=90):
    def attempt():
        try:
            return get(api, cid, rid, timeout=5)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return e

    got = wait_until(attempt, lambda r: not isinstance(r, grpc.RpcError), timeout=timeout)
    assert not isinstance(got, grpc.RpcError), f"eu does not serve {timeout} s after the restore: {got.details()}"
    return got


def _last_restore(regions):
    row = regions.psql("eu", "select source || '|' || state || '|' || coalesce(report::text, '') "
                             "from domicile.restores order by restore_id desc limit 1").strip()
    source, state, report = row.split("|", 2)
    return source, state, json.loads(report) if report else None


def _wait_witnessed(regions, region="eu", by=("us", "in"), timeout=30):
    """Waits until every region of `by` has stored `region`'s current high-water mark and the
    head of its ledger chain, after every entry committed so far is sealed (the gateways
    exchange them every second): what a restore of `region` must then find it lost."""
    entries = int(scalar(regions, region, "select count(*) from domicile.ledger"))
    mark = int(scalar(regions, region, "select mark from domicile.region_mark"))

    def head():
        return int(scalar(regions, region, "select coalesce(max(seq), 0) from domicile.ledger_chain"))

    assert wait_until(head, lambda h: h >= entries, timeout=timeout) >= entries, "not sealed"
    seq = head()
    for other in by:
        seen = wait_until(
            lambda: rows(regions, other, "select (select coalesce(max(seq), 0) from domicile.ledger_witness where "
                                         f"region = '{region}'), (select coalesce(max(mark), 0) from "
                                         f"domicile.mark_witness where region = '{region}')")[0],
            lambda r: int(r[0]) >= seq and int(r[1]) >= mark, timeout=timeout)
        assert int(seen[0]) >= seq and int(seen[1]) >= mark, (other, seen, seq, mark)


def test_backup_and_restore_refuse_bad_arguments(regions):
    cases = [
        (("backup",), "usage: domicile-local backup REGION"),
        (("backup", "xx"), "unknown region 'xx'"),
        (("backup", "eu", "--type", "weekly"), "backup type must be full, diff or incr, not 'weekly'"),
        (("restore",), "usage: domicile-local restore REGION"),
        (("restore", "mars"), "unknown region 'mars'"),
        (("restore", "eu", "--to", "yesterday-ish"), "--to: 'yesterday-ish' is not a time"),
        (("restore", "eu", "--to", "2999-01-01 00:00:00+00"), "is in the future"),
        (("restore", "eu", "--to", "2001-01-01 00:00:00+00"), "no backup of eu ends before 2001-01-01"),
        (("restore", "eu", "--set", "last-tuesday"), "--set: 'last-tuesday' is not a backup label"),
        (("restore", "eu", "--set", "20010101-000000F"), "--set: no backup 20010101-000000F of eu"),
        (("restore", "eu", "--bogus"), "unknown option --bogus"),
    ]
    _local(regions, "backup", "eu")  # so that the restore cases reach their own checks
    before = regions.psql("eu", "select count(*) from domicile.restores").strip()
    for args, message in cases:
        p = _local(regions, *args, check=False)
        assert p.returncode != 0, (args, p.stderr)
        assert message in p.stderr, (args, p.stderr)
    # Nothing was restored or recorded, and the region still runs with its standby.
    assert regions.psql("eu", "select count(*) from domicile.restores").strip() == before
    layout = {(e["region"], e["node"]): e for e in regions.status_json()}
    assert all(layout[("eu", n)]["running"] for n in ("node1", "node2"))


def test_restored_region_is_held_until_reconciled_and_erased_subject_stays_erased(regions, gateways):
    g = gateways.start(name="restore")
    api = Api(g.channel())
    eu_api = Api(g.peers["eu"].channel())
    in_api = Api(g.peers["in"].channel())
    cid = register(api, "eu")
    subject = f"{uid()}@example.com"
    put(api, cid, "alice", payload=b"alice's data", subject=subject)
    put(api, cid, "plain", payload=b"plain")
    _local(regions, "backup", "eu")
    # After the backup: the erasure (its copies are in us and in), and cross-border reads that
    # seal ledger links the other regions witness.
    rid = _erase(g.channel(token="privacy-officer"), subject, cid)
    assert rpc_error(get, api, cid, "alice").code() == grpc.StatusCode.NOT_FOUND
    for _ in range(3):
        get(api, cid, "plain")
    _wait_witnessed(regions)
    # us down: the restored region cannot read us's copies, so it must stay held.
    regions.stop("us")
    try:
        _local(regions, "restore", "eu")
        # (At eu's own gateway: another region's gateway may not resolve the customer while us,
        # which it must ask too, is down.)
        e = rpc_error(get, eu_api, cid, "plain", timeout=10)
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert 'region "eu" is unavailable: restored from a backup' in e.details(), e.details()
        # Every gateway of eu gathers on its own; one whose statement reached us's gateway
        # before that gateway saw its database go waits for it up to peer_timeout_ms (30 s)
        # before its next round names us.
        deadline = time.monotonic() + 75
        while True:
            details = rpc_error(get, eu_api, cid, "plain", timeout=10).details()
            if "waiting for region us" in details:
                break
            assert time.monotonic() < deadline, details
            time.sleep(0.2)
        assert _last_restore(regions)[1] == "fenced"
    finally:
        regions.start("us")
    assert _wait_serving(eu_api, cid, "plain").payload == b"plain"
    # The erasure was re-applied before eu served: the record is readable through no gateway,
    # and neither it nor a key of the subject is left in the restored database.
    for a in (api, eu_api, in_api):
        assert rpc_error(get, a, cid, "alice").code() == grpc.StatusCode.NOT_FOUND
    left = regions.psql("eu", f"select (select count(*) from domicile.records where customer_id = '{cid}' "
                              f"and record_id = 'alice') + (select count(*) from domicile.data_keys "
                              f"where customer_id = '{cid}' and subject_key <> ''::bytea)").strip()
    assert left == "0"
    source, state, report = _last_restore(regions)
    assert (source, state) == ("domicile-local", "reconciled")
    assert any(q["request_id"] == rid and q["kind"] == "erase" for q in report["requests"]["reapplied_requests"])
    assert report["ledger"]["links_lost"] >= 1 and report["ledger"]["witnessed_by"] in ("us", "in")
    # The ledger verifies again and names the cut.
    v = api.verify_ledger(transfers_pb2.VerifyLedgerRequest(region="eu"), timeout=30)
    assert v.ok, v.detail
    assert v.restore_cuts and v.restore_cuts[-1].valid
    cut = v.restore_cuts[-1]
    assert cut.links_lost == report["ledger"]["links_lost"]
    assert "history cut by a restore" in cut.note and "were lost" in cut.note
    for code in REGION_CODES:
        wait_health(g.channel(), f"domicile.region.{code}", SERVING, timeout=60)


def test_a_region_that_went_back_in_time_is_found_by_the_others_marks(regions, gateways):
    """No restore record (a restore done by hand): the region's high-water mark is lower than
    the mark the other regions witnessed, and its gateway holds and reconciles it."""
    g = gateways.start(name="marks")
    api = Api(g.channel())
    cid = register(api, "eu")
    put(api, cid, "r1", payload=b"x")
    _wait_witnessed(regions)
    before = regions.psql("eu", "select count(*) from domicile.restores").strip()
    regions.psql("eu", "update domicile.region_mark set mark = 1")
    deadline = time.monotonic() + 30
    while regions.psql("eu", "select count(*) from domicile.restores").strip() == before:
        assert time.monotonic() < deadline, "the lowered mark was not noticed"
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while _last_restore(regions)[1] != "reconciled":
        assert time.monotonic() < deadline, _last_restore(regions)
        time.sleep(0.2)
    source, _, report = _last_restore(regions)
    assert source == "witness"
    # (The gateways raised the lowered mark a little before the answers showed it too low.)
    assert report["marks"]["witnessed_mark"] > report["marks"]["restored_mark"]
    assert "found by the marks" in report["target"]
    assert int(regions.psql("eu", "select mark from domicile.region_mark").strip()) > report["marks"]["witnessed_mark"]
    assert _wait_serving(api, cid, "r1").payload == b"x"


@pytest.mark.parametrize("tls", [["--cacert", "/nonexistent/ca.pem"], ["--cacert", "/etc/hostname", "--cert", "/etc/hostname", "--key", "/nonexistent/key.pem"]],
                         ids=["cacert", "key"])
def test_restore_drill_never_falls_back_to_plaintext(regions, tls):
    """A TLS file that cannot be read stops the drill before anything is done (it used to
    carry on in plaintext)."""
    before = regions.psql("eu", "select count(*) from domicile.restores").strip()
    p = subprocess.run([DOMICILECTL, *tls, "drill", "restore", "--region", "eu", "--state", REGIONS_STATE[0],
                        "--domicile-local", DOMICILE_LOCAL], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "drill restore: cannot read the TLS files" in p.stderr, (p.returncode, p.stderr)
    assert regions.psql("eu", "select count(*) from domicile.restores").strip() == before


def test_restore_drill(regions, gateways):
    g = gateways.start(name="rdrill")
    args = []
    for code in REGION_CODES:
        args += ["--gateway", f"{code}={g.federation.gateways[code].address}"]
    cmd = [DOMICILECTL, "--timeout", "3000", "drill", "restore", "--region", "eu", "--state", REGIONS_STATE[0],
           "--json", "-", "--domicile-local", DOMICILE_LOCAL, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    where = f"\n--- stderr\n{p.stderr}\n--- stdout\n{p.stdout[-4000:]}"
    report = json.loads(p.stdout) if p.stdout.strip().startswith("{") else None
    assert report is not None, f"no JSON report (exit {p.returncode}){where}"
    print(p.stderr)
    assert report["drill"] == "restore" and report["region"] == "eu"
    for goal in ("erased_readable", "erased_in_restored_data", "unexplained_missing", "unexpectedly_present",
                 "other_region_errors", "other_regions_lost"):
        assert report[goal] == 0, f"{goal} = {report[goal]}{where}"
    for goal in ("restricted_refused", "objected_refused", "closed_account_closed", "ledger_verifies"):
        assert report[goal] is True, f"{goal}{where}"
    # The writes after the restore point are the ones listed lost (at least the registration
    # made after the backup); every other acknowledged write was read back.
    assert report["lost_writes_count"] == len(report["lost_writes"]) >= 1
    assert any(w["method"] == "RegisterCustomer" for w in report["lost_writes"])
    assert report["writes_before_restore_point_present"] > 0
    assert report["restore_to_serving_ms"] >= 0 and "restored from a backup" in report["held_message"]
    rec = report["reconciliation"]
    assert rec["requests"]["by_kind"] == {"erase": 2, "restrict": 1, "object": 1}, rec["requests"]
    assert rec["closures"]["reapplied"] >= 1
    assert report["ledger_restore_cuts"], report
    assert report["passed"] is True and p.returncode == 0, where


def test_a_backups_copy_of_an_erased_subjects_key_opens_nothing_after_the_crypto_period(regions, gateways,
                                                                                       session_federation):
    """Keys outside the data's backups (docs/backups.md): a data backup holds the data keys as
    they were wrapped then, under the KEK version current then. A gateway with a crypto-period
    rotates the KEK and destroys the superseded version once no data key uses it, so the backup's
    copy of an erased subject's key opens nothing any more, in the token or anywhere. A restore
    of that backup still reads every subject not erased: the restored database takes the live
    key store's re-wrapped keys (without them, every restored record would be DATA_LOSS)."""
    api = Api(session_federation.entry.channel())
    cid = register(api, "eu")
    erased, kept = f"erased-{uid()}@example.com", f"kept-{uid()}@example.com"
    put(api, cid, "erased", payload=b"erased subject's data", subject=erased)
    put(api, cid, "kept", payload=b"kept subject's data", subject=kept)
    key_sql = ("select r.record_id, encode(k.subject_key, 'hex'), encode(k.wrapped, 'hex'), k.kek_version "
               f"from domicile.records r join domicile.data_keys k using (key_id) where r.customer_id = '{cid}'")
    # What the backup holds of the two keys (nothing of this customer is written after it).
    in_backup = {r[0]: (bytes.fromhex(r[1]), bytes.fromhex(r[2]), int(r[3])) for r in rows(regions, "eu", key_sql)}
    assert set(in_backup) == {"erased", "kept"}
    _local(regions, "backup", "eu")
    _erase(session_federation.entry.channel(token="privacy-officer"), erased, cid)

    tok = RegionToken(regions, "eu")
    old = in_backup["erased"][2]
    label = f"domicile-kek-eu.v{old}"
    sk, wrapped, _ = in_backup["erased"]
    # Before the crypto-period ends: the backup's copy opens (a thief with the backup and the token).
    assert len(tok.unwrap(label, wrapped, key_aad("eu", cid, sk))) == 32
    period = gateways.start(only="eu", peers=session_federation, entry="eu",
                            overrides={"kek_rotate_every_s": 2, "kek_retire_after_s": 1})
    try:
        wait_until(lambda: scalar(regions, "eu", f"select state from domicile.kek_versions where version = {old}"),
                   lambda s: s == "retired", timeout=90, interval=0.2)
        assert label not in tok.keys(), period.log
        assert f"KEK version {old} retired by domicile (crypto-period)" in period.log, period.log
        for rid, (sk, wrapped, version) in in_backup.items():
            with pytest.raises(RuntimeError):
                tok.unwrap(f"domicile-kek-eu.v{version}", wrapped, key_aad("eu", cid, sk))
        # The live store has no key of the erased subject, and the kept subject's key, re-wrapped
        # under a version that exists, opens.
        live = {r[0]: (bytes.fromhex(r[1]), bytes.fromhex(r[2]), int(r[3])) for r in rows(regions, "eu", key_sql)}
        assert set(live) == {"kept"}
        sk, wrapped, version = live["kept"]
        assert version > old
    finally:
        period.stop()
    assert len(tok.unwrap(f"domicile-kek-eu.v{version}", wrapped, key_aad("eu", cid, sk))) == 32

    p = _local(regions, "restore", "eu")
    assert "data keys erased since the restore point dropped" in p.stderr, p.stderr
    eu_api = Api(session_federation.gateways["eu"].channel())
    assert _wait_serving(eu_api, cid, "kept").payload == b"kept subject's data"
    for a in (api, eu_api):
        assert rpc_error(get, a, cid, "erased").code() == grpc.StatusCode.NOT_FOUND
    restored = {r[0]: int(r[3]) for r in rows(regions, "eu", key_sql)}
    assert restored == {"kept": version}
    assert scalar(regions, "eu", f"select count(*) from domicile.data_keys where customer_id = '{cid}' "
                                 f"and subject_key = '\\x{in_backup['erased'][0].hex()}'") == "0"
    assert scalar(regions, "eu", f"select state from domicile.kek_versions where version = {old}") == "retired"
