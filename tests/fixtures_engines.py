"""Fixtures for the engines tests."""
