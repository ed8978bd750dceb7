"""
Issue 2 ("Foundation"), item 7: the gateway against three real local regions, called from an
independent gRPC client (Debian's python3-grpcio).
"""

import collections
import concurrent.futures
import importlib
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time

import grpc
import pytest

from conftest import (
    DOMICILE_LOCAL,
    DOMICILED,
    NOT_SERVING,
    REGION_CODES,
    SERVICE_UNKNOWN,
    SERVING,
    STATUS_NAME,
    health_check,
    health_pb2,
    health_watch,
    read_until,
    region_ports,
    wait_health,
    wait_until,
    write_config_copy,
)
from helpers import rpc_error
from grpc.reflection.v1alpha import reflection_pb2  # noqa: E402  (after conftest: grpc.__path__)

V1_MODULES = ("common", "customers", "records", "subject_rights", "transfers", "regions", "keys")


def identity(b):
    return b


def raw_unary(channel, path):
    """A unary method that sends and returns raw bytes: lets a test send any body."""
    return channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)


def list_methods():
    p = subprocess.run([DOMICILED, "--list-methods"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.strip()]
    for r in rows:
        assert len(r) == 4 and r[3].startswith("roles="), f"malformed --list-methods line {r!r}"
    return [r[:3] for r in rows]


def descriptor_methods():
    """{path: kind} for every rpc of our protos, from the Python descriptors (protoc's view,
    independent of the C method table)."""
    mods = [importlib.import_module(f"domicile.v1.{m}_pb2") for m in V1_MODULES] + [
        health_pb2, reflection_pb2, importlib.import_module("domicile.peer.v1.peer_pb2")]
    out = {}
    for mod in mods:
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                if m.server_streaming and m.client_streaming:
                    kind = "bidi-stream"
                elif m.server_streaming:
                    kind = "server-stream"
                elif m.client_streaming:
                    kind = "client-stream"
                else:
                    kind = "unary"
                path = f"/{svc.full_name}/{m.name}"
                assert path not in out
                out[path] = kind
    return out


# --------------------------------------------------------------------------------------------
# health


def test_health_gateway_serving(channel):
    assert health_check(channel, "") == SERVING


@pytest.mark.parametrize("service", ["grpc.health.v1.Health", "domicile.v1.RecordsService", "domicile.v1.RegionsService"])
def test_health_named_gateway_services_serving(channel, service):
    assert health_check(channel, service) == SERVING


@pytest.mark.parametrize("region", REGION_CODES)
def test_health_region_reaches_serving(channel, region):
    seen = wait_health(channel, f"domicile.region.{region}", SERVING, timeout=30)
    assert seen[-1] == SERVING
    # and Check agrees once Watch has said so
    assert health_check(channel, f"domicile.region.{region}") == SERVING


@pytest.mark.parametrize("service", ["no.such.Service", "domicile.region.xx", "domicile.region."])
def test_health_check_unknown_service_not_found(channel, service):
    e = rpc_error(health_check, channel, service)
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
    assert service in e.details()


def test_health_watch_unknown_service_says_service_unknown(channel):
    stream = health_watch(channel, "no.such.Service", timeout=10)
    try:
        first = next(stream)
        assert first.status == SERVICE_UNKNOWN, STATUS_NAME(first.status)
    finally:
        stream.cancel()
    # Cancelling a watch leaves the server serving.
    assert health_check(channel, "") == SERVING


def test_region_outage_and_recovery(regions, gateway, channel):
    """eu's primary and standby stopped: domicile.region.eu goes NOT_SERVING on an open Watch
    stream, us and in stay SERVING; eu started again: SERVING on the same stream, same gateway
    process."""
    pid = gateway.pid
    for r in REGION_CODES:
        wait_health(channel, f"domicile.region.{r}", SERVING, timeout=30)
    stream = health_watch(channel, "domicile.region.eu", timeout=120)
    seen = []
    try:
        read_until(stream, SERVING, time.monotonic() + 10, seen)
        try:
            regions.stop("eu")
            read_until(stream, NOT_SERVING, time.monotonic() + 30, seen)
            assert health_check(channel, "domicile.region.eu") == NOT_SERVING
            assert health_check(channel, "domicile.region.us") == SERVING
            assert health_check(channel, "domicile.region.in") == SERVING
            assert health_check(channel, "") == SERVING  # the gateway itself still serves
        finally:
            regions.start("eu")
        read_until(stream, SERVING, time.monotonic() + 30, seen)
        assert health_check(channel, "domicile.region.eu") == SERVING
    finally:
        stream.cancel()
    assert gateway.alive() and gateway.pid == pid, "the gateway was restarted or died"
    assert any("eu" in l and "region is not serving" in l for l in gateway.log.splitlines()), "no outage logged"
    # The stream reported changes only: SERVING, NOT_SERVING, SERVING.
    assert seen == [SERVING, NOT_SERVING, SERVING], [STATUS_NAME(s) for s in seen]


class TableLock:
    """A psql session on a region's primary holding ACCESS EXCLUSIVE on `table` until
    release() (or until the server ends the session)."""

    def __init__(self, regions, region, table):
        self.proc = subprocess.Popen(
            [DOMICILE_LOCAL, "--state", regions.state, "psql", region, "-At", "-q"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.proc.stdin.write(f"BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\nSELECT pg_backend_pid();\n")
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert r, f"psql did not lock {table} within 30 s"
        line = self.proc.stdout.readline().strip()
        assert line.isdigit(), (line, self.proc.poll())
        self.pid = int(line)

    def release(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=30)


def test_maintenance_cut_off_inside_a_statement_reconnects_and_outage_is_seen(regions, session_federation, gateway):
    """The regions' maintenance (sealer, fences, request legs: one executor of each region's
    pool, between calls) meets a lost connection inside a statement: that executor reconnects
    and the maintenance goes on; and when the whole region stops while a maintenance
    statement runs, the region's own gateway and the others report it NOT_SERVING.

    The sealer's first statement reads domicile.ledger_chain: a lock on it holds the
    statement on the server, so the connection is cut while it runs (before the fix, libpq's
    endless NULLs after a lost connection kept that executor spinning, counted as up: `in`
    stayed SERVING after its database stopped; test_regions met it under load)."""
    region = "in"
    own = session_federation[region].channel(token=None)
    health = gateway.channel(token=None)
    service = f"domicile.region.{region}"

    def waiting(lock):
        """Backends of the region's gateways blocked on the lock."""
        out = regions.psql(region, "SELECT pid FROM pg_stat_activity WHERE application_name = 'domiciled' "
                                   f"AND {lock.pid} = ANY(pg_blocking_pids(pid))")
        return {int(p) for p in out.split()}

    lock = TableLock(regions, region, "domicile.ledger_chain")
    stopped = False
    try:
        cut = wait_until(lambda: waiting(lock), bool, timeout=30)
        assert cut, "no gateway's maintenance waits on the ledger_chain lock"
        ended = regions.psql(region, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                     f"WHERE pid IN ({', '.join(map(str, cut))})")
        assert ended == str(len(cut)), (ended, cut)
        # Each cut executor connects again, and its next maintenance run waits on the lock anew.
        again = wait_until(lambda: waiting(lock) - cut, lambda w: len(w) >= len(cut), timeout=30)
        assert len(again) >= len(cut), f"the maintenance did not come back: {cut} cut, {again} waiting"
        assert health_check(own, service) == SERVING

        # A maintenance statement runs when the region stops.
        regions.stop(region)
        stopped = True
        wait_health(own, service, NOT_SERVING, timeout=30)
        wait_health(health, service, NOT_SERVING, timeout=30)
    finally:
        lock.release()
        if stopped:
            regions.start(region)
    wait_health(own, service, SERVING, timeout=60)
    wait_health(health, service, SERVING, timeout=60)


# --------------------------------------------------------------------------------------------
# unimplemented and unknown methods


def test_unimplemented_method_names_itself(channel):
    """A not-yet-built method, called with a valid request of its type, answers UNIMPLEMENTED
    naming itself. Records/GetRecord while issue 3 has not landed; afterwards the first unary
    method the gateway still lists as unimplemented."""
    from google.protobuf import symbol_database

    listed = {path: impl for path, _kind, impl in list_methods()}
    candidates = ["/domicile.v1.RecordsService/GetRecord"] + sorted(
        p for p, k in descriptor_methods().items() if k == "unary"
    )
    path = next((p for p in candidates if listed.get(p) == "unimplemented"), None)
    if path is None:
        pytest.skip("every unary method is implemented: nothing left to answer UNIMPLEMENTED")
    svc, name = path[1:].split("/")
    mod_method = next(
        m
        for mod in [importlib.import_module(f"domicile.v1.{x}_pb2") for x in V1_MODULES]
        for s in mod.DESCRIPTOR.services_by_name.values()
        if s.full_name == svc
        for m in s.methods
        if m.name == name
    )
    db = symbol_database.Default()
    req_cls = db.GetSymbol(mod_method.input_type.full_name)
    rep_cls = db.GetSymbol(mod_method.output_type.full_name)
    req = req_cls()
    for field, value in (("customer_id", "c-1"), ("record_id", "r-1")):
        if field in req_cls.DESCRIPTOR.fields_by_name:
            setattr(req, field, value)
    call = channel.unary_unary(path, request_serializer=req_cls.SerializeToString, response_deserializer=rep_cls.FromString)
    e = rpc_error(call, req, timeout=5)
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED, (path, e.code(), e.details())
    assert path in e.details()
    assert "not implemented yet" in e.details()


def test_every_unimplemented_method_answers_unimplemented(channel):
    """Every method the gateway lists as unimplemented answers UNIMPLEMENTED naming itself,
    whatever its kind (an empty body is a valid message of every request type)."""
    unimplemented = [(p, k) for p, k, impl in list_methods() if impl == "unimplemented"]
    if not unimplemented:
        pytest.skip("every method is implemented")
    for path, kind in unimplemented:
        if kind == "unary":
            e = rpc_error(raw_unary(channel, path), b"", timeout=5)
        elif kind == "server-stream":
            call = channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)
            e = rpc_error(lambda: list(call(b"", timeout=5)))
        elif kind == "client-stream":
            call = channel.stream_unary(path, request_serializer=identity, response_deserializer=identity)
            e = rpc_error(call, iter([b"", b""]), timeout=5)
        else:
            pytest.fail(f"unexpected kind {kind} for {path}")
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, (path, e.code(), e.details())
        assert path in e.details(), (path, e.details())


@pytest.mark.parametrize(
    "path", ["/domicile.v1.RecordsService/NoSuchMethod", "/no.such.Service/Call", "/domicile.v1.RecordsService"]
)
def test_unknown_method_unimplemented(channel, path):
    e = rpc_error(raw_unary(channel, path), b"", timeout=5)
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED, (e.code(), e.details())
    assert "unknown method" in e.details()
    assert health_check(channel, "") == SERVING


# --------------------------------------------------------------------------------------------
# malformed bodies and size limits


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xff\xff", id="truncated-varint-tag"),
        pytest.param(b"\x0a\x05ab", id="length-past-end"),
        pytest.param(b"\x0a", id="missing-length"),
    ],
)
def test_malformed_body_invalid_argument(channel, body):
    # INVALID_ARGUMENT comes from the gateway's own decode step (protobuf-c unpack of the
    # registered request type), not from gRPC: gRPC core hands the server raw bytes and never
    # parses them, so it has no reason to answer INTERNAL here.
    e = rpc_error(raw_unary(channel, "/grpc.health.v1.Health/Check"), body, timeout=5)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert "cannot parse request" in e.details()
    assert "grpc.health.v1.HealthCheckRequest" in e.details()
    # the server keeps answering
    assert health_check(channel, "") == SERVING


