"""
Issue 18, part 2: domicilectl for scripts and people (docs/cli.md), run as a script would run
it against the session's gateways and regions.

- `--output table|wide|tsv|json|jsonl` on every command that prints records, before or after the
  command: `json` a list as {"items": [...]} or one record as the object, with the documented
  keys (proto field names, times RFC 3339 UTC with milliseconds, int64 as numbers, bytes as
  base64); `jsonl` one object per line; `table` one upper-case header line, aligned columns;
  `tsv` the table's cells.
- exit statuses listed in --help: usage 2, gRPC status N as 10 + N (NOT_FOUND 15,
  PERMISSION_DENIED 17, UNAUTHENTICATED 26, UNAVAILABLE 24), partial 3.
- `domicilectl completion bash`, sourced into bash and asked through COMP_WORDS.
- a progress line on a terminal (export, report), nothing when stderr is a pipe.
"""

import base64
import json
import os
import re
import subprocess

import pytest

from conftest import BUILD_DIR, demo_token
from helpers import run_on_pty, uid

DOMICILECTL = os.path.join(BUILD_DIR, "domicilectl")
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PAYLOAD = b"\x00cli output \xff\n payload"

# The keys docs/cli.md promises, per record (every field of the proto message, times without
# their _unix_ms suffix).
CUSTOMER_KEYS = {"customer_id", "residency", "state", "created_at", "closed_at", "purge_after",
                 "display_name", "labels", "close_reason", "purged_at"}
RECORD_KEYS = {"customer_id", "record_id", "kind", "has_subject", "subject_key_hex", "content_type",
               "labels", "version", "created_at", "updated_at", "region", "restricted", "payload_size",
               "purpose_objected"}
REGION_KEYS = {"code", "name", "jurisdiction", "reachable", "primary_host", "replication_state",
               "replication_lag_bytes", "pool_size", "pool_in_use", "breaker", "fenced", "fence_reason",
               "fenced_at", "last_error", "fenced_by", "last_error_at", "queued_statements",
               "breaker_changed_at"}
TRANSFER_KEYS = {"region", "seq", "at", "request_id", "principal", "customer_id", "subject_key_hex",
                 "record_count", "bytes", "from_region", "to_region", "direction", "purpose", "basis_id",
                 "outcome", "refusal_reason", "entry_hash_hex", "entry_id", "method", "record_ids"}
VERIFY_KEYS = {"region", "ok", "entries_checked", "sealed_up_to_seq", "first_bad_seq", "damage", "detail",
               "checkpoint", "unsealed_entries", "verified_at", "restore_cuts"}
DSR_KEYS = {"request_id", "kind", "state", "subject_key_hex", "customer_id", "purpose", "reason",
            "received_at", "due_at", "gdpr_due_at", "extended", "extension_reason", "extended_due_at",
            "completed_at", "legs", "overdue", "principal", "extended_at", "webhook", "effective_due_at"}
LEG_KEYS = {"region", "state", "attempts", "last_error", "next_attempt_at", "started_at", "finished_at",
            "receipt", "claimed_by", "lease_expires_at"}
LOCATE_KEYS = {"region", "records", "bytes", "reachable"}
REPORT_ROW_KEYS = {"month", "from_region", "to_region", "basis_id", "purpose", "transfers", "records",
                   "bytes", "refusals"}
EXPORT_KEYS = {"request_id", "regions", "total_records", "total_bytes", "sha256_hex", "generated_at",
               "unreachable_regions", "complete", "output_file"}


@pytest.fixture(scope="module")
def cli(session_gateway, tmp_path_factory):
    """Token files of the demo principals, and an EU customer with one record that a US
    principal read across the border under this module's own purpose."""
    gw = session_gateway
    d = tmp_path_factory.mktemp("cli-output")
    tokens = {}
    for name in ("admin", "operator", "auditor", "privacy-officer", "service-us"):
        path = d / f"{name}.token"
        path.write_text(demo_token(gw.config, name) + "\n")
        os.chmod(path, 0o600)
        tokens[name] = str(path)
    c = {"addr": gw.address, "tokens": tokens, "dir": d, "purpose": f"cli-{uid()[:12]}",
         "customer": f"cust-cli-{uid()}"}
    ctl(c, "customer", "register", c["customer"], "eu", "CLI output test")
    ctl(c, "record", "put", c["customer"], "r1", "note", stdin=PAYLOAD)
    ctl(c, "--purpose", c["purpose"], "record", "get", c["customer"], "r1", token="service-us")
    return c


