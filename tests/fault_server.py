"""A small fault-injecting OpenAI-compatible server for the HTTP engine's tests.

Runs aiohttp on 127.0.0.1 (a free port) in a thread of its own. The first path segment picks the
behaviour: ``http://127.0.0.1:PORT/<scenario>/v1/chat/completions``. The server counts requests,
records the highest number in flight and the Authorization headers, per scenario.

Scenarios: ok, json, length, e500 (always 500), flaky (500 twice, then ok), e429, e400, e404,
slow (sleeps past any test timeout), malformed (200, not JSON), nochoices (200, JSON without
choices), reset (closes the connection without answering).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict

from aiohttp import web


class FaultServer:
    def __init__(self, delay_s: float = 0.05, slow_s: float = 5.0):
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.counts: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.auth_headers: list[str | None] = []
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def url(self, scenario: str) -> str:
        return f"http://127.0.0.1:{self.port}/{scenario}/v1"

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.in_flight.clear()
            self.max_in_flight.clear()
            self.auth_headers.clear()
            self.bodies.clear()

    # --------------------------------------------------------------------------------- handler
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        scenario = request.match_info["scenario"]
        with self._lock:
            self.counts[scenario] += 1
            n = self.counts[scenario]
            self.in_flight[scenario] += 1
            self.max_in_flight[scenario] = max(self.max_in_flight[scenario], self.in_flight[scenario])
            self.auth_headers.append(request.headers.get("Authorization"))
        try:
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"error": {"message": "bad json"}}, status=400)
            with self._lock:
                self.bodies.append(body)
            await asyncio.sleep(self.delay_s)
            if scenario == "e500" or (scenario == "flaky" and n <= 2):
                return web.json_response({"error": {"message": "boom"}}, status=500)
            if scenario == "e429":
                return web.json_response({"error": {"message": "slow down"}}, status=429)
            if scenario == "e400":
                return web.json_response({"error": {"message": "prompt too long"}}, status=400)
            if scenario == "e404":
                return web.json_response({"error": {"message": "no such model"}}, status=404)
            if scenario == "slow":
                await asyncio.sleep(self.slow_s)
            if scenario == "malformed":
                return web.Response(text="<html>not json", status=200, content_type="text/html")
            if scenario == "nochoices":
                return web.json_response({"id": "x", "object": "chat.completion"})
            if scenario == "reset":
                request.transport.close()
                return web.Response(status=200)
            text, finish = "a red car on the road", "stop"
            if scenario == "json":
                text = json.dumps({"consistent": True, "reason": "matches"})
            if scenario == "length":
                finish = "length"
            return web.json_response(
                {
                    "id": f"chatcmpl-{n}",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
                }
            )
        finally:
            with self._lock:
                self.in_flight[scenario] -= 1

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> "FaultServer":
        ready = threading.Event()
        errors: list[BaseException] = []

        async def setup() -> None:
            app = web.Application()
            app.router.add_post("/{scenario}/v1/chat/completions", self._handle)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(setup())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="fault-server", daemon=True)
        self._thread.start()
        if not ready.wait(30) or errors:
            raise RuntimeError(f"fault server did not start: {errors}")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
