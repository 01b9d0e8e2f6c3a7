"""Settings declared once: a command-line flag, its ``PDSERVE_<FLAG>`` environment twin, and the
argv that gives a child process the same value.

A tier declares its settings as :class:`Setting` values grouped in a :class:`Group`;
:func:`add_settings` puts them on an argparse parser (a variable that is set becomes the flag's
default, parsed as the flag's own values are; a flag on the command line wins), and
:func:`to_argv` writes parsed values back as a command line. On/off flags (``switch``) read
their variable strictly: ``1/0 true/false yes/no on/off`` (any case); anything else is refused
with an argparse error (exit status 2) naming the variable and its value. An empty variable
counts as unset.

Standard library only; no torch, no other pdserve package.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

ENV_PREFIX = "PDSERVE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool:
    """``1/0 true/false yes/no on/off`` in any case; anything else is a ``ValueError``."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not on/off (use 1/0, true/false, yes/no or on/off)")


def port(text: str) -> int:
    """A TCP port, 0 (ephemeral) to 65535."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is outside 0-65535")
    return number


def env_var(flag: str) -> str:
    """``--no-kv-checksum`` -> ``PDSERVE_NO_KV_CHECKSUM``."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


def env_value(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty (the one environment helper)."""
    value = os.environ.get(name)
    return value if value is not None and value.strip() else None


@dataclass(frozen=True)
class Setting:
    """One flag of a pdserve command: argparse's view of it, and its environment twin."""

    flag: str
    """The long option, e.g. ``--num-blocks``; the parsed value's name is ``num_blocks``."""
    type: Callable[[str], Any] = str
    """Parses one value (of the flag or of its variable); unused for switches."""
    default: Any = None
    help: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    switch: bool = False
    """An on/off flag: present means True; its variable is read with :func:`parse_bool`."""
    repeat: bool = False
    """May be given several times (a list); its variable holds the items, ``split``-separated."""
    nargs: str | None = None
    """``"+"``: one flag followed by several values (a list), like ``--goodput a b``."""
    split: str = ","
    env: str | None = None
    """The environment variable; ``PDSERVE_<FLAG>`` unless given."""
    format: Callable[[Any], str] | None = None
    """Writes one value back for :func:`to_argv` (``str``, an enum's value, by default)."""
    field: str | None = None
    """The config dataclass field this setting fills, as ``name`` or ``part.name`` for a
    nested config (:meth:`Group.fields`); None: the builder derives it by hand (a unit
    conversion, an enum of a torch-side module, a file, a secret)."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env_var(self) -> str:
        return self.env or env_var(self.flag)

    @property
    def many(self) -> bool:
        return self.repeat or self.nargs is not None

    def with_default(self, default: Any) -> Setting:
        return replace(self, default=default)

    def parse(self, text: str) -> Any:
        """One value from text, as the command line's would be (a switch's: on/off)."""
        value = parse_bool(text) if self.switch else self.type(text)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, self.choices))}")
        return value

    def parse_env(self, text: str) -> Any:
        """The variable's value: a list of items for a list setting."""
        if not self.many:
            return self.parse(text)
        return [self.parse(item.strip()) for item in text.split(self.split) if item.strip()]

    def argv(self, value: Any) -> list[str]:
        """The command-line arguments that give ``value`` back (none for None, off, empty)."""
        if value is None:
            return []
        if self.switch:
            return [self.flag] if value else []
        text = self.format or _text
        if self.repeat:
            return [arg for item in value for arg in (self.flag, text(item))]
        if self.nargs is not None:
            return [self.flag, *map(text, value)] if value else []
        return [self.flag, text(value)]


