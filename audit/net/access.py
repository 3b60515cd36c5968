"""Who may talk to `ctxaudit serve`: a shared token, checked on every request to the OTLP
receivers and the read API, and TLS (optionally mutual) for the receivers. Configured the way
OTLP exporters already are: the token travels as `Authorization: Bearer <token>` (or in an
API-key header such as `x-api-key`), which exporters set with OTEL_EXPORTER_OTLP_HEADERS."""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "CTXAUDIT_TOKEN"  # the token itself, for clients (`--server`) and for serve
CA_ENV = "CTXAUDIT_CA_FILE"  # the CA a client trusts for an https:// --server (default: the system's)
UNAUTHENTICATED = "missing or wrong token: send Authorization: Bearer <token> (OTEL_EXPORTER_OTLP_HEADERS)"


class AccessError(ValueError):
    """The access settings are unusable (a usage error, said before anything listens)."""


@dataclass(frozen=True)
class TokenAuth:
    token: bytes
    header: str | None = None  # an API-key header accepted besides Authorization: Bearer

    @classmethod
    def load(
        cls, path: str | None, header: str | None = None, *, env: dict | None = None
    ) -> TokenAuth | None:
        """From a file (its first line) or, without one, $CTXAUDIT_TOKEN; None if neither is set."""
        env = os.environ if env is None else env
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as e:
                raise AccessError(f"cannot read the token file {path}: {e.strerror}") from None
            token = lines[0].strip() if lines else ""
        else:
            token = env.get(TOKEN_ENV, "").strip()
            if not token:
                return None
        if len(token) < 16:
            raise AccessError("the token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        if not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
            raise AccessError("the token must be printable ASCII without spaces: it travels in a header")
        return cls(token.encode(), header.lower() if header else None)

    def allows(self, headers: Iterable[tuple[str, str]]) -> bool:
        """Whether the request's headers carry the token. The comparison takes the same time
        whatever the token offered, so timing says nothing about it."""
        offered = []
        for name, value in headers:
            name = name.lower()
            if name == "authorization" and value[:7].lower() == "bearer ":
                offered.append(value[7:].strip())
            elif self.header and name == self.header:
                offered.append(value.strip())
        ok = False
        for value in offered:
            ok |= hmac.compare_digest(value.encode("utf-8", "replace"), self.token)
        return ok


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key (PEM), and the CA that client certificates must be
    signed by for mutual TLS (None: no client certificate asked for)."""

    cert: str
    key: str
    client_ca: str | None = None

    def _read(self, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise AccessError(f"cannot read {path}: {e.strerror}") from None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                ctx.load_verify_locations(self.client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise AccessError(
                f"cannot use the TLS files ({self.cert}, {self.key}"
                f"{', ' + self.client_ca if self.client_ca else ''}): {e}"
            ) from None
        return ctx

    def grpc_credentials(self):
        import grpc

        self.ssl_context()  # the same checks, with the same messages, before gRPC sees the files
        ca = self._read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class Access:
    """What a listener demands: a token, TLS, both or neither."""

    auth: TokenAuth | None = None
    tls: TlsFiles | None = None


OPEN = Access()  # no token, no TLS: loopback only, unless the user accepts the warning
