"""
The region failover drill (issue 7, DESIGN.md §7): `domicilectl drill failover` against the
session's regions and a gateway of this test. Twice on eu (node1 -> node2, then back) and once on
in; each run must meet every zero-goal (nothing lost, duplicated or misplaced, no cross-border
read missing from the ledger, no error in the other regions), move the primary to the other node
and leave the region with a synchronous standby again.

The regions are left healthy (both nodes running, standby `sync`) even when a drill fails, so
that the tests after this one find the layout they expect (any node may be primary).
"""

import json
import os
import subprocess

from conftest import BUILD_DIR, DOMICILE_LOCAL, REGION_CODES, REGIONS_STATE, SERVING, wait_health
from helpers import region_layout

DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")
GOALS = ("lost", "duplicates", "misplaced", "ledger_missing", "other_region_errors", "read_anomalies")


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


def _drill(gw, state, region):
    cmd = [DOMICILECTL, "--addr", gw.address, "drill", "failover", "--region", region,
           "--duration", "20s", "--state", state, "--json", "-",
           "--domicile-local", DOMICILE_LOCAL]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        report = None
    where = f"\n--- stderr (the report's table)\n{p.stderr}\n--- stdout\n{p.stdout}"
    assert report is not None, f"drill of {region} printed no JSON report (exit {p.returncode}){where}"
    missed = {g: report[g] for g in GOALS if report[g] != 0}
    first = {r["region"]: r["first_errors"] for r in report["regions"] if r["first_errors"]}
    assert not missed, f"drill of {region}: zero-goals missed {missed}; first errors {first}{where}"
    assert report["recovered"], f"drill of {region}: no write succeeded after the promotion{where}"
    assert p.returncode == 0, f"drill of {region} exited {p.returncode}{where}"
    assert report["passed"] and report["region"] == region
    return report


def test_failover_drill_twice_on_eu_once_on_in(regions, gateways, session_gateway):
    state = REGIONS_STATE[0]
    gw = gateways.start(name="drill")
    try:
        for region in ("eu", "eu", "in"):
            before, _, _ = region_layout(regions, region)
            report = _drill(gw, state, region)
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
