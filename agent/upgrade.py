"""Agent self-upgrade: install a new edge-agent version beside the running one, switch to it,
and come back to the previous one by itself when the new one does not reach ``ready``.

The layout (scripts/install.sh makes the directory and gives it to the agent's user; the
unit's ``ReadWritePaths=`` is the only place under /opt the sandboxed daemon may write)::

    <releases>/installed  -> /opt/edge-agent/venv   root's venv, what install.sh built
    <releases>/current    -> the venv systemd starts (ExecStart=<releases>/current/bin/edge-agent)
    <releases>/previous   -> the venv current pointed at before the last switch
    <releases>/<version>/    a venv per version this agent installed
    <releases>/trial.json    while current is a new version that has not yet proven itself
    <releases>/outcome.json  what the last upgrade came to, until a daemon has reported it

One upgrade, end to end:

1. ``AgentUpgrades.upgrade`` (the ``upgrade`` op, on the daemon's ops thread) checks, where
   signatures are required (a pinned controller key, as for manifests), that the controller's
   signed wheel index lists this very wheel (path, sha256, size), downloads the wheel with
   the Downloader (size and sha256 checked while streaming), checks that its
   METADATA names edge-agent at the commanded version, copies the current venv to
   ``<version>/`` and pip-installs the wheel there with ``--no-index`` (the dependencies must
   already be there: a device needs no package index), runs its ``--version``, writes the
   trial, and switches ``previous`` and ``current`` (each a symlink renamed over the old one).
   The daemon then exits with EXIT_RESTART_FOR_UPGRADE, which the unit restarts at once
   (``RestartForceExitStatus=``) without counting it as a failure (``SuccessExitStatus=``).
2. ``guard`` runs before every start (``ExecStartPre=``, from root's venv, so a broken new
   version cannot break its own rollback). The trial gives the new version one start: on the
   next start while the trial is still open, or after its deadline, ``current`` goes back to
   ``previous`` and the outcome says ``rolled_back``.
3. The new version's ``AgentUpgrades.watch`` thread closes the trial once the daemon is
   healthy (MQTT connected and a model loaded, where the old version had one) and prunes
   versions nothing points at; past the deadline it asks the daemon to exit with
   EXIT_TRIAL_FAILED, and the guard of the next start rolls back.
4. Whichever version runs next reports the outcome as an event: ``agent_upgraded`` or
   ``agent_rolled_back`` (the old version sends ``agent_upgrade_refused`` or
   ``agent_upgrade_restarting`` before that). A rollout of kind ``upgrade`` fails a device on
   ``agent_rolled_back``.

This module must not talk MQTT (it gets ``publish_event``) or decide when the daemon stops
(it asks through ``request_exit``). Nothing here needs root: the agent's user owns releases.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent import __version__
from agent.atomic_file import atomic_write
from agent.config import FetchConfig, SigningConfig, UpgradeConfig
from agent.errors import BusyError, EdgeAgentError, SignatureError, UpgradeError
from agent.fetch.downloader import Downloader
from agent.fetch.wheels import WHEELS_PATH, read_index
from agent.log import get_logger
from agent.mqtt.payloads import UpgradeArgs

log = get_logger(__name__)

# The daemon's exit status after switching to a new version: the unit restarts on it
# (RestartForceExitStatus=75) and does not count it as a failure (SuccessExitStatus=75).
EXIT_RESTART_FOR_UPGRADE = 75
# A new version that was not healthy by its deadline: a failure, so Restart=on-failure
# restarts the unit and the guard rolls back.
EXIT_TRIAL_FAILED = 76
# pip and the new version's --version run as child processes with these limits.
PIP_TIMEOUT_S = 600.0
SMOKE_TIMEOUT_S = 60.0
# How often the watch thread looks at the daemon's health while a trial is open.
WATCH_INTERVAL_S = 1.0
# A wheel's METADATA is a few KiB; more is not a wheel we made.
MAX_METADATA_BYTES = 1 << 20

Outcome = Literal["agent_upgraded", "agent_rolled_back"]  # the event that reports it


class Trial(msgspec.Struct, kw_only=True):
    """A switch to ``version`` that has not yet reached ready."""

    version: str
    previous_version: str
    deadline: float  # epoch seconds
    starts: int = 0  # counted by the guard
    needs_model: bool = True  # the old version had a model loaded, so the new one must too


class UpgradeOutcome(msgspec.Struct, kw_only=True):
    event: Outcome
    version: str  # the version that was tried
    previous_version: str
    reason: str | None = None


class Releases:
    """The releases directory: symlinks, the trial and the outcome. Every change is a rename,
    so a power cut leaves either the old state or the new one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def installed(self) -> Path:
        return self.root / "installed"

    def version_dir(self, version: str) -> Path:
        return self.root / version

    def target(self, link: Path) -> Path | None:
        """Where a symlink points (resolved), or None when it is missing or dangling."""
        try:
            resolved = link.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, dangling, a loop (RuntimeError before 3.13)
            return None
        return resolved if link.is_symlink() else None

    def point(self, link: Path, target: Path) -> None:
        """Make ``link`` point at ``target``: a new symlink renamed over the old one."""
        staged = link.with_name(f".{link.name}.new")
        staged.unlink(missing_ok=True)
        relative = target.parent == self.root
        staged.symlink_to(target.name if relative else target)
        os.replace(staged, link)

    def read_trial(self) -> Trial | None:
        return self._read(self.root / "trial.json", Trial)

    def write_trial(self, trial: Trial) -> None:
        atomic_write(self.root / "trial.json", msgspec.json.encode(trial))

    def end_trial(self) -> None:
        (self.root / "trial.json").unlink(missing_ok=True)

    def read_outcome(self) -> UpgradeOutcome | None:
        return self._read(self.root / "outcome.json", UpgradeOutcome)

    def write_outcome(self, outcome: UpgradeOutcome) -> None:
        atomic_write(self.root / "outcome.json", msgspec.json.encode(outcome))

    def clear_outcome(self) -> None:
        (self.root / "outcome.json").unlink(missing_ok=True)

    def rollback_target(self) -> Path | None:
        return self.target(self.previous) or self.target(self.installed)

    def prune(self) -> list[str]:
        """Remove version venvs that neither current nor previous points at; their names."""
        keep = {self.target(self.current), self.target(self.previous)}
        removed = []
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".") \
                    and entry.resolve() not in keep:
                shutil.rmtree(entry)
                removed.append(entry.name)
        return removed

    @staticmethod
    def _read(path: Path, kind: type[Any]) -> Any:
        try:
            return msgspec.json.decode(path.read_bytes(), type=kind)
        except FileNotFoundError:
            return None
        except msgspec.DecodeError:
            # A file this module did not write (or an older format): not a trial to act on.
            log.warning("releases_file_unreadable", path=str(path))
            return None


