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
CLIENT_CERT_ENV = "CTXAUDIT_CLIENT_CERT"  # a client's certificate (PEM), for a server with --tls-client-ca
CLIENT_KEY_ENV = "CTXAUDIT_CLIENT_KEY"  # its private key (PEM; default: in the certificate's file)
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


def client_ssl_context(env: dict | None = None) -> ssl.SSLContext:
    """How ctxaudit's own clients (`--server`) speak TLS: the server's certificate checked
    against $CTXAUDIT_CA_FILE or the system's CAs, and for mutual TLS a client certificate
    from $CTXAUDIT_CLIENT_CERT and $CTXAUDIT_CLIENT_KEY."""
    env = os.environ if env is None else env
    ca, cert, key = env.get(CA_ENV) or None, env.get(CLIENT_CERT_ENV), env.get(CLIENT_KEY_ENV)
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise AccessError(f"cannot use ${CA_ENV} ({ca}): {e}") from None
    if key and not cert:
        raise AccessError(f"${CLIENT_KEY_ENV} is set without ${CLIENT_CERT_ENV}")
    if cert:
        try:
            ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as e:
            raise AccessError(
                f"cannot use the client certificate ${CLIENT_CERT_ENV} ({cert}"
                f"{', $' + CLIENT_KEY_ENV + ' ' + key if key else ''}): {e}"
            ) from None
    return ctx


def tls_failure(error: ssl.SSLError, url: str) -> str:
    """What a failed TLS exchange with `url` means, and what to set: the server's certificate
    not trusted, a client certificate asked for and missing, or refused."""
    reason = getattr(error, "reason", None) or ""
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"TLS: the certificate of {url} was not accepted ({error.verify_message}; "
            f"CERTIFICATE_VERIFY_FAILED): set ${CA_ENV} to the CA that signed it"
        )
    if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE"):
        return (
            f"TLS: {url} requires a client certificate (mutual TLS, {reason}): set "
            f"${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV} to one signed by the CA it trusts (--tls-client-ca)"
        )
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
        return (
            f"TLS: {url} refused the client certificate in ${CLIENT_CERT_ENV} ({reason}): it must be "
            "signed by the CA the server trusts (--tls-client-ca)"
        )
    if reason == "WRONG_VERSION_NUMBER":
        return f"TLS: {url} does not speak TLS ({reason}): is it http://, not https://?"
    return f"TLS: the handshake with {url} failed ({error})"


def closed_without_answer(url: str, env: dict | None = None) -> str:
    """Why a server we reached may close the connection before answering. Over TLS 1.3 the
    server checks the client certificate after the client has finished its handshake, and
    ctxaudit's server (asyncio) closes without sending its alert: the client sees only the
    close, so the likely cause is named."""
    env = os.environ if env is None else env
    if not url.startswith("https:"):
        return "if the server uses TLS (its ready line says https://), use https://"
    if env.get(CLIENT_CERT_ENV):
        return (
            f"TLS: it probably refused the client certificate in ${CLIENT_CERT_ENV}: it must be signed "
            "by the CA the server trusts (--tls-client-ca)"
        )
    return (
        "TLS: it probably requires a client certificate (mutual TLS, serve --tls-client-ca): set "
        f"${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV} to one signed by the CA it trusts"
    )


@dataclass(frozen=True)
class Access:
    """What a listener demands: a token, TLS, both or neither."""

    auth: TokenAuth | None = None
    tls: TlsFiles | None = None


OPEN = Access()  # no token, no TLS: loopback only, unless the user accepts the warning
