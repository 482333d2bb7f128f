"""Helpers for testing and benchmarking code that reads from object storage (not used by the library itself)."""
