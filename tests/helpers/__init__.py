"""Shared fixtures and harnesses of the test suite (data, numerics bounds, kill/resume, servers)."""
