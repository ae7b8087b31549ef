"""The table of ``cmd`` ops: which handler answers each op, and on which thread.

``quick`` ops (drain, resume, rebirth) answer at once on the dispatcher thread; every other
op is a message to the ModelSupervisor's ``model`` thread, so model changes (and upgrades)
run one at a time and never hold up prompts. The table must name every op that
agent.mqtt.payloads.OPS parses, and only those: ``CommandOps`` refuses to start otherwise.
To add an op: its args Struct in payloads.OPS, its row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import BusyError, EdgeAgentError
from agent.ledger import ReplyRoute, RequestLedger
from agent.log import get_logger
from agent.mqtt import payloads
from agent.presence import DeviceLink, Presence
from agent.runtime.engine import Engine
from agent.supervisor import ModelSupervisor

log = get_logger(__name__)


@dataclass(frozen=True)
class Op:
    handler: Callable[[Any], dict[str, Any]]
    quick: bool = False  # answered on the dispatcher thread; else on the ``model`` thread


class CommandOps:
    def __init__(self, *, supervisor: ModelSupervisor, engine: Engine, presence: Presence,
                 link: DeviceLink, ledger: RequestLedger,
                 upgrade: Callable[[Any], dict[str, Any]]) -> None:
        self.supervisor = supervisor
        self.engine = engine
        self.presence = presence
        self.link = link
        self.ledger = ledger
        self.table: dict[str, Op] = {
            "drain": Op(self._drain, quick=True),
            "resume": Op(self._resume, quick=True),
            "rebirth": Op(self._rebirth, quick=True),
            "reload": Op(supervisor.reload),
            "select": Op(supervisor.select),
            "fetch": Op(supervisor.fetch),
            "pin": Op(supervisor.pin),
            "set_manifest": Op(supervisor.set_manifest),
            "bench": Op(supervisor.bench),
            "upgrade": Op(upgrade),
        }
        if set(self.table) != set(payloads.OPS):
            raise RuntimeError(f"the command table {sorted(self.table)} and the parsed ops "
                               f"{sorted(payloads.OPS)} differ")

    def submit(self, command: payloads.Command, route: ReplyRoute) -> None:
        """Dispatcher thread: run a quick op now, post any other to the ``model`` thread, or
        answer ``busy`` when too many wait there (the id is forgotten: a retry may run)."""
        if self.table[command.op].quick:
            self.run(command, route)
            return
        try:
            self.supervisor.post_command(lambda: self.run(command, route))
        except BusyError as exc:
            self.ledger.forget("cmd", command.id)
            self.link.reply(route, payloads.encode(
                payloads.cmd_result(command.id, error=exc.to_dict())))

    def submit_own(self, command: payloads.Command) -> None:
        """The device's own command (SIGHUP's reload), with no one to answer: never refused,
        and safe in a signal handler (one put on a SimpleQueue)."""
        self.supervisor.post(lambda: self.run(command, None))

    def run(self, command: payloads.Command, route: ReplyRoute | None) -> None:
        """Answer one command: its result or its error, remembered in the ledger."""
        log.info("command", id=command.id, op=command.op)
        try:
            result = self.table[command.op].handler(command.args)
            body = payloads.cmd_result(command.id, result=result)
        except EdgeAgentError as exc:
            body = payloads.cmd_result(command.id, error=exc.to_dict())
        except Exception as exc:  # an op bug must answer, not hang the controller
            log.exception("command_failed", id=command.id, op=command.op)
            body = payloads.cmd_result(command.id, error={"code": "internal", "message": str(exc)})
        encoded = payloads.encode(body)
        self.ledger.finish("cmd", command.id, encoded)
        if route is not None:
            self.link.reply(route, encoded)

    # -- the quick ops ----------------------------------------------------------------------

    def _drain(self, args: payloads.NoArgs) -> dict[str, Any]:
        # Holds new work at once; the running request goes on (timeout 0: do not wait for it).
        self.engine.drain(timeout_s=0)
        self.presence.set_draining(True)
        return {"state": "draining", "queue_depth": self.engine.queue_depth}

    def _resume(self, args: payloads.NoArgs) -> dict[str, Any]:
        self.engine.resume()
        self.presence.set_draining(False)
        return {"state": self.presence.state()}

    def _rebirth(self, args: payloads.NoArgs) -> dict[str, Any]:
        self.presence.birth()
        return {"state": self.presence.state(), "session": self.presence.session}
