"""Opening a store for reading: through a running server's read API when one holds the file,
else the file itself, read-only. Either way the caller gets the `Reader` protocol
(audit/contract/reader.py) and never knows which."""

from __future__ import annotations

from ..contract.reader import Reader


def open_reader(*, db: str | None = None, server: str | None = None) -> Reader:
    if server:
        from .remote import RemoteReader

        return RemoteReader(server)
    from ..store.reader import LocalReader

    return LocalReader(db)
