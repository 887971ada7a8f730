"""One-off measurements the README cites (each runs with ``python -m benchmarks.scripts.<name>``)."""
