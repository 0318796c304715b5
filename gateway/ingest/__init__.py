"""Ingest: every message → profile match → validation → Readings → store and live bus."""
