"""Scaffolding for tests, the demo and benchmarks: tiny random-weight models and reference timelines. Not used by the tracer itself."""
