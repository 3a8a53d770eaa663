"""Scheduler-side half of the connector: decides each request's role from its params."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kv_transfer.fulcrum.loader import PullJob, ReleaseJob
from kv_transfer.fulcrum.metadata import FulcrumMetadata, HoldJob
from kv_transfer.fulcrum.notify import HoldNotifier
from kv_transfer.fulcrum.params import (
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
        wanted = min(len(remote.block_ids), math.ceil(
            (cached * self.block_size + num_external_tokens) / self.block_size))
        local = [b.block_id for b in group[cached:wanted]]
        self._meta.pulls.append(PullJob(
            req_id=request.request_id, transfer_id=remote.transfer_id, host=remote.host,
            port=remote.port, remote_block_ids=tuple(remote.block_ids[cached:wanted]),
            local_block_ids=tuple(local)))

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

    def build_connector_meta(self) -> FulcrumMetadata:
        if self.notifier is not None:
            self._meta.holds.extend(self.notifier.take_undelivered())
        meta, self._meta = self._meta, FulcrumMetadata()
        return meta
