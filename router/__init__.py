"""Fulcrum gateway: the OpenAI-compatible HTTP surface and per-request P/D dispatch."""
