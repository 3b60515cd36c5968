"""The reader that goes through a running `ctxaudit serve`'s read API (audit/server/read_api.py):
the protocol of audit/contract/reader.py, with the same results as the file reader, for a
store file that the server holds open."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow as pa
from pydantic import ValidationError

from ..contract.reader import StoreStats, query_model
from ..net.access import TOKEN_ENV, AccessError, client_ssl_context, closed_without_answer, tls_failure
from ..settings import explain
from ..store.errors import StoreError

AUDIT_TIMEOUT_S = 3600.0  # an audit of tens of millions of spans takes minutes


class RemoteReader:
    def __init__(self, url: str, *, timeout: float = 60.0, token: str | None = None):
        """`token` (default: $CTXAUDIT_TOKEN) goes with every request; an https:// server's
        certificate is checked against $CTXAUDIT_CA_FILE, or the system's CAs, and a client
        certificate is presented from $CTXAUDIT_CLIENT_CERT and $CTXAUDIT_CLIENT_KEY if set."""
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StoreError(f"--server {url!r} is not a URL such as http://127.0.0.1:4319")
        self.url = url.rstrip("/")
        self.path = self.url  # where the data is, for messages (a LocalReader's is its file)
        self.timeout = timeout
        token = token if token is not None else os.environ.get(TOKEN_ENV, "").strip()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._tls = client_ssl_context() if parsed.scheme == "https" else None
        except AccessError as e:
            raise StoreError(str(e)) from None

    live = True  # a running server: it also reports ingestion and runs audits

    def _get(self, name: str, **params) -> object:
        with self._open(name, params) as response:
            return json.load(response)

    def _open(self, name: str, params: dict, body: dict | None = None, timeout: float | None = None):
        """The response to GET (or, with a body, POST) /v1/<name>; StoreError for what went wrong."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/v1/{name}" + (f"?{query}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers | ({"Content-Type": "application/json"} if data else {})
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout, context=self._tls)
        except urllib.error.HTTPError as e:
            try:
                message = json.load(e).get("error", e.reason)
            except (ValueError, AttributeError):
                message = e.reason
            if e.code == 401:
                message += "" if self._headers else f" (set ${TOKEN_ENV} to the server's token)"
            raise StoreError(f"the server at {self.url} answered {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLError):  # reached, but the TLS exchange failed: say which way
                raise StoreError(f"cannot read from {self.url}: {tls_failure(reason, self.url)}") from None
            if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError)):
                raise StoreError(
                    f"the read API at {self.url} closed the connection without an answer; "
                    + closed_without_answer(self.url)
                ) from None
            raise StoreError(
                f"cannot reach ctxaudit serve's read API at {self.url} ({reason}); is the server "
                "running, with --api at that address?"
            ) from None

    def ingest(self) -> dict:
        """The server's ingest figures now (collector_ext/ingest_health.py)."""
        return self._get("ingest")

    def audit(self, request: dict, *, timeout: float = AUDIT_TIMEOUT_S) -> dict:
        """Run an audit in the server (`request`: settings, since_ns, until_ns, all, save); the
        result document without findings, plus `summary` (text lines). `run` is None when there
        was nothing new to audit."""
        try:
            with self._open("audit", {}, request, timeout) as response:
                return json.load(response)
        except (OSError, ValueError, http.client.HTTPException) as e:  # the answer broke after it started
            raise StoreError(f"the audit answer from {self.url} was cut off: {e}") from None

    def write_audit_document(self, request: dict, out: BinaryIO, *, timeout: float = AUDIT_TIMEOUT_S) -> None:
        """Run an audit in the server and copy its whole document, findings included, to `out`."""
        try:
            with self._open("audit", {"findings": "true"}, request, timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
        except (OSError, http.client.HTTPException) as e:  # the stream broke after it started
            raise StoreError(f"the audit document from {self.url} was cut off: {e}") from None

    @contextmanager
    def export_batches(
        self, kind: str, from_ns: int, until_ns: int, *, timeout: float = AUDIT_TIMEOUT_S
    ) -> Iterator[pa.RecordBatchReader]:
        """The rows `ctxaudit export` writes for `kind` (spans or links) starting in
        [from_ns, until_ns), streamed from the server (GET /v1/export) as Arrow batches. A stream
        cut off fails where it is read (StoreError, or the reader's error), never ends early."""
        response = self._open(
            "export", {"kind": kind, "from_ns": from_ns, "until_ns": until_ns}, None, timeout
        )
        try:
            try:
                batches = pa.ipc.open_stream(_WholeStream(response, self.url))
            except (OSError, pa.ArrowException, http.client.HTTPException) as e:
                raise StoreError(f"the export stream from {self.url} was cut off: {e}") from None
            yield batches
        finally:
            response.close()

    def _query(self, name: str, **params) -> object:
        """One declared query (audit/contract/reader.py), its parameters checked and encoded
        by the same declaration the server parses them with."""
        model = query_model(name)
        try:
            encoded = model(**params).model_dump(mode="json", exclude_none=True)
        except ValidationError as e:
            raise StoreError(f"{name}: {explain(e, model, noun='parameter')}") from None
        return self._get(name, **encoded)

    def stats(self) -> StoreStats:
        return StoreStats.from_dict(self._query("stats"))

    def store_counts(self) -> dict:
        return self._query("store_counts")

    def time_range(self) -> dict:
        return self._query("time_range")

    def protocol_summary(self) -> list[dict]:
        return self._query("protocol_summary")

    def trace(self, trace_id: int) -> list[dict]:
        return self._query("trace", trace_id=trace_id)

    def links(self, trace_id: int, span_id: int) -> list[dict]:
        return self._query("links", trace_id=trace_id, span_id=span_id)

    def audit_run(self, run_id: int | None = None) -> dict | None:
        return self._query("audit_run", run_id=run_id)

    def audit_runs(self, limit: int = 100) -> list[dict]:
        return self._query("audit_runs", limit=limit)

    def finding_counts(self, run_id: int | None = None) -> list[dict]:
        return self._query("finding_counts", run_id=run_id)

    def findings(self, run_id: int | None = None, **filters) -> dict:
        """As `Reader.findings`; the filters are checked against its declaration."""
        return self._query("findings", run_id=run_id, **filters)

    def fragmented_requests(self, run_id: int | None = None, limit: int = 20) -> list[dict]:
        return self._query("fragmented_requests", run_id=run_id, limit=limit)

    def close(self) -> None:
        pass


class _WholeStream:
    """A response body that raises OSError when the connection ends before the body does (a
    chunked body's missing last chunk), so a stream cut off at a batch boundary is not taken
    for a stream that ended."""

    def __init__(self, response, url: str):
        self._response, self._url = response, url
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        try:
            return self._response.read(n)
        except http.client.HTTPException as e:  # IncompleteRead: the server cut it off
            raise OSError(f"the export stream from {self._url} was cut off ({e!r})") from None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
