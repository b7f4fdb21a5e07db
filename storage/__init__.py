"""Checkpoint store on any fsspec URL (filled in by the storage issue)."""
