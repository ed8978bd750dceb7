"""Completion webhooks of data-subject requests (issue 6, item 7): a local receiver gets a
signed POST when an erasure is done; a receiver that answers 500 first gets the retry."""

import hashlib
import hmac
import http.server
import json
import os
import socket
import tempfile
import threading
import uuid

import pytest

from conftest import GatewayError, wait_until

from domicile.v1 import customers_pb2, records_pb2, subject_rights_pb2 as S


class Receiver:
    def __init__(self, fail_first):
        self.posts = []
        self.fail_first = fail_first
        self.got = threading.Event()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((dict(self.headers), body))
                failing = len(outer.posts) <= outer.fail_first
                self.send_response(500 if failing else 200)
                self.end_headers()
                if not failing:
                    outer.got.set()

            def log_message(self, *a):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def unary(ch, path, req, resp):
    return ch.unary_unary(path, request_serializer=req.SerializeToString,
                          response_deserializer=resp.FromString)(req, timeout=15)


def run_erasure(gateways, receiver, secret_path):
    g = gateways.start(overrides={"webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
                                  "webhook_secret_file": secret_path}, name="webhook")
    po, rid = erase_for(g, "wh-" + uuid.uuid4().hex[:10], "in", scoped=False)
    return g, po, rid


def check_signature(headers, body, secret):
    ts = headers["X-Domicile-Timestamp"]
    sig = headers["X-Domicile-Signature"]
    want = "sha256=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig, want), (sig, want)


def secret_file():
    fd, path = tempfile.mkstemp(prefix="domicile-webhook-")
    secret = os.urandom(32).hex().encode()
    os.write(fd, secret)
    os.close(fd)
    os.chmod(path, 0o600)
    return path, secret


def test_webhook_signed_delivery(regions, gateways):
    path, secret = secret_file()
    r = Receiver(fail_first=0)
    try:
        g, po, rid = run_erasure(gateways, r, path)
        assert r.got.wait(60), g.log
        headers, body = r.posts[-1]
        check_signature(headers, body, secret)
        summary = json.loads(body)
        assert summary["request_id"] == rid
        assert summary["state"] == "DSR_STATE_DONE"
        assert {l["region"] for l in summary["legs"]} == {"us", "eu", "in"}
        assert sum(l.get("records_deleted", 0) for l in summary["legs"]) == 1
        assert len(r.posts) == 1  # delivered once
        # The request shows the delivery.
        stop = threading.Event()
        for _ in range(50):
            req = unary(po, "/domicile.v1.SubjectRightsService/GetRequest",
                        S.GetRequestRequest(request_id=rid), S.GetRequestResponse).request
            if req.webhook.state == S.WEBHOOK_STATE_DELIVERED:
                break
            stop.wait(0.1)
        assert req.webhook.state == S.WEBHOOK_STATE_DELIVERED
        assert g.stop() == 0, g.log
    finally:
        r.close()
        os.unlink(path)


def test_webhook_retried_after_500(regions, gateways):
    path, secret = secret_file()
    r = Receiver(fail_first=1)
    try:
        g, po, rid = run_erasure(gateways, r, path)
        assert r.got.wait(60), g.log
        assert len(r.posts) >= 2
        for headers, body in r.posts:
            check_signature(headers, body, secret)
            assert json.loads(body)["request_id"] == rid
        assert "webhook for request" in g.log and "HTTP 500" in g.log
        # The receiver has the second POST; the gateway records the delivery right after.
        req = wait_until(
            lambda: unary(po, "/domicile.v1.SubjectRightsService/GetRequest",
                          S.GetRequestRequest(request_id=rid), S.GetRequestResponse).request,
            lambda q: q.webhook.state == S.WEBHOOK_STATE_DELIVERED)
        assert req.webhook.state == S.WEBHOOK_STATE_DELIVERED and req.webhook.attempts >= 2, req.webhook
        assert g.stop() == 0, g.log
    finally:
        r.close()
        os.unlink(path)


