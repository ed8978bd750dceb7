"""
Integration harness: three real local regions (deploy/local/domicile-local) and real gateways
(build/domiciled), called from an independent gRPC client (Debian's python3-grpcio).

Run from the repository root:
    /usr/bin/python3 -m pytest -q tests/integration
Environment (both optional):
    DOMICILE_BUILD_DIR   build tree holding domiciled and gen/py (default <repo>/build)
    DOMICILE_SOURCE_DIR  repository root (default: two levels above this file)

Rules kept here and in the tests:
  * one `domicile-local up` per session, on a port base chosen free at run time, in a fresh
    temporary state directory that is destroyed at the end (also when set-up or a test fails);
  * no fixed waits: readiness is the gateway's `--ready-fd` line, state changes are awaited on
    Health/Watch streams or with blocking calls that carry a timeout;
  * a failing test gets the gateway logs and the tail of every PostgreSQL log attached.
"""

import atexit
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# --------------------------------------------------------------------------------------------
# paths and generated Python stubs

SOURCE_DIR = os.path.abspath(
    os.environ.get("DOMICILE_SOURCE_DIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
)
BUILD_DIR = os.path.abspath(os.environ.get("DOMICILE_BUILD_DIR") or os.path.join(SOURCE_DIR, "build"))
GEN_PY = os.path.join(BUILD_DIR, "gen", "py")
DOMICILED = os.path.join(BUILD_DIR, "domiciled")
DOMICILE_LOCAL = os.path.join(SOURCE_DIR, "deploy", "local", "domicile-local")

if not os.path.isfile(os.path.join(GEN_PY, "grpc", "health", "v1", "health_pb2.py")):
    raise pytest.UsageError(
        f"generated Python stubs not found under {GEN_PY}: build first "
        f"(cmake -S {SOURCE_DIR} -B {BUILD_DIR} && cmake --build {BUILD_DIR}) "
        "or set DOMICILE_BUILD_DIR"
    )
if GEN_PY not in sys.path:
    sys.path.insert(0, GEN_PY)

import grpc  # noqa: E402

# Debian's grpc package owns the `grpc` namespace; our generated grpc/health/v1/health_pb2.py
# is found only once its directory is added to the package path.
if os.path.join(GEN_PY, "grpc") not in grpc.__path__:
    grpc.__path__.append(os.path.join(GEN_PY, "grpc"))

from grpc.health.v1 import health_pb2  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
STATUS_NAME = health_pb2.HealthCheckResponse.ServingStatus.Name

REGION_CODES = ("us", "eu", "in")
REGIONS_STATE = []  # the session's deploy/local state directory, once created
READY_TIMEOUT = 10.0

# --------------------------------------------------------------------------------------------
# small helpers


def _tail(path, max_bytes=6000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    text = data.decode("utf-8", "replace")
    return ("...\n" if size > max_bytes else "") + text


def _port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def region_ports(base):
    return [base + 10 * i + n for i in range(len(REGION_CODES)) for n in (1, 2)]


def choose_port_base(rng):
    """A port base whose six PostgreSQL ports are free on 127.0.0.1. Kept below the Linux
    ephemeral range (32768+) so that outgoing connections and `--listen 127.0.0.1:0` gateways
    do not take them between the choice and the servers' start."""
    for _ in range(200):
        base = rng.randrange(20000, 32700, 10)
        if all(_port_free(p) for p in region_ports(base)):
            return base
    raise RuntimeError("no free port base found for the local regions")


def _traversable_tmpdir():
    """The postgres user must reach the state directory: use the default temporary directory
    only when every parent is open to others (x bit), else /tmp."""
    d = tempfile.gettempdir()
    p = os.path.abspath(d)
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            return "/tmp"
        p = os.path.dirname(p)
    # Unix socket paths are limited to 107 bytes ($STATE/run/us-node1/.s.PGSQL.NNNNN).
    return d if len(d) <= 40 else "/tmp"


def write_config_copy(src, dst, overrides=None, extra_lines=()):
    """Copy a libconfig file, replacing `key = ...;` lines for keys in `overrides` (ints and
    strings; a string is quoted) and appending keys that were absent, then `extra_lines`."""
    overrides = dict(overrides or {})
    with open(src) as f:
        lines = f.read().splitlines()
    out, done = [], set()
    for line in lines:
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in overrides:
            out.append(f"{key} = {_cfg_value(overrides[key])};")
            done.add(key)
        else:
            out.append(line)
    for key, value in overrides.items():
        if key not in done:
            out.append(f"{key} = {_cfg_value(value)};")
    out.extend(extra_lines)
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    return dst


def _cfg_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------------
# health helpers (no sleeps: every wait is a stream read or a call with a deadline)


def health_check(channel, service="", timeout=5.0):
    """Health/Check; returns the serving status or raises grpc.RpcError."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def health_watch(channel, service="", timeout=60.0):
    """Opens Health/Watch; returns the response iterator (also a grpc.Call)."""
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)


def read_until(stream, wanted, deadline, seen=None):
    """Reads an open Watch stream until a message with status `wanted` arrives or `deadline`
    (time.monotonic()) passes. The stream's own gRPC deadline bounds every read; this one
    bounds the wait for this particular status. Returns the statuses read."""
    seen = [] if seen is None else seen
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {STATUS_NAME(wanted)} before the deadline; statuses seen: "
                f"{[STATUS_NAME(s) for s in seen]}"
            )
        try:
            msg = next(stream)
        except StopIteration:
            raise AssertionError(
                f"Watch stream ended ({stream.code()}) before {STATUS_NAME(wanted)}; "
                f"statuses seen: {[STATUS_NAME(s) for s in seen]}"
            )
        except grpc.RpcError as e:
            raise AssertionError(
                f"Watch stream failed with {e.code()} {e.details()!r} before "
                f"{STATUS_NAME(wanted)}; statuses seen: {[STATUS_NAME(s) for s in seen]}"
            )
        seen.append(msg.status)
        if msg.status == wanted:
            return seen


def wait_until(probe, done, timeout=30.0, interval=0.1):
    """Call probe() until done(result) holds or `timeout` seconds pass; returns the last
    result. For state the product updates asynchronously (a delivery recorded, a leg run)
    where no stream announces the change."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if done(last) or time.monotonic() > deadline:
            return last
        time.sleep(interval)


def wait_health(channel, service, wanted, timeout=30.0):
    """Waits on a fresh Watch stream until `service` reports `wanted`."""
    stream = health_watch(channel, service, timeout=timeout)
    try:
        return read_until(stream, wanted, time.monotonic() + timeout)
    finally:
        stream.cancel()


# --------------------------------------------------------------------------------------------
# the three local regions


class Regions:
    """One `domicile-local` state: three regions, six PostgreSQL servers."""

    def __init__(self, tmp, state, port_base):
        self.tmp = tmp
        self.state = state
        self.port_base = port_base
        self.conf = os.path.join(state, "etc", "domiciled.conf")
        self.regions_dir = os.path.join(state, "etc", "regions")
        self.log_dir = os.path.join(state, "log")

    def run(self, *args, timeout=300, check=True):
        cmd = [DOMICILE_LOCAL, "--state", self.state, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
            )
        return p

    def psql(self, region, sql):
        """Runs SQL on the region's current primary as postgres; returns unaligned tuples."""
        return self.run("psql", region, "-At", "-c", sql, timeout=60).stdout.strip()

    def stop(self, region, node=None):
        self.run("stop", region, *([node] if node else []))

    def start(self, region, node=None):
        self.run("start", region, *([node] if node else []))

    def status_json(self):
        import json

        return json.loads(self.run("status", "--json", timeout=60).stdout)

    def pg_logs(self):
        try:
            names = sorted(n for n in os.listdir(self.log_dir) if n.endswith(".log"))
        except OSError:
            return []
        return [os.path.join(self.log_dir, n) for n in names if not n.endswith((".initdb.log", ".basebackup.log"))]


def regions_up(tmp, state, *up_args, timeout=300):
    """`domicile-local up` (with `up_args`) in a new state directory `state`, on a port base
    chosen free at run time; returns its Regions. Three attempts: another process may take a
    port between the choice and the start."""
    what = " ".join(("domicile-local up",) + up_args)
    rng = random.Random()
    last_error = None
    for _attempt in range(3):
        base = choose_port_base(rng)
        r = Regions(tmp, state, base)
        p = r.run("--port-base", str(base), "--fsync", "off", "up", *up_args, timeout=timeout, check=False)
        if p.returncode == 0:
            return r
        last_error = p.stderr
        # Another process took a port between the choice and the start: start over.
        if "in use" not in p.stderr:
            raise RuntimeError(f"{what} failed:\n{p.stdout}\n{p.stderr}")
        r.run("destroy", check=False)
    raise RuntimeError(f"{what} failed three times:\n{last_error}")


_REGIONS = None  # for the failure report


@pytest.fixture(scope="session")
def regions():
    global _REGIONS
    if not os.access(DOMICILED, os.X_OK):
        pytest.fail(f"{DOMICILED} not found: build first or set DOMICILE_BUILD_DIR")
    tmp = tempfile.mkdtemp(prefix="domicile-it-", dir=_traversable_tmpdir())
    # The postgres user runs the servers inside: it must traverse this directory
    # (domicile-local creates $STATE itself, root-owned 0755, with postgres-owned subdirs).
    os.chmod(tmp, 0o755)
    state = os.path.join(tmp, "state")
    try:
        r = regions_up(tmp, state, timeout=600)
        _REGIONS = r
        REGIONS_STATE[:] = [state]
        yield r
    finally:
        _REGIONS = None
        if os.path.exists(os.path.join(state, "local.env")):
            d = subprocess.run(
                [DOMICILE_LOCAL, "--state", state, "destroy"], capture_output=True, text=True, timeout=300
            )
            if d.returncode != 0:
                sys.stderr.write(f"domicile-local destroy failed:\n{d.stderr}\n")
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# gateways

_LIVE = []  # gateways started and not yet reaped: killed at exit whatever happens


@atexit.register
def _kill_leftovers():
    for g in list(_LIVE):
        g.kill()


class GatewayError(RuntimeError):
    pass


def readable_log_line(line):
    """A gateway log line (one JSON object) as text; anything else unchanged."""
    import json

    if not line.startswith("{"):
        return line
    try:
        o = json.loads(line)
    except ValueError:
        return line
    base = f'{o.pop("time", "")} {o.pop("level", "")} {o.pop("component", "")}: {o.pop("msg", "")}'
    extra = " ".join(f"{k}={v}" for k, v in o.items())
    return f"{base} {extra}" if extra else base


def demo_token(config_path, name):
    """The bearer token of demo principal `name`, next to the state the config came from
    (STATE/etc/domiciled.conf -> STATE/secrets/tokens/<name>.token), or a literal token when
    `name` is not a demo principal's file."""
    state = os.path.dirname(os.path.dirname(os.path.abspath(config_path)))
    for base in (state, os.path.dirname(state)):
        path = os.path.join(base, "secrets", "tokens", f"{name}.token")
        if os.path.isfile(path):
            with open(path) as f:
                return f.read().strip()
    if REGIONS_STATE:
        path = os.path.join(REGIONS_STATE[0], "secrets", "tokens", f"{name}.token")
        if os.path.isfile(path):
            with open(path) as f:
                return f.read().strip()
    return name


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the principal's bearer token unless the call already sends an authorization."""

    def __init__(self, token):
        self.token = token

    def _details(self, d):
        md = list(d.metadata or [])
        if not any(k == "authorization" for k, _ in md):
            md.append(("authorization", f"Bearer {self.token}"))
        return _Details(d, md)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class Gateway:
    """A domiciled process listening on 127.0.0.1:<any free port>. Logs (stderr) go to a file
    in `workdir`; under a `wrapper` (valgrind) the wrapper's own log is `wrapper_log`."""

    def __init__(self, config, workdir, name="gateway", wrapper=(), wrapper_log=None, ready_timeout=READY_TIMEOUT):
        self.config = config
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.wrapper = list(wrapper)
        self.wrapper_log = wrapper_log
        self.ready_timeout = ready_timeout
        self.proc = None
        self.port = None
        self.returncode = None
        self._channels = []

    def start(self):
        rfd, wfd = os.pipe()
        logf = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [*self.wrapper, DOMICILED, "--config", self.config, "--listen", "127.0.0.1:0", "--ready-fd", str(wfd)],
                pass_fds=(wfd,),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        finally:
            os.close(wfd)
            logf.close()
        _LIVE.append(self)
        try:
            line = self._read_ready(rfd)
        finally:
            os.close(rfd)
        if not line.startswith("READY "):
            self.kill()
            raise GatewayError(
                f"{self.name}: no READY line within {self.ready_timeout:.0f}s (got {line!r}, "
                f"exit code {self.proc.returncode})\n--- log\n{self.log}"
            )
        self.port = int(line.split()[1])
        return self

    def _read_ready(self, fd):
        deadline = time.monotonic() + self.ready_timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                break
            chunk = os.read(fd, 64)
            if not chunk:  # the process closed the pipe (exited) without a line
                break
            buf += chunk
        return buf.decode("ascii", "replace").strip()

    @property
    def pid(self):
        return self.proc.pid

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def channel(self, options=None, token="admin"):
        """A plaintext channel whose calls carry `authorization: Bearer <token>` of the named
        demo principal (deploy/local writes one token per principal); token=None sends no
        credentials."""
        ch = grpc.insecure_channel(self.address, options=options or [])
        self._channels.append(ch)
        if token is None:
            return ch
        return grpc.intercept_channel(ch, BearerAuth(demo_token(self.config, token)))

    @property
    def log(self):
        """The log as text: each JSON line of the gateway as "time level component: msg
        key=value ...", other lines (gRPC core's own) as they are."""
        return "\n".join(readable_log_line(l) for l in self.raw_log.splitlines())

    @property
    def raw_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        """Waits for exit; returns the exit code (negative: killed by that signal)."""
        self.returncode = self.proc.wait(timeout=timeout)
        self._reaped()
        return self.returncode

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Sends `sig` and waits for exit; returns the exit code. A gateway that does not exit
        in time is killed and the test fails."""
        for ch in self._channels:
            ch.close()
        self._channels = []
        if self.proc.poll() is not None:
            self._reaped()
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GatewayError(f"{self.name} did not exit within {timeout}s of {signal.Signals(sig).name}\n{self.log}")

    def kill(self):
        for ch in self._channels:
            ch.close()
        self._channels = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self._reaped()

    def _reaped(self):
        if self in _LIVE:
            _LIVE.remove(self)

    def report(self):
        parts = [f"--- {self.name} (pid {self.proc.pid if self.proc else '-'}, port {self.port}) log {self.log_path}\n{self.log}"]
        if self.wrapper_log:
            parts.append(f"--- {self.name} wrapper log {self.wrapper_log}\n{_tail(self.wrapper_log, 20000)}")
        return "\n".join(parts)


_REPORTED = []  # gateways whose logs a failure report shows (those of the running test)


class GatewayFactory:
    """Starts gateways for one scope, each with a modified copy of domiciled.conf if asked."""

    def __init__(self, regions, workdir):
        self.regions = regions
        self.workdir = workdir
        self.started = []
        self._n = 0

    def config(self, overrides=None, extra_lines=(), name=None):
        self._n += 1
        path = os.path.join(self.workdir, f"{name or 'domiciled'}-{self._n}.conf")
        return write_config_copy(self.regions.conf, path, overrides, extra_lines)

    def start(self, overrides=None, name="gateway", config=None, **kw):
        if config is None:
            config = self.regions.conf if not overrides else self.config(overrides, name=name)
        self._n += 1
        g = Gateway(config, self.workdir, name=f"{name}-{self._n}", **kw)
        self.started.append(g)
        _REPORTED.append(g)
        g.start()
        return g

    def close(self):
        for g in self.started:
            if g.alive():
                try:
                    g.stop(timeout=15)
                except GatewayError:
                    pass
            g.kill()
            if g in _REPORTED:
                _REPORTED.remove(g)


@pytest.fixture(scope="session")
def session_gateway(regions):
    workdir = tempfile.mkdtemp(prefix="gw-session-", dir=regions.tmp)
    f = GatewayFactory(regions, workdir)
    try:
        yield f.start(name="session-gateway")
    finally:
        f.close()


@pytest.fixture
def gateway(session_gateway):
    """The shared gateway (for tests that do not restart it). It must still be running."""
    if not session_gateway.alive():
        pytest.fail(f"the session gateway has exited (code {session_gateway.proc.returncode}):\n{session_gateway.log}")
    return session_gateway


@pytest.fixture
def channel(gateway):
    """A channel to the session gateway carrying the admin principal's token."""
    raw = grpc.insecure_channel(gateway.address)
    yield grpc.intercept_channel(raw, BearerAuth(demo_token(gateway.config, "admin")))
    raw.close()


@pytest.fixture
def api(channel):
    """helpers.Api on `channel` (the admin principal on the session gateway)."""
    from helpers import Api  # helpers imports this module: not at its top

    return Api(channel)


@pytest.fixture
def gateways(regions):
    """Factory for gateways of this test only: `gateways.start(overrides={...})`. Stopped
    (SIGTERM, then SIGKILL) at teardown if the test left them running."""
    workdir = tempfile.mkdtemp(prefix="gw-", dir=regions.tmp)
    f = GatewayFactory(regions, workdir)
    try:
        yield f
    finally:
        f.close()


# --------------------------------------------------------------------------------------------
# failure reports: gateway logs and the PostgreSQL log tails


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    for g in list(_REPORTED):
        rep.sections.append((f"domiciled {g.name}", g.report()))
    if _REGIONS is not None:
        tails = [f"--- {p}\n{_tail(p, 3000)}" for p in _REGIONS.pg_logs()]
        if tails:
            rep.sections.append(("PostgreSQL logs (tails)", "\n".join(tails)))


# --------------------------------------------------------------------------------------------
# environment variables for a gateway process (added for the ledger tests)
#
# `gateways.start(..., env={"DOMICILE_TEST_CLOCK_OFFSET_MS": "-69120000000"})` starts that
# gateway with these variables added to (or, with value None, removed from) the inherited
# environment. Gateway(..., env=None) behaves exactly as before.

_gateway_init_plain = Gateway.__init__
_gateway_start_plain = Gateway.start


def _gateway_init_env(self, *args, env=None, **kw):
    _gateway_init_plain(self, *args, **kw)
    self.env = dict(env or {})


def _gateway_start_env(self):
    env = getattr(self, "env", None)
    if not env:
        return _gateway_start_plain(self)
    # Popen inherits os.environ at the moment of the call: set the variables for the start
    # only (the tests start gateways from one thread), then put everything back.
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        return _gateway_start_plain(self)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


Gateway.__init__ = _gateway_init_env
Gateway.start = _gateway_start_env
