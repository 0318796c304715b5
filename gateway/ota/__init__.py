"""Firmware over the air: the registry of checked images, signed manifests, rollout campaigns.

``registry.py`` owns the images, ``campaigns.py`` decides who gets what and when,
``service.py`` composes them with the broker, ingest and the device registry.
Host-side image/manifest tools live in ``firmware/tools`` (shared with release pipelines).
"""

from gateway.ota.service import CampaignRequest, OtaError, OtaService, Target

__all__ = ["CampaignRequest", "OtaError", "OtaService", "Target"]
