"""Unit tests of the Fulcrum KV connector's parts, without vLLM servers (seconds).

The NCCL transport cannot run here (no GPU): it is exercised at its seams, through the same
server/loader code as the CPU transport, with an in-process fake communicator.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from types import SimpleNamespace

import prometheus_client
import pytest
import torch

from kv_transfer.fulcrum.blocks import KVBlockStore, coalesce
from kv_transfer.fulcrum.lease import LeaseTable
from kv_transfer.fulcrum.loader import BlockLoader, PullJob
from kv_transfer.fulcrum.params import MigrationHold, RemoteBlocks, lease_pull_params
from kv_transfer.fulcrum.scheduler_side import FulcrumScheduler
from kv_transfer.fulcrum.server import BlockServer
from kv_transfer.fulcrum.stats import FulcrumPromMetrics, FulcrumStats, StatsRecorder
from kv_transfer.fulcrum.transport import cma
from kv_transfer.fulcrum.transport.cpu import CpuTransport
from kv_transfer.fulcrum.transport.nccl import CommCache, NcclTransport
from kv_transfer.settings import worker_kv_settings

NUM_BLOCKS = 16


def released(table: LeaseTable, want: set[str], timeout_s: float = 10.0) -> set[str]:
    """Released request ids, waiting until ``want`` arrived (the server releases the lease
    on its own thread just after the consumer's confirmation)."""
    got: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while not want <= got and time.monotonic() < deadline:
        got |= table.take_released()
        time.sleep(0.005)
    return got


def cpu_caches(seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    """CPU attention layout: [num_blocks, kv_heads, block_size, 2 * head_size]."""
    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn(NUM_BLOCKS, 2, 4, 8, generator=gen,
                                                  dtype=torch.float32)
            for i in range(layers)}


def gpu_like_caches(seed: int) -> dict[str, torch.Tensor]:
    """Flash-attention layout: [2, num_blocks, block_size, kv_heads, head_size]."""
    gen = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(2, NUM_BLOCKS, 4, 2, 8, generator=gen) for i in range(2)}


# --- blocks ---------------------------------------------------------------------------

def test_segments_cover_exactly_the_requested_blocks_and_coalesce() -> None:
    caches = cpu_caches(0)
    store = KVBlockStore(caches, NUM_BLOCKS)
    layer = caches["model.layers.0.attn"]
    block_bytes = layer[0].numel() * layer.element_size()
    segs = store.segments([3, 4, 9])
    # two layers x ({3,4} merged, {9}) = 4 runs
    assert len(segs) == 4
    assert segs[0] == (layer.data_ptr() + 3 * block_bytes, 2 * block_bytes)
    assert sum(n for _, n in segs) == 3 * store.bytes_per_block
    assert coalesce([(0, 4), (4, 4), (10, 2)]) == [(0, 8), (10, 2)]
    with pytest.raises(ValueError):
        store.segments([NUM_BLOCKS])


def test_gpu_layout_has_one_run_per_kv_half_and_gather_scatter_round_trip() -> None:
    src, dst = KVBlockStore(gpu_like_caches(1), NUM_BLOCKS), KVBlockStore(
        gpu_like_caches(2), NUM_BLOCKS)
    assert all(lay.block_dim == 1 and len(lay.lead_offsets) == 2 for lay in src.layers)
    assert len(src.segments([5])) == 4  # 2 layers x (K, V)
    for s_lay, d_lay in zip(src.layers, dst.layers, strict=True):
        dst.scatter(d_lay, [7, 1], src.gather(s_lay, [2, 3]))
        assert torch.equal(d_lay.tensor[:, 7], s_lay.tensor[:, 2])
        assert torch.equal(d_lay.tensor[:, 1], s_lay.tensor[:, 3])


def test_signature_differs_when_layouts_differ() -> None:
    a = KVBlockStore(cpu_caches(0), NUM_BLOCKS)
    assert a.signature() == KVBlockStore(cpu_caches(5), NUM_BLOCKS).signature()
    assert a.signature() != KVBlockStore(cpu_caches(0, layers=3), NUM_BLOCKS).signature()


# --- lease ----------------------------------------------------------------------------