def guard(root: Path, *, now: float | None = None) -> str:
    """Before each start (ExecStartPre): give a new version one start, then roll back.

    Returns what it did: ``none`` (no trial), ``stale`` (current is not the trial's version
    any more: an admin reinstalled; the trial is dropped), ``trying`` or ``rolled_back``."""
    releases = Releases(root)
    trial = releases.read_trial()
    if trial is None:
        return "none"
    if releases.target(releases.current) != releases.version_dir(trial.version).resolve():
        releases.end_trial()
        return "stale"
    now = time.time() if now is None else now
    if trial.starts == 0 and now <= trial.deadline:
        releases.write_trial(msgspec.structs.replace(trial, starts=1))
        return "trying"
    back = releases.rollback_target()
    if back is None:
        # Nothing to go back to: keep trying the new version rather than not starting at all.
        log.error("upgrade_rollback_impossible", version=trial.version)
        releases.end_trial()
        return "none"
    reason = ("it did not reach ready within its deadline" if now > trial.deadline
              else "it stopped before it reached ready")
    releases.write_outcome(UpgradeOutcome(event="agent_rolled_back", version=trial.version,
                                          previous_version=trial.previous_version, reason=reason))
    releases.point(releases.current, back)
    releases.end_trial()
    log.warning("upgrade_rolled_back", version=trial.version, back_to=trial.previous_version,
                reason=reason)
    return "rolled_back"


