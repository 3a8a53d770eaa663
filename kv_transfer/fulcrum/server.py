"""Producer side: a small TCP server that hands held blocks to decoders.

One accept thread blocks in ``accept()`` (no polling; closing the socket stops it) and a
bounded pool serves connections, so the forward pass never waits on a transfer.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.lease import LeaseTable
from kv_transfer.fulcrum.stats import StatsRecorder
from kv_transfer.fulcrum.trace import TRACE
from kv_transfer.fulcrum.transport.base import Transport
from kv_transfer.fulcrum.wire import Channel, ChannelError, tune

log = logging.getLogger(__name__)

CLAIM_WAIT_S = 2.0
"""How long a read waits for its lease to be registered (the decode leg may be faster than
the producer's next engine step)."""
IO_TIMEOUT_S = 30.0


def msg_peer_is_local(sock: socket.socket) -> bool:
    """Loopback peers may register leases; remote ones may only read and release."""
    try:
        host = sock.getpeername()[0]
    except OSError:
        return False
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


class BlockServer:
    """Serves ``read`` and ``release`` requests for leased transfers."""

    def __init__(self, host: str, port: int, store: KVBlockStore, leases: LeaseTable,
                 transport: Transport, stats: StatsRecorder, max_concurrent: int = 4,
                 lease_s: float = 30.0) -> None:
        self.store = store
        self.lease_s = lease_s
        self.leases = leases
        self.transport = transport
        self.stats = stats
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.port = self._listener.getsockname()[1]
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="fulcrum-serve")
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="fulcrum-accept",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            tune(sock)
            sock.settimeout(IO_TIMEOUT_S)
            self._pool.submit(self._serve, Channel(sock))

    def _serve_holds(self, chan: Channel, msg: dict) -> None:
        """Our scheduler's lease feed (see ``notify``): ``hold`` messages on one long-lived
        loopback connection until it closes."""
        try:
            while not self._closed:
                if msg.get("op") != "hold":
                    chan.send_msg({"ok": False, "error": "only holds on this connection"})
                    return
                tid = str(msg.get("transfer_id"))
                tokens = msg.get("num_tokens")
                self.leases.hold(tid, str(msg.get("req_id")),
                                 [int(b) for b in msg.get("block_ids", ())],
                                 float(msg.get("ttl_s") or self.lease_s),
                                 None if tokens is None else int(tokens))
                TRACE.event("hold", req=str(msg.get("req_id")), tid=tid)
                chan.send_msg({"ok": True})
                chan.settimeout(None)
                msg = chan.recv_msg()
        except (ChannelError, OSError, ValueError, TypeError) as exc:
            if not self._closed:
                log.debug("fulcrum: local peer went away: %s", exc)
        finally:
            chan.close()

    def _serve(self, chan: Channel) -> None:
        try:
            msg = chan.recv_msg()
            if msg.get("op") == "hold":
                if not msg_peer_is_local(chan.sock):
                    chan.send_msg({"ok": False, "error": "holds are taken from this host only"})
                    return
                # Its own thread, so a pool thread is not tied up for the connection's life.
                threading.Thread(target=self._serve_holds, args=(chan, msg),
                                 name="fulcrum-holds", daemon=True).start()
                chan = None  # type: ignore[assignment]  # the hold thread closes it
                return
            self._dispatch(chan, msg)
        except (ChannelError, OSError, ValueError) as exc:
            log.warning("fulcrum: serving a peer failed: %s", exc)
        except Exception:  # noqa: BLE001 - a server thread must not die silently
            log.exception("fulcrum: serving a peer failed")
        finally:
            if chan is not None:
                chan.close()

    def _dispatch(self, chan: Channel, msg: dict) -> None:
        op, tid = msg.get("op"), str(msg.get("transfer_id"))
        if op == "release":
            chan.send_msg({"ok": self.leases.release(tid)})
        elif op == "read":
            self._serve_read(chan, tid, msg)
        else:
            chan.send_msg({"ok": False, "error": f"unknown op {op!r}"})

    def _serve_read(self, chan: Channel, tid: str, msg: dict) -> None:
        TRACE.event("serve_start", tid=tid)
        lease = self.leases.claim(tid, wait_s=CLAIM_WAIT_S)
        if lease is None:
            chan.send_msg({"ok": False, "error": f"transfer {tid} unknown, expired or busy"})
            return
        try:
            if msg.get("signature") != self.store.signature():
                chan.send_msg({"ok": False, "error": "KV layouts differ"})
                return
            wanted = lease.resolve(msg.get("block_ids", ()), bool(msg.get("by_position")),
                                   int(msg.get("num_tokens") or 0))
            if isinstance(wanted, str):
                chan.send_msg({"ok": False, "error": wanted})
                return
            chan.send_msg({"ok": True})
            nbytes = self.transport.send(chan, self.store, wanted, msg.get("hello", {}))
            done = chan.recv_msg()
            if done.get("op") == "done" and done.get("ok"):
                self.stats.served(nbytes)
                TRACE.event("serve_end", tid=tid, nbytes=nbytes)
        finally:
            # Read, failed or abandoned: the decoder either has the KV or recomputes.
            self.leases.release(tid)

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
