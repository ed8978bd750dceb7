"""
Issue 18, part 4: probes as Kubernetes runs them, while the data port is TLS or mutual TLS
only. The gateway's `probe_listen` is a plaintext listener that serves
grpc.health.v1.Health/Check and nothing else (README.md, Configuration reference;
deploy/kubernetes/README.md, Probes).

How the kubelet runs a `grpc:` probe (kubernetes pkg/probe/grpc): a new connection to the pod's
address for every probe, plaintext (grpc.WithInsecure: "credentials are currently not
supported"), user-agent "kube-probe/<major>.<minor>", one Health/Check carrying the probe's
`service` (empty by default) and no metadata, within timeoutSeconds; SERVING is success,
anything else (another status, an error, no connection) a failure. kubelet_probe() makes that
very call with Debian's python3-grpcio (the kubelet's client is grpc-go; both speak h2c with
prior knowledge).
"""

import errno
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import grpc
import pytest

from conftest import (
    DOMICILED,
    NOT_SERVING,
    SERVING,
    STATUS_NAME,
    GatewayFactory,
    demo_token,
    free_ports,
    health_check,
    health_pb2,
    health_watch,
    read_until,
    wait_health,
    wait_until,
    write_config_copy,
)
from helpers import Api, register, rpc_error
from test_security import Channels, Pki, principals_file, tls_overrides
from domicile.v1 import records_pb2
from grpc.reflection.v1alpha import reflection_pb2 as R  # noqa: E402  (after conftest)

SC = grpc.StatusCode
READY = "domicile.gateway.ready"
CHECK = "/grpc.health.v1.Health/Check"
REFUSED = f"the probe listener serves {CHECK} only"
UNKNOWN_NAME = 'the probe listener answers services "" and "domicile.gateway.ready" only'
KUBELET_UA = "kube-probe/1.30"


