"""Benchmark harness (`fulcrum bench`) and cluster simulator (`fulcrum sim`)."""
