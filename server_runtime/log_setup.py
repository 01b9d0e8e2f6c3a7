"""structlog configuration: one call per entry point, nothing at import time."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping

import structlog


def configure_logging(level: str = "info", json: bool | None = None, tier: str = "") -> None:
    """JSON lines for deployments, readable console output on a terminal (``json=None``: auto).

    Request ids are bound per request with ``structlog.contextvars.bound_contextvars``.
    """
    use_json = not sys.stderr.isatty() if json is None else json
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if tier:
        processors.append(_add_tier(tier))
    processors.append(structlog.processors.format_exc_info)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _quiet_libraries()


def _add_tier(tier: str) -> structlog.typing.Processor:
    def add(_: object, __: str, event: MutableMapping[str, object]) -> MutableMapping[str, object]:
        event.setdefault("tier", tier)
        return event

    return add


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
