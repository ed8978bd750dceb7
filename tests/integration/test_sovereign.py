"""
Sovereign regions (issue 15, DESIGN.md promise 10): a gateway serves one region, holds that
region's secrets only, connects to that region's PostgreSQL only, and reaches the others
through their gateways; the answer is the same whichever gateway a client calls; a
cross-border call costs one gateway-to-gateway call, a fan-out one call per peer region.
"""

import os
import re
import shutil
import subprocess
import urllib.request

import grpc
import pytest

from conftest import DOMICILED, REGION_CODES, region_ports, wait_until
from helpers import Api, get, md, put, register, rpc_error, uid, unary_stub

from domicile.v1 import records_pb2, subject_rights_pb2, transfers_pb2


# --------------------------------------------------------------------------------------------
# promise 1: one region's secrets and database per gateway


def _copy_gateway_config(regions, code, dst):
    """A copy of `code`'s gateway configuration whose regions_dir is a copy too."""
    rdir = os.path.join(dst, "regions")
    shutil.copytree(regions.gateway_regions_dir(code), rdir)
    with open(regions.gateway_conf(code)) as f:
        text = f.read()
    text = re.sub(r'(?m)^regions_dir\s*=.*$', f'regions_dir = "{rdir}";', text)
    conf = os.path.join(dst, "domiciled.conf")
    with open(conf, "w") as f:
        f.write(text)
    return conf, rdir


