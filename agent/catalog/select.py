"""Choose the variant and llama.cpp settings for this device, and say why.

``choose`` is pure: device facts, the matched profile, config overrides, the manifest
and the GGUF headers in; a Selection with one explained Candidate per variant out.
``plan_selection`` does the I/O around it (probe, profiles, manifest, headers, learned
corrections) and is what the CLI and the daemon call.

The rule: among variants that can run here (architecture and CPU flags), take the highest
``quality`` whose memory need fits the effective budget (budget - headroom for RAM, free
VRAM for offloaded layers) and whose predicted decode speed meets the minimum; ties go to
the smaller file. For each variant the context starts at the target and is halved towards
the floor (then the KV cache is quantized to q8_0 when f16 was only a preference) until
it fits, so a better variant can win at a smaller context. GPU layers: all when VRAM
allows, else the most that fit. A pinned variant that does not fit is an error here, not
an out-of-memory later.

Predicted decode speed (agent.catalog.speed) = read rate / bytes read per token at a typical
context fill, where the read rate is what this device and llama.cpp build learned from its
own generations (LearnedSpeed), else measured bandwidth x a default efficiency. Without
either no variant is rejected for speed and the reason says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agent.catalog.estimate import estimate_memory, repack_rules
from agent.catalog.gguf import GGUFInfo, read_gguf_header, read_gguf_split
from agent.catalog.learned import (
    DecodeRates,
    LearnedMemory,
    LearnedSpeed,
    llama_build_key,
    settings_key_for,
)
from agent.catalog.manifest import (
    Manifest,
    ModelEntry,
    Part,
    Variant,
    load_manifest,
    location_next_to,
)
from agent.catalog.profiles import Policy, Profile, load_profiles, match_profile
from agent.catalog.selection import Candidate, KVType, MemoryEstimate, Selection, SelectionPart
from agent.catalog.speed import DEFAULT_EFFICIENCY, predict_tokens_per_s
from agent.config import AgentConfig, ModelConfig
from agent.errors import ConfigError, EdgeAgentError, SelectionError
from agent.hardware.device import DeviceInfo
from agent.log import get_logger

log = get_logger(__name__)

MAX_UBATCH = 512

# learned(sha256, settings_key) -> measured RSS growth, or None
LearnedLookup = Callable[[str, str], "int | None"]


def format_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    ram_bytes: int  # what the worker may use: budget - headroom
    vram_bytes: int  # free dedicated VRAM
    headroom_bytes: int
    raw_ram_bytes: int
    unified_memory: bool


@dataclass(frozen=True)
class _Plan:
    """One way to load a variant: settings, estimate and what is charged to the budget."""

    n_ctx: int
    kv_type: KVType
    n_gpu_layers: int
    estimate: MemoryEstimate
    ram_needed: int
    vram_needed: int
    tokens_per_s: float | None
    measured_tokens_per_s: float | None  # what this variant decoded at here, when it has run


def _budget(device: DeviceInfo, policy: Policy, cfg: ModelConfig,
            memory_bytes: int | None, vram_bytes: int | None) -> Budget:
    raw = memory_bytes if memory_bytes is not None else (
        device.memory.budget_bytes or device.memory.available_bytes)
    headroom = cfg.memory_headroom_bytes if cfg.memory_headroom_bytes is not None else policy.memory_headroom_bytes
    vram = vram_bytes if vram_bytes is not None else device.vram_free_bytes
    unified = any(g.unified_memory for g in device.gpus) and vram_bytes is None
    return Budget(max(raw - headroom, 0), max(vram, 0), headroom, raw, unified)


def _context_ladder(target: int, floor: int) -> list[int]:
    sizes = [target]
    while sizes[-1] // 2 >= floor and sizes[-1] > floor:
        sizes.append(max(sizes[-1] // 2, floor))
    if sizes[-1] != floor and floor < target:
        sizes.append(floor)
    return sizes


def _requires_problem(variant: Variant, device: DeviceInfo) -> str | None:
    if variant.requires.arch and device.cpu.arch not in variant.requires.arch:
        return f"needs arch {'/'.join(variant.requires.arch)}, this is {device.cpu.arch}"
    missing = [f for f in variant.requires.cpu_flags if f not in device.cpu.flags]
    if missing:
        return f"needs CPU flags {', '.join(missing)}"
    return None


def _gpu_offload_possible(device: DeviceInfo, budget: Budget) -> bool:
    if device.llama is not None and not device.llama.gpu_offload:
        return False
    return budget.unified_memory or budget.vram_bytes > 0


def _plan_variant(
    variant: Variant, info: GGUFInfo, device: DeviceInfo, budget: Budget, *, contexts: list[int],
    kv_types: list[KVType], n_batch: int, gpu_layers: int | None, flash_attn: bool, use_mmap: bool,
    min_tokens_per_s: float, efficiency: float, learned: LearnedLookup | None,
    rates: DecodeRates | None,
) -> tuple[_Plan | None, _Plan, str]:
    """The best way to load ``variant`` within the budget (or None) and, for the explain
    table, the smallest plan tried with the reason it failed."""
    repack = repack_rules(device.cpu.arch, _build_flags(device))
    offload = _gpu_offload_possible(device, budget)
    n_ubatch = min(n_batch, MAX_UBATCH)
    smallest: _Plan | None = None
    failure = ""
    for kv_type in kv_types:
        for n_ctx in contexts:
            layer_options = (
                [gpu_layers] if gpu_layers is not None
                else list(range(info.block_count + 1, -1, -1)) if offload else [0]
            )
            for n_gpu in layer_options:
                estimate = estimate_memory(
                    info, variant.size, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, kv_type=kv_type,
                    n_gpu_layers=n_gpu, flash_attn=flash_attn or kv_type != "f16", use_mmap=use_mmap,
                    repack=None if n_gpu > info.block_count else repack,
                )
                key = settings_key_for(n_ctx, n_batch, n_ubatch, kv_type, n_gpu, flash_attn or kv_type != "f16")
                learned_growth = learned(variant.sha256, key) if learned else None
                if learned_growth is not None:
                    estimate = msgspec.structs.replace(
                        estimate, learned_ram_bytes=learned_growth + estimate.process_bytes)
                ram = estimate.learned_ram_bytes or estimate.ram_bytes
                vram = estimate.vram_bytes
                if budget.unified_memory:
                    ram, vram = ram + vram, 0
                measured = rates.variant(variant.sha256, n_gpu) if rates else None
                speed = predict_tokens_per_s(
                    info, n_ctx, kv_type, device.bandwidth_gbps, efficiency,
                    rates.bytes_per_s(variant.sha256, n_gpu) if rates else None)
                plan = _Plan(n_ctx, kv_type, n_gpu, estimate, ram, vram, speed,
                             measured.tokens_per_s if measured else None)
                if ram > budget.ram_bytes:
                    failure = f"needs {format_bytes(ram)}, budget {format_bytes(budget.ram_bytes)}"
                elif vram > budget.vram_bytes:
                    failure = f"needs {format_bytes(vram)} VRAM, free {format_bytes(budget.vram_bytes)}"
                    continue  # fewer layers on the GPU may fit
                elif speed is not None and speed < min_tokens_per_s:
                    failure = f"predicted {speed:.1f} tok/s, below {min_tokens_per_s:g}"
                else:
                    return plan, plan, ""
                if smallest is None or ram < smallest.ram_needed:
                    smallest = plan
                break  # fewer GPU layers only moves memory to RAM, which is already short
    return None, smallest or plan, failure


def _build_flags(device: DeviceInfo) -> list[str]:
    """The ISA the llama.cpp build uses: its reported features, else the CPU's flags."""
    if device.llama is not None and device.llama.features:
        return device.llama.features
    return device.cpu.flags


