"""
The drills (issue 7, DESIGN.md §7; issue 15: through the federation), run by `domicilectl drill`
against the session's regions and a federation of gateways of this test (one per region; two for
eu in the gateway drill). The load calls each region's data at its own gateway and at another
region's (which forwards it), and reads it across the border at a third region's gateway.

- failover: twice on eu (node1 -> node2, then back) and once on in; each run must meet every
  zero-goal (nothing lost, duplicated or misplaced, no cross-border read missing from the ledger,
  no error in the other regions), move the primary to the other node and leave the region with a
  synchronous standby again.
- gateway: eu has two gateways; one of them is SIGKILLed under load. Calls in flight at that
  moment may fail, none after; nothing lost or duplicated; the surviving gateway serves; the
  other regions see no error.

Distance: the federations run without the WAN proxy (fast). DOMICILE_TEST_WAN=1 runs them through
it with the published round trips (deploy/local/README.md, WAN emulation), as issue 15 asks of
the drill:

    DOMICILE_TEST_WAN=1 python3 -m pytest -q tests/integration/test_drill.py

The regions are left healthy (both nodes running, standby `sync`) even when a drill fails, so
that the tests after this one find the layout they expect (any node may be primary).
"""

import json
import os
import subprocess

from conftest import BUILD_DIR, DOMICILE_LOCAL, REGION_CODES, REGIONS_STATE, SERVING, wait_health
from helpers import region_layout, run_on_pty

DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")
GOALS = ("lost", "duplicates", "misplaced", "ledger_missing", "other_region_errors", "read_anomalies")
WAN = os.environ.get("DOMICILE_TEST_WAN", "") not in ("", "0", "off", "no")
# With distance a cross-border call costs up to two round trips of 216 ms: a deadline with room.
CALL_TIMEOUT_MS = "5000" if WAN else "3000"


def _healthy(regions, region):
    primary, repl, running = region_layout(regions, region)
    return primary is not None and repl == "sync" and running == 2


def _restore(regions):
    """Both nodes of every region running and synchronous, whatever a failed drill left:
    `start` brings back stopped nodes (a killed primary that was never replaced comes back
    through crash recovery); `rejoin` turns an old primary into the standby of a promoted one."""
    for region in REGION_CODES:
        if _healthy(regions, region):
            continue
        regions.run("start", region, check=False)
        if not _healthy(regions, region):
            regions.run("rejoin", region, check=False)
        assert _healthy(regions, region), f"{region} could not be restored: {regions.status_json()}"


def _gateway_args(fed):
    """--gateway REGION=ADDR for every gateway of the federation, in each region's order."""
    args = []
    for code in REGION_CODES:
        for g in fed.replicas[code]:
            args += ["--gateway", f"{code}={g.address}"]
    return args


def _run(kind, gw, state, region, *extra, tty=False):
    """The drill with its JSON report on stdout (--json -, or with `tty` -o json) and stderr on a
    pipe, or with `tty` on a terminal: there, and only there, a progress line (issue 18)."""
    json_arg = ["-o", "json"] if tty else ["--json", "-"]
    cmd = [DOMICILECTL, "--addr", gw.address, "--timeout", CALL_TIMEOUT_MS, "drill", kind,
           "--region", region, "--duration", "20s", "--state", state, *json_arg,
           "--domicile-local", DOMICILE_LOCAL, *_gateway_args(gw.federation), *extra]
    if tty:
        rc, out, err = run_on_pty(cmd, timeout=240)
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
    where = f"\n--- stderr (the report's table)\n{stderr}\n--- stdout\n{stdout}"
    assert report is not None, f"{kind} drill of {region} printed no JSON report (exit {rc}){where}"
    if tty:
        # Redrawn in place under the step messages, cleared before the table.
        assert f"\rdrill: {kind} {region}, load; load " in stderr, where
        assert f"\r\x1b[K{kind} drill of {region}, run" in stderr, where
    else:
        assert "\r" not in stderr and "\x1b" not in stderr, f"progress on a pipe{where}"
    # The figures, in the test's output (pytest -s) and in a failure's report.
    print(stderr)
    missed = {g: report[g] for g in GOALS if report[g] != 0}
    first = {r["region"]: r["first_errors"] for r in report["regions"] if r["first_errors"]}
    assert not missed, f"{kind} drill of {region}: zero-goals missed {missed}; first errors {first}{where}"
    assert report["recovered"], f"{kind} drill of {region}: no write succeeded after the kill{where}"
    assert rc == 0, f"{kind} drill of {region} exited {rc}{where}"
    assert report["passed"] and report["region"] == region and report["drill"] == kind
    assert report["gateways_from"] == "--gateway"
    for r in report["regions"]:
        # Every acknowledged write read back; nothing stored that was not acknowledged; the
        # load went through the federation (calls made at another region's gateway).
        assert r["writes_acked"] > 0 and r["verified"] == r["writes_acked"], r
        assert r["records_stored"] == r["writes_acked"], r
        assert r["forwarded_calls"] > 0, r
    return report, where


