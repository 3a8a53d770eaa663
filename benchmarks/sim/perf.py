"""Performance models: how long one engine iteration takes, and how much KV fits.

One interface (`PerfModel`), two implementations:

* `RooflineModel`: FLOPs and bytes from the model's shape, divided by datasheet peaks
  discounted by stated efficiencies. Every constant is below with its source.
* `FittedModel`: least-squares fits of measured points (prompt length -> prefill time,
  decode batch -> step time), stored as JSON, e.g. from `fulcrum profile` on the CPU
  cluster.

An iteration is vLLM-like: some prefill tokens (a chunk of one or more prompts) plus one
token for each running decode. In the roofline, compute (FLOPs) and memory traffic
(weights, KV) overlap only partly: a step costs the larger of the two plus a fixed share
`Efficiency.overlap` of the smaller, so a decode batch that shares a step with a prefill
chunk makes the step longer than either alone and shorter than both in turn. Its cost
inputs are `prefill_tokens`, `prefill_pairs` (sum over chunks of chunk_len * (tokens
before it + chunk_len/2), i.e. attention query-key pairs), `decode_seqs` and `decode_ctx`
(sum of the decodes' context lengths).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

GIB = 1024**3


class PerfModel(Protocol):
    name: str

    @property
    def kv_capacity_tokens(self) -> int: ...

    @property
    def kv_bytes_per_token(self) -> float: ...

    def iteration_time(self, prefill_tokens: int, prefill_pairs: float, decode_seqs: int,
                       decode_ctx: float) -> float: ...


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (Llama-style: GQA, SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2  # bf16 weights and KV cache

    @property
    def params(self) -> float:
        """Parameter count: attention (q,o full; k,v GQA) + SwiGLU MLP + norms, plus
        untied input embedding and LM head."""
        attn = self.hidden * self.heads * self.head_dim * 2 \
            + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden

    @property
    def matmul_params(self) -> float:
        """Parameters touched per token in GEMMs (embedding lookup excluded)."""
        return self.params - self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


# Shapes from the models' published config.json files (meta-llama/Llama-3.1-8B and -70B).
LLAMA_3_1_8B = ModelShape("llama-3.1-8b", layers=32, hidden=4096, heads=32, kv_heads=8,
                          head_dim=128, intermediate=14336, vocab=128256)   # 8.03e9 params
LLAMA_3_1_70B = ModelShape("llama-3.1-70b", layers=80, hidden=8192, heads=64, kv_heads=8,
                           head_dim=128, intermediate=28672, vocab=128256)  # 70.6e9 params
MODELS = {m.name: m for m in (LLAMA_3_1_8B, LLAMA_3_1_70B)}


@dataclass(frozen=True)
class Hardware:
    """One GPU's datasheet peaks."""

    name: str
    bf16_tflops: float     # dense (no sparsity)
    hbm_tb_s: float
    hbm_gib: float
    link_gb_s: float       # per-GPU bandwidth for KV transfer between instances


# NVIDIA H100 SXM5 datasheet: 989.4 dense BF16 TFLOPS (1,979 with sparsity), 3.35 TB/s
# HBM3, 80 GB. H200 SXM datasheet: same compute, 4.8 TB/s HBM3e, 141 GB.
# Link: instances on different nodes, one ConnectX-7 400 Gb/s NIC per GPU = 50 GB/s
# (assumption: GPUDirect RDMA, the usual DGX/HGX layout).
H100 = Hardware("h100", bf16_tflops=989.4, hbm_tb_s=3.35, hbm_gib=80 * 1e9 / GIB,
                link_gb_s=50.0)
H200 = Hardware("h200", bf16_tflops=989.4, hbm_tb_s=4.8, hbm_gib=141 * 1e9 / GIB,
                link_gb_s=50.0)
HARDWARE = {h.name: h for h in (H100, H200)}


