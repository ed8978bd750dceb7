"""
Small helpers shared by the integration tests (the harness and its fixtures are in conftest.py).

    from helpers import Api, get, lit, md, now_ms, put, register, rpc_error, uid

Test modules import it after conftest, which puts the generated Python stubs (domicile.v1) on
sys.path; pytest loads conftest.py before it collects any test module.
"""

import base64
import json
import os
import re
import select
import shutil
import subprocess
import time
import uuid

import grpc
import pytest

from conftest import BUILD_DIR, REGIONS_STATE, SOURCE_DIR
from domicile.v1 import customers_pb2, records_pb2, transfers_pb2


def uid():
    return uuid.uuid4().hex


def now_ms():
    return int(time.time() * 1000)


def lit(s):
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


def asan_build():
    """True when BUILD_DIR was configured with -DDM_ASAN=ON (tests/run's sanitizer pass)."""
    try:
        with open(os.path.join(BUILD_DIR, "CMakeCache.txt")) as f:
            return any(line.strip() == "DM_ASAN:BOOL=ON" for line in f)
    except OSError:
        return False


def rpc_error(fn, *args, **kw):
    """Calls fn, which must fail with a gRPC error; returns that error."""
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args, **kw)
    return ei.value


def md(purpose=None, request_id=None):
    """Call metadata: x-purpose and x-request-id when given."""
    out = []
    if purpose:
        out.append(("x-purpose", purpose))
    if request_id:
        out.append(("x-request-id", request_id))
    return out


def assert_invalid(e, field, limit=None):
    """`e` is INVALID_ARGUMENT, its message naming `field` (and `limit`, when given)."""
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert field in e.details(), f"message does not name {field!r}: {e.details()!r}"
    if limit is not None:
        assert str(limit) in e.details(), f"message does not give the limit {limit}: {e.details()!r}"


def limits_case(request_type, change, **defaults):
    """A body builder for the limits tables: given the customer id the call is about, a
    `request_type` with a fresh request_id, that customer_id and `defaults`, then the fields of
    `change`; serialized."""

    def build(cid):
        args = dict(request_id=f"lim-{uid()}", customer_id=cid, **defaults)
        args.update(change)
        return request_type(**args).SerializeToString()

    return build


# --------------------------------------------------------------------------------------------
# the API on a channel


def unary_stub(channel, svc, method, req, rep):
    """The unary method /domicile.v1.<svc>/<method> on `channel`, taking `req` and returning `rep`."""
    return channel.unary_unary(f"/domicile.v1.{svc}/{method}", request_serializer=req.SerializeToString, response_deserializer=rep.FromString)


def stream_stub(channel, svc, method, req, rep):
    """The server-streaming method /domicile.v1.<svc>/<method> on `channel`, taking `req` and streaming `rep`."""
    return channel.unary_stream(f"/domicile.v1.{svc}/{method}", request_serializer=req.SerializeToString, response_deserializer=rep.FromString)


class Api:
    """Callables of the Customers, Records and Transfers services on one channel (Debian's grpcio
    has no generated *_pb2_grpc modules here, so the methods are built by path)."""

    def __init__(self, channel):
        def unary(svc, method, req, rep):
            return unary_stub(channel, svc, method, req, rep)

        self.channel = channel
        self.register = unary("CustomersService", "RegisterCustomer", customers_pb2.RegisterCustomerRequest, customers_pb2.RegisterCustomerResponse)
        self.get_customer = unary("CustomersService", "GetCustomer", customers_pb2.GetCustomerRequest, customers_pb2.GetCustomerResponse)
        self.close_customer = unary("CustomersService", "CloseCustomer", customers_pb2.CloseCustomerRequest, customers_pb2.CloseCustomerResponse)
        self.put = unary("RecordsService", "PutRecord", records_pb2.PutRecordRequest, records_pb2.PutRecordResponse)
        self.get = unary("RecordsService", "GetRecord", records_pb2.GetRecordRequest, records_pb2.GetRecordResponse)
        self.delete = unary("RecordsService", "DeleteRecord", records_pb2.DeleteRecordRequest, records_pb2.DeleteRecordResponse)
        self.list = stream_stub(channel, "RecordsService", "ListRecords", records_pb2.ListRecordsRequest, records_pb2.ListRecordsResponse)
        self.bulk = channel.stream_unary(
            "/domicile.v1.RecordsService/BulkPutRecords",
            request_serializer=records_pb2.BulkPutRecordsRequest.SerializeToString,
            response_deserializer=records_pb2.BulkPutRecordsResponse.FromString,
        )
        self.list_transfers = stream_stub(channel, "TransfersService", "ListTransfers", transfers_pb2.ListTransfersRequest, transfers_pb2.ListTransfersResponse)
        self.report = unary("TransfersService", "Report", transfers_pb2.ReportRequest, transfers_pb2.ReportResponse)
        self.verify_ledger = unary("TransfersService", "VerifyLedger", transfers_pb2.VerifyLedgerRequest, transfers_pb2.VerifyLedgerResponse)

    def raw(self, svc, method, kind="unary", rep=None):
        """/domicile.v1.<svc>/<method> with the request sent as given (bytes): for bodies the
        Python protobuf library will not build, such as invalid UTF-8 in a string field. The
        response is parsed as `rep`, or left as bytes. `kind` is "unary", "stream" (server
        stream) or "client-stream"."""
        path = f"/domicile.v1.{svc}/{method}"
        parse = rep.FromString if rep is not None else None
        if kind == "stream":
            return self.channel.unary_stream(path, request_serializer=None, response_deserializer=parse)
        if kind == "client-stream":
            return self.channel.stream_unary(path, request_serializer=None, response_deserializer=parse)
        return self.channel.unary_unary(path, request_serializer=None, response_deserializer=parse)


