"""Replicas that go wrong on purpose, for the issue-22 tests on a real Serve deployment.

Each is `servers.ChatServer` (the class `annotate run` deploys for an `hf` model), with the real tiny
model loaded, so the load-time checks (token counts, stop-token ids) are answered by the real
tokenizer; only the answering path is changed:

* `HangingChatServer` never answers a chat (as a stuck all-reduce or a `generate` that never returns),
  while Serve's health check keeps passing;
* `DeviceErrorChatServer`: the first replica of a deployment meets a CUDA error on its first forward
  pass; replicas started after it (Serve's replacements) answer normally.

`deploy_as` puts one under the very application and deployment name `annotate run` uses for that
model, so the run finds it RUNNING and sends its requests there, as it would to a deployment started
by `annotate serve`. The classes are pickled by value: Ray's workers do not have `tests/` on their path.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from annotate.serving.servers import ChatServer

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class HangingChatServer(ChatServer):
    async def answer(self, requests):
        await asyncio.sleep(3600)  # the replica holds the requests and never answers
        raise AssertionError("unreachable: every request is cancelled at its deadline")


class DeviceErrorChatServer(ChatServer):
    """Notes each replica start as a file in `starts` (pid, then `broken` for the faulty one)."""

    def __init__(self, model, starts: str):
        super().__init__(model)
        folder = Path(starts)
        folder.mkdir(parents=True, exist_ok=True)
        first = not any(folder.iterdir())
        (folder / f"{len(list(folder.iterdir())):02d}-{os.getpid()}{'-broken' if first else ''}").touch()
        if first:
            def chat(requests):
                raise RuntimeError(CUDA_ERROR)  # what torch raises once the device is gone

            self.engine.chat = chat


def deploy_as(name: str, model, run, server_cls, *args, **options) -> str:
    """Deploy `server_cls(model, *args)` as model `name`'s application; returns the application name.
    `options` override the deployment's Serve options (e.g. a shorter health-check period)."""
    from ray import cloudpickle, serve  # Ray's own copy of cloudpickle pickles the deployment

    from annotate.serving.apps import deployment_options, model_app, start_serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_serve(run)
    app = model_app(name, model)
    deployment = serve.deployment(server_cls).options(**{**deployment_options(name, model), **options})
    serve.run(deployment.bind(model, *args), name=app.app_name, route_prefix=None)
    return app.app_name
