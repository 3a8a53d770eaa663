"""Scheduler-side half of the connector: decides each request's role from its params."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kv_transfer.fulcrum.loader import PullJob, ReleaseJob
from kv_transfer.fulcrum.metadata import FulcrumMetadata, HoldJob
from kv_transfer.fulcrum.notify import HoldNotifier
from kv_transfer.fulcrum.params import (
    MigrationHold,
    RemoteBlocks,
    new_transfer_id,
    wants_remote_decode,
    wants_remote_prefill,
)
from kv_transfer.fulcrum.trace import TRACE

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

_CONSUMED = "_fulcrum_consumed"


class FulcrumScheduler:
    """Producer: delay-free the prompt's blocks and return the decode leg's params.
    Consumer: report the prompt as external tokens loaded asynchronously."""

    def __init__(self, *, engine_id: str, host: str, port: int, block_size: int,
                 notifier: HoldNotifier | None = None) -> None:
        self.engine_id = engine_id
        self.host = host
        self.port = port
        self.block_size = block_size
        self.notifier = notifier  # holds go straight to our worker (else: step metadata)
        self._meta = FulcrumMetadata()
        self._admitted: set[str] = set()  # traced requests (FULCRUM_KV_TRACE only)
        self._pulling: set[str] = set()  # consumers whose pull vLLM has not seen finish

    # --- consumer --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        remote = RemoteBlocks.from_params(params)
        if TRACE.enabled and request.request_id not in self._admitted:
            self._admitted.add(request.request_id)
            TRACE.event("admit", req=request.request_id,
                        tid=remote.transfer_id if remote else None,
                        prompt_tokens=request.num_prompt_tokens)
        if remote is None or (params or {}).get(_CONSUMED):
            return 0, False
        count = min(remote.num_tokens, request.num_prompt_tokens) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        remote = RemoteBlocks.from_params(params)
        if remote is None or params is None or params.get(_CONSUMED):
            return
        params[_CONSUMED] = True
        params["do_remote_prefill"] = False  # one transfer per request
        if num_external_tokens <= 0:  # all of it was in our own prefix cache
            self._meta.releases.append(ReleaseJob(remote.transfer_id, remote.host,
                                                  remote.port))
            return
        group = blocks.blocks[0]
        cached = sum(1 for b in group if b.block_hash is not None and not b.is_null)
        refs = remote.blocks_to_read(self.block_size)
        wanted = min(len(refs), math.ceil(
            (cached * self.block_size + num_external_tokens) / self.block_size))
        local = [b.block_id for b in group[cached:wanted]]
        self._pulling.add(request.request_id)
        self._meta.pulls.append(PullJob(
            req_id=request.request_id, transfer_id=remote.transfer_id, host=remote.host,
            port=remote.port, remote_block_ids=tuple(refs[cached:wanted]),
            local_block_ids=tuple(local), by_position=remote.by_position,
            num_tokens=remote.num_tokens))

    def pulls_finished(self, req_ids: Iterable[str]) -> None:
        """vLLM saw these requests' pulls end (their blocks hold the KV now)."""
        self._pulling.difference_update(req_ids)

    # --- producer --------------------------------------------------------------------
    def request_finished(self, request: Request,
                         block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if TRACE.enabled:
            self._admitted.discard(request.request_id)
            TRACE.event("finished", req=request.request_id)
        if wants_remote_prefill(params) and not (params or {}).get(_CONSUMED):
            # A decode leg that ended before it was scheduled (abort): free the producer.
            remote = RemoteBlocks.from_params(params)
            if remote is not None:
                self._meta.releases.append(ReleaseJob(remote.transfer_id, remote.host,
                                                      remote.port))
            return False, None
        if request.status == RequestStatus.FINISHED_ABORTED:
            return self._hold_for_migration(request, block_ids), None
        if not wants_remote_decode(params):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted prefill: nothing to hand over
        num_tokens = request.num_computed_tokens
        held = tuple(block_ids[:math.ceil(num_tokens / self.block_size)])
        if not held:
            return False, None
        transfer_id = new_transfer_id(params)
        hold = HoldJob(request.request_id, transfer_id, held)
        if self.notifier is not None:
            self.notifier.send(hold)
        else:
            self._meta.holds.append(hold)
        TRACE.event("prefill_done", req=request.request_id, tid=transfer_id,
                    tokens=num_tokens)
        remote = RemoteBlocks(transfer_id=transfer_id, host=self.host, port=self.port,
                              block_ids=held, num_tokens=num_tokens,
                              engine_id=self.engine_id)
        return True, remote.to_params()

    def _hold_for_migration(self, request: Request, block_ids: Sequence[int]) -> bool:
        """An aborted request the gateway may continue elsewhere (``migration_hold`` in
        its params): keep the blocks of the tokens it has processed, for a short lease.
        True when held (vLLM then frees them when the lease is read, released or expires)."""
        hold = MigrationHold.from_params(request.kv_transfer_params)
        if request.request_id in self._pulling:
            self._pulling.discard(request.request_id)
            return False  # its blocks are still being written (vLLM frees them after)
        if hold is None:
            return False
        # Tokens whose KV is written: an asynchronously scheduled step may be in flight.
        done = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        held = tuple(block_ids[:math.ceil(max(0, done) / self.block_size)])
        if not held:
            return False  # aborted before its KV was computed or loaded
        job = HoldJob(request.request_id, hold.transfer_id, held, ttl_s=hold.ttl_s,
                      num_tokens=done)
        if self.notifier is not None:
            self.notifier.send(job)
        else:
            self._meta.holds.append(job)
        TRACE.event("migration_hold", req=request.request_id, tid=hold.transfer_id,
                    tokens=done)
        return True

    def build_connector_meta(self) -> FulcrumMetadata:
        if self.notifier is not None:
            self._meta.holds.extend(self.notifier.take_undelivered())
        meta, self._meta = self._meta, FulcrumMetadata()
        return meta