@pytest.mark.parametrize(
    "key,value,why",
    [
        ("kek_file", '"/var/lib/domicile/eu.kek"', "a secret of region \"eu\""),
        ("pkcs11_pin_file", '"/var/lib/domicile/eu.pin"', "a secret of region \"eu\""),
        ("pkcs11_module", '"/usr/lib/softhsm/libsofthsm2.so"', "a secret of region \"eu\""),
        ("password_file", '"/var/lib/domicile/eu.password"', "a secret of region \"eu\""),
        ("ledger_key_file", '"/var/lib/domicile/eu.ledger"', "a secret of region \"eu\""),
        ("hosts", '[ "127.0.0.1:5432" ]', "the database of region \"eu\" is reached only through"),
    ],
)
def test_foreign_secret_or_database_is_refused(regions, tmp_path, key, value, why):
    conf, rdir = _copy_gateway_config(regions, "us", str(tmp_path))
    eu = os.path.join(rdir, "eu.conf")
    with open(eu) as f:
        lines = f.read().splitlines()
    lines.append(f"{key} = {value};")
    with open(eu, "w") as f:
        f.write("\n".join(lines) + "\n")
    line_no = len(lines)
    want = f'{eu}:{line_no}: key "{key}": {why}'
    p = subprocess.run([DOMICILED, "--config", conf, "--check-config"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert want in p.stderr + p.stdout, p.stderr
    # The gateway itself refuses to start with it, naming the same place.
    p = subprocess.run([DOMICILED, "--config", conf, "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0
    assert want in p.stderr, p.stderr


def test_own_region_needs_its_secrets(regions, tmp_path):
    conf, rdir = _copy_gateway_config(regions, "us", str(tmp_path))
    us = os.path.join(rdir, "us.conf")
    with open(us) as f:
        text = f.read()
    with open(us, "w") as f:
        f.write(re.sub(r'(?m)^pkcs11_pin_file\s*=.*$', "", text))
    p = subprocess.run([DOMICILED, "--config", conf, "--check-config"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert 'key "pkcs11_pin_file": missing (required with kek_source = "pkcs11"' in p.stderr + p.stdout


def test_other_regions_files_hold_no_secret(regions):
    """What deploy/local wrote: another region's file names only its gateways."""
    for code in REGION_CODES:
        rdir = regions.gateway_regions_dir(code)
        for other in REGION_CODES:
            with open(os.path.join(rdir, f"{other}.conf")) as f:
                text = f.read()
            keys = set(re.findall(r"(?m)^\s*([a-z_0-9]+)\s*=", text))
            if other == code:
                assert {"pkcs11_module", "pkcs11_token", "pkcs11_pin_file", "ledger_key_file", "password_file",
                        "hosts"} <= keys
                assert "kek_file" not in keys
            else:
                assert keys <= {"code", "name", "jurisdiction", "gateways", "gateway_identity"}, (code, other, keys)


def _remote_ports(pid):
    """Remote TCP ports of the process's established sockets (/proc/PID/fd -> /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[9] in inodes and cols[3] == "01":  # ESTABLISHED
                    ports.add(int(cols[2].rsplit(":", 1)[1], 16))
    return ports


def test_gateway_connects_only_to_its_own_region_database(regions, session_federation):
    base = regions.port_base
    pg = {code: set(region_ports(base)[2 * i:2 * i + 2]) for i, code in enumerate(REGION_CODES)}
    for code, g in session_federation.gateways.items():
        ports = wait_until(lambda: _remote_ports(g.pid), lambda p: p & pg[code], timeout=20)
        assert ports & pg[code], f"{code} gateway has no connection to its own database: {ports}"
        for other in REGION_CODES:
            if other != code:
                assert not (ports & pg[other]), f"{code} gateway is connected to {other}'s PostgreSQL: {ports}"
        # And `ss` agrees (the operator's view): no socket of this process to another region.
        out = subprocess.run(["ss", "-tnp"], capture_output=True, text=True, timeout=30).stdout
        mine = [l for l in out.splitlines() if f"pid={g.pid}," in l]
        for other in REGION_CODES:
            if other != code:
                for port in pg[other]:
                    assert not any(re.search(rf":{port}\s", l) for l in mine), (code, other, mine)


# --------------------------------------------------------------------------------------------
# promises 2 and 3: forwarded, the same answer everywhere


def _apis(fed, token="admin"):
    return {code: Api(g.channel(token=token)) for code, g in fed.gateways.items()}


def test_same_answers_through_every_gateway(session_federation, regions):
    apis = _apis(session_federation)
    cid = register(apis["us"], "eu")
    rid = f"r-{uid()}"
    put(apis["in"], cid, rid, payload=b"same everywhere", kind="note")
    seen = {}
    for code, api in apis.items():
        r = get(api, cid, rid)
        seen[code] = (r.payload, r.version, r.region, r.kind)
        e = rpc_error(get, api, cid, "no-such-record")
        seen[code + "-missing"] = (e.code(), e.details())
        e = rpc_error(get, api, f"nobody-{uid()}", rid)
        seen[code + "-unknown"] = (e.code(), e.details())
        e = rpc_error(get, api, cid, rid, purpose="model-training")
        seen[code + "-forbidden"] = (e.code(), e.details())
    assert seen["us"] == seen["eu"] == seen["in"] == (b"same everywhere", 1, "eu", "note")
    for kind in ("missing", "unknown", "forbidden"):
        assert seen[f"us-{kind}"] == seen[f"eu-{kind}"] == seen[f"in-{kind}"], kind
    assert seen["us-missing"][0] == grpc.StatusCode.NOT_FOUND
    assert seen["us-unknown"][0] == grpc.StatusCode.NOT_FOUND
    assert seen["us-forbidden"][0] == grpc.StatusCode.PERMISSION_DENIED
    # The admin principal runs in us: each read of eu's record left eu as eu->us, logged in eu
    # by eu's gateway with the same basis, whichever gateway the client called; the read
    # through the in gateway also passed through in, and says so (a transit eu->in).
    out = regions.psql(
        "eu",
        "SELECT from_region, to_region, basis_id, principal, method FROM domicile.ledger "
        f"WHERE customer_id = '{cid}' AND direction = 'read' AND outcome = 'allowed' ORDER BY at",
    )
    entries = sorted(tuple(l.split("|")) for l in out.splitlines())
    assert entries == [("eu", "in", "scc-2021-914-m2", "admin", "GetRecord")] + 3 * [
        ("eu", "us", "eu-us-dpf-2023-1795", "admin", "GetRecord")], entries


def test_records_of_a_region_are_stored_there_only(session_federation, regions):
    apis = _apis(session_federation)
    for home in REGION_CODES:
        cid = register(apis["in"], home)
        put(apis["eu"], cid, "r1", payload=b"x")
        for code in REGION_CODES:
            n = int(regions.psql(code, f"SELECT count(*) FROM domicile.records WHERE customer_id = '{cid}'"))
            assert n == (1 if code == home else 0), (home, code, n)


def test_principal_assertion_needs_a_gateway_certificate(gateway):
    """The public listener: metadata asserting a principal, from a client that is no gateway."""
    ch = gateway.channel(token="admin")
    api = Api(ch)
    e = rpc_error(api.get, records_pb2.GetRecordRequest(customer_id="x", record_id="y"),
                  metadata=[("x-domicile-principal-bin", b"\x0a\x05admin"), ("x-domicile-peer-region", "eu")],
                  timeout=10)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "only from a gateway of another region" in e.details()


def _peer_channel(regions, as_region, to_region, port):
    """A channel to a gateway's peer port with `as_region`'s gateway certificate."""
    gw = os.path.join(regions.state, "gw", as_region)
    with open(os.path.join(gw, "etc", "federation-ca.crt"), "rb") as f:
        ca = f.read()
    with open(os.path.join(gw, "etc", "peer.crt"), "rb") as f:
        crt = f.read()
    with open(os.path.join(gw, "secrets", "peer.key"), "rb") as f:
        key = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=crt)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.ssl_target_name_override", f"{to_region}.gateway.domicile")])


def test_peer_claiming_another_region_is_refused(regions, session_federation):
    from domicile.peer.v1 import peer_pb2

    eu_port = int(session_federation["eu"].peer_address.rsplit(":", 1)[1])
    ch = _peer_channel(regions, "us", "eu", eu_port)
    exec_ = ch.unary_unary("/domicile.peer.v1.PeerService/Exec",
                           request_serializer=peer_pb2.ExecRequest.SerializeToString,
                           response_deserializer=peer_pb2.ExecResponse.FromString)
    principal = peer_pb2.Principal(name="admin", region="us", roles=["admin"], tenants=["*"]).SerializeToString()
    req = peer_pb2.ExecRequest(statement="probe", method="")
    # A us gateway's certificate claiming to be in's gateway.
    e = rpc_error(exec_, req, metadata=[("x-domicile-principal-bin", principal), ("x-domicile-peer-region", "in")],
                  timeout=10)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert 'of region "us", not of the region it claims' in e.details()
    # Claiming its own region it may run an allow-listed statement...
    rep = exec_(req, metadata=[("x-domicile-principal-bin", principal), ("x-domicile-peer-region", "us")], timeout=10)
    assert len(rep.rows) == 1
    # ...but nothing that reads a payload or a key: those stay behind eu's own calls.
    bad = peer_pb2.ExecRequest(statement="get_record", method="/domicile.v1.RecordsService/GetRecord")
    e = rpc_error(exec_, bad, metadata=[("x-domicile-principal-bin", principal), ("x-domicile-peer-region", "us")],
                  timeout=10)
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is not open to other regions" in e.details()
    ch.close()


def test_peer_port_refuses_clients_without_a_gateway_certificate(session_federation):
    eu_port = int(session_federation["eu"].peer_address.rsplit(":", 1)[1])
    ch = grpc.insecure_channel(f"127.0.0.1:{eu_port}")
    from grpc.health.v1 import health_pb2

    check = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                           response_deserializer=health_pb2.HealthCheckResponse.FromString)
    e = rpc_error(check, health_pb2.HealthCheckRequest(), timeout=5)
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_region_whose_gateways_are_down_is_unavailable_others_serve(gateways):
    g = gateways.start(name="down")
    api = Api(g.channel())
    eu_cid = register(api, "eu")
    us_cid = register(api, "us")
    put(api, eu_cid, "r1", payload=b"eu")
    put(api, us_cid, "r1", payload=b"us")
    g.peers["eu"].stop()
    e = rpc_error(get, api, eu_cid, "r1")
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert 'region "eu"' in e.details()
    assert get(api, us_cid, "r1").payload == b"us"


def test_deadline_reaches_the_peer(gateways):
    """A forwarded call carries what is left of the deadline: a call with too little left for
    the margin never leaves, the answer names the region."""
    g = gateways.start(name="deadline", overrides={"peer_deadline_margin_ms": 5000})
    api = Api(g.channel())
    cid = register(api, "eu", timeout=30)
    e = rpc_error(get, api, cid, "r1", timeout=2)
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 'region "eu"' in e.details() or e.details() == "Deadline Exceeded"


# --------------------------------------------------------------------------------------------
# promise 5: wide-area calls per method


def _metrics_port(g):
    m = wait_until(lambda: re.search(r"serving /metrics on [0-9.]+:(\d+)", g.raw_log), lambda m: m, timeout=10)
    assert m, g.log
    return int(m.group(1))


def _peer_calls(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'domicile_peer_calls_total\{method="([^"]+)",call="([^"]+)",peer="([^"]+)"\} (\d+)', text):
        out[(m.group(1), m.group(2), m.group(3))] = int(m.group(4))
    return out


def _delta(before, after, method):
    return {k[1:]: v - before.get(k, 0) for k, v in after.items() if k[0].endswith(method) and v != before.get(k, 0)}


def test_wide_area_calls_per_method(gateways):
    g = gateways.start(name="rtt", overrides={"metrics_listen": "127.0.0.1:0"})
    port = _metrics_port(g)
    api = Api(g.channel())
    eu_api = Api(g.peers["eu"].channel())
    # Registered through eu's own gateway: the us gateway has never seen the customer.
    cid = register(eu_api, "eu")
    put(eu_api, cid, "seed", payload=b"s", subject="ann@example.com")

    def calls(fn, method):
        before = _peer_calls(port)
        fn()
        return _delta(before, _peer_calls(port), method)

    fwd = lambda m: (f"/domicile.v1.RecordsService/{m}", "eu")  # noqa: E731
    exec_ = "/domicile.peer.v1.PeerService/Exec"
    # An unknown customer: every other region asked at once (one round), then the call itself.
    assert calls(lambda: get(api, cid, "seed"), "/GetRecord") == {
        (exec_, "eu"): 1, (exec_, "in"): 1, fwd("GetRecord"): 1}
    # Known now: one call each, to the customer's region only.
    assert calls(lambda: get(api, cid, "seed"), "/GetRecord") == {fwd("GetRecord"): 1}
    assert calls(lambda: put(api, cid, "r2", payload=b"p"), "/PutRecord") == {fwd("PutRecord"): 1}
    assert calls(lambda: list(api.list(records_pb2.ListRecordsRequest(customer_id=cid), timeout=15)),
                 "/ListRecords") == {fwd("ListRecords"): 1}
    assert calls(lambda: api.delete(records_pb2.DeleteRecordRequest(customer_id=cid, record_id="r2",
                                                                    request_id=f"d-{uid()}"), timeout=15),
                 "/DeleteRecord") == {fwd("DeleteRecord"): 1}
    # Fan-outs: one call per peer region, all at once.
    sr = g.channel()
    locate = sr.unary_unary("/domicile.v1.SubjectRightsService/Locate",
                            request_serializer=subject_rights_pb2.LocateRequest.SerializeToString,
                            response_deserializer=subject_rights_pb2.LocateResponse.FromString)
    assert calls(lambda: locate(subject_rights_pb2.LocateRequest(subject="ann@example.com"), timeout=15),
                 "/Locate") == {(exec_, "eu"): 1, (exec_, "in"): 1}
    erase = sr.unary_unary("/domicile.v1.SubjectRightsService/Erase",
                           request_serializer=subject_rights_pb2.EraseRequest.SerializeToString,
                           response_deserializer=subject_rights_pb2.EraseResponse.FromString)
    assert calls(lambda: erase(subject_rights_pb2.EraseRequest(subject="ann@example.com", request_id=f"e-{uid()}",
                                                                 reason="test"), timeout=15),
                 "/Erase") == {(exec_, "eu"): 1, (exec_, "in"): 1}
    # The ledger of another region is verified by its own gateway: one call.
    assert calls(lambda: api.verify_ledger(transfers_pb2.VerifyLedgerRequest(region="eu"), timeout=30),
                 "/VerifyLedger") == {("/domicile.v1.TransfersService/VerifyLedger", "eu"): 1}


# --------------------------------------------------------------------------------------------
# promise 2: plaintext of R's data outside R only where the ledger says it went


def _entries(regions, region, cid):
    from test_ledger import customer_rows

    return [(r["direction"], r["outcome"], r["from_region"], r["to_region"], r["basis_id"], r["record_count"], r["request_id"])
            for r in customer_rows(regions, region, cid)]


def test_a_call_through_a_third_regions_gateway_logs_the_transit(session_federation, regions):
    """The us admin reads an eu record through the in gateway: the plaintext passes through
    in, so eu's gateway logs eu->us (to the principal) and eu->in (the transit), same request
    id, before the bytes leave. Through the us gateway only eu->us. An eu principal reading
    through the us gateway (no transfer to the principal) still leaves a transit eu->us. A
    write through a third region's gateway logs the principal's region -> in as well."""
    fed = session_federation
    admin = {code: Api(g.channel(token="admin")) for code, g in fed.gateways.items()}
    cid = register(admin["eu"], "eu")
    put(Api(fed["eu"].channel(token="service-eu")), cid, "r1", payload=b"twelve bytes")
    assert _entries(regions, "eu", cid) == []

    get(admin["in"], cid, "r1", request_id="via-in")
    got = sorted(_entries(regions, "eu", cid))
    assert got == [("read", "allowed", "eu", "in", "scc-2021-914-m2", 1, "via-in"),
                   ("read", "allowed", "eu", "us", "eu-us-dpf-2023-1795", 1, "via-in")], got

    get(admin["us"], cid, "r1", request_id="via-us")
    assert [e for e in _entries(regions, "eu", cid) if e[-1] == "via-us"] == [
        ("read", "allowed", "eu", "us", "eu-us-dpf-2023-1795", 1, "via-us")]

    get(Api(fed["us"].channel(token="service-eu")), cid, "r1", request_id="eu-via-us")
    assert [e for e in _entries(regions, "eu", cid) if e[-1] == "eu-via-us"] == [
        ("read", "allowed", "eu", "us", "eu-us-dpf-2023-1795", 1, "eu-via-us")]

    put(admin["in"], cid, "r2", payload=b"w", request_id="put-via-in")
    assert sorted(e for e in _entries(regions, "eu", cid) if e[-1] == "put-via-in") == [
        ("write", "allowed", "us", "eu", "us-no-restriction", 1, "put-via-in"),
        ("write", "allowed", "us", "in", "us-no-restriction", 1, "put-via-in")]


def test_a_transit_without_a_basis_is_refused_and_logged(regions, gateways):
    """No eu->in route: the us admin's read of an eu record through the in gateway is refused
    (the transfer to the principal, eu->us, would be allowed) with a message naming the
    transit; the refusal is in eu's ledger and no payload left eu. Through the us gateway
    the same read is served."""
    from test_ledger import write_policy

    policy = write_policy(regions, gateways.workdir, "no-eu-in-transit", drop_routes=[("eu", "in")])
    g = gateways.start(name="transit", overrides=policy)
    cid = register(Api(g.channel()), "eu")
    put(Api(g.peers["eu"].channel(token="service-eu")), cid, "r1", payload=b"secret")

    e = rpc_error(get, Api(g.peers["in"].channel(token="admin")), cid, "r1", request_id="refused-transit")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e.details()
    assert "eu -> in" in e.details() and 'gateway in in' in e.details(), e.details()
    assert _entries(regions, "eu", cid) == [("read", "refused", "eu", "in", "", 1, "refused-transit")]

    assert get(Api(g.channel(token="admin")), cid, "r1").payload == b"secret"


def test_the_own_regions_leg_runs_without_waiting_for_far_regions(regions, gateways):
    """An Erase at the us gateway while in is 5 s of round trip away (emulated): the us leg
    runs as soon as us has stored the request, as the peers run theirs on receipt; it is done
    in us's database while the call still waits for in's answer. Before, the own leg started
    only after the slowest region had stored the request: one more wide-area round trip
    before a fan-out's local part could finish (R8)."""
    far = 5000
    rtt = {("us", "eu"): 100, ("eu", "us"): 100, ("eu", "in"): 100, ("in", "eu"): 100,
           ("us", "in"): far, ("in", "us"): far}
    # health checks get a deadline of their interval: longer than the far round trip
    g = gateways.start(name="own-leg", wan=True, rtt_ms=rtt, overrides={"peer_health_interval_ms": 2 * far})
    admin = Api(g.channel())
    cid = register(admin, "us", timeout=4 * far / 1000)
    s = f"own-leg-{uid()}@example.org"
    put(admin, cid, "r1", payload=b"x", subject=s)
    erase = unary_stub(g.channel(token="privacy-officer"), "SubjectRightsService", "Erase",
                       subject_rights_pb2.EraseRequest, subject_rights_pb2.EraseResponse)
    rid = f"own-leg-{uid()}"
    fut = erase.future(subject_rights_pb2.EraseRequest(request_id=rid, subject=s, reason="R8"), timeout=4 * far / 1000)

    def leg():
        return regions.psql("us", f"SELECT state FROM domicile.dsr_legs WHERE request_id = '{rid}'")

    wait_until(lambda: (leg(), fut.done()), lambda r: r[0] == "done" or r[1], timeout=3 * far / 1000)
    assert leg() == "done" and not fut.done(), (leg(), fut.done())
    assert fut.result().request.request_id == rid
    assert regions.psql("us", f"SELECT count(*) FROM domicile.records WHERE customer_id = '{cid}'") == "0"
