"""The selector's answer: which variant, with which settings, and why. Plain data.

Produced by agent.catalog.select, consumed by fetch (file, sha256, urls), the runtime
(everything under "settings"), the daemon's ``meta`` and the dashboard (``candidates``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

KVType = Literal["f16", "q8_0", "q4_0"]


class MemoryEstimate(msgspec.Struct, kw_only=True):
    ram_bytes: int  # host RAM the load will add (weights not offloaded, KV, buffers, overhead)
    vram_bytes: int = 0
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    overhead_bytes: int = 0
    process_bytes: int = 0  # the worker process itself (interpreter + llama_cpp), part of ram_bytes
    learned_ram_bytes: int | None = None  # measured on this device for the same key, if known


class Candidate(msgspec.Struct, kw_only=True):
    """One row of ``select --explain``."""

    quant: str
    file: str
    size: int
    quality: float
    n_ctx: int
    kv_type: KVType
    n_gpu_layers: int
    estimate: MemoryEstimate
    predicted_tokens_per_s: float | None
    measured_tokens_per_s: float | None = None  # decoded here with this llama.cpp build, if known
    verdict: Literal["chosen", "fits", "rejected"]
    reason: str  # "needs 1.9 GiB, budget 1.6 GiB", "below 5.0 tok/s", "lower quality than Q8_0"


class SelectionPart(msgspec.Struct, kw_only=True):
    """One file of a split variant: fetched, verified and kept beside the first part."""

    file: str
    size: int
    sha256: str
    urls: list[str] = []


class Selection(msgspec.Struct, kw_only=True):
    model_id: str
    quant: str
    file: str
    size: int
    sha256: str
    urls: list[str]
    quality: float
    # llama.cpp settings
    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    kv_type: KVType = "f16"
    n_gpu_layers: int = 0
    n_threads: int = 1
    flash_attn: bool = False
    use_mmap: bool = True
    use_mlock: bool = False
    # why
    estimate: MemoryEstimate
    predicted_tokens_per_s: float | None = None
    budget_bytes: int = 0
    vram_budget_bytes: int = 0
    profile: str | None = None
    candidates: list[Candidate] = []
    manifest_url: str | None = None  # where the manifest came from; a variant without urls is next to it
    model_path: str | None = None  # set once the file is in the local store
    # What the worker turns messages into a prompt with, when not the GGUF's own template: a
    # registered chat format name or a Jinja file path, from the config or the manifest.
    chat_format: str | None = None
    # Which template that is, for meta and select: "gguf", "manifest:<name>", "config:<name>"
    # or "none" (messages are refused); None when the Selection was not made by the selector.
    chat_template: str | None = None
    # A split variant's files in order (file, size and sha256 above are then the first part's
    # name, the parts' total size and the first part's sha256); empty for one file.
    parts: list[SelectionPart] = []
