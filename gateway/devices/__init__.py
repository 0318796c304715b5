"""Devices: who they are (registry), how they log in (credentials), what they are told (commands)."""
