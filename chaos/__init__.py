"""Fault injection, seeded scenarios and invariant checks."""