def erase_for(g, cid, residency, scoped=True):
    """Register cid, store one record of a fresh subject, Erase it (for that customer only
    when `scoped`, else for every customer)."""
    admin = g.channel(token="admin")
    po = g.channel(token="privacy-officer")
    subject = f"hook-{uuid.uuid4().hex[:8]}@example.com"
    unary(admin, "/domicile.v1.CustomersService/RegisterCustomer",
          customers_pb2.RegisterCustomerRequest(request_id="r-" + cid, customer_id=cid,
                                                residency=residency), customers_pb2.RegisterCustomerResponse)
    unary(admin, "/domicile.v1.RecordsService/PutRecord",
          records_pb2.PutRecordRequest(request_id="p-" + cid, customer_id=cid, record_id="r1",
                                       kind="note", subject=subject, payload=b"x"),
          records_pb2.PutRecordResponse)
    rid = "erase-" + uuid.uuid4().hex[:10]
    unary(po, "/domicile.v1.SubjectRightsService/Erase",
          S.EraseRequest(request_id=rid, subject=subject, customer_id=cid if scoped else "",
                         reason="test"), S.EraseResponse)
    return po, rid


def test_webhook_per_customer_receiver_and_secret(regions, gateways, tmp_path):
    """customer_webhooks_file: a request for a listed customer goes to that customer's URL,
    signed with that customer's secret; any other goes to webhook_url with the global one."""
    gpath, gsecret = secret_file()
    csecret = os.urandom(32).hex().encode()
    (tmp_path / "acme.secret").write_bytes(csecret)
    os.chmod(tmp_path / "acme.secret", 0o600)
    acme = "wh-acme-" + uuid.uuid4().hex[:8]
    other = "wh-other-" + uuid.uuid4().hex[:8]
    glob, mine = Receiver(fail_first=0), Receiver(fail_first=0)
    conf = tmp_path / "customer_webhooks.conf"
    conf.write_text('webhooks = (\n  { customer = "%s"; url = "http://127.0.0.1:%d/acme"; '
                    'secret_file = "acme.secret"; }\n);\n' % (acme, mine.port))
    try:
        g = gateways.start(overrides={"webhook_url": f"http://127.0.0.1:{glob.port}/hook",
                                      "webhook_secret_file": gpath,
                                      "customer_webhooks_file": str(conf)}, name="webhook-cust")
        assert "webhooks: 1 customers with their own receiver" in g.log
        po, rid_acme = erase_for(g, acme, "eu")
        _, rid_other = erase_for(g, other, "us")
        assert mine.got.wait(60) and glob.got.wait(60), g.log
        wait_until(lambda: (len(mine.posts), len(glob.posts)), lambda n: n == (1, 1), timeout=10)
        headers, body = mine.posts[0]
        check_signature(headers, body, csecret)
        assert json.loads(body)["request_id"] == rid_acme and json.loads(body)["customer_id"] == acme
        headers, body = glob.posts[0]
        check_signature(headers, body, gsecret)
        assert json.loads(body)["request_id"] == rid_other
        assert g.stop() == 0, g.log
    finally:
        mine.close()
        glob.close()
        os.unlink(gpath)


@pytest.mark.parametrize("content, says", [
    ("webhooks = ( { customer = \"a b\"; url = \"http://x/\"; secret_file = \"s\"; } );", "customer"),
    ("webhooks = ( { customer = \"a\"; url = \"ftp://x/\"; secret_file = \"s\"; } );", "url"),
    ("webhooks = ( { customer = \"a\"; url = \"http://x/\"; secret_file = \"missing\"; } );", "secret_file"),
    ("webhooks = ( { customer = \"a\"; url = \"http://x/\"; secret_file = \"s\"; },\n"
     "             { customer = \"a\"; url = \"http://y/\"; secret_file = \"s\"; } );", "two webhooks"),
    ("webhooks = ( { customer = \"a\"; url = \"http://x/\"; } );", "secret_file"),
    ("webhooks = \"nope\";", "list of groups"),
    ("webhooks = ( {", "customer_webhooks.conf:"),
])
def test_customer_webhooks_file_errors_stop_the_gateway(regions, gateways, tmp_path, content, says):
    (tmp_path / "s").write_bytes(b"0123456789abcdef")
    os.chmod(tmp_path / "s", 0o600)
    conf = tmp_path / "customer_webhooks.conf"
    conf.write_text(content + "\n")
    with pytest.raises(GatewayError) as ei:
        gateways.start(overrides={"customer_webhooks_file": str(conf)}, name="webhook-bad")
    assert says in str(ei.value), str(ei.value)
