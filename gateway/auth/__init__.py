"""Who may use the gateway's web UI and API: users, sessions, tokens, first-start setup.

``service.AuthService`` bundles the stores for the web layer; ``setup.ensure_first_admin``
runs once at start. Permission decisions live in ``gateway.web.permissions``.
"""
