"""A test-only entry point for the inference worker that crashes like the native AMX build.

Run as ``python tests/support/crashing_worker.py --crash-unless STEP --fds IN,OUT`` (the
engine's ``worker_argv``). It serves agent.runtime.worker's Worker, but raises a real SIGSEGV
at the first decode (the canary or a generation) unless the fallback step STEP (e.g.
``no_extra_bufts``) is in effect, which is how that build fails on the machines the agent runs
on. The shipped worker carries no such hook.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from agent.runtime.protocol import Generate, Load
from agent.runtime.worker import Worker, main

ENTRY = Path(__file__).resolve()


def argv(crash_unless: str) -> list[str]:
    """The engine's ``worker_argv`` for a worker that crashes unless ``crash_unless`` holds."""
    return [sys.executable, str(ENTRY), "--crash-unless", crash_unless]


class CrashingWorker(Worker):
    crash_unless = ""

    def _load(self, message: Load) -> None:
        self._steps = message.settings.get("steps", [])
        super()._load(message)

    def _crash_unless_step(self) -> None:
        if self.crash_unless not in self._steps:
            os.kill(os.getpid(), signal.SIGSEGV)

    def _run_canary(self, prompt: str, tokens: int) -> tuple[str, int]:
        self._crash_unless_step()
        return super()._run_canary(prompt, tokens)

    def _generate(self, message: Generate) -> None:
        self._crash_unless_step()
        super()._generate(message)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-unless", required=True)
    known, rest = parser.parse_known_args()
    CrashingWorker.crash_unless = known.crash_unless
    sys.exit(main(rest, worker_class=CrashingWorker))
