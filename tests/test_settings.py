"""Settings are declared once (audit/settings.py); the command line, the YAML file and the
read API's requests all take their types, bounds and defaults from the declarations."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.settings import AuditRequest, AuditSettings, ServeSettings, SettingsError


def _option(command: str, name: str):
    return next(p for p in main.commands[command].params if p.name == name)


@pytest.mark.parametrize("name", [n for n, f in ServeSettings.model_fields.items()])
def test_serve_options_take_their_defaults_from_the_declaration(name):
    assert _option("serve", name).default == ServeSettings.model_fields[name].default


@pytest.mark.parametrize(
    "flag, value",
    [("--min-confidence", "1.5"), ("--settle", "-1"), ("--context", "nan"), ("--assume-probability", "0")],
)
def test_audit_options_enforce_the_declared_bounds(tmp_path, flag, value):
    result = CliRunner().invoke(main, ["audit", "--db", str(tmp_path / "none.duckdb"), flag, value])
    assert result.exit_code == 2, result.output


def test_serve_refuses_a_value_outside_its_bounds():
    result = CliRunner().invoke(main, ["serve", "--queue-spans", "0"])
    assert result.exit_code == 2 and "--queue-spans" in result.output


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"min_confidence": 2}, "min_confidence must be between 0 and 1"),
        ({"settle_s": math.nan}, "settle_s must be a finite number"),
        ({"context_s": math.inf}, "context_s must be a finite number"),
        ({"default_skew_ms": 1e9}, "default_skew_ms must be between 0 and 60000"),
        ({"assume_sampling_probability": True}, "must be a number, not true or false"),
        ({"entrypoints": [1, 2]}, "entrypoints must be a list"),
        ({"entrypionts": ["x"]}, "unknown setting(s) ['entrypionts']"),
    ],
)
def test_bad_settings_name_the_setting(doc, message):
    with pytest.raises(SettingsError) as e:
        AuditSettings.parse(doc)
    assert message in str(e.value)


def test_a_yaml_file_and_overrides_make_the_same_settings_as_the_request_body(tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("entrypoints: [gateway, 'shop:GET /']\nmin_confidence: 0.9\nsettle_s: 5\n")
    from_file = AuditSettings.load(str(path), context_s=30)
    assert from_file.entrypoints == frozenset({"gateway", "shop:GET /"})
    assert (from_file.min_confidence, from_file.settle_s, from_file.context_s) == (0.9, 5, 30)
    assert from_file.default_skew_ms == AuditSettings.model_fields["default_skew_ms"].default
    request = AuditRequest.parse({"settings": from_file.to_dict(), "all": True})
    assert request.settings == from_file and not request.resume and request.save


@pytest.mark.parametrize(
    "body, message",
    [
        ({"since_ns": -1}, "since_ns"),
        ({"until_ns": 2**64}, "until_ns"),
        ({"since_ns": 1.5}, "since_ns"),
        ({"all": "yes"}, "all must be true or false"),
        ({"save": 1}, "save must be true or false"),
    ],
)
def test_audit_requests_are_strict(body, message):
    with pytest.raises(SettingsError, match=message):
        AuditRequest.parse(body)
