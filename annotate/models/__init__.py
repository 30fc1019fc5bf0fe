"""Local model utilities: tiny random-weight models for CPU runs and tests."""

from annotate.models.registry import KINDS, RECIPE_VERSION, build_all, build_tiny, cache_dir, tiny_path

__all__ = ["KINDS", "RECIPE_VERSION", "build_all", "build_tiny", "cache_dir", "tiny_path"]
