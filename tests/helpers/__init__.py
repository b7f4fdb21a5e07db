"""Helpers shared by the test suites: bounded waits, process hygiene, member processes."""
