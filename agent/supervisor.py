"""The ModelSupervisor: which model this device runs, and every change to it, on one thread.

It owns the model state: the probe (DeviceInfo), the matched profile's reasons, where the
Selection came from (planned, or the cached last good one), why the daemon is degraded, the
command overrides (``pin``, ``manifest``) and the last good Selection in ``state_dir``. All of
it is written on its ``model`` thread only; other threads read ``status``, one immutable
snapshot replaced whole.

The ``model`` thread takes messages (callables) from one queue, one at a time: the bring-up
(probe → profile → plan → fetch → load), the slow command ops (reload, select, fetch, pin,
set_manifest, bench, and any op the table sends here), SIGHUP's reload, and a failed crash
restart's request for a smaller variant (the engine's ``restart_failed`` event with
``smaller_wanted``: a message, never a callback run on an engine thread). ``Engine.load`` and
its ``smaller`` callback therefore run here too.

A failed model does not stop the daemon: it reports ``degraded`` with the reason in
``problem`` and keeps taking ``set_manifest``/``pin``/``reload`` so the fleet can repair it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec

from agent.catalog.manifest import is_url
from agent.catalog.profiles import load_profiles, match_profile
from agent.catalog.select import plan_selection
from agent.catalog.selection import Selection
from agent.config import AgentConfig, ModelConfig
from agent.daemon_state import DaemonState
from agent.errors import BusyError, EdgeAgentError, RequestError
from agent.fetch.store import ModelStore
from agent.hardware.device import DeviceInfo
from agent.hardware.probe import probe
from agent.heap import release_freed_memory
from agent.log import get_logger
from agent.mqtt import payloads
from agent.runtime.engine import Engine
from agent.runtime.request import ChatMessage, GenerateRequest

log = get_logger(__name__)

Work = Callable[[], None]
# Commands that may wait for the model thread at once; one more is answered ``busy``. Each is
# a model change, fetch or bench of its own: more in a row is a flood, not a plan.
MAX_COMMANDS_WAITING = 32


@dataclass(frozen=True)
class ModelStatus:
    """What the rest of the daemon may know about the model state, as of one moment."""

    device: DeviceInfo | None = None
    profile_reasons: tuple[str, ...] = ()
    selection_source: str = "none"  # planned | cached | none
    problem: str | None = None  # why the daemon is degraded


class ModelSupervisor:
    def __init__(self, config: AgentConfig, *, engine: Engine, state: DaemonState,
                 publish_event: Callable[..., None], on_model_changed: Callable[[], None],
                 progress: Callable[[str], None]) -> None:
        self.config = config
        self.engine = engine
        self.state = state
        self.store = ModelStore(Path(config.cache_dir),
                                budget_bytes=config.fetch.store_budget_bytes, fetch=config.fetch)
        self.publish_event = publish_event
        self.on_model_changed = on_model_changed  # after a switch: status and meta again
        self.progress = progress  # systemd STATUS= lines during the bring-up
        self.status = ModelStatus()
        self.brought_up = threading.Event()
        self._loaded: Selection | None = None  # what this thread last loaded
        # SimpleQueue: its put is reentrant, so a signal handler may post (SIGHUP's reload).
        self._inbox: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._commands_waiting = 0  # under _commands_lock: posted by post_command, not yet run
        self._commands_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the ``model`` thread; its first message is the bring-up."""
        self._thread.start()
        self.post(self._bring_up)

    def post(self, work: Work) -> None:
        """Run ``work`` on the ``model`` thread after what is queued; never blocks, and is safe
        in a signal handler."""
        self._inbox.put(work)

    def post_command(self, work: Work) -> None:
        """``post`` for a peer's command: BusyError once MAX_COMMANDS_WAITING wait already, so
        a flood of commands neither grows the queue without end nor pushes the ids of
        requests still in flight out of the ledger."""
        with self._commands_lock:
            if self._commands_waiting >= MAX_COMMANDS_WAITING:
                raise BusyError(f"{MAX_COMMANDS_WAITING} commands already wait for the model "
                                "thread; send it again later")
            self._commands_waiting += 1

        def run() -> None:
            with self._commands_lock:
                self._commands_waiting -= 1
            work()

        self._inbox.put(run)

    def stop(self, timeout_s: float) -> None:
        self._inbox.put(None)
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while (work := self._inbox.get()) is not None:
            try:
                work()
            except Exception:  # one failed message must never stop the model thread
                log.exception("model_work_failed")
            release_freed_memory()  # what the work parsed is garbage now; the daemon idles

    def _update(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)  # one reference swap: readers see old or new

    # -- bring-up and loading -------------------------------------------------------------

    def _bring_up(self) -> None:
        """Probe → profile → plan → fetch → load. A failure leaves the daemon degraded."""
        try:
            self._update(device=probe(model_dir=self.config.cache_dir))
            self.progress("selecting a model")
            selection = self._plan_or_last_good()
            self.progress(f"fetching {selection.file}")
            selection = self._fetched(selection)
            self.progress(f"loading {selection.quant} (canary)")
            loaded = self._load(selection)
        except EdgeAgentError as exc:
            self._update(problem=f"{exc.code}: {exc.message}")
            log.error("model_unavailable", code=exc.code, error=exc.message)
            self.publish_event("model_unavailable", error=exc.to_dict())
            return
        finally:
            self.brought_up.set()
        self.publish_event("model_loaded", model_id=loaded.model_id, quant=loaded.quant,
                           source=self.status.selection_source)

    def _load(self, selection: Selection) -> Selection:
        """Load (or swap to) ``selection``; remember what loaded as the last good one."""
        self.engine.load(selection, smaller=self._smaller)
        loaded = self.engine.selection or selection
        self._loaded = loaded
        self.state.save_selection(loaded)
        self._update(problem=None)
        return loaded

    def on_engine_event(self, event: dict[str, Any]) -> None:
        """Any thread: a crash restart that failed down the whole ladder asks for a smaller
        variant; that becomes a message to the ``model`` thread."""
        if event.get("event") == "restart_failed" and event.get("smaller_wanted"):
            self.post(self._load_smaller_after_crash)

    def _load_smaller_after_crash(self) -> None:
        crashed = self._loaded
        if crashed is None or self.engine.selection is not None:
            return  # the engine's own retry got it back meanwhile, or nothing was loaded
        smaller = self._smaller(crashed)
        if smaller is None:
            log.warning("no_smaller_variant", quant=crashed.quant)
            return
        before = crashed.quant
        try:
            self._load(smaller)
        except EdgeAgentError as exc:
            self._update(problem=f"{exc.code}: {exc.message}")
            return
        self.publish_event("model_switch", before=before, after=self.model_name())
        self.on_model_changed()

    # -- planning -------------------------------------------------------------------------

    def _effective_config(self, pin: str | None = None) -> AgentConfig:
        overrides = self.state.overrides()
        model = self.config.model
        model = msgspec.structs.replace(
            model,
            pin=pin if pin is not None else overrides.get("pin", model.pin),
            manifest=overrides.get("manifest") or model.manifest,
        )
        return msgspec.structs.replace(self.config, model=model)

    def _plan(self, *, pin: str | None = None, profile: str | None = None) -> Selection:
        config = self._effective_config(pin)
        device = self.status.device
        if device is None:
            device = probe(model_dir=config.cache_dir)
            self._update(device=device)
        forced = profile or config.model.profile
        matched, reasons = match_profile(device, load_profiles(), forced=forced)
        self._update(profile_reasons=tuple(reasons))
        return plan_selection(config, device=device, manifest_source=config.model.manifest,
                              profile=matched.name, state_dir=config.state_dir)

    def _plan_or_last_good(self) -> Selection:
        try:
            selection = self._plan()
        except EdgeAgentError as exc:
            last = self.state.last_good_selection()
            if last is None:
                raise
            log.warning("planning_failed_using_last_good", code=exc.code, error=exc.message,
                        quant=last.quant)
            self.publish_event("selection_fallback", error=exc.to_dict(), quant=last.quant)
            self._update(selection_source="cached")
            return last
        self._update(selection_source="planned")
        return selection

    def _fetched(self, selection: Selection) -> Selection:
        path = self.store.ensure(selection, on_progress=self._publish_download)
        return msgspec.structs.replace(selection, model_path=str(path))

    def _smaller(self, selection: Selection) -> Selection | None:
        """The next smaller variant that fits, fetched; the last rung of a cold load's ladder."""
        smaller = sorted((c for c in selection.candidates
                          if c.verdict != "rejected" and c.size < selection.size),
                         key=lambda c: c.size, reverse=True)
        for candidate in smaller:
            try:
                return self._fetched(self._plan(pin=candidate.quant))
            except EdgeAgentError as exc:
                log.warning("smaller_variant_unavailable", quant=candidate.quant, code=exc.code)
        return None

    def _publish_download(self, progress: dict[str, Any]) -> None:
        self.publish_event("download", **{k: v for k, v in progress.items() if k != "event"})

    # -- slow command ops (the ``model`` thread) ------------------------------------------

    def select(self, args: payloads.SelectArgs) -> dict[str, Any]:
        return msgspec.to_builtins(self._plan(pin=args.pin, profile=args.profile))

    def fetch(self, args: payloads.NoArgs) -> dict[str, Any]:
        selection = self._fetched(self._plan())
        return {"quant": selection.quant, "file": selection.file, "path": selection.model_path}

    def reload(self, args: payloads.NoArgs) -> dict[str, Any]:
        return self._reload(strict=False)

    def pin(self, args: payloads.PinArgs) -> dict[str, Any]:
        return {"pin": args.quant, **self._with_override("pin", args.quant)}

    def set_manifest(self, args: payloads.SetManifestArgs) -> dict[str, Any]:
        source = commanded_manifest(self.config.model, args.source)
        return {"manifest": source, **self._with_override("manifest", source)}

    def bench(self, args: payloads.BenchArgs) -> dict[str, Any]:
        request = GenerateRequest(id=f"bench-{time.monotonic_ns()}",
                                  messages=[ChatMessage(role="user", content=args.prompt)],
                                  max_tokens=args.max_tokens, temperature=0.0, seed=0, stream=False)
        final: dict[str, Any] = {}
        for record in self.engine.generate(request):
            final = record
        if final.get("error"):
            raise EdgeAgentError(final["error"]["message"])
        return {"model": self.model_name(), "usage": final.get("usage"),
                "timings": final.get("timings")}

    def model_name(self) -> str:
        selection = self.engine.selection
        return f"{selection.model_id} {selection.quant}" if selection else "none"

    def _with_override(self, key: str, value: str) -> dict[str, Any]:
        """Set the override and reload strictly; an override that cannot load must not stick."""
        overrides = self.state.overrides()
        self.state.set_override(key, value)
        try:
            outcome = self._reload(strict=True)
        except EdgeAgentError:
            if key in overrides:
                self.state.set_override(key, overrides[key])
            else:  # none was set: the config file's value holds again, not None
                self.state.clear_override(key)
            raise
        if not outcome["changed"]:
            self.on_model_changed()  # the same model, but meta's pin or manifest is new
        return outcome

    def _reload(self, *, strict: bool) -> dict[str, Any]:
        """Plan, fetch, swap when the choice changed. ``strict``: a planning failure is the
        answer (pin, set_manifest asked for exactly this), not a reason to keep the last good."""
        selection = self._fetched(self._plan() if strict else self._plan_or_last_good())
        current = self.engine.selection
        if current is not None and _same_model(current, selection):
            return {"changed": False, "quant": current.quant}
        before = self.model_name()
        loaded = self._load(selection)  # swaps when a model is loaded
        self.publish_event("model_switch", before=before, after=self.model_name())
        self.on_model_changed()
        return {"changed": True, "quant": loaded.quant, "model_id": loaded.model_id}


