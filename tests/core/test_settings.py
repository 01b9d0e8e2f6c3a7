"""core.settings: strict on/off values, environment defaults, refusals, argv round trips."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from core.settings import Group, Setting, add_settings, env_var, parse_bool, port, to_argv

GROUP = Group(
    "example",
    (
        Setting("--num-blocks", type=int, default=2048),
        Setting("--ratio", type=float),
        Setting("--name", default="auto", choices=["auto", "json"]),
        Setting("--key-file", type=Path),
        Setting("--no-prefix-caching", switch=True),
        Setting("--prefill", repeat=True),
        Setting("--goodput", nargs="+", split=" ", default=()),
        Setting("--port", type=port, default=0, env="EXAMPLE_PORT"),
    ),
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="example")
    add_settings(parser, GROUP)
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in GROUP:
        monkeypatch.delenv(setting.env_var, raising=False)


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_true_words(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "NO", "off"])
def test_false_words(text: str) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["", "2", "maybe", "enabled", "t"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="on/off"):
        parse_bool(text)


def test_env_var_names() -> None:
    assert env_var("--no-kv-checksum") == "PDSERVE_NO_KV_CHECKSUM"
    assert GROUP.settings[-1].env_var == "EXAMPLE_PORT"


def test_defaults_without_environment() -> None:
    args = _parse([])
    assert (args.num_blocks, args.ratio, args.name, args.key_file) == (2048, None, "auto", None)
    assert args.no_prefix_caching is False
    assert args.prefill == [] and args.goodput == [] and args.port == 0


def test_environment_sets_the_default_parsed_by_the_flags_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PDSERVE_NUM_BLOCKS", "12")
    monkeypatch.setenv("PDSERVE_KEY_FILE", "/run/key")
    monkeypatch.setenv("PDSERVE_NO_PREFIX_CACHING", "yes")
    monkeypatch.setenv("PDSERVE_PREFILL", "a:1, b:2")
    monkeypatch.setenv("PDSERVE_GOODPUT", "ttft:5 tpot:1")
    monkeypatch.setenv("EXAMPLE_PORT", "8080")
    args = _parse([])
    assert args.num_blocks == 12 and args.key_file == Path("/run/key")
    assert args.no_prefix_caching is True
    assert args.prefill == ["a:1", "b:2"] and args.goodput == ["ttft:5", "tpot:1"]
    assert args.port == 8080


def test_the_command_line_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_NUM_BLOCKS", "12")
    monkeypatch.setenv("PDSERVE_PREFILL", "a:1")
    args = _parse(["--num-blocks", "3", "--prefill", "c:3", "--prefill", "d:4"])
    assert args.num_blocks == 3 and args.prefill == ["c:3", "d:4"]


def test_off_in_the_environment_leaves_a_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_NO_PREFIX_CACHING", "false")
    assert _parse([]).no_prefix_caching is False
    assert _parse(["--no-prefix-caching"]).no_prefix_caching is True


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_NUM_BLOCKS", "")
    monkeypatch.setenv("PDSERVE_NO_PREFIX_CACHING", "")
    args = _parse([])
    assert args.num_blocks == 2048 and args.no_prefix_caching is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PDSERVE_NO_PREFIX_CACHING", "maybe"),
        ("PDSERVE_NUM_BLOCKS", "many"),
        ("PDSERVE_NAME", "yaml"),
        ("EXAMPLE_PORT", "70000"),
    ],
)
def test_a_bad_variable_is_an_argparse_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        _parse([])
    assert exited.value.code == 2
    assert f"{variable}={value!r}" in capsys.readouterr().err


def test_a_bad_variable_is_not_read_when_the_flag_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PDSERVE_NUM_BLOCKS", "many")
    assert _parse(["--num-blocks", "5"]).num_blocks == 5


def test_to_argv_round_trip() -> None:
    argv = [
        "--num-blocks=7",
        "--ratio=0.25",
        "--name=json",
        "--key-file=/k",
        "--no-prefix-caching",
        "--prefill=a",
        "--prefill=b",
        "--goodput",
        "ttft:1",
        "e2el:2",
        "--port=9",
    ]
    args = _parse(argv)
    again = _parse(to_argv(GROUP, args))
    assert vars(again) == vars(args)
    assert to_argv(GROUP, _parse([])) == ["--num-blocks", "2048", "--name", "auto", "--port", "0"]


def test_to_argv_overrides_and_mappings() -> None:
    args = _parse(["--num-blocks", "7", "--no-prefix-caching"])
    argv = to_argv(GROUP, args, {"num_blocks": 9, "no_prefix_caching": False})
    assert argv[:2] == ["--num-blocks", "9"] and "--no-prefix-caching" not in argv
    assert to_argv(GROUP, {"prefill": ["x", "y"]}) == ["--prefill", "x", "--prefill", "y"]


def test_group_defaults_per_command() -> None:
    group = GROUP.with_defaults(num_blocks=5)
    assert group.settings[0].default == 5 and GROUP.settings[0].default == 2048
    with pytest.raises(KeyError):
        GROUP.with_defaults(no_such=1)
    assert [s.dest for s in GROUP.without("ratio", "name")][:2] == ["num_blocks", "key_file"]
