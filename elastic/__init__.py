"""Fault-tolerant elastic training runtime."""