@dataclass(frozen=True)
class Efficiency:
    """Discounts applied to datasheet peaks, each with the published figure it rests on.

    Calibration checks (`tests/test_sim_perf.py` reproduces both):
    * vLLM's own CI latency benchmark (`buildkite.com/vllm/performance-benchmark`, build
      9555, "latency_llama8B_tp1", 8xH100, batch 8, 32 prompt + 128 output tokens): median
      997.4 ms per request, i.e. 7.8 ms per decode step at batch 8. This model: 8.0 ms
      (2 ms overhead + 16.1 GB of weights at 0.80 x 3.35 TB/s). Same benchmark, Llama-3-70B
      TP4 on H100: 2444.3 ms, 19.1 ms/step; this model 17.5 ms (-8%). On H200 (build 9513):
      8B 834.0 ms = 6.5 ms/step; this model 6.2 ms.
    * SLAI's microbenchmark (`github.com/agrimUT/SLAI`, `scripts/plot1_results.csv`,
      Mistral-7B on one RTX 6000 Ada, chunked prefill of 2048-token prompts beside running
      decodes): batch time 22.7 ms at a 64-token budget, 24.1 at 128, 28.8 at 256, 46.5 at
      512, 74.7 at 1024. Above the ridge a prompt token costs (74.7-28.8)/768 = 60 us;
      below it, where max(compute, memory) would charge nothing, it still costs
      (24.1-22.7)/64 = 22 us: 0.37 of the compute-bound price. That ratio is `overlap`.
      (A different GPU and model; the ratio, not the milliseconds, is what is carried
      over. Its ridge point, ~190 tokens, is close to this model's H100 ridge, ~200.)
    * Sarathi-Serve (Agrawal et al., OSDI 2024, section 4.3 and Figure 9): hybrid
      prefill+decode batches with chunking stay within ~3x of a decode-only batch, and
      prefill throughput saturates near 512 tokens per step (Figure 4); consistent with
      the ridge and overlap above.

    compute 0.55: large bf16 GEMMs in vLLM reach roughly 50-70% of dense peak on H100
      (assumption; no primary per-GEMM figure found; with `overlap` it puts a 512-token
      step of Llama-3.1-8B (2048-token prompt) at 2.2x a 64-token step; SLAI: 46.5/22.7 = 2.05x).
    memory 0.80: weight/KV streaming reaches ~80% of HBM bandwidth (checked against the
      vLLM CI decode step above).
    overlap 0.37: share of the smaller of compute and memory time that is not hidden
      under the larger (SLAI figure above; 0 = perfect overlap, 1 = no overlap).
    tp 0.85: tensor-parallel all-reduce costs ~15% per extra-GPU group (assumption; the
      70B TP4 check above comes out 8% fast, within that).
    link 0.80: RDMA goodput vs line rate, plus `link_latency_s` 0.5 ms per transfer
      (assumption).
    iteration_overhead_s 2 ms: scheduler, sampling and launch cost per engine step with
      CUDA graphs (assumption; with memory 0.80 it reproduces the 7.8 ms CI step above).
    gpu_memory_utilization 0.90 (vLLM default); activation_reserve_gib 4 per GPU.
    """

    compute: float = 0.55
    memory: float = 0.80
    overlap: float = 0.37
    tp: float = 0.85
    link: float = 0.80
    link_latency_s: float = 0.0005
    iteration_overhead_s: float = 0.002
    gpu_memory_utilization: float = 0.90
    activation_reserve_gib: float = 4.0


