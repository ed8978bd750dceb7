"""
Issue 14, item 5: a malformed transfer-policy file killed the gateway, at start and on SIGHUP,
and `--check-config` did not read the policy at all.

The input fuzz_policy found, `bases = ( ( { revoked = ""; } ) );` (a list where a basis group
belongs), must be refused with file:line and key: by a running gateway on SIGHUP (which keeps
serving under its old policy and says why), by a gateway starting with it (non-zero exit,
nothing served), and by `--check-config`, which must read everything the gateway will load.
"""

import os
import re
import shutil
import signal
import subprocess

import grpc
import pytest

from conftest import DOMICILED, SERVING, health_check, wait_until, write_config_copy
from helpers import get, put, register
from test_ledger import DPF, SCC2, Principals, customer_rows, start, utc_day, write_policy

CRASHING_BASES = 'bases = ( ( { revoked = ""; } ) );\n'
# the key the error must name, at line 1 of that file
CRASHING_SAYS = ':1: key "bases": entry 1 must be a group'


def check_config(path):
    return subprocess.run([DOMICILED, "--config", path, "--check-config"], capture_output=True, text=True, timeout=60)


def reloads(gw):
    return gw.log.count("reload failed") + gw.log.count("reloaded ")


def sighup(gw):
    """SIGHUP, then wait for the gateway's verdict (a reload or a refusal in the log), or its
    death (the bug: it segfaulted)."""
    before = reloads(gw)
    gw.send_signal(signal.SIGHUP)
    n, alive = wait_until(lambda: (reloads(gw), gw.alive()), lambda r: r[0] > before or not r[1], timeout=30)
    assert alive, f"the gateway died on SIGHUP (exit {gw.proc.returncode}):\n{gw.log}"
    assert n > before, gw.log


def test_sighup_with_a_crashing_bases_file_keeps_the_old_policy(regions, gateways):
    """Serving gateways, bases file replaced by the fuzzer's input, SIGHUP to the gateway of
    the data's region (it decides the transfer): it refuses
    the reload naming file:line and key, keeps serving, and a cross-border read still gets the
    basis of the old policy. Then a good edit (the DPF revoked) is applied by the next SIGHUP:
    the refusal did not leave the policy stuck."""
    policy = write_policy(regions, gateways.workdir, "reload")
    bases = policy["bases_file"]
    gw = start(gateways, name="policy-reload", overrides=policy)
    p = Principals(gw)
    # EU -> US is decided by the eu gateway (the data's region): that is the one reloaded.
    eu = gw.peers["eu"]
    cid = register(p["admin"], "eu", prefix="pol")
    put(p["service-eu"], cid, "rec-1", b"payload-policy-reload")
    assert get(p["service-us"], cid, "rec-1").payload == b"payload-policy-reload"
    assert customer_rows(regions, "eu", cid)[-1]["basis_id"] == DPF

    good = open(bases).read()
    with open(bases, "w") as f:
        f.write(CRASHING_BASES)
    sighup(eu)
    assert "reload failed, keeping the running configuration" in eu.log, eu.log
    assert bases + CRASHING_SAYS in eu.log, eu.log
    assert health_check(eu.channel(token=None)) == SERVING
    # the old policy still decides: EU -> US under the DPF, logged before the data leaves
    n = len(customer_rows(regions, "eu", cid))
    assert get(p["service-us"], cid, "rec-1").payload == b"payload-policy-reload"
    rows = customer_rows(regions, "eu", cid)
    assert len(rows) == n + 1 and (rows[-1]["outcome"], rows[-1]["basis_id"]) == ("allowed", DPF), rows[-1]

    # a valid edit is taken by the next SIGHUP: the DPF revoked yesterday, EU -> US falls back to SCCs
    revoked = re.sub(r'(id = "' + re.escape(DPF) + r'";.*?revoked = )""', lambda m: m.group(1) + f'"{utc_day(-1)}"',
                     good, count=1, flags=re.S)
    assert revoked != good
    with open(bases, "w") as f:
        f.write(revoked)
    sighup(eu)
    assert "reloaded " in eu.log, eu.log
    assert get(p["service-us"], cid, "rec-1").payload == b"payload-policy-reload"
    assert customer_rows(regions, "eu", cid)[-1]["basis_id"] == SCC2
    assert eu.stop() == 0, eu.log


