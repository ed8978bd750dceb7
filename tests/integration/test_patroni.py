"""
deploy/local with one region under Patroni (issue 9 item 6): `domicile-local up --patroni eu`
runs eu's two nodes under Patroni 3 with a single-node etcd instead of plain streaming
replication, and `domicilectl drill failover --region eu` passes against it. For a Patroni
region domicile-local's `kill` is `patronictl failover --candidate <standby>`, `promote` waits
for Patroni's new leader to accept writes and `rejoin` for the old leader to be its sync
standby again, so the drill itself is unchanged.

The test has its own state directory, ports and gateway (not the session's regions). It installs
Patroni and etcd through `deploy/deps.sh patroni` when they are missing and is skipped, saying
why, only when that is impossible.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import BUILD_DIR, DOMICILE_LOCAL, SOURCE_DIR, GatewayFactory, _traversable_tmpdir, regions_up
from helpers import region_layout

DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")
DEPS = os.path.join(SOURCE_DIR, "deploy", "deps.sh")
GOALS = ("lost", "duplicates", "misplaced", "ledger_missing", "other_region_errors", "read_anomalies")
REGION = "eu"


def _have_patroni():
    return all(shutil.which(t) for t in ("patroni", "patronictl", "etcd"))


def _ensure_patroni():
    if _have_patroni():
        return
    if os.geteuid() != 0:
        pytest.skip("Patroni/etcd are not installed and the test is not root: cannot run "
                    "`deploy/deps.sh patroni` (apt-get install patroni etcd-server)")
    try:
        p = subprocess.run(["bash", DEPS, "patroni"], capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"Patroni/etcd cannot be installed: `deploy/deps.sh patroni` failed: {e}")
    if p.returncode != 0 or not _have_patroni():
        pytest.skip("Patroni/etcd cannot be installed: `deploy/deps.sh patroni` exited "
                    f"{p.returncode}:\n{p.stderr[-2000:]}")


@pytest.fixture(scope="module")
def patroni_regions():
    _ensure_patroni()
    if not os.access(os.path.join(BUILD_DIR, "domiciled"), os.X_OK) or not os.access(DOMICILECTL, os.X_OK):
        pytest.fail(f"domiciled/domicilectl not found in {BUILD_DIR}: build first")
    tmp = tempfile.mkdtemp(prefix="domicile-pt-", dir=_traversable_tmpdir())
    os.chmod(tmp, 0o755)
    state = os.path.join(tmp, "state")
    try:
        yield regions_up(tmp, state, "--patroni", REGION, timeout=300)
    finally:
        if os.path.exists(os.path.join(state, "local.env")):
            subprocess.run([DOMICILE_LOCAL, "--state", state, "destroy"], capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


def _patroni_members(regions):
    """{member: role} from `patronictl list -f json`."""
    yml = os.path.join(regions.state, "patroni", f"{REGION}-node1.yml")
    p = subprocess.run(["patronictl", "-c", yml, "list", "-f", "json"], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL, cwd="/")
    assert p.returncode == 0, f"patronictl list failed: {p.stderr}"
    return {m["Member"]: m["Role"] for m in json.loads(p.stdout)}


def _drill(gw, regions, crash=False):
    cmd = [DOMICILECTL, "--addr", gw.address, "drill", "failover", "--region", REGION,
           "--duration", "15s", "--state", regions.state, "--json", "-",
           "--domicile-local", DOMICILE_LOCAL]
    env = dict(os.environ, DOMICILE_PATRONI_KILL="crash" if crash else "failover")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, env=env)
    where = f"\n--- stderr (the report's table)\n{p.stderr}\n--- stdout\n{p.stdout}"
    try:
        report = json.loads(p.stdout)
    except ValueError:
        report = None
    assert report is not None, f"drill printed no JSON report (exit {p.returncode}){where}"
    missed = {g: report[g] for g in GOALS if report[g] != 0}
    assert not missed, f"zero-goals missed {missed}{where}"
    assert report["recovered"], f"no write succeeded after the failover{where}"
    assert p.returncode == 0 and report["passed"] and report["region"] == REGION, where
    if crash:  # the leader's Patroni and PostgreSQL were SIGKILLed; Patroni promoted the standby
        assert "SIGKILL" in p.stderr and "patronictl failover" not in p.stderr, where
    else:  # the drill's kill step went through Patroni, not SIGKILL
        assert "patronictl failover" in p.stderr, where
    return report


def test_patroni_region_passes_the_failover_drill(patroni_regions):
    """Two drills: node1 -> node2 by `patronictl failover`, then back by a crash (SIGKILL of
    the leader's Patroni and PostgreSQL: Patroni promotes the synchronous standby once the
    leader key expires, and the crashed node rejoins as its standby). The second needs
    Patroni's own view of the synchronous standby to have caught up after the first."""
    regions = patroni_regions
    before, repl, running = region_layout(regions, REGION)
    assert repl == "sync" and running == 2, f"{REGION} under Patroni: standby {repl}, {running} nodes"
    members = _patroni_members(regions)
    assert members[before] == "Leader" and "Sync Standby" in members.values(), members

    workdir = tempfile.mkdtemp(prefix="gw-", dir=regions.tmp)
    gateways = GatewayFactory(regions, workdir)
    try:
        gw = gateways.start(name="patroni-drill")
        for crash in (False, True):
            before, _, _ = region_layout(regions, REGION)
            report = _drill(gw, regions, crash=crash)
            after, repl, running = region_layout(regions, REGION)
            assert report["primary_before"] == before and report["primary_after"] == after
            assert {before, after} == {"node1", "node2"}, f"primary {before} -> {after}"
            assert repl == "sync" and running == 2, f"after the drill: standby {repl}, {running} nodes running"
            members = _patroni_members(regions)
            assert members[after] == "Leader" and members[before] == "Sync Standby", members
            drilled = next(r for r in report["regions"] if r["region"] == REGION)
            assert drilled["writes_acked"] > 0 and drilled["verified"] == drilled["writes_acked"]
    finally:
        gateways.close()
