"""Test suites (a package so that tests/elastic cannot shadow the elastic package)."""
