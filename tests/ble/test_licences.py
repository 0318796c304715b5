"""The BLE dependency closure is permissively licensed, and the one GPL package it drags in
(PyRIC, via habluetooth → bluetooth-auto-recovery) is never imported by Siteward."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys

ROOTS = ["bleak", "dbus-fast", "bthome-ble", "xiaomi-ble", "ruuvitag-ble", "govee-ble", "inkbird-ble",
         "thermopro-ble", "qingping-ble", "sensorpush-ble", "ibeacon-ble", "habluetooth"]
KNOWN_GPL_NEVER_IMPORTED = {"pyric"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure() -> set[str]:
    seen: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0])
    return seen


def _licence(name: str) -> str:
    meta = md.metadata(name)
    parts = [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
    parts += [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return " | ".join(p for p in parts if p)


def test_no_gpl_in_the_ble_runtime_closure() -> None:
    offenders = {}
    for name in sorted(_closure()):
        try:
            text = _licence(name)
        except md.PackageNotFoundError:
            continue
        if re.search(r"(?<!L)GPL|General Public License", text) and "Lesser" not in text:
            offenders[name] = text
    assert set(offenders) <= KNOWN_GPL_NEVER_IMPORTED, offenders


def test_decoders_never_import_pyric() -> None:
    code = (
        "import asyncio, sys\n"
        "from gateway.ble.decoders import FAMILIES, make_decoder, prepare\n"
        "import gateway.ble.scanner, gateway.ble.service\n"
        "asyncio.run(prepare())\n"
        "[make_decoder(f) for f in FAMILIES]\n"
        "print(sorted(m for m in sys.modules if m.lower().startswith('pyric')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
