"""Every flag of every ``pdserve`` command has its ``PDSERVE_<FLAG>`` twin, and it works: the
variable changes the parsed value (on/off flags: ``true`` sets, ``false`` leaves unset; a bad
on/off value is refused with exit status 2 and a message naming the variable)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from core.settings import Setting
from pdserve.cli import build_parser

REQUIRED = {"generate": ["a prompt"]}  # positionals
CANDIDATES = ("3", "7", "2.5", "/tmp/pdserve-sample", "127.0.0.1:7")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags() -> Iterator[tuple[str, str]]:
    for command, sub in _subparsers().items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield command, action.option_strings[0]


FLAGS = sorted(_flags())


@pytest.fixture(autouse=True)
def _no_pdserve_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PDSERVE_"):
            monkeypatch.delenv(name)


def _setting(command: str, flag: str) -> Setting:
    action = next(a for a in _subparsers()[command]._actions if flag in a.option_strings)
    setting = getattr(action.type, "setting", None)
    assert isinstance(setting, Setting), f"pdserve {command} {flag} is not declared as a Setting"
    return setting


def _parse(command: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *REQUIRED.get(command, [])])


def _sample(setting: Setting, default: Any) -> str:
    """A value of the setting's variable that parses to something other than the default."""
    if setting.choices is not None:
        return next(str(c) for c in setting.choices if c != default)
    for text in CANDIDATES:
        try:
            value = setting.parse_env(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
        if value != default:
            return text
    raise AssertionError(f"no sample value for {setting.flag}")


def test_every_command_has_flags() -> None:
    commands = {command for command, _ in FLAGS}
    assert commands == {"up", "gateway", "prefill", "decode", "generate", "bench"}
    assert len(FLAGS) > 150


@pytest.mark.parametrize(("command", "flag"), FLAGS)
def test_the_environment_twin_changes_the_parsed_value(
    command: str, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setting = _setting(command, flag)
    assert setting.env_var == "PDSERVE_" + flag[2:].upper().replace("-", "_")
    before = getattr(_parse(command), setting.dest)
    if setting.switch:
        monkeypatch.setenv(setting.env_var, "false")
        assert getattr(_parse(command), setting.dest) is False
        monkeypatch.setenv(setting.env_var, "true")
        assert getattr(_parse(command), setting.dest) is True
        return
    sample = _sample(setting, before)
    monkeypatch.setenv(setting.env_var, sample)
    after = getattr(_parse(command), setting.dest)
    assert after != before and after == setting.parse_env(sample), (flag, sample, after)


SWITCHES = [(c, f) for c, f in FLAGS if _setting(c, f).switch]


def test_the_known_on_off_flags_are_switches() -> None:
    names = {f for _, f in SWITCHES}
    assert {
        "--no-prefix-caching",
        "--kv-insecure",
        "--no-kv-checksum",
        "--keep-going",
        "--pin-cpus",
        "--tls-require-client-cert",
        "--chat",
        "--tls",
    } <= names


@pytest.mark.parametrize(("command", "flag"), SWITCHES)
def test_a_bad_on_off_value_is_refused_naming_the_variable(
    command: str, flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    setting = _setting(command, flag)
    monkeypatch.setenv(setting.env_var, "maybe")
    with pytest.raises(SystemExit) as exited:
        _parse(command)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{setting.env_var}='maybe'" in err and "Traceback" not in err


def test_a_refusal_from_the_real_command_is_exit_status_2() -> None:
    env = {**os.environ, "PDSERVE_TLS_REQUIRE_CLIENT_CERT": "sure"}
    done = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "PDSERVE_TLS_REQUIRE_CLIENT_CERT='sure'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["up", "gateway", "prefill", "decode", "generate", "bench"])
def test_help_works(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    assert "PDSERVE_" in capsys.readouterr().out


def test_the_cli_module_imports_no_torch() -> None:
    code = "import sys, pdserve.cli; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
