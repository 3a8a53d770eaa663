"""Who may call the gateway: API keys for /v1/*, and the admin API's guard.

Admin API without a token (loopback only): a web page the operator visits can still
reach 127.0.0.1, either directly (CSRF) or through a name that an attacker re-binds
to 127.0.0.1 (DNS rebinding). So without a token we also insist on a loopback `Host`,
refuse anything carrying a browser `Origin`, and take only `application/json` POSTs,
which a page cannot send cross-origin without a CORS preflight we never answer.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from router.errors import GatewayError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def host_name(host_header: str) -> str:
    """`Host` without its port: `127.0.0.1:8000` -> `127.0.0.1`, `[::1]:80` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_admin_request(request: Request, token: str | None, admin_open: bool) -> None:
    """Raise an OpenAI-style 4xx unless this admin call is allowed."""
    if "origin" in request.headers:
        raise GatewayError(403, "admin API: requests from web pages (with an Origin header) "
                           "are refused", code="admin_origin_refused")
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise GatewayError(415, "admin API: POST bodies must be application/json",
                               code="unsupported_media_type")
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise GatewayError(401, "admin API: missing or wrong bearer token",
                               code="invalid_admin_token")
        return
    if not admin_open:
        raise GatewayError(403, "admin API is off: the gateway listens beyond loopback and "
                           "no --admin-token was given", code="admin_disabled")
    if host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
        raise GatewayError(403, "admin API without --admin-token answers only requests "
                           "addressed to a loopback name (Host: 127.0.0.1, localhost, ::1)",
                           code="admin_host_refused")


def load_api_keys(keys: Iterable[str], files: Iterable[str]) -> tuple[str, ...]:
    """Keys given directly plus one per non-empty, non-comment line of each file."""
    out = [k.strip() for k in keys if k.strip()]
    for name in files:
        for line in Path(name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class AuthConfig:
    """Client keys for /v1/* and what the gateway shows workers.

    `forward_authorization`: pass the client's `Authorization` on to the workers (they
    check it, e.g. vLLM started with `--api-key`). `worker_api_key`: send this key to
    every worker instead. With neither, workers see no `Authorization`."""

    api_keys: tuple[str, ...] = ()
    forward_authorization: bool = False
    worker_api_key: str | None = None

    def check_client(self, authorization: str | None) -> None:
        """Raise 401 unless keys are off or `authorization` carries one of them."""
        if not self.api_keys:
            return
        given = (authorization or "").encode()
        if not any(hmac.compare_digest(given, f"Bearer {k}".encode()) for k in self.api_keys):
            raise GatewayError(401, "Incorrect or missing API key (Authorization: Bearer "
                               "<key>)", code="invalid_api_key")

    def worker_headers(self, authorization: str | None) -> dict[str, str]:
        """Extra headers for every request the gateway sends a worker for this client."""
        if self.worker_api_key:
            return {"Authorization": f"Bearer {self.worker_api_key}"}
        if self.forward_authorization and authorization:
            return {"Authorization": authorization}
        return {}
