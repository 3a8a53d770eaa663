"""Cross-memory attach: copy bytes straight out of another process on this host.

``process_vm_readv`` moves data from a peer process's address space into ours in one copy
(no socket, no staging buffer), at memory-copy speed. It needs the same kernel and PID
namespace and ptrace permission over the peer; callers fall back to TCP when it fails.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from functools import cache

from kv_transfer.fulcrum.blocks import Segment

IOV_MAX = 1024


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@cache
def host_key() -> str:
    """Equal on two processes iff they share a kernel boot and a PID namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}:{pidns}"


def pair_runs(local: Sequence[Segment], remote: Sequence[Segment]) -> list[tuple[int, int, int]]:
    """Cut two run lists of equal total length into (local, remote, nbytes) pieces."""
    if sum(n for _, n in local) != sum(n for _, n in remote):
        raise ValueError("local and remote sizes differ")
    out: list[tuple[int, int, int]] = []
    li = ri = 0
    loff = roff = 0
    while li < len(local) and ri < len(remote):
        laddr, lsize = local[li]
        raddr, rsize = remote[ri]
        n = min(lsize - loff, rsize - roff)
        out.append((laddr + loff, raddr + roff, n))
        loff += n
        roff += n
        if loff == lsize:
            li, loff = li + 1, 0
        if roff == rsize:
            ri, roff = ri + 1, 0
    return out


def read_from(pid: int, local: Sequence[Segment], remote: Sequence[Segment]) -> int:
    """Copy ``remote`` runs of process ``pid`` into our ``local`` runs; returns bytes.

    Raises OSError when the kernel refuses (permission, dead process, bad address).
    """
    pieces = pair_runs(local, remote)
    total = 0
    for start in range(0, len(pieces), IOV_MAX):
        batch = pieces[start:start + IOV_MAX]
        count = len(batch)
        liov = (_IoVec * count)(*[(la, n) for la, _, n in batch])
        riov = (_IoVec * count)(*[(ra, n) for _, ra, n in batch])
        want = sum(n for _, _, n in batch)
        got = _libc().process_vm_readv(pid, liov, count, riov, count, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv: {os.strerror(err)}")
        if got != want:
            raise OSError(0, f"process_vm_readv: short read {got} of {want}")
        total += got
    return total
