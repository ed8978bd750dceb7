#!/usr/bin/python3
"""Writes the binary seeds of corpus/requests/ (run once when the API changes; the files are
committed). A seed is one byte, the method's index in dm_api_methods() (the order of
`domiciled --list-methods`), then the serialized request: a valid one per method, filled by
field name, and broken variants (invalid UTF-8, NUL, truncation, negative numbers).

    tests/fuzz/make_seeds.py [BUILD_DIR]      (default build-test: domiciled and gen/py)
"""
import os
import subprocess
import sys

repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(repo, "build-test"))
sys.path.insert(0, os.path.join(build, "gen", "py"))
import grpc  # noqa: E402  Debian's grpc owns the namespace; add our generated health stubs

grpc.__path__.append(os.path.join(build, "gen", "py", "grpc"))
from google.protobuf import descriptor as D  # noqa: E402
from grpc.health.v1 import health_pb2  # noqa: E402
from grpc.reflection.v1alpha import reflection_pb2  # noqa: E402
from domicile.v1 import customers_pb2, records_pb2, regions_pb2, subject_rights_pb2, transfers_pb2  # noqa: E402

MODULES = (health_pb2, customers_pb2, records_pb2, regions_pb2, subject_rights_pb2, transfers_pb2, reflection_pb2)
STRINGS = {
    "customer_id": "acme", "record_id": "rec-1", "record_ids": "rec-2", "kind": "note",
    "request_id": "req-1", "subject": " Alice@Example.COM ", "purpose": "service-delivery",
    "content_type": "text/plain", "residency": "eu", "region": "eu", "service": "",
}


def fill(msg):
    for f in msg.DESCRIPTOR.fields:
        rep = f.label == D.FieldDescriptor.LABEL_REPEATED
        if f.message_type and f.message_type.GetOptions().map_entry:
            getattr(msg, f.name)["team"] = "core"
            getattr(msg, f.name)["zone"] = "b\u00e9ta"
        elif f.type == D.FieldDescriptor.TYPE_MESSAGE:
            fill(getattr(msg, f.name).add() if rep else getattr(msg, f.name))
        elif f.type == D.FieldDescriptor.TYPE_STRING:
            v = STRINGS.get(f.name, "a reason \u2713")
            getattr(msg, f.name).append(v) if rep else setattr(msg, f.name, v)
        elif f.type == D.FieldDescriptor.TYPE_BYTES:
            setattr(msg, f.name, b"hello \x00\xff")
        elif f.type == D.FieldDescriptor.TYPE_BOOL:
            setattr(msg, f.name, True)
        elif f.type == D.FieldDescriptor.TYPE_ENUM:
            setattr(msg, f.name, 1)
        elif not rep:
            setattr(msg, f.name, 10 if f.name == "page_size" else 1)
    return msg


def input_type(path):
    svc, method = path.strip("/").split("/")
    for m in MODULES:
        for s in m.DESCRIPTOR.services_by_name.values():
            if s.full_name == svc:
                t = s.methods_by_name[method].input_type
                return getattr(m, t.name)
    raise KeyError(path)


out = os.path.join(repo, "tests", "fuzz", "corpus", "requests")
os.makedirs(out, exist_ok=True)
lines = subprocess.run([os.path.join(build, "domiciled"), "--list-methods"], capture_output=True, text=True, check=True)
for i, line in enumerate(lines.stdout.split("\n")):
    if not line.strip():
        continue
    path = line.split()[0]
    name = path.rsplit("/", 1)[1]
    body = fill(input_type(path)()).SerializeToString()
    seeds = {"valid": body, "truncated": body[: len(body) // 2]}
    if name in ("PutRecord", "RegisterCustomer", "ListRecords"):
        seeds["bad-utf8"] = b"\x12\x03a\xc3\x28" + body  # field 2 (customer_id) = "a\xc3("
        seeds["nul"] = b"\x12\x03a\x00b" + body
        seeds["overlong"] = b"\x12\x03\xe0\x80\xaf" + body
    if name == "ListRecords":
        seeds["page-size-negative"] = body + b"\x20\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    if name == "PutRecord":
        seeds["expected-version-negative"] = body + b"\x48\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
        seeds["bad-label-key"] = body + b'\x42\x09\x0a\x04B\xc3\xa9"\x12\x01v'  # labels["Bé\""]
    for kind, data in seeds.items():
        with open(os.path.join(out, f"{i:02d}-{name}-{kind}"), "wb") as f:
            f.write(bytes([i]) + data)
print(f"wrote {len(os.listdir(out))} seeds to {out}")
