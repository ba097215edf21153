"""Benchmarks: ``python -m benchmarks.NAME [--quick] [--out FILE.json]``.

Each writes JSON with a ``headline`` object of its named figures and prints a table.
"""
