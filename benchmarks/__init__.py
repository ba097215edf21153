"""Benchmarks: ``python -m benchmarks.NAME [--quick] [--out FILE.json]``; JSON with a ``headline``."""
