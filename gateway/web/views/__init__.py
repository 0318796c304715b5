"""One module per page family; each exposes ``routes`` (an aiohttp RouteTableDef).

``gateway.web.app.VIEWS`` lists them; a new family (BLE, sync, rules, OTA) is a new
module here plus its line there and its actions in ``gateway.web.permissions``.
"""