def test_malformed_body_on_stream_invalid_argument(channel):
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=identity, response_deserializer=identity)
    e = rpc_error(lambda: list(watch(b"\xff\xff\xff", timeout=5)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert "grpc.health.v1.HealthCheckRequest" in e.details()
    assert health_check(channel, "") == SERVING


def test_service_name_limit(channel):
    # 256 bytes is allowed (and unknown); 257 and 300 are refused by the health handler.
    e = rpc_error(health_check, channel, "s" * 256)
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
    for n in (257, 300):
        e = rpc_error(health_check, channel, "s" * n)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (n, e.code(), e.details())
        assert "256" in e.details()
    stream = health_watch(channel, "w" * 300, timeout=5)
    e = rpc_error(lambda: list(stream))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert health_check(channel, "") == SERVING


def test_message_over_size_limit(gateways):
    g = gateways.start(overrides={"max_receive_message_bytes": 65536}, name="small-limit")
    ch = g.channel()
    big = "x" * (100 * 1024)
    e = rpc_error(health_check, ch, big)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    # Just under the limit still goes through to the handler (which then refuses the name).
    e = rpc_error(health_check, ch, "x" * 60000)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    # Still serving, on the same channel and on a new one.
    assert health_check(ch, "") == SERVING
    assert health_check(g.channel(), "") == SERVING
    assert g.stop() == 0, g.log


def test_metadata_over_size_limit(gateways):
    """max_metadata_bytes is the configured one, checked per call; the transport's backstop is
    8 times it (at least 1 MiB), so a gateway configured for 1 MiB still answers 2 MiB per call."""
    g = gateways.start(overrides={"max_metadata_bytes": 2048}, name="small-metadata")
    ch = g.channel()
    check = raw_unary(ch, "/grpc.health.v1.Health/Check")
    assert check(b"", metadata=[("x-pad", "a" * 1000)], timeout=5) == b"\x08\x01"  # SERVING
    e = rpc_error(check, b"", metadata=[("x-pad", "a" * 5000)], timeout=5)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert re.fullmatch(r"request metadata is \d+ bytes, limit 2048", e.details()), e.details()
    assert health_check(ch, "") == SERVING  # the same connection
    assert g.stop() == 0, g.log

    g = gateways.start(overrides={"max_metadata_bytes": 1 << 20}, name="large-metadata")
    ch = g.channel()
    watch = health_watch(ch, "", timeout=60)
    assert next(watch).status == SERVING
    check = raw_unary(ch, "/grpc.health.v1.Health/Check")
    assert check(b"", metadata=[("x-pad", "a" * 1000000)], timeout=15) == b"\x08\x01"
    e = rpc_error(check, b"", metadata=[("x-pad", "a" * 2000000)], timeout=15)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
    assert re.fullmatch(r"request metadata is \d+ bytes, limit 1048576", e.details()), e.details()
    assert health_check(ch, "") == SERVING
    assert watch.is_active()
    watch.cancel()
    assert g.stop() == 0, g.log


# --------------------------------------------------------------------------------------------
# shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_watch_stream_ends_cleanly(gateways, sig):
    g = gateways.start(name="shutdown")
    ch = g.channel()
    stream = health_watch(ch, "", timeout=30)
    first = next(stream)
    assert first.status == SERVING
    t0 = time.monotonic()
    g.send_signal(sig)
    rest = []
    try:
        for msg in stream:
            rest.append(msg.status)
    except grpc.RpcError as e:
        pytest.fail(f"the Watch stream failed instead of ending cleanly: {e.code()} {e.details()!r}")
    elapsed = time.monotonic() - t0
    assert stream.code() == grpc.StatusCode.OK, (stream.code(), stream.details())
    assert rest in ([], [NOT_SERVING]), [STATUS_NAME(s) for s in rest]
    assert elapsed < 4.0, f"the stream took {elapsed:.1f}s to end after {sig.name}"
    assert g.wait(timeout=15) == 0, g.log
    assert "exiting cleanly" in g.log


def test_sigterm_with_idle_gateway_exits_zero(gateways):
    g = gateways.start(name="idle")
    assert health_check(g.channel(), "") == SERVING
    assert g.stop(signal.SIGTERM, timeout=15) == 0, g.log
    assert "exiting cleanly" in g.log


def _nofile(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3]), int(line.split()[4])
    raise AssertionError("no open-files line in /proc/PID/limits")


def test_gateway_raises_its_open_files_limit_to_the_hard_limit(gateways):
    """Started with a soft limit of 1024 (a shell's default), the gateway takes the hard limit,
    says so, and serves; below 4096 it warns (gRPC stops accepting for good at EMFILE)."""
    g = gateways.start(name="nofile", wrapper=("prlimit", "--nofile=1024:8192", "--"))
    assert _nofile(g.proc.pid) == (8192, 8192)
    assert health_check(g.channel(), "") == SERVING
    assert "open-files limit raised from 1024 to 8192" in g.log
    assert g.stop(signal.SIGTERM, timeout=15) == 0, g.log
    low = gateways.start(name="nofile-low", wrapper=("prlimit", "--nofile=1024:2048", "--"))
    assert _nofile(low.proc.pid) == (2048, 2048)
    assert "open-files limit is 2048" in low.log
    assert low.stop(signal.SIGTERM, timeout=15) == 0, low.log


# --------------------------------------------------------------------------------------------
# --list-methods


def test_list_methods_matches_descriptors():
    rows = list_methods()
    counts = collections.Counter(path for path, _k, _i in rows)
    dups = [p for p, n in counts.items() if n > 1]
    assert not dups, f"listed more than once: {dups}"
    listed = {path: kind for path, kind, _impl in rows}
    expected = descriptor_methods()
    assert set(listed) - set(expected) == set(), "listed by the gateway but not in the protos"
    assert set(expected) - set(listed) == set(), "in the protos but not listed by the gateway"
    wrong = {p: (listed[p], expected[p]) for p in expected if listed[p] != expected[p]}
    assert not wrong, f"kind differs (gateway, proto): {wrong}"
    for _path, _kind, impl in rows:
        assert impl in ("implemented", "unimplemented")
    impl = {p: i for p, _k, i in rows}
    assert impl["/grpc.health.v1.Health/Check"] == "implemented"
    assert impl["/grpc.health.v1.Health/Watch"] == "implemented"


# --------------------------------------------------------------------------------------------
# --check-config


def check_config(path):
    return subprocess.run([DOMICILED, "--config", path, "--check-config"], capture_output=True, text=True, timeout=30)


def test_check_config_generated_ok(regions):
    p = check_config(regions.conf)
    assert p.returncode == 0, p.stderr
    assert "listen = " in p.stdout
    for r in REGION_CODES:
        assert f'code = "{r}";' in p.stdout
    # Secrets are named, never printed.
    with open(regions.secret_path("us", "db.password")) as f:
        assert f.read().strip() not in p.stdout


def test_check_config_unknown_key(regions, tmp_path):
    with open(regions.conf) as f:
        lines = f.read().splitlines()
    lines.insert(2, "no_such_key = 1;")  # becomes line 3
    bad = tmp_path / "unknown-key.conf"
    bad.write_text("\n".join(lines) + "\n")
    p = check_config(str(bad))
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "invalid configuration" in p.stderr
    assert f"{bad}:3:" in p.stderr
    assert "no_such_key" in p.stderr


def test_check_config_out_of_range(regions, tmp_path):
    bad = write_config_copy(regions.conf, str(tmp_path / "threads.conf"), {"threads": 1000})
    with open(bad) as f:
        line = next(i for i, l in enumerate(f.read().splitlines(), 1) if l.startswith("threads"))
    p = check_config(bad)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert f"{bad}:{line}:" in p.stderr
    assert '"threads"' in p.stderr
    assert re.search(r"\b1\b.*\b64\b", p.stderr), p.stderr  # the bounds
    assert "1000" in p.stderr, p.stderr  # the value given


def test_check_config_secret_file_mode(regions, tmp_path):
    # A copy of the regions directory whose us.conf names a password file readable by all.
    rdir = tmp_path / "regions"
    shutil.copytree(regions.regions_dir, rdir)
    pw = tmp_path / "us.password"
    shutil.copyfile(regions.secret_path("us", "db.password"), pw)
    os.chmod(pw, 0o644)
    write_config_copy(str(rdir / "us.conf"), str(rdir / "us.conf"), {"password_file": str(pw)})
    conf = write_config_copy(regions.conf, str(tmp_path / "mode.conf"), {"regions_dir": str(rdir)})
    p = check_config(conf)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "password_file" in p.stderr
    assert str(rdir / "us.conf") in p.stderr
    assert "644" in p.stderr, p.stderr
    # the same file at 0600 is accepted
    os.chmod(pw, stat.S_IRUSR | stat.S_IWUSR)
    p = check_config(conf)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------------------------
# concurrency


def test_parallel_checks(gateway):
    channels = [grpc.insecure_channel(gateway.address) for _ in range(4)]
    wait_health(channels[0], "domicile.region.us", SERVING, timeout=30)

    def one(i):
        return health_check(channels[i % len(channels)], "" if i % 2 else "domicile.region.us", timeout=10)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(200)))
    assert results == [SERVING] * 200, collections.Counter(STATUS_NAME(s) for s in results)
    for ch in channels:
        ch.close()


