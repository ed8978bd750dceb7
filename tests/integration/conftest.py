"""
Integration harness: three real local regions (deploy/local/domicile-local) and a federation of
real gateways (build/domiciled), one per region, each holding only its own region's secrets
and forwarding calls on other regions' data to their gateways; called from an independent
gRPC client (Debian's python3-grpcio).

Run from the repository root:
    /usr/bin/python3 -m pytest -q tests/integration
Environment (all optional):
    DOMICILE_BUILD_DIR   build tree holding domiciled, domicile-wanproxy and gen/py
                         (default <repo>/build)
    DOMICILE_SOURCE_DIR  repository root (default: two levels above this file)
    DOMICILE_TEST_WAN    1: the session federation runs with the WAN proxy (emulated distance)
                         too; by default only tests that ask for distance get it

Fixtures (what a test names):
  regions             the session's three regions (Regions: psql, stop/start, the state)
  session_federation  the session's three gateways us, eu, in (Federation), WAN off
  gateway, channel, api    the us gateway of that federation, an admin channel to it, helpers.Api
  wan_federation      a second session federation whose gateway-to-gateway paths go through
                      domicile-wanproxy with the published round trips (started on first use)
  gateways            per test: gateways.start(...) starts a federation and returns its entry
                      gateway (us unless told); g.peers["eu"] is the eu gateway of the same
                      federation, g.federation the whole (see GatewayFactory.start)

Rules kept here and in the tests:
  * one `domicile-local up` per session, on a port base chosen free at run time, in a fresh
    temporary state directory that is destroyed at the end (also when set-up or a test fails);
  * no fixed waits: readiness is the gateway's (and the proxy's) `--ready-fd` line, state
    changes are awaited on Health/Watch streams or with blocking calls that carry a timeout;
  * ports are chosen free at run time (a start that loses a port to another process is
    retried on new ones);
  * a failing test gets the gateway and proxy logs and the tail of every PostgreSQL log attached.
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
WANPROXY = os.path.join(BUILD_DIR, "domicile-wanproxy")

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


def gateway_ports(base):
    """The peer ports (base+30+i) and the WAN proxy's ports (base+40+3c+r, c != r) that
    domicile-local writes into the gateways' configuration (deploy/local/README.md, Ports)."""
    n = len(REGION_CODES)
    return [base + 30 + i for i in range(n)] + [
        base + 40 + 3 * c + r for c in range(n) for r in range(n) if c != r
    ]


# Ports the harness picks are below the Linux ephemeral range (32768+), so that outgoing
# connections and `--listen 127.0.0.1:0` gateways do not take them between the choice and
# the servers' start.
PORT_LOW, PORT_HIGH = 20000, 32700


def choose_port_base(rng):
    """A port base whose PostgreSQL and gateway ports are all free on 127.0.0.1."""
    for _ in range(200):
        base = rng.randrange(PORT_LOW, PORT_HIGH - 50, 10)
        if all(_port_free(p) for p in region_ports(base) + gateway_ports(base)):
            return base
    raise RuntimeError("no free port base found for the local regions")


