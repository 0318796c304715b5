"""UI test harness: a real gateway in a thread of its own, a real Chromium driven by Playwright.

The gateway runs on its own event loop in a background thread, so the synchronous
Playwright API can drive the browser from the test thread while the gateway keeps
serving; ``GatewayThread.run(coro)`` runs a coroutine on the gateway's loop (to read
the store, or to use the aiohttp test ``Client`` of tests/web).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
# Debian's chromium, never a downloaded one (`playwright install` is not used); no sandbox as root in
# CI, no GPU on a server, and nothing the browser would fetch for itself (updates, sync, safe browsing)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 360, "height": 740}
LAPTOP = {"width": 1280, "height": 800}
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"


class GatewayThread:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.gw: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="ui-gateway", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from gateway.app import Gateway

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Gateway(self.settings) as gw:
            self.gw = gw
            self._ready.set()
            await self._stop.wait()

    def start(self) -> GatewayThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the gateway did not start within 60 s")
        if self._error is not None:
            raise RuntimeError("the gateway failed to start") from self._error
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gw.web_port}"

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def launch_chromium(playwright: Any, *extra: str) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra], headless=True)
