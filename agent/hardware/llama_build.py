"""What the installed llama.cpp can do: version, GPU offload, its system_info flags.

llama_cpp is imported only by agent.runtime.worker, and importing it costs memory and
time, so the build is asked in a child process: ``python -m agent.runtime.worker
--build-info`` prints ``{version, gpu_offload, system_info}`` as JSON. When that entry
point is missing or fails, the build is reported as absent (None), never as an error.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

from agent.hardware.device import LlamaBuildInfo
from agent.log import get_logger

log = get_logger(__name__)

BUILD_INFO_TIMEOUT_S = 30.0
WORKER_MODULE = "agent.runtime.worker"


def read_build_info() -> str | None:
    """The worker's --build-info JSON text, or None."""
    try:
        if importlib.util.find_spec(WORKER_MODULE) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-m", WORKER_MODULE, "--build-info"],
            capture_output=True,
            text=True,
            timeout=BUILD_INFO_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("llama_build_info_failed", error=str(exc))
        return None
    if done.returncode != 0:
        log.info(
            "llama_build_info_failed", returncode=done.returncode, stderr=done.stderr.strip()[-300:]
        )
        return None
    return done.stdout


def parse_system_info(system_info: str) -> list[str]:
    """ "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 0 | …" → ["avx2", "sse3"] (the ones on)."""
    return sorted(
        {m.group(1).lower() for m in re.finditer(r"([A-Za-z0-9_]+)\s*=\s*1\b", system_info)}
    )


def parse_build_info(text: str) -> LlamaBuildInfo | None:
    """The JSON object from the last line that holds one (llama.cpp may log before it)."""
    for line in reversed(text.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict) or "version" not in data:
            continue
        system_info = str(data.get("system_info") or "")
        return LlamaBuildInfo(
            version=str(data["version"]),
            gpu_offload=bool(data.get("gpu_offload")),
            system_info=system_info,
            features=parse_system_info(system_info),
        )
    return None


def probe_llama_build() -> LlamaBuildInfo | None:
    text = read_build_info()
    return parse_build_info(text) if text else None
