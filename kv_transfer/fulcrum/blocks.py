"""A worker's KV cache seen as numbered blocks: byte segments (CPU) and tensor views (GPU).

vLLM hands the connector one tensor per attention layer. On CPU the layout is
``[num_blocks, kv_heads, block_size, 2 * head_size]`` (block dimension first); GPU backends
often put a leading ``2`` (K/V) before the block dimension. We find the block dimension by
its size and require everything after it to be contiguous, so one block of one layer is
``prod(leading dims)`` contiguous byte runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

Segment = tuple[int, int]
"""(address, nbytes) of one contiguous byte run."""


@dataclass(frozen=True)
class LayerLayout:
    """How one KV tensor is split into blocks."""

    name: str
    tensor: torch.Tensor
    block_dim: int
    block_nbytes: int  # bytes of one block in one leading-index slice
    block_stride: int  # bytes between consecutive blocks
    lead_offsets: tuple[int, ...]  # byte offsets of the leading-index slices


def _layer_layout(name: str, tensor: torch.Tensor, num_blocks: int) -> LayerLayout:
    dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
    if not dims:
        raise ValueError(f"layer {name}: no dimension of size num_blocks={num_blocks} "
                         f"in shape {tuple(tensor.shape)}")
    block_dim = dims[0]
    elem = tensor.element_size()
    inner = tensor[(0,) * block_dim + (0,)] if block_dim < tensor.dim() - 1 else None
    if inner is not None and not inner.is_contiguous():
        raise ValueError(f"layer {name}: a block is not contiguous (shape "
                         f"{tuple(tensor.shape)}, stride {tensor.stride()})")
    block_elems = inner.numel() if inner is not None else 1
    if tensor.stride(block_dim) < block_elems:
        raise ValueError(f"layer {name}: blocks overlap")
    leads: list[int] = [0]
    for d in range(block_dim):
        leads = [off + i * tensor.stride(d) * elem for off in leads
                 for i in range(tensor.shape[d])]
    return LayerLayout(name=name, tensor=tensor, block_dim=block_dim,
                       block_nbytes=block_elems * elem,
                       block_stride=tensor.stride(block_dim) * elem,
                       lead_offsets=tuple(leads))


def coalesce(segments: Iterable[Segment]) -> list[Segment]:
    """Merge runs that touch end to start."""
    out: list[Segment] = []
    for addr, size in segments:
        if out and out[-1][0] + out[-1][1] == addr:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((addr, size))
    return out


class KVBlockStore:
    """The registered KV tensors of one worker, in a canonical layer order.

    Layers sharing storage (same data pointer) are kept once. Both ends of a transfer order
    layers by name, so block ``i`` of layer ``k`` means the same thing on both.
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        seen: set[int] = set()
        layers: list[LayerLayout] = []
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            layers.append(_layer_layout(name, tensor, num_blocks))
        if not layers:
            raise ValueError("no KV cache tensors to register")
        self.layers: tuple[LayerLayout, ...] = tuple(layers)
        self.num_blocks = num_blocks
        self.device = layers[0].tensor.device

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for, over all layers."""
        return sum(lay.block_nbytes * len(lay.lead_offsets) for lay in self.layers)

    def signature(self) -> str:
        """Fingerprint of the layout; two workers can exchange blocks iff theirs match."""
        desc = ";".join(f"{lay.name}:{lay.tensor.dtype}:{lay.block_nbytes}x"
                        f"{len(lay.lead_offsets)}" for lay in self.layers)
        return hashlib.sha1(desc.encode()).hexdigest()[:16]

    def _check(self, block_ids: Sequence[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids out of range: {bad[:4]}")

    def segments(self, block_ids: Sequence[int]) -> list[Segment]:
        """Byte runs of ``block_ids`` over all layers, in canonical order (CPU tensors)."""
        self._check(block_ids)
        runs: list[Segment] = []
        for lay in self.layers:
            base = lay.tensor.data_ptr()
            for lead in lay.lead_offsets:
                for b in block_ids:
                    runs.append((base + lead + b * lay.block_stride, lay.block_nbytes))
        return coalesce(runs)

    def gather(self, layer: LayerLayout, block_ids: Sequence[int]) -> torch.Tensor:
        """A contiguous copy of ``block_ids`` of one layer (staging for NCCL)."""
        self._check(block_ids)
        index = torch.tensor(list(block_ids), dtype=torch.long, device=layer.tensor.device)
        return layer.tensor.index_select(layer.block_dim, index).contiguous()

    def scatter(self, layer: LayerLayout, block_ids: Sequence[int],
                staged: torch.Tensor) -> None:
        """Write a staging tensor made by :meth:`gather` into ``block_ids`` of one layer."""
        self._check(block_ids)
        index = torch.tensor(list(block_ids), dtype=torch.long, device=layer.tensor.device)
        layer.tensor.index_copy_(layer.block_dim, index, staged)

    def staging_like(self, layer: LayerLayout, count: int) -> torch.Tensor:
        """An empty staging tensor for ``count`` blocks of one layer."""
        shape = list(layer.tensor.shape)
        shape[layer.block_dim] = count
        return torch.empty(shape, dtype=layer.tensor.dtype, device=layer.tensor.device)