def list_once(api, req, metadata=None, timeout=30):
    """One ListRecords call (one page): the records streamed. Checks the stream's shape:
    records, then exactly one `end`, last."""
    items = list(api.list(req, timeout=timeout, metadata=metadata))
    kinds = [m.WhichOneof("item") for m in items]
    assert kinds and kinds[-1] == "end" and kinds.count("end") == 1, kinds
    return [m.record for m in items[:-1]]


def get(api, cid, rid, purpose=None, request_id=None, timeout=15):
    """GetRecord through api.get, with md(purpose, request_id): the Record of the response."""
    rep = api.get(records_pb2.GetRecordRequest(customer_id=cid, record_id=rid), metadata=md(purpose, request_id), timeout=timeout)
    assert rep.HasField("record"), rep
    return rep.record


def register(api, residency, cid=None, prefix="cust", timeout=15, reply=False, **kw):
    """RegisterCustomer through api.register; `kw` are further RegisterCustomerRequest fields
    (request_id defaults to a fresh one). The customer id is `cid`, else
    "<prefix>-<residency>-<hex>". Checks the reply is that customer, in `residency`, ACTIVE.
    Returns the customer id, or the Customer message with reply=True."""
    cid = cid or f"{prefix}-{residency}-{uid()}"
    kw.setdefault("request_id", f"reg-{uid()}")
    c = api.register(customers_pb2.RegisterCustomerRequest(customer_id=cid, residency=residency, **kw), timeout=timeout).customer
    assert (c.customer_id, c.residency, c.state) == (cid, residency, customers_pb2.CUSTOMER_STATE_ACTIVE), c
    return c if reply else cid


def put(api, cid, rid, payload=b"", kind="note", timeout=15, metadata=None, purpose=None, **kw):
    """PutRecord through api.put; `kw` are further PutRecordRequest fields (request_id defaults
    to a fresh one). `metadata` is sent with the call, plus x-purpose when `purpose` is given.
    Returns the PutRecordResponse."""
    kw.setdefault("request_id", f"put-{uid()}")
    return api.put(
        records_pb2.PutRecordRequest(customer_id=cid, record_id=rid, kind=kind, payload=payload, **kw),
        metadata=list(metadata or ()) + md(purpose),
        timeout=timeout,
    )


def bulk_stream(puts):
    """BulkPutRecords client-stream messages, one per PutRecordRequest of `puts`."""
    return (records_pb2.BulkPutRecordsRequest(put=p) for p in puts)


def paged(stream, request_type, item, max_pages=1000, timeout=30, **filters):
    """Every `item` of a paged server stream (items, then one `end` with next_page_token),
    following the tokens; checks each page's shape."""
    out, token = [], ""
    for _ in range(max_pages):
        msgs = list(stream(request_type(page_token=token, **filters), timeout=timeout))
        kinds = [m.WhichOneof("item") for m in msgs]
        assert kinds and kinds[-1] == "end" and kinds.count("end") == 1, kinds
        out += [getattr(m, item) for m in msgs[:-1]]
        token = msgs[-1].end.next_page_token
        if not token:
            return out
    raise AssertionError(f"{request_type.__name__} did not end after {max_pages} pages")


# --------------------------------------------------------------------------------------------
# protobuf by hand (bodies the Python library will not build)


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def pb_bytes(field, data):
    """A length-delimited field (string, bytes, message)."""
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_int(field, v):
    """A varint field."""
    return varint(field << 3) + varint(v)


