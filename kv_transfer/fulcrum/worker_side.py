"""Worker-side half of the connector: owns the KV store, the server and the loader."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.lease import LeaseTable
from kv_transfer.fulcrum.loader import BlockLoader
from kv_transfer.fulcrum.metadata import FulcrumMetadata
from kv_transfer.fulcrum.server import BlockServer
from kv_transfer.fulcrum.stats import FulcrumStats, StatsRecorder
from kv_transfer.fulcrum.trace import TRACE
from kv_transfer.fulcrum.transport import Transport

log = logging.getLogger(__name__)


class FulcrumWorker:
    """Serves held blocks (producer) and pulls blocks (consumer), both off the forward path."""

    def __init__(self, *, host: str, port: int, num_blocks: int, lease_s: float,
                 max_concurrent: int = 4) -> None:
        self.host = host
        self.port = port
        self.num_blocks = num_blocks
        self.transport: Transport | None = None
        self.lease_s = lease_s
        self.max_concurrent = max_concurrent
        self.leases = LeaseTable()
        self.stats = StatsRecorder()
        self.store: KVBlockStore | None = None
        self.server: BlockServer | None = None
        self.loader: BlockLoader | None = None

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor],
                           transport: Transport) -> None:
        self.transport = transport
        if hasattr(transport, "on_tcp_receive"):
            transport.on_tcp_receive = self.stats.pulled_over_tcp
        self.store = KVBlockStore(kv_caches, self.num_blocks)
        self.server = BlockServer("0.0.0.0", self.port, self.store, self.leases,
                                  self.transport, self.stats, self.max_concurrent,
                                  lease_s=self.lease_s)
        self.loader = BlockLoader(self.store, self.transport, self.stats, self.max_concurrent)
        log.info("fulcrum: serving KV on %s:%d via %s (%d layers, %d B/block)", self.host,
                 self.server.port, self.transport.name, len(self.store.layers),
                 self.store.bytes_per_block)

    def start_step(self, meta: FulcrumMetadata) -> None:
        """Apply one step's metadata: register holds, start pulls and releases."""
        for hold in meta.holds:
            self.leases.hold(hold.transfer_id, hold.req_id, hold.block_ids,
                             hold.ttl_s or self.lease_s, hold.num_tokens)
            TRACE.event("hold", req=hold.req_id, tid=hold.transfer_id)
        if self.loader is None:
            if meta.pulls:
                raise RuntimeError("fulcrum: pull requested before KV caches registered")
            return
        for release in meta.releases:
            self.loader.release(release)
        for pull in meta.pulls:
            self.loader.submit(pull)

    def finished(self) -> tuple[set[str], set[str], set[str]]:
        """(sent: blocks may be freed, received, failed receives)."""
        self.stats.expired(self.leases.expire())
        sent = self.leases.take_released()
        if self.loader is None:
            return sent, set(), set()
        received, failed = self.loader.take_results()
        return sent, received, failed

    def take_stats(self) -> FulcrumStats | None:
        return self.stats.drain()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.loader is not None:
            self.loader.close()
        if self.transport is not None:
            self.transport.close()