def check_wheel(path: Path, version: str) -> None:
    """The wheel at ``path`` is edge-agent at ``version`` (its METADATA says so)."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist()
                     if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                raise UpgradeError(f"{path.name}: not a wheel (no single .dist-info/METADATA)")
            info = wheel.getinfo(names[0])
            if info.file_size > MAX_METADATA_BYTES:
                raise UpgradeError(f"{path.name}: METADATA is {info.file_size} bytes")
            metadata = HeaderParser().parsestr(wheel.read(info).decode("utf-8", "replace"))
    except zipfile.BadZipFile as exc:
        raise UpgradeError(f"{path.name}: not a wheel ({exc})") from exc
    name = (metadata.get("Name") or "").lower().replace("_", "-")
    if name != "edge-agent" or metadata.get("Version") != version:
        raise UpgradeError(
            f"the wheel is {metadata.get('Name')!s:.40} {metadata.get('Version')!s:.40}, "
            f"the command asked for edge-agent {version}")


class AgentUpgrades:
    """The ``upgrade`` op and the watch over a trial, for one daemon."""

    def __init__(self, config: UpgradeConfig, fetch: FetchConfig, signing: SigningConfig, *,
                 publish_event: Callable[..., None], request_exit: Callable[[int], None],
                 connected: Callable[[], bool], model_loaded: Callable[[], bool]) -> None:
        self.config = config
        self.signing = signing
        self.releases = Releases(Path(config.releases_dir)) if config.releases_dir else None
        self.downloader = Downloader(fetch)
        self.publish_event = publish_event
        self.request_exit = request_exit
        self.connected = connected
        self.model_loaded = model_loaded
        self._lock = threading.Lock()  # one upgrade at a time (a broadcast cmd and a direct one)

    # -- the op ---------------------------------------------------------------------------

    def upgrade(self, args: UpgradeArgs) -> dict[str, Any]:
        """Install ``args.version`` beside the running one and switch to it; the daemon exits
        for the restart once the result is sent. Raises UpgradeError, FetchError, BusyError."""
        releases = self._releases()
        if args.version == __version__:
            return {"changed": False, "version": __version__}
        if not self._lock.acquire(blocking=False):
            raise BusyError("an upgrade is already being installed")
        try:
            if releases.read_trial() is not None:
                raise BusyError("the last upgrade has not reached ready yet; try again after it")
            try:
                self._install(releases, args)
            except EdgeAgentError as exc:
                self.publish_event("agent_upgrade_refused", version=args.version,
                                   running=__version__, error=exc.to_dict())
                raise
        finally:
            self._lock.release()
        self.publish_event("agent_upgrade_restarting", version=args.version,
                           previous_version=__version__)
        self.request_exit(EXIT_RESTART_FOR_UPGRADE)
        return {"changed": True, "version": args.version, "previous_version": __version__,
                "restarting": True}

    def _releases(self) -> Releases:
        releases = self.releases
        if releases is None or releases.target(releases.current) is None:
            raise UpgradeError(
                "this agent cannot upgrade itself: upgrade.releases_dir is not set or has no "
                "'current' link (install with scripts/install.sh, which sets both up)")
        return releases

    def _check_signed(self, args: UpgradeArgs) -> None:
        """Where signatures are required: the wheel is one the controller's signed index lists."""
        if not self.signing.required:
            return
        base, marker, path = args.url.partition(WHEELS_PATH)
        if not marker:
            raise SignatureError(
                f"args.url: with signatures required, an upgrade comes from a controller's signed "
                f"wheelhouse (<controller>{WHEELS_PATH}…), not {args.url[:120]!r}")
        listed = read_index(base + marker, self.signing.public_key).agent_wheel(args.version)
        if listed is None or (listed.path, listed.sha256, listed.size) != (
                path, args.sha256.lower(), args.size):
            raise SignatureError(
                f"{args.version}: the controller's signed wheel index does not list this wheel "
                "(its path, sha256 and size must be the ones signed)")

    def _install(self, releases: Releases, args: UpgradeArgs) -> None:
        self._check_signed(args)
        downloads = releases.root / ".downloads"
        downloads.mkdir(exist_ok=True)
        wheel = downloads / f"edge_agent-{args.version}-py3-none-any.whl"
        log.info("upgrade_download", version=args.version, url=args.url, size=args.size)
        try:
            self.downloader.download([args.url], wheel, size=args.size, sha256=args.sha256)
            check_wheel(wheel, args.version)
            venv = self._build_venv(releases, args.version, wheel)
        finally:
            for leftover in downloads.iterdir():
                leftover.unlink()
        current = releases.target(releases.current)
        assert current is not None  # checked by _releases
        releases.write_trial(Trial(
            version=args.version, previous_version=__version__,
            deadline=time.time() + self.config.ready_timeout_s,
            needs_model=self.model_loaded()))
        releases.point(releases.previous, current)
        releases.point(releases.current, venv)
        log.info("upgrade_switched", version=args.version, previous_version=__version__)

    def _build_venv(self, releases: Releases, version: str, wheel: Path) -> Path:
        """A copy of the current venv with the wheel installed over the running version."""
        venv = releases.version_dir(version)
        source = releases.target(releases.current)
        assert source is not None
        if venv.exists():
            if venv.resolve() == source:
                raise UpgradeError(f"{version} is already the current venv")
            shutil.rmtree(venv)  # an earlier, unfinished or rolled-back attempt
        try:
            shutil.copytree(source, venv, symlinks=True)
            python = venv / "bin" / "python"
            self._child([str(python), "-m", "pip", "install", "--no-index", "--no-cache-dir",
                         "--disable-pip-version-check", "--no-input", "--quiet", str(wheel)],
                        what="pip install", timeout_s=PIP_TIMEOUT_S)
            shown = self._child([str(venv / "bin" / "edge-agent"), "--version"],
                                what="the new version's --version", timeout_s=SMOKE_TIMEOUT_S)
            if shown.split() != ["edge-agent", version]:
                raise UpgradeError(f"the installed edge-agent says {shown.strip()[:80]!r}, "
                                   f"not {version}")
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        return venv

    @staticmethod
    def _child(command: list[str], *, what: str, timeout_s: float) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpgradeError(f"{what} failed: {exc}") from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-600:]
            raise UpgradeError(f"{what} exited {done.returncode}: {tail}")
        return done.stdout

    # -- the watch thread -------------------------------------------------------------------

    def watch(self, stop_event: threading.Event) -> None:
        """Close this version's trial once healthy, or give up at its deadline; report the
        outcome of the last upgrade once MQTT is connected. Returns when nothing is left."""
        releases = self.releases
        if releases is None:
            return
        while not stop_event.is_set():
            trial = releases.read_trial()
            if trial is not None and trial.version == __version__:
                if self.connected() and (self.model_loaded() or not trial.needs_model):
                    releases.write_outcome(UpgradeOutcome(
                        event="agent_upgraded", version=__version__,
                        previous_version=trial.previous_version))
                    releases.end_trial()
                    log.info("upgrade_confirmed", version=__version__,
                             pruned=releases.prune())
                elif time.time() > trial.deadline:
                    log.error("upgrade_not_ready", version=__version__,
                              timeout_s=self.config.ready_timeout_s)
                    self.request_exit(EXIT_TRIAL_FAILED)
                    return
            elif self.connected():
                outcome = releases.read_outcome()
                if outcome is not None:
                    self.publish_event(outcome.event, version=outcome.version,
                                       previous_version=outcome.previous_version,
                                       reason=outcome.reason, running=__version__)
                    releases.clear_outcome()
                return
            stop_event.wait(WATCH_INTERVAL_S)


def show(root: Path) -> dict[str, Any]:
    """What ``edge-agent releases show`` prints: links, trial and outcome."""
    releases = Releases(root)
    return {
        "current": str(releases.target(releases.current)),
        "previous": str(releases.target(releases.previous)),
        "installed": str(releases.target(releases.installed)),
        "trial": msgspec.to_builtins(releases.read_trial()),
        "outcome": msgspec.to_builtins(releases.read_outcome()),
        "versions": sorted(e.name for e in root.iterdir()
                           if e.is_dir() and not e.is_symlink() and not e.name.startswith(".")),
    }
