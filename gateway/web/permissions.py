"""Who may do what: the one place that decides.

Every route declares the action it performs (``gateway.web.access.requires``) and the
auth middleware asks :func:`authorise` before the handler runs; a route that declares
nothing is refused. Handlers that need a finer decision (an admin acting on someone
else's token) call :func:`authorise` again with the finer action. New page families
(BLE, sync, rules, OTA) add their actions here and nowhere else.

Roles: a viewer looks at everything and changes nothing on the site; a technician
runs the site (devices, commands, HTTP ingest, audit); an admin also manages users.
"""

from __future__ import annotations

import structlog

from gateway.auth.principal import AuthMethod, Principal, Role

log = structlog.get_logger(__name__)

# action -> what it covers (also the list /api/v1/me reports and docs/api.md describes)
ACTIONS: dict[str, str] = {
    "session.self": "see who one is, log out",
    "account.password": "change one's own password (interactive session only)",
    "devices.read": "list devices, their latest values and reading history",
    "commands.read": "see commands sent to devices and their state",
    "live.read": "subscribe to the live feed",
    "devices.write": "rename, locate, adopt, ignore, remove devices; mint and revoke device credentials",
    "commands.send": "send commands to devices",
    "ingest.write": "post readings over HTTP",
    "audit.read": "read the audit trail",
    "tokens.own": "create, list and revoke one's own API tokens",
    "users.admin": "manage users and everyone's API tokens",
    "ota.read": "list firmware and rollout campaigns, their nodes and history",
    "ota.write": "upload and block firmware; create, pause, resume and abort rollout campaigns",
    "ota.flash": "flash and provision nodes over the gateway's USB serial ports",
    "sync.read": "see the cloud uplink: connected, backlog, drops, duplicates",
    "metrics.read": "scrape /metrics (when web.metrics_public is false)",
    "rules.read": "see alert rules, alerts and their history, schedules, groups and automation results",
    "rules.write": "create, change and delete alert rules, schedules and groups; override schedules",
    "alerts.ack": "acknowledge alerts",
}

_VIEWER = frozenset({"session.self", "account.password", "devices.read", "commands.read", "live.read",
                     "ota.read", "sync.read", "rules.read", "metrics.read"})
_TECHNICIAN = _VIEWER | {"devices.write", "commands.send", "ingest.write", "audit.read", "tokens.own",
                         "ota.write", "ota.flash", "rules.write", "alerts.ack"}
_ADMIN = _TECHNICIAN | {"users.admin"}

ROLE_ACTIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: _VIEWER,
    Role.TECHNICIAN: _TECHNICIAN,
    Role.ADMIN: _ADMIN,
}

# A leaked script token must not be enough to take the account over.
_SESSION_ONLY = frozenset({"account.password"})

assert set().union(*ROLE_ACTIONS.values()) <= set(ACTIONS), "every granted action is declared"


def authorise(principal: Principal | None, action: str) -> bool:
    """True if ``principal`` may perform ``action``. Unknown actions are refused."""
    if principal is None:
        return False
    if action not in ACTIONS:
        log.error("web.unknown_action", action=action)
        return False
    if principal.method is AuthMethod.DEVICE:
        # a device's own secret: posting its readings and nothing else
        return action == "ingest.write"
    if action in _SESSION_ONLY and principal.method is not AuthMethod.SESSION:
        return False
    return action in ROLE_ACTIONS.get(principal.role, frozenset())


def allowed_actions(principal: Principal) -> list[str]:
    return sorted(a for a in ACTIONS if authorise(principal, a))