@dataclass(frozen=True)
class _Settings:
    """The llama.cpp settings that do not depend on the variant: config over profile."""

    flash_attn: bool
    n_batch: int
    min_tokens_per_s: float
    kv_pref: KVType
    kv_types: list[KVType]  # the preferred KV type, then q8_0 when f16 was only a preference
    n_threads: int


def _settings(device: DeviceInfo, policy: Policy, model_cfg: ModelConfig,
              flash_attn: bool | None) -> _Settings:
    # Flash attention: the CPU backend has it and it keeps the score matrices out of RAM.
    flash = True if flash_attn is None else flash_attn
    min_speed = (model_cfg.min_tokens_per_s if model_cfg.min_tokens_per_s is not None
                 else policy.min_tokens_per_s)
    kv_pref: KVType = model_cfg.kv_type or policy.kv_type
    kv_types: list[KVType] = [kv_pref]
    if model_cfg.kv_type is None and kv_pref == "f16" and flash:
        kv_types.append("q8_0")
    n_threads = model_cfg.n_threads or policy.n_threads or device.cpu.physical_cores or 1
    return _Settings(flash, policy.n_batch, min_speed, kv_pref, kv_types, n_threads)


def _check_pin(model: ModelEntry, pin: str | None) -> None:
    if pin is not None and not any(v.quant == pin for v in model.variants):
        raise ConfigError(
            f"model.pin: {pin!r} is not a variant of {model.id} "
            f"(it has: {', '.join(v.quant for v in model.variants)})"
        )


