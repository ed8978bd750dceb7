"""
Issue 9, item 7: gRPC server reflection (grpc.reflection.v1alpha.ServerReflection), so that
grpcurl-style tools can list and call the services without the .proto files. "Done means":
reflection lists every service; a file descriptor request returns the real descriptors.

The client is Debian's python3-grpcio with our generated reflection_pb2 (an independent
implementation of the protocol's messages); "real" means byte-identical to the serialized
FileDescriptorProto protoc embedded in the generated Python modules.
"""

import importlib
import threading

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from conftest import SERVING, health_pb2  # noqa: F401  (conftest first: it extends grpc.__path__)
from grpc.reflection.v1alpha import reflection_pb2 as R  # noqa: E402

PATH = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1_MODULES = ("common", "customers", "records", "subject_rights", "transfers", "regions", "keys")
NOT_FOUND, UNIMPLEMENTED = 5, 12


def modules():
    """Every generated module of proto/: what protoc made of each file."""
    return [importlib.import_module(f"domicile.v1.{m}_pb2") for m in V1_MODULES] + [health_pb2, R]


def expected_services():
    return sorted(s.full_name for m in modules() for s in m.DESCRIPTOR.services_by_name.values())


def serialized_by_protoc():
    """{file name: serialized FileDescriptorProto} as protoc produced it."""
    return {m.DESCRIPTOR.name: m.DESCRIPTOR.serialized_pb for m in modules()}


def transitive_deps(name):
    fds = {m.DESCRIPTOR.name: m.DESCRIPTOR for m in modules()}
    out, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(d.name for d in fds[n].dependencies)
    return out


def reflect(channel, *requests, timeout=10):
    """One stream carrying `requests`; returns the responses (raises grpc.RpcError)."""
    call = channel.stream_stream(
        PATH,
        request_serializer=R.ServerReflectionRequest.SerializeToString,
        response_deserializer=R.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=timeout))


def one(channel, **kw):
    req = R.ServerReflectionRequest(**kw)
    (rep,) = reflect(channel, req)
    assert rep.original_request == req
    return rep


def files_of(rep):
    assert rep.WhichOneof("message_response") == "file_descriptor_response", rep
    raw = list(rep.file_descriptor_response.file_descriptor_proto)
    protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in raw]
    names = [p.name for p in protos]
    assert len(names) == len(set(names)), f"a file sent twice: {names}"
    return names, dict(zip(names, raw))


@pytest.fixture
def anon(gateway):
    """A channel without credentials: reflection is public, like health."""
    return gateway.channel(token=None)


# --------------------------------------------------------------------------------------------


def test_list_services_names_every_service(anon):
    rep = one(anon, host="", list_services="*")
    assert rep.WhichOneof("message_response") == "list_services_response", rep
    names = [s.name for s in rep.list_services_response.service]
    assert len(names) == len(set(names)), names
    assert sorted(names) == expected_services()
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


def test_host_is_echoed(anon):
    rep = one(anon, host="gateway.example", list_services="")
    assert rep.valid_host == "gateway.example"


def test_file_containing_symbol_returns_protocs_descriptor(anon):
    rep = one(anon, file_containing_symbol="domicile.v1.RecordsService")
    names, raw = files_of(rep)
    assert names[0] == "domicile/v1/records.proto"
    records_pb2 = importlib.import_module("domicile.v1.records_pb2")
    assert raw["domicile/v1/records.proto"] == records_pb2.DESCRIPTOR.serialized_pb
    assert set(names) == transitive_deps("domicile/v1/records.proto")
    fd = descriptor_pb2.FileDescriptorProto.FromString(raw["domicile/v1/records.proto"])
    assert "RecordsService" in [s.name for s in fd.service]
    assert "GetRecord" in [m.name for s in fd.service for m in s.method]


def test_file_containing_symbol_includes_dependencies(anon):
    # records.proto imports nothing; subject_rights.proto imports common.proto.
    names, raw = files_of(one(anon, file_containing_symbol="domicile.v1.SubjectRightsService"))
    assert names[0] == "domicile/v1/subject_rights.proto"
    assert set(names) == {"domicile/v1/subject_rights.proto", "domicile/v1/common.proto"}
    protoc = serialized_by_protoc()
    for n in names:
        assert raw[n] == protoc[n], n
    fd = descriptor_pb2.FileDescriptorProto.FromString(raw[names[0]])
    assert list(fd.dependency) == ["domicile/v1/common.proto"]


