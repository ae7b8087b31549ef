"""One MQTT connection's I/O thread, with each publish written by the thread that makes it.

paho's ``loop_start()`` thread writes every packet itself, so each publish woke it through a
socket pair: a streamed reply paid a thread switch per token, on a CPU the model keeps busy.
Here paho runs in its documented external-loop mode (``loop_read``/``loop_write``/
``loop_misc``, never ``loop_start``), in which ``paho.Client.publish()`` writes the packet at
once from the calling thread. One lock, ``io``, is held around every paho call that can touch
the socket, so packets never interleave on the wire and a TLS socket is never read and
written at once. A streamed chunk skips even paho: ``send_whole`` writes a QoS 0 PUBLISH that
agent.mqtt.packets built, under the same lock, when nothing of paho's waits to be written.

The thread (``mqtt-<client id>``) connects, waits on the socket and a wake-up socket, reads,
writes what a short write left over, keeps the connection alive and reconnects with
exponential backoff, as paho's own loop did.

paho's callbacks run under ``io``: on this thread, or on a publishing thread whose write found
the connection gone. They must not block there, so what they hand on goes through ``defer``,
and this thread delivers it once it has released ``io``. Delivering may block (the caller's
queue is full): the socket is then not read, and TCP pushes back on the broker.
"""

from __future__ import annotations

import collections
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

# How long the thread waits on a quiet connection before paho's keepalive check runs again.
IDLE_WAIT_S = 1.0
STOP_JOIN_S = 5.0
# send_whole: packets up to this size (a streamed chunk; a bigger one is paho's to queue), and
# how long the rest of one that a full send buffer cut may wait for room.
WHOLE_PACKET_MAX_BYTES = 4096
STALLED_WRITE_S = 10.0


class NetworkLoop:
    def __init__(self, client: paho.Client, *, name: str, reconnect_min_s: float,
                 reconnect_max_s: float, deliver: Callable[[Any], None],
                 on_connect_fail: Callable[[OSError], None]) -> None:
        self.io = threading.RLock()  # reentrant: a callback under it may publish
        self._client = client
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._deliver = deliver
        self._on_connect_fail = on_connect_fail
        self._deferred: collections.deque[Any] = collections.deque()
        self._stopping = threading.Event()
        self._given_up = False
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """A normal disconnect (written at once), then end the thread."""
        self._stopping.set()  # first: the thread must not reconnect after the disconnect
        with self.io:
            self._client.disconnect()
        self.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_JOIN_S)

    def give_up(self) -> None:
        """No more reconnecting (the broker refused the credentials)."""
        self._given_up = True

    def wake(self) -> None:
        """Make the thread look again: a packet waits to be written, or something to deliver."""
        try:
            self._wake_write.send(b"\0")
        except BlockingIOError:
            pass  # the buffer is full of wake-ups already

    def defer(self, item: Any) -> None:
        """From a callback: hand ``item`` to ``deliver`` on this thread, outside ``io``."""
        self._deferred.append(item)
        if threading.current_thread() is not self._thread:
            self.wake()

    def send_whole(self, packet: bytes) -> bool:
        """Write a packet built outside paho (agent.mqtt.packets) from the calling thread.

        Only when it can go straight onto the wire: connected (CONNACK seen), paho has nothing
        of its own waiting to be written (so no packet is cut into), a plain TCP socket (a TLS
        record must be retried with the same bytes, which only paho's queue does) and a small
        packet. False, with nothing written, otherwise: the caller hands it to paho.
        """
        if len(packet) > WHOLE_PACKET_MAX_BYTES:
            return False
        with self.io:
            sock = self._client.socket()
            if type(sock) is not socket.socket or self._client.want_write() \
                    or not self._client.is_connected():
                return False
            try:
                sent = sock.send(packet)
            except OSError:  # full (BlockingIOError) or broken: paho's own write will tell
                return False
            if sent < len(packet):
                self._finish_write(sock, memoryview(packet)[sent:])
            return True

    def _finish_write(self, sock: socket.socket, rest: memoryview) -> None:
        """The rest of a packet that the kernel took only part of (its buffer filled up
        mid-packet). No other packet may start before it ends, so this waits, under ``io``,
        for room; a line that takes none of it for ``STALLED_WRITE_S`` is cut mid-packet and
        must end: it is shut down, and the thread reads the end and reconnects."""
        while rest:
            try:
                _, writable, _ = select.select([], [sock], [], STALLED_WRITE_S)
                if not writable:
                    break
                rest = rest[sock.send(rest):]
            except BlockingIOError:
                continue
            except OSError:
                break
        if rest:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.wake()

    def written(self) -> None:
        """After a paho call that queued a packet: if it was not (all) written, the thread
        writes the rest when the socket can take it."""
        if self._client.want_write():
            self.wake()

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._reconnect_min_s
        while not self._stopping.is_set() and not self._given_up:
            if self._connect() and self._serve():
                delay = self._reconnect_min_s  # reset once a connection was accepted
            else:
                delay = min(delay * 2, self._reconnect_max_s)
            self._deliver_deferred()
            if self._given_up or self._stopping.wait(delay):
                break
        self._deliver_deferred()

    def _connect(self) -> bool:
        try:
            with self.io:
                if self._stopping.is_set():
                    return False
                self._client.reconnect()
        except OSError as error:  # refused, unreachable, or a TLS handshake that failed
            self._on_connect_fail(error)
            return False
        return True

    def _serve(self) -> bool:
        """Until the connection ends; True when the broker accepted it (CONNACK)."""
        accepted = False
        while not self._stopping.is_set():
            sock = self._client.socket()
            if sock is None:
                break
            # TLS may hold decrypted bytes that select() cannot see.
            buffered = bool(getattr(sock, "pending", None) and sock.pending())
            writes = [sock] if self._client.want_write() else []
            try:
                readable, writable, _ = select.select(
                    [sock, self._wake_read], writes, [], 0.0 if buffered else IDLE_WAIT_S)
            except (OSError, ValueError):  # the socket was closed under this thread
                break
            if self._wake_read in readable:
                self._drain_wakeups()
            with self.io:
                rc = paho.MQTT_ERR_SUCCESS
                if buffered or sock in readable:
                    rc = self._client.loop_read()
                if rc == paho.MQTT_ERR_SUCCESS and sock in writable:
                    rc = self._client.loop_write()
                if rc == paho.MQTT_ERR_SUCCESS:
                    rc = self._client.loop_misc()
                if rc == paho.MQTT_ERR_SUCCESS and self._client.want_write():
                    # What callbacks queued just now (on_connect's SUBSCRIBE, acks) goes out
                    # before what they deferred is delivered: a caller told "connected" may
                    # count on its subscriptions having been sent.
                    rc = self._client.loop_write()
                accepted = accepted or self._client.is_connected()
            self._deliver_deferred()
            if rc != paho.MQTT_ERR_SUCCESS:
                break
        return accepted

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _deliver_deferred(self) -> None:
        while self._deferred:
            self._deliver(self._deferred.popleft())