# One row per variant: the plan that fits (None when it does not) and why not.
_Row = tuple[Variant, _Plan | None, str]


def _plan_variants(
    model: ModelEntry, device: DeviceInfo, policy: Policy, model_cfg: ModelConfig,
    headers: Mapping[str, GGUFInfo], budget: Budget, settings: _Settings, *, use_mmap: bool,
    efficiency: float, learned: LearnedLookup | None, rates: DecodeRates | None,
) -> tuple[list[_Row], dict[str, tuple[_Plan, str]]]:
    """A row per variant, and for each variant that was planned its fitting plan (or the
    smallest one tried) with the reason it failed."""
    rows: list[_Row] = []
    plans: dict[str, tuple[_Plan, str]] = {}
    for variant in model.variants:
        if model_cfg.pin is not None and variant.quant != model_cfg.pin:
            rows.append((variant, None, f"not the pinned variant ({model_cfg.pin})"))
            continue
        problem = _requires_problem(variant, device)
        info = headers.get(variant.file)
        if problem is None and info is None:
            problem = "GGUF header unavailable"
        if problem:
            rows.append((variant, None, problem))
            continue
        target = model_cfg.n_ctx_target or policy.n_ctx_target
        if info.context_length:
            target = min(target, info.context_length)
        floor = min(model_cfg.n_ctx_floor or policy.n_ctx_floor, target)
        fitting, tried, failure = _plan_variant(
            variant, info, device, budget, contexts=_context_ladder(target, floor),
            kv_types=settings.kv_types, n_batch=settings.n_batch, gpu_layers=model_cfg.n_gpu_layers,
            flash_attn=settings.flash_attn, use_mmap=use_mmap,
            min_tokens_per_s=settings.min_tokens_per_s, efficiency=efficiency, learned=learned,
            rates=rates,
        )
        if fitting is not None:
            plans[variant.file] = (fitting, "")
            rows.append((variant, fitting, ""))
        else:
            plans[variant.file] = (tried, failure)
            rows.append((variant, None, failure))
    return rows, plans


def _candidates(rows: list[_Row], plans: dict[str, tuple[_Plan, str]], best: Variant,
                budget: Budget, device: DeviceInfo, kv_pref: KVType) -> list[Candidate]:
    """The explain table: every variant with its verdict, the settings it was judged at
    and the reason."""
    candidates = []
    for variant, plan, reason in rows:
        shown = plan or plans.get(variant.file, (None, ""))[0]
        if variant is best:
            verdict, reason = "chosen", _chosen_reason(best, plans[best.file][0], budget, device)
        elif plan is not None:
            verdict = "fits"
            reason = (f"lower quality than {best.quant}" if variant.quality < best.quality
                      else f"same quality as {best.quant}, larger file")
        else:
            verdict = "rejected"
        candidates.append(Candidate(
            quant=variant.quant, file=variant.file, size=variant.size, quality=variant.quality,
            n_ctx=shown.n_ctx if shown else 0, kv_type=shown.kv_type if shown else kv_pref,
            n_gpu_layers=shown.n_gpu_layers if shown else 0,
            estimate=shown.estimate if shown else MemoryEstimate(ram_bytes=0),
            predicted_tokens_per_s=shown.tokens_per_s if shown else None,
            measured_tokens_per_s=shown.measured_tokens_per_s if shown else None,
            verdict=verdict, reason=reason,
        ))
    return candidates