def _same_model(current: Selection, wanted: Selection) -> bool:
    """The same file with the same context and placement: a reload has nothing to do."""
    return (current.sha256 == wanted.sha256 and current.n_ctx == wanted.n_ctx
            and current.kv_type == wanted.kv_type and current.n_gpu_layers == wanted.n_gpu_layers)


def commanded_manifest(model: ModelConfig, source: str) -> str:
    """Where a ``set_manifest`` may point: an http(s) URL, the configured manifest, or a
    file under ``model.manifest_dir`` (symlinks and ``..`` resolved first). Checked before
    anything is opened, so a command cannot make the daemon read (and quote back in an
    error) a file such as /etc/shadow. Returns the source to load."""
    if is_url(source):
        return source
    if urlparse(source).scheme:
        raise RequestError("args.source: only http(s) URLs or local paths", field="args.source")
    try:
        candidate = Path(model.manifest_dir or "/", source).resolve()
        local = model.manifest and not is_url(model.manifest)
        configured = Path(model.manifest).resolve() if local else None
    except (ValueError, OSError):  # a NUL byte, a symlink loop
        raise RequestError("args.source: not a usable path", field="args.source") from None
    if candidate == configured:
        return str(candidate)  # going back to the admin's own choice (a rollback) is fine
    if model.manifest_dir is None:
        raise RequestError("args.source: an http(s) URL (local manifests need "
                           "model.manifest_dir in the device config)", field="args.source")
    root = Path(model.manifest_dir).resolve()
    if not candidate.is_relative_to(root):
        raise RequestError("args.source: a local manifest must lie under "
                           f"model.manifest_dir ({root})", field="args.source")
    return str(candidate)
