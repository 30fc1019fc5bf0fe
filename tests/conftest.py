"""Shared test set-up. Fixtures live in one plugin module per area, loaded here."""

import os
import sys

import pytest

pytest_plugins = ["fixtures_data", "fixtures_engines", "fixtures_pipeline", "fixtures_train"]

_FORKS_OF_A_RAY_DRIVER: list[int] = []


def _note_fork_of_a_ray_driver() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        _FORKS_OF_A_RAY_DRIVER.append(os.getpid())


os.register_at_fork(before=_note_fork_of_a_ray_driver)


@pytest.fixture(autouse=True)
def no_fork_of_the_ray_driver():
    """Fail a test that os.fork()s this process while it is a Ray driver (the session's cluster is up
    from the first pipeline test to the end). The child inherits the driver's gRPC state mid-call:
    CI of ac8aa62 lost the whole pytest process (exit 1, no summary) when Ray's GCS subscriber in the
    driver read an empty reply ("Check failed: !reply.publisher_id().empty()") a moment after a
    test's multiprocessing.Manager forked it. Start helper processes with spawn (tests/ranks.py)."""
    _FORKS_OF_A_RAY_DRIVER.clear()
    yield
    if _FORKS_OF_A_RAY_DRIVER:
        forks = len(_FORKS_OF_A_RAY_DRIVER)
        _FORKS_OF_A_RAY_DRIVER.clear()
        pytest.fail(f"this test forked the pytest process {forks} time(s) while it was a Ray driver; "
                    "start its processes with the spawn context instead", pytrace=False)


def pytest_collection_modifyitems(items):
    """Run the tests marked `own_cluster` first. Each frees the session's tiny model deployments (two
    sets of vLLM engines do not fit in this machine's memory), so every test after one that shares
    the deployments paid for a fresh deployment of them (~2.5 min each in CI). Stable: the rest keep
    their order."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)
