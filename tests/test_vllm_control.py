"""The control plane on real vLLM CPU workers: manual flips under load, and the
dopd and arrow policies moving a worker to the prefill pool when the traffic turns
prompt-heavy and back when it turns output-heavy.

Three workers (one prefill, two decode) share this machine's two cores, so absolute
latencies are noisy. The arrow test therefore sets its SLO targets per phase so that
one side is clearly over target and the other clearly under; the policy still has to
read that from the workers' own TTFT/ITL histograms and act on it.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.vllm_cluster import MODEL_NAME, LiveCluster, start_cluster

pytestmark = pytest.mark.vllm

_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp("control"), workers=3, extra_args=(
        "--prefill-workers", "1", "--control-policy", "dopd", "--advisory",
        "--control-interval", "1", "--control-window", "6",
        "--control-knob", "adjustment_interval_s=3", "--control-knob", "forecast_horizon_s=0"))
    try:
        yield live
    finally:
        live.stop()


class Load:
    """Closed-loop load: `concurrency` clients sending requests until stopped."""

    def __init__(self, url: str, prompt_words: int, max_tokens: int, concurrency: int,
                 stream: bool = False) -> None:
        self.url, self.words, self.max_tokens, self.stream = url, prompt_words, max_tokens, stream
        self.results: list[tuple[int, int]] = []  # (status, completion tokens)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(concurrency)]

    def _one(self, client: httpx.Client) -> tuple[int, int]:
        prompt = f"{random.random()} " + " ".join(random.choice(_WORDS)
                                                   for _ in range(self.words))
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": self.stream}
        if not self.stream:
            r = client.post(self.url + "/v1/completions", json=body)
            return r.status_code, (r.json().get("usage") or {}).get("completion_tokens", 0)
        body["stream_options"] = {"include_usage": True}
        tokens, status = 0, 0
        with client.stream("POST", self.url + "/v1/completions", json=body) as r:
            status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                # parsed, not searched: the random model's text can contain "error" itself
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    status = 599
                if chunk.get("usage") and not chunk.get("choices"):
                    tokens = chunk["usage"]["completion_tokens"]
        return status, tokens

    def _run(self) -> None:
        with httpx.Client(timeout=180) as client:
            while not self._stop.is_set():
                try:
                    self.results.append(self._one(client))
                except httpx.HTTPError:
                    self.results.append((598, 0))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=200)

    def assert_all_served(self) -> None:
        assert self.results, "no request completed"
        bad = [r for r in self.results if r != (200, self.max_tokens)]
        assert not bad, f"{len(bad)} of {len(self.results)} requests lost or short: {bad[:5]}"


def _roles(cluster: LiveCluster) -> dict[str, str]:
    return {n: w["role"] for n, w in cluster.workers().items()}


def _pools(cluster: LiveCluster) -> tuple[int, int]:
    roles = list(_roles(cluster).values())
    return roles.count("prefill"), roles.count("decode")


def _admin(cluster: LiveCluster, method: str, path: str, **body: object) -> httpx.Response:
    return httpx.request(method, cluster.url + "/admin" + path, json=body or None, timeout=200)


def _wait_for_pools(cluster: LiveCluster, prefill: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _pools(cluster)[0] == prefill and not _admin(cluster, "GET", "/flips").json()["active"]:
            return True
        time.sleep(0.5)
    return False


def test_dry_run_and_pool_guard_change_nothing(cluster: LiveCluster) -> None:
    before = _roles(cluster)
    prefill = next(n for n, r in before.items() if r == "prefill")
    decode = next(n for n, r in before.items() if r == "decode")
    dry = _admin(cluster, "POST", "/flip", worker=decode, to="prefill", dry_run=True)
    assert dry.status_code == 200 and dry.json()["outcome"] == "dry-run"
    refused = _admin(cluster, "POST", "/flip", worker=prefill, to="decode")
    assert refused.status_code == 409  # it would empty the prefill pool
    assert _roles(cluster) == before


def _busiest_decode_worker(cluster: LiveCluster, timeout_s: float = 30) -> tuple[str, int]:
    """The decode worker with the most decode legs in flight, once one has any."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [(w["in_flight_decode"], n) for n, w in cluster.workers().items()
                if w["role"] == "decode"]
        legs, name = max(rows)
        if legs > 0 or time.monotonic() > deadline:
            return name, legs
        time.sleep(0.05)


def _relabelled_legs(flip: httpx.Response) -> int:
    """How many legs of the old role a relabel left running on the worker."""
    assert flip.status_code == 200 and flip.json()["outcome"] == "done", flip.text
    assert "legs finish in place" in flip.json()["detail"], flip.text
    return int(flip.json()["detail"].split("relabel: ")[1].split()[0])