def pb_label(field, key, value):
    """One map<string,string> entry as raw bytes."""
    return pb_bytes(field, pb_bytes(1, key) + pb_bytes(2, value))


# --------------------------------------------------------------------------------------------
# the regions' databases and layout


def rows(regions, region, sql):
    """The rows of `sql` on `region`'s primary, each a list of its columns (as text)."""
    out = regions.psql(region, sql)
    return [line.split("|") for line in out.splitlines()] if out else []


def key_aad(region, cid, subject_key=b""):
    """The AAD a data key is wrapped with (dm_key_aad): region, customer, subject key, each
    length-prefixed (tests/integration/tokens.py's unwrap adds the wrapped key's header)."""
    parts = (b"domicile-dek-v1", region.encode(), cid.encode(), subject_key)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def scalar(regions, region, sql):
    return regions.psql(region, sql)


def footprint(regions, region, cid):
    """How many rows of customer `cid` each table of `region` holds."""
    out = regions.psql(
        region,
        "SELECT "
        + ", ".join(
            f"(SELECT count(*) FROM domicile.{t} WHERE customer_id = {lit(cid)})"
            for t in ("customers", "records", "data_keys", "idempotency")
        ),
    )
    return dict(zip(("customers", "records", "data_keys", "idempotency"), map(int, out.split("|"))))


def subject_pepper(regions):
    """The gateway's subject pepper (the file its config names)."""
    with open(regions.conf) as f:
        m = re.search(r'^\s*subject_pepper_file\s*=\s*"([^"]+)"', f.read(), re.M)
    assert m, "subject_pepper_file not in the gateway config"
    with open(m.group(1), "rb") as f:
        return f.read()


def region_layout(regions, region):
    """(primary node, sync_state of the other node on it, number of running nodes)."""
    primary, repl, running = None, None, 0
    for e in regions.status_json():
        if e["region"] != region or not e["running"]:
            continue
        running += 1
        if e["role"] == "primary":
            primary = e["node"]
            other = "node2" if primary == "node1" else "node1"
            repl = e.get("standbys", {}).get(other)
    return primary, repl, running


# --------------------------------------------------------------------------------------------
# one channel of raw calls, from two client stacks (grpcio here, @grpc/grpc-js in node/)
#
# Both classes answer the same methods, so a test written once runs on both stacks:
#   unary(path, request, metadata) -> (grpc.StatusCode, details, response bytes or None)
#   open_stream(path, request, metadata) -> a stream handle whose .first is the first message
#       (or .code/.details when the call ended before one arrived)
#   active(h) -> no status yet;  drain(h) -> (code, details, the messages after the first)
#   cancel(h) -> (code, details): CANCELLED unless the call had ended already
# Requests and responses are serialized bytes; metadata is [(key, str)], bytes for "-bin" keys.

SC_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


class _Stream:
    def __init__(self, first=None, code=None, details=None, handle=None):
        self.first, self.code, self.details, self.handle = first, code, details, handle


