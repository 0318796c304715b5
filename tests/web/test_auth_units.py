"""The auth building blocks on their own, over a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from gateway.audit import REDACTED, Audit, scrub
from gateway.auth.errors import LastAdmin
from gateway.auth.passwords import Passwords
from gateway.auth.principal import AuthMethod, Principal, Role
from gateway.auth.ratelimit import LoginLimiter
from gateway.auth.setup import new_setup_code
from gateway.auth.users import UserStore
from gateway.metrics import Metrics
from gateway.store.database import Database
from gateway.web.render import format_value, render, tag
from gateway.web.views.session import safe_next


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "t.db", Metrics(), commit_interval_ms=1)
    await database.open()
    yield database
    await database.close()


def test_scrub_removes_secrets_at_any_depth() -> None:
    detail = {
        "user": "a",
        "password": "p",
        "nested": {"api_token": "t", "list": [{"new_password": "q"}]},
        "token_id": "keep",
        "Authorization": "Bearer x",
        "csrf": "c",
        "profiles": ["native"],
    }
    out = scrub(detail)
    assert out["user"] == "a" and out["token_id"] == "keep" and out["profiles"] == ["native"]
    assert out["password"] == out["nested"]["api_token"] == out["Authorization"] == out["csrf"] == REDACTED
    assert out["nested"]["list"][0]["new_password"] == REDACTED


async def test_audit_record_and_query(db: Database) -> None:
    audit = Audit(db)
    await audit.record("alice", "device.update", "n1", {"name": "x", "password": "never"})
    await audit.record("bob", "user.create", "carol", {"role": "viewer"})
    await audit.record("bob", "user_create", "dave", {})  # "_" must not match as a LIKE wildcard
    entries = await audit.query()
    assert [e.action for e in entries] == ["user_create", "user.create", "device.update"]
    assert entries[2].detail == {"name": "x", "password": REDACTED}
    assert [e.target for e in await audit.query(action="user.*")] == ["carol"]
    assert [e.target for e in await audit.query(actor="alice")] == ["n1"]
    assert await audit.query(since=entries[0].ts + 1) == []
    assert len(await audit.query(limit=1)) == 1
    raw = await db.fetchall("SELECT detail FROM audit")
    assert all("never" not in r[0] for r in raw)


async def test_weak_hash_is_upgraded_on_login(db: Database) -> None:
    cheap = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("old but fine")
    users = UserStore(db, Passwords())
    await users.create_with_hash("old", cheap, "viewer", actor="test")
    assert await users.authenticate("old", "wrong password") is None
    stored = (await db.fetchone("SELECT password_hash FROM users"))[0]
    assert stored == cheap  # no upgrade without the right password
    assert await users.authenticate("old", "old but fine") is not None
    upgraded = (await db.fetchone("SELECT password_hash FROM users"))[0]
    assert upgraded != cheap and not PasswordHasher().check_needs_rehash(upgraded)
    assert await users.authenticate("old", "old but fine") is not None


async def test_last_admin_guard_holds_under_concurrent_changes(db: Database) -> None:
    import asyncio

    h = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("whatever pw")
    users = UserStore(db, Passwords())
    await users.create_with_hash("a1", h, "admin", actor="t")
    await users.create_with_hash("a2", h, "admin", actor="t")
    results = await asyncio.gather(users.delete("a1", actor="t"), users.delete("a2", actor="t"), return_exceptions=True)
    assert sum(isinstance(r, LastAdmin) for r in results) == 1
    row = await db.fetchone("SELECT count(*) FROM users WHERE role = 'admin'")
    assert row[0] == 1


def test_limiter_locks_after_limit_and_unlocks_after_lockout() -> None:
    now = [1000.0]
    lim = LoginLimiter(3, clock=lambda: now[0])
    assert lim.failure("u", "1.1.1.1") is None
    assert lim.failure("u", "1.1.1.1") is None
    lock = lim.failure("u", "1.1.1.1")
    assert lock is not None and lock.scope == "user" and lock.failures == 3
    assert lim.retry_after("u", "1.1.1.1") == pytest.approx(60.0)
    assert lim.retry_after("U", "1.1.1.1") is not None  # names are case-insensitive
    assert lim.retry_after("u", "2.2.2.2") is None  # the same user elsewhere is not locked out
    now[0] += 61
    assert lim.retry_after("u", "1.1.1.1") is None


def test_limiter_window_slides_and_success_resets() -> None:
    now = [0.0]
    lim = LoginLimiter(3, clock=lambda: now[0])
    lim.failure("u", "a")
    lim.failure("u", "a")
    now[0] += 61  # both fall out of the window
    assert lim.failure("u", "a") is None
    lim.success("u", "a")
    lim.failure("u", "a")
    assert lim.failure("u", "a") is None


def test_limiter_per_address_across_names() -> None:
    lim = LoginLimiter(2, clock=lambda: 0.0)
    locks = [lim.failure(f"name{i}", "9.9.9.9") for i in range(8)]
    # every name stays under its own limit (1 failure each), the address does not
    assert [lk.scope for lk in locks if lk] == ["address"]
    assert lim.retry_after("fresh-name", "9.9.9.9") is not None
    assert lim.retry_after("fresh-name", "8.8.8.8") is None


def test_limiter_memory_is_bounded() -> None:
    lim = LoginLimiter(5, clock=lambda: 0.0)
    for i in range(25_000):
        lim.failure(f"n{i}", f"10.0.{i // 250}.{i % 250}")
    assert len(lim._states) <= 10_000


def test_setup_code_shape() -> None:
    codes = {new_setup_code() for _ in range(200)}
    assert len(codes) == 200
    for c in codes:
        assert len(c) == 14 and c[4] == c[9] == "-"
        assert not set(c.replace("-", "")) & set("01ILOU")


@pytest.mark.parametrize(
    "target, expected",
    [
        (None, "/"),
        ("/", "/"),
        ("/devices?x=1", "/devices?x=1"),
        ("//evil", "/"),
        ("https://evil", "/"),
        ("/\\evil", "/"),
        ("/login", "/"),
        ("/ok\r\nSet-Cookie: x", "/"),
        ("devices", "/"),
    ],
)
def test_safe_next(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_render_escapes_everything_not_marked_safe() -> None:
    assert tag("p", "<b>&", class_='x" onload="y') == '<p class="x&#34; onload=&#34;y">&lt;b&gt;&amp;</p>'
    who = Principal(username="<img src=x>", role=Role.VIEWER, method=AuthMethod.SESSION, csrf='"><script>')
    html = render("user_bar.html", principal=who, csrf=who.csrf)
    assert "<img" not in html and "<script>" not in html


@pytest.mark.parametrize(
    "value, shown", [(21.0, "21"), (21.456789, "21.457"), (-0.0001, "0"), (1e6, "1000000"), (0.1, "0.1")]
)
def test_format_value(value: float, shown: str) -> None:
    assert format_value(value) == shown
