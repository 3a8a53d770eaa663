"""Cut a Prometheus exposition down to the metric families a reader needs.

A vLLM worker's `/metrics` is ~100 KB; `prometheus_client`'s parser spends ~100 ms on
all of it, and well under a millisecond on the few families the gateway reads. Lines
are kept by name prefix (a family's `_bucket`, `_sum`, `_count` samples included).
"""

from __future__ import annotations


def filter_exposition(text: str, names: tuple[str, ...]) -> str:
    """The sample lines, and `# HELP`/`# TYPE` lines, of metrics whose names start with
    one of `names`."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) > 2 and parts[2].startswith(names):
                keep.append(line)
        elif line.startswith(names):
            keep.append(line)
    keep.append("")
    return "\n".join(keep)