def _text(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


@dataclass(frozen=True)
class Group:
    """Settings shown together under ``title`` in ``--help``."""

    title: str | None
    settings: tuple[Setting, ...]

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.settings)

    def with_defaults(self, **defaults: Any) -> Group:
        """The same settings, some (by parsed name) with another default."""
        unknown = defaults.keys() - {s.dest for s in self.settings}
        if unknown:
            raise KeyError(f"no such settings: {sorted(unknown)}")
        settings = (s.with_default(defaults.get(s.dest, s.default)) for s in self.settings)
        return Group(self.title, tuple(settings))

    def fields(
        self, args: argparse.Namespace | Mapping[str, Any], part: str = ""
    ) -> dict[str, Any]:
        """``{field: parsed value}`` of the settings whose ``field`` is in ``part`` (``""``: the
        undotted ones), so a config is built as ``Config(**group.fields(args, part), ...)``."""
        found = args if isinstance(args, Mapping) else vars(args)
        picked = {}
        for s in self.settings:
            if s.field is None:
                continue
            owner, _, name = s.field.rpartition(".")
            if owner == part:
                picked[name] = found[s.dest]
        return picked

    def without(self, *dests: str) -> Group:
        return Group(self.title, tuple(s for s in self.settings if s.dest not in dests))


class _EnvText(str):
    """A default that came from the environment (argparse parses string defaults with the
    flag's type, so the variable is parsed, and its errors reported, like a flag's value)."""


class _Parse:
    """argparse's ``type``: the setting's parser, with errors that name the variable."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.__name__ = getattr(setting.type, "__name__", "value")

    def __call__(self, text: str) -> Any:
        if not isinstance(text, _EnvText):
            return self.setting.type(text)
        try:
            return self.setting.parse_env(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(
                f"{self.setting.env_var}={str(text)!r}: {exc}"
            ) from None


class _Switch(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, True)


class _Append(argparse.Action):
    """``append`` whose first use on the command line replaces the default (the variable's)."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = current if isinstance(current, list) and current is not self.default else []
        setattr(namespace, self.dest, [*items, values])


def _argparse_kwargs(setting: Setting) -> dict[str, Any]:
    raw = env_value(setting.env_var)
    default = setting.default
    if setting.many and raw is None:
        default = list(default or ())  # a fresh list for each parser
    help_text = setting.help
    if help_text is not argparse.SUPPRESS:
        help_text = f"{help_text + ' ' if help_text else ''}[env {setting.env_var}]"
    kwargs: dict[str, Any] = {
        "dest": setting.dest,
        "default": default if raw is None else _EnvText(raw),
        "type": _Parse(setting),
        "help": help_text,
    }
    if setting.switch:
        kwargs["action"] = _Switch
        if raw is None:
            kwargs["default"] = bool(setting.default)
        return kwargs
    kwargs.update(choices=setting.choices, metavar=setting.metavar)
    if setting.repeat:
        kwargs["action"] = _Append
    elif setting.nargs is not None:
        kwargs["nargs"] = setting.nargs
    return kwargs


def add_settings(parser: argparse.ArgumentParser, *groups: Iterable[Setting]) -> None:
    """Each group's settings as flags of ``parser`` (under the group's title, if it has one)."""
    for group in groups:
        title = group.title if isinstance(group, Group) else None
        target: Any = parser.add_argument_group(title) if title else parser
        for setting in group:
            target.add_argument(setting.flag, **_argparse_kwargs(setting))


def to_argv(
    settings: Iterable[Setting],
    values: argparse.Namespace | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> list[str]:
    """The arguments that give a child the same values: ``values`` (parsed names), with
    ``overrides`` (parsed names too) in their place. A value that is None, off or empty is
    left out, so the child takes its default from its own flags and environment."""
    found = values if isinstance(values, Mapping) else vars(values)
    overrides = overrides or {}
    argv: list[str] = []
    for s in settings:
        argv += s.argv(overrides[s.dest] if s.dest in overrides else found.get(s.dest))
    return argv


def env_vars(*groups: Iterable[Setting]) -> set[str]:
    """The environment variables of these settings."""
    return {s.env_var for group in groups for s in group}
