"""The embedded broker's command line: ``python -m agent.broker --port 1883``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from agent.broker.limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IDLE_S,
    DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_BYTES,
    DEFAULT_MAX_SESSION_BYTES,
)
from agent.broker.server import EmbeddedBroker
from agent.errors import EdgeAgentError
from agent.log import configure_logging

async def serve(broker: EmbeddedBroker) -> None:
    await broker.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.broker",
        description="Embedded MQTT 3.1.1/5.0 broker (anonymous, in-memory; loopback only).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (0: any free port)")
    parser.add_argument("--max-packet-size", type=int, default=DEFAULT_MAX_PACKET_SIZE,
                        help="largest packet accepted, in bytes")
    parser.add_argument("--max-session-bytes", type=int, default=DEFAULT_MAX_SESSION_BYTES,
                        help="QoS 1 bytes one session may hold, queued plus in flight; the"
                             " oldest queued message is dropped past it")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open sockets; one more is closed at once")
    parser.add_argument("--max-retained", type=int, default=DEFAULT_MAX_RETAINED,
                        help="retained topics; a retained PUBLISH past it is refused")
    parser.add_argument("--max-retained-bytes", type=int, default=DEFAULT_MAX_RETAINED_BYTES,
                        help="bytes of all retained messages together")
    parser.add_argument("--max-idle", type=float, default=DEFAULT_MAX_IDLE_S,
                        help="seconds a keepalive-0 client may stay silent before it is closed")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    broker = EmbeddedBroker(
        args.host, args.port, max_packet_size=args.max_packet_size,
        max_session_bytes=args.max_session_bytes, max_connections=args.max_connections,
        max_retained=args.max_retained, max_retained_bytes=args.max_retained_bytes,
        max_idle_s=args.max_idle)
    try:
        asyncio.run(serve(broker))
    except EdgeAgentError as exc:
        print(f"edge-agent broker: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    return 0