def _relabel_busiest_decode_worker(cluster: LiveCluster, attempts: int = 5) -> str:
    """Relabel the busiest decode worker to prefill while it has decode legs in flight.

    The legs counted a moment before can all end before the flip lands (the gateway
    shares two cores with three engines); such a relabel is put back and tried again.
    """
    for _ in range(attempts):
        decode, legs = _busiest_decode_worker(cluster)
        assert legs > 0, "no stream reached a decode worker"
        if _relabelled_legs(_admin(cluster, "POST", "/flip", worker=decode, to="prefill",
                                   mode="relabel")) > 0:
            return decode
        _relabelled_legs(_admin(cluster, "POST", "/flip", worker=decode, to="decode",
                                mode="relabel"))
    pytest.fail(f"no relabel in {attempts} caught a decode leg in flight")


def test_manual_flips_under_load_lose_no_request(cluster: LiveCluster) -> None:
    before = _roles(cluster)
    try:
        # long streams, so the worker that is relabelled has decodes running through it
        with Load(cluster.url, 20, 300, 3, stream=True) as streams, \
                Load(cluster.url, 20, 40, 3) as plain:
            time.sleep(3)
            decode = _relabel_busiest_decode_worker(cluster)
            assert _roles(cluster)[decode] == "prefill"
            time.sleep(3)
            back = _admin(cluster, "POST", "/flip", worker=decode, to="decode", mode="drain")
            assert back.status_code == 200 and back.json()["outcome"] == "done", back.text
            assert "relabel" not in back.json()["detail"]
            time.sleep(2)
        streams.assert_all_served()
        plain.assert_all_served()
        assert _roles(cluster)[decode] == "decode"
    finally:
        # the swing tests start from the fixture's pools, whatever happened here
        for name, role in before.items():
            if _roles(cluster)[name] != role:
                _admin(cluster, "POST", "/flip", worker=name, to=role, force=True)


def _swing(cluster: LiveCluster) -> None:
    """Prompt-heavy traffic must grow the prefill pool; output-heavy must shrink it."""
    assert _pools(cluster) == (1, 2)
    with Load(cluster.url, 150, 2, 6) as prompt_heavy:
        grew = _wait_for_pools(cluster, 2, timeout_s=120)
    prompt_heavy.assert_all_served()
    assert grew, f"prefill pool did not grow: {_admin(cluster, 'GET', '/explain').text[:2000]}"


def _swing_back(cluster: LiveCluster) -> None:
    with Load(cluster.url, 5, 100, 10, stream=True) as output_heavy:
        shrank = _wait_for_pools(cluster, 1, timeout_s=150)
    output_heavy.assert_all_served()
    assert shrank, f"prefill pool did not shrink: {_admin(cluster, 'GET', '/explain').text[:2000]}"


def test_dopd_follows_the_length_mix_and_back(cluster: LiveCluster) -> None:
    # The flow estimate (rate x mean output length over decode throughput). The default
    # estimate counts decodes in flight over batch slots; with these uncalibrated knobs
    # (256 slots, no step time) 10 tiny streams fill 4% of one worker, so it rightly holds
    # 2P1D here ("both pools have headroom") instead of swinging back.
    knobs = {"decode_estimate": "flow"}
    assert _admin(cluster, "PUT", "/policy", name="dopd", knobs=knobs,
                  advisory=False).status_code == 200
    try:
        _swing(cluster)
        _swing_back(cluster)
    finally:
        _admin(cluster, "PUT", "/policy", advisory=True)
    flips = _admin(cluster, "GET", "/flips").json()["flips"]
    # DOPD states the traffic it sized the pools for ("... ISL 1500 / OSL 8 ...") in each reason
    assert [f["to_role"] for f in flips if "ISL " in f["reason"]][-2:] == ["prefill", "decode"]


def test_arrow_follows_measured_latency_and_back(cluster: LiveCluster) -> None:
    _wait_for_pools(cluster, 1, timeout_s=30)
    knobs = {"sustain_ticks": 2, "cooldown_s": 3, "min_samples": 3}
    # prompt-heavy phase: a TTFT target below even an unqueued prefill of these prompts
    # (~30 ms), so the prefill side is over target however fast the host is today
    resp = _admin(cluster, "PUT", "/policy", name="arrow", knobs=knobs, advisory=False,
                  ttft_s=0.02, tpot_s=10.0)
    assert resp.status_code == 200, resp.text
    try:
        _swing(cluster)
        _admin(cluster, "PUT", "/policy", ttft_s=60.0, tpot_s=0.005)
        _swing_back(cluster)
    finally:
        _admin(cluster, "PUT", "/policy", advisory=True)
    flips = _admin(cluster, "GET", "/flips").json()["flips"]
    by_arrow = [f for f in flips if "TTFT" in f["reason"] or "ITL" in f["reason"]]
    assert [f["to_role"] for f in by_arrow][-2:] == ["prefill", "decode"], by_arrow