def test_lease_released_once_and_expiry_skips_busy_leases() -> None:
    now = [100.0]
    table = LeaseTable(clock=lambda: now[0])
    table.hold("t1", "req-1", [1, 2], ttl_s=10)
    table.hold("t2", "req-2", [3], ttl_s=10)
    lease = table.claim("t1")
    assert lease is not None and lease.block_ids == (1, 2)
    assert table.claim("t1") is None  # one reader at a time
    now[0] = 200.0
    assert table.expire() == 1  # t2 expired, t1 is being read
    assert table.take_released() == {"req-2"}
    assert table.release("t1") and not table.release("t1")
    assert table.take_released() == {"req-1"} and table.take_released() == set()
    assert len(table) == 0 and table.expired_count == 1


def test_claim_waits_for_a_lease_registered_later() -> None:
    table = LeaseTable()
    timer = threading.Timer(0.05, table.hold, args=("late", "req", [0], 5.0))
    timer.start()
    assert table.claim("late", wait_s=5.0) is not None
    assert table.claim("never", wait_s=0.01) is None


# --- params ---------------------------------------------------------------------------

def test_params_round_trip_and_reject_incomplete() -> None:
    remote = RemoteBlocks("tid", "10.0.0.2", 5901, (4, 5), 200, "eng")
    params = remote.to_params()
    assert params["do_remote_prefill"] is True and params["transfer_id"] == "tid"
    assert RemoteBlocks.from_params(params) == remote
    assert RemoteBlocks.from_params({**params, "remote_block_ids": [[4, 5]]}) == remote
    assert RemoteBlocks.from_params({"do_remote_prefill": True}) is None
    assert RemoteBlocks.from_params({**params, "do_remote_prefill": False}) is None


# --- CPU transport through the real server and loader --------------------------------

class Pair:
    """A producer (server) and a consumer (loader) in this process."""

    def __init__(self, transport_p, transport_c, producer_caches=None) -> None:
        self.p_caches = producer_caches or cpu_caches(10)
        self.c_caches = cpu_caches(20)
        self.p_store = KVBlockStore(self.p_caches, NUM_BLOCKS)
        self.c_store = KVBlockStore(self.c_caches, NUM_BLOCKS)
        self.leases = LeaseTable()
        self.p_stats, self.c_stats = StatsRecorder(), StatsRecorder()
        self.server = BlockServer("127.0.0.1", 0, self.p_store, self.leases, transport_p,
                                  self.p_stats)
        self.loader = BlockLoader(self.c_store, transport_c, self.c_stats)

    def job(self, tid: str, remote: list[int], local: list[int], port: int | None = None
            ) -> PullJob:
        return PullJob("req-" + tid, tid, "127.0.0.1", port or self.server.port,
                       tuple(remote), tuple(local))

    def copied(self, remote: list[int], local: list[int]) -> bool:
        return all(torch.equal(self.c_caches[n][local], self.p_caches[n][remote])
                   for n in self.p_caches)

    def close(self) -> None:
        self.server.close()
        self.loader.close()


@pytest.mark.parametrize("allow_cma", [True, False], ids=["same-host-cma", "tcp"])
def test_cpu_pull_copies_blocks_and_releases_the_lease(allow_cma: bool) -> None:
    pair = Pair(CpuTransport(allow_cma), CpuTransport(allow_cma))
    try:
        pair.leases.hold("t", "req-p", [2, 3, 4, 11], ttl_s=30)
        nbytes = pair.loader.pull(pair.job("t", [2, 3, 4, 11], [0, 1, 7, 8]))
        assert nbytes == 4 * pair.c_store.bytes_per_block
        assert pair.copied([2, 3, 4, 11], [0, 1, 7, 8])
        assert not pair.copied([5], [5])  # untouched blocks stay different
        assert released(pair.leases, {"req-p"}) == {"req-p"} and len(pair.leases) == 0
    finally:
        pair.close()


def test_cma_refusal_falls_back_to_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cma, "read_from", refuse)
    pair = Pair(CpuTransport(), CpuTransport())
    try:
        pair.leases.hold("t", "req-p", [6], ttl_s=30)
        pair.loader.pull(pair.job("t", [6], [9]))
        assert pair.copied([6], [9])
    finally:
        pair.close()


