"""Which devices a rule or schedule is about: one device, a group/tag, all of a kind or profile.

Groups are named device lists (``[rules.groups]`` in the config file, or made through the
API); a device can also carry tags (``Device.tags``: those a technician set, in
``attributes["tags"]``, and those the node reports, in ``attributes["node_tags"]``).
Membership is read from the device registry's memory, never from the store.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.devices.registry import DeviceRegistry
from gateway.rules.models import Target


class Targets:
    def __init__(self, registry: DeviceRegistry) -> None:
        self._registry = registry
        self._config_groups: dict[str, frozenset[str]] = {}
        self._api_groups: dict[str, frozenset[str]] = {}
        self.groups: dict[str, frozenset[str]] = {}

    def set_groups(self, config: Mapping[str, list[str]], api: Mapping[str, list[str]]) -> None:
        self._config_groups = {k: frozenset(v) for k, v in config.items()}
        self._api_groups = {k: frozenset(v) for k, v in api.items()}
        # a group of the config file cannot be changed through the API (see service), so
        # the two never share a name; config wins should a stored one ever collide
        self.groups = {**self._api_groups, **self._config_groups}

    def is_config_group(self, name: str) -> bool:
        return name in self._config_groups

    def matches(self, target: Target, device_id: str) -> bool:
        if target.device is not None:
            return device_id == target.device
        dev = self._registry.get_cached(device_id)
        return target.matches(device_id, dev.kind if dev else None, dev.profile if dev else None,
                              dev.tags if dev else frozenset(), self.groups)

    async def members(self, target: Target) -> list[str]:
        """Device ids the target names now (a device or group member even before it has been seen)."""
        if target.device is not None:
            return [target.device]
        found = [d.id for d in await self._registry.list_devices()
                 if target.matches(d.id, d.kind, d.profile, d.tags, self.groups)]
        if target.tag is not None:
            # a group names its devices: those not seen yet count too (a command to one is
            # refused and recorded as such, rather than silently skipped)
            found += sorted(self.groups.get(target.tag, frozenset()) - set(found))
        return found
