"""The fused HTTP call-out joins the trace too: its rate-limit decision (and its authz, through
the servicer's ``decide``) records a span under the Envoy span in the call's ``traceparent``."""

from __future__ import annotations

import time

from legation.fastpath.server import CalloutApp
from legation.tracing.receiver import TraceReceiver
from tests.fastpath.test_fused_server import ROUTE, app, call
from tests.tracing.test_spans import PARENT, TRACE, collector

__all__ = ["app", "collector"]  # fixtures


async def test_a_sampled_fused_call_records_its_rate_limit_decision(
    app: CalloutApp, collector: TraceReceiver
) -> None:
    sampled = (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())
    status, _ = await call(app, [ROUTE, (b"x-user", b"secret-user-name"), sampled])
    assert status == 200
    unsampled = (b"traceparent", f"00-{'1' * 32}-{PARENT}-00".encode())
    await call(app, [ROUTE, (b"x-user", b"carol"), unsampled])
    deadline = time.monotonic() + 10
    while collector.store.trace(TRACE) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (span,) = collector.store.trace(TRACE) or []
    assert (span.name, span.parent_id, span.service) == (
        "legation.ratelimit decision",
        PARENT,
        "legation-ratelimit",
    )
    assert span.attributes == {
        "legation.domain": "mesh",
        "legation.descriptors": "generic_key,user",  # keys, never the user's name
        "legation.decision": "OK",
        "legation.limit": "2/minute",
    }
    assert collector.store.stats()["traces"] == 1  # the unsampled call made none