class RooflineModel:
    """time = overhead + max(C, M) + overlap * min(C, M), with C = FLOPs / effective
    compute and M = bytes / effective bandwidth."""

    def __init__(self, model: ModelShape, hardware: Hardware, tp: int = 1,
                 eff: Efficiency | None = None) -> None:
        self.model, self.hw, self.tp, self.eff = model, hardware, tp, eff or Efficiency()
        self.name = f"roofline-{model.name}-{hardware.name}-tp{tp}"
        scale = tp * (self.eff.tp if tp > 1 else 1.0)
        self._flops_s = hardware.bf16_tflops * 1e12 * self.eff.compute * scale
        self._bytes_s = hardware.hbm_tb_s * 1e12 * self.eff.memory * scale
        self._attn_flops_per_pair = 4 * model.layers * model.heads * model.head_dim
        self._gemm_flops_per_token = 2.0 * model.matmul_params
        self._weight_bytes = model.weight_bytes
        self._kv_bytes = model.kv_bytes_per_token
        self._overhead = self.eff.iteration_overhead_s
        self._overlap = self.eff.overlap
        free = tp * (hardware.hbm_gib * self.eff.gpu_memory_utilization
                     - self.eff.activation_reserve_gib) * GIB - model.weight_bytes
        if free <= 0:
            raise ValueError(f"{model.name} does not fit on {tp} x {hardware.name}")
        self._kv_capacity = int(free // model.kv_bytes_per_token)

    @property
    def kv_capacity_tokens(self) -> int:
        return self._kv_capacity

    @property
    def kv_bytes_per_token(self) -> float:
        return float(self.model.kv_bytes_per_token)

    @property
    def link_bytes_s(self) -> float:
        return self.hw.link_gb_s * 1e9 * self.tp * self.eff.link

    def iteration_time(self, prefill_tokens: int, prefill_pairs: float, decode_seqs: int,
                       decode_ctx: float) -> float:
        tokens = prefill_tokens + decode_seqs
        if tokens == 0:
            return 0.0
        flops = self._gemm_flops_per_token * tokens \
            + self._attn_flops_per_pair * (prefill_pairs + decode_ctx)
        bytes_moved = self._weight_bytes + self._kv_bytes * (decode_ctx + tokens)
        compute_s = flops / self._flops_s
        memory_s = bytes_moved / self._bytes_s
        if compute_s > memory_s:
            return self._overhead + compute_s + self._overlap * memory_s
        return self._overhead + memory_s + self._overlap * compute_s

    def describe(self) -> dict:
        return {"name": self.name, "model": asdict(self.model), "hardware": asdict(self.hw),
                "tp": self.tp, "efficiency": asdict(self.eff),
                "params": self.model.params, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_capacity_tokens": self.kv_capacity_tokens,
                "effective_tflops": self._flops_s / 1e12,
                "effective_tb_s": self._bytes_s / 1e12, "link_gb_s": self.link_bytes_s / 1e9}


def roofline(model: str = "llama-3.1-8b", hardware: str = "h100", tp: int | None = None,
             eff: Efficiency | None = None) -> RooflineModel:
    """Roofline model by name; default TP: 1 for 8B, 4 on H100 / 2 on H200 for 70B."""
    shape, hw = MODELS[model], HARDWARE[hardware]
    if tp is None:
        tp = 1 if shape.params < 20e9 else (4 if hw.hbm_gib < 100 else 2)
    return RooflineModel(shape, hw, tp, eff)


@dataclass
class FittedModel:
    """Fits of measured points (seconds):

    prefill(L) = a L^2 + b L + c           (Arrow's quadratic in prompt length)
    decode(n, ctx) = d0 + d1 n + d2 ctx     (linear in batch size and batch KV tokens)

    A mixed iteration costs prefill(L) + decode(n, ctx) - d0 (one shared fixed overhead).
    """

    prefill_coef: tuple[float, float, float]
    decode_coef: tuple[float, float, float]
    kv_capacity: int
    kv_bytes: float = 0.0
    link_bytes_per_s: float = 1e9
    name: str = "fitted"

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes

    @property
    def link_bytes_s(self) -> float:
        return self.link_bytes_per_s

    def iteration_time(self, prefill_tokens: int, prefill_pairs: float, decode_seqs: int,
                       decode_ctx: float) -> float:
        a, b, c = self.prefill_coef
        d0, d1, d2 = self.decode_coef
        t = 0.0
        if decode_seqs:
            t += d0 + d1 * decode_seqs + d2 * decode_ctx
        if prefill_tokens:
            # quadratic term via attention pairs: L^2 ~ 2*pairs for a whole prompt
            t += 2 * a * prefill_pairs + b * prefill_tokens + (c if not decode_seqs else 0.0)
        return max(t, 0.0)

    @classmethod
    def fit(cls, prefill_points: list[tuple[float, float]],
            decode_points: list[tuple[float, float, float]], kv_capacity: int,
            kv_bytes: float = 0.0, link_bytes_per_s: float = 1e9,
            name: str = "fitted") -> FittedModel:
        """prefill_points: (prompt_len, seconds); decode_points: (num_seqs, ctx_tokens,
        seconds per step)."""
        p = np.asarray(prefill_points, dtype=float)
        degree = min(2, len(np.unique(p[:, 0])) - 1)  # fewer distinct lengths: lower degree
        while True:  # a negative coefficient (noise) drops the highest power
            coefs = np.polyfit(p[:, 0], p[:, 1], degree) if degree > 0 else [p[:, 1].mean()]
            if degree == 0 or min(coefs[:-1]) >= 0:
                break
            degree -= 1
        a, b, c = [0.0] * (2 - degree) + [max(0.0, float(x)) for x in coefs]
        d = np.asarray(decode_points, dtype=float)
        coef = cls._nonnegative_decode_fit(d)
        return cls((float(a), float(b), float(c)), coef, kv_capacity, kv_bytes,
                   link_bytes_per_s, name)

    @staticmethod
    def _nonnegative_decode_fit(d: np.ndarray) -> tuple[float, float, float]:
        """step = d0 + d1 n + d2 ctx by least squares; when noise (or collinear n and ctx,
        as in a profile with one prompt length) gives a negative slope, that term is
        dropped and the rest refitted."""
        columns = [1, 2]
        while True:
            design = np.column_stack([np.ones(len(d))] + [d[:, c - 1] for c in columns])
            sol, *_ = np.linalg.lstsq(design, d[:, 2], rcond=None)
            slopes = dict(zip(columns, sol[1:], strict=True))
            negative = [c for c, v in slopes.items() if v < 0]
            if not negative:
                out = [max(0.0, float(sol[0])), 0.0, 0.0]
                for c, v in slopes.items():
                    out[c] = float(v)
                return out[0], out[1], out[2]
            columns.remove(2 if 2 in negative else 1)  # ctx first: it is the noisier

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> FittedModel:
        d = json.loads(Path(path).read_text())
        if "prefill_coef" not in d:  # raw points file from `fulcrum profile`
            return cls.fit([tuple(x) for x in d["prefill"]], [tuple(x) for x in d["decode"]],
                           int(d["kv_capacity_tokens"]), float(d.get("kv_bytes_per_token", 0)),
                           float(d.get("link_bytes_per_s", 1e9)), d.get("name", "fitted"))
        d["prefill_coef"] = tuple(d["prefill_coef"])
        d["decode_coef"] = tuple(d["decode_coef"])
        return cls(**d)