def test_failed_pulls_are_reported_not_hung() -> None:
    pair = Pair(CpuTransport(), CpuTransport())
    dead_port = pair.server.port
    try:
        pair.leases.hold("ok", "req-ok", [1], ttl_s=30)
        pair.loader.submit(pair.job("ok", [1], [1]))
        pair.loader.submit(pair.job("unknown", [1], [2]))  # no lease: producer says no
        pair.loader.submit(pair.job("outside", [1, 2], [3, 4]))
        done, failed = set(), set()
        while len(done) < 3:
            d, f = pair.loader.take_results()
            done |= d
            failed |= f
        assert done == {"req-ok", "req-unknown", "req-outside"}
        assert failed == {"req-unknown", "req-outside"}
    finally:
        pair.close()
    # The producer is gone entirely: refused at once, reported as failed.
    loader = BlockLoader(pair.c_store, CpuTransport(), StatsRecorder())
    with pytest.raises(ConnectionError):
        loader.pull(pair.job("x", [1], [1], port=dead_port))
    loader.close()


def test_layout_mismatch_is_refused_and_frees_the_lease() -> None:
    pair = Pair(CpuTransport(), CpuTransport(), producer_caches=cpu_caches(10, layers=3))
    try:
        pair.leases.hold("t", "req-p", [1], ttl_s=30)
        with pytest.raises(RuntimeError, match="layouts differ"):
            pair.loader.pull(pair.job("t", [1], [1]))
        assert released(pair.leases, {"req-p"}) == {"req-p"}
    finally:
        pair.close()


# --- scheduler side -------------------------------------------------------------------

def _request(params, *, prompt_len=300, computed=0, status=None, req_id="r1"):
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(request_id=req_id, kv_transfer_params=params,
                           num_prompt_tokens=prompt_len, num_computed_tokens=computed,
                           status=status or RequestStatus.FINISHED_LENGTH_CAPPED)


def _blocks(ids, cached=0):
    group = [SimpleNamespace(block_id=b, block_hash=("h" if i < cached else None),
                             is_null=False) for i, b in enumerate(ids)]
    return SimpleNamespace(blocks=(group,))


def _sched() -> FulcrumScheduler:
    return FulcrumScheduler(engine_id="eng-p", host="10.1.1.1", port=5900, block_size=128)


def test_producer_holds_prompt_blocks_and_returns_nixl_shaped_params() -> None:
    sched = _sched()
    req = _request({"do_remote_decode": True, "do_remote_prefill": False,
                    "transfer_id": "mine"}, computed=300)
    delay, params = sched.request_finished(req, [7, 8, 9, 10])
    assert delay is True
    assert params["do_remote_prefill"] is True and params["transfer_id"] == "mine"
    assert params["remote_block_ids"] == [7, 8, 9]  # ceil(300 / 128) blocks
    assert params["remote_num_tokens"] == 300 and params["remote_port"] == 5900
    meta = sched.build_connector_meta()
    assert [(h.req_id, h.transfer_id, h.block_ids) for h in meta.holds] == \
        [("r1", "mine", (7, 8, 9))]
    assert sched.build_connector_meta().holds == []  # each step's metadata once


def test_aborted_prefill_and_plain_requests_free_blocks_at_once() -> None:
    from vllm.v1.request import RequestStatus

    sched = _sched()
    aborted = _request({"do_remote_decode": True}, computed=300,
                       status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(aborted, [1, 2, 3]) == (False, None)
    assert sched.request_finished(_request(None), [1]) == (False, None)
    assert sched.build_connector_meta().holds == []


def test_consumer_pulls_only_what_its_prefix_cache_lacks() -> None:
    sched = _sched()
    params = RemoteBlocks("tid", "10.1.1.1", 5900, (7, 8, 9), 300).to_params()
    req = _request(params, prompt_len=300)
    assert sched.get_num_new_matched_tokens(req, 0) == (300, True)
    assert sched.get_num_new_matched_tokens(req, 128) == (172, True)
    sched.update_state_after_alloc(req, _blocks([40, 41, 42], cached=1), 172)
    (pull,) = sched.build_connector_meta().pulls
    assert pull.remote_block_ids == (8, 9) and pull.local_block_ids == (41, 42)
    assert pull.transfer_id == "tid" and pull.port == 5900
    # Once scheduled, the request never asks for the remote KV again.
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)


