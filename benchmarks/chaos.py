"""Chaos under load on real vLLM CPU workers: kills, hangs and flips while clients run.

    python -m benchmarks.chaos --duration 600          # 10 minutes, ~3 workers on 2 cores

Starts `fulcrum up --model tiny` with three workers (1 prefill, 2 decode) and the
`dopd` controller acting, then for `--duration` seconds runs at once:
- mixed load: completions and chat, streamed and not, short and long prompts;
- faults at random moments: SIGSTOP of a prefill and of a decode worker for a few
  seconds then SIGCONT (a hang the breaker must see), then hangs of random workers
  (one at a time, with every worker up); after `--kill-after` of the run, SIGKILL of a
  prefill and of a decode worker's process group (the manager restarts them; a restart
  takes minutes on 2 shared cores, during which no flip can keep both pools, so kills
  come late; the run then waits for the restarts before reading KV usage);
- manual flips of random workers every `--flip-every` seconds, besides the
  controller's own flips.
Every request ends as exactly one of: `completed` (200 and the whole answer),
`clean_error` (an OpenAI-style error status, or a stream that ends with an error event
and [DONE]), or `lost` (no answer within its deadline, a connection cut without an
error event, or a 200 with a truncated answer). Also recorded: the gateway's RSS over
time and every worker's KV-cache usage once the load has stopped.
Writes benchmarks/results/chaos.json and chaos.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from deploy.ports import free_port_block

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-llama"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
DEADLINE_S = 120.0  # a request without an answer by then is lost


@dataclass
class Outcome:
    """One client request and how it ended."""

    kind: str
    started: float
    ended: float
    outcome: str  # completed | clean_error | lost
    status: int = 0
    reason: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)


def _prompt(rng: random.Random, long: bool) -> str:
    words = rng.randint(60, 150) if long else rng.randint(5, 40)
    return f"{rng.random():.6f} " + " ".join(rng.choice(WORDS) for _ in range(words))


def _error_reason(resp: httpx.Response) -> str | None:
    """The OpenAI error code/message of an error answer, or None if it is not one."""
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(err.get("code") or err.get("type") or err.get("message"))[:80]


def _short(usage: dict | None, asked: int, max_model_len: int) -> str | None:
    """Why an answer with `usage` is incomplete (None: it is whole). vLLM caps
    `max_tokens` at what the context has left, so a capped answer is whole."""
    usage = usage or {}
    got, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens") or 0
    if got == asked or (isinstance(got, int) and prompt + got >= max_model_len):
        return None
    return f"{got} of {asked} tokens (prompt {prompt})"


def one_request(client: httpx.Client, url: str, rng: random.Random,
                headers: dict[str, str], max_model_len: int = 1024) -> Outcome:
    """Send one random request and classify how it ended."""
    chat, stream, long = rng.random() < 0.4, rng.random() < 0.6, rng.random() < 0.3
    max_tokens = rng.randint(8, 48)
    kind = f"{'chat' if chat else 'completion'}-{'stream' if stream else 'plain'}"
    body: dict = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True,
                  "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng, long)}]
    else:
        body["prompt"] = _prompt(rng, long)
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    started = time.time()

    def done(outcome: str, status: int = 0, reason: str = "") -> Outcome:
        return Outcome(kind, started, time.time(), outcome, status, reason)

    try:
        if not stream:
            resp = client.post(url + path, json=body, headers=headers)
            if resp.status_code != 200:
                reason = _error_reason(resp)
                return done("clean_error" if reason else "lost", resp.status_code,
                            reason or f"non-OpenAI error body: {resp.text[:80]!r}")
            short = _short(resp.json().get("usage"), max_tokens, max_model_len)
            if short:
                return done("lost", 200, f"truncated: {short}")
            return done("completed", 200)
        with client.stream("POST", url + path, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                resp.read()
                reason = _error_reason(resp)
                return done("clean_error" if reason else "lost", resp.status_code,
                            reason or "non-OpenAI error body")
            error, saw_done, usage = None, False, None
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    saw_done = True
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = str(chunk["error"].get("code") or chunk["error"]["message"])
                    usage = chunk.get("usage") or usage
        if error is not None:
            return done("clean_error" if saw_done else "lost", 200,
                        f"stream error: {error[:60]}" + ("" if saw_done else ", no [DONE]"))
        if not saw_done:
            return done("lost", 200, "stream cut without an error event")
        short = _short(usage, max_tokens, max_model_len)
        if short:
            return done("lost", 200, f"truncated stream: {short}")
        return done("completed", 200)
    except httpx.TimeoutException:
        return done("lost", 0, f"no answer within {DEADLINE_S:.0f}s")
    except httpx.HTTPError as exc:
        return done("lost", 0, f"connection: {exc.__class__.__name__}")


class Chaos:
    """Drives load, faults and flips against a running gateway for a while."""

    def __init__(self, url: str, gateway_pid: int | None, *, duration_s: float,
                 concurrency: int, flip_every_s: float, fault_every_s: float, seed: int,
                 api_key: str | None = None, max_model_len: int = 1024,
                 kill_after: float = 0.0) -> None:
        self.url, self.gateway_pid, self.duration_s = url, gateway_pid, duration_s
        self.concurrency, self.flip_every_s, self.fault_every_s = (concurrency, flip_every_s,
                                                                   fault_every_s)
        self.rng = random.Random(seed)
        self.seed = seed
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tally = Tally()
        self.max_model_len = max_model_len
        self.stop = threading.Event()
        self.t0 = time.time()
        self.faults: list[dict] = []
        self.manual_flips: Counter = Counter()
        self.flip_records: dict[tuple, dict] = {}
        self.samples: list[dict] = []
        self.stopped: set[int] = set()  # process groups currently SIGSTOPped
        self.kill_after = kill_after
        self._stops = [("SIGSTOP", r) for r in ("prefill", "decode")]
        self._kills = [("SIGKILL", r) for r in ("prefill", "decode")]
        self.rng.shuffle(self._stops)
        self.rng.shuffle(self._kills)

    # -- admin ------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        return httpx.request(method, self.url + "/admin" + path, json=body, timeout=30)

    def workers(self) -> list[dict]:
        return self.admin("GET", "/workers").json()["workers"]

    # -- threads ----------------------------------------------------------------------
    def _client_loop(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(timeout=httpx.Timeout(DEADLINE_S, connect=10)) as client:
            while not self.stop.is_set():
                self.tally.add(one_request(client, self.url, rng, self.headers,
                                           self.max_model_len))

    def _flip_loop(self) -> None:
        while not self.stop.wait(self.flip_every_s * self.rng.uniform(0.5, 1.5)):
            try:
                ready = [w for w in self.workers() if w["state"] == "ready"]
                pools = Counter(w["role"] for w in ready)
                ready = [w for w in ready if pools[w["role"]] >= 2]  # never empty a pool
                if not ready:
                    continue
                w = self.rng.choice(ready)
                to = "prefill" if w["role"] == "decode" else "decode"
                mode = self.rng.choice(("relabel", "drain"))  # both flip modes under faults
                resp = self.admin("POST", "/flip", {"worker": w["name"], "to": to,
                                                    "drain_timeout_s": 30, "mode": mode})
                self.manual_flips[str(resp.status_code)] += 1
            except httpx.HTTPError as exc:
                self.manual_flips[exc.__class__.__name__] += 1

    def _all_ready(self) -> bool:
        try:
            return all(w["state"] == "ready" for w in self.workers())
        except httpx.HTTPError:
            return False

    def _fault_loop(self) -> None:
        while not self.stop.wait(self.fault_every_s * self.rng.uniform(0.5, 1.5)):
            try:
                workers = self.workers()
            except httpx.HTTPError:
                continue
            action, role = self._next_fault()
            ready = [w for w in workers if w["state"] == "ready" and w["pid"]]
            if action == "SIGSTOP" and len(ready) < len(workers):
                continue  # one hang at a time, and none while a killed worker restarts
            pool = [w for w in ready if w["role"] == role]
            if not pool or len(ready) < 2:  # never take the last ready worker down
                continue
            plan = self._stops if action == "SIGSTOP" else self._kills
            if (action, role) in plan:
                plan.remove((action, role))
            victim = self.rng.choice(pool)
            event = {"t": round(time.time() - self.t0, 1), "action": action,
                     "worker": victim["name"], "role": role}
            pid = victim["pid"]
            try:
                if action == "SIGKILL":
                    os.killpg(pid, signal.SIGKILL)
                else:
                    hang_s = round(self.rng.uniform(3, 12), 1)
                    event["hang_s"] = hang_s
                    os.killpg(pid, signal.SIGSTOP)
                    self.stopped.add(pid)
                    left_at = self._wait_out_of_rotation(victim["name"], hang_s)
                    if left_at is not None:
                        event["out_of_rotation_after_s"] = round(left_at, 2)
                    os.killpg(pid, signal.SIGCONT)
                    self.stopped.discard(pid)
            except ProcessLookupError:
                event["skipped"] = "process already gone"
            self.faults.append(event)

    def _next_fault(self) -> tuple[str, str]:
        """A hang of each role first (random order), then hangs of random workers; from
        `kill_after` of the run on, a SIGKILL of each role. A killed worker restarts for
        minutes on 2 shared cores, and while it does no flip can keep both pools: kills
        early in the run would starve the flips for most of it."""
        if self._stops:
            return self._stops[0]
        if self._kills and time.time() - self.t0 >= self.kill_after * self.duration_s:
            return self._kills[0]
        return "SIGSTOP", self.rng.choice(("prefill", "decode"))

    def _wait_out_of_rotation(self, name: str, hang_s: float) -> float | None:
        """Hold the hang for `hang_s`; return when the gateway took `name` out."""
        began, seen = time.monotonic(), None
        while time.monotonic() - began < hang_s:
            if seen is None:
                try:
                    w = next(w for w in self.workers() if w["name"] == name)
                    if not w.get("healthy", True):
                        seen = time.monotonic() - began
                except (httpx.HTTPError, StopIteration):
                    pass
            time.sleep(0.1)
        return seen

    def _sample_loop(self) -> None:
        while not self.stop.wait(2.0):
            self._sample()

    def _sample(self) -> None:
        sample: dict = {"t": round(time.time() - self.t0, 1)}
        if self.gateway_pid:
            sample["gateway_rss_mb"] = round(_rss_mb(self.gateway_pid), 1)
        try:
            workers = self.workers()
            sample["roles"] = {w["name"]: f"{w['role']}/{w['state']}"
                               + ("" if w.get("healthy", True) else "/out") for w in workers}
            sample["kv"] = {w["name"]: w["kv_cache_usage"] for w in workers}
            for rec in self.admin("GET", "/flips?limit=1000").json()["flips"]:
                self.flip_records[(rec["worker"], rec["started_at"])] = rec
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        with self.tally.lock:
            sample["outcomes"] = dict(Counter(o.outcome for o in self.tally.outcomes))
        self.samples.append(sample)

    # -- run ----------------------------------------------------------------------------
    def run(self) -> dict:
        self.t0 = time.time()
        threads = [threading.Thread(target=self._client_loop, args=(i,), daemon=True)
                   for i in range(self.concurrency)]
        threads += [threading.Thread(target=f, daemon=True)
                    for f in (self._flip_loop, self._fault_loop, self._sample_loop)]
        for t in threads:
            t.start()
        time.sleep(self.duration_s)
        self.stop.set()
        for t in threads:
            t.join(timeout=DEADLINE_S + 30)
        for pid in list(self.stopped):  # never leave a worker stopped
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        return self.report()

    def settle(self, timeout_s: float = 600) -> dict[str, float]:
        """After the load: every worker ready, then its own KV-cache usage (vLLM gauge)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._all_ready():
            time.sleep(1)
        usage: dict[str, float] = {}
        while time.monotonic() < deadline:
            usage = {w["name"]: _worker_kv_usage(w["url"]) for w in self.workers()}
            if all(u == 0 for u in usage.values()):
                break
            time.sleep(2)
        return usage

    def report(self) -> dict:
        self._sample()
        outcomes = self.tally.outcomes
        counts = Counter(o.outcome for o in outcomes)
        reasons = Counter(f"{o.outcome}: {o.reason}" for o in outcomes if o.reason)
        flips = list(self.flip_records.values())
        rss = [s["gateway_rss_mb"] for s in self.samples if "gateway_rss_mb" in s]
        warm = rss[len(rss) // 5:] if len(rss) >= 5 else rss  # first fifth is warm-up
        rss_summary = {}
        if warm:
            median = statistics.median(warm)
            rss_summary = {"median_mb": median, "min_mb": min(warm), "max_mb": max(warm),
                           "max_deviation_pct": round(100 * max(abs(x - median) for x in warm)
                                                      / median, 1)}
        hangs = [f["out_of_rotation_after_s"] for f in self.faults
                 if "out_of_rotation_after_s" in f]
        return {
            "duration_s": round(time.time() - self.t0, 1),
            "requests": len(outcomes), "outcomes": dict(counts),
            "reasons": dict(reasons.most_common()),
            "by_kind": {k: dict(Counter(o.outcome for o in outcomes if o.kind == k))
                        for k in sorted({o.kind for o in outcomes})},
            "faults": self.faults,
            "fault_counts": dict(Counter(f"{f['action']} {f['role']}" for f in self.faults
                                         if "skipped" not in f)),
            "hung_worker_out_of_rotation_s": hangs,
            "manual_flip_answers": dict(self.manual_flips),
            "flips": {"recorded": len(flips),
                      "by_reason_outcome": dict(Counter(
                          f"{'manual' if f['reason'] == 'manual' else 'controller'}/"
                          f"{f['outcome']}" for f in flips))},
            "gateway_rss": rss_summary,
            "gateway_counters": self._gateway_counters(),
            "samples": self.samples,
            "requests_detail": [asdict(o) for o in outcomes],
        }


    _COUNTERS = ("fulcrum_requests_total", "fulcrum_breaker_trips_total",
                 "fulcrum_pd_leg_failures_total", "fulcrum_rejected_total",
                 "fulcrum_role_flips_total", "fulcrum_dispatch_total")

    def _gateway_counters(self) -> dict[str, float]:
        """The gateway's own counters at the end (breaker trips, leg failures, flips...)."""
        try:
            text = httpx.get(self.url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return {}
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith(self._COUNTERS)}


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _worker_kv_usage(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return -1.0
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:kv_cache_usage_perc":
            return sum(s.value for s in family.samples if s.name == family.name)
    return -1.0


def stop_cluster(proc: subprocess.Popen) -> None:
    """SIGTERM `fulcrum up` (it stops its workers), then kill it after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_cluster(log_dir: Path, extra: tuple[str, ...] = (),
                  control: bool = True) -> tuple[subprocess.Popen, str]:
    """`fulcrum up --model tiny`, 3 workers (1 prefill), dopd acting (unless not
    `control`); waits until ready."""
    port = free_port_block(4, 19300)
    side = free_port_block(3, 27300)
    controller = ("--control-policy", "dopd", "--control-interval", "2",
                  "--control-window", "10", "--control-knob",
                  "adjustment_interval_s=10") if control else ()
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--model", "tiny", "--workers", "3",
           "--prefill-workers", "1", "--port", str(port), "--max-model-len", "1024",
           "--kv-cache-gib", "1", "--side-channel-base-port", str(side),
           "--log-dir", str(log_dir), *controller, "--stream-idle-timeout", "30",
           "--request-timeout", "90", *extra]
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(log_dir / "up.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fulcrum up exited; see {log_dir}/up.log")
        try:
            ws = httpx.get(url + "/admin/workers", timeout=5).json()["workers"]
            if ws and all(w["state"] == "ready" for w in ws):
                return proc, url
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    proc.terminate()
    raise TimeoutError("cluster not ready in 600 s")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    ts = [s["t"] for s in samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    ax1.plot([s["t"] for s in samples if "gateway_rss_mb" in s],
             [s["gateway_rss_mb"] for s in samples if "gateway_rss_mb" in s], color="C0")
    ax1.set_ylabel("gateway RSS (MB)")
    for f in result["faults"]:
        color = "red" if f["action"] == "SIGKILL" else "orange"
        for ax in (ax1, ax2, ax3):
            ax.axvline(f["t"], color=color, alpha=0.4, lw=1)
    for outcome, color in (("completed", "C2"), ("clean_error", "C1"), ("lost", "C3")):
        ax2.plot(ts, [s.get("outcomes", {}).get(outcome, 0) for s in samples], label=outcome,
                 color=color)
    ax2.set_ylabel("requests (cumulative)")
    ax2.legend(loc="upper left")
    names = sorted({n for s in samples for n in s.get("roles", {})})
    for i, name in enumerate(names):
        ys = []
        for s in samples:
            role = s.get("roles", {}).get(name, "")
            ys.append(i + (0.3 if role.startswith("prefill") else -0.3)
                      if "/ready" in role and "/out" not in role else float("nan"))
        ax3.plot(ts, ys, drawstyle="steps-post", label=name)
    ax3.set_yticks(range(len(names)), names)
    ax3.set_ylabel("role (up: prefill)")
    ax3.set_xlabel("seconds (red: SIGKILL, orange: SIGSTOP)")
    out = result["outcomes"]
    fig.suptitle(f"chaos: {result['requests']} requests, {out.get('completed', 0)} completed, "
                 f"{out.get('clean_error', 0)} clean errors, {out.get('lost', 0)} lost; "
                 f"{result['flips']['recorded']} flips, {len(result['faults'])} faults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--flip-every", type=float, default=0.5)
    parser.add_argument("--kill-after", type=float, default=0.75,
                        help="fraction of the run after which the two SIGKILLs come")
    parser.add_argument("--fault-every", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", default=".fulcrum/chaos-logs")
    parser.add_argument("--out", default=str(RESULTS / "chaos.json"))
    args = parser.parse_args(argv)
    proc, url = start_cluster(Path(args.log_dir))
    try:
        chaos = Chaos(url, proc.pid, duration_s=args.duration, concurrency=args.concurrency,
                      flip_every_s=args.flip_every, fault_every_s=args.fault_every,
                      seed=args.seed, kill_after=args.kill_after)
        result = chaos.run()
        result["kv_usage_after"] = chaos.settle()
    finally:
        stop_cluster(proc)
    result["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    summary = {k: result[k] for k in ("duration_s", "requests", "outcomes", "fault_counts",
                                      "hung_worker_out_of_rotation_s", "flips",
                                      "gateway_rss", "kv_usage_after")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