def kubelet_probe(address, service="", timeout=2.0, metadata=None, compression=None, with_call=False):
    """One probe as the kubelet makes it: a fresh plaintext connection, Health/Check with
    `service` and no metadata (unless a test adds some), then the connection is closed.
    Returns the serving status (raises grpc.RpcError); with_call, (status, call)."""
    ch = grpc.insecure_channel(address, options=[("grpc.primary_user_agent", KUBELET_UA)])
    try:
        check = ch.unary_unary(
            CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        rep, call = check.with_call(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata,
            compression=compression,
        )
        return (rep.status, call) if with_call else rep.status
    finally:
        ch.close()


def probe_ok(address, service=""):
    """The kubelet's verdict: True for SERVING, False for anything else."""
    try:
        return kubelet_probe(address, service) == SERVING
    except grpc.RpcError:
        return False


def probe_address(g):
    """Where the gateway's probe listener is (it logs the port it bound; probe_listen may say
    port 0)."""
    m = re.search(r"probe listener \(plaintext, /grpc\.health\.v1\.Health/Check only\) on port (\d+)", g.log)
    assert m, f"{g.name} logged no probe listener:\n{g.log}"
    return f"127.0.0.1:{m.group(1)}"


def list_methods():
    """[(path, kind)] of every rpc the gateway serves (domiciled --list-methods)."""
    out = subprocess.run([DOMICILED, "--list-methods"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [tuple(line.split()[:2]) for line in out.splitlines() if line.strip()]


def call_raw(channel, path, kind, metadata=None, timeout=5):
    """Calls `path` as a method of `kind` (as --list-methods names it) with one empty message;
    returns the grpc.RpcError it ends with, or None when it succeeded."""
    try:
        if kind == "unary":
            channel.unary_unary(path)(b"", metadata=metadata, timeout=timeout)
        elif kind == "server-stream":
            list(channel.unary_stream(path)(b"", metadata=metadata, timeout=timeout))
        elif kind == "client-stream":
            channel.stream_unary(path)(iter([b""]), metadata=metadata, timeout=timeout)
        else:
            list(channel.stream_stream(path)(iter([b""]), metadata=metadata, timeout=timeout))
    except grpc.RpcError as e:
        return e
    return None


def rpc_or_record(api, cid):
    """The payload of record "first" of `cid`, or None while it is not there."""
    try:
        return api.get(records_pb2.GetRecordRequest(customer_id=cid, record_id="first"), timeout=10).record.payload
    except grpc.RpcError:
        return None


def list_services(channel):
    call = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=R.ServerReflectionRequest.SerializeToString,
        response_deserializer=R.ServerReflectionResponse.FromString,
    )
    (rep,) = list(call(iter([R.ServerReflectionRequest(list_services="")]), timeout=10))
    return sorted(s.name for s in rep.list_services_response.service)


# --------------------------------------------------------------------------------------------
# fixtures: the local CA's certificates, a us gateway whose data port is mutual TLS only


@pytest.fixture(scope="module")
def pki(regions):
    d = tempfile.mkdtemp(prefix="probe-pki-", dir=regions.tmp)
    try:
        p = Pki(regions.state, d)
        p.svc = p.client("svc", "/CN=svc-cert")
        yield p
    finally:
        shutil.rmtree(d, ignore_errors=True)


def mtls_probe_overrides(regions, pki, workdir, **more):
    """Data port: TLS with client certificates required; the probe listener on any free port."""
    principals = principals_file(regions, os.path.join(workdir, "principals.conf"), [
        {"name": "svc-cert", "roles": ["service"], "cert_subject": "CN=svc-cert"},
    ])
    return tls_overrides(pki, "require", principals_file=principals, probe_listen="127.0.0.1:0", **more)


@pytest.fixture(scope="module")
def mtls_gateway(regions, pki):
    """A us gateway (its peers not started: eu and in answer UNAVAILABLE) whose data port is
    mutual TLS only and which has a probe listener."""
    workdir = tempfile.mkdtemp(prefix="gw-probe-", dir=regions.tmp)
    f = GatewayFactory(regions, workdir)
    try:
        yield f.start(overrides=mtls_probe_overrides(regions, pki, workdir), only="us", name="probe-mtls")
    finally:
        f.close()


@pytest.fixture
def channels():
    c = Channels()
    yield c
    c.close()


# ============================================================================================


def test_kubelet_probes_pass_while_the_data_port_is_mtls_only(mtls_gateway, pki, channels):
    g = mtls_gateway
    probe = probe_address(g)
    assert probe != g.address

    # startupProbe and livenessProbe: service "" (the gateway serves).
    assert kubelet_probe(probe, "") == SERVING
    # readinessProbe: the gateway's own region has answered since start. The kubelet asks every
    # periodSeconds until it is; so does this test (the us database is up: it will be).
    assert wait_until(lambda: probe_ok(probe, READY), bool, timeout=30), g.log
    assert kubelet_probe(probe, READY) == SERVING
    # Answered without credentials (the kubelet has none to send), and saying nothing more
    # than the status: no trailing metadata (the data port names its region in
    # x-domicile-region).
    status, call = kubelet_probe(probe, "", with_call=True)
    assert status == SERVING
    assert not [m for m in call.trailing_metadata() if m.key.startswith("x-")], call.trailing_metadata()

    # The data port, as the kubelet would dial it (plaintext), gets nowhere: mutual TLS only.
    for service in ("", READY):
        e = rpc_error(health_check, g.channel(token=None), service, timeout=5)
        assert e.code() == SC.UNAVAILABLE, (e.code(), e.details())
    e = rpc_error(kubelet_probe, g.address, "")
    assert e.code() == SC.UNAVAILABLE, (e.code(), e.details())
    # Over mutual TLS it answers the same (the two listeners share one health state).
    svc = channels.tls(g, pki.ca_crt, *pki.svc)
    assert health_check(svc, "", timeout=10) == SERVING
    assert health_check(svc, READY, timeout=10) == SERVING
    _, call = svc.unary_unary(
        CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    ).with_call(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert ("x-domicile-region", "us") in [(m.key, m.value) for m in call.trailing_metadata()]


def test_the_probe_listener_answers_no_other_service(mtls_gateway, pki, channels):
    g = mtls_gateway
    probe = probe_address(g)
    ch = grpc.insecure_channel(probe)
    try:
        admin = [("authorization", f"Bearer {demo_token(g.config, 'admin')}"), ("x-purpose", "support")]
        methods = list_methods()
        assert len(methods) >= 30 and (CHECK, "unary") in methods, methods
        # Every rpc the gateway has but Check, of every kind: the public ones (Health/Watch,
        # reflection), the authenticated API (domicile.v1, also with an admin token), the
        # gateways' own service (domicile.peer.v1), and paths nobody serves: one answer,
        # UNIMPLEMENTED, the same words for all, so the listener tells nothing of the API.
        others = [(p, k) for p, k in methods if p != CHECK] + [
            ("/nope.v1.Nope/Nope", "unary"),
            ("/grpc.health.v1.Health/check", "unary"),
            ("/grpc.health.v1.Health/Check/", "unary"),
            ("/grpc.health.v1.Health", "unary"),
        ]
        for path, kind in others:
            for metadata in (None, admin):
                e = call_raw(ch, path, kind, metadata=metadata)
                assert e is not None, f"{path} ({kind}) succeeded on the probe listener"
                assert (e.code(), e.details()) == (SC.UNIMPLEMENTED, REFUSED), (path, kind, e.code(), e.details())
        e = rpc_error(list_services, ch)
        assert (e.code(), e.details()) == (SC.UNIMPLEMENTED, REFUSED)
        w = health_watch(ch, "", timeout=5)
        e = rpc_error(next, w)
        assert (e.code(), e.details()) == (SC.UNIMPLEMENTED, REFUSED)

        # Health/Check itself answers "" and the readiness name only. Every other name is
        # NOT_FOUND in the same words, whether the data port knows it or not: no list of
        # regions or services leaves through here.
        svc = channels.tls(g, pki.ca_crt, *pki.svc)
        known = ["grpc.health.v1.Health", "domicile.v1.RecordsService", "domicile.region.us"]
        for name in known:
            assert health_check(svc, name, timeout=10) in (SERVING, NOT_SERVING), name  # known there
        for name in known + ["domicile.region.eu", "domicile.region.zz", "bogus", " ", READY + " ", "a" * 256]:
            e = rpc_error(kubelet_probe, probe, name)
            assert (e.code(), e.details()) == (SC.NOT_FOUND, UNKNOWN_NAME), (name, e.code(), e.details())

        # The data port over mutual TLS serves what the probe listener refuses (the refusals
        # above are the listener's, not a broken gateway's).
        assert "domicile.v1.RecordsService" in list_services(svc)
    finally:
        ch.close()


def test_the_probe_listener_is_bounded(mtls_gateway):
    """Plaintext and unauthenticated: what a caller can make it hold is small and fixed."""
    g = mtls_gateway
    probe = probe_address(g)
    # A request over 1 KiB: refused by gRPC core before it is read.
    e = rpc_error(kubelet_probe, probe, "a" * 2000)
    assert e.code() == SC.RESOURCE_EXHAUSTED, (e.code(), e.details())
    # Request metadata over 2 KiB: refused before anything runs.
    e = rpc_error(kubelet_probe, probe, "", metadata=[("x-filler", "f" * 3000)])
    assert e.code() == SC.RESOURCE_EXHAUSTED, (e.code(), e.details())
    m = re.fullmatch(r"request metadata is (\d+) bytes, limit 2048", e.details())
    assert m and int(m.group(1)) > 3000, e.details()  # the filler, the user-agent, 32 per entry
    # A header block over 8 KiB: gRPC core drops the connection (and only it).
    e = rpc_error(kubelet_probe, probe, "", metadata=[(f"x-filler-{i}", "f" * 1000) for i in range(10)])
    assert e.code() in (SC.RESOURCE_EXHAUSTED, SC.UNAVAILABLE, SC.INTERNAL), (e.code(), e.details())
    # Compressed messages are not decompressed: a small gzip body cannot expand into a large
    # request; it is refused as unparseable.
    e = rpc_error(kubelet_probe, probe, "a" * 100000, compression=grpc.Compression.Gzip)
    assert e.code() == SC.INVALID_ARGUMENT, (e.code(), e.details())
    # Many probes at once, each on its own connection (kubelets of every container probing
    # together): all answered, and the listener still answers afterwards.
    results = []

    def many():
        results.extend(probe_ok(probe) for _ in range(20))

    threads = [threading.Thread(target=many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [True] * 160
    assert kubelet_probe(probe, "") == SERVING
    assert kubelet_probe(probe, READY) == SERVING
    g.federation.check_alive()
    # No other process can bind the probe port beside the gateway and answer some probes in
    # its place: the listener does without SO_REUSEPORT, which gRPC core sets by default (on
    # the data port a second bind with SO_REUSEPORT succeeds: the control).
    def bind_reuseport(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
        finally:
            s.close()

    bind_reuseport(g.port)
    with pytest.raises(OSError) as ei:
        bind_reuseport(int(probe.rpartition(":")[2]))
    assert ei.value.errno == errno.EADDRINUSE, ei.value


def test_a_taken_probe_port_fails_the_start(gateways, tmp_path):
    """Bad input at start: the probe port is taken. The gateway says so, naming probe_listen,
    and exits 1 (not an abort), having answered nothing."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        conf = gateways.config({"probe_listen": f"127.0.0.1:{port}"}, name="probe-taken")
        p = subprocess.run([DOMICILED, "--config", conf, "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    finally:
        taken.close()
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert f"cannot start: cannot listen on 127.0.0.1:{port} (probe_listen)" in p.stderr, p.stderr[-3000:]
    assert "serving on" not in p.stderr and "assertion failed" not in p.stderr, p.stderr[-3000:]


def test_readiness_waits_for_the_own_region_then_holds(regions, gateways, pki, channels, tmp_path):
    """readiness = the gateway's own region has answered since the gateway started. Before
    that (a wrong host, password or CA: a bad rollout) the pod is not ready; after it, a
    database outage does not unready the region's gateways (they still serve the other
    regions' data, and every gateway of the region shares that database: no better one to send
    traffic to). Liveness stays SERVING throughout: a restart cures no database."""
    # 1. Own region unreachable from the start: alive, not ready.
    (dead,) = free_ports(1, random.Random())
    g = gateways.start(
        overrides=mtls_probe_overrides(regions, pki, str(tmp_path)),
        region_files={"us": {"us": {"hosts": [f"127.0.0.1:{dead}"]}}},
        only="us", name="probe-unready", converge=False,
    )
    probe = probe_address(g)
    svc = channels.tls(g, pki.ca_crt, *pki.svc)
    # The gateway has tried its region and failed (its own health says so, over mutual TLS)...
    wait_health(svc, "domicile.region.us", NOT_SERVING, timeout=30)
    assert "region is not serving" in g.log, g.log
    # ... so the kubelet finds it alive but not ready, probe after probe.
    for _ in range(3):
        assert kubelet_probe(probe, "") == SERVING
        assert kubelet_probe(probe, READY) == NOT_SERVING
    assert health_check(svc, READY, timeout=10) == NOT_SERVING
    channels.close()
    assert g.stop() == 0, g.log

    # 2. A gateway whose region answered, then the region goes down: still ready (latched).
    g = gateways.start(overrides=mtls_probe_overrides(regions, pki, str(tmp_path)), only="us", name="probe-latch")
    probe = probe_address(g)
    assert wait_until(lambda: probe_ok(probe, READY), bool, timeout=30), g.log
    svc = channels.tls(g, pki.ca_crt, *pki.svc)
    watch = health_watch(svc, "domicile.region.us", timeout=120)
    try:
        read_until(watch, SERVING, deadline=time.monotonic() + 30)
        regions.stop("us")
        try:
            read_until(watch, NOT_SERVING, deadline=time.monotonic() + 60)
            assert kubelet_probe(probe, "") == SERVING
            assert kubelet_probe(probe, READY) == SERVING
        finally:
            regions.start("us")
        read_until(watch, SERVING, deadline=time.monotonic() + 60)
    finally:
        watch.cancel()
    assert kubelet_probe(probe, READY) == SERVING


def test_probes_say_not_serving_while_the_gateway_drains(regions, gateways, pki, channels, tmp_path, api):
    """SIGTERM: the data port stops taking calls and lets those in flight finish
    (shutdown_grace_ms); meanwhile the probe listener still answers, NOT_SERVING for both
    names, so the kubelet sees a gateway that is leaving rather than a closed port. It closes
    once the data port has drained."""
    g = gateways.start(
        overrides=mtls_probe_overrides(regions, pki, str(tmp_path), shutdown_grace_ms=60000),
        only="us", name="probe-drain",
    )
    probe = probe_address(g)
    assert wait_until(lambda: probe_ok(probe, READY), bool, timeout=30), g.log
    # A call in flight on the data port: a BulkPutRecords stream that has written one record
    # and holds the rest until released. (The customer is registered through the session's
    # gateways: this one has no peers, and a registration asks every region.)
    cid = register(api, "us", prefix="probe")
    api = Api(channels.tls(g, pki.ca_crt, *pki.svc))
    release = threading.Event()

    def requests():
        yield records_pb2.BulkPutRecordsRequest(put=records_pb2.PutRecordRequest(
            customer_id=cid, record_id="first", kind="note", payload=b"1", request_id=f"probe-{cid}"))
        release.wait(120)

    held = api.bulk.future(requests(), timeout=120)
    try:
        # The gateway has the call once its first record is there.
        got = wait_until(lambda: rpc_or_record(api, cid), lambda r: r == b"1", timeout=30)
        assert got == b"1", got
        g.send_signal(signal.SIGTERM)
        last = wait_until(lambda: kubelet_probe(probe, ""), lambda s: s == NOT_SERVING, timeout=30)
        assert last == NOT_SERVING, STATUS_NAME(last)
        assert kubelet_probe(probe, READY) == NOT_SERVING
        assert g.alive(), g.log
        m = re.search(r"shutting down: no new calls; (\d+) in flight", g.log)
        assert m and int(m.group(1)) >= 1, g.log
        # The call in flight still finishes: the stream ends, the answer comes.
        release.set()
        rep = held.result(timeout=60)
        assert rep.written == 1, rep
    finally:
        release.set()
        held.cancel()
    channels.close()
    assert g.wait(timeout=60) == 0, g.log
    assert "still alive at destroy" not in g.log, g.log  # every probe call was freed too
    # Gone: the kubelet's probe fails to connect.
    e = rpc_error(kubelet_probe, probe, "")
    assert e.code() == SC.UNAVAILABLE, (e.code(), e.details())


def test_bad_probe_listen_is_refused_naming_file_line_and_key(regions, tmp_path):
    def check(value, **more):
        path = write_config_copy(regions.conf, str(tmp_path / "domiciled.conf"), {"probe_listen": value, **more})
        with open(path) as f:
            line = next(i for i, l in enumerate(f.read().splitlines(), 1) if l.startswith("probe_listen"))
        p = subprocess.run([DOMICILED, "--config", path, "--check-config"], capture_output=True, text=True, timeout=30)
        return p, f'{path}:{line}: key "probe_listen": '

    for value, why in [
        ("50060", '"50060" must be host:port'),
        ("0.0.0.0:99999", '"0.0.0.0:99999": port must be 0..65535'),
        ("0.0.0.0:probe", '"0.0.0.0:probe": port must be 0..65535'),
    ]:
        p, where = check(value)
        assert p.returncode == 2 and where + why in p.stderr, (value, p.returncode, p.stderr)
    # Not a port another listener has (the state's peer port, listen's port).
    peer = regions.peer_port("us")
    p, where = check(f"0.0.0.0:{peer}")
    assert p.returncode == 2 and where + f'"0.0.0.0:{peer}": port {peer} is also peer_listen\'s' in p.stderr, p.stderr
    p, where = check("127.0.0.1:27999", listen="127.0.0.1:27999")
    assert p.returncode == 2 and where + '"127.0.0.1:27999": port 27999 is also listen\'s' in p.stderr, p.stderr
    # A good one is accepted and shown; off by default.
    p, _ = check("0.0.0.0:50060")
    assert p.returncode == 0 and 'probe_listen = "0.0.0.0:50060";' in p.stdout, p.stderr
    p = subprocess.run([DOMICILED, "--config", regions.conf, "--check-config"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and 'probe_listen = "";' in p.stdout, p.stderr
