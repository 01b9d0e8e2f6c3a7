"""Each setting that names its config field fills a real field of that config, with the same
default, so a flag and the dataclass it feeds cannot drift apart."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from core.settings import Group
from decode_service import settings as decode_settings
from decode_service.worker import DecodeConfig
from engine.config import CacheConfig, ModelConfig, SchedulerConfig
from engine.settings import ENGINE, MODEL
from gateway import settings as gateway_settings
from gateway.router import RoutingConfig
from gateway.server import AdmissionConfig, FleetConfig, GatewayConfig
from kvtransfer.config import TransferConfig
from kvtransfer.settings import TRANSFER
from prefill_service import settings as prefill_settings
from prefill_service.worker import PrefillConfig

CONFIGS: list[tuple[Group, str, type[Any]]] = [
    (MODEL, "", ModelConfig),
    (ENGINE, "cache", CacheConfig),
    (ENGINE, "scheduler", SchedulerConfig),
    (TRANSFER, "", TransferConfig),
    (gateway_settings.HTTP, "", GatewayConfig),
    (gateway_settings.ROUTING, "routing", RoutingConfig),
    (gateway_settings.ROUTING, "fleet", FleetConfig),
    (gateway_settings.ADMISSION, "admission", AdmissionConfig),
    (decode_settings.SERVER, "", DecodeConfig),
    (prefill_settings.SERVER, "", PrefillConfig),
]


@pytest.mark.parametrize(
    ("group", "part", "config"), CONFIGS, ids=lambda v: getattr(v, "__name__", None)
)
def test_settings_fill_real_fields_with_the_same_default(
    group: Group, part: str, config: type[Any]
) -> None:
    fields = {f.name: f for f in dataclasses.fields(config)}
    named = [s for s in group if s.field is not None and s.field.rpartition(".")[0] == part]
    assert named, f"no setting of {group.title!r} fills {config.__name__}"
    for setting in named:
        name = setting.field.rpartition(".")[2]  # type: ignore[union-attr]
        assert name in fields, (
            f"{setting.flag} names {config.__name__}.{name}, which does not exist"
        )
        default = fields[name].default
        assert default is not dataclasses.MISSING, f"{config.__name__}.{name} has no default"
        ours = bool(setting.default) if setting.switch else setting.default
        assert ours == default, (
            f"{setting.flag} defaults to {ours!r}, {config.__name__}.{name} to {default!r}"
        )


def test_every_group_with_fields_is_checked() -> None:
    groups = {id(g) for g, _, _ in CONFIGS}
    for module in (gateway_settings, decode_settings, prefill_settings):
        for group in vars(module).values():
            if isinstance(group, Group) and any(s.field for s in group):
                assert id(group) in groups, f"{module.__name__}: {group.title!r} is not checked"
