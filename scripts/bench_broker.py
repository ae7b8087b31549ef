"""Broker throughput: the embedded broker vs Mosquitto, two paho clients on loopback.

Each broker runs in its own process (``python -m agent.broker`` / ``mosquitto``) so it
never competes with the clients for the GIL. One paho MQTT 5 publisher sends ``--messages``
64-byte messages to one paho subscriber, at QoS 0 and at QoS 1 (both clients allow 100
messages in flight); the rate is messages received / (last received - first sent). Runs
alternate embedded, mosquitto, embedded … so drift in the machine's load hits both alike;
the ratio is median(embedded) / median(mosquitto). QoS 0 messages a broker drops (it may,
under overload) are reported as ``lost``.

    /root/.cache/edge-agent/venv/bin/python scripts/bench_broker.py [--runs 3]
        [--messages 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support.broker is not an installed package

from tests.support.broker import Broker, free_port  # noqa: E402

HOST = "127.0.0.1"
PAYLOAD = b"x" * 64
INFLIGHT = 100


class _EmbeddedProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.broker", "--port", str(self.port),
             "--log-level", "warning"], cwd=REPO)
        _wait_listening(self.port, self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class _MosquittoProcess:
    def __init__(self, workdir: Path) -> None:
        self.broker = Broker(workdir, persistence=False).start()
        self.port = self.broker.port

    def stop(self) -> None:
        self.broker.stop()


def _wait_listening(port: int, process: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("bench_broker: the embedded broker exited at start")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench_broker: the embedded broker did not listen within 10 s")


def _client(name: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    return client


def _measure(port: int, qos: int, messages: int) -> dict:
    """One run: rate in messages/s and how many never arrived."""
    received = 0
    last_at = 0.0
    done = threading.Event()
    connected = threading.Event()
    subscribed = threading.Event()

    def on_message(client, userdata, message) -> None:
        nonlocal received, last_at
        received += 1
        last_at = time.perf_counter()
        if received == messages:
            done.set()

    subscriber = _client("bench-sub")
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.connect(HOST, port)
    subscriber.loop_start()
    subscriber.subscribe("bench/t", qos)
    publisher = _client("bench-pub")
    publisher.on_connect = lambda *args: connected.set()
    publisher.connect(HOST, port)
    publisher.loop_start()
    if not (subscribed.wait(10) and connected.wait(10)):
        raise SystemExit("bench_broker: clients did not connect")
    started = time.perf_counter()
    for _ in range(messages):
        publisher.publish("bench/t", PAYLOAD, qos=qos)
    done.wait(60)
    time.sleep(0.2)  # late stragglers still count, but the clock stops at the last one
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()
    elapsed = max(last_at - started, 1e-9)
    return {"msgs_per_s": received / elapsed, "received": received,
            "lost": messages - received}


def run(runs: int = 3, messages: int = 20000) -> dict:
    samples: dict[str, dict[int, list[dict]]] = {
        "embedded": {0: [], 1: []}, "mosquitto": {0: [], 1: []}}
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as workdir:
        for index in range(runs):
            for kind in ("embedded", "mosquitto"):
                broker = (_EmbeddedProcess() if kind == "embedded"
                          else _MosquittoProcess(Path(workdir) / f"m{index}"))
                try:
                    for qos in (0, 1):
                        samples[kind][qos].append(_measure(broker.port, qos, messages))
                finally:
                    broker.stop()
    result: dict = {"messages": messages, "payload_bytes": len(PAYLOAD), "runs": runs,
                    "inflight": INFLIGHT}
    for qos in (0, 1):
        row = {}
        for kind in ("embedded", "mosquitto"):
            rates = [sample["msgs_per_s"] for sample in samples[kind][qos]]
            row[kind] = {"msgs_per_s": round(statistics.median(rates)),
                         "lost": sum(sample["lost"] for sample in samples[kind][qos])}
        row["ratio"] = round(row["embedded"]["msgs_per_s"] / row["mosquitto"]["msgs_per_s"], 3)
        result[f"qos{qos}"] = row
    return result


def _table(result: dict) -> str:
    lines = [f"broker throughput, {result['messages']} x {result['payload_bytes']} B messages, "
             f"median of {result['runs']} runs, paho MQTT 5 pub -> sub on loopback",
             f"{'qos':>3}  {'embedded msg/s':>15}  {'mosquitto msg/s':>16}  {'ratio':>6}  "
             f"{'lost (emb/mosq)':>16}"]
    for qos in (0, 1):
        row = result[f"qos{qos}"]
        lost = f"{row['embedded']['lost']}/{row['mosquitto']['lost']}"
        lines.append(f"{qos:>3}  {row['embedded']['msgs_per_s']:>15}  "
                     f"{row['mosquitto']['msgs_per_s']:>16}  {row['ratio']:>6}  {lost:>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = run(args.runs, args.messages)
    print(_table(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
