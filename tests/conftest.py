"""Shared test set-up. Fixtures live in one plugin module per area, loaded here."""

pytest_plugins = ["fixtures_data", "fixtures_engines", "fixtures_pipeline", "fixtures_train"]
