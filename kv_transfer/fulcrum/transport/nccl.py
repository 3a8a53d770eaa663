"""NCCL data plane for CUDA KV caches.

* Pairwise communicators: one 2-rank NCCL communicator per (consumer, producer) pair, made
  lazily on the first transfer between them and cached; no global world, so workers join
  and leave freely. The consumer is rank 0 and hosts the rendezvous store.
* Bounded fan-out: at most ``max_peers`` communicators per worker (least recently used one
  is destroyed first); the peer then sees a new rendezvous and rebuilds its side.
* Off the forward path: transfers run on the connector's server/loader threads, on a
  dedicated CUDA stream, and the loader reports completion only after that stream synced.

The communicator is created by ``comm_factory(host, port, rank, device)`` which returns an
object with ``send(tensor, peer)``, ``recv(tensor, peer)`` and ``close()``. The default
factory uses vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``; tests inject fakes.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.transport.base import TransferError, Transport
from kv_transfer.fulcrum.wire import Channel

CONSUMER_RANK, PRODUCER_RANK = 0, 1


class PairComm(Protocol):
    """A 2-rank communicator."""

    def send(self, tensor: torch.Tensor, peer: int) -> None: ...
    def recv(self, tensor: torch.Tensor, peer: int) -> None: ...
    def close(self) -> None: ...


CommFactory = Callable[[str, int, int, torch.device], PairComm]


class _VllmPairComm:
    """A PyNcclCommunicator over a StatelessProcessGroup of two ranks (GPU only)."""

    def __init__(self, host: str, port: int, rank: int, device: torch.device) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=2,
                                             store_timeout=30)
        self._comm = PyNcclCommunicator(group, device=device)

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._comm.send(tensor, peer, stream=torch.cuda.current_stream())

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        self._comm.recv(tensor, peer, stream=torch.cuda.current_stream())

    def close(self) -> None:
        self._comm.destroy()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class CommCache:
    """LRU cache of pairwise communicators, bounded at ``max_peers``."""

    def __init__(self, max_peers: int) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.max_peers = max_peers
        self._comms: OrderedDict[str, PairComm] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, peer_id: str) -> PairComm | None:
        with self._lock:
            comm = self._comms.get(peer_id)
            if comm is not None:
                self._comms.move_to_end(peer_id)
            return comm

    def put(self, peer_id: str, comm: PairComm) -> None:
        evicted: list[PairComm] = []
        with self._lock:
            old = self._comms.pop(peer_id, None)
            if old is not None:
                evicted.append(old)
            self._comms[peer_id] = comm
            while len(self._comms) > self.max_peers:
                evicted.append(self._comms.popitem(last=False)[1])
        for comm_ in evicted:
            comm_.close()

    def drop(self, peer_id: str) -> None:
        with self._lock:
            comm = self._comms.pop(peer_id, None)
        if comm is not None:
            comm.close()

    def peers(self) -> list[str]:
        with self._lock:
            return list(self._comms)

    def close(self) -> None:
        with self._lock:
            comms, self._comms = list(self._comms.values()), OrderedDict()
        for comm in comms:
            comm.close()


class NcclTransport(Transport):
    """Moves CUDA KV blocks layer by layer through a staging tensor per layer."""

    name = "nccl"

    def __init__(self, device: torch.device | str, host: str = "127.0.0.1",
                 max_peers: int = 8, comm_factory: CommFactory | None = None,
                 stream_factory: Callable[[], AbstractContextManager] | None = None,
                 instance_id: str | None = None) -> None:
        self.device = torch.device(device)
        self.host = host
        self.instance_id = instance_id or uuid.uuid4().hex
        self.comms = CommCache(max_peers)
        self._factory = comm_factory or _VllmPairComm
        self._stream_factory = stream_factory or self._cuda_stream
        self._pair_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _cuda_stream(self) -> AbstractContextManager:
        if self.device.type != "cuda":
            return nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(device=self.device))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # --- consumer --------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {"kind": self.name, "peer_id": self.instance_id}

    def _pair_lock(self, peer_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._pair_locks.setdefault(peer_id, threading.Lock())

    def receive(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int]) -> int:
        head = chan.recv_msg()
        if head.get("mode") != self.name:
            raise TransferError(f"producer answered with {head.get('mode')!r}, not nccl")
        producer = str(head["peer_id"])
        # One transfer per pair at a time: the producer sends only after our reply below,
        # which we give while holding the pair's lock, so two transfers never interleave
        # on one communicator.
        with self._pair_lock(producer):
            return self._receive_locked(chan, store, block_ids, producer, head)

    def _receive_locked(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int],
                        producer: str, head: dict[str, Any]) -> int:
        comm = self.comms.get(producer)
        if comm is None or head.get("needs_rendezvous"):
            self.comms.drop(producer)
            port = _free_port(self.host)
            chan.send_msg({"rendezvous": {"host": self.host, "port": port}})
            comm = self._factory(self.host, port, CONSUMER_RANK, self.device)
            self.comms.put(producer, comm)
        else:
            chan.send_msg({"rendezvous": None})
        total = 0
        with self._stream_factory():
            try:
                for layer in store.layers:
                    staged = store.staging_like(layer, len(block_ids))
                    comm.recv(staged, PRODUCER_RANK)
                    store.scatter(layer, block_ids, staged)
                    total += staged.numel() * staged.element_size()
                self._sync()
            except Exception as exc:
                self.comms.drop(producer)  # a broken communicator is not reused
                raise TransferError(f"nccl receive failed: {exc}") from exc
        return total

    # --- producer --------------------------------------------------------------------
    def send(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int],
             peer_hello: dict[str, Any]) -> int:
        consumer = str(peer_hello.get("peer_id", ""))
        if peer_hello.get("kind") != self.name or not consumer:
            chan.send_msg({"mode": "error", "error": "consumer is not an nccl peer"})
            raise TransferError("consumer is not an nccl peer")
        comm = self.comms.get(consumer)
        chan.send_msg({"mode": self.name, "peer_id": self.instance_id,
                       "needs_rendezvous": comm is None})
        reply = chan.recv_msg()
        rendezvous = reply.get("rendezvous")
        if rendezvous:
            comm = self._factory(str(rendezvous["host"]), int(rendezvous["port"]),
                                 PRODUCER_RANK, self.device)
            self.comms.put(consumer, comm)
        if comm is None:
            raise TransferError("no communicator with the consumer")
        total = 0
        with self._stream_factory():
            try:
                for layer in store.layers:
                    staged = store.gather(layer, block_ids)
                    comm.send(staged, CONSUMER_RANK)
                    total += staged.numel() * staged.element_size()
                self._sync()
            except Exception as exc:
                self.comms.drop(consumer)
                raise TransferError(f"nccl send failed: {exc}") from exc
        return total

    def close(self) -> None:
        self.comms.close()