def test_gateway_refuses_to_start_with_a_crashing_bases_file(regions, gateways):
    """The same file at start: exit code non-zero, before anything is served, with file:line
    and key on stderr (not a segfault)."""
    policy = write_policy(regions, gateways.workdir, "start")
    with open(policy["bases_file"], "w") as f:
        f.write(CRASHING_BASES)
    conf = gateways.config(policy, name="bad-bases")
    p = subprocess.run([DOMICILED, "--config", conf, "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode > 0, (p.returncode, p.stderr)  # an exit, not a signal (negative)
    assert policy["bases_file"] + CRASHING_SAYS in p.stderr, p.stderr
    assert "serving" not in p.stderr, p.stderr


BAD_ROUTES = [
    # a group where the list of bases belongs, at line 3
    ('routes = (\n  { from = "eu"; to = "us"; purpose = "*";\n    bases = { first = "scc-2021-914-m2"; }; }\n);\n',
     ':3: key "bases": must be a list of strings'),
    # the crashing shape in the routes file
    ('forbidden_purposes = [ "sale" ];\nroutes = ( ( { from = "eu"; } ) );\n', ':2: key "routes": entry 1 must be a group'),
    # an unknown region
    ('routes = (\n  { from = "eu"; to = "mars"; purpose = "*"; bases = [ "scc-2021-914-m2" ]; }\n);\n',
     ':2: key "to": "mars" is not a configured region'),
]


@pytest.mark.parametrize("which", ["bases", "routes"] + [f"routes-{i}" for i in range(1, len(BAD_ROUTES))])
def test_check_config_reads_the_policy(regions, tmp_path, which):
    """--check-config loads bases and routes as the gateway will: a file the gateway cannot
    load fails the check, non-zero, with file:line and key."""
    policy = write_policy(regions, str(tmp_path), "check")
    if which == "bases":
        path, text, says = policy["bases_file"], CRASHING_BASES, CRASHING_SAYS
    else:
        i = int(which.split("-")[1]) if "-" in which else 0
        path, (text, says) = policy["routes_file"], BAD_ROUTES[i]
    with open(path, "w") as f:
        f.write(text)
    conf = write_config_copy(regions.conf, str(tmp_path / "check.conf"), policy)
    p = check_config(conf)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert path + says in p.stderr, p.stderr
    assert p.stdout == "", p.stdout  # nothing printed as if it were valid


def test_check_config_passes_the_deploy_config_and_checks_every_file(regions, tmp_path):
    """The deploy config passes, naming each file it read; then each file the gateway loads
    (principals, customer webhooks and their secret's mode, the pepper's size, a region file)
    broken in turn fails the check with that file or key named. No secret is printed."""
    p = check_config(regions.conf)
    assert p.returncode == 0, p.stderr
    etc = os.path.join(regions.state, "etc")
    for name, what in (("principals.conf", "principals"), ("bases.conf", "bases"), ("routes.conf", "routes")):
        assert re.search(rf"^# \d+ {what}.* from .*{name}$", p.stdout, re.M), p.stdout
    for r in ("us", "eu", "in"):  # each gateway's own; the passwords are hex text: they would show if printed
        pr = check_config(regions.gateway_conf(r))
        assert pr.returncode == 0, pr.stderr
        with open(regions.secret_path(r, "db.password")) as f:
            assert f.read().strip() not in pr.stdout

    def copy_etc(name):
        d = tmp_path / name
        shutil.copytree(etc, d)
        return d

    # a principals file with roles as a group
    d = copy_etc("principals")
    (d / "principals.conf").write_text(
        'principals = (\n  { name = "x"; roles = { r = "admin"; }; tenants = [ "*" ]; region = "us";\n'
        '    default_purpose = "support"; token_sha256 = "' + "0" * 64 + '"; }\n);\n')
    conf = write_config_copy(regions.conf, str(d / "domiciled.conf"), {"principals_file": str(d / "principals.conf")})
    p = check_config(conf)
    assert p.returncode == 2 and f'{d}/principals.conf:2: key "roles"' in p.stderr, p.stderr

    # customer webhooks: a bad entry, then a good file whose secret is readable by others
    hooks = tmp_path / "hooks.conf"
    hooks.write_text('webhooks = (\n  { customer = "acme"; url = 5; secret_file = "hook.secret"; }\n);\n')
    (tmp_path / "hook.secret").write_bytes(b"0123456789abcdef")
    os.chmod(tmp_path / "hook.secret", 0o644)
    conf = write_config_copy(regions.conf, str(tmp_path / "hooks-gw.conf"), {"customer_webhooks_file": str(hooks)})
    p = check_config(conf)
    assert p.returncode == 2 and f'{hooks}:2: key "url": must be a string' in p.stderr, p.stderr
    hooks.write_text('webhooks = (\n  { customer = "acme"; url = "https://h.example/dsr"; secret_file = "hook.secret"; }\n);\n')
    p = check_config(conf)
    assert p.returncode == 2 and f'{hooks}:2: key "secret_file"' in p.stderr and "mode 644" in p.stderr, p.stderr
    os.chmod(tmp_path / "hook.secret", 0o600)
    p = check_config(conf)
    assert p.returncode == 0 and f"# 1 customer webhooks from {hooks}" in p.stdout, p.stderr
    assert "0123456789abcdef" not in p.stdout

    # a pepper the gateway would refuse at start (too short to key an HMAC)
    short = tmp_path / "short.pepper"
    short.write_bytes(b"0123456789")
    os.chmod(short, 0o600)
    conf = write_config_copy(regions.conf, str(tmp_path / "pepper-gw.conf"), {"subject_pepper_file": str(short)})
    p = check_config(conf)
    assert p.returncode == 2 and 'key "subject_pepper_file"' in p.stderr and "16 to 1024 bytes" in p.stderr, p.stderr

    # the eu gateway's own region file with a nested list of hosts
    d = tmp_path / "regions-eu"
    shutil.copytree(regions.gateway_regions_dir("eu"), d / "regions")
    eu = d / "regions" / "eu.conf"
    text, n = re.subn(r"^hosts = (\[.*\]);$", r"hosts = ( \1 );", eu.read_text(), count=1, flags=re.M)
    assert n == 1
    eu.write_text(text)
    conf = write_config_copy(regions.gateway_conf("eu"), str(d / "domiciled.conf"), {"regions_dir": str(d / "regions")})
    p = check_config(conf)
    assert p.returncode == 2 and f"{d}/regions/eu.conf:" in p.stderr and 'key "hosts"' in p.stderr, p.stderr
