"""The reader protocol is declared once (audit/contract/reader.py): both readers implement
every query with the declared parameters, and the read API serves exactly those queries."""

from __future__ import annotations

import inspect

import pytest

from audit.contract.reader import QUERIES, Reader, query_model
from audit.read.remote import RemoteReader
from audit.store.errors import StoreError
from audit.store.reader import LocalReader, StoreReader


def _params(fn) -> dict[str, object]:
    return {n: p.default for n, p in list(inspect.signature(fn).parameters.items())[1:]}


@pytest.mark.parametrize("name", QUERIES)
def test_the_file_reader_takes_the_declared_parameters_with_the_declared_defaults(name):
    assert _params(getattr(StoreReader, name)) == _params(getattr(Reader, name))


@pytest.mark.parametrize("name", QUERIES)
def test_the_remote_reader_accepts_every_declared_parameter(name):
    declared, remote = _params(getattr(Reader, name)), inspect.signature(getattr(RemoteReader, name))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in remote.parameters.values())
    assert takes_any or set(declared) <= set(remote.parameters)


def test_every_query_is_a_protocol_method_and_nothing_else_is_served():
    members = {n for n in dir(Reader) if not n.startswith("_") and callable(getattr(Reader, n))}
    assert set(QUERIES) == members - {"close"}


def test_parameters_parse_from_query_strings_and_encode_back():
    model = query_model("findings")
    parsed = model.model_validate({"kind": "orphan_root", "trace_id": "00" * 15 + "2a", "limit": "7"})
    assert (parsed.kind, parsed.trace_id, parsed.limit, parsed.offset) == ("orphan_root", 42, 7, 0)
    assert parsed.model_dump(mode="json", exclude_none=True)["trace_id"] == "00" * 15 + "2a"
    for bad in ({"kind": "everything"}, {"limit": "0"}, {"trace_id": "xyz"}, {"sql": "drop"}):
        with pytest.raises(ValueError):
            model.model_validate(bad)


def test_the_remote_reader_refuses_a_bad_parameter_before_sending_it():
    remote = RemoteReader("http://127.0.0.1:9")  # nothing listens there: a request would say so
    with pytest.raises(StoreError, match="parameter 'limit' must be between 1 and 10000"):
        remote.findings(limit=0)
    with pytest.raises(StoreError, match="unknown parameter"):
        remote.findings(colour="red")


def test_both_readers_are_readers(tmp_path):
    from audit.store.writer import SpanStore

    db = str(tmp_path / "s.duckdb")
    SpanStore(db).close()
    local = LocalReader(db)
    try:
        assert isinstance(local, Reader) and isinstance(RemoteReader("http://127.0.0.1:9"), Reader)
    finally:
        local.close()
