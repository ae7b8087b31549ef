"""Simulated edge devices: protocol-correct status, meta, telemetry, events, replies; no model.

Used by ``scripts/simulate-fleet N`` (load for the dashboard and the ingest benchmark) and by
tests/fleet (devices for the controller's tests). Many device ids share a few paho
connections (``per_connection`` each): every device still publishes its own retained
``status`` and ``meta`` and its ``telemetry`` on its own topics, subscribes to its own
``prompt`` and ``cmd``, and answers with chunks + a final record and ``cmd/result``.

``lost``: an MQTT Will belongs to one connection, so a multiplexed device cannot have its
own. The first ``own_connection`` devices get a dedicated connection with a real Will
(``lost``, same session, retained); ``kill(device)`` drops that TCP connection without a
DISCONNECT and the broker publishes the Will, exactly as for a crashed agent. Multiplexed
devices publish ``stopped`` on a clean stop; after a SIGKILL of the simulator they go
silent and the controller shows them ``stale`` after 3 telemetry intervals.

Load for benchmarks (``batched_telemetry``, ``--batched``): each connection's telemetry goes
out on a second, bare MQTT 3.1.1 connection (``TelemetrySocket``) as QoS 0 PUBLISH packets
written with one ``sendall`` per pass over its due devices, with each payload from a cached
template (``SimDevice.telemetry_payload``). paho costs a call, a lock and a syscall per
message, which made the simulator, not the controller, the first thing to run out of CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

VERSION = "0.1.0-sim"
QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
BOARDS = [
    ("Raspberry Pi 5 Model B Rev 1.0", "aarch64", 4, ["neon", "dotprod"], 8, None),
    ("Raspberry Pi 4 Model B Rev 1.4", "aarch64", 4, ["neon"], 4, None),
    (
        "NVIDIA Jetson Orin Nano Developer Kit",
        "aarch64",
        6,
        ["neon", "dotprod", "i8mm"],
        8,
        ("Orin (nvgpu)", None),
    ),
    ("Intel NUC13ANHi5", "x86_64", 16, ["avx", "avx2", "fma"], 32, None),
    (
        "ThinkPad X1 Carbon Gen 11",
        "x86_64",
        12,
        ["avx", "avx2", "avx_vnni"],
        16,
        ("NVIDIA GeForce RTX 4060", 8),
    ),
]
GIB = 1024**3
WAVE_REFRESH_S = 10.0
PASS_MIN_S = 0.02  # telemetry due within this long goes out in one pass


@dataclass
class SimDevice:
    id: str
    index: int
    session: int
    pool: str | None
    quant: str
    board: tuple
    interval_s: float
    manifest: str | None = None
    pin: str | None = None
    quant_by_manifest: dict = field(default_factory=dict)  # what each manifest it ran gave it
    sha256: str = ""  # of the variant it runs (meta's selection.sha256: a rollout's health gate)
    sha256_by_quant: dict = field(default_factory=dict)  # from the manifests it was sent
    seq: int = 0
    next_due: float = 0.0
    requests_ok: int = 0
    fail_commands: bool = False
    answer_prompts: bool = True  # False: prompts go unanswered (a rollout's canary times out)
    final_reply: dict | None = None  # sent instead of a prompt's final record (a broken device)
    degraded_after_switch: bool = False  # reports degraded once a command switched its model
    state: str = "ready"
    client: Any = None  # the connection that carries it
    own: bool = False
    extra_meta: dict = field(default_factory=dict)
    telemetry_topic: str = ""
    telemetry_topic_bytes: bytes = b""
    # The encoded telemetry less seq and ts, and what it was made from: the slow-moving
    # numbers are re-encoded every WAVE_REFRESH_S, not per message (the simulator must not be
    # the bottleneck of a fleet benchmark).
    _telemetry_template: bytes = b""
    _template_key: tuple = ()

    def candidates(self) -> list[dict[str, Any]]:
        """The explain table, as a device answers it to ``select`` (meta names only variants)."""
        size = {"Q8_0": 145, "Q6_K": 138, "Q5_K_M": 112, "Q4_K_M": 105, "Q3_K_M": 93, "Q2_K": 88}
        return [
            {
                "quant": q,
                "file": f"smollm2-135m-instruct.{q}.gguf",
                "size": size[q] * 1024**2,
                "quality": round(1 - 0.01 * i, 3),
                "n_ctx": 2048,
                "kv_type": "f16",
                "n_gpu_layers": 0,
                "estimate": {"ram_bytes": (size[q] + 60) * 1024**2},
                "predicted_tokens_per_s": 40.0 + 5 * i,
                "verdict": "chosen" if q == self.quant else "fits",
                "reason": "best quality that fits"
                if q == self.quant
                else "lower quality than the chosen",
            }
            for i, q in enumerate(QUANTS)
        ]

    def meta(self) -> dict[str, Any]:
        name, arch, cores, flags, ram_gib, gpu = self.board
        gpus = []
        if gpu:
            gpus = [
                {
                    "vendor": "nvidia" if "RTX" in gpu[0] else "jetson",
                    "name": gpu[0],
                    "vram_total_bytes": gpu[1] * GIB if gpu[1] else None,
                    "unified_memory": gpu[1] is None,
                }
            ]
        return {
            "device_id": self.id,
            "version": VERSION,
            "session": self.session,
            "pool": self.pool,
            "protocol": "5",
            "runtime": {
                "version": "0.3.36",
                "gpu_offload": bool(gpus),
                "system_info": "CPU : NEON = 1 |",
            },
            "probe": {
                "cpu": {
                    "arch": arch,
                    "logical_cores": cores,
                    "physical_cores": cores,
                    "flags": flags,
                    "model": name.split(" Model")[0],
                },
                "memory": {
                    "total_bytes": ram_gib * GIB,
                    "available_bytes": ram_gib * GIB // 2,
                    "budget_bytes": ram_gib * GIB // 2,
                },
                "gpus": gpus,
                "board": name,
                "os": "Debian GNU/Linux 12 (bookworm)",
                "kernel": "6.6.31",
            },
            "selection": {
                "model_id": "smollm2-135m-instruct",
                "quant": self.quant,
                "file": f"smollm2-135m-instruct.{self.quant}.gguf",
                "n_ctx": 2048,
                "kv_type": "f16",
                "n_gpu_layers": 0,
                "n_threads": min(cores, 4),
                "manifest_url": self.manifest,
                "sha256": self.sha256 or None,  # none before a fleet assigns its variant
                "variants": list(QUANTS),
            },
            **self.extra_meta,
        }

    def telemetry(self, now: float) -> dict[str, Any]:
        self.seq += 1
        return {"seq": self.seq, "ts": round(now, 3), **self._slow_fields(now)}

    def telemetry_payload(self, now: float) -> bytes:
        """``telemetry(now)`` encoded, at a fraction of its cost: only seq and ts per call."""
        self.seq += 1
        key = (int(now // WAVE_REFRESH_S), self.state, self.quant, self.requests_ok)
        if key != self._template_key:
            rest = json.dumps(self._slow_fields(now), separators=(",", ":")).encode()
            # The fields are numbers and names: no "%" in them to confuse the formatting.
            self._telemetry_template = b'{"seq":%d,"ts":%.3f,' + rest[1:]
            self._template_key = key
        return self._telemetry_template % (self.seq, now)

    def _slow_fields(self, now: float) -> dict[str, Any]:
        wave = math.sin(now / 30 + self.index)
        return {
            "state": self.state,
            "cpu_percent": round(35 + 20 * wave, 1),
            "mem": {
                "total_bytes": 4 * GIB,
                "available_bytes": int((2.8 - 0.1 * wave) * GIB),
                "percent": round(30 + 2.5 * wave, 1),
            },
            "temp_c": round(52 + 6 * wave, 1),
            "disk_free_bytes": 20 * GIB,
            "queue_depth": 0,
            "prefill_tps": round(180 + 20 * wave, 1),
            "decode_tps": round(24 + 4 * wave, 2),
            "ttft_ms": 120,
            "requests_ok": self.requests_ok,
            "requests_error": 0,
            "worker_rss_bytes": int(0.4 * GIB),
            "model": f"smollm2-135m-instruct {self.quant}",
        }


def _remaining_length(size: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        size, digit = divmod(size, 128)
        out.append(digit | (0x80 if size else 0))
        if not size:
            return bytes(out)


class TelemetrySocket:
    """A bare MQTT 3.1.1 connection that only publishes at QoS 0, many packets per write.
    Keepalive is off and nothing is read after the CONNACK: the broker sends it nothing else."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        name = client_id.encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(name).to_bytes(2, "big") + name
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = b""
        while len(connack) < 4:
            chunk = self.sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError("the broker closed the telemetry connection")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"the broker refused the telemetry connection: {connack!r}")

    @staticmethod
    def packet(topic: bytes, payload: bytes) -> bytes:
        body = len(topic).to_bytes(2, "big") + topic + payload
        return b"\x30" + _remaining_length(len(body)) + body

    def send(self, packets: list[bytes]) -> None:
        self.sock.sendall(b"".join(packets))

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()


