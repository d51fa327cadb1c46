"""Per-request bookkeeping around the app: the request id (`X-Request-ID`, honoured when sane,
generated otherwise), the request counter and latency histogram by route template, and ONE JSON
log line per request. Routes add fields (sizes, scores, batch size, stage times) with `note()`."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from s3diff_serve.service import metrics

logger = logging.getLogger("s3diff.requests")
_FIELDS_KEY = "s3diff.log"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(request: Request) -> str:
    """The id the log line and the X-Request-ID header carry ("-" outside the logging middleware)."""
    return request.scope.get(_FIELDS_KEY, {}).get("request_id", "-")


def note(request: Request, **fields: Any) -> None:
    """Add fields to this request's log line."""
    request.scope.setdefault(_FIELDS_KEY, {}).update(fields)


def _route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label set); never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = sent_id if _SANE_ID.match(sent_id) else uuid.uuid4().hex
        fields = scope.setdefault(_FIELDS_KEY, {})
        fields["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            endpoint = _route_template(scope)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.REQUEST_DURATION.labels(endpoint).observe(elapsed)
            if endpoint != "/metrics":
                record = {"request_id": rid, "method": scope["method"], "route": endpoint, "status": status,
                          "duration_s": round(elapsed, 4), **{k: v for k, v in fields.items() if k != "request_id"}}
                logger.info(json.dumps(record, default=str))
