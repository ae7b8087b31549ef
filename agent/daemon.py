"""The device daemon (``edge-agent run``): the composition root. It builds the parts, starts
them in order, serves until SIGTERM/SIGINT (or a fatal MQTT refusal, or an upgrade's exit),
and stops them in reverse. It decides nothing itself.

Start order (``Daemon.run``; ``Daemon._shutdown`` is the reverse):

1. state (agent.daemon_state): the session counter is bumped; the Will carries it
2. MQTT (agent.presence.DeviceLink): the device's connection and the pool's, connecting in the
   background so ``starting`` and download progress show while the model loads
3. engine (agent.runtime.engine) and the ``upgrades`` watch (agent.upgrade)
4. ModelSupervisor (agent.supervisor): its ``model`` thread brings the model up (probe →
   profile → plan or last good → fetch → load); the root waits for that, or a stop
5. ``replies``, ``dispatcher`` and ``telemetry`` threads; ``status``/``meta`` published
6. READY=1 to systemd once MQTT is connected

Threads, and what each owns:

- main: signal handlers (they only set ``stop_event``; SIGHUP posts a reload to ``model``),
  the sd_notify watchdog ping at half of WATCHDOG_USEC while every thread below is alive and
  the dispatcher's heartbeat is fresh (a hung dispatcher gets the unit restarted), start, stop.
- ``mqtt-<client id>``, one per connection (agent.mqtt.network): reads the socket, decodes
  into ``inbox``, keeps the connection alive; publishes are written by their own threads.
- ``dispatcher`` (agent.dispatcher): owns ``inbox``; parses and validates prompts and commands,
  admits ids in the RequestLedger (agent.ledger), submits prompts to the engine, answers quick
  ops, posts slow ones to ``model``.
- ``model`` (agent.supervisor.ModelSupervisor): owns the model state (probe, profile, selection
  source, problem, overrides, last good) and every load, swap, fetch, bench and upgrade.
- ``replies`` (agent.replies): publishes what a busy line held back (coalesced chunks) and
  the finals of requests the engine never took; an idle line's chunks and finals go out on
  the engine's frame-reader thread itself. In order, under Replies' one lock.
- ``telemetry`` (agent.telemetry): one message per interval.
- ``upgrades`` (agent.upgrade.AgentUpgrades.watch): settles a new version's trial, then ends.
- the engine's threads and the worker process (agent.runtime): they call only
  ``Replies.recorder`` (publish or hold) and ``on_event`` (publish, or a message to ``model``).

Shared state is owned, not shared: ``draining`` and the last published status by Presence
(agent.presence, under its lock), the model state by ``model``, requests by the ledger.
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.command_ops import CommandOps
from agent.config import AgentConfig
from agent.daemon_state import DaemonState
from agent.dispatcher import Dispatcher
from agent.ledger import RequestLedger
from agent.log import get_logger
from agent.mqtt import payloads
from agent.mqtt.client import ConnectionChange, Inbound
from agent.notify import Notifier
from agent.presence import DeviceLink, Presence, signing_meta
from agent.replies import Replies
from agent.runtime.engine import Engine
from agent.supervisor import ModelSupervisor
from agent.telemetry import Telemetry
from agent.upgrade import AgentUpgrades

log = get_logger(__name__)

# Exit status when the broker refuses the credentials: retrying cannot help, so the unit
# should not restart (RestartPreventExitStatus=78; 78 is EX_CONFIG in sysexits.h).
EXIT_BAD_CREDENTIALS = 78
# How long a SIGTERM waits for in-flight requests before failing them; below systemd's
# default TimeoutStopSec (90 s) with room for the engine and MQTT to close.
STOP_GRACE_S = 20.0
# Without a systemd watchdog the main loop still wakes this often to check its threads.
MAIN_TICK_S = 1.0
# The dispatcher's heartbeat is stale (the watchdog ping stops) after this long.
HEARTBEAT_STALE_S = 10.0


class Daemon:
    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.state = DaemonState(Path(config.state_dir))
        self.stop_event = threading.Event()
        self.exit_code = 0

    def _build(self, session: int) -> None:
        """Every part, wired; nothing started."""
        config = self.config
        inbox: queue.Queue[Inbound | ConnectionChange] = queue.Queue(maxsize=10000)
        self.link = link = DeviceLink(config, session=session, inbox=inbox)
        self.ledger = ledger = RequestLedger(config.mqtt.dedup_entries)
        self.engine = engine = Engine(config.runtime, state_dir=Path(config.state_dir),
                                      device_id=config.device_id, on_event=self._on_engine_event)
        self.supervisor = supervisor = ModelSupervisor(
            config, engine=engine, state=self.state, publish_event=link.event,
            on_model_changed=lambda: self.presence.birth(), progress=self.notifier.status)
        self.presence = presence = Presence(
            config, link=link, session=session, engine=engine, supervisor=supervisor,
            ledger=ledger, notifier=self.notifier, stopping=self.stop_event.is_set)
        self.upgrades = AgentUpgrades(
            config.upgrade, config.fetch, config.signing, publish_event=link.event,
            request_exit=self._exit,
            connected=lambda: link.mqtt.connected,
            model_loaded=lambda: engine.selection is not None)
        self.replies = Replies(link.mqtt, ledger, interval_s=config.mqtt.stream_interval_ms / 1000,
                               on_answered=presence.refresh)
        ops = CommandOps(supervisor=supervisor, engine=engine, presence=presence, link=link,
                         ledger=ledger, upgrade=self.upgrades.upgrade)
        self.dispatcher = Dispatcher(config, inbox=inbox, link=link, presence=presence,
                                     ledger=ledger, engine=engine, replies=self.replies, ops=ops,
                                     stop_event=self.stop_event,
                                     on_fatal=lambda: self._exit(EXIT_BAD_CREDENTIALS))
        self.ops = ops
        self.telemetry = Telemetry(config.telemetry, engine=engine, cache_dir=config.cache_dir,
                                   state=presence.state, model_name=supervisor.model_name,
                                   publish=link.telemetry, stop_event=self.stop_event)

    def run(self) -> int:
        """Start everything, serve until stopped, stop in reverse. Returns the exit code."""
        self.notifier.status("starting")
        self._build(self.state.next_session())
        self._install_signal_handlers()
        if self.config.signing.allow_unsigned:
            log.warning("manifest_signatures_off", reason="signing.allow_unsigned is true: any "
                        "writer of a manifest or of cmd decides what this device loads")
        else:
            log.info("manifest_signatures_required", **signing_meta(self.config))
        self.link.start()
        self.presence.publish_status("starting")
        threading.Thread(target=self.upgrades.watch, args=(self.stop_event,), name="upgrades",
                         daemon=True).start()  # not watched: it ends once a trial is settled
        self.supervisor.start()
        while not self.supervisor.brought_up.wait(MAIN_TICK_S) and not self.stop_event.is_set():
            pass
        telemetry = threading.Thread(target=self.telemetry.run, name="telemetry", daemon=True)
        for part in (self.replies, self.dispatcher, telemetry):
            part.start()
        self.presence.birth()
        self._serve(telemetry)
        self._shutdown(telemetry)
        return self.exit_code

    def _serve(self, telemetry: threading.Thread) -> None:
        ready_sent = False
        tick = self.notifier.watchdog_interval_s or MAIN_TICK_S
        while not self.stop_event.is_set():
            if not ready_sent and self.link.mqtt.connected:
                self.notifier.ready(self.presence.status_line())
                ready_sent = True
                log.info("ready", state=self.presence.state(), model=self.supervisor.model_name())
            age_s = time.monotonic() - self.dispatcher.heartbeat
            parts = (self.dispatcher, self.supervisor, self.replies, telemetry)
            if age_s < HEARTBEAT_STALE_S and all(part.is_alive() for part in parts):
                self.notifier.watchdog()
            else:
                log.error("thread_stalled", heartbeat_age_s=round(age_s, 1))
            self.stop_event.wait(min(tick, MAIN_TICK_S) if not ready_sent else tick)

    def _shutdown(self, telemetry: threading.Thread) -> None:
        """Reverse of run(): stop taking work, finish or fail in-flight requests, say `stopped`."""
        pending = self.ledger.prompts_in_flight()
        self.notifier.stopping(f"stopping: finishing {pending} request(s)")
        log.info("stopping", in_flight=pending)
        self.link.stop_pool()
        telemetry.join(timeout=5.0)
        self.dispatcher.join(STOP_GRACE_S)  # it empties the inbox first
        self.supervisor.stop(timeout_s=5.0)
        # Queued requests get `cancelled`; the running one may finish within the grace.
        self.engine.close(timeout_s=STOP_GRACE_S)
        self.replies.stop(timeout_s=5.0)  # publishes what is queued, cancels what is left
        self.presence.publish_status("stopped", force=True)
        if not self.link.stop(flush_timeout_s=5.0):
            log.warning("mqtt_flush_timeout")
        self.notifier.close()
        log.info("stopped", exit_code=self.exit_code)

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stop_event.set()

        def reload(signum: int, frame: Any) -> None:  # systemctl reload: re-plan and swap
            command = payloads.Command(id=f"sighup-{int(time.time())}", op="reload",
                                       args=payloads.NoArgs())
            self.ops.submit_own(command)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _on_engine_event(self, event: dict[str, Any]) -> None:
        """An engine thread: publish the event; a failed restart's wish is the supervisor's."""
        self.link.engine_event(event)
        self.supervisor.on_engine_event(event)

    def _exit(self, code: int) -> None:
        """Stop as on SIGTERM, then exit with ``code`` (what the unit's Restart= acts on)."""
        self.exit_code = code
        self.stop_event.set()


def run_daemon(config: AgentConfig) -> int:
    """Entry point for ``edge-agent run``."""
    code = Daemon(config).run()
    sys.stdout.flush()
    return code
