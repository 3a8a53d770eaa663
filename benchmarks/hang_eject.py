"""How fast a hung worker leaves rotation, and what the hang costs the requests meanwhile.

    python -m benchmarks.hang_eject --rounds 5        # ~5 minutes on 2 cores

Starts `fulcrum up --model tiny` with three workers (1 prefill, 2 decode, no
controller) under light load (`--clients` closed-loop clients, short completions,
streamed and not). Each round SIGSTOPs the prefill worker, then (separately) a decode
worker, and measures:
- `eject_s`: from the SIGSTOP to the gateway's `/admin/workers` showing the worker
  `healthy: false` (polled every 20 ms);
- the requests that were in flight at the SIGSTOP or started before the ejection: their
  end-to-end latency beside the median of the requests between hangs (the baseline),
  and how each ended (every one should complete).
The worker gets SIGCONT after `--hang` seconds and the next hang waits until it is back
in rotation. Writes benchmarks/results/hang_eject.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.chaos import MODEL, RESULTS, start_cluster, stop_cluster

POLL_S = 0.02


@dataclass
class Request:
    started: float
    ended: float
    ok: bool
    stream: bool
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


def _one(client: httpx.Client, url: str, rng: random.Random) -> Request:
    stream = rng.random() < 0.5
    body = {"model": MODEL, "prompt": f"{rng.random():.6f} tell me a story about",
            "max_tokens": 16, "ignore_eos": True, "temperature": 0, "stream": stream}
    started = time.monotonic()
    try:
        if not stream:
            resp = client.post(url + "/v1/completions", json=body)
            ok = resp.status_code == 200 and \
                resp.json()["usage"]["completion_tokens"] == 16
            return Request(started, time.monotonic(), ok, False,
                           "" if ok else f"HTTP {resp.status_code} {resp.text[:80]}")
        error, done = "", False
        with client.stream("POST", url + "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {") and "error" in json.loads(line[6:]):
                    error = line[:120]  # parsed: the random model's text may say "error"
        ok = resp.status_code == 200 and done and not error
        return Request(started, time.monotonic(), ok, True,
                       error or ("" if done else "no [DONE]"))
    except httpx.HTTPError as exc:
        return Request(started, time.monotonic(), False, stream, repr(exc)[:120])


class HangBench:
    def __init__(self, url: str, *, rounds: int, clients: int, hang_s: float,
                 seed: int) -> None:
        self.url, self.rounds, self.clients, self.hang_s = url, rounds, clients, hang_s
        self.rng = random.Random(seed)
        self.seed = seed
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def workers(self) -> dict[str, dict]:
        ws = httpx.get(self.url + "/admin/workers", timeout=5).json()["workers"]
        return {w["name"]: w for w in ws}

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
            while not self.stop.is_set():
                r = _one(client, self.url, rng)
                with self.lock:
                    self.requests.append(r)

    def _wait(self, name: str, healthy: bool, timeout_s: float) -> float | None:
        """Seconds until `name`'s `healthy` flag reads `healthy` (None: not in time)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            try:
                if self.workers()[name]["healthy"] == healthy:
                    return time.monotonic() - began
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(POLL_S)
        return None

    def _hang(self, role: str) -> dict:
        workers = self.workers()
        pool = sorted(n for n, w in workers.items() if w["role"] == role and w["pid"])
        name = self.rng.choice(pool)
        pid = workers[name]["pid"]
        stopped_at = time.monotonic()
        os.killpg(pid, signal.SIGSTOP)
        try:
            eject_s = self._wait(name, False, self.hang_s)
            time.sleep(max(0.0, self.hang_s - (time.monotonic() - stopped_at)))
        finally:
            os.killpg(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        back_s = self._wait(name, True, 60)
        return {"role": role, "worker": name, "eject_s": None if eject_s is None
                else round(eject_s, 3), "back_in_rotation_after_sigcont_s":
                None if back_s is None else round(back_s, 3),
                "_stopped_at": stopped_at, "_resumed_at": resumed_at}

    def run(self) -> dict:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        time.sleep(10)  # warm-up, and a first stretch of baseline
        hangs = []
        for _ in range(self.rounds):
            for role in ("prefill", "decode"):
                hangs.append(self._hang(role))
                time.sleep(5)  # baseline between hangs
        self.stop.set()
        for t in threads:
            t.join(timeout=150)
        return self.report(hangs, t0)

    def report(self, hangs: list[dict], t0: float) -> dict:
        reqs = sorted(self.requests, key=lambda r: r.started)
        warm = [r for r in reqs if r.started > t0 + 5]
        windows = []
        for h in hangs:
            out_at = h["_stopped_at"] + (h["eject_s"] if h["eject_s"] is not None
                                         else self.hang_s)
            # hit by the hang: in flight at the SIGSTOP, or sent before the ejection
            h["_hit"] = [r for r in warm if r.started < out_at and r.ended > h["_stopped_at"]]
            windows.append((h["_stopped_at"], h["_resumed_at"] + 3.0))
        quiet = [r for r in warm if r.ok and not any(r.started < b and r.ended > a
                                                     for a, b in windows)]
        base = statistics.median([r.latency_s for r in quiet]) if quiet else None
        rows = []
        for h in hangs:
            hit = h.pop("_hit")
            lat = [r.latency_s for r in hit]
            row = {k: v for k, v in h.items() if not k.startswith("_")}
            row.update(requests_hit=len(hit), failed=sum(not r.ok for r in hit),
                       failures=[r.detail for r in hit if not r.ok],
                       latency_s_max=round(max(lat), 3) if lat else None,
                       latency_s_median=round(statistics.median(lat), 3) if lat else None,
                       added_latency_s_max=round(max(lat) - base, 3) if lat and base
                       else None)
            rows.append(row)
        summary = {}
        for role in ("prefill", "decode"):
            ej = [r["eject_s"] for r in rows if r["role"] == role and r["eject_s"] is not None]
            added = [r["added_latency_s_max"] for r in rows
                     if r["role"] == role and r["added_latency_s_max"] is not None]
            summary[role] = {
                "rounds": sum(r["role"] == role for r in rows),
                "ejected": len(ej),
                "eject_s": {"min": min(ej), "median": round(statistics.median(ej), 3),
                            "max": max(ej)} if ej else None,
                "within_3s": sum(e <= 3.0 for e in ej),
                "added_latency_s_max": {"median": round(statistics.median(added), 3),
                                        "max": max(added)} if added else None,
                "requests_hit": sum(r["requests_hit"] for r in rows if r["role"] == role),
                "failed": sum(r["failed"] for r in rows if r["role"] == role)}
        return {"summary": summary, "baseline_latency_s_median": round(base, 3) if base
                else None, "requests": len(reqs), "requests_failed": sum(not r.ok for r in reqs),
                "hangs": rows, "requests_detail": [asdict(r) | {"t": round(r.started - t0, 3)}
                                                   for r in reqs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--hang", type=float, default=6.0, help="seconds each SIGSTOP lasts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", default=".fulcrum/hang-eject-logs")
    parser.add_argument("--out", default=str(RESULTS / "hang_eject.json"))
    parser.add_argument("gateway_args", nargs="*",
                        help="extra `fulcrum up` options after --, e.g. -- --health-timeout 0.5")
    args = parser.parse_args(argv)
    proc, url = start_cluster(Path(args.log_dir), tuple(args.gateway_args), control=False)
    try:
        bench = HangBench(url, rounds=args.rounds, clients=args.clients, hang_s=args.hang,
                          seed=args.seed)
        result = bench.run()
    finally:
        stop_cluster(proc)
    result["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("summary", "baseline_latency_s_median",
                                              "requests", "requests_failed")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