def ctl(c, *args, token="admin", check=True, stdin=None, addr=None):
    """build/domicilectl as `token`'s principal; returns the CompletedProcess (bytes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOMICILE_TOKEN", "DOMICILE_ADDR")}
    cmd = [DOMICILECTL, "--addr", addr or c["addr"], "--token-file", c["tokens"][token], *args]
    io = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    p = subprocess.run(cmd, capture_output=True, timeout=120, env=env, **io)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout!r}\n--- stderr\n{p.stderr!r}")
    return p


def as_json(p):
    return json.loads(p.stdout)


def as_jsonl(p):
    lines = p.stdout.decode().splitlines()
    assert all(line.startswith("{") and line.endswith("}") for line in lines), p.stdout
    return [json.loads(line) for line in lines]


def table(p):
    """(header cells, rows of cells) of an aligned table: columns are 3+ blanks apart."""
    lines = p.stdout.decode().splitlines()
    assert lines, p.stdout
    split = [re.split(r" {3,}", line) for line in lines]
    return split[0], split[1:]


def is_time(v):
    return isinstance(v, str) and RFC3339_MS.fullmatch(v) is not None


# --------------------------------------------------------------------------------------------


def test_regions_in_every_format(cli):
    c = cli
    items = as_json(ctl(c, "regions", "list", "-o", "json", token="operator"))
    assert set(items) == {"items"}, items
    regions = items["items"]
    assert sorted(r["code"] for r in regions) == ["eu", "in", "us"]
    for r in regions:
        assert set(r) == REGION_KEYS, set(r) ^ REGION_KEYS
        assert r["reachable"] is True and r["breaker"] == "closed" and r["fenced"] is False
        assert isinstance(r["replication_lag_bytes"], int) and isinstance(r["pool_size"], int)
        assert r["fenced_at"] is None  # not set: null, not 1970
        assert r["breaker_changed_at"] is None or is_time(r["breaker_changed_at"])
    # The option anywhere, as kubectl takes it; -ojson and --output=json too.
    for args in (["-o", "json", "regions", "list"], ["--output=json", "regions", "list"],
                 ["regions", "-ojson", "list"], ["regions", "list", "--output", "json"]):
        assert sorted(r["code"] for r in as_json(ctl(c, *args, token="operator"))["items"]) == ["eu", "in", "us"], args

    lines = as_jsonl(ctl(c, "regions", "list", "-o", "jsonl", token="operator"))
    assert len(lines) == 3 and all(set(r) == REGION_KEYS for r in lines)

    head, rows = table(ctl(c, "regions", "list", token="operator"))
    assert head == ["REGION", "STATUS", "PRIMARY", "REPLICATION", "LAG_BYTES", "BREAKER", "POOL", "QUEUED", "FENCE"]
    assert sorted(r[0] for r in rows) == ["eu", "in", "us"] and all(r[1] == "reachable" for r in rows)
    assert all(re.fullmatch(r"\d+/\d+", r[6]) and r[8] == "-" for r in rows), rows
    text = ctl(c, "regions", "list", token="operator").stdout.decode()
    starts = [m.start() for m in re.finditer(r"\S+", text.splitlines()[0])]
    for line in text.splitlines()[1:]:  # aligned: each cell starts under its header
        assert [line[i - 1] if i else " " for i in starts] == [" "] * len(starts), text

    head, _ = table(ctl(c, "regions", "list", "-o", "wide", token="operator"))
    assert head[-4:] == ["NAME", "JURISDICTION", "LAST_ERROR", "LAST_ERROR_AT"]
    rows = ctl(c, "regions", "list", "--no-headers", token="operator").stdout.decode().splitlines()
    assert len(rows) == 3 and not rows[0].startswith("REGION")
    tsv = [line.split("\t") for line in ctl(c, "regions", "list", "-o", "tsv", token="operator").stdout.decode().splitlines()]
    assert len(tsv) == 3 and all(len(f) == 9 and f[1] == "reachable" for f in tsv), tsv


def test_customers_and_records(cli):
    c = cli
    cust = as_json(ctl(c, "customer", "get", c["customer"], "-o", "json"))
    assert set(cust) == CUSTOMER_KEYS, set(cust) ^ CUSTOMER_KEYS
    assert cust["customer_id"] == c["customer"] and cust["residency"] == "eu" and cust["state"] == "active"
    assert is_time(cust["created_at"]) and cust["closed_at"] is None and cust["display_name"] == "CLI output test"
    head, rows = table(ctl(c, "customer", "get", c["customer"]))
    assert head == ["CUSTOMER_ID", "RESIDENCY", "STATE", "CREATED_AT"] and rows == [[c["customer"], "eu", "active", cust["created_at"]]]

    put = as_json(ctl(c, "record", "put", c["customer"], "r2", "note", "-o", "json", stdin=b"two"))
    assert set(put) == {"record", "created", "replayed"} and put["created"] is True
    assert set(put["record"]) == RECORD_KEYS and put["record"]["version"] == 1 and put["record"]["payload_size"] == 3

    # get: the payload itself by default; with -o json the record, payload in base64
    assert ctl(c, "record", "get", c["customer"], "r1").stdout == PAYLOAD
    rec = as_json(ctl(c, "record", "get", c["customer"], "r1", "-o", "json"))
    assert set(rec) == RECORD_KEYS | {"payload"} and base64.b64decode(rec["payload"]) == PAYLOAD
    assert rec["region"] == "eu" and is_time(rec["updated_at"]) and rec["payload_size"] == len(PAYLOAD)

    listed = as_jsonl(ctl(c, "record", "list", c["customer"], "-o", "jsonl"))
    assert [r["record_id"] for r in listed] == ["r1", "r2"] and all(set(r) == RECORD_KEYS for r in listed)
    assert as_json(ctl(c, "record", "list", c["customer"], "--limit", "1", "-o", "json"))["items"][0]["record_id"] == "r1"
    head, rows = table(ctl(c, "record", "list", c["customer"]))
    assert head == ["RECORD_ID", "KIND", "VERSION", "SIZE", "RESTRICTED", "UPDATED_AT"]
    assert [r[:5] for r in rows] == [["r1", "note", "1", str(len(PAYLOAD)), "no"], ["r2", "note", "1", "3", "no"]]

    deleted = as_json(ctl(c, "record", "delete", c["customer"], "r2", "-o", "json"))
    assert deleted == {"customer_id": c["customer"], "record_id": "r2", "deleted": True, "version": 1, "replayed": False}
    assert table(ctl(c, "record", "delete", c["customer"], "r2"))[1] == [[c["customer"], "r2", "no", "0"]]


def test_transfers_list_verify_and_report(cli):
    c = cli
    items = as_json(ctl(c, "transfers", "list", "--customer", c["customer"], "--purpose", c["purpose"], "-o", "json", token="auditor"))["items"]
    assert len(items) == 1, items
    e = items[0]
    assert set(e) == TRANSFER_KEYS, set(e) ^ TRANSFER_KEYS
    assert (e["region"], e["from_region"], e["to_region"], e["outcome"], e["direction"]) == ("eu", "eu", "us", "allowed", "read")
    assert e["record_count"] == 1 and e["bytes"] == len(PAYLOAD) and e["principal"] == "service-us"
    assert is_time(e["at"]) and isinstance(e["seq"], int) and e["record_ids"] == ["r1"]
    lines = as_jsonl(ctl(c, "transfers", "list", "--customer", c["customer"], "-o", "jsonl", token="auditor"))
    assert [x["entry_id"] for x in lines if x["purpose"] == c["purpose"]] == [e["entry_id"]]
    head, rows = table(ctl(c, "transfers", "list", "--customer", c["customer"], "--purpose", c["purpose"], token="auditor"))
    assert head == ["REGION", "SEQ", "TIME", "ROUTE", "BASIS", "PURPOSE", "OUTCOME", "RECORDS", "BYTES", "METHOD", "PRINCIPAL"]
    assert rows[0][2] == e["at"] and rows[0][3] == "eu\u2192us" and rows[0][6] == "allowed"
    # No match: json is an empty list, the table its header alone, tsv nothing.
    none = ["transfers", "list", "--customer", c["customer"], "--region", "in"]
    assert as_json(ctl(c, *none, "-o", "json", token="auditor")) == {"items": []}
    assert ctl(c, *none, token="auditor").stdout.decode().startswith("REGION   SEQ   TIME")
    assert ctl(c, *none, "-o", "tsv", token="auditor").stdout == b""

    # (Another test of the session may have damaged a ledger on purpose: exit 4 then.)
    p = ctl(c, "transfers", "verify", "eu", "-o", "json", token="auditor", check=False)
    v = as_json(p)
    assert set(v) == VERIFY_KEYS and v["region"] == "eu" and p.returncode == (0 if v["ok"] else 4)
    assert v["damage"] == ("none" if v["ok"] else v["damage"]) and isinstance(v["damage"], str)
    assert is_time(v["verified_at"]) and isinstance(v["entries_checked"], int)
    head, rows = table(ctl(c, "transfers", "verify", "eu", token="auditor", check=False))
    assert head[:3] == ["REGION", "OK", "DAMAGE"] and rows[0][:3] == ["eu", "yes" if v["ok"] else "NO", v["damage"]]

    rows = as_jsonl(ctl(c, "transfers", "report", "--purpose", c["purpose"], "-o", "jsonl", token="auditor"))
    assert len(rows) == 1 and set(rows[0]) == REPORT_ROW_KEYS
    assert (rows[0]["from_region"], rows[0]["to_region"], rows[0]["transfers"], rows[0]["bytes"]) == ("eu", "us", 1, len(PAYLOAD))
    tsv = ctl(c, "transfers", "report", "--purpose", c["purpose"], "-o", "tsv", token="auditor").stdout.decode().splitlines()
    assert len(tsv) == 1 and tsv[0].split("\t")[1:] == ["eu", "us", rows[0]["basis_id"], c["purpose"], "1", "1", str(len(PAYLOAD)), "0"]
    rep = as_json(ctl(c, "transfers", "report", "--purpose", c["purpose"], "-o", "json", token="auditor"))
    assert rep["rows"] == rows and is_time(rep["generated_at"])
    # To a file, in any format; --output FILE (the old spelling) still works.
    out = c["dir"] / "report.jsonl"
    ctl(c, "transfers", "report", "--purpose", c["purpose"], "-o", "jsonl", "--output-file", str(out), token="auditor")
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows
    old = c["dir"] / "report.csv"
    ctl(c, "transfers", "report", "--purpose", c["purpose"], "--format", "csv", "--output", str(old), token="auditor")
    assert old.read_text().startswith("month,from_region,to_region")


def test_data_subject_requests(cli):
    c = cli
    subject = f"cli-out-{uid()}@example.com"
    c = dict(c, customer=f"cust-cli-dsr-{uid()}")
    ctl(c, "customer", "register", c["customer"], "eu")
    ctl(c, "record", "put", c["customer"], "s1", "note", subject, stdin=b"about a person")
    rid = f"cli-out-{uid()}"
    q = as_json(ctl(c, "dsr", "restrict", subject, "--customer", c["customer"], "--request-id", rid, "-o", "json", token="privacy-officer"))
    assert set(q) == DSR_KEYS, set(q) ^ DSR_KEYS
    assert q["request_id"] == rid and q["kind"] == "restrict" and q["customer_id"] == c["customer"]
    assert q["state"] in ("received", "in_progress", "done") and is_time(q["received_at"]) and is_time(q["effective_due_at"])
    assert [leg["region"] for leg in q["legs"]] == ["eu", "in", "us"] and all(set(leg) == LEG_KEYS for leg in q["legs"])
    assert re.fullmatch(r"[0-9a-f]{64}", q["subject_key_hex"])
    st = as_json(ctl(c, "dsr", "status", rid, "-o", "json", token="privacy-officer"))
    assert st["request_id"] == rid and st["received_at"] == q["received_at"]
    # The table of one request stays the detail view: a line per field and per leg.
    detail = ctl(c, "dsr", "status", rid, token="privacy-officer").stdout.decode().splitlines()
    assert detail[0].split() == ["request_id", rid] and any(line.startswith("leg eu ") for line in detail), detail
    listed = as_jsonl(ctl(c, "dsr", "list", "--customer", c["customer"], "--kind", "restrict", "-o", "jsonl", token="privacy-officer"))
    assert [x["request_id"] for x in listed] == [rid] and set(listed[0]) == DSR_KEYS
    head, rows = table(ctl(c, "dsr", "list", "--customer", c["customer"], token="privacy-officer"))
    assert head == ["REQUEST_ID", "KIND", "STATE", "RECEIVED_AT", "DUE", "OVERDUE", "CUSTOMER", "LEGS"]

    found = as_json(ctl(c, "dsr", "locate", subject, "--customer", c["customer"], "-o", "json", token="privacy-officer"))["items"]
    assert [x["region"] for x in found] == ["eu", "in", "us"] and all(set(x) == LOCATE_KEYS for x in found)
    assert {x["region"]: x["records"] for x in found} == {"eu": 1, "in": 0, "us": 0}
    head, rows = table(ctl(c, "dsr", "locate", subject, "--customer", c["customer"], token="privacy-officer"))
    assert head == ["REGION", "RECORDS", "BYTES", "STATUS"] and rows[-1] == ["total", "1", "14", "complete"]

    # export to a file: its verified manifest on stdout
    path = c["dir"] / "export.jsonl"
    p = ctl(c, "dsr", "export", subject, "--customer", c["customer"], "--output-file", str(path), "-o", "json", token="privacy-officer")
    summary = as_json(p)
    assert set(summary) == EXPORT_KEYS and summary["output_file"] == str(path) and summary["complete"] is True
    assert summary["total_records"] == 1 and summary["total_bytes"] == len(path.read_bytes()) and is_time(summary["generated_at"])
    # without a file the lines are stdout: -o has nothing to format there
    p = ctl(c, "dsr", "export", subject, "-o", "json", token="privacy-officer", check=False)
    assert p.returncode == 2 and p.stdout == b"" and b"--output-file" in p.stderr


def test_exit_statuses(cli, tmp_path):
    c = cli
    help_ = subprocess.run([DOMICILECTL, "--help"], capture_output=True, text=True, timeout=30)
    assert help_.returncode == 0
    for line in ("0   success", "2   usage", "15 NOT_FOUND", "17 PERMISSION_DENIED", "24 UNAVAILABLE", "26 UNAUTHENTICATED"):
        assert line in " ".join(help_.stdout.split()) or line in help_.stdout, line
    assert "exit status:" in help_.stdout and "-o, --output FORMAT" in help_.stdout
    assert subprocess.run([DOMICILECTL, "dsr", "list", "--help"], capture_output=True, timeout=30).returncode == 0

    usage = [["regions", "list", "-o", "yaml"], ["regions", "list", "-o", "csv"], ["regions", "list", "-o"],
             ["frobnicate"], ["customer", "get"], ["record", "list", c["customer"], "--limit", "0"],
             ["drill", "failover", "--region", "eu", "-o", "tsv"]]
    for args in usage:
        p = ctl(c, *args, check=False)
        assert p.returncode == 2 and p.stdout == b"", (args, p.returncode, p.stdout, p.stderr)

    # gRPC statuses: 10 + code, the status name on stderr, nothing on stdout
    p = ctl(c, "customer", "get", f"nope-{uid()}", "-o", "json", check=False)
    assert (p.returncode, p.stdout) == (15, b"") and b"NOT_FOUND" in p.stderr
    p = ctl(c, "record", "get", c["customer"], "missing", check=False)
    assert p.returncode == 15
    p = ctl(c, "transfers", "report", "-o", "json", token="service-us", check=False)
    assert (p.returncode, p.stdout) == (17, b"") and b"PERMISSION_DENIED" in p.stderr
    p = ctl(c, "transfers", "list", "--limit", "1", "-o", "json", token="service-us", check=False)
    assert (p.returncode, p.stdout) == (17, b"")
    bad = tmp_path / "bad.token"
    bad.write_text("not-a-token")
    c2 = dict(c, tokens=dict(c["tokens"], bad=str(bad)))
    p = ctl(c2, "regions", "list", token="bad", check=False)
    assert p.returncode == 26 and b"UNAUTHENTICATED" in p.stderr
    p = ctl(c, "--timeout", "2000", "regions", "list", "-o", "json", addr="127.0.0.1:1", check=False)
    assert (p.returncode, p.stdout) == (24, b"") and b"UNAVAILABLE" in p.stderr
    p = ctl(c, "transfers", "verify", "zz", token="auditor", check=False)
    assert p.returncode == 13


def complete(script, *words):
    """What bash completion offers after `words` (the last one is being typed)."""
    prog = (f"source {script}\n"
            f"COMP_WORDS=({' '.join(repr(w) if w else repr('') for w in words)})\n"
            "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
            "_domicilectl\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n')
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return [w for w in p.stdout.splitlines() if w]


def test_completion_bash(tmp_path):
    p = subprocess.run([DOMICILECTL, "completion", "bash"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "complete -F _domicilectl domicilectl" in p.stdout
    script = tmp_path / "domicilectl.bash"
    script.write_text(p.stdout)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    assert complete(script, "domicilectl", "") == ["health", "watch", "customer", "regions", "record", "transfers", "dsr",
                                                   "drill", "keys", "completion"]
    assert complete(script, "domicilectl", "d") == ["dsr", "drill"]
    assert complete(script, "domicilectl", "--addr", "h:1", "dsr", "l") == ["list", "locate"]
    assert set(complete(script, "domicilectl", "dsr", "list", "--")) == {
        "--overdue", "--due-within", "--state", "--kind", "--customer", "--limit", "--output", "--no-headers", "--help"}
    assert complete(script, "domicilectl", "dsr", "list", "--state", "") == ["received", "in_progress", "done", "failed"]
    assert complete(script, "domicilectl", "regions", "list", "-o", "") == ["table", "wide", "tsv", "json", "jsonl"]
    assert complete(script, "domicilectl", "-o", "json", "transfers", "report", "--output", "") == [
        "table", "wide", "tsv", "json", "jsonl", "csv", "markdown", "html"]
    assert complete(script, "domicilectl", "transfers", "list", "--outcome", "r") == ["refused"]
    assert complete(script, "domicilectl", "customer", "get", "") == []  # ids live in the gateway
    (tmp_path / "tok.token").write_text("x")
    assert complete(script, "domicilectl", "--token-file", str(tmp_path / "tok")) == [str(tmp_path / "tok.token")]
    assert complete(script, "domicilectl", "completion", "") == ["bash"]
    # Every flag completion offers is one --help documents.
    help_ = subprocess.run([DOMICILECTL, "--help"], capture_output=True, text=True, timeout=30).stdout
    drill_help = subprocess.run([DOMICILECTL, "drill", "--help"], capture_output=True, text=True, timeout=30).stdout
    for flags in re.findall(r'^\s+"[^"]*"\) echo "([^"]*)" ;;$', p.stdout, re.M):
        for flag in flags.split():
            assert re.search(rf"{re.escape(flag)}\b", help_ + drill_help), flag
    assert subprocess.run([DOMICILECTL, "completion", "zsh"], capture_output=True, timeout=30).returncode == 2


def test_progress_on_a_terminal_only(cli):
    c = cli
    env = {k: v for k, v in os.environ.items() if k not in ("DOMICILE_TOKEN", "DOMICILE_ADDR", "TERM")}
    base = [DOMICILECTL, "--addr", c["addr"]]
    report = base + ["--token-file", c["tokens"]["auditor"], "transfers", "report", "-o", "json"]
    rc, out, tty = run_on_pty(report, env=env)
    assert rc == 0 and json.loads(out)["rows"] is not None
    # the line, drawn in place, and cleared before the answer
    line = b"\rreport: waiting for the gateway (the first entry to now)"
    assert line in tty and b"\r\x1b[K" in tty[tty.index(line):], tty
    export = base + ["--token-file", c["tokens"]["privacy-officer"], "dsr", "export", "nobody@example.com",
                     "--customer", c["customer"], "--output-file", str(c["dir"] / "e.jsonl"), "-o", "json"]
    rc, out, tty = run_on_pty(export, env=env)
    assert rc == 0 and json.loads(out)["total_records"] == 0
    assert b"\rexport: 0 records, 0 bytes\x1b[K" in tty and b"verified" in tty, tty

    # piped: not a byte of it
    for cmd in (report, export):
        p = subprocess.run(cmd, capture_output=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and b"\r" not in p.stderr and b"\x1b" not in p.stderr, p.stderr


def test_keys_status_as_json(cli):
    """`keys status` (issue 17's command) speaks the same JSON contract: one KeyStatus object
    for json and one line for jsonl, proto field names, times in RFC 3339; the table stays the
    view of one thing, a line per field."""
    for region in ("us", "eu"):  # eu: forwarded to eu's gateway
        s = as_json(ctl(cli, "-o", "json", "keys", "status", region))
        assert s["region"] == region and s["available"] is True and s["current_version"] >= 1, s
        assert {"kek_source", "token", "unavailable_reason", "versions"} <= set(s), s
        current = [v for v in s["versions"] if v["version"] == s["current_version"]]
        assert len(current) == 1 and is_time(current[0]["created_at"]), s["versions"]
        (line,) = as_jsonl(ctl(cli, "-o", "jsonl", "keys", "status", region))
        assert line["region"] == region and line["current_version"] == s["current_version"]
    text = ctl(cli, "keys", "status", "us").stdout.decode()
    assert re.search(r"^current_version\s+\d+$", text, re.M), text