def test_consumer_releases_the_producer_when_it_needs_nothing() -> None:
    sched = _sched()
    full_hit = _request(RemoteBlocks("a", "h", 1, (1,), 100).to_params(), req_id="a")
    sched.update_state_after_alloc(full_hit, _blocks([5], cached=1), 0)
    never_scheduled = _request(RemoteBlocks("b", "h", 1, (1,), 100).to_params(), req_id="b")
    assert sched.request_finished(never_scheduled, []) == (False, None)
    meta = sched.build_connector_meta()
    assert [r.transfer_id for r in meta.releases] == ["a", "b"] and not meta.pulls


# --- NCCL transport at its seams (fake communicator, CPU tensors) ---------------------

class FakeNccl:
    """Pairs of in-process queues standing in for 2-rank NCCL communicators."""

    def __init__(self) -> None:
        self.links: dict[int, dict[int, queue.Queue]] = {}
        self.created: list[tuple[int, int]] = []
        self.closed = 0
        self.fail_next_send = False
        self._lock = threading.Lock()

    def factory(self, host: str, port: int, rank: int, device: torch.device):
        with self._lock:
            link = self.links.setdefault(port, {0: queue.Queue(), 1: queue.Queue()})
            self.created.append((port, rank))
        fake = self

        class Comm:
            def send(self, tensor: torch.Tensor, peer: int) -> None:
                if fake.fail_next_send:
                    fake.fail_next_send = False
                    raise RuntimeError("NCCL error: unhandled system error")
                link[peer].put(tensor.clone())

            def recv(self, tensor: torch.Tensor, peer: int) -> None:
                tensor.copy_(link[rank].get(timeout=5))

            def close(self) -> None:
                fake.closed += 1

        return Comm()


def _nccl_pair(fake: FakeNccl, max_peers: int = 8) -> tuple[Pair, NcclTransport,
                                                             NcclTransport]:
    make = functools.partial(NcclTransport, "cpu", comm_factory=fake.factory,
                             max_peers=max_peers)
    producer, consumer = make(instance_id="P"), make(instance_id="C")
    return Pair(producer, consumer), producer, consumer


def test_nccl_moves_blocks_through_the_same_server_and_loader() -> None:
    fake = FakeNccl()
    pair, producer, consumer = _nccl_pair(fake)
    try:
        for tid, remote, local in (("a", [1, 2], [3, 4]), ("b", [5], [6])):
            pair.leases.hold(tid, "req-" + tid, remote, ttl_s=30)
            assert pair.loader.pull(pair.job(tid, remote, local)) == \
                len(remote) * pair.c_store.bytes_per_block
            assert pair.copied(remote, local)
        # One communicator per pair, created lazily on the first transfer, then reused.
        assert sorted(r for _, r in fake.created) == [0, 1]
        assert producer.comms.peers() == ["C"] and consumer.comms.peers() == ["P"]
        assert released(pair.leases, {"req-a", "req-b"}) == {"req-a", "req-b"}
    finally:
        pair.close()


def test_nccl_rebuilds_after_one_side_evicted_and_drops_broken_comms() -> None:
    fake = FakeNccl()
    pair, producer, consumer = _nccl_pair(fake)
    try:
        pair.leases.hold("a", "req-a", [1], ttl_s=30)
        pair.loader.pull(pair.job("a", [1], [1]))
        producer.comms.drop("C")  # e.g. evicted by the producer's LRU bound
        pair.leases.hold("b", "req-b", [2], ttl_s=30)
        pair.loader.pull(pair.job("b", [2], [2]))
        assert len(fake.created) == 4 and pair.copied([2], [2])
        fake.fail_next_send = True
        pair.leases.hold("c", "req-c", [3], ttl_s=30)
        pair.loader.submit(pair.job("c", [3], [3]))
        failed: set[str] = set()
        while not failed:
            failed = pair.loader.take_results()[1]
        assert failed == {"req-c"} and producer.comms.peers() == []
    finally:
        pair.close()


