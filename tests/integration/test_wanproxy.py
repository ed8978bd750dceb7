"""
domicile-wanproxy (src/wanproxy): the latency emulator on every gateway-to-gateway path.

Correctness only, never speed: a round trip through a route costs at least twice its one-way
delay (a lower bound; no upper bound is asserted on a shared machine), bytes arrive intact and
in order both ways, half-close and resets travel through, a full buffer stops the reading
(backpressure) instead of growing, and SIGTERM ends it. The servers here are plain sockets
in threads of this process; no regions are needed.
"""

import os
import socket
import struct
import tempfile
import threading
import time

import pytest

from conftest import _REPORTED, WANPROXY, WanProxy

if not os.access(WANPROXY, os.X_OK):
    pytest.fail(f"{WANPROXY} not found: build first (target domicile-wanproxy)", pytrace=False)

MIB = 1 << 20


class Server:
    """A listening socket on 127.0.0.1:<free port>; each accepted connection is handed to
    `handler(conn)` in a thread of its own."""

    def __init__(self, handler):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.errors = []
        self.threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._run, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, c):
        try:
            self.handler(c)
        except Exception as e:  # reported by the test through self.errors
            self.errors.append(e)
        finally:
            c.close()

    def close(self):
        self.sock.close()


def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            c.shutdown(socket.SHUT_WR)
            return
        c.sendall(d)


def recv_all(c):
    out = bytearray()
    while True:
        d = c.recv(MIB)
        if not d:
            return bytes(out)
        out += d


def recv_exact(c, n):
    out = bytearray()
    while len(out) < n:
        d = c.recv(n - len(out))
        if not d:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += d
    return bytes(out)


def connect(port, timeout=30):
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="wanproxy-")
    yield d


@pytest.fixture
def proxies(workdir):
    """Starts proxies for this test (their logs go into a failure's report); stopped at
    teardown."""
    started = []

    def start(routes, **kw):
        p = WanProxy(routes, workdir, name=f"wanproxy-{len(started) + 1}", **kw)
        started.append(p)
        _REPORTED.append(p)
        return p.start()

    yield start
    for p in started:
        if p.alive():
            p.stop(timeout=10)
        p.kill()
        _REPORTED.remove(p)


def test_round_trip_costs_twice_the_delay_on_each_route(proxies):
    """Two routes in one process with different delays: every ping through a route takes at
    least 2 × its delay (less 1 ms for clock granularity)."""
    srv = Server(echo)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 15), ("127.0.0.1:0", f"127.0.0.1:{srv.port}", 40)])
    for port, delay in zip(p.ports, (15, 40)):
        c = connect(port)
        rtts = []
        for i in range(5):
            t0 = time.monotonic()
            c.sendall(struct.pack("!I", i))
            assert recv_exact(c, 4) == struct.pack("!I", i)
            rtts.append((time.monotonic() - t0) * 1000)
        c.close()
        assert min(rtts) >= 2 * delay - 1, f"route with {delay} ms each way: round trips {rtts} ms"
    srv.close()
    assert not srv.errors, srv.errors


def test_one_mib_both_ways_arrives_intact(proxies):
    """1 MiB of random bytes from each end at the same time, through a 20 ms route: each side
    receives exactly what the other sent, then EOF."""
    to_server, to_client = os.urandom(MIB), os.urandom(MIB)
    got = {}

    def server(c):
        t = threading.Thread(target=lambda: (c.sendall(to_client), c.shutdown(socket.SHUT_WR)))
        t.start()
        got["server"] = recv_all(c)
        t.join()

    srv = Server(server)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 20)])
    c = connect(p.ports[0])
    t = threading.Thread(target=lambda: (c.sendall(to_server), c.shutdown(socket.SHUT_WR)))
    t.start()
    got["client"] = recv_all(c)
    t.join()
    c.close()
    for th in srv.threads:
        th.join(timeout=30)
    srv.close()
    assert not srv.errors, srv.errors
    assert got["server"] == to_server, f"server got {len(got['server'])} bytes, not the {MIB} sent"
    assert got["client"] == to_client, f"client got {len(got['client'])} bytes, not the {MIB} sent"


def test_half_close_travels_with_the_delay(proxies):
    """The client shuts down its write side: the server sees EOF no earlier than one delay
    later, still answers on the open direction, and the client reads the answer then EOF."""
    seen = {}

    def server(c):
        data = recv_all(c)  # until the client's FIN arrives through the proxy
        seen["eof_at"] = time.monotonic()
        c.sendall(b"got " + data)
        c.shutdown(socket.SHUT_WR)

    srv = Server(server)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 25)])
    c = connect(p.ports[0])
    c.sendall(b"hello")
    t0 = time.monotonic()
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c) == b"got hello"
    c.close()
    for th in srv.threads:
        th.join(timeout=30)
    srv.close()
    assert not srv.errors, srv.errors
    assert (seen["eof_at"] - t0) * 1000 >= 25 - 1


