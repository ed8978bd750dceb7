"""
deploy/local's federation (issue 15): one gateway per region, each in its own directory with
only its own region's secrets, a federation CA and one certificate per gateway, and the WAN
proxy on every gateway-to-gateway path. These tests check what deploy/local writes and what
the harness starts from it (conftest.Federation); the promises the gateways keep with it are
tested where each promise is.
"""

import os
import re
import stat
import subprocess
import time

from conftest import REGION_CODES, SERVING, health_check, wait_health
from helpers import Api, register

PUBLIC_REGION_KEYS = {"code", "name", "jurisdiction", "gateways", "gateway_identity"}
SECRET_KEYS = ("password_file", "pkcs11_pin_file", "ledger_key_file")


def settings(path):
    """{key: raw value text} of the top-level `key = value;` lines of a libconfig file."""
    out = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?);\s*(#.*)?$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def string(v):
    m = re.fullmatch(r'"([^"]*)"', v.strip())
    assert m, f"not a string: {v!r}"
    return m.group(1)


def strings(v):
    return re.findall(r'"([^"]*)"', v)


def test_every_gateway_serves_every_region(session_federation):
    """Health of each gateway itself, and of every region as that gateway sees it (its own
    through its database, the others through their gateways), reaches SERVING."""
    assert set(session_federation.gateways) == set(REGION_CODES)
    for code, g in session_federation.gateways.items():
        ch = g.channel(token=None)
        assert health_check(ch) == SERVING, f"{code} gateway"
        for r in REGION_CODES:
            wait_health(ch, f"domicile.region.{r}", SERVING, timeout=30)
        assert g.peers is session_federation.gateways and g.federation is session_federation


def test_each_gateway_directory_holds_only_its_own_region(regions):
    state = regions.state
    for code in REGION_CODES:
        gw = os.path.join(state, "gw", code)
        conf = settings(regions.gateway_conf(code))
        assert string(conf["gateway_region"]) == code
        assert string(conf["regions_dir"]) == regions.gateway_regions_dir(code)
        assert string(conf["peer_listen"]) == f"127.0.0.1:{regions.peer_port(code)}"
        for key in ("peer_key_file", "subject_pepper_file"):
            assert string(conf[key]).startswith(os.path.join(gw, "secrets") + "/"), (code, key, conf[key])
        for key in ("peer_cert_file", "peer_ca_file"):
            assert string(conf[key]).startswith(os.path.join(gw, "etc") + "/"), (code, key, conf[key])
        for r in REGION_CODES:
            rconf = settings(os.path.join(regions.gateway_regions_dir(code), f"{r}.conf"))
            if r == code:
                for key in SECRET_KEYS:
                    assert string(rconf[key]).startswith(os.path.join(gw, "secrets") + "/"), (code, key)
                assert "gateways" not in rconf
            else:
                assert set(rconf) <= PUBLIC_REGION_KEYS, (
                    f"{code} gateway's view of {r} carries {sorted(set(rconf) - PUBLIC_REGION_KEYS)}"
                )
                assert string(rconf["gateway_identity"]) == f"{r}.gateway.domicile"
                # The session's state is written with --wan off: the peer port itself.
                assert strings(rconf["gateways"]) == [f"127.0.0.1:{regions.peer_port(r)}"]
        # Secrets: root-only, and nothing in this gateway's files points into another's.
        sec = os.path.join(gw, "secrets")
        assert stat.S_IMODE(os.stat(sec).st_mode) == 0o700
        names = sorted(os.listdir(sec))
        assert names == ["db.password", "ledger.key", "peer.key", "subject_pepper", "token.pin", "token.so-pin"], names
        # The region's token: a directory of its own, root only, named by this gateway alone.
        tok = os.path.join(gw, "token")
        assert stat.S_IMODE(os.stat(tok).st_mode) == 0o700
        assert strings(settings(os.path.join(regions.gateway_regions_dir(code), f"{code}.conf"))["pkcs11_env"]) == [
            f"SOFTHSM2_CONF={tok}/softhsm2.conf"
        ]
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(sec, n)).st_mode) == 0o600, n
        text = open(regions.gateway_conf(code)).read() + "".join(
            open(os.path.join(regions.gateway_regions_dir(code), f)).read() for f in os.listdir(regions.gateway_regions_dir(code))
        )
        for other in REGION_CODES:
            if other != code:
                assert os.path.join(state, "gw", other) not in text, f"{code} gateway's files name {other}'s directory"
        assert os.path.join(state, "secrets") + "/" not in text.replace(os.path.join(state, "secrets", "tokens"), "")
    # The old single-gateway layout is gone; $STATE/etc/domiciled.conf is the us gateway's.
    assert not os.path.exists(os.path.join(state, "keys"))
    assert not os.path.exists(os.path.join(state, "etc", "regions"))
    assert os.path.realpath(os.path.join(state, "etc", "domiciled.conf")) == regions.gateway_conf("us")
    leftovers = [n for n in os.listdir(os.path.join(state, "secrets")) if re.search(r"(us|eu|in)\.password|ledger_|kek", n)]
    assert not leftovers, f"region secrets left in $STATE/secrets: {leftovers}"
    peppers = {open(os.path.join(state, "gw", c, "secrets", "subject_pepper"), "rb").read() for c in REGION_CODES}
    assert len(peppers) == 1, "the gateways' subject peppers differ: subject keys would not agree"


def openssl(*args):
    p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