def test_comm_cache_is_bounded_and_closes_what_it_evicts() -> None:
    closed: list[str] = []
    cache = CommCache(max_peers=2)
    for name in ("a", "b", "c"):
        cache.put(name, SimpleNamespace(close=functools.partial(closed.append, name)))
    assert cache.peers() == ["b", "c"] and closed == ["a"]
    assert cache.get("b") is not None  # b becomes most recent
    cache.put("d", SimpleNamespace(close=functools.partial(closed.append, "d")))
    assert cache.peers() == ["b", "d"] and closed == ["a", "c"]


def test_nccl_refuses_a_cpu_peer() -> None:
    fake = FakeNccl()
    pair = Pair(NcclTransport("cpu", comm_factory=fake.factory), CpuTransport())
    try:
        pair.leases.hold("t", "req-t", [1], ttl_s=30)
        with pytest.raises(RuntimeError):
            pair.loader.pull(pair.job("t", [1], [1]))
        assert released(pair.leases, {"req-t"}) == {"req-t"} and fake.created == []
    finally:
        pair.close()


# --- stats, metrics, settings ---------------------------------------------------------

def test_stats_aggregate_reduce_and_prometheus_export() -> None:
    rec = StatsRecorder()
    assert rec.drain() is None
    rec.pulled(1_000_000, 0.001)
    rec.served(500)
    rec.failed()
    stats = rec.drain()
    assert stats is not None and rec.drain() is None
    total = FulcrumStats().aggregate(stats).aggregate(FulcrumStats(data=stats.data.copy()))
    reduced = total.reduce()
    assert reduced["num_pulls"] == 2 and reduced["num_failed"] == 2
    assert reduced["pull_GBps"] == pytest.approx(1.0)

    registry = prometheus_client.CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in
             (prometheus_client.Gauge, prometheus_client.Counter, prometheus_client.Histogram)}
    prom = FulcrumPromMetrics(SimpleNamespace(kv_transfer_config=None), types,
                              ["model_name", "engine"], {0: ["tiny", "0"]})
    prom.observe(total.data, 0)
    value = functools.partial(registry.get_sample_value,
                              labels={"model_name": "tiny", "engine": "0"})
    assert value("vllm:fulcrum_kv_bytes_pulled_total") == 2_000_000
    assert value("vllm:fulcrum_kv_transfer_seconds_count") == 2
    assert value("vllm:fulcrum_kv_failed_transfers_total") == 2
    assert value("vllm:fulcrum_kv_bytes_served_total") == 1000


def test_fulcrum_worker_settings() -> None:
    kv = worker_kv_settings("fulcrum", side_channel_port=5911, host="10.0.0.7")
    cfg = kv.kv_transfer_config
    assert cfg["kv_connector"] == "FulcrumConnector" and cfg["kv_role"] == "kv_both"
    assert cfg["kv_connector_module_path"] == "kv_transfer.fulcrum.connector"
    assert cfg["kv_load_failure_policy"] == "recompute"
    assert cfg["kv_connector_extra_config"]["port"] == 5911
    assert cfg["kv_connector_extra_config"]["host"] == "10.0.0.7"
    assert worker_kv_settings("nixl", side_channel_port=5911).connector == "nixl"


def test_direct_hold_reaches_the_worker_without_a_step_and_a_pull_reads_it() -> None:
    from kv_transfer.fulcrum.notify import HoldNotifier

    pair = Pair(CpuTransport(), CpuTransport())
    notifier = HoldNotifier("127.0.0.1", pair.server.port, lease_s=30)
    try:
        sched = FulcrumScheduler(engine_id="eng-p", host="127.0.0.1", port=pair.server.port,
                                 block_size=128, notifier=notifier)
        for tid in ("d1", "d2"):  # two holds over the one kept-open connection
            req = _request({"do_remote_decode": True, "transfer_id": tid}, computed=300,
                           req_id="req-" + tid)
            assert sched.request_finished(req, [2, 3, 4])[0] is True
        deadline = time.monotonic() + 10
        while len(pair.leases) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pair.leases) == 2  # no engine step carried them
        assert sched.build_connector_meta().holds == []
        pair.loader.pull(pair.job("d2", [2, 3, 4], [5, 6, 7]))
        assert pair.copied([2, 3, 4], [5, 6, 7])
        assert released(pair.leases, {"req-d2"}) == {"req-d2"}
    finally:
        notifier.close()
        pair.close()