def test_file_by_filename_for_every_file(anon):
    protoc = serialized_by_protoc()
    reqs = [R.ServerReflectionRequest(file_by_filename=n) for n in sorted(protoc)]
    reps = reflect(anon, *reqs)
    assert len(reps) == len(reqs)
    for req, rep in zip(reqs, reps):
        assert rep.original_request == req
        names, raw = files_of(rep)
        assert names[0] == req.file_by_filename
        assert set(names) == transitive_deps(req.file_by_filename)
        for n in names:
            assert raw[n] == protoc[n], f"{n} differs from protoc's descriptor"


@pytest.mark.parametrize(
    "symbol, file",
    [
        ("domicile.v1.RecordsService.GetRecord", "domicile/v1/records.proto"),  # method
        ("domicile.v1.PutRecordRequest", "domicile/v1/records.proto"),  # message
        ("domicile.v1.Record.LabelsEntry", "domicile/v1/records.proto"),  # nested message
        ("domicile.v1.CustomerState", "domicile/v1/customers.proto"),  # enum
        ("grpc.health.v1.HealthCheckResponse.ServingStatus", "grpc/health/v1/health.proto"),
        ("domicile.v1.RegionCount", "domicile/v1/common.proto"),
        ("grpc.reflection.v1alpha.ServerReflection", "grpc/reflection/v1alpha/reflection.proto"),
    ],
)
def test_file_containing_symbol_kinds(anon, symbol, file):
    names, _ = files_of(one(anon, file_containing_symbol=symbol))
    assert names[0] == file


@pytest.mark.parametrize(
    "kw, code",
    [
        ({"file_containing_symbol": "domicile.v1.NoSuchThing"}, NOT_FOUND),
        ({"file_containing_symbol": "domicile.v1.RecordsService.NoSuchMethod"}, NOT_FOUND),
        ({"file_containing_symbol": ""}, NOT_FOUND),
        ({"file_by_filename": "domicile/v1/nope.proto"}, NOT_FOUND),
        ({"file_containing_extension": R.ExtensionRequest(containing_type="domicile.v1.Record", extension_number=100)}, UNIMPLEMENTED),
        ({"all_extension_numbers_of_type": "domicile.v1.Record"}, UNIMPLEMENTED),
    ],
)
def test_errors_are_error_responses(anon, kw, code):
    rep = one(anon, **kw)
    assert rep.WhichOneof("message_response") == "error_response", rep
    assert rep.error_response.error_code == code
    assert rep.error_response.error_message


def test_several_requests_on_one_stream(anon):
    reqs = [
        R.ServerReflectionRequest(list_services=""),
        R.ServerReflectionRequest(file_containing_symbol="domicile.v1.NoSuchThing"),
        R.ServerReflectionRequest(file_containing_symbol="domicile.v1.TransfersService.Report"),
        R.ServerReflectionRequest(file_by_filename="grpc/health/v1/health.proto"),
        R.ServerReflectionRequest(all_extension_numbers_of_type="x.Y"),
        R.ServerReflectionRequest(list_services=""),
    ]
    reps = reflect(anon, *reqs)
    assert [r.original_request for r in reps] == reqs
    kinds = [r.WhichOneof("message_response") for r in reps]
    assert kinds == [
        "list_services_response",
        "error_response",
        "file_descriptor_response",
        "file_descriptor_response",
        "error_response",
        "list_services_response",
    ]
    assert files_of(reps[2])[0][0] == "domicile/v1/transfers.proto"
    assert files_of(reps[3])[0] == ["grpc/health/v1/health.proto"]


