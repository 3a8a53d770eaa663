"""The command line both fake workers share (`fake_worker`, `lean_fake_worker`)."""

from __future__ import annotations

import argparse


def fake_worker_parser(description: str) -> argparse.ArgumentParser:
    """`--port`, `--name` (echoed in replies) and `--model` (the served model name)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--model", default="fake-model")
    return parser
