"""Starting or joining the Ray cluster, for the annotation executor and the trainer alike.

Both take the user's `run:` settings (address, dashboard host and port, CPUs), so the trainer's Ray
is the one the pipeline file describes, never a default.
"""

from __future__ import annotations

import ray

from annotate.config import RunConfig


def ensure_ray(run: RunConfig, address: str | None = None) -> str | None:
    """Join the cluster at `address` (or the config's), or start a local one; return the dashboard URL.

    A local cluster's dashboard binds to `run.dashboard_host` (127.0.0.1 unless configured).
    """
    if not ray.is_initialized():
        address = address or run.ray_address
        kwargs: dict = {"namespace": "longgrit", "log_to_driver": run.log_to_driver}
        if address:
            kwargs["address"] = address
        else:
            kwargs.update(include_dashboard=True, dashboard_host=run.dashboard_host, num_cpus=run.num_cpus)
            if run.dashboard_port is not None:
                kwargs["dashboard_port"] = run.dashboard_port
        ray.init(**kwargs)
        ray.data.DataContext.get_current().enable_progress_bars = False  # we draw our own (rich)
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url
