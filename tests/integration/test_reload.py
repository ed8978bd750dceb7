"""SIGHUP reload (issue 9): a changed principals file takes effect without a restart; a broken
one is refused, the running configuration stays, and the reason is logged."""

import hashlib
import os
import shutil
import signal
import tempfile
import threading

import grpc
import pytest

from conftest import REGIONS_STATE
from grpc.health.v1 import health_pb2


def locate(ch, token):
    from domicile.v1 import subject_rights_pb2 as S

    return ch.unary_unary("/domicile.v1.SubjectRightsService/Locate",
                          request_serializer=S.LocateRequest.SerializeToString,
                          response_deserializer=S.LocateResponse.FromString)(
        S.LocateRequest(subject="nobody@example.com"), timeout=10,
        metadata=[("authorization", f"Bearer {token}")])


def wait_for(predicate, timeout=15.0):
    stop = threading.Event()
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return True
        stop.wait(0.1)
    return predicate()


def test_sighup_reloads_principals_and_keeps_the_old_on_error(regions, gateways):
    state = REGIONS_STATE[0]
    tmp = tempfile.mkdtemp(prefix="domicile-reload-")
    try:
        principals = os.path.join(tmp, "principals.conf")
        shutil.copy(os.path.join(state, "etc", "principals.conf"), principals)
        g = gateways.start(overrides={"principals_file": principals}, name="reload")
        ch = g.channel(token=None)
        token = "reload-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
        with pytest.raises(grpc.RpcError) as ei:
            locate(ch, token)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED

        original = open(principals).read()
        digest = hashlib.sha256(token.encode()).hexdigest()
        added = original.rstrip().rstrip(");").rstrip() + (
            f',\n  {{ name = "reloaded-officer"; roles = [ "privacy-officer" ]; tenants = [ "*" ];'
            f' region = "eu"; default_purpose = "dsr"; token_sha256 = "{digest}"; }}\n);\n')
        with open(principals, "w") as f:
            f.write(added)
        g.send_signal(signal.SIGHUP)

        def accepted():
            try:
                locate(ch, token)
                return True
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                return False

        assert wait_for(accepted), g.log
        assert "reloaded" in g.log

        # A broken file: refused, the running principals stay (the new token still works).
        with open(principals, "w") as f:
            f.write("principals = ( { name = \"x\"; roles = [ \"nope\" ]; } );\n")
        g.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in g.log), g.log
        assert "keeping the running configuration" in g.log
        locate(ch, token)
        # The gateway still serves.
        h = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                           response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert h(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert g.stop() == 0, g.log
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