def test_answers_arrive_while_the_stream_stays_open(anon):
    """Bidirectional for real: each response comes before the client sends the next request."""
    call = anon.stream_stream(
        PATH,
        request_serializer=R.ServerReflectionRequest.SerializeToString,
        response_deserializer=R.ServerReflectionResponse.FromString,
    )
    turn = threading.Semaphore(0)
    symbols = ["domicile.v1.RecordsService", "domicile.v1.CustomersService", "domicile.v1.RegionsService"]

    def requests():
        for s in symbols:
            yield R.ServerReflectionRequest(file_containing_symbol=s)
            if not turn.acquire(timeout=10):  # the response to this one has been read
                return

    stream = call(requests(), timeout=30)
    got = []
    for rep in stream:
        got.append(files_of(rep)[0][0])
        turn.release()
    assert got == ["domicile/v1/records.proto", "domicile/v1/customers.proto", "domicile/v1/regions.proto"]
    assert stream.code() == grpc.StatusCode.OK


def test_cancel_mid_stream_leaves_the_gateway_serving(gateway, anon):
    call = anon.stream_stream(
        PATH,
        request_serializer=R.ServerReflectionRequest.SerializeToString,
        response_deserializer=R.ServerReflectionResponse.FromString,
    )
    stop = threading.Event()

    def requests():
        yield R.ServerReflectionRequest(list_services="")
        stop.wait(10)  # never half-closes before the cancel

    stream = call(requests(), timeout=30)
    assert next(stream).WhichOneof("message_response") == "list_services_response"
    stream.cancel()
    stop.set()
    assert stream.code() == grpc.StatusCode.CANCELLED
    assert one(anon, list_services="").list_services_response.service
    assert gateway.alive()


def test_limits(anon):
    # At most 100 requests on one stream: the 101st ends it with RESOURCE_EXHAUSTED.
    reqs = [R.ServerReflectionRequest(list_services="") for _ in range(101)]
    call = anon.stream_stream(
        PATH,
        request_serializer=R.ServerReflectionRequest.SerializeToString,
        response_deserializer=R.ServerReflectionResponse.FromString,
    )
    stream = call(iter(reqs), timeout=30)
    got = 0
    with pytest.raises(grpc.RpcError) as ei:
        for _ in stream:
            got += 1
    assert got == 100
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value.details()
    # At most 64 KiB per request.
    big = R.ServerReflectionRequest(host="h" * (64 * 1024), list_services="")
    with pytest.raises(grpc.RpcError) as ei:
        reflect(anon, R.ServerReflectionRequest(list_services=""), big)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value.details()
    # An undecodable request ends the stream with INVALID_ARGUMENT.
    raw = anon.stream_stream(PATH, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as ei:
        list(raw(iter([b"\xff\xff\xff"]), timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_empty_stream_ends_ok(anon):
    assert reflect(anon) == []


def test_a_client_can_call_from_reflection_alone(gateway, anon):
    """What grpcurl does: build a descriptor pool from reflection alone (no generated code),
    then call methods with dynamic message classes."""
    pool = descriptor_pool.DescriptorPool()
    services = [s.name for s in one(anon, list_services="").list_services_response.service]
    reps = reflect(anon, *[R.ServerReflectionRequest(file_containing_symbol=s) for s in services])
    added = set()
    for rep in reps:
        _, raw = files_of(rep)
        for name in reversed(list(raw)):  # dependencies before the files that import them
            if name not in added:
                pool.AddSerializedFile(raw[name])
                added.add(name)
    for s in services:
        assert pool.FindServiceByName(s).methods
    factory = message_factory.MessageFactory(pool)

    def cls(name):
        return factory.GetPrototype(pool.FindMessageTypeByName(name))

    check = pool.FindMethodByName("grpc.health.v1.Health.Check")
    req_cls, rep_cls = cls(check.input_type.full_name), cls(check.output_type.full_name)
    call = anon.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=rep_cls.FromString,
    )
    assert call(req_cls(service="domicile.v1.RecordsService"), timeout=10).status == SERVING

    lr = pool.FindMethodByName("domicile.v1.RegionsService.ListRegions")
    req_cls, rep_cls = cls(lr.input_type.full_name), cls(lr.output_type.full_name)
    call = gateway.channel(token="admin").unary_unary(
        "/domicile.v1.RegionsService/ListRegions",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=rep_cls.FromString,
    )
    rep = call(req_cls(), timeout=10)
    assert {r.code for r in rep.regions} >= {"us", "eu", "in"}
