"""
deploy/local's `up --kek-source` (issue 17): a region whose KEK is a key file instead of a key in
its token, for the benchmark row that compares the two (tests/bench/run, R10). The token stays
the default; a file is only what `--kek-source REGION=file` asks for, the gateway logs it as
unsafe, a region whose KEK is in its token already is never moved back to a file, and a file
region moves into its token by the documented migration (rotate, then retire version 1).

The module has its own state (three regions, WAN off, fsync off) and gateways: the session's
regions keep their tokens.
"""

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from conftest import DOMICILE_LOCAL, GatewayFactory, _traversable_tmpdir, regions_up
from helpers import Api, get, put, register, uid
from test_keys import Keys
from test_metrics import free_port, scrape, value


@pytest.fixture(scope="module")
def file_regions():
    tmp = tempfile.mkdtemp(prefix="domicile-kek-", dir=_traversable_tmpdir())
    os.chmod(tmp, 0o755)
    state = os.path.join(tmp, "state")
    try:
        yield regions_up(tmp, state, "--kek-source", "us=file", timeout=300)
    finally:
        if os.path.exists(os.path.join(state, "local.env")):
            subprocess.run([DOMICILE_LOCAL, "--state", state, "destroy"], capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def file_gateways(file_regions, tmp_path):
    f = GatewayFactory(file_regions, str(tmp_path))
    yield f
    f.close()


def region_file(regions, code):
    with open(os.path.join(regions.gateway_regions_dir(code), f"{code}.conf")) as f:
        return f.read()


def cpu_seconds(pid, thread):
    """utime + stime so far, in seconds, of the thread of process `pid` named `thread`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip() != thread:
                continue
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    raise AssertionError(f"no thread {thread} in process {pid}")


def kek_env(regions):
    with open(os.path.join(regions.state, "gw", "kek.env")) as f:
        return dict(line.strip().split("=", 1) for line in f if line.startswith("KEK_SOURCE_"))


def test_a_region_with_its_kek_in_a_file(file_regions, file_gateways):
    """`up --kek-source us=file`: us's region file says kek_source = "file" and names a 32-byte
    key file (0600) in us's own secrets; eu and in keep their tokens and have no key file; the
    us gateway serves with the file (KeyStatus, "UNSAFE" in its log), counts the file's wraps
    and unwraps in /metrics like a token's, and idles idle (its custody thread once waited for
    a rotation check that never comes with a key file, and spun a core)."""
    r = file_regions
    us = region_file(r, "us")
    kek = r.secret_path("us", "kek")
    assert re.search(r'^kek_source = "file";', us, re.M), us
    assert re.search(r'^kek_file = "' + re.escape(kek) + '";', us, re.M), us
    st = os.stat(kek)
    assert st.st_size == 32 and stat.S_IMODE(st.st_mode) == 0o600, st
    for code in ("eu", "in"):
        text = region_file(r, code)
        assert re.search(r'^kek_source = "pkcs11";', text, re.M) and "kek_file" not in text, text
        assert not os.path.exists(r.secret_path(code, "kek"))
    assert kek_env(r) == {"KEK_SOURCE_us": "file", "KEK_SOURCE_eu": "pkcs11", "KEK_SOURCE_in": "pkcs11"}
    assert "KEK in a file (unsafe): us" in r.run("status").stdout

    port = free_port()
    g = file_gateways.start(overrides={"metrics_listen": f"127.0.0.1:{port}", "key_cache_entries": 0})
    api, keys = Api(g.channel()), Keys(g.channel())
    cid = register(api, "us", prefix="kekfile")
    for i in range(3):
        put(api, cid, f"r{i}", f"payload {i}".encode())
    for i in range(3):
        assert get(api, cid, f"r{i}").payload == f"payload {i}".encode()
    s = keys.status("us")
    assert s.kek_source == "file" and [(v.version, v.source) for v in s.versions] == [(1, "file")], s
    assert keys.status("eu").kek_source == "pkcs11"
    assert 'kek_source = "file"' in g.log and "UNSAFE" in g.log
    m = scrape(port)
    # No key cache: the first Put wraps a key, every later call unwraps the stored one.
    assert value(m, "domicile_kek_operations_total", region="us", op="wrap") >= 1, m
    assert value(m, "domicile_kek_operations_total", region="us", op="unwrap") >= 5, m
    assert value(m, "domicile_kek_operation_seconds_total", region="us", op="unwrap") > 0, m
    # Idle for 3 s: the custody thread wakes once a second and costs milliseconds; spinning,
    # it took 0.5-3 s of CPU in that time even on a busy machine (2 cores, load 10). Only that
    # thread is measured: the rest of the gateway (gRPC's timers, health checks) is not what
    # this is about, and costs more under the sanitizers.
    c0 = cpu_seconds(g.proc.pid, "dm-custody-us")
    time.sleep(3)
    idle = cpu_seconds(g.proc.pid, "dm-custody-us") - c0
    assert idle < 0.25, f"the idle custody thread of a key-file gateway used {idle:.2f} s of CPU in 3 s"


def test_up_refuses_to_move_a_token_region_to_a_file(file_regions, file_gateways):
    """eu's KEK is in its token (its gateway made version 1 there): `up --kek-source eu=file` is
    refused, naming the region, and changes nothing; a malformed value is refused too."""
    r = file_regions
    file_gateways.start(only="eu")  # makes eu's version 1 in its token, if no test did yet
    before = region_file(r, "eu")
    p = r.run("up", "--kek-source", "eu=file", check=False)
    assert p.returncode != 0
    assert "eu: its KEK is in its token already" in p.stderr, p.stderr
    assert region_file(r, "eu") == before
    assert kek_env(r)["KEK_SOURCE_eu"] == "pkcs11"
    assert not os.path.exists(r.secret_path("eu", "kek"))
    for bad in ("us=hsm", "xx=file", "files"):
        p = r.run("up", "--kek-source", bad, check=False)
        assert p.returncode != 0 and ("--kek-source" in p.stderr or "unknown region" in p.stderr), p.stderr
    assert kek_env(r) == {"KEK_SOURCE_us": "file", "KEK_SOURCE_eu": "pkcs11", "KEK_SOURCE_in": "pkcs11"}


def test_a_file_region_moves_into_its_token(file_regions, file_gateways):
    """`up --kek-source us=pkcs11` on the file region: its file names the token again and keeps
    the key file as kek_file, so data keys the file wrapped still open; `keys rotate us` makes a
    version in the token and re-wraps them, and version 1 can then be retired."""
    r = file_regions
    g = file_gateways.start()  # registration asks every region
    api = Api(g.channel())
    cid = register(api, "us", prefix="kekmove")
    put(api, cid, "old", b"wrapped by the file")
    g.federation.stop()

    r.run("up", "--kek-source", "us=pkcs11")
    us = region_file(r, "us")
    assert re.search(r'^kek_source = "pkcs11";', us, re.M), us
    assert re.search(r'^kek_file = "' + re.escape(r.secret_path("us", "kek")) + '"; # migration', us, re.M), us
    assert kek_env(r)["KEK_SOURCE_us"] == "pkcs11"

    g = file_gateways.start(overrides={"key_cache_entries": 0})
    api, keys = Api(g.channel()), Keys(g.channel())
    assert get(api, cid, "old").payload == b"wrapped by the file"
    rep = keys.rotate("us", request_id=f"rot-{uid()}")
    keys.wait_rotation_done("us", rep.status.rotation.rotation_id)
    s = keys.status("us")
    assert s.kek_source == "pkcs11" and s.current_version == 2, s
    assert {v.version: v.source for v in s.versions} == {1: "file", 2: "pkcs11"}, s
    keys.retire("us", 1)
    assert get(api, cid, "old").payload == b"wrapped by the file"
    put(api, cid, "new", b"wrapped in the token")
    assert get(api, cid, "new").payload == b"wrapped in the token"
