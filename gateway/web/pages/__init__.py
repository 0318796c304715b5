"""The technician UI: one module per page family, each a ``routes`` table of HTML pages.

Pages are rendered complete on the server from ``templates/`` (readable before any
script runs, and fast to first paint on a phone); small scripts under ``static/js/``
then keep them current over the live feed and send changes through the JSON API with
the session's CSRF token. docs/ui.md explains the choice.
"""

from gateway.web.pages import account, alerts, audit, ble, devices, export, firmware, overview, users

PAGES = (overview, devices, ble, alerts, firmware, export, audit, users, account)
