"""
Small helpers shared by the integration tests (the harness and its fixtures are in conftest.py).

    from helpers import get, lit, md, now_ms, put, register, rpc_error, uid

Test modules import it after conftest, which puts the generated Python stubs (domicile.v1) on
sys.path; pytest loads conftest.py before it collects any test module.
"""

import time
import uuid

import grpc
import pytest

from domicile.v1 import customers_pb2, records_pb2


def uid():
    return uuid.uuid4().hex


def now_ms():
    return int(time.time() * 1000)


def lit(s):
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


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


def get(api, cid, rid, purpose=None, request_id=None, timeout=15):
    """GetRecord through api.get, with md(purpose, request_id)."""
    return api.get(records_pb2.GetRecordRequest(customer_id=cid, record_id=rid), metadata=md(purpose, request_id), timeout=timeout)


def register(api, residency, cid=None, prefix="cust", timeout=15, reply=False, **kw):
    """RegisterCustomer through api.register; `kw` are further RegisterCustomerRequest fields
    (request_id defaults to a fresh one). The customer id is `cid`, else
    "<prefix>-<residency>-<hex>". Checks the reply is that customer, in `residency`, ACTIVE.
    Returns the customer id, or the Customer message with reply=True."""
    cid = cid or f"{prefix}-{residency}-{uid()}"
    kw.setdefault("request_id", f"reg-{uid()}")
    c = api.register(customers_pb2.RegisterCustomerRequest(customer_id=cid, residency=residency, **kw), timeout=timeout)
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
