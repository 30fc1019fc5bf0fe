"""Run a function on N local processes (gloo ranks) and collect what each returns, without forking.

Everything starts with the spawn method, the results' Manager included: by the time the train tests
run, the pytest process is the session cluster's Ray driver, and forking a Ray driver is unsafe (see
conftest.no_fork_of_the_ray_driver)."""

from __future__ import annotations

import multiprocessing

import torch.multiprocessing as mp


def run_ranks(fn, world: int, *args) -> dict:
    """Call fn(rank, *args, results) on `world` spawned processes; returns {rank: results[rank]} as
    the ranks stored them."""
    with multiprocessing.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.spawn(fn, nprocs=world, join=True, args=(*args, results))
        return dict(results)