def test_an_undeliverable_hold_falls_back_to_the_step_metadata() -> None:
    from kv_transfer.fulcrum.notify import HoldNotifier

    pair = Pair(CpuTransport(), CpuTransport())
    port = pair.server.port
    pair.close()  # nobody listens there any more
    notifier = HoldNotifier("127.0.0.1", port, lease_s=30)
    try:
        sched = FulcrumScheduler(engine_id="eng-p", host="127.0.0.1", port=port,
                                 block_size=128, notifier=notifier)
        req = _request({"do_remote_decode": True, "transfer_id": "x"}, computed=300)
        sched.request_finished(req, [7, 8, 9])
        holds: list = []
        deadline = time.monotonic() + 10
        while not holds and time.monotonic() < deadline:
            holds = sched.build_connector_meta().holds
            time.sleep(0.01)
        assert [(h.transfer_id, h.block_ids) for h in holds] == [("x", (7, 8, 9))]
    finally:
        notifier.close()


def test_holds_are_refused_from_other_hosts() -> None:
    from kv_transfer.fulcrum.server import msg_peer_is_local

    class Sock:
        def __init__(self, peer: str) -> None:
            self.peer = peer

        def getpeername(self) -> tuple[str, int]:
            return (self.peer, 1234)

    assert msg_peer_is_local(Sock("127.0.0.1")) and msg_peer_is_local(Sock("::1"))
    assert not msg_peer_is_local(Sock("10.0.0.7"))


# --- migration: an aborted request's blocks, read by position --------------------------

