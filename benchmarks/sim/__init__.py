"""Discrete-event simulator of a P/D cluster driven by Fulcrum's own policy objects."""
