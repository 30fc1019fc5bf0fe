"""Fixtures for the data tests."""
