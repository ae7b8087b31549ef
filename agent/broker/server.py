"""``EmbeddedBroker``: the listener and its lifecycle, the connection limit, and the parts a
connection's packets go to (see the package docstring for what it does and must not do):
``sessions`` (``SessionRegistry``), ``subscriptions`` (``SubscriptionIndex``), ``router``
(``Router``, over the ``RetainedStore``) and ``delivery`` (``Delivery``, the QoS 1 flow)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from agent.broker.codec import RC_SERVER_SHUTTING_DOWN
from agent.broker.connection import Connection
from agent.broker.delivery import Delivery
from agent.broker.limits import (
    CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IDLE_S,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_BYTES,
    DEFAULT_MAX_SESSION_BYTES,
)
from agent.broker.registry import SessionRegistry
from agent.broker.retained import RetainedStore
from agent.broker.routing import Router
from agent.broker.subscriptions import SubscriptionIndex
from agent.errors import BrokerError
from agent.log import get_logger

log = get_logger(__name__)

class EmbeddedBroker:
    """In-memory MQTT 3.1.1/5.0 broker. ``await start()`` returns the bound port (pass
    ``port=0`` for a free one); ``run_in_thread()``/``stop_thread()`` do the same from
    synchronous code."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_retained: int = DEFAULT_MAX_RETAINED,
                 max_retained_bytes: int = DEFAULT_MAX_RETAINED_BYTES,
                 max_idle_s: float = DEFAULT_MAX_IDLE_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.max_packet_size = max_packet_size
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.max_idle_s = max_idle_s
        self.connect_timeout_s = connect_timeout_s
        self.subscriptions = SubscriptionIndex()
        self.delivery = Delivery(max_queued, max_session_bytes)
        self.router = Router(self.subscriptions, RetainedStore(max_retained, max_retained_bytes),
                             self.delivery)
        self.sessions = SessionRegistry(self.subscriptions, self.router)
        self._refused_connections = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # lifecycle --------------------------------------------------------------

    async def start(self) -> int:
        if self._server is not None:
            raise BrokerError("the embedded broker is already running", port=self.port)
        self.loop = asyncio.get_running_loop()
        try:
            self._server = await self.loop.create_server(
                lambda: Connection(self), self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise BrokerError(
                f"the embedded broker cannot listen on {self.host}:{self.port}: {exc.strerror};"
                " pick another --port or stop what is using it",
                host=self.host, port=self.port) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        self.sessions.start(self.loop)  # sessions kept across stop()/start()
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("broker_not_loopback", host=self.host,
                        detail="no authentication: any client that can reach it may connect")
        log.info("broker_started", host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close(RC_SERVER_SHUTTING_DOWN, publish_will=False, end_session=False)
        self.sessions.stop()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let transports run connection_lost before the loop may close
        self._server = None
        log.info("broker_stopped", port=self.port)

    def run_in_thread(self) -> int:
        """Start on a private event loop in a daemon thread; returns the port."""
        started = threading.Event()
        outcome: list[Any] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            try:
                outcome.append(loop.run_until_complete(self.start()))
            except BaseException as exc:  # handed to the caller below
                outcome.append(exc)
                loop.close()
                started.set()
                return
            self._thread_loop = loop
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="embedded-broker", daemon=True)
        self._thread.start()
        started.wait()
        if isinstance(outcome[0], BaseException):
            self._thread.join()
            self._thread = None
            raise outcome[0]
        return outcome[0]

    def stop_thread(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._thread_loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = self._thread_loop = None

    # connections ------------------------------------------------------------

    def admit(self, connection: Connection) -> bool:
        """Count a new socket in, or refuse it past ``max_connections`` (logged, not silent)."""
        if len(self._connections) >= self.max_connections:
            self._refused_connections += 1
            refused = self._refused_connections
            if refused == 1 or refused % 1000 == 0:
                log.warning("broker_connection_refused", peer=connection.peer, refused=refused,
                            limit=self.max_connections)
            return False
        self._connections.add(connection)
        return True

    def connection_ended(self, connection: Connection, publish_will: bool,
                         end_session: bool) -> None:
        self._connections.discard(connection)
        self.sessions.detach(connection, publish_will, end_session)
