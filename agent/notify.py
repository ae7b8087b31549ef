"""systemd's notify protocol without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

``READY=1``, ``STATUS=<text>``, ``WATCHDOG=1``, ``STOPPING=1`` as described in sd_notify(3).
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op that returns False, so the daemon
runs the same in a terminal. This module only sends; it decides nothing about when.

A datagram is newline-separated assignments, so a STATUS text that carried a newline would
smuggle its own commands (``WATCHDOG=trigger``, ``MAINPID=``). STATUS texts quote manifest
names and error messages, so every one goes through :func:`status_text`: control and
line-breaking characters become spaces and the length is bounded.
"""

from __future__ import annotations

import os
import re
import socket

from agent.log import get_logger

log = get_logger(__name__)

MAX_STATUS_CHARS = 400  # what `systemctl status` shows on a line or two
# C0/C1 controls and what str.splitlines() would break at (U+2028/2029 …): one line only.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def status_text(text: str) -> str:
    """``text`` as one bounded line, safe to send as ``STATUS=``."""
    line = _UNSAFE.sub(" ", text[: MAX_STATUS_CHARS * 2])
    return line if len(line) <= MAX_STATUS_CHARS else line[: MAX_STATUS_CHARS - 1] + "…"


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        self.watchdog_interval_s = _watchdog_interval(env)
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A reader that stopped reading must never stall the daemon's main loop.
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status_text(status)}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={status_text(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status_text(status)}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: dict[str, str]) -> float | None:
    """Half of WatchdogSec, as sd_watchdog_enabled(3) advises; None when no watchdog is set."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
