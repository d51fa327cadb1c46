"""Optional API keys (`S3DIFF_API_KEYS`): `Authorization: Bearer <key>` or `X-API-Key: <key>`.
Keys are compared with `hmac.compare_digest` against every configured key, so the time taken
does not reveal how much of a guess matched. No keys configured = open service."""
from __future__ import annotations

import hmac

from fastapi import Request

from s3diff_serve.service.errors import ServiceError


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the /v1 routes."""
    keys = request.app.state.service.settings.api_keys
    if not keys:
        return
    key = presented_key(request)
    if key is None:
        raise ServiceError(401, "missing_api_key", "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key'",
                           {"WWW-Authenticate": "Bearer"})
    matched = False
    for configured in keys:  # no early exit: every key is compared
        matched |= hmac.compare_digest(key.encode(), configured.get_secret_value().encode())
    if not matched:
        raise ServiceError(401, "invalid_api_key", "the API key is not valid", {"WWW-Authenticate": "Bearer"})
