"""Local model utilities: tiny random-weight models for CPU runs and tests."""

from annotate.models.tiny import KINDS, RECIPE_VERSION, build_all, build_tiny, cache_dir, tiny_path

__all__ = ["KINDS", "RECIPE_VERSION", "build_all", "build_tiny", "cache_dir", "tiny_path"]
