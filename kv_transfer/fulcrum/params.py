"""The ``kv_transfer_params`` our connector reads and writes (the P/D handshake).

Same shape as NIXL's: the prefill leg is sent ``{"do_remote_decode": true}``; its response
carries ``{"do_remote_prefill": true, ...}`` which the gateway copies verbatim into the decode
leg. The gateway does not need to know which connector runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONNECTOR_TAG = "fulcrum"


def wants_remote_decode(params: Mapping[str, Any] | None) -> bool:
    """This worker is the producer: prefill, hold the blocks, hand out the params."""
    return bool(params) and bool(params.get("do_remote_decode"))


def wants_remote_prefill(params: Mapping[str, Any] | None) -> bool:
    """This worker is the consumer: pull the prompt's KV from a producer."""
    return bool(params) and bool(params.get("do_remote_prefill"))


def new_transfer_id(params: Mapping[str, Any] | None) -> str:
    """The caller's ``transfer_id`` if it gave one (so it can correlate), else a fresh one."""
    given = (params or {}).get("transfer_id")
    return str(given) if given else uuid.uuid4().hex


@dataclass(frozen=True)
class RemoteBlocks:
    """Where a decode leg finds its prompt's KV: a producer address and its block ids."""

    transfer_id: str
    host: str
    port: int
    block_ids: tuple[int, ...]
    num_tokens: int
    engine_id: str = ""

    def to_params(self) -> dict[str, Any]:
        """The producer's response params (what the decode leg must be sent)."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "connector": CONNECTOR_TAG,
            "transfer_id": self.transfer_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_block_ids": list(self.block_ids),
            "remote_num_tokens": self.num_tokens,
            "remote_engine_id": self.engine_id,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> RemoteBlocks | None:
        """Parse a decode leg's params; None when they are not a usable Fulcrum handshake."""
        if not wants_remote_prefill(params):
            return None
        assert params is not None
        try:
            block_ids = params["remote_block_ids"]
            # NIXL-style nesting (one list per KV cache group): take the only group.
            if block_ids and isinstance(block_ids[0], list | tuple):
                if len(block_ids) != 1:
                    return None
                block_ids = block_ids[0]
            return cls(
                transfer_id=str(params["transfer_id"]),
                host=str(params["remote_host"]),
                port=int(params["remote_port"]),
                block_ids=tuple(int(b) for b in block_ids),
                num_tokens=int(params["remote_num_tokens"]),
                engine_id=str(params.get("remote_engine_id") or ""),
            )
        except (KeyError, TypeError, ValueError):
            return None
