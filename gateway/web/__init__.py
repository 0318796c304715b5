"""The web UI and JSON API (aiohttp).

``app.build_web_app`` is the one place that composes routes and middlewares; each page
family is one module under ``views/``; ``permissions.authorise`` is the one function
that decides who may do what.
"""
