"""Consumer side: pulls a request's blocks off the forward path and reports the outcome."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.stats import StatsRecorder
from kv_transfer.fulcrum.trace import TRACE
from kv_transfer.fulcrum.transport.base import TransferError, Transport
from kv_transfer.fulcrum.wire import Channel, ChannelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullJob:
    """Copy ``remote_block_ids`` of transfer ``transfer_id`` into ``local_block_ids``.
    With ``by_position`` the remote refs are positions in the producer's lease, and the
    producer refuses unless its lease holds ``num_tokens`` tokens' KV."""

    req_id: str
    transfer_id: str
    host: str
    port: int
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    by_position: bool = False
    num_tokens: int = 0


@dataclass(frozen=True)
class ReleaseJob:
    """Tell a producer we will not read transfer ``transfer_id``."""

    transfer_id: str
    host: str
    port: int


class BlockLoader:
    """A bounded pool of pull threads; results are drained once per engine step."""

    def __init__(self, store: KVBlockStore, transport: Transport, stats: StatsRecorder,
                 max_concurrent: int = 4, connect_timeout_s: float = 2.0,
                 reply_timeout_s: float = 5.0, io_timeout_s: float = 30.0) -> None:
        self.store = store
        self.transport = transport
        self.stats = stats
        self.connect_timeout_s = connect_timeout_s
        # The producer answers a read within its lease wait (server.CLAIM_WAIT_S, 2 s) unless
        # it is starved or stuck; recomputing beats waiting for it.
        self.reply_timeout_s = reply_timeout_s
        self.io_timeout_s = io_timeout_s
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="fulcrum-pull")
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._failed: set[str] = set()

    def submit(self, job: PullJob) -> None:
        TRACE.event("pull_submit", req=job.req_id, tid=job.transfer_id)
        self._pool.submit(self._run, job)

    def release(self, job: ReleaseJob) -> None:
        self._pool.submit(self._release, job)

    def take_results(self) -> tuple[set[str], set[str]]:
        """(finished request ids, of which failed), each returned once."""
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = set(), set()
        for req_id in done:
            TRACE.event("pull_reported", req=req_id)
        return done, failed

    def _run(self, job: PullJob) -> None:
        ok = False
        started = time.perf_counter()
        TRACE.event("pull_start", req=job.req_id, tid=job.transfer_id)
        try:
            nbytes = self.pull(job)
            self.stats.pulled(nbytes, time.perf_counter() - started)
            TRACE.event("pull_done", req=job.req_id, tid=job.transfer_id, nbytes=nbytes)
            ok = True
        except (TransferError, ChannelError, OSError, ValueError) as exc:
            log.warning("fulcrum: pulling %s from %s:%d failed (%s); the prompt will be "
                        "recomputed", job.transfer_id, job.host, job.port, exc)
        except Exception:  # noqa: BLE001 - never leave a request waiting forever
            log.exception("fulcrum: pulling %s failed", job.transfer_id)
        finally:
            if not ok:
                self.stats.failed()
            with self._lock:
                self._done.add(job.req_id)
                if not ok:
                    self._failed.add(job.req_id)

    def pull(self, job: PullJob) -> int:
        """Run one transfer in the calling thread; returns bytes moved."""
        if len(job.remote_block_ids) != len(job.local_block_ids):
            raise TransferError("remote and local block counts differ")
        chan = Channel.connect(job.host, job.port, self.connect_timeout_s)
        try:
            chan.settimeout(self.reply_timeout_s)
            msg = {"op": "read", "transfer_id": job.transfer_id,
                   "block_ids": list(job.remote_block_ids),
                   "signature": self.store.signature(), "hello": self.transport.hello()}
            if job.by_position:
                msg.update(by_position=True, num_tokens=job.num_tokens)
            chan.send_msg(msg)
            reply = chan.recv_msg()
            if not reply.get("ok"):
                raise TransferError(str(reply.get("error")))
            TRACE.event("pull_reply", req=job.req_id, tid=job.transfer_id)
            chan.settimeout(self.io_timeout_s)
            nbytes = self.transport.receive(chan, self.store, job.local_block_ids)
            chan.send_msg({"op": "done", "ok": True})
            return nbytes
        finally:
            chan.close()

    def _release(self, job: ReleaseJob) -> None:
        try:
            chan = Channel.connect(job.host, job.port, self.connect_timeout_s)
            try:
                chan.settimeout(self.io_timeout_s)
                chan.send_msg({"op": "release", "transfer_id": job.transfer_id})
                chan.recv_msg()
            finally:
                chan.close()
        except (ChannelError, OSError) as exc:
            log.info("fulcrum: could not release %s (%s); its lease will expire",
                     job.transfer_id, exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
