"""What the scheduler-side connector tells the worker-side one each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kv_transfer.fulcrum.loader import PullJob, ReleaseJob


@dataclass(frozen=True)
class HoldJob:
    """Producer: keep ``block_ids`` of ``req_id`` for transfer ``transfer_id`` (for
    ``ttl_s``, the worker's lease time when None). ``num_tokens``: how many tokens' KV the
    blocks hold, when reads by position must not go past it (a migrated request)."""

    req_id: str
    transfer_id: str
    block_ids: tuple[int, ...]
    ttl_s: float | None = None
    num_tokens: int | None = None


@dataclass
class FulcrumMetadata(KVConnectorMetadata):
    """One step's new holds (producer), pulls and releases (consumer)."""

    holds: list[HoldJob] = field(default_factory=list)
    pulls: list[PullJob] = field(default_factory=list)
    releases: list[ReleaseJob] = field(default_factory=list)