def choose(
    device: DeviceInfo,
    profile: Profile,
    manifest: Manifest,
    model_cfg: ModelConfig,
    headers: Mapping[str, GGUFInfo],
    learned: LearnedLookup | None = None,
    *,
    rates: DecodeRates | None = None,
    memory_bytes: int | None = None,
    vram_bytes: int | None = None,
    flash_attn: bool | None = None,
    use_mmap: bool = True,
    use_mlock: bool = False,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> Selection:
    """Pick the variant and settings (pure). ``headers`` maps variant file -> GGUFInfo;
    a variant without a header is rejected with the reason; ``rates`` are the decode rates
    this device learned (None: predict from bandwidth alone). Raises SelectionError."""
    policy = profile.policy
    model = manifest.model(model_cfg.model_id)
    budget = _budget(device, policy, model_cfg, memory_bytes, vram_bytes)
    settings = _settings(device, policy, model_cfg, flash_attn)
    _check_pin(model, model_cfg.pin)
    rows, plans = _plan_variants(
        model, device, policy, model_cfg, headers, budget, settings, use_mmap=use_mmap,
        efficiency=efficiency, learned=learned, rates=rates)

    fitting_variants = [v for v, plan, _ in rows if plan is not None]
    if not fitting_variants:
        raise SelectionError(_no_fit_message(model, rows, plans, budget, model_cfg.pin),
                             budget_bytes=budget.ram_bytes, vram_budget_bytes=budget.vram_bytes)
    best = max(fitting_variants, key=lambda v: (v.quality, -v.size))
    chosen_plan = plans[best.file][0]
    n_batch = settings.n_batch
    return Selection(
        model_id=model.id, quant=best.quant, file=best.file, size=best.size, sha256=best.sha256,
        urls=list(best.urls), quality=best.quality, n_ctx=chosen_plan.n_ctx, n_batch=n_batch,
        n_ubatch=min(n_batch, MAX_UBATCH), kv_type=chosen_plan.kv_type,
        n_gpu_layers=chosen_plan.n_gpu_layers, n_threads=settings.n_threads,
        flash_attn=settings.flash_attn or chosen_plan.kv_type != "f16", use_mmap=use_mmap,
        use_mlock=use_mlock, estimate=chosen_plan.estimate,
        predicted_tokens_per_s=chosen_plan.tokens_per_s, budget_bytes=budget.ram_bytes,
        vram_budget_bytes=budget.vram_bytes, profile=profile.name,
        candidates=_candidates(rows, plans, best, budget, device, settings.kv_pref),
        manifest_url=manifest.source,
        **_chat_template(model_cfg, model, best, headers[best.file]),
        parts=[SelectionPart(file=p.file, size=p.size, sha256=p.sha256, urls=list(p.urls))
               for p in best.parts],
    )


def _chat_template(model_cfg: ModelConfig, model: ModelEntry, variant: Variant,
                   info: GGUFInfo) -> dict[str, str | None]:
    """The Selection's chat_format and chat_template: the config's over the variant's over
    the model's over the GGUF's own tokenizer.chat_template."""
    if model_cfg.chat_format is not None:
        return {"chat_format": model_cfg.chat_format,
                "chat_template": f"config:{Path(model_cfg.chat_format).name}"}
    named = variant.chat_format or model.chat_format
    if named is not None:
        return {"chat_format": named, "chat_template": f"manifest:{named}"}
    # A template too long to keep is still there (a StringInfo); an empty one is none.
    own = info.metadata.get("tokenizer.chat_template")
    return {"chat_format": None, "chat_template": "gguf" if own else "none"}


def _chosen_reason(best: Variant, plan: _Plan, budget: Budget, device: DeviceInfo) -> str:
    parts = [f"highest quality that fits: needs {format_bytes(plan.ram_needed)}, "
             f"budget {format_bytes(budget.ram_bytes)}"]
    if plan.vram_needed:
        parts.append(f"{format_bytes(plan.vram_needed)} VRAM of {format_bytes(budget.vram_bytes)}")
    if plan.estimate.learned_ram_bytes is not None:
        parts.append(f"learned figure (raw estimate {format_bytes(plan.estimate.ram_bytes)})")
    if plan.tokens_per_s is None:
        parts.append("speed not checked: no measured bandwidth")
    return "; ".join(parts)


def _no_fit_message(model: ModelEntry, rows: list, plans: dict, budget: Budget, pin: str | None) -> str:
    tried = [plans[v.file][0] for v, _, _ in rows if v.file in plans]
    budget_text = (f"budget {format_bytes(budget.ram_bytes)} "
                   f"({format_bytes(budget.raw_ram_bytes)} - {format_bytes(budget.headroom_bytes)} headroom)")
    if budget.vram_bytes:
        budget_text += f" + {format_bytes(budget.vram_bytes)} VRAM"
    if not tried:
        reasons = "; ".join(f"{v.quant}: {reason}" for v, _, reason in rows)
        return f"no variant of {model.id} can run on this device ({reasons})"
    smallest_variant, smallest = min(
        ((v, plans[v.file][0]) for v, _, _ in rows if v.file in plans), key=lambda item: item[1].ram_needed)
    what = f"pinned variant {pin}" if pin else f"no variant of {model.id} fits"
    return (f"{what}: the smallest need is {smallest_variant.quant} at n_ctx {smallest.n_ctx} "
            f"({smallest.kv_type} KV) with {format_bytes(smallest.ram_needed)}, {budget_text}; "
            f"{plans[smallest_variant.file][1]}")


def _header_sources(
    manifest: Manifest, variant: Variant | Part, store_dir: Path | None
) -> list[str]:
    """Where to read a variant's (or a split part's) header from, cheapest first: the model
    store, next to the manifest, then its mirrors (HTTP Range)."""
    sources = []
    if store_dir is not None:
        sources.append(str(store_dir / variant.file))
    if manifest.source is not None:
        sources.append(location_next_to(manifest.source, variant.file))
    sources.extend(variant.urls)
    return sources


def _read_split_header(manifest: Manifest, variant: Variant, store_dir: Path | None) -> GGUFInfo:
    """A split variant's header from all its parts (each holds some of the tensors)."""
    return read_gguf_split([
        [s for s in _header_sources(manifest, part, store_dir) if "://" in s or os.path.exists(s)]
        for part in variant.parts
    ])


def read_headers(manifest: Manifest, model: ModelEntry, store_dir: Path | None = None) -> dict[str, GGUFInfo]:
    """GGUF headers of every variant that can be read; failures are logged and left out.

    When not one header could be read, the first failure is raised (``gguf_invalid`` for a
    hostile or broken header, ``fetch_failed`` for a mirror that cannot be reached): that, not
    ``no_fit``, is what the device must report."""
    headers: dict[str, GGUFInfo] = {}
    failures: list[EdgeAgentError] = []
    for variant in model.variants:
        if variant.parts:
            try:
                headers[variant.file] = _read_split_header(manifest, variant, store_dir)
            except EdgeAgentError as exc:
                failures.append(exc)
                log.warning("gguf_header_unreadable", file=variant.file, error=exc.message)
            continue
        for source in _header_sources(manifest, variant, store_dir):
            if "://" not in source and not os.path.exists(source):
                continue
            try:
                headers[variant.file] = read_gguf_header(source)
                break
            except EdgeAgentError as exc:
                failures.append(exc)
                log.warning("gguf_header_unreadable", file=variant.file, source=source, error=exc.message)
    if not headers and failures:
        raise failures[0]
    return headers


def plan_selection(
    config: AgentConfig,
    *,
    device: DeviceInfo | None = None,
    manifest_source: str | None = None,
    memory_bytes: int | None = None,
    vram_bytes: int | None = None,
    profile: str | None = None,
    state_dir: str | None = None,
) -> Selection:
    """Probe (unless ``device`` is given), match the profile, load the manifest, read the
    GGUF headers and learned corrections, then choose. ``memory_bytes``/``vram_bytes``
    replace the probed budget ("what would a 2 GiB device get")."""
    source = manifest_source or config.model.manifest
    if not source:
        raise ConfigError("model.manifest: no manifest given (config or --manifest)")
    if device is None:
        from agent.hardware.probe import probe

        device = probe(model_dir=config.cache_dir)
    matched, reasons = match_profile(device, load_profiles(), profile or config.model.profile)
    log.debug("profile_matched", profile=matched.name, reasons=reasons)
    manifest = load_manifest(source, config.signing)
    model = manifest.model(config.model.model_id)
    headers = read_headers(manifest, model, Path(config.cache_dir))

    learned = rates = None
    if state_dir or config.state_dir:
        memory = LearnedMemory(Path(state_dir or config.state_dir))
        rates = LearnedSpeed(Path(state_dir or config.state_dir)).rates(
            config.device_id, llama_build_key())

        def learned(sha256: str, key: str) -> int | None:
            return memory.lookup(config.device_id, sha256, key)

    selection = choose(
        device, matched, manifest, config.model, headers, learned, rates=rates,
        memory_bytes=memory_bytes, vram_bytes=vram_bytes, flash_attn=config.runtime.flash_attn,
        use_mmap=config.runtime.use_mmap, use_mlock=config.runtime.use_mlock,
    )
    # Here, not in choose(): a controller planning a rollout runs choose() once per device.
    estimate = selection.estimate
    log.info("selected", model=selection.model_id, quant=selection.quant, n_ctx=selection.n_ctx,
             kv_type=selection.kv_type, n_gpu_layers=selection.n_gpu_layers,
             ram_bytes=estimate.learned_ram_bytes or estimate.ram_bytes,
             budget_bytes=selection.budget_bytes)
    return selection
