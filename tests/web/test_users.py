"""User management through the API: admins only, last admin protected, all audited."""

from __future__ import annotations

from tests.web.conftest import ADMIN, Site


async def test_admin_creates_lists_updates_and_deletes_users(site: Site) -> None:
    admin = await site.admin()
    r = await admin.post("/api/v1/users", {"username": "Tech.One", "password": "a good password", "role": "technician"})
    assert r.status == 201 and r.json["username"] == "tech.one" and r.json["role"] == "technician"
    assert "password" not in r.text and "hash" not in r.text
    assert (
        await admin.post("/api/v1/users", {"username": "tech.one", "password": "a good password", "role": "viewer"})
    ).status == 409
    for bad in (
        {"username": "x", "password": "short", "role": "viewer"},
        {"username": "x", "password": "a good password", "role": "root"},
        {"username": "no spaces", "password": "a good password", "role": "viewer"},
        {"username": "x", "password": "a good password", "role": "viewer", "extra": 1},
    ):
        r = await admin.post("/api/v1/users", bad)
        assert r.status == 400, (bad, r)
    users = (await admin.get("/api/v1/users")).json["users"]
    assert [u["username"] for u in users] == ["admin", "tech.one"]
    assert "password_hash" not in users[0]
    r = await admin.call("PATCH", "/api/v1/users/tech.one", json_body={"role": "viewer"})
    assert r.status == 200 and r.json["role"] == "viewer"
    assert (await admin.get("/api/v1/users/tech.one")).json["role"] == "viewer"
    assert (await admin.get("/api/v1/users/nobody")).status == 404
    r = await admin.call("PATCH", "/api/v1/users/tech.one", json_body={"password": "reset by admin"})
    assert r.status == 200
    assert (await site.client().login("tech.one", "reset by admin")).status == 200
    assert (await admin.call("DELETE", "/api/v1/users/tech.one")).status == 204
    assert (await admin.call("DELETE", "/api/v1/users/tech.one")).status == 404
    trail = [(e["action"], e["target"]) for e in reversed(await site.audit("user.*"))]
    assert trail[1:] == [
        ("user.create", "tech.one"),
        ("user.update", "tech.one"),
        ("user.password", "tech.one"),
        ("user.delete", "tech.one"),
    ]
    assert "reset by admin" not in str(await site.audit()) and "a good password" not in str(await site.audit())


async def test_role_change_and_disable_take_effect_at_once(site: Site) -> None:
    admin = await site.admin()
    tech = await site.user("t1", "technician")
    assert (await tech.get("/api/v1/audit")).status == 200
    await admin.call("PATCH", "/api/v1/users/t1", json_body={"role": "viewer"})
    assert (await tech.get("/api/v1/audit")).status == 403
    assert (await tech.get("/api/v1/me")).json["role"] == "viewer"
    await admin.call("PATCH", "/api/v1/users/t1", json_body={"disabled": True})
    assert (await tech.get("/api/v1/me")).status == 401
    assert (await site.client().login("t1", "another fine password")).status == 401
    await admin.call("PATCH", "/api/v1/users/t1", json_body={"disabled": False})
    # disabling ended the old sessions for good; logging in again works
    assert (await tech.get("/api/v1/me")).status == 401
    assert (await site.client().login("t1", "another fine password")).status == 200


async def test_the_last_admin_cannot_be_removed_demoted_or_disabled(site: Site) -> None:
    admin = await site.admin()
    for verb, body in (("DELETE", None), ("PATCH", {"role": "technician"}), ("PATCH", {"disabled": True})):
        r = await admin.call(verb, f"/api/v1/users/{ADMIN}", json_body=body)
        assert r.status == 409 and r.json["error"] == "last_admin", (verb, body)
    await admin.post("/api/v1/users", {"username": "second", "password": "second admin pw", "role": "admin"})
    r = await admin.call("PATCH", f"/api/v1/users/{ADMIN}", json_body={"role": "technician"})
    assert r.status == 200
    # now "second" is the last admin
    second = site.client()
    await second.login("second", "second admin pw")
    assert (await second.call("DELETE", "/api/v1/users/second")).status == 409


async def test_audit_trail_is_filterable_and_pages(site: Site) -> None:
    admin = await site.admin()
    for i in range(5):
        await admin.post("/api/v1/users", {"username": f"u{i}", "password": "a good password", "role": "viewer"})
    r = await admin.get("/api/v1/audit?action=user.create&limit=3")
    body = r.json
    assert [e["target"] for e in body["entries"]] == ["u4", "u3", "u2"]
    more = (await admin.get(f"/api/v1/audit?action=user.create&before_id={body['next_before_id']}")).json
    assert [e["target"] for e in more["entries"]] == ["u1", "u0", "admin"]
    assert all(e["actor"] == "admin" for e in (await admin.get("/api/v1/audit?actor=admin")).json["entries"])
    assert (await admin.get("/api/v1/audit?action=user.*&target=u1")).json["entries"][0]["target"] == "u1"
    assert (await admin.get("/api/v1/audit?limit=0")).status == 400
    assert (await admin.get("/api/v1/audit?since=2020-01-01T00:00:00Z")).status == 200


async def test_a_weak_password_in_a_patch_changes_nothing(site: Site) -> None:
    admin = await site.admin()
    await admin.post("/api/v1/users", {"username": "w", "password": "a good password", "role": "viewer"})
    r = await admin.call("PATCH", "/api/v1/users/w", json_body={"role": "technician", "password": "short"})
    assert r.status == 400
    assert (await admin.get("/api/v1/users/w")).json["role"] == "viewer"
