"""Siteward gateway daemon: broker, ingest, store, devices, web, simulator.

Data flows one way: source (broker / HTTP / BLE / simulator) → ingest (validate) →
store (durable) → live bus → web and rules. ``gateway.app`` composes the rooms.
"""

import sys

__version__ = "0.1.0"


def _import_structlog_without_rich() -> None:
    """Import structlog before anything else does, with ``rich`` hidden from it.

    ``structlog.dev`` imports ``rich.console``, ``rich.traceback`` and ``rich.pretty`` (and
    through them pygments) whenever rich is installed, only to offer pretty tracebacks.
    Siteward renders exceptions as plain text (``format_exc_info``, gateway.logs), yet each
    process paid ~5.5 MB of RSS for them; rich is installed wherever esptool's
    dependencies are. Hidden, structlog falls back to its plain-text formatter, which is
    what Siteward's logs contain anyway. rich stays importable afterwards for whoever
    really uses it (esptool runs as its own program).
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # too late (or rich is in use already): nothing to save
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` raise ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


# every Siteward process imports gateway (cloud_sync's package imports it for this) before
# structlog: the package is the one place that runs first
_import_structlog_without_rich()