class GrpcioClient:
    """The calls on one grpcio channel (Debian's python3-grpcio)."""

    name = "python3-grpcio"

    def __init__(self, channel):
        self.channel = channel

    def unary(self, path, request=b"", metadata=(), timeout=15):
        call = self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            return grpc.StatusCode.OK, "", call(request, metadata=list(metadata), timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details(), None

    def open_stream(self, path, request=b"", metadata=(), timeout=300):
        it = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(request, metadata=list(metadata), timeout=timeout)
        try:
            return _Stream(first=next(it), handle=it)
        except grpc.RpcError as e:
            return _Stream(code=e.code(), details=e.details(), handle=it)

    def active(self, s):
        return s.handle.is_active()

    def drain(self, s):
        msgs = []
        try:
            for m in s.handle:
                msgs.append(m)
        except grpc.RpcError:
            pass
        return s.handle.code(), s.handle.details(), msgs

    def cancel(self, s):
        s.handle.cancel()
        return s.handle.code(), s.handle.details()

    def close(self):
        pass


NODE_SOURCE = os.path.join(SOURCE_DIR, "tests", "integration", "node")


def node_client_modules():
    """node_modules of tests/integration/node/package-lock.json, installed with `npm ci` into
    BUILD_DIR/node-client once per lock file. Skips the test when node or npm is missing
    (deploy/deps.sh test installs both); a failing install fails it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the second client stack needs Node.js and npm (not found on PATH; deploy/deps.sh test installs them)")
    dest = os.path.join(BUILD_DIR, "node-client")
    stamp = os.path.join(dest, "node_modules", ".installed-lock")
    with open(os.path.join(NODE_SOURCE, "package-lock.json"), "rb") as f:
        lock = f.read()
    if os.path.isfile(stamp):
        with open(stamp, "rb") as f:
            if f.read() == lock:
                return os.path.join(dest, "node_modules")
    os.makedirs(dest, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(os.path.join(NODE_SOURCE, name), os.path.join(dest, name))
    p = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=dest, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"npm ci in {dest} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    with open(stamp, "wb") as f:
        f.write(lock)
    return os.path.join(dest, "node_modules")


class NodeClient:
    """The calls on one @grpc/grpc-js channel: tests/integration/node/client.js in a child
    process, one JSON command and answer per line. Every call carries `token`."""

    name = "@grpc/grpc-js"

    def __init__(self, address, token, reply_timeout=120):
        modules = node_client_modules()
        self.reply_timeout = reply_timeout
        self.stderr = open(os.path.join(os.path.dirname(modules), "client.stderr"), "w+")
        self.proc = subprocess.Popen(
            [shutil.which("node"), os.path.join(NODE_SOURCE, "client.js"), address, token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=dict(os.environ, NODE_PATH=modules),
        )
        self.buf = b""

    def _ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.reply_timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20) if r else b""
            if not chunk:
                self.stderr.seek(0)
                raise AssertionError(f"node client: no answer to {cmd['op']} (exit code {self.proc.poll()})\n{self.stderr.read()[-5000:]}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    @staticmethod
    def _md(metadata):
        return [[k, base64.b64encode(v).decode() if k.endswith("-bin") else v] for k, v in metadata]

    @staticmethod
    def _b64(data):
        return base64.b64encode(data).decode()

    def unary(self, path, request=b"", metadata=(), timeout=15):
        r = self._ask(op="unary", path=path, request=self._b64(request), metadata=self._md(metadata), timeout_ms=int(timeout * 1000))
        rep = base64.b64decode(r["response"]) if "response" in r else None
        return SC_BY_VALUE[r["code"]], r["details"], rep

    def open_stream(self, path, request=b"", metadata=(), timeout=300):
        r = self._ask(op="open_stream", path=path, request=self._b64(request), metadata=self._md(metadata), timeout_ms=int(timeout * 1000))
        if "first" in r:
            return _Stream(first=base64.b64decode(r["first"]), handle=r["stream"])
        return _Stream(code=SC_BY_VALUE[r["code"]], details=r["details"], handle=r["stream"])

    def active(self, s):
        return self._ask(op="active", stream=s.handle)["active"]

    def drain(self, s):
        r = self._ask(op="drain", stream=s.handle)
        return SC_BY_VALUE[r["code"]], r["details"], [base64.b64decode(m) for m in r["messages"]]

    def cancel(self, s):
        r = self._ask(op="cancel", stream=s.handle)
        return SC_BY_VALUE[r["code"]], r["details"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self._ask(op="close")
                self.proc.wait(timeout=30)
            except (AssertionError, BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.stderr.close()


def run_on_pty(cmd, timeout=120, env=None, stdin=subprocess.DEVNULL):
    """Runs `cmd` with its stderr on a pseudo-terminal (stdout on a pipe) and returns
    (returncode, stdout bytes, what reached the terminal). The terminal is read while the
    command runs, so a long progress line never fills its buffer and blocks the command."""
    import pty
    import threading

    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=slave, env=env)
    finally:
        os.close(slave)
    out = []
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    tty = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                tty += chunk
            elif p.poll() is not None:
                break
        p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    reader.join(timeout=10)
    return p.returncode, out[0] if out else b"", tty


def principal_region(name):
    """The region of a demo principal, as deploy/local's principals.conf says."""
    with open(os.path.join(REGIONS_STATE[0], "etc", "principals.conf")) as f:
        m = re.search(r'name = "' + re.escape(name) + r'";[^}]*region = "([a-z]+)"', f.read())
    assert m, f"principal {name} not in principals.conf"
    return m.group(1)


class Principals:
    """One Api per demo principal: `p["service-us"].get(...)`. Each calls the gateway of its own
    region in `gateway`'s federation, as a service does in production (a call through a third
    region's gateway is a transfer there too, test_sovereign.py); `gateway` itself when the
    federation has no gateway for that region."""

    def __init__(self, gateway):
        self.gateway = gateway
        self._apis = {}

    def __getitem__(self, name):
        if name not in self._apis:
            gw = (getattr(self.gateway, "peers", None) or {}).get(principal_region(name), self.gateway)
            self._apis[name] = Api(gw.channel(token=name))
        return self._apis[name]
