"""Producer-side bookkeeping: which blocks are held for which transfer, and until when.

A prefill request's blocks stay allocated (vLLM's delay-free) until the decoder confirms it
read them, tells us it does not need them, or the lease expires. Released requests are
handed to vLLM through ``get_finished`` so it frees the blocks: nothing leaks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

UNWANTED_MEMORY_S = 60.0
"""How long a release that found no lease is remembered (a hold arriving later is
dropped at once)."""


@dataclass
class Lease:
    transfer_id: str
    req_id: str
    block_ids: tuple[int, ...]
    deadline: float
    busy: bool = False
    num_tokens: int | None = None  # tokens whose KV the blocks hold, where known

    def resolve(self, refs: Sequence[int], by_position: bool,
                num_tokens: int = 0) -> list[int] | str:
        """The block ids a read asks for, or why it may not have them. By position, the
        refs index this lease's blocks, and a read past the tokens held is refused (those
        slots hold no KV yet)."""
        if not by_position:
            wanted = [int(b) for b in refs]
            return wanted if set(wanted) <= set(self.block_ids) else "blocks outside the lease"
        if self.num_tokens is not None and num_tokens > self.num_tokens:
            return f"the lease holds {self.num_tokens} tokens, {num_tokens} asked for"
        if any(not 0 <= int(p) < len(self.block_ids) for p in refs):
            return "positions outside the lease"
        return [self.block_ids[int(p)] for p in refs]


class LeaseTable:
    """Thread-safe: the engine thread adds and expires, server threads claim and release."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: dict[str, Lease] = {}
        self._released: set[str] = set()
        # transfer ids released before their hold arrived (an abort can reach the engine
        # after the gateway's release) -> when to forget them
        self._unwanted: dict[str, float] = {}
        self.expired_count = 0

    def hold(self, transfer_id: str, req_id: str, block_ids: Sequence[int],
             ttl_s: float, num_tokens: int | None = None) -> None:
        with self._cond:
            if self._unwanted.pop(transfer_id, None) is not None:
                self._released.add(req_id)  # nobody will read it: free the blocks now
                return
            self._leases[transfer_id] = Lease(transfer_id, req_id, tuple(block_ids),
                                              self._clock() + ttl_s, num_tokens=num_tokens)
            self._cond.notify_all()

    def claim(self, transfer_id: str, wait_s: float = 0.0) -> Lease | None:
        """Mark a lease in use (expiry waits for it); wait up to ``wait_s`` for it to appear
        (the decode leg can outrun the engine step that registers it)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                lease = self._leases.get(transfer_id)
                if lease is not None and not lease.busy:
                    lease.busy = True
                    return lease
                if lease is not None:  # someone else is reading it
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def release(self, transfer_id: str) -> bool:
        """Drop a lease (read done, not needed, or failed); False if it was not held."""
        with self._cond:
            lease = self._leases.pop(transfer_id, None)
            if lease is None:
                self._unwanted[transfer_id] = self._clock() + UNWANTED_MEMORY_S
                return False
            self._released.add(lease.req_id)
            return True

    def expire(self) -> int:
        """Drop idle leases past their deadline; returns how many."""
        now = self._clock()
        with self._cond:
            if self._unwanted:
                self._unwanted = {t: until for t, until in self._unwanted.items()
                                  if until > now}
            gone = [t for t, lease in self._leases.items()
                    if lease.deadline <= now and not lease.busy]
            for tid in gone:
                self._released.add(self._leases.pop(tid).req_id)
            self.expired_count += len(gone)
            return len(gone)

    def take_released(self) -> set[str]:
        """Request ids whose blocks vLLM may free now (each returned once)."""
        with self._cond:
            out, self._released = self._released, set()
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)
