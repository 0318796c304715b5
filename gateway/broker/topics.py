"""MQTT topic names and filters: validation, matching, ACL coverage and the subscription index.

Everything here is pure and synchronous so the hot path (one inbound PUBLISH) never awaits
for a topic decision. Rules are MQTT 3.1.1 section 4.7.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

MAX_TOPIC_BYTES = 65535


def valid_topic_name(topic: str) -> bool:
    """A topic a PUBLISH may carry: non-empty, no wildcards, no NUL [MQTT-4.7.3-1/2, 3.3.2-2]."""
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """A filter a SUBSCRIBE may carry: ``+`` fills a whole level, ``#`` only as the last level."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` (a name, no wildcards) matches ``topic_filter``.

    Filters starting with a wildcard do not match ``$``-topics [MQTT-4.7.2-1].
    """
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def filter_covered(requested: str, allowed: str) -> bool:
    """Whether every topic ``requested`` can match is also matched by ``allowed``.

    Used for subscribe ACLs: a client allowed ``devices/n1/#`` may subscribe to
    ``devices/n1/command`` or ``devices/n1/+/x`` but not to ``devices/+/command``.
    """
    r_levels = requested.split("/")
    a_levels = allowed.split("/")
    if requested.startswith("$") and a_levels[0] in ("+", "#"):
        return False
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return False
        if a == "+":
            continue
        if r != a:  # a literal level covers only the same literal, never '+'
            return False
    return len(r_levels) == len(a_levels)


def any_matches(filters: Iterable[str], topic: str) -> bool:
    return any(topic_matches(f, topic) for f in filters)


def any_covers(filters: Iterable[str], requested: str) -> bool:
    return any(filter_covered(requested, f) for f in filters)


class _Node(Generic[K]):
    __slots__ = ("children", "hash_subs", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        # subscribers whose filter ends at this node
        self.subs: dict[K, int] = {}
        # subscribers whose filter is this node's path followed by '#'
        self.hash_subs: dict[K, int] = {}


class TopicTree(Generic[K]):
    """Subscription index keyed by filter level.

    Matching a topic costs one dict lookup per level (plus the ``+`` branches that exist),
    independent of how many subscriptions there are: amqtt 0.12.1 tests every message
    against every subscription. Keys are whatever identifies a subscriber (a session);
    a key subscribed through several overlapping filters is returned once, with the
    highest QoS of those filters (MQTT 3.1.1 section 3.3.5 allows this).
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, key: K, qos: int) -> bool:
        """Add or update; returns True when the (filter, key) pair is new."""
        node = self._root
        levels = topic_filter.split("/")
        hash_last = levels[-1] == "#"
        if hash_last:
            levels = levels[:-1]
        for level in levels:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        table = node.hash_subs if hash_last else node.subs
        new = key not in table
        table[key] = qos
        if new:
            self._count += 1
        return new

    def remove(self, topic_filter: str, key: K) -> bool:
        levels = topic_filter.split("/")
        hash_last = levels[-1] == "#"
        if hash_last:
            levels = levels[:-1]
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        table = node.hash_subs if hash_last else node.subs
        if table.pop(key, None) is None:
            return False
        self._count -= 1
        # prune empty branches so a churn of device ids does not leave a growing skeleton
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.subs or child.hash_subs:
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> dict[K, int] | None:
        """Subscribers of ``topic`` with their (highest) subscription QoS; None if nobody."""
        if not self._count:
            return None
        out: dict[K, int] = {}
        levels = topic.split("/")
        self._walk(self._root, levels, 0, topic.startswith("$"), out)
        return out or None

    def _walk(self, node: _Node[K], levels: list[str], i: int, dollar: bool, out: dict[K, int]) -> None:
        wildcard_ok = not (dollar and i == 0)
        if node.hash_subs and wildcard_ok:
            _merge(out, node.hash_subs)
        if i == len(levels):
            if node.subs:
                _merge(out, node.subs)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, dollar, out)
        if wildcard_ok:
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, dollar, out)

    def filters(self) -> Iterator[tuple[str, K, int]]:
        """Every (filter, key, qos); for diagnostics and tests, not the hot path."""
        stack: list[tuple[_Node[K], list[str]]] = [(self._root, [])]
        while stack:
            node, path = stack.pop()
            for key, qos in node.subs.items():
                yield "/".join(path), key, qos
            for key, qos in node.hash_subs.items():
                yield "/".join([*path, "#"]), key, qos
            for level, child in node.children.items():
                stack.append((child, [*path, level]))


def _merge(out: dict[K, int], table: dict[K, int]) -> None:
    for key, qos in table.items():
        prev = out.get(key)
        if prev is None or qos > prev:
            out[key] = qos