def test_failover_drill_twice_on_eu_once_on_in(regions, gateways, session_gateway):
    state = REGIONS_STATE[0]
    gw = gateways.start(name="drill", wan=WAN)
    try:
        for region in ("eu", "eu", "in"):
            before, _, _ = region_layout(regions, region)
            report, where = _run("failover", gw, state, region)
            after, repl, running = region_layout(regions, region)
            assert report["primary_before"] == before and report["primary_after"] == after
            assert {before, after} == {"node1", "node2"}, f"{region}: primary {before} -> {after}"
            assert repl == "sync" and running == 2, f"{region}: standby {repl}, {running} nodes running"
            drilled = next(r for r in report["regions"] if r["region"] == region)
            # The outage was seen (the load ran through it) and every acknowledged write of the
            # drilled region was read back.
            assert drilled["writes_acked"] > 0 and drilled["verified"] == drilled["writes_acked"]
            assert report["kill_to_first_write_ms"] > 0
    finally:
        _restore(regions)
        # The session gateway, idle meanwhile, lost its connections to each killed primary:
        # the tests after this one need it serving every region again.
        if session_gateway.alive():
            ch = session_gateway.channel()
            for region in REGION_CODES:
                wait_health(ch, f"domicile.region.{region}", SERVING, timeout=30)


def test_gateway_drill_kills_one_of_two_eu_gateways(regions, gateways):
    state = REGIONS_STATE[0]
    gw = gateways.start(name="drill-gw", replicas={"eu": 2}, wan=WAN)
    fed = gw.federation
    eu1, eu2 = fed.replicas["eu"]
    primaries = {r: region_layout(regions, r)[0] for r in REGION_CODES}
    report, where = _run("gateway", gw, state, "eu", "--victim", "2", "--victim-pid", str(eu2.pid), tty=True)
    # The victim is dead (SIGKILL), the other eu gateway and every other gateway still run.
    assert eu2.wait(timeout=10) == -9, f"eu gateway 2 exited {eu2.returncode}{where}"
    for g in fed.all_gateways():
        assert g is eu2 or g.alive(), f"{g.name} exited{where}"
    assert report["victim"] == {"index": 2, "address": eu2.address, "pid": eu2.pid}
    # Calls in flight at the kill may fail (and a client's first call after it, sent on a
    # connection it had not yet seen closed); none after; nothing forwarded failed.
    assert report["failed_after_kill"] == 0 and report["failed_before_kill"] == 0, where
    assert report["forwarded_errors"] == 0, where
    assert report["failed_in_flight"] <= report["calls_in_flight_at_kill"], where
    for f in report["failures"]:
        assert f["at"] == "drilled region's gateways", f
        assert f["window"] in ("in flight", "first call of its client after the kill"), f
    # The survivor served: direct calls and forwarded calls after the kill succeeded.
    assert report["survivors_serving"] and report["calls_after_kill_ok"] > 0, where
    assert report["forwarded_after_kill_ok"] > 0, where
    # The databases were not touched by the drill: same primaries, standbys synchronous.
    for r in REGION_CODES:
        assert _healthy(regions, r) and region_layout(regions, r)[0] == primaries[r], r
    # Every acknowledged eu write is stored exactly once (version 1), nothing more.
    eu = next(r for r in report["regions"] if r["region"] == "eu")
    rows = regions.psql("eu", "select count(*), count(*) filter (where version <> 1) from domicile.records"
                              f" where customer_id = '{eu['customer']}'")
    assert rows == f"{eu['writes_acked']}|0", (rows, eu)
    # And the survivor still answers on its own.
    wait_health(eu1.channel(token=None), "domicile.region.eu", SERVING, timeout=30)
