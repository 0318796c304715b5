"""structlog set-up: JSON lines when not on a terminal (journald), readable otherwise."""

from __future__ import annotations

import logging
import sys
import time

import structlog

from gateway.settings import LoggingSection


def configure_logging(cfg: LoggingSection) -> None:
    level = getattr(logging, cfg.level.upper())
    as_json = cfg.format == "json" or (cfg.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # libraries log through stdlib logging; route it to the same stream and quieten
    # the chatty ones (amqtt logs per packet at INFO).
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for name in ("amqtt", "transitions", "aiosqlite", "aiohttp.access"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


class BurstLogger:
    """Log a problem once per burst instead of once per message.

    The first occurrence of a key is logged at once; further ones within ``window_s``
    are only counted and summarised in the next line for that key.
    """

    def __init__(self, logger: structlog.typing.FilteringBoundLogger, window_s: float = 10.0) -> None:
        self._log = logger
        self._window = window_s
        self._state: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, event: str, **kw: object) -> None:
        now = time.monotonic()
        last, suppressed = self._state.get(key, (0.0, 0))
        if now - last < self._window:
            self._state[key] = (last, suppressed + 1)
            return
        if len(self._state) > 10_000:  # keys come from network input: keep bounded
            self._state.clear()
        self._state[key] = (now, 0)
        if suppressed:
            kw["suppressed_since_last"] = suppressed
        self._log.warning(event, **kw)