def test_aborted_request_with_a_migration_hold_keeps_its_processed_blocks() -> None:
    from vllm.v1.request import RequestStatus

    sched = _sched()
    hold = MigrationHold("mig-1", ttl_s=4.0).to_params()
    running = _request({**hold}, computed=300, status=RequestStatus.FINISHED_ABORTED)
    running.num_in_flight_tokens = 1  # the async step in flight has not written its slot
    assert sched.request_finished(running, [7, 8, 9]) == (True, None)
    (job,) = sched.build_connector_meta().holds
    assert (job.transfer_id, job.block_ids, job.ttl_s, job.num_tokens) == \
        ("mig-1", (7, 8, 9), 4.0, 299)
    # Without a hold, or finished normally, the blocks go back at once.
    plain = _request(None, computed=300, status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(plain, [7, 8, 9]) == (False, None)
    done = _request({**hold}, computed=300, status=RequestStatus.FINISHED_STOPPED)
    assert sched.request_finished(done, [7, 8, 9]) == (False, None)
    nothing_yet = _request({**hold}, computed=0, status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(nothing_yet, [7]) == (False, None)
    assert sched.build_connector_meta().holds == []


def test_a_request_aborted_while_its_pull_runs_is_not_held() -> None:
    from vllm.v1.request import RequestStatus

    sched = _sched()
    params = {**RemoteBlocks("tid", "h", 1, (1, 2, 3), 300).to_params(),
              **MigrationHold("mig-2", 5.0).to_params()}
    req = _request(params, prompt_len=301, computed=128)
    sched.update_state_after_alloc(req, _blocks([40, 41, 42], cached=1), 172)
    assert len(sched.build_connector_meta().pulls) == 1
    req.status = RequestStatus.FINISHED_ABORTED  # vLLM frees it once the pull ends
    assert sched.request_finished(req, [40, 41, 42]) == (False, None)
    # Once vLLM saw the pull finish, an abort holds the blocks for a migration.
    again = _request(params, prompt_len=301, computed=128, req_id="r2")
    sched.update_state_after_alloc(again, _blocks([50, 51, 52], cached=1), 172)
    sched.pulls_finished({"r2"})
    again.num_computed_tokens, again.status = 310, RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(again, [50, 51, 52]) == (True, None)


def test_continuation_params_pull_lease_positions_past_the_local_prefix() -> None:
    params = lease_pull_params("mig-3", "10.1.1.2", 5901, num_tokens=300)
    remote = RemoteBlocks.from_params(params)
    assert remote is not None and remote.by_position and remote.num_tokens == 300
    assert remote.blocks_to_read(128) == (0, 1, 2)
    sched = _sched()
    req = _request(params, prompt_len=301)
    assert sched.get_num_new_matched_tokens(req, 128) == (172, True)
    sched.update_state_after_alloc(req, _blocks([40, 41, 42], cached=1), 172)
    (pull,) = sched.build_connector_meta().pulls
    assert pull.by_position and pull.remote_block_ids == (1, 2)
    assert pull.local_block_ids == (41, 42) and pull.num_tokens == 300
    assert MigrationHold.from_params({"migration_hold": {"ttl_s": 3}}) is None
    assert MigrationHold.from_params({"migration_hold": {"transfer_id": "x",
                                                         "ttl_s": "soon"}}) is None


def test_lease_resolves_positions_and_refuses_reads_past_its_tokens() -> None:
    table = LeaseTable()
    table.hold("m", "req-m", [9, 4, 6], ttl_s=5, num_tokens=300)
    lease = table.claim("m")
    assert lease is not None
    assert lease.resolve([0, 2], by_position=True, num_tokens=250) == [9, 6]
    assert "positions outside" in lease.resolve([3], by_position=True)
    assert "holds 300 tokens" in lease.resolve([0], by_position=True, num_tokens=301)
    assert lease.resolve([4, 9], by_position=False) == [4, 9]
    assert "outside the lease" in lease.resolve([5], by_position=False)


@pytest.mark.parametrize("allow_cma", [True, False], ids=["same-host-cma", "tcp"])
def test_pull_by_position_copies_the_held_blocks_in_order(allow_cma: bool) -> None:
    pair = Pair(CpuTransport(allow_cma), CpuTransport(allow_cma))
    try:
        pair.leases.hold("m", "req-m", [11, 3, 5], ttl_s=30, num_tokens=10)
        job = PullJob("req-c", "m", "127.0.0.1", pair.server.port, (1, 2), (0, 7),
                      by_position=True, num_tokens=10)
        assert pair.loader.pull(job) == 2 * pair.c_store.bytes_per_block
        assert pair.copied([3, 5], [0, 7])
        assert released(pair.leases, {"req-m"}) == {"req-m"}
        pair.leases.hold("short", "req-s", [1, 2], ttl_s=30, num_tokens=5)
        too_far = PullJob("req-c2", "short", "127.0.0.1", pair.server.port, (0, 1),
                          (8, 9), by_position=True, num_tokens=6)
        with pytest.raises(RuntimeError, match="holds 5 tokens"):
            pair.loader.pull(too_far)
        assert released(pair.leases, {"req-s"}) == {"req-s"}  # the producer frees it
    finally:
        pair.close()


def test_a_release_that_outruns_its_hold_frees_the_blocks_when_the_hold_comes() -> None:
    now = [100.0]
    table = LeaseTable(clock=lambda: now[0])
    assert table.release("early") is False  # the gateway's release, before the abort
    table.hold("early", "req-e", [1, 2], ttl_s=30)
    assert len(table) == 0 and table.take_released() == {"req-e"}
    table.release("stale")
    now[0] += 120  # forgotten after a while: a much later hold is kept
    table.expire()
    table.hold("stale", "req-s", [3], ttl_s=30)
    assert len(table) == 1 and table.take_released() == set()


def test_nccl_pull_by_position_moves_a_migrated_requests_blocks() -> None:
    fake = FakeNccl()
    pair, _, _ = _nccl_pair(fake)
    try:
        pair.leases.hold("m", "req-m", [9, 2, 6], ttl_s=30, num_tokens=40)
        job = PullJob("req-c", "m", "127.0.0.1", pair.server.port, (0, 1, 2), (1, 3, 5),
                      by_position=True, num_tokens=40)
        assert pair.loader.pull(job) == 3 * pair.c_store.bytes_per_block
        assert pair.copied([9, 2, 6], [1, 3, 5])
        assert released(pair.leases, {"req-m"}) == {"req-m"}
    finally:
        pair.close()
