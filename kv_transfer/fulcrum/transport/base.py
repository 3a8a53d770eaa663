"""The one interface every KV data plane implements.

A transfer runs on a :class:`~kv_transfer.fulcrum.wire.Channel` that the connector opened
(consumer) or accepted (producer) and already used for the request/lease handshake. The
transport moves the bytes of the given blocks, in the store's canonical order, and may use
the channel for its own negotiation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.wire import Channel


class TransferError(RuntimeError):
    """The blocks did not arrive; the consumer must recompute."""


class Transport(ABC):
    """Moves KV blocks from a producer's store into a consumer's store."""

    name: str = "abstract"

    @abstractmethod
    def hello(self) -> dict[str, Any]:
        """What the consumer tells the producer about itself before a read."""

    @abstractmethod
    def send(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int],
             peer_hello: dict[str, Any]) -> int:
        """Producer side: deliver ``block_ids``; returns bytes moved."""

    @abstractmethod
    def receive(self, chan: Channel, store: KVBlockStore, block_ids: Sequence[int]) -> int:
        """Consumer side: fill local ``block_ids``; returns bytes moved. Raises
        :class:`TransferError` (or ChannelError) on failure."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release cached resources (connections, communicators)."""
