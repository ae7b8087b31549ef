"""The quickstart's orchestration (run through scripts/quickstart, which does setup first).

Starts, in order: a broker (Mosquitto when installed, else edge-agent's embedded broker so
nothing needs root; ``--broker embedded`` forces the latter), the fleet controller hosting
the demo ladder, one agent whose manifest is the controller's, pinned to the controller's
signing key as an install would; waits for the agent to come up ready, sends a prompt
through the controller and prints the streamed answer, the dashboard URL and its login; then
runs until Ctrl-C and stops everything in reverse order. All it writes is one run directory
under the cache, removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from agent.fleet.auth import hash_secret

DEVICE_ID = "quickstart-device"
QUESTION = "In one sentence, why run a language model on the device itself?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(message: str) -> None:
    print(f"quickstart: {message}", flush=True)


class Services:
    """The child processes, stopped in reverse start order."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "wb")
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)  # Ctrl-C reaches us only; we stop them in order
        self.children.append((name, child))
        return child

    def check_alive(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited with {child.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.run_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for name, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        self.children.clear()


def wait_for(what: str, check, services: Services, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        services.check_alive()
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def start_broker(services: Services, run_dir: Path, port: int, choice: str) -> str:
    """``choice``: auto (Mosquitto when installed), mosquitto, or embedded."""
    mosquitto = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if choice == "mosquitto" and not mosquitto:
        raise RuntimeError("--broker mosquitto: mosquitto is not installed "
                           "(apt-get install mosquitto)")
    if mosquitto and choice != "embedded":
        conf = run_dir / "mosquitto.conf"
        # set_tcp_nodelay: streamed chunks are small packets; Nagle would hold each up to 40 ms.
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
        services.start("broker", [mosquitto, "-c", str(conf)])
        kind = "mosquitto"
    else:
        services.start("broker", [sys.executable, "-m", "agent.broker", "--port", str(port)])
        kind = "embedded broker" + (" (mosquitto not installed)" if choice == "auto" else "")
    wait_for("the broker", lambda: port_open(port), services, 15)
    return kind


def link_ladder(ladder: Path, hosted: Path) -> None:
    """Expose the ladder to the controller without copying hundreds of MB."""
    hosted.mkdir()
    for source in [ladder / "manifest.json", *sorted(ladder.glob("*.gguf"))]:
        if source.name.startswith("source."):
            continue
        try:
            os.link(source, hosted / source.name)
        except OSError:
            shutil.copy2(source, hosted / source.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ladder", type=Path, default=Path(os.environ.get(
        "EDGE_AGENT_LADDER", Path(os.environ.get("EDGE_AGENT_CACHE", Path.home() / ".cache/edge-agent")) / "ladder")))
    parser.add_argument("--http-port", type=int, default=8080, help="dashboard port (0: any free port)")
    parser.add_argument("--prompt", default=QUESTION)
    # The embedded broker is what a newcomer without root gets; this runs that path anywhere.
    parser.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                        help="auto: Mosquitto when installed, else the embedded broker")
    parser.add_argument("--exit-after-prompt", action="store_true",
                        help="stop everything after the first answer (for scripts and tests)")
    args = parser.parse_args()

    cache_root = args.ladder.parent
    run_dir = Path(tempfile.mkdtemp(prefix="quickstart-run-", dir=cache_root))
    services = Services(run_dir)
    stop_requested = False

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    try:
        broker_port = free_port()
        http_port = args.http_port if args.http_port and not port_open(args.http_port) else free_port()
        password = secrets.token_urlsafe(9)
        token = secrets.token_urlsafe(24)
        hosted = run_dir / "hosted"
        link_ladder(args.ladder, hosted)

        kind = start_broker(services, run_dir, broker_port, args.broker)
        say(f"broker: {kind} on 127.0.0.1:{broker_port}")

        fleet_config = run_dir / "fleet.yaml"
        fleet_config.write_text(json.dumps({
            "mqtt": {"host": "127.0.0.1", "port": broker_port},
            "http_port": http_port,
            "db_path": str(run_dir / "fleet.db"),
            "model_dir": str(hosted),
            "auth": {
                "admin_password_hash": hash_secret(password),
                # Tokens are random, so a plain SHA-256 is enough and a wrong one costs nothing.
                "api_token_hashes": [hash_secret(token, method="sha256")],
            },
        }))
        edge_agent = str(Path(sys.executable).with_name("edge-agent"))
        services.start("controller", [edge_agent, "fleet", "serve", "--config", str(fleet_config)])
        base = f"http://127.0.0.1:{http_port}"
        wait_for("the controller", lambda: port_open(http_port), services, 30)
        say(f"fleet controller: {base} (hosting {len(list(hosted.glob('*.gguf')))} demo variants)")
        # The key the controller made on first start: the agent refuses what it did not sign.
        signing = httpx.get(f"{base}/api/signing-key", timeout=10).json()
        say(f"manifests signed by the controller's key {signing['key_id']}")

        agent_config = run_dir / "agent.yaml"
        agent_config.write_text(json.dumps({
            "device_id": DEVICE_ID,
            "state_dir": str(run_dir / "agent-state"),
            "cache_dir": str(run_dir / "agent-models"),
            "mqtt": {"host": "127.0.0.1", "port": broker_port},
            "model": {"manifest": f"{base}/files/manifest.json"},
            "signing": {"public_key": signing["public_key"]},
            "telemetry": {"interval_s": 2},
        }))
        services.start("agent", [edge_agent, "run", "--config", str(agent_config)])
        say("agent: probing, selecting, fetching from the controller, loading …")
        headers = {"Authorization": f"Bearer {token}"}

        def device_ready():
            response = httpx.get(f"{base}/api/devices/{DEVICE_ID}", headers=headers, timeout=5)
            if response.status_code != 200:
                return None
            detail = response.json()
            return detail if detail.get("status", {}).get("state") == "ready" else None

        detail = wait_for("the agent to be ready", device_ready, services, 300)
        selection = (detail.get("meta") or {}).get("selection") or {}
        say(f"agent ready: {selection.get('model_id', '?')} {selection.get('quant', '?')} "
            f"(n_ctx {selection.get('n_ctx', '?')}, {selection.get('n_threads', '?')} threads)")
        pinned = (detail.get("meta") or {}).get("signing") or {}
        say(f"agent requires signed manifests: {pinned.get('required')}, "
            f"key {pinned.get('key_id')}")

        say(f"prompt: {args.prompt}")
        env = {**os.environ, "EDGE_AGENT_FLEET_URL": base, "EDGE_AGENT_FLEET_TOKEN": token}
        answered = subprocess.run([edge_agent, "fleet", "prompt", DEVICE_ID, args.prompt,
                                   "--temperature", "0.2", "--max-tokens", "96"], env=env)
        if answered.returncode != 0:
            raise RuntimeError("the prompt was not answered")

        print()
        say(f"dashboard: {base}/   login password: {password}")
        say(f"API token for `edge-agent fleet ...`: EDGE_AGENT_FLEET_URL={base} EDGE_AGENT_FLEET_TOKEN={token}")
        if args.exit_after_prompt:
            return 0
        say("running; press Ctrl-C to stop everything")
        while not stop_requested:
            services.check_alive()
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        say(f"failed: {exc}")
        for name in ("agent", "controller", "broker"):
            if tail := services.tail(name, 15):
                print(f"--- {name}.log (last lines) ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        say("stopping agent, controller and broker")
        services.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
