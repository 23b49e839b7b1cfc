"""Benchmarks that print ratios measured side by side (see BENCHMARKS.md)."""
