"""Shared test set-up. Fixtures live in one plugin module per area, loaded here."""

pytest_plugins = ["fixtures_data", "fixtures_engines", "fixtures_pipeline", "fixtures_train"]


def pytest_collection_modifyitems(items):
    """Run the tests marked `own_cluster` first. Each frees the session's tiny model deployments (two
    sets of vLLM engines do not fit in this machine's memory), so every test after one that shares
    the deployments paid for a fresh deployment of them (~2.5 min each in CI). Stable: the rest keep
    their order."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)
