"""Topic rules and the subscription index (fix: amqtt matches every message against every filter)."""

from __future__ import annotations

import random

import pytest

from gateway.broker.topics import (
    TopicTree,
    filter_covered,
    topic_matches,
    valid_topic_filter,
    valid_topic_name,
)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("+/+", "/x", True),
        ("a//b", "a//b", True),
        ("a/+/c", "a//c", True),
    ],
)
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected
    tree: TopicTree[str] = TopicTree()
    tree.add(flt, "s", 1)
    assert (tree.match(topic) is not None) is expected


def test_validation() -> None:
    assert valid_topic_name("devices/n1/telemetry")
    for bad in ("", "a/+", "a/#", "a\x00b"):
        assert not valid_topic_name(bad)
    for good in ("#", "+", "a/+/b", "a/#", "+/+/#"):
        assert valid_topic_filter(good)
    for bad in ("", "a#", "a/#/b", "a+/b", "##"):
        assert not valid_topic_filter(bad)


@pytest.mark.parametrize(
    ("requested", "allowed", "covered"),
    [
        ("devices/n1/command", "devices/n1/#", True),
        ("devices/n1/#", "devices/n1/#", True),
        ("devices/n1", "devices/n1/#", True),
        ("devices/n1/+/x", "devices/n1/#", True),
        ("devices/+/command", "devices/n1/#", False),
        ("devices/#", "devices/n1/#", False),
        ("#", "devices/n1/#", False),
        ("devices/+/command", "devices/+/command", True),
        ("devices/n1/command", "devices/+/command", True),
        ("devices/#", "devices/+/command", False),
        ("$SYS/#", "#", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_coverage(requested: str, allowed: str, covered: bool) -> None:
    assert filter_covered(requested, allowed) is covered


def test_index_agrees_with_brute_force() -> None:
    rnd = random.Random(7)
    words = ["a", "b", "c", "", "$SYS"]

    def rand_topic() -> str:
        return "/".join(rnd.choice(words[:4]) if i else rnd.choice(words) for i in range(rnd.randint(1, 4)))

    def rand_filter() -> str:
        levels = [rnd.choice([*words[:4], "+", "+"]) for _ in range(rnd.randint(1, 4))]
        if rnd.random() < 0.3:
            levels[-1] = "#"
        return "/".join(levels)

    tree: TopicTree[int] = TopicTree()
    subs: dict[tuple[str, int], int] = {}
    for i in range(400):
        f, key, qos = rand_filter(), i % 50, rnd.randint(0, 1)
        tree.add(f, key, qos)
        subs[(f, key)] = qos
    # remove a third again: pruning must keep the rest intact
    for f, key in list(subs)[::3]:
        assert tree.remove(f, key)
        del subs[(f, key)]
    assert len(tree) == len(subs)
    for _ in range(2000):
        topic = rand_topic()
        expected: dict[int, int] = {}
        for (f, key), qos in subs.items():
            if topic_matches(f, topic):
                expected[key] = max(expected.get(key, 0), qos)
        assert (tree.match(topic) or {}) == expected, topic
    assert sorted((f, k) for f, k, _ in tree.filters()) == sorted(subs)
