"""Selections for model files already on this disk: what ``prompt`` and ``bench`` run.

``--model PATH`` needs no manifest: the GGUF header gives the context length and the
machine gives the thread count. ``--manifest M`` with a local manifest uses the variant
files next to it. This module reads headers; it never downloads and never loads a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from agent.catalog.selection import MemoryEstimate, Selection
from agent.errors import ModelLoadError

if TYPE_CHECKING:
    from agent.catalog.manifest import Manifest
    from agent.config import SigningConfig

DEFAULT_N_CTX = 4096  # enough for a chat turn; the model's own maximum is often far larger


def default_threads() -> int:
    """Physical cores: llama.cpp decode is memory-bound and SMT siblings only contend."""
    return max(1, psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


def selection_for_file(
    path: str | Path,
    *,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    model_id: str | None = None,
    quant: str | None = None,
    sha256: str = "",
    quality: float = 1.0,
) -> Selection:
    from agent.catalog.gguf import read_gguf_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    info = read_gguf_file(path)
    size = path.stat().st_size
    context = min(n_ctx or DEFAULT_N_CTX, info.context_length or DEFAULT_N_CTX)
    return Selection(
        model_id=model_id or path.stem,
        quant=quant or path.stem.rsplit(".", 1)[-1],
        file=path.name,
        size=size,
        sha256=sha256,
        urls=[],
        quality=quality,
        n_ctx=context,
        n_threads=n_threads or default_threads(),
        estimate=MemoryEstimate(ram_bytes=size),  # mmap'd weights dominate; KV is small here
        model_path=str(path.resolve()),
    )


def manifest_selections(
    source: str,
    signing: SigningConfig,
    *,
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> tuple[Manifest, list[Selection]]:
    """One Selection per variant whose file sits next to a local manifest, best first.

    The manifest passes the same signature rules as under the daemon (``signing``)."""
    from agent.catalog.manifest import is_url, load_manifest, location_next_to

    if is_url(source):
        raise ModelLoadError(f"{source}: bench and prompt read a local manifest; fetch first")
    manifest = load_manifest(source, signing)
    selections = []
    for model in manifest.models:
        for variant in sorted(model.variants, key=lambda v: -v.quality):
            path = Path(location_next_to(source, variant.file))
            if path.is_file():
                selections.append(
                    selection_for_file(
                        path,
                        n_ctx=n_ctx,
                        n_threads=n_threads,
                        model_id=model.id,
                        quant=variant.quant,
                        sha256=variant.sha256,
                        quality=variant.quality,
                    )
                )
    if not selections:
        raise ModelLoadError(f"{source}: none of its variant files are next to it")
    return manifest, selections


def next_smaller(selections: list[Selection]):
    """The ``smaller`` callback for Engine.load over a best-first list of variants."""

    def smaller(current: Selection) -> Selection | None:
        sizes = [s for s in selections if s.model_id == current.model_id and s.size < current.size]
        return max(sizes, key=lambda s: s.size) if sizes else None

    return smaller
