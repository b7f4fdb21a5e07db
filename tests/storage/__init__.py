"""Checkpoint store tests (a package so that tests/storage cannot shadow the storage package)."""