class SimulatedFleet:
    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        *,
        prefix: str = "edge/v1",
        interval_s: float = 1.0,
        per_connection: int = 250,
        own_connection: int = 0,
        pool: str | None = None,
        id_prefix: str = "sim",
        seed: int = 1,
        will_delay_s: int = 0,
        manifest: str = "http://127.0.0.1:9/fleet-default.json",
        batched_telemetry: bool = False,
    ) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.id_prefix = id_prefix
        self.batched_telemetry = batched_telemetry
        self._telemetry_sockets: list[TelemetrySocket] = []
        self.interval_s = interval_s
        self.will_delay_s = will_delay_s
        rng = random.Random(seed)
        session = int(time.time() * 1000)
        self.devices = [
            SimDevice(
                id=f"{id_prefix}-{i:05d}",
                index=i,
                session=session,
                pool=pool,
                quant=rng.choice(QUANTS[1:5]),
                board=BOARDS[i % len(BOARDS)],
                interval_s=interval_s,
                manifest=manifest,
            )
            for i in range(count)
        ]
        for device in self.devices:
            device.sha256 = fake_sha256(device.quant)
        self.by_id = {d.id: d for d in self.devices}
        for device in self.devices:
            device.telemetry_topic = f"{prefix}/{device.id}/telemetry"
            device.telemetry_topic_bytes = device.telemetry_topic.encode()
        self._clients: list[tuple[paho.Client, list[SimDevice]]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.published = 0
        own, shared = self.devices[:own_connection], self.devices[own_connection:]
        for device in own:
            device.own = True
            self._clients.append((self._client(f"{device.id}", will=device), [device]))
        for start in range(0, len(shared), per_connection):
            group = shared[start : start + per_connection]
            self._clients.append(
                (self._client(f"{id_prefix}-mux-{start // per_connection}"), group)
            )

    def _client(self, client_id: str, will: SimDevice | None = None) -> paho.Client:
        client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(1000)
        if will is not None:
            properties = Properties(PacketTypes.WILLMESSAGE)
            properties.WillDelayInterval = self.will_delay_s
            client.will_set(
                f"{self.prefix}/{will.id}/status",
                json.dumps(
                    {
                        "state": "lost",
                        "session": will.session,
                        "ts": time.time(),
                        "version": VERSION,
                    }
                ),
                qos=1,
                retain=True,
                properties=properties,
            )
        client.on_message = self._on_message
        return client

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> "SimulatedFleet":
        for client, devices in self._clients:
            client.user_data_set(devices)
            client.connect(self.host, self.port, keepalive=30)
            client.loop_start()
            client.subscribe(
                [(f"{self.prefix}/{d.id}/{kind}", 1) for d in devices for kind in ("cmd", "prompt")]
            )
            now = time.time()
            for device in devices:
                device.client = client
                self.publish_status(device, "ready")
                self.publish_meta(device)
                device.next_due = now + random.random() * self.interval_s  # jittered start
            raw = None
            if self.batched_telemetry:
                raw = TelemetrySocket(
                    self.host, self.port, f"{self.id_prefix}-telemetry-{len(self._threads)}"
                )
                self._telemetry_sockets.append(raw)
            thread = threading.Thread(
                target=self._telemetry_loop, args=(client, devices, raw), daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for raw in self._telemetry_sockets:
            raw.close()
        for client, devices in self._clients:
            if client.is_connected():
                for device in devices:
                    self.publish_status(device, "stopped")
                client.disconnect()
            client.loop_stop()

    def kill(self, device_id: str) -> None:
        """Drop a Will-carrying device's TCP connection without DISCONNECT: the broker sends its Will."""
        device = self.by_id[device_id]
        if not device.own:
            raise ValueError(
                f"{device_id} shares a connection; only own-connection devices have a Will"
            )
        device.state = "killed"
        client = device.client
        client.loop_stop()
        sock = client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    # --- publishing ----------------------------------------------------------------------

    def _publish(
        self, client: paho.Client, topic: str, body: dict, *, qos: int = 0, retain: bool = False
    ) -> None:
        client.publish(topic, json.dumps(body, separators=(",", ":")), qos=qos, retain=retain)
        self.published += 1

    def publish_status(self, device: SimDevice, state: str) -> None:
        device.state = state
        self._publish(
            device.client,
            f"{self.prefix}/{device.id}/status",
            {
                "state": state,
                "session": device.session,
                "ts": round(time.time(), 3),
                "version": VERSION,
            },
            qos=1,
            retain=True,
        )

    def publish_meta(self, device: SimDevice) -> None:
        self._publish(
            device.client, f"{self.prefix}/{device.id}/meta", device.meta(), qos=1, retain=True
        )

    def event(self, device: SimDevice, kind: str, **fields: Any) -> None:
        self._publish(
            device.client,
            f"{self.prefix}/{device.id}/events",
            {"event": kind, "ts": round(time.time(), 3), **fields},
            qos=1,
        )

    def _telemetry_loop(
        self, client: paho.Client, devices: list[SimDevice], raw: TelemetrySocket | None
    ) -> None:
        while not self._stop.is_set():
            now = time.time()
            soonest = now + self.interval_s
            packets: list[bytes] = []
            for device in devices:
                if device.state in ("killed", "stopped"):
                    continue
                if device.next_due <= now:
                    # Stamped at the moment of publishing, as the daemon does: the controller's
                    # lag figure must not include this loop's own walk over its devices.
                    payload = device.telemetry_payload(time.time())
                    if raw is not None:
                        packets.append(raw.packet(device.telemetry_topic_bytes, payload))
                    else:
                        client.publish(device.telemetry_topic, payload)
                    self.published += 1
                    device.next_due += self.interval_s
                    if device.next_due < now:  # fell behind: skip, never burst
                        device.next_due = now + self.interval_s
                soonest = min(soonest, device.next_due)
            if packets:
                raw.send(packets)
            # Each pass walks every device of the connection: waking for each due device
            # alone would cost N passes a second, N devices each.
            self._stop.wait(max(PASS_MIN_S, soonest - time.time()))

    # --- answering prompts and commands --------------------------------------------------

    def _on_message(
        self, client: paho.Client, devices: list[SimDevice], message: paho.MQTTMessage
    ) -> None:
        parts = message.topic.split("/")
        device = self.by_id.get(parts[-2])
        if device is None or device.state == "killed":
            return
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        # Answer off the network thread: a reply may take a moment, as on a real device.
        threading.Thread(target=self._answer, args=(device, parts[-1], body), daemon=True).start()

    def _answer(self, device: SimDevice, kind: str, body: dict[str, Any]) -> None:
        if kind == "prompt":
            self._answer_prompt(device, body)
        elif kind == "cmd":
            self._answer_command(device, body)

    def _answer_prompt(self, device: SimDevice, body: dict[str, Any]) -> None:
        if not device.answer_prompts:
            return
        request_id = body.get("id")
        topic = body.get("reply_to") or f"{self.prefix}/{device.id}/reply/{request_id}"
        text_in = body.get("prompt") or " ".join(
            m.get("content", "") for m in body.get("messages") or []
        )
        words = f"simulated reply from {device.id} to: {text_in}".split()[
            : int(body.get("max_tokens") or 64)
        ]
        for seq, word in enumerate(words):
            self._publish(
                device.client,
                topic,
                {"id": request_id, "seq": seq, "delta": (" " if seq else "") + word},
            )
            time.sleep(0.01)
        device.requests_ok += 1
        final = {
            "id": request_id,
            "done": True,
            "text": " ".join(words),
            "finish_reason": "stop",
            "usage": {"prompt_tokens": len(text_in.split()), "completion_tokens": len(words)},
            "timings": {"decode_tps": 24.0},
        }
        if device.final_reply is not None:
            final = {"id": request_id, **device.final_reply}
        self._publish(device.client, topic, final, qos=1)

    def _answer_command(self, device: SimDevice, body: dict[str, Any]) -> None:
        command_id, op, args = body.get("id"), body.get("op"), body.get("args") or {}
        result_topic = f"{self.prefix}/{device.id}/cmd/result"
        if device.fail_commands:
            self._publish(
                device.client,
                result_topic,
                {
                    "id": command_id,
                    "ok": False,
                    "error": {"code": "fetch_failed", "message": "simulated failure"},
                },
                qos=1,
            )
            return
        result: dict[str, Any] = {"op": op}
        if op == "set_manifest":
            device.quant_by_manifest[device.manifest] = device.quant
            source = args.get("source")
            device.sha256_by_quant.update(self._manifest_sha256(source))
            quant = (
                device.pin or device.quant_by_manifest.get(source) or self._manifest_quant(source)
            )
            for done in (0.5, 1.0):
                self.event(
                    device,
                    "download",
                    file=f"smollm2-135m-instruct.{quant}.gguf",
                    bytes=int(done * 100e6),
                    total=int(100e6),
                    rate_bps=50e6,
                    state="downloading" if done < 1 else "done",
                )
                time.sleep(0.05)
            device.manifest = args.get("source")
            if quant and quant != device.quant:
                self.event(device, "model_switch", before=device.quant, after=quant)
                device.quant = quant
            result["quant"] = device.quant
        elif op == "pin":
            device.pin = args.get("quant")
            if device.pin:
                self.event(device, "model_switch", before=device.quant, after=device.pin)
                device.quant = device.pin
            result["quant"] = device.quant
        elif op == "drain":
            self.publish_status(device, "draining")
        elif op == "resume":
            self.publish_status(device, "ready")
        elif op == "select":
            result.update({"quant": device.quant, "candidates": device.candidates()})
        elif op == "bench":
            result.update({"decode_tps": 24.1, "prefill_tps": 181.0, "ttft_ms": 118})
        if op in ("set_manifest", "pin"):
            device.sha256 = device.sha256_by_quant.get(device.quant) or fake_sha256(device.quant)
            if device.degraded_after_switch:
                self.publish_status(device, "degraded")
        self.publish_meta(device)
        self._publish(
            device.client, result_topic, {"id": command_id, "ok": True, "result": result}, qos=1
        )

    @staticmethod
    def _manifest(source: str | None) -> dict[str, Any] | None:
        if not source:
            return None
        try:
            with urllib.request.urlopen(source, timeout=10) as response:
                manifest = json.loads(response.read())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def _manifest_quant(self, source: str | None) -> str | None:
        """The first variant's quant of the manifest at ``source`` (what a one-variant rollout sets)."""
        try:
            return self._manifest(source)["models"][0]["variants"][0]["quant"]
        except (TypeError, KeyError, IndexError):
            return None

    def _manifest_sha256(self, source: str | None) -> dict[str, str]:
        """quant -> sha256 of every variant of the manifest at ``source``."""
        try:
            variants = [v for m in self._manifest(source)["models"] for v in m["variants"]]
            return {v["quant"]: v["sha256"] for v in variants}
        except (TypeError, KeyError):
            return {}


def fake_sha256(quant: str) -> str:
    """A stand-in digest for a variant no manifest named (the simulator's starting quants)."""
    return hashlib.sha256(f"simulated {quant}".encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, help="how many devices")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="edge/v1")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="telemetry interval per device, s"
    )
    parser.add_argument(
        "--per-connection", type=int, default=250, help="device ids per shared connection"
    )
    parser.add_argument(
        "--own-connection", type=int, default=0, help="devices with their own connection and Will"
    )
    parser.add_argument("--pool", default=None)
    parser.add_argument("--id-prefix", default="sim")
    parser.add_argument(
        "--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)"
    )
    parser.add_argument(
        "--batched",
        action="store_true",
        help="telemetry on bare QoS 0 connections, many messages per write (benchmark load)",
    )
    args = parser.parse_args(argv)
    fleet = SimulatedFleet(
        args.host,
        args.port,
        args.count,
        prefix=args.prefix,
        interval_s=args.interval,
        per_connection=args.per_connection,
        own_connection=args.own_connection,
        pool=args.pool,
        id_prefix=args.id_prefix,
        batched_telemetry=args.batched,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(
        f"simulate-fleet: {args.count} devices on {args.host}:{args.port}, "
        f"{len(fleet._clients)} connections, {args.count / args.interval:.0f} telemetry msg/s",
        file=sys.stderr,
    )
    ends = time.monotonic() + args.duration if args.duration else math.inf
    try:
        while not stop.wait(min(5.0, max(0.0, ends - time.monotonic()))):
            if time.monotonic() >= ends:
                break
            print(f"simulate-fleet: published {fleet.published}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
