"""CPU data plane: single-copy reads on one host, a TCP byte stream across hosts."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.transport import cma
from kv_transfer.fulcrum.transport.base import TransferError, Transport
from kv_transfer.fulcrum.wire import Channel, raw_view

log = logging.getLogger(__name__)


class CpuTransport(Transport):
    """Moves CPU KV blocks.

    Same host (same boot id and PID namespace): the producer sends the addresses of its
    blocks and the consumer copies them out of the producer's memory with
    ``process_vm_readv``, one copy in total. Otherwise, or when the kernel refuses, the
    producer streams the blocks' bytes over the control connection and the consumer receives
    them straight into its own blocks (no intermediate buffer on either side).
    """

    name = "cpu"

    def __init__(self, allow_cma: bool = True, node_id: str = "") -> None:
        self.allow_cma = allow_cma
        # Two workers share memory only if they share a kernel, a PID namespace and a node
        # id: nodes of one cluster manager (Ray) that happen to share a machine still talk
        # over TCP, as nodes on different machines would.
        self.node_id = node_id
        self.on_tcp_receive: Callable[[], None] | None = None  # counts cross-host pulls

    def _host_key(self) -> str:
        key = cma.host_key()
        return f"{key}/{self.node_id}" if key and self.node_id else key

    def hello(self) -> dict[str, Any]:
        return {"kind": self.name, "host_key": self._host_key() if self.allow_cma else ""}

    def send(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int],
             peer_hello: dict[str, Any]) -> int:
        runs = store.segments(block_ids)
        total = sum(n for _, n in runs)
        same_host = self.allow_cma and bool(peer_hello.get("host_key")) and \
            peer_hello.get("host_key") == self._host_key()
        if same_host:
            chan.send_msg({"mode": "cma", "pid": os.getpid(), "runs": runs, "nbytes": total})
            reply = chan.recv_msg()
            if reply.get("cma") == "ok":
                return total
            log.info("fulcrum: peer could not read our memory (%s); streaming over TCP",
                     reply.get("error"))
        chan.send_msg({"mode": "tcp", "nbytes": total})
        for addr, size in runs:
            chan.send_raw(raw_view(addr, size))
        return total

    def receive(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int]) -> int:
        runs = store.segments(block_ids)
        total = sum(n for _, n in runs)
        head = chan.recv_msg()
        if head.get("nbytes") != total:
            raise TransferError(f"size mismatch: peer has {head.get('nbytes')} bytes, "
                                f"we expect {total}")
        if head.get("mode") == "cma":
            remote = [(int(a), int(n)) for a, n in head["runs"]]
            try:
                cma.read_from(int(head["pid"]), runs, remote)
                chan.send_msg({"cma": "ok"})
                return total
            except OSError as exc:
                chan.send_msg({"cma": "failed", "error": str(exc)})
                head = chan.recv_msg()
        if head.get("mode") != "tcp":
            raise TransferError(f"unexpected transfer mode {head.get('mode')!r}")
        if self.on_tcp_receive is not None:
            self.on_tcp_receive()
        for addr, size in runs:
            chan.recv_into(raw_view(addr, size))
        return total