def test_reset_by_the_server_reaches_the_client(proxies):
    """A server that closes with SO_LINGER 0 (RST): the client's read fails with a reset (or
    ends), and the proxy keeps serving new connections."""

    def server(c):
        assert recv_exact(c, 4) == b"ping"
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    srv = Server(server)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 10)])
    c = connect(p.ports[0])
    c.sendall(b"ping")
    with pytest.raises(ConnectionResetError):
        while c.recv(4096):
            pass
    c.close()
    # Still serving.
    c2 = connect(p.ports[0])
    c2.sendall(b"ping")
    with pytest.raises(ConnectionResetError):
        while c2.recv(4096):
            pass
    c2.close()
    assert p.alive()
    srv.close()


def test_reset_by_the_client_reaches_the_server(proxies):
    """The client resets: the server's read ends in a reset, not in a hang."""
    outcome = {}
    done = threading.Event()

    def server(c):
        c.settimeout(30)
        try:
            while c.recv(4096):
                pass
            outcome["end"] = "eof"
        except ConnectionResetError:
            outcome["end"] = "reset"
        done.set()

    srv = Server(server)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 10)])
    c = connect(p.ports[0])
    c.sendall(b"some bytes")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    assert done.wait(30), "the server's read never ended"
    assert outcome["end"] == "reset", outcome
    srv.close()


def test_refused_upstream_resets_the_client(proxies):
    """Nobody listens on the target: the client's connection is reset (after one delay), and
    the proxy stays up."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # bound, never listened: connections to it are refused
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{dead_port}", 10)])
    c = connect(p.ports[0])
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        c.sendall(b"x")
        while c.recv(4096):
            pass
    c.close()
    assert p.alive()


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_full_buffer_stops_reading(proxies):
    """A server that does not read: the client can push only what the socket buffers and the
    proxy's bounded buffer hold (not all of 128 MiB), and the proxy's own memory stays small
    (kernel socket buffers are not in its RSS; an unbounded queue would be). Once the server
    reads, every byte arrives, in order."""
    import hashlib
    import select

    chunk, n_chunks = os.urandom(MIB), 128
    total = n_chunks * MIB
    want = hashlib.sha256()
    for _ in range(n_chunks):
        want.update(chunk)
    go = threading.Event()
    got = {}

    def server(c):
        go.wait(120)
        h, n = hashlib.sha256(), 0
        while True:
            d = c.recv(MIB)
            if not d:
                break
            h.update(d)
            n += len(d)
        got["n"], got["sha"] = n, h.hexdigest()

    srv = Server(server)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 1)], buffer=256 * 1024)
    c = connect(p.ports[0])
    c.setblocking(False)
    sent = 0
    view = memoryview(chunk)
    # Send until the socket stays unwritable for a second: the path is full.
    while sent < total:
        _, w, _ = select.select([], [c], [], 1.0)
        if not w:
            break
        try:
            sent += c.send(view[sent % MIB:])
        except BlockingIOError:
            pass
    rss = vm_rss_kib(p.pid)
    print(f"path full after {sent} bytes; proxy VmRSS {rss} KiB")
    assert sent < total, "the client pushed 128 MiB into a path whose receiver reads nothing"
    assert rss < 48 * 1024, f"proxy VmRSS {rss} KiB with {sent} bytes sent and none read: the buffer is not bounded"
    go.set()
    c.setblocking(True)
    c.sendall(view[sent % MIB:])
    sent += MIB - sent % MIB
    while sent < total:
        c.sendall(chunk)
        sent += MIB
    c.shutdown(socket.SHUT_WR)
    for th in srv.threads:
        th.join(timeout=120)
    c.close()
    srv.close()
    assert not srv.errors, srv.errors
    assert got.get("n") == total, f"server got {got.get('n')} bytes of {total}"
    assert got["sha"] == want.hexdigest(), "bytes arrived changed or out of order"


def test_sigterm_exits_cleanly_with_connections_open(proxies):
    srv = Server(echo)
    p = proxies([("127.0.0.1:0", f"127.0.0.1:{srv.port}", 5)])
    conns = [connect(p.ports[0]) for _ in range(5)]
    for c in conns:
        c.sendall(b"x")
        assert recv_exact(c, 1) == b"x"
    assert p.stop(timeout=10) == 0, p.log
    for c in conns:
        c.close()
    srv.close()


def test_bad_arguments_are_refused():
    import subprocess

    for args in (["--route", "127.0.0.1:1=127.0.0.1:2"], ["--route", "127.0.0.1:1=nowhere@5"],
                 ["--route", "127.0.0.1:1=127.0.0.1:2@-3"], []):
        p = subprocess.run([WANPROXY, *args], capture_output=True, text=True, timeout=10)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
