"""The fallback ladder: worker settings from a Selection, each step safer than the last.

Steps are cumulative (step 2 keeps step 1's change) and a step that would change nothing
for this selection is skipped. After the last step the engine asks the selector for the
next smaller variant. Pure functions over plain data; no processes, no I/O.
"""

from __future__ import annotations

from typing import Any

from agent.catalog.selection import Selection
from agent.config import RuntimeConfig

# The order is the order of suspicion on real devices: the repacked-weight kernels (AMX on
# x86 servers, some ARM repacks) crash first; thread counts trip cgroup CPU limits; GPU
# drivers fail to allocate; big batches run out of compute buffer memory.
STEPS = ("as_selected", "no_extra_bufts", "fewer_threads", "no_gpu", "smaller_batch")

SAFE_BATCH = 64  # small enough for any compute buffer, big enough that prefill stays usable

CANARY_PROMPT = "The capital of France is"


def base_settings(selection: Selection, runtime: RuntimeConfig) -> dict[str, Any]:
    """The worker's load settings for ``selection`` as the selector chose them."""
    return {
        "model_path": selection.model_path,
        "n_ctx": selection.n_ctx,
        "n_batch": selection.n_batch,
        "n_ubatch": min(selection.n_ubatch, selection.n_batch),
        "n_threads": max(1, selection.n_threads),
        "n_gpu_layers": selection.n_gpu_layers,
        "kv_type": selection.kv_type,
        "use_mmap": selection.use_mmap and runtime.use_mmap,
        "use_mlock": selection.use_mlock or runtime.use_mlock,
        "flash_attn": selection.flash_attn if runtime.flash_attn is None else runtime.flash_attn,
        "use_extra_bufts": True,
        "chat_format": selection.chat_format,
        "steps": [],
    }


def _apply(step: str, settings: dict[str, Any]) -> dict[str, Any]:
    changed = dict(settings)
    if step == "no_extra_bufts":
        changed["use_extra_bufts"] = False
    elif step == "fewer_threads":
        changed["n_threads"] = max(1, settings["n_threads"] // 2)
    elif step == "no_gpu":
        changed["n_gpu_layers"] = 0
    elif step == "smaller_batch":
        changed["n_batch"] = min(settings["n_batch"], SAFE_BATCH)
        changed["n_ubatch"] = min(settings["n_ubatch"], SAFE_BATCH)
    return changed


def _differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "steps"} != {
        k: v for k, v in b.items() if k != "steps"
    }


def rungs(
    selection: Selection, runtime: RuntimeConfig, start: str = "as_selected"
) -> list[tuple[str, dict[str, Any]]]:
    """``(step, settings)`` from ``start`` down, skipping steps that change nothing."""
    first = STEPS.index(start) if start in STEPS else 0
    ladder = []
    current, current_step = base_settings(selection, runtime), STEPS[0]
    for index, step in enumerate(STEPS):
        if index > 0:
            changed = _apply(step, current)
            if not _differs(changed, current):
                continue
            changed["steps"] = current["steps"] + [step]
            current, current_step = changed, step
        if index >= first:
            ladder.append((step, current))
    # A remembered step that changes nothing for this selection: its safest settings still apply.
    return ladder or [(current_step, current)]