def free_ports(n, rng, avoid=()):
    """`n` distinct ports free on 127.0.0.1 now (none in `avoid`). Another process may still
    take one before it is bound: callers retry on "address in use"."""
    out = []
    for _ in range(2000):
        p = rng.randrange(PORT_LOW, PORT_HIGH)
        if p not in out and p not in avoid and _port_free(p):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError(f"no {n} free ports found")


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
    """Copy a libconfig file, replacing `key = ...;` lines for keys in `overrides` (ints,
    strings, lists of strings; a string is quoted; None removes the key) and appending keys
    that were absent, then `extra_lines`."""
    overrides = dict(overrides or {})
    with open(src) as f:
        lines = f.read().splitlines()
    out, done = [], set()
    for line in lines:
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in overrides:
            if overrides[key] is not None:
                out.append(f"{key} = {_cfg_value(overrides[key])};")
            done.add(key)
        else:
            out.append(line)
    for key, value in overrides.items():
        if key not in done and value is not None:
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
    if isinstance(v, (list, tuple)):
        return "[ " + ", ".join(_cfg_value(x) for x in v) + " ]"
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
    """One `domicile-local` state: three regions, six PostgreSQL servers, and the
    configuration of one gateway per region ($STATE/gw/<code>/etc, deploy/local/README.md)."""

    def __init__(self, tmp, state, port_base):
        self.tmp = tmp
        self.state = state
        self.port_base = port_base
        # The us gateway's configuration (also $STATE/etc/domiciled.conf): the demo's default
        # gateway, and what a test that starts "a gateway" from a config file starts.
        self.conf = self.gateway_conf("us")
        self.regions_dir = self.gateway_regions_dir("us")
        self.log_dir = os.path.join(state, "log")

    def gateway_conf(self, code):
        """domiciled.conf of region `code`'s gateway."""
        return os.path.join(self.state, "gw", code, "etc", "domiciled.conf")

    def gateway_regions_dir(self, code):
        """Region files as `code`'s gateway sees them: its own in full, the others public."""
        return os.path.join(self.state, "gw", code, "etc", "regions")

    def peer_port(self, code):
        return self.port_base + 30 + REGION_CODES.index(code)

    def secret_path(self, code, name):
        """A secret of region `code`, in its gateway's directory only: "db.password", "kek",
        "ledger.key", "peer.key" or "subject_pepper" (deploy/local/README.md)."""
        return os.path.join(self.state, "gw", code, "secrets", name)

    def rtt_ms(self):
        """{(a, b): round trip in ms} for both orders of each region pair, as `up` recorded it
        in $STATE/gw/wan.env (the published figures unless --rtt changed them)."""
        out = {}
        with open(os.path.join(self.state, "gw", "wan.env")) as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k.startswith("RTT_"):
                    a, b = k[4:].split("_")
                    out[(a, b)] = out[(b, a)] = float(v)
        return out

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
        return [
            os.path.join(self.log_dir, n)
            for n in names
            if not n.endswith((".initdb.log", ".basebackup.log")) and not n.startswith(("gateway-", "wanproxy"))
        ]


def regions_up(tmp, state, *up_args, timeout=300):
    """`domicile-local up --wan off` (with `up_args`) in a new state directory `state`, on a
    port base chosen free at run time; returns its Regions. The state's gateway
    configurations call each other directly; a federation with distance gets its own proxy
    (Federation(wan=True)). Three attempts: another process may take a port between the
    choice and the start."""
    what = " ".join(("domicile-local up",) + up_args)
    rng = random.Random()
    last_error = None
    for _attempt in range(3):
        base = choose_port_base(rng)
        r = Regions(tmp, state, base)
        p = r.run("--port-base", str(base), "--fsync", "off", "up", "--wan", "off", *up_args,
                  timeout=timeout, check=False)
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
# processes: gateways and the WAN proxy

_LIVE = []  # processes started and not yet reaped: killed at exit whatever happens


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


