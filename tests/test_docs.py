"""Every command, option and setting is documented (docs/cli.md), or this fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.cli import main
from audit.settings import AuditSettings

CLI_DOC = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_and_option_is_in_cli_md(command):
    assert f"ctxaudit {command}" in CLI_DOC
    for param in main.commands[command].params:
        for flag in getattr(param, "opts", []):
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in CLI_DOC or f"{flag} " in CLI_DOC, (
                    f"{command} {flag} is not in docs/cli.md"
                )


@pytest.mark.parametrize("name", sorted(AuditSettings.model_fields))
def test_every_audit_setting_is_in_cli_md(name):
    assert f"`{name}`" in CLI_DOC or f"{name}:" in CLI_DOC, f"the setting {name} is not in docs/cli.md"
