"""The ``kv_transfer_params`` our connector reads and writes (the P/D handshake).

Same shape as NIXL's: the prefill leg is sent ``{"do_remote_decode": true}``; its response
carries ``{"do_remote_prefill": true, ...}`` which the gateway copies verbatim into the decode
leg. The gateway does not need to know which connector runs.

A running request can also hand its KV to another worker (a decode migration): its params
carry ``{"migration_hold": {"transfer_id": T, "ttl_s": S}}``; if it is aborted, its blocks
are held under ``T`` for ``S`` seconds, and the gateway sends the continuation
``lease_pull_params(T, ...)``, which reads the held blocks by position (the gateway never
learns block ids).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONNECTOR_TAG = "fulcrum"
MIGRATION_HOLD = "migration_hold"


@dataclass(frozen=True)
class MigrationHold:
    """Hold this request's blocks under ``transfer_id`` for ``ttl_s`` if it is aborted."""

    transfer_id: str
    ttl_s: float

    def to_params(self) -> dict[str, Any]:
        return {MIGRATION_HOLD: {"transfer_id": self.transfer_id, "ttl_s": self.ttl_s}}

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> MigrationHold | None:
        hold = (params or {}).get(MIGRATION_HOLD)
        if not isinstance(hold, Mapping) or not hold.get("transfer_id"):
            return None
        try:
            ttl_s = float(hold.get("ttl_s", 10.0))
        except (TypeError, ValueError):
            return None
        return cls(str(hold["transfer_id"]), ttl_s) if ttl_s > 0 else None


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
    by_position: bool = False
    """``block_ids`` are positions in the producer's lease (a migration's continuation:
    the gateway knows how many tokens, not which blocks)."""

    def blocks_to_read(self, block_size: int) -> tuple[int, ...]:
        """The producer-side block refs covering ``num_tokens`` (ids, or lease positions)."""
        if self.by_position:
            return tuple(range(math.ceil(self.num_tokens / block_size)))
        return self.block_ids

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
            if params.get("remote_block_positions"):
                return cls(transfer_id=str(params["transfer_id"]),
                           host=str(params["remote_host"]), port=int(params["remote_port"]),
                           block_ids=(), num_tokens=int(params["remote_num_tokens"]),
                           by_position=True)
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


def lease_pull_params(transfer_id: str, host: str, port: int, num_tokens: int) -> dict[str, Any]:
    """A continuation's params: pull the first ``num_tokens`` tokens' blocks held under
    ``transfer_id`` (a migrated request's) from the block server at ``host:port``."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "connector": CONNECTOR_TAG, "transfer_id": transfer_id, "remote_host": host,
            "remote_port": port, "remote_block_positions": True,
            "remote_num_tokens": num_tokens}
