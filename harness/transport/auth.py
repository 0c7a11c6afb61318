"""Who may talk to a cloud server: a shared token on both planes, and TLS as an option.

The token is a random secret shared by the cloud and its edges. The harness makes a new
one for every wall run and hands it to the processes it starts in their environment
(:data:`TOKEN_ENV`), never on a command line (which every local user can read).

- gRPC: each stream sends ``authorization: Bearer <token>`` in its call metadata; a
  stream without it, or with another, is refused with UNAUTHENTICATED.
- HTTP: ``POST /shutdown`` (the one route that changes state) takes only a JSON body
  ``{"token": "..."}`` sent as ``application/json``. A browser cannot send that cross-origin
  without a CORS preflight the server never grants, so no web page can reach it.

A cloud bound to loopback without a token makes one itself and writes it to its ready
file (readable by its owner only); bound to any other address it refuses to start
without one. TLS (``--tls-cert`` / ``--tls-key`` at the cloud, ``--tls-ca`` at the edge)
uses grpcio's and uvicorn's own TLS.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

TOKEN_ENV = "SPECWAN_CLOUD_TOKEN"
MD_AUTH = "authorization"  # gRPC metadata keys are lower case
BEARER = "Bearer "


class AuthError(ValueError):
    """A token that cannot be had or used (one line naming the fix)."""


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The token from ``token_file`` (its first line), else from :data:`TOKEN_ENV`; None if neither."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise AuthError(f"cannot read the token file {token_file}: {e.strerror or e}") from None
        if not text:
            raise AuthError(f"the token file {token_file} is empty: write the shared token into it")
        return text.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def bearer(token: str) -> tuple[str, str]:
    """The gRPC metadata pair that carries ``token``."""
    return MD_AUTH, BEARER + token


def token_matches(presented: str | None, token: str) -> bool:
    """Whether ``presented`` is ``token`` (compared in constant time)."""
    if not isinstance(presented, str):
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``authorization`` value is ``Bearer <token>``."""
    if not isinstance(header, str) or not header.startswith(BEARER):
        return False
    return token_matches(header[len(BEARER):], token)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
