"""`annotate serve`: start a pipeline's models as Serve applications that outlive any run, or stop them.

Runs against the same cluster then find them RUNNING (same name = same model settings) and use them
instead of loading the models again. Without `--address` the command starts a local cluster, which
lives as long as this process: it then stays in the foreground until Ctrl-C.
"""

from __future__ import annotations

import time

from rich.console import Console

from annotate.config import PipelineConfig
from annotate.cluster import ensure_ray
from annotate.serving.apps import ensure_apps, needed_models, replica_info, stop_apps


def serve_models(cfg: PipelineConfig, address: str | None, stop: bool = False, console: Console | None = None,
                 foreground: bool | None = None) -> dict:
    console = console or Console(stderr=True)
    dashboard = ensure_ray(cfg.run, address)
    models = needed_models(cfg)
    if stop:
        deleted = stop_apps(models)
        console.print(f"stopped {len(deleted)} application(s): {', '.join(deleted) or 'none was running'}")
        return {"stopped": deleted}
    apps = ensure_apps(models, cfg.run, on_event=console.print)
    info = {"dashboard": dashboard, "apps": {n: a.app_name for n, a in apps.items()},
            "deployed": [n for n, a in apps.items() if a.deployed_now], "replicas": replica_info(apps)}
    base = f"http://{cfg.run.serve_http_host}:{cfg.run.serve_http_port}"
    for name, app in apps.items():
        route = f"  POST {base}/{app.app_name}/v1/chat/completions (model \"{name}\")" if (
            app.kind == "llm" and cfg.run.openai_routes) else ""
        console.print(f"{name}: {app.app_name}{route}")
    if dashboard:
        console.print(f"Ray dashboard: {dashboard} (Serve tab: replicas, requests, vLLM engine metrics)")
    if foreground if foreground is not None else address is None and cfg.run.ray_address is None:
        import ray

        console.print(f"serving on a local cluster (join it with --address {ray.get_runtime_context().gcs_address}); "
                      "Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return info