def test_gateway_certificates_name_their_region(regions):
    fca = os.path.join(regions.state, "ca", "federation", "ca.crt")
    pg_ca = os.path.join(regions.state, "ca", "ca.crt")
    for code in REGION_CODES:
        crt = os.path.join(regions.state, "gw", code, "etc", "peer.crt")
        rc, out = openssl("verify", "-CAfile", fca, "-purpose", "sslserver", crt)
        assert rc == 0, out
        rc, out = openssl("verify", "-CAfile", fca, "-purpose", "sslclient", crt)
        assert rc == 0, out
        # The PostgreSQL servers' CA is another CA: a database certificate never passes as a
        # gateway's, nor a gateway's as a database's.
        rc, out = openssl("verify", "-CAfile", pg_ca, crt)
        assert rc != 0, f"{code}: the gateway certificate verifies against the PostgreSQL CA"
        rc, text = openssl("x509", "-in", crt, "-noout", "-text")
        assert rc == 0, text
        san = re.search(r"Subject Alternative Name:.*?\n\s*(.*)\n", text).group(1)
        assert {s.strip() for s in san.split(",")} == {
            f"DNS:{code}.gateway.domicile", "DNS:localhost", "IP Address:127.0.0.1"}, san
        eku = re.search(r"Extended Key Usage:.*?\n\s*(.*)\n", text).group(1)
        assert "TLS Web Server Authentication" in eku and "TLS Web Client Authentication" in eku, eku
        assert filecmp_equal(fca, os.path.join(regions.state, "gw", code, "etc", "federation-ca.crt"))


def filecmp_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def test_domicile_local_lists_the_gateways(regions):
    out = regions.run("gateways", "status").stdout
    for code in REGION_CODES:
        line = next(l for l in out.splitlines() if l.startswith(code + " "))
        assert f"127.0.0.1:{regions.peer_port(code)}" in line, line
    assert "WAN emulation off" in out, out


def test_wan_federation_routes_every_pair_through_the_proxy(wan_federation, regions):
    """Each gateway's view of another region lists its own proxy port for that pair; each
    route targets the other region's peer port with half the pair's round trip."""
    fed = wan_federation
    rtt = regions.rtt_ms()
    # The defaults of deploy/local (README "WAN emulation": Azure's published round trips).
    assert rtt[("us", "eu")] == 97 and rtt[("eu", "in")] == 150 and rtt[("us", "in")] == 216, rtt
    routes = {f"127.0.0.1:{port}": (target, delay) for port, (_, target, delay) in zip(fed.proxy.ports, fed.proxy.routes)}
    assert len(routes) == 6
    for code, g in fed.gateways.items():
        rdir = string(settings(g.config)["regions_dir"])
        for r in REGION_CODES:
            if r == code:
                continue
            (addr,) = strings(settings(os.path.join(rdir, f"{r}.conf"))["gateways"])
            target, delay = routes[addr]
            assert target == fed.gateways[r].peer_address and delay == rtt[(code, r)] / 2, (code, r, addr)


def test_a_cross_border_call_pays_the_emulated_round_trip(wan_federation):
    """Registering an eu customer at the us gateway is decided in eu: at least one us-eu round
    trip (97 ms by default) through the proxy. A lower bound only — how much more is the benchmark's
    business."""
    fed = wan_federation
    fed.check_alive()
    api = Api(fed.entry.channel())
    ch = fed.entry.channel(token=None)
    wait_health(ch, "domicile.region.eu", SERVING, timeout=30)
    t0 = time.monotonic()
    register(api, "eu", prefix="wan")
    took = (time.monotonic() - t0) * 1000
    assert took >= fed.rtt_ms[("us", "eu")] - 1, f"RegisterCustomer in eu through the us gateway took {took:.1f} ms"


def test_a_region_with_two_gateways(gateways):
    """Federation(replicas={"eu": 2}): two eu gateways on peer ports of their own, both listed
    in the other regions' eu files; with one of them killed, calls on eu data through the us
    gateway still succeed (the other is tried)."""
    g = gateways.start(name="replicas", replicas={"eu": 2})
    fed = g.federation
    eu1, eu2 = fed.replicas["eu"]
    assert g.peers["eu"] is eu1 and eu1.peer_address != eu2.peer_address
    for code in ("us", "in"):
        rdir = string(settings(fed.gateways[code].config)["regions_dir"])
        listed = strings(settings(os.path.join(rdir, "eu.conf"))["gateways"])
        assert listed == [eu1.peer_address, eu2.peer_address], (code, listed)
    api = Api(g.channel())
    register(api, "eu", prefix="replica")
    eu1.kill()
    wait_health(g.channel(token=None), "domicile.region.eu", SERVING, timeout=30)
    register(api, "eu", prefix="replica")


def test_region_files_reach_the_file_a_gateway_reads(gateways, regions):
    """region_files={gateway: {region: {key: value}}} edits the region file that gateway
    reads, and only that one."""
    g = gateways.start(name="region-files", only=("us", "eu"), converge=False,
                       region_files={"eu": {"eu": {"connect_timeout_ms": 1500}, "us": {"gateway_identity": None}}})
    eu = g.peers["eu"]
    rdir = string(settings(eu.config)["regions_dir"])
    assert settings(os.path.join(rdir, "eu.conf"))["connect_timeout_ms"] == "1500"
    assert "gateway_identity" not in settings(os.path.join(rdir, "us.conf"))
    us_rdir = string(settings(g.config)["regions_dir"])
    assert settings(os.path.join(us_rdir, "eu.conf"))["gateway_identity"] == '"eu.gateway.domicile"'
    assert eu.alive() and g.alive()
