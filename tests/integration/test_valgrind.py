"""
Issue 2, "Done means": a short integration run under valgrind memcheck shows no definite leak
(and no memory error) from our code. gRPC/absl-internal reports, if any, are suppressed in
valgrind.supp, each with a comment saying what it is.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import grpc
import pytest

from conftest import (
    DOMICILED,
    SERVING,
    SOURCE_DIR,
    STATUS_NAME,
    health_check,
    health_watch,
    read_until,
    wait_health,
)
from helpers import asan_build

SUPP = os.path.join(SOURCE_DIR, "tests", "integration", "valgrind.supp")


def identity(b):
    return b


def list_methods():
    p = subprocess.run([DOMICILED, "--list-methods"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return [line.split()[:3] for line in p.stdout.splitlines() if line.strip()]


def call_raw(ch, path, kind, body=b""):
    """Calls `path` with a raw body; returns the status code (OK when it succeeded)."""
    try:
        if kind == "unary":
            ch.unary_unary(path, request_serializer=identity, response_deserializer=identity)(body, timeout=30)
        elif kind == "server-stream":
            list(ch.unary_stream(path, request_serializer=identity, response_deserializer=identity)(body, timeout=30))
        elif kind == "client-stream":
            ch.stream_unary(path, request_serializer=identity, response_deserializer=identity)(iter([body, body]), timeout=30)
        elif kind == "bidi-stream":
            list(ch.stream_stream(path, request_serializer=identity, response_deserializer=identity)(iter([body, body]), timeout=30))
        else:
            raise AssertionError(f"unexpected kind {kind} for {path}")
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
@pytest.mark.skipif(asan_build(), reason="AddressSanitizer build (DM_ASAN=ON): valgrind cannot run an ASan binary; the sanitizers check this build instead")
def test_gateway_under_valgrind(gateways):
    vlog = os.path.join(gateways.workdir, "valgrind.log")
    wrapper = [
        "valgrind",
        "--tool=memcheck",
        "--leak-check=full",
        "--show-leak-kinds=definite",
        "--errors-for-leak-kinds=definite",
        "--error-exitcode=99",
        f"--suppressions={SUPP}",
        "--track-origins=no",
        "--num-callers=40",
        "--gen-suppressions=all",
        f"--log-file={vlog}",
    ]
    # valgrind is slow: 60 s to get ready.
    g = gateways.start(name="valgrind", wrapper=wrapper, wrapper_log=vlog, ready_timeout=60)
    ch = g.channel()

    # Regions come up (the probes run libpq and OpenSSL under valgrind too).
    for r in ("us", "eu", "in"):
        wait_health(ch, f"domicile.region.{r}", SERVING, timeout=60)

    for i in range(50):
        assert health_check(ch, "" if i % 2 else "domicile.region.eu", timeout=30) == SERVING

    # A Watch stream read and cancelled, and one left open across SIGTERM.
    w1 = health_watch(ch, "domicile.region.us", timeout=60)
    read_until(w1, SERVING, time.monotonic() + 30)
    w1.cancel()
    w2 = health_watch(ch, "", timeout=120)
    assert next(w2).status == SERVING

    # Every domicile.v1 method once with an empty body, whatever it answers today (unbuilt
    # methods: UNIMPLEMENTED; built ones: typically a validation error), and an unknown one.
    for path, kind, impl in list_methods():
        if path.startswith("/grpc.health."):
            continue
        code = call_raw(ch, path, kind)
        if impl == "unimplemented":
            assert code == grpc.StatusCode.UNIMPLEMENTED, (path, code)
        assert code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), (path, code)
    assert call_raw(ch, "/no.Such/Method", "unary") == grpc.StatusCode.UNIMPLEMENTED
    check_raw = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=identity, response_deserializer=identity)
    for body in (b"\xff\xff\xff", b"\x0a\x05ab"):
        with pytest.raises(grpc.RpcError) as ei:
            check_raw(body, timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name, code in (("no.such.Service", grpc.StatusCode.NOT_FOUND), ("x" * 300, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as ei:
            health_check(ch, name, timeout=30)
        assert ei.value.code() == code

    g.send_signal(signal.SIGTERM)
    rest = [m.status for m in w2]  # ends with OK (after NOT_SERVING) once shutdown begins
    assert w2.code() == grpc.StatusCode.OK, (w2.code(), w2.details(), [STATUS_NAME(s) for s in rest])
    rc = g.wait(timeout=180)

    with open(vlog) as f:
        report = f.read()
    assert "exiting cleanly" in g.log
    summary = report[report.find("HEAP SUMMARY") :] if "HEAP SUMMARY" in report else report[-3000:]
    print(summary)  # shown with -s, and on failure
    assert rc == 0, f"exit code {rc} (99 = valgrind found errors or definite leaks)\n{summary}"
    assert "ERROR SUMMARY: 0 errors" in report, summary
    assert re.search(r"definitely lost: 0 bytes in 0 blocks", report) or "no leaks are possible" in report, summary
