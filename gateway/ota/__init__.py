"""Firmware over the air: the registry of checked images, signed manifests, rollout campaigns.

``registry.py`` owns the images, ``campaigns.py`` decides who gets what and when,
``service.py`` composes them with the broker, ingest and the device registry.
Host-side image/manifest tools live in ``firmware/tools`` (shared with release pipelines).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.ota.service import CampaignRequest, OtaError, OtaService, Target

__all__ = ["CampaignRequest", "OtaError", "OtaService", "Target"]


def __getattr__(name: str) -> Any:
    # The service is imported on first use of one of its names, not with the package:
    # `siteward sync` and `siteward device` import gateway.ota.nodecli (for the CLI parser)
    # and must not pay for the service, cryptography and the firmware tools (~14 MB RSS).
    if name in __all__:
        from gateway.ota import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
