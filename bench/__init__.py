"""Benchmarks: HELIP's costs measured side by side with a plain reference in the same run (see docs/benchmarks.md)."""
