"""Worker life cycle, metrics collection and the role controller."""
