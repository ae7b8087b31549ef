"""Typed configuration: a YAML file, EDGE_AGENT_* environment overrides, secrets from files.

Precedence: defaults < YAML file < environment. An environment override names the key
path with double underscores: ``EDGE_AGENT_MQTT__HOST=broker.lan``,
``EDGE_AGENT_MODEL__PIN=Q4_K_M``; its value is read as a YAML scalar. Only variables whose
first segment is a key of the config being loaded are overrides, so the tools' own
variables (EDGE_AGENT_VENV, EDGE_AGENT_FLEET_URL, …) never break a config; a typo inside a
real section (EDGE_AGENT_MQTT__HSOT) is still rejected.

Secrets never come from argv or the YAML itself: ``mqtt.password_file`` names a file, and
under systemd's ``LoadCredential=`` the file ``$CREDENTIALS_DIRECTORY/mqtt-password`` is
used when no file is configured.

Unknown keys are rejected; every error names the file and the key path.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import yaml

from agent.errors import ConfigError
# The topic contract's rules, from the bottom layer: the same ones agent.mqtt and the ACL apply.
from agent.topic_rules import device_id_problem, is_valid_filter, is_valid_level

ENV_PREFIX = "EDGE_AGENT_"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-agent"


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "edge-agent"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class TLSConfig(_Section):
    enabled: bool = False
    ca_file: str | None = None  # None: the system trust store
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    verify: bool = True  # verify the broker's certificate and hostname


class MQTTConfig(_Section):
    host: str = "localhost"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None  # default: the device id
    password_file: str | None = None
    tls: TLSConfig = msgspec.field(default_factory=TLSConfig)
    keepalive_s: int = 30
    session_expiry_s: int = 86400  # persistent session: QoS 1 prompts wait while the device is away
    will_delay_s: int = 10  # a short blip does not mark the device lost
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_payload_bytes: int = 256 * 1024
    pool: str | None = None  # join edge/v1/pool/<pool>/prompt through a shared subscription
    topic_prefix: str = "edge/v1"
    # QoS 1 replies/events kept by paho while the broker is away; bounded so a long outage
    # cannot eat the device's memory (past it the publish is refused and logged).
    outgoing_queue_limit: int = 10000
    # How many recent request ids (and their final replies) are remembered, so a redelivered
    # prompt or cmd is answered once.
    dedup_entries: int = 1024
    # A streamed reply's chunks are coalesced while the connection is slower than the tokens:
    # what waits goes out when the previous chunk was written, or after this long.
    stream_interval_ms: int = 50
    # Topic filters inside topic_prefix (or the Home Assistant discovery prefix) that a prompt
    # may name as its reply topic, besides the device's own reply/ subtree; any other reply
    # topic inside those trees is refused with bad_request (agent.mqtt.topics.ReplyPolicy).
    reply_topics: list[str] = []

    def __post_init__(self) -> None:
        if not 1 <= self.stream_interval_ms <= 10_000:
            raise ValueError("stream_interval_ms: must be 1 to 10000")
        if self.pool is not None and (not is_valid_level(self.pool) or not self.pool.isprintable()):
            raise ValueError("pool: must be one topic level: printable, without '/', '+', '#'")
        for index, topic_filter in enumerate(self.reply_topics):
            if not is_valid_filter(topic_filter):
                raise ValueError(f"reply_topics[{index}]: {topic_filter[:120]!r} is not a topic "
                                 "filter ('+' and '#' only as whole levels, no leading '$')")


MAX_CHAT_TEMPLATE_BYTES = 64 * 1024  # real chat templates are a few KiB; a bigger file is a mistake
_CHAT_FORMAT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_chat_template_file(chat_format: str) -> bool:
    """A chat_format value names a Jinja file (not a registered format) when it looks like a path."""
    return "/" in chat_format or chat_format.endswith(".jinja")


def chat_format_problem(chat_format: str) -> str | None:
    """What is wrong with a chat_format value, short of the registry check (the worker's: only
    it may import llama_cpp), or None."""
    if not is_chat_template_file(chat_format):
        if _CHAT_FORMAT_NAME.fullmatch(chat_format):
            return None
        return (f"{chat_format[:80]!r} is neither a chat format name (letters, digits, '._-') "
                "nor a template file path (with a '/' or ending in .jinja)")
    path = Path(chat_format)
    try:
        stat = path.stat()
    except OSError as exc:
        return f"template file {chat_format[:200]!r}: {exc.strerror}"
    if not path.is_file():
        return f"template file {chat_format[:200]!r} is not a regular file"
    if stat.st_size > MAX_CHAT_TEMPLATE_BYTES:
        return (f"template file {chat_format[:200]!r} is {stat.st_size} bytes, more than "
                f"{MAX_CHAT_TEMPLATE_BYTES}")
    return None


class ModelConfig(_Section):
    manifest: str | None = None  # path or http(s) URL
    # Local manifests that a set_manifest command may name must lie under this directory
    # (after resolving symlinks and ".."); None: set_manifest takes http(s) URLs only.
    manifest_dir: str | None = None
    model_id: str | None = None  # which model of the manifest; default: the first
    pin: str | None = None  # force a quant, e.g. "Q4_K_M"; an error if it does not fit
    profile: str | None = None  # force a profile by name instead of matching
    memory_headroom_bytes: int | None = None  # default: the profile's
    n_ctx_target: int | None = None
    n_ctx_floor: int | None = None
    min_tokens_per_s: float | None = None
    kv_type: Literal["f16", "q8_0", "q4_0"] | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    # How messages become a prompt, over the manifest's chat_format and the GGUF's own
    # tokenizer.chat_template: one of llama-cpp-python's registered chat formats ("gemma",
    # "chatml", ...; the worker checks the name against its registry), or the path of a Jinja
    # template file (a value with a '/' or ending in .jinja), read by the worker at each load.
    chat_format: str | None = None

    def __post_init__(self) -> None:
        problem = chat_format_problem(self.chat_format) if self.chat_format is not None else None
        if problem:
            raise ValueError(f"chat_format: {problem}")


class RuntimeConfig(_Section):
    queue_size: int = 8
    request_timeout_s: float = 300.0
    default_max_tokens: int = 256
    canary_tokens: int = 4
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: bool | None = None  # None: on where the build supports it


class FetchConfig(_Section):
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 4  # per mirror, exponential backoff with jitter
    store_budget_bytes: int | None = None  # None: keep current + previous only
    # First retry waits about this long, doubling per attempt with full jitter, so a
    # fleet that lost its mirror at the same moment does not retry in lockstep.
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0  # a retry never waits longer than this
    # Free space left on the store's disk after a download, so logs and state still fit.
    disk_margin_bytes: int = 64 * 1024 * 1024


class TelemetryConfig(_Section):
    interval_s: float = 10.0


class HomeAssistantConfig(_Section):
    enabled: bool = False
    discovery_prefix: str = "homeassistant"


def _is_ed25519_public_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text.strip(), validate=True)) == 32
    except ValueError:  # binascii.Error is a ValueError
        return False


class SigningConfig(_Section):
    """Manifest signatures (agent.catalog.signing): required unless explicitly opted out.

    ``required`` is derived, not a switch: on whenever a key is pinned, and on without a key
    too (every manifest is then refused) unless ``allow_unsigned`` says otherwise. Setting it
    is accepted only when it agrees, so a config written as ``required: false`` fails loudly
    instead of silently meaning something else."""

    public_key: str | None = None  # Ed25519 public key, base64 (raw 32 bytes): the controller's
    # The only way to load unsigned manifests; logged at warning on start and shown in meta.
    allow_unsigned: bool = False
    required: bool | None = None  # derived (see above); None in a file means "as derived"

    def __post_init__(self) -> None:
        if self.public_key is not None and not _is_ed25519_public_key(self.public_key):
            raise ValueError("public_key: expected base64 of a raw 32-byte Ed25519 key")
        if self.public_key and self.allow_unsigned:
            raise ValueError(
                "allow_unsigned: true contradicts public_key: a pinned key is always enforced; "
                "remove one of them"
            )
        derived = not self.allow_unsigned
        if self.required is not None and self.required != derived:
            raise ValueError(
                "required: false does not turn signatures off; set allow_unsigned: true "
                "(and no public_key) to load unsigned manifests"
                if derived else "required: true contradicts allow_unsigned: true"
            )
        self.required = derived


class UpgradeConfig(_Section):
    """The ``upgrade`` op (agent.upgrade): where versions live and how long a new one has."""

    # The releases directory install.sh makes (its unit sets /opt/edge-agent/releases);
    # None: this agent does not upgrade itself and the op says so.
    releases_dir: str | None = None
    # A new version that is not healthy (MQTT connected, model loaded) this long after the
    # switch is rolled back. The clock starts after the download and install: it covers the
    # restart and the model load (minutes on a Raspberry Pi, as TimeoutStartSec= does).
    ready_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not 30 <= self.ready_timeout_s <= 24 * 3600:
            raise ValueError("ready_timeout_s: must be between 30 and 86400")


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool | None = None  # None: JSON when stderr is not a TTY


MAX_LABELS = 16
# A label key or value: one safe word, so it is the same in YAML, a topic payload, a filter
# (agent.fleet.inventory) and an HTML attribute, and a device cannot grow its meta with it.
LABEL_WORD = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_LABEL_WORD = re.compile(LABEL_WORD)


def labels_problem(labels: dict[str, str]) -> str | None:
    """What is wrong with a labels mapping (agent config, device meta), or None."""
    if len(labels) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels, not {len(labels)}"
    for key, value in labels.items():
        for what, word in (("key", key), ("value", value)):
            if not _LABEL_WORD.fullmatch(word):
                return (f"{what} {word[:80]!r} must be one word of letters, digits and '_.-' "
                        "(at most 64, starting with a letter or digit)")
    return None


class AgentConfig(_Section):
    device_id: str = msgspec.field(default_factory=lambda: socket.gethostname())
    # Inventory labels ({site: store-12, role: kiosk}): reported in meta, targeted by rollouts
    # and the fleet table's filter (label:site=store-12). A number is kept as its text.
    labels: dict[str, str | int] = {}
    state_dir: str = msgspec.field(default_factory=lambda: str(default_state_dir()))
    cache_dir: str = msgspec.field(default_factory=lambda: str(default_cache_dir() / "models"))
    mqtt: MQTTConfig = msgspec.field(default_factory=MQTTConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    fetch: FetchConfig = msgspec.field(default_factory=FetchConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    home_assistant: HomeAssistantConfig = msgspec.field(default_factory=HomeAssistantConfig)
    signing: SigningConfig = msgspec.field(default_factory=SigningConfig)
    upgrade: UpgradeConfig = msgspec.field(default_factory=UpgradeConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        # The id is a topic level, the MQTT client id and the username the ACL keys on.
        problem = device_id_problem(self.device_id)
        if problem:
            raise ValueError(f"device_id: {problem}")
        self.labels = {key: str(value) for key, value in self.labels.items()}
        problem = labels_problem(self.labels)
        if problem:
            raise ValueError(f"labels: {problem}")


T = TypeVar("T", bound=msgspec.Struct)


def _apply_env(data: dict[str, Any], env: dict[str, str], keys: set[str]) -> dict[str, Any]:
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in keys:
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(path)} is not a section", key=key)
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def _key_path(error: msgspec.ValidationError) -> str:
    text = str(error)
    marker = " - at `$"
    if marker in text:
        message, _, where = text.partition(marker)
        return f"{where.rstrip('`').lstrip('.') or '(top level)'}: {message}"
    return text


def load_struct(
    cls: type[T], path: str | os.PathLike[str] | None, env: dict[str, str] | None = None
) -> T:
    """Load ``cls`` from a YAML file (optional) plus environment overrides."""
    source = str(path) if path else "(defaults)"
    data: Any = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}", file=source) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}", file=source) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping", file=source)
    data = _apply_env(data, dict(os.environ if env is None else env), set(cls.__struct_fields__))
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_key_path(exc)}", file=source) from exc


def load_config(
    path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
) -> AgentConfig:
    return load_struct(AgentConfig, path, env)


def read_secret(path: str | None, credential: str, env: dict[str, str] | None = None) -> str | None:
    """A secret from ``path``, else from ``$CREDENTIALS_DIRECTORY/<credential>``, else None."""
    env = dict(os.environ if env is None else env)
    candidates = [Path(path)] if path else []
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(env["CREDENTIALS_DIRECTORY"]) / credential)
    for candidate in candidates:
        try:
            # An empty file means "no secret" (install.sh creates one so LoadCredential= works).
            return candidate.read_text().strip() or None
        except FileNotFoundError:
            if path and candidate == Path(path):
                raise ConfigError(f"secret file {path} does not exist", file=path) from None
        except OSError as exc:
            raise ConfigError(f"cannot read secret {candidate}: {exc.strerror}") from exc
    return None


# --- fleet controller (edge-agent fleet serve) -------------------------------------------


class FleetAuthConfig(_Section):
    # Hashes, never secrets, made by `edge-agent fleet hash-secret`, so a leaked config file
    # does not open the dashboard (hashlib only: no extra dependency). The password:
    # "scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>" or "pbkdf2_sha256$<iterations>$<salt>$<hash>";
    # tokens: "sha256$<hash b64>" (--method sha256; scrypt/PBKDF2 token hashes still verify,
    # off the event loop, but every wrong token then costs a slow hash).
    admin_password_hash: str | None = None  # None: password login is off (tokens still work)
    api_token_hashes: list[str] = []  # bearer tokens for the API, CLI and Prometheus
    # Failed logins and bearer tokens per client address (IPv6: per /64): this many at once,
    # then one more per failed_auth_window_s / failed_auth_limit; past it, 429 rate_limited.
    failed_auth_limit: int = 10
    failed_auth_window_s: float = 60.0
    session_max_age_s: int = 12 * 3600  # a dashboard login lasts a working day
    cookie_secure: bool = False  # set True when the dashboard is served over TLS
    metrics_public: bool = False  # True lets Prometheus scrape /metrics without a token
    files_public: bool = True  # devices fetch manifests and models from /files without a token

    def __post_init__(self) -> None:
        if not 1 <= self.failed_auth_limit <= 10_000:
            raise ValueError("failed_auth_limit: a whole number from 1 to 10000")
        if not 1.0 <= self.failed_auth_window_s <= 86400.0:
            raise ValueError("failed_auth_window_s: seconds from 1 to 86400")


class FleetIngestConfig(_Section):
    """What one device may send the controller (agent.fleet.ingest): a device past these
    limits loses its own messages, is flagged on its row and gets a ``rejected_input`` event."""

    # Per message, by topic: a bigger payload is dropped unread.
    status_max_bytes: int = 1024
    meta_max_bytes: int = 64 * 1024  # probe + selection with every candidate
    telemetry_max_bytes: int = 8 * 1024
    event_max_bytes: int = 8 * 1024  # also the most one stored event can take
    cmd_result_max_bytes: int = 64 * 1024
    # Token bucket per device over telemetry, events and cmd/result (status and meta are
    # coalesced to the latest per device instead): sustained rate and burst, in messages.
    device_rate_per_s: float = 10.0
    device_burst: int = 100
    # Telemetry, events and cmd/results waiting for the writer (also the most devices with a
    # status or meta waiting); past it new ones are dropped. queue_max_bytes bounds the payload
    # bytes of everything waiting, status and meta included.
    queue_max: int = 50_000
    queue_max_bytes: int = 64 * 1024 * 1024
    events_per_device: int = 1000  # the newest are kept; older ones are deleted at once

    def __post_init__(self) -> None:
        for name in msgspec.structs.fields(self):
            if getattr(self, name.name) <= 0:
                raise ValueError(f"{name.name}: must be positive")


class FleetRegistryConfig(_Section):
    """Where the controller keeps its registry (agent.fleet.registry)."""

    # None: SQLite at db_path (one controller). postgresql://user@host:port/db: PostgreSQL,
    # which any number of controllers may share. The password never goes in the URL: it is
    # read from password_file, else the systemd credential `registry-password`.
    url: str | None = None
    password_file: str | None = None
    pool_size: int = 8  # PostgreSQL connections this controller may hold at once

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url: a postgresql:// URL (unset: SQLite at db_path)")
        if self.url is not None and urllib.parse.urlsplit(self.url).password is not None:
            raise ValueError("url: no password in the URL; put it in password_file")
        if not 1 <= self.pool_size <= 1000:
            raise ValueError("pool_size: 1 to 1000")


class FleetConfig(_Section):
    # The controller's own MQTT client id; unique per controller so several can share the
    # telemetry load through $share/ctl/... while each keeps its own normal subscriptions.
    controller_id: str = msgspec.field(default_factory=lambda: f"fleet-{socket.gethostname()}")
    # The same broker settings as a device (host, TLS, credentials file, prefix); username
    # defaults to controller_id.
    mqtt: MQTTConfig = msgspec.field(default_factory=MQTTConfig)
    telemetry_share_group: str = "ctl"  # $share/<group>/<prefix>/+/telemetry
    http_host: str = "127.0.0.1"  # loopback by default: expose it deliberately (reverse proxy, TLS)
    http_port: int = 8080
    # Registry (SQLite, WAL). Default under the state dir so a systemd StateDirectory= holds it.
    db_path: str = msgspec.field(default_factory=lambda: str(default_state_dir() / "fleet.db"))
    telemetry_sample_s: float = 10.0  # keep one telemetry point per device per this many seconds
    telemetry_retention_s: float = 7 * 86400.0  # older points are pruned: the DB stays bounded
    events_retention_s: float = 30 * 86400.0
    ingest_flush_s: float = 0.2  # the writer commits one batch per this interval
    default_telemetry_interval_s: float = 10.0  # when a device does not report its interval
    stale_after_intervals: float = 3.0  # silent longer than this many intervals: shown stale
    # Manifests (*.json) and model files served at /files with Range/ETag/If-Range.
    model_dir: str = msgspec.field(default_factory=lambda: str(default_state_dir() / "fleet-models"))
    # Engine (llama-cpp-python) and edge-agent wheels served at /files/wheels, with a signed
    # index (agent.fleet.wheelhouse); filled by `edge-agent fleet wheels add`.
    wheel_dir: str = msgspec.field(
        default_factory=lambda: str(default_state_dir() / "fleet-wheels"))
    # Folders on this host that the Models page and POST /api/manifests may build a manifest
    # from (``model_dir`` in the request): the named folder and every file in it must resolve,
    # symlinks and ".." followed, inside one of these. Empty: no folder can be named.
    publish_roots: list[str] = []
    # The largest GGUF file an upload may be; uploads are streamed to disk, never held in memory.
    upload_max_bytes: int = 64 * 1024**3
    # The Ed25519 key that signs every manifest served from model_dir (made on first start,
    # mode 0600, never replaced); None: signing.key beside db_path, in the state dir.
    signing_key_file: str | None = None
    # Base URL devices use to reach /files (manifest URLs in rollouts); None: from the request.
    public_url: str | None = None
    # A rollout's default device_timeout_s: a device not through the health gate by then fails.
    command_timeout_s: float = 600.0
    # Per-device gauges in /metrics (eleven series a device): off for big fleets, where the fleet
    # totals are the scrape and per-device figures come from the API.
    metrics_per_device: bool = True
    # How long a rollout's lease lasts unrenewed: when the controller driving it dies, another
    # sharing the registry takes the rollout over after this long.
    rollout_lease_s: float = 10.0
    registry: FleetRegistryConfig = msgspec.field(default_factory=FleetRegistryConfig)
    auth: FleetAuthConfig = msgspec.field(default_factory=FleetAuthConfig)
    ingest: FleetIngestConfig = msgspec.field(default_factory=FleetIngestConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    @property
    def inbox_owner(self) -> str:
        """The topic word of this controller's reply inbox: its MQTT account, as the ACLs key
        on (several controllers on one account share one inbox, each ignoring the others')."""
        return self.mqtt.username or self.controller_id

    def __post_init__(self) -> None:
        # Both are topic levels (the client id in logs and $share, the account in the inbox).
        for field, value in (("controller_id", self.controller_id),
                             ("mqtt.username", self.mqtt.username)):
            problem = value is not None and device_id_problem(value)
            if problem:
                raise ValueError(f"{field}: {problem}")


def load_fleet_config(
    path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
) -> FleetConfig:
    return load_struct(FleetConfig, path, env)
