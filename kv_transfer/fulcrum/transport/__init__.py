"""Data planes for moving KV blocks; the code above them is the same for all."""

from kv_transfer.fulcrum.transport.base import TransferError, Transport

__all__ = ["Transport", "TransferError", "make_transport"]


def make_transport(kind: str, **kwargs: object) -> Transport:
    """``cpu`` (same-host single copy, TCP across hosts) or ``nccl`` (CUDA tensors)."""
    if kind == "cpu":
        from kv_transfer.fulcrum.transport.cpu import CpuTransport

        return CpuTransport(**kwargs)  # type: ignore[arg-type]
    if kind == "nccl":
        from kv_transfer.fulcrum.transport.nccl import NcclTransport

        return NcclTransport(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown transport {kind!r}; known: cpu, nccl")