def _config_string(path, key):
    """The string value of `key = "...";` in a libconfig file, or None."""
    import re

    try:
        with open(path) as f:
            m = re.search(r'^\s*' + re.escape(key) + r'\s*=\s*"([^"]*)"', f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def demo_token(config_path, name):
    """The bearer token of demo principal `name`, from the state whose principals the config
    names (STATE/etc/principals.conf -> STATE/secrets/tokens/<name>.token; also found from a
    directory above the config, or the session's state), or a literal token when `name` is not
    a demo principal's file."""
    bases = []
    principals = _config_string(config_path, "principals_file")
    if principals:
        bases.append(os.path.dirname(os.path.dirname(principals)))
    d = os.path.dirname(os.path.abspath(config_path))
    while d != "/":
        bases.append(d)
        d = os.path.dirname(d)
    bases += REGIONS_STATE
    for base in bases:
        path = os.path.join(base, "secrets", "tokens", f"{name}.token")
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


def _child_env(env):
    """os.environ with `env` applied (a value of None removes the variable), or None (inherit)
    when `env` is empty."""
    if not env:
        return None
    out = dict(os.environ)
    for k, v in env.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = str(v)
    return out


def _read_ready(fd, timeout):
    """The first line written to pipe `fd` within `timeout` seconds ("" if none, or if the
    writer closed it first: the process exited)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        buf += chunk
    return buf.decode("ascii", "replace").strip()


class _Process:
    """A child that writes "READY ..." to --ready-fd once serving; its output goes to a log
    file. Subclasses give the command line."""

    kind = "process"

    def __init__(self, workdir, name, env=None, wrapper=(), wrapper_log=None, ready_timeout=READY_TIMEOUT):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.env = dict(env or {})
        self.wrapper = list(wrapper)
        self.wrapper_log = wrapper_log
        self.ready_timeout = ready_timeout
        self.proc = None
        self.returncode = None
        self.ready_line = None
        self._rfd = None

    def command(self, ready_fd):
        raise NotImplementedError

    def spawn(self):
        """Starts the process; await_ready() then waits for its readiness line. Split so that
        several processes can start at once."""
        rfd, wfd = os.pipe()
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*self.wrapper, *self.command(wfd)],
                pass_fds=(wfd,),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_child_env(self.env),
            )
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
            logf.close()
        _LIVE.append(self)
        self._rfd = rfd
        return self

    def await_ready(self):
        try:
            line = _read_ready(self._rfd, self.ready_timeout)
        finally:
            os.close(self._rfd)
            self._rfd = None
        if not line.startswith("READY"):
            self.kill()
            raise GatewayError(
                f"{self.name}: no READY line within {self.ready_timeout:.0f}s (got {line!r}, "
                f"exit code {self.proc.returncode})\n--- log\n{self.log}"
            )
        self.ready_line = line
        self.ready(line.split()[1:])
        return self

    def ready(self, words):
        pass

    def start(self):
        return self.spawn().await_ready()

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def raw_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def log(self):
        return self.raw_log

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        """Waits for exit; returns the exit code (negative: killed by that signal)."""
        self.returncode = self.proc.wait(timeout=timeout)
        self._reaped()
        return self.returncode

    def _close_channels(self):
        pass

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Sends `sig` and waits for exit; returns the exit code. A process that does not exit
        in time is killed and the test fails."""
        self._close_channels()
        if self.proc.poll() is not None:
            self._reaped()
            self.returncode = self.proc.returncode
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GatewayError(f"{self.name} did not exit within {timeout}s of {signal.Signals(sig).name}\n{self.log}")

    def kill(self):
        self._close_channels()
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None
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
        parts = [f"--- {self.name} (pid {self.proc.pid if self.proc else '-'}) log {self.log_path}\n{self.log}"]
        if self.wrapper_log:
            parts.append(f"--- {self.name} wrapper log {self.wrapper_log}\n{_tail(self.wrapper_log, 20000)}")
        return "\n".join(parts)


class Gateway(_Process):
    """A domiciled process listening on 127.0.0.1:<any free port>. Logs (stderr) go to a file
    in `workdir`; under a `wrapper` (valgrind) the wrapper's own log is `wrapper_log`; `env`
    adds variables to its environment (a value of None removes one). In a federation,
    `region` is the region it serves, `peers` maps every started region's code to its gateway
    (this one included) and `federation` is the Federation."""

    kind = "gateway"

    def __init__(self, config, workdir, name="gateway", wrapper=(), wrapper_log=None,
                 ready_timeout=READY_TIMEOUT, env=None, region=None):
        super().__init__(workdir, name, env=env, wrapper=wrapper, wrapper_log=wrapper_log, ready_timeout=ready_timeout)
        self.config = config
        self.region = region or _config_string(config, "gateway_region")
        self.port = None
        self.peers = {}
        self.federation = None
        self._channels = []

    def command(self, ready_fd):
        return [DOMICILED, "--config", self.config, "--listen", "127.0.0.1:0", "--ready-fd", str(ready_fd)]

    def ready(self, words):
        self.port = int(words[0])

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    @property
    def peer_address(self):
        """Where gateways of other regions call this one (its peer_listen)."""
        return _config_string(self.config, "peer_listen")

    def channel(self, options=None, token="admin"):
        """A plaintext channel whose calls carry `authorization: Bearer <token>` of the named
        demo principal (deploy/local writes one token per principal); token=None sends no
        credentials."""
        ch = grpc.insecure_channel(self.address, options=options or [])
        self._channels.append(ch)
        if token is None:
            return ch
        return grpc.intercept_channel(ch, BearerAuth(demo_token(self.config, token)))

    def _close_channels(self):
        for ch in self._channels:
            ch.close()
        self._channels = []

    @property
    def log(self):
        """The log as text: each JSON line of the gateway as "time level component: msg
        key=value ...", other lines (gRPC core's own) as they are."""
        return "\n".join(readable_log_line(l) for l in self.raw_log.splitlines())

    def report(self):
        head = f"--- {self.name} (region {self.region}, pid {self.proc.pid if self.proc else '-'}, port {self.port}, peer {self.peer_address})"
        parts = [f"{head} log {self.log_path}\n{self.log}"]
        if self.wrapper_log:
            parts.append(f"--- {self.name} wrapper log {self.wrapper_log}\n{_tail(self.wrapper_log, 20000)}")
        return "\n".join(parts)


class WanProxy(_Process):
    """domicile-wanproxy with `routes`, a list of (listen "host:port", target "host:port",
    one-way delay in ms); listen port 0 = any. After start(), `ports` holds the bound ports in
    route order."""

    kind = "wanproxy"

    def __init__(self, routes, workdir, name="wanproxy", buffer=None, verbose=True, ready_timeout=READY_TIMEOUT):
        super().__init__(workdir, name, ready_timeout=ready_timeout)
        self.routes = list(routes)
        self.buffer = buffer
        self.verbose = verbose
        self.ports = []

    def command(self, ready_fd):
        cmd = [WANPROXY, "--ready-fd", str(ready_fd)]
        for listen, target, delay_ms in self.routes:
            cmd += ["--route", f"{listen}={target}@{delay_ms:g}"]
        if self.buffer is not None:
            cmd += ["--buffer", str(self.buffer)]
        if self.verbose:
            cmd.append("-v")
        return cmd

    def ready(self, words):
        self.ports = [int(w) for w in words]
        assert len(self.ports) == len(self.routes), self.ready_line


_REPORTED = []  # processes whose logs a failure report shows (those of the running test)

# Keys of a gateway's configuration that name something only one gateway can have (a port to
# bind, its own view of the regions): in `overrides` of a federation they go to the entry
# gateway only.
ENTRY_ONLY_KEYS = ("listen", "metrics_listen", "probe_listen", "regions_dir", "gateway_region", "peer_listen")

# What a gateway logs when a port it was given is taken (then the federation starts again on
# other ports).
_ADDRESS_IN_USE = ("in use", "EADDRINUSE", "Failed to add port", "failed to bind")


class Federation:
    """One gateway per region (or several: `replicas`), started from the state's per-gateway
    configuration ($STATE/gw/<code>/etc): each holds only its own region's secrets and reaches
    the other regions through their gateways' peer ports, directly or (wan=True) through one
    domicile-wanproxy whose routes delay each direction by half the pair's round trip.

    Options (GatewayFactory.start passes them through):
      overrides         keys set in every gateway's domiciled.conf; ENTRY_ONLY_KEYS only in the
                        entry's
      region_overrides  {code: {key: value}}: keys for one region's gateways only (after
                        `overrides`)
      region_files      {code: {region: {key: value}}}: keys set in the file of `region` that
                        `code`'s gateways read (None removes a key), e.g. {"eu": {"eu":
                        {"ssl_root_cert": other_ca}}} for an eu gateway with the wrong CA
      only              a code or codes: start only these regions' gateways; the others'
                        addresses in the configuration are ports nobody listens on (their
                        regions answer UNAVAILABLE), or those of `peers`
      peers             a running Federation serving the regions this one does not start
      entry             the region whose gateway is returned to the test (default us, else the
                        first started)
      replicas          {code: n}: n gateways for that region (default 1), each with its own
                        peer port; every other region's file lists all of them
      wan               True: every gateway-to-gateway path goes through the WAN proxy
      rtt_ms            {(a, b): ms} round trips (default: the state's, deploy/local/README.md)
      env               environment of every gateway (value None removes a variable)
      wrapper, wrapper_log   wrap the entry gateway only (valgrind, prlimit)
      state_config      True: the state's own files as they are (the session's WAN-off
                        federation, on the state's peer ports); no override allowed
      converge          True (default): start() returns once every gateway sees each region
                        SERVING whose own gateways do (see converge())

    After start(): gateways[code] is the first gateway of each started region (also
    g.peers[code] of each gateway), replicas[code] all of them, proxy the WanProxy or None.
    """

    def __init__(self, regions, workdir, name="fed", overrides=None, region_overrides=None, region_files=None, only=None,
                 peers=None, entry=None, replicas=None, wan=False, rtt_ms=None, env=None, wrapper=(),
                 wrapper_log=None, ready_timeout=READY_TIMEOUT, extra_lines=(), state_config=False,
                 converge=True):
        self.regions = regions
        self.workdir = workdir
        self.name = name
        self.overrides = dict(overrides or {})
        self.region_overrides = {k: dict(v) for k, v in (region_overrides or {}).items()}
        self.region_files = {c: {r: dict(kv) for r, kv in v.items()} for c, v in (region_files or {}).items()}
        if only is None:
            self.codes = list(REGION_CODES)
        else:
            wanted = [only] if isinstance(only, str) else list(only)
            self.codes = [c for c in REGION_CODES if c in wanted]
            assert self.codes and len(self.codes) == len(wanted), f"unknown region in only={only!r}"
        self.entry_code = entry or ("us" if "us" in self.codes else self.codes[0])
        assert self.entry_code in self.codes, f"entry {self.entry_code!r} is not started (only={only!r})"
        self.n_replicas = {c: int((replicas or {}).get(c, 1)) for c in REGION_CODES}
        assert all(n >= 1 for n in self.n_replicas.values()), replicas
        self.peer_federation = peers
        self.wan = wan
        self.rtt_ms = dict(rtt_ms or regions.rtt_ms())
        self.env = dict(env or {})
        self.wrapper = list(wrapper)
        self.wrapper_log = wrapper_log
        self.ready_timeout = ready_timeout
        self.extra_lines = list(extra_lines)
        self.state_config = state_config
        self.converge_on_start = converge
        if state_config:
            assert not (overrides or region_overrides or region_files or extra_lines or wan or only or peers
                        or replicas), (
                "state_config: the state's files as they are"
            )
        self.gateways = {}  # code -> first Gateway of the region
        self.replicas = {}  # code -> [Gateway, ...]
        self.proxy = None
        self.peer_ports = {}  # code -> [port of each gateway of that region]
        self.addresses = {}  # (from code, to code) -> [addresses `from` calls `to`'s gateways at]

    # ---- addresses and files

    def one_way_ms(self, a, b):
        return self.rtt_ms[(a, b)] / 2.0

    def _choose_ports(self, rng):
        if self.state_config:
            self.peer_ports = {c: [self.regions.peer_port(c)] for c in REGION_CODES}
            return
        avoid = set(region_ports(self.regions.port_base) + gateway_ports(self.regions.port_base))
        fresh = iter(free_ports(sum(self.n_replicas.values()), rng, avoid))
        self.peer_ports = {c: [next(fresh) for _ in range(self.n_replicas[c])] for c in REGION_CODES}
        if self.peer_federation is not None:
            for c in REGION_CODES:
                if c not in self.codes and c in self.peer_federation.gateways:
                    self.peer_ports[c] = list(self.peer_federation.peer_ports[c])

    def _start_proxy(self):
        """One proxy for the federation: a route per (started region c, gateway of another
        region r), shared by c's gateways."""
        routes, keys = [], []
        for c in self.codes:
            for r in REGION_CODES:
                if r != c:
                    for port in self.peer_ports[r]:
                        keys.append((c, r))
                        routes.append(("127.0.0.1:0", f"127.0.0.1:{port}", self.one_way_ms(c, r)))
        self.proxy = WanProxy(routes, self.workdir, name=f"{self.name}-wanproxy", ready_timeout=self.ready_timeout)
        _REPORTED.append(self.proxy)
        self.proxy.start()
        for key, port in zip(keys, self.proxy.ports):
            self.addresses.setdefault(key, []).append(f"127.0.0.1:{port}")

    def _write_config(self, code, index):
        """This federation's copy of the configuration of `code`'s gateway number `index`;
        returns its path."""
        if self.state_config:
            return self.regions.gateway_conf(code)
        d = os.path.join(self.workdir, f"{self.name}-{code}" + (f"-{index + 1}" if index else ""))
        rdir = os.path.join(d, "regions")
        os.makedirs(rdir, exist_ok=True)
        src_rdir = self.regions.gateway_regions_dir(code)
        for r in REGION_CODES:
            src = os.path.join(src_rdir, f"{r}.conf")
            ov = {} if r == code else {"gateways": self.addresses[(code, r)]}
            ov.update(self.region_files.get(code, {}).get(r, {}))
            write_config_copy(src, os.path.join(rdir, f"{r}.conf"), ov)
        ov = {"peer_listen": f"127.0.0.1:{self.peer_ports[code][index]}", "regions_dir": rdir}
        is_entry = code == self.entry_code and index == 0
        for k, v in self.overrides.items():
            if k not in ENTRY_ONLY_KEYS or is_entry:
                ov[k] = v
        ov.update(self.region_overrides.get(code, {}))
        return write_config_copy(self.regions.gateway_conf(code), os.path.join(d, "domiciled.conf"), ov, self.extra_lines)

    # ---- life cycle

    def start(self):
        """Starts the proxy (wan) and the gateways (the entry last, so that its peers already
        serve); returns the entry gateway. A start that loses a port to another process is
        retried on new ports (three attempts)."""
        rng = random.Random()
        for attempt in range(3):
            try:
                self._start_once(rng)
                return self.entry
            except GatewayError as e:
                logs = "\n".join(g.raw_log for g in self.all())
                self.stop()
                if self.state_config or attempt == 2 or not any(s in logs for s in _ADDRESS_IN_USE):
                    raise e
                self.unreport()  # a port was taken: the next attempt's processes are reported

    def _start_once(self, rng):
        self.gateways, self.replicas, self.proxy, self.addresses = {}, {}, None, {}
        self._choose_ports(rng)
        if self.wan:
            self._start_proxy()
        else:
            for c in self.codes:
                for r in REGION_CODES:
                    if r != c:
                        self.addresses[(c, r)] = [f"127.0.0.1:{p}" for p in self.peer_ports[r]]
        for code in self.codes:
            for index in range(self.n_replicas[code]):
                is_entry = code == self.entry_code and index == 0
                g = Gateway(
                    self._write_config(code, index),
                    self.workdir,
                    name=f"{self.name}-{code}" + (f"-{index + 1}" if index else ""),
                    wrapper=self.wrapper if is_entry else (),
                    wrapper_log=self.wrapper_log if is_entry else None,
                    ready_timeout=self.ready_timeout,
                    env=self.env,
                    region=code,
                )
                g.federation = self
                g.peers = self.gateways
                self.replicas.setdefault(code, []).append(g)
                self.gateways.setdefault(code, g)
                _REPORTED.append(g)
        entry = self.gateways[self.entry_code]
        others = [g for gs in self.replicas.values() for g in gs if g is not entry]
        for g in others:
            g.spawn()
        for g in others:
            g.await_ready()
        entry.start()
        if self.converge_on_start:
            self.converge()

    def converge(self, own_timeout=5.0, timeout=60.0):
        """Waits until every started gateway sees each region SERVING whose own gateways (of
        this federation, or of `peers`) serve it: a gateway learns a peer region's state from
        its first health check of that region's gateways, so right after start it may still
        answer UNAVAILABLE for a region that is up. A region whose own gateways do not report
        SERVING within `own_timeout` s (its database is down: some tests start that way) is
        not waited for."""
        owners = dict(self.peer_federation.replicas) if self.peer_federation is not None else {}
        owners.update(self.replicas)
        up = []
        for r, own in owners.items():
            try:
                for g in own:
                    wait_health(g.channel(token=None), f"domicile.region.{r}", SERVING, timeout=own_timeout)
                up.append(r)
            except AssertionError:
                pass
        for g in self.all_gateways():
            ch = g.channel(token=None)
            for r in up:
                try:
                    wait_health(ch, f"domicile.region.{r}", SERVING, timeout=timeout)
                except AssertionError as e:
                    raise GatewayError(
                        f"{g.name} does not see region {r} SERVING within {timeout:.0f}s although "
                        f"its own gateways serve it: {e}"
                    ) from None

    @property
    def entry(self):
        return self.gateways[self.entry_code]

    def __getitem__(self, code):
        return self.gateways[code]

    def all_gateways(self):
        return [g for gs in self.replicas.values() for g in gs]

    def all(self):
        """The started processes, the proxy first if any."""
        return ([self.proxy] if self.proxy else []) + self.all_gateways()

    def check_alive(self):
        """Fails the test when a gateway (or the proxy) of this federation has exited."""
        for p in self.all():
            if not p.alive():
                pytest.fail(f"{p.name} has exited (code {p.proc.returncode if p.proc else None}):\n{p.log}")

    def stop(self, timeout=15.0):
        """SIGTERM to every gateway at once, then to the proxy; SIGKILL what does not exit in
        time. Returns {name: exit code}."""
        codes = {}
        gws = [g for g in self.all_gateways() if g.proc is not None]
        for g in gws:
            g._close_channels()
            if g.alive():
                g.send_signal(signal.SIGTERM)
        for g in gws:
            try:
                codes[g.name] = g.wait(timeout)
            except subprocess.TimeoutExpired:
                g.kill()
                codes[g.name] = g.returncode
        if self.proxy is not None and self.proxy.proc is not None:
            try:
                codes[self.proxy.name] = self.proxy.stop(timeout=timeout)
            except GatewayError:
                codes[self.proxy.name] = self.proxy.returncode
        return codes

    def unreport(self):
        for p in self.all():
            if p in _REPORTED:
                _REPORTED.remove(p)


class GatewayFactory:
    """Starts federations (or, with only=, some of their gateways) for one scope."""

    def __init__(self, regions, workdir):
        self.regions = regions
        self.workdir = workdir
        self.started = []  # Federations
        self.singles = []  # Gateways started from a given config
        self._n = 0

    def config(self, overrides=None, extra_lines=(), name=None, region="us"):
        """A modified copy of `region`'s gateway configuration (the state's own files, peers on
        the state's peer ports)."""
        self._n += 1
        path = os.path.join(self.workdir, f"{name or 'domiciled'}-{self._n}.conf")
        return write_config_copy(self.regions.gateway_conf(region), path, overrides, extra_lines)

    def start(self, overrides=None, name="gateway", config=None, env=None, wrapper=(), wrapper_log=None,
              ready_timeout=READY_TIMEOUT, **federation):
        """Starts a federation and returns its entry gateway (g.peers["eu"], g.federation).

        `overrides` go into every gateway's configuration (ENTRY_ONLY_KEYS into the entry's
        only); `env` into every gateway's environment; `wrapper` wraps the entry only. Further
        keywords: see Federation (region_overrides, region_files, only, peers, entry, replicas,
        wan, rtt_ms, extra_lines, converge). With `config`, one gateway is started from that file as it is
        (its peers are whatever that file's regions_dir names)."""
        self._n += 1
        if config is not None:
            g = Gateway(config, self.workdir, name=f"{name}-{self._n}", wrapper=wrapper, wrapper_log=wrapper_log,
                        ready_timeout=ready_timeout, env=env)
            self.singles.append(g)
            _REPORTED.append(g)
            return g.start()
        fed = Federation(self.regions, self.workdir, name=f"{name}-{self._n}", overrides=overrides, env=env,
                         wrapper=wrapper, wrapper_log=wrapper_log, ready_timeout=ready_timeout, **federation)
        self.started.append(fed)
        return fed.start()

    def close(self):
        for fed in self.started:
            fed.stop()
            fed.unreport()
        for g in self.singles:
            if g.alive():
                try:
                    g.stop(timeout=15)
                except GatewayError:
                    pass
            g.kill()
            if g in _REPORTED:
                _REPORTED.remove(g)


def _session_wan():
    return os.environ.get("DOMICILE_TEST_WAN", "") not in ("", "0", "off", "no")


def _run_federation(regions, name, **kw):
    fed = Federation(regions, tempfile.mkdtemp(prefix=f"gw-{name}-", dir=regions.tmp), name=name, **kw)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()
        fed.unreport()


@pytest.fixture(scope="session")
def session_federation(regions):
    """The session's gateways us, eu, in: the state's configuration as deploy/local wrote it
    (WAN off), or with the WAN proxy when DOMICILE_TEST_WAN=1."""
    yield from _run_federation(regions, "session", wan=_session_wan(), state_config=not _session_wan())


@pytest.fixture(scope="session")
def wan_federation(regions):
    """A federation of its own whose gateway-to-gateway paths go through domicile-wanproxy,
    delaying each direction by half the pair's round trip as the state records it (by default
    the published figures of deploy/local/README.md, "WAN emulation": us-eu 97 ms, eu-in 150 ms,
    us-in 216 ms). Started when a test first asks for it.
    """
    yield from _run_federation(regions, "wan", wan=True)


@pytest.fixture(scope="session")
def session_gateway(session_federation):
    """The us gateway of the session federation."""
    return session_federation.entry


@pytest.fixture
def gateway(session_federation):
    """The shared us gateway (for tests that do not restart it). It and its peers must still
    be running."""
    session_federation.check_alive()
    return session_federation.entry


@pytest.fixture
def channel(gateway):
    """A channel to the session's us gateway carrying the admin principal's token."""
    raw = grpc.insecure_channel(gateway.address)
    yield grpc.intercept_channel(raw, BearerAuth(demo_token(gateway.config, "admin")))
    raw.close()


@pytest.fixture
def api(channel):
    """helpers.Api on `channel` (the admin principal on the session's us gateway)."""
    from helpers import Api  # helpers imports this module: not at its top

    return Api(channel)


@pytest.fixture
def gateways(regions):
    """Factory for federations of this test only: `gateways.start(overrides={...})` returns
    the us gateway of a new federation. Stopped (SIGTERM, then SIGKILL) at teardown if the
    test left them running."""
    workdir = tempfile.mkdtemp(prefix="gw-", dir=regions.tmp)
    f = GatewayFactory(regions, workdir)
    try:
        yield f
    finally:
        f.close()


# --------------------------------------------------------------------------------------------
# failure reports: gateway and proxy logs, the PostgreSQL log tails


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    for g in list(_REPORTED):
        rep.sections.append((f"{g.kind} {g.name}", g.report()))
    if _REGIONS is not None:
        tails = [f"--- {p}\n{_tail(p, 3000)}" for p in _REGIONS.pg_logs()]
        if tails:
            rep.sections.append(("PostgreSQL logs (tails)", "\n".join(tails)))
