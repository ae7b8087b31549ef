"""Agent TLS against a real Mosquitto TLS listener, with a CA and certificates made here.

The client verifies the broker's certificate and host name, refuses a broker whose certificate
comes from another CA or names another host, and does mutual TLS; a real agent connects over
mutual TLS and answers a prompt."""

from __future__ import annotations

import datetime
import json
import queue
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import MQTTConfig, TLSConfig
from agent.mqtt.client import ConnectionChange, MQTTClient
from tests.support.broker import Broker, free_port
from tests.support.daemon import BASE, DEVICE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observers


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CA:
    """A throwaway certificate authority writing PEM files into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (self._builder(subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name}.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        issuer = getattr(self, "name", subject)  # the CA's own certificate issues itself
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, common_name: str, *, dns: tuple[str, ...] = (), client: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client
                                   else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        if dns:
            names = x509.SubjectAlternativeName([x509.DNSName(d) for d in dns])
            builder = builder.add_extension(names, critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.directory / f"{common_name}.crt",
                        self.directory / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        issued.key.chmod(0o600)
        return issued


@dataclass(frozen=True)
class TLSBroker:
    broker: Broker
    ca: CA
    other_ca: CA  # signs nothing the broker uses
    client: Issued  # a client certificate from ``ca``
    server_only_port: int  # verifies nothing about the client
    mutual_port: int  # require_certificate true


@pytest.fixture
def tls_broker(tmp_path: Path):
    certs = tmp_path / "certs"
    ca, other_ca = CA(certs, "test-ca"), CA(certs / "other", "other-ca")
    # The broker's certificate names "localhost" only: 127.0.0.1 is a wrong host name for it.
    server = ca.issue("broker", dns=("localhost",))
    client = ca.issue(DEVICE, client=True)
    server_only, mutual = free_port(), free_port()
    listener = f"certfile {server.cert}\nkeyfile {server.key}\ncafile {ca.path}\n"
    broker = Broker(tmp_path / "broker", extra_config=(
        f"listener {server_only} 127.0.0.1\n{listener}require_certificate false\n"
        f"listener {mutual} 127.0.0.1\n{listener}require_certificate true\n")).start()
    yield TLSBroker(broker, ca, other_ca, client, server_only, mutual)
    broker.stop()


def _client(host: str, port: int, tls: TLSConfig, inbox: queue.Queue) -> MQTTClient:
    config = MQTTConfig(host=host, port=port, tls=tls, reconnect_min_s=1, reconnect_max_s=1)
    return MQTTClient(config, client_id=f"tls-{port}", inbox=inbox)


def _connects(host: str, port: int, tls: TLSConfig) -> bool:
    inbox: queue.Queue = queue.Queue()
    client = _client(host, port, tls, inbox)
    client.start()
    try:
        change = inbox.get(timeout=15)
        return isinstance(change, ConnectionChange) and change.connected
    finally:
        client.stop()


def _refusal(host: str, port: int, tls: TLSConfig) -> str:
    """Start a client and return the reason of its first failed attempt; it must not connect."""
    inbox: queue.Queue = queue.Queue()
    client = _client(host, port, tls, inbox)
    failed: list[dict] = []
    with structlog.testing.capture_logs() as logs:
        client.start()
        try:
            for _ in range(150):  # the first attempt is over in milliseconds; 15 s is a hung test
                failed = [entry for entry in logs if entry["event"] == "mqtt_connect_failed"]
                if failed or client.wait_connected(0.1):
                    break
        finally:
            client.stop()
    assert not [entry for entry in logs if entry["event"] == "mqtt_connected"], logs
    assert inbox.empty(), "a refused connection reached the inbox"
    assert failed, logs
    return failed[0]["error"]


def test_verifies_the_broker_and_its_host_name(tls_broker: TLSBroker):
    port, ca = tls_broker.server_only_port, str(tls_broker.ca.path)
    assert _connects("localhost", port, TLSConfig(enabled=True, ca_file=ca))
    wrong_ca = _refusal("localhost", port,
                        TLSConfig(enabled=True, ca_file=str(tls_broker.other_ca.path)))
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca and "mismatch" not in wrong_ca
    wrong_host = _refusal("127.0.0.1", port, TLSConfig(enabled=True, ca_file=ca))
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_host and "mismatch" in wrong_host
    # verify: false is the explicit opt-out; it connects where the host name is wrong.
    assert _connects("127.0.0.1", port, TLSConfig(enabled=True, ca_file=ca, verify=False))


def test_mutual_tls_needs_the_client_certificate(tls_broker: TLSBroker):
    port, ca = tls_broker.mutual_port, str(tls_broker.ca.path)
    client = tls_broker.client
    assert _connects("localhost", port, TLSConfig(enabled=True, ca_file=ca,
                                                  cert_file=str(client.cert),
                                                  key_file=str(client.key)))
    assert _refusal("localhost", port, TLSConfig(enabled=True, ca_file=ca))
    # Why: TLS 1.3 finishes the client's side of the handshake first, then the broker meets
    # the empty certificate with a certificate_required alert and logs the reason. A client
    # sees the alert or, when the broker's close wins, only an EOF; the broker logs after
    # closing the socket, and not at all when the client left before it read the handshake.
    # So: one more raw attempt, then the alert or the log line (waited for) must say it.
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("localhost", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        with pytest.raises((ssl.SSLError, ConnectionError)) as closed:
            tls.sendall(b"\x10\x00")  # the start of an MQTT CONNECT
            tls.recv(1)
    deadline = time.monotonic() + 10
    while ("peer did not return a certificate" not in (log := tls_broker.broker.log_path.read_text())
           and "CERTIFICATE_REQUIRED" not in str(closed.value) and time.monotonic() < deadline):
        time.sleep(0.05)
    assert "CERTIFICATE_REQUIRED" in str(closed.value) or "peer did not return a certificate" in log


@pytest.mark.slow
def test_agent_over_mutual_tls_answers_a_prompt(tmp_path: Path, tls_broker: TLSBroker, ladder_dir):
    client = tls_broker.client
    daemon = RunningDaemon(tmp_path / "daemon", tls_broker.broker, ladder_dir, mqtt={
        "host": "localhost", "port": tls_broker.mutual_port,
        "tls": {"enabled": True, "ca_file": str(tls_broker.ca.path), "cert_file": str(client.cert),
                "key_file": str(client.key)}}).start()
    observers = Observers(tls_broker.broker)  # the requester uses the plain listener
    try:
        wait_ready(daemon)  # READY=1 only once MQTT is connected
        observer = observers.connect(f"{BASE}/reply/#")
        prompt = {"id": "tls-1", "prompt": "Hello", "max_tokens": 4, "stream": False}
        observer.publish(f"{BASE}/prompt", json.dumps(prompt).encode())
        final = wait_final(observer, f"{BASE}/reply/tls-1")
        assert "error" not in final and final["usage"]["completion_tokens"] >= 1, final
    finally:
        observers.close()
        daemon.close()