# --------------------------------------------------------------------------------------------
# the regions themselves, and the gateway's refusal of a database of the wrong region


def test_three_real_regions(regions):
    """Six PostgreSQL servers: per region a primary with a synchronous streaming standby, and
    each region's database knows which region it is."""
    nodes = regions.status_json()
    assert len(nodes) == 6, nodes
    for r in REGION_CODES:
        mine = {n["node"]: n for n in nodes if n["region"] == r}
        assert all(n["running"] for n in mine.values()), mine
        primaries = [n for n in mine.values() if n["role"] == "primary"]
        standbys = [n for n in mine.values() if n["role"] == "standby"]
        assert len(primaries) == 1 and len(standbys) == 1, mine
        assert primaries[0]["standbys"] == {standbys[0]["node"]: "sync"}, mine
        assert standbys[0]["receiver"] == "streaming", mine
        assert regions.psql(r, "select code from domicile.region_identity") == r
        assert regions.psql(r, "show synchronous_commit") == "on"


def test_gateway_refuses_database_of_another_region(regions, gateways):
    """The eu gateway's own eu.conf pointed at us's servers (hosts and credentials): the
    connection succeeds, but the database says it is "us", so the eu gateway never reports
    domicile.region.eu SERVING, and says why; nor does the us gateway that asks it."""
    us_hosts = [f"127.0.0.1:{p}" for p in region_ports(regions.port_base)[0:2]]
    g = gateways.start(
        name="misrouted",
        overrides={"health_interval_ms": 100},
        region_files={"eu": {"eu": {"hosts": us_hosts, "password_file": regions.secret_path("us", "db.password")}}},
        converge=False,
    )
    eu = g.peers["eu"]
    for gw in (eu, g):
        ch = gw.channel()
        wait_health(ch, "domicile.region.us", SERVING, timeout=30)
        # Watch eu for 3 s (many probes with the back-off starting at 100 ms): never SERVING.
        stream = health_watch(ch, "domicile.region.eu", timeout=3)
        seen = []
        with pytest.raises(grpc.RpcError) as ei:
            for msg in stream:
                seen.append(msg.status)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (ei.value.code(), ei.value.details())
        assert seen and all(s == NOT_SERVING for s in seen), [STATUS_NAME(s) for s in seen]
    assert 'identifies as region "us", not "eu"' in eu.log
    g = eu
    assert g.stop() == 0, g.log
