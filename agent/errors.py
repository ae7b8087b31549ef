"""The one exception tree of edge-agent.

Every error that can reach a user (CLI, MQTT reply, cmd/result, HTTP API) carries a
stable machine-readable ``code`` and a message that says what to do::

    EdgeAgentError (code: internal)
    ├── ConfigError            config_invalid     a config file, key or env override is wrong
    ├── ProbeError             probe_failed       the hardware probe could not read something it needs
    ├── ManifestError          manifest_invalid   the manifest fails validation (message names the key path)
    ├── GGUFError              gguf_invalid       a GGUF header is malformed or truncated
    ├── SelectionError         no_fit             no variant fits the budget / pin does not fit
    ├── FetchError             fetch_failed       download failed on every mirror
    │   ├── ChecksumError      checksum_mismatch  size or sha256 differs from the manifest
    │   ├── DiskFullError      disk_full          not enough free disk for the download
    │   └── NoWheelError       no_wheel           the wheelhouse has no wheel for this build key
    ├── StoreError             store_unsafe       the model store is a symlink, someone else's, writable by
    │                                             others, or holds a link where the store writes a file
    ├── RequestError           bad_request        a prompt/cmd payload is invalid (message names the field)
    │   ├── TooLongError       too_long           the prompt does not fit the context
    │   ├── TooLargeError      too_large          an upload is larger than the controller takes
    │   ├── GrammarError       bad_grammar        a grammar or JSON schema cannot constrain the reply
    │   ├── FilterError        bad_filter         an inventory filter (rollout target, fleet table)
    │   │                                         does not parse or names an unknown key
    │   └── UnknownOpError     unknown_op         a cmd names an op the agent does not have
    ├── BusyError              busy               the request queue is full
    ├── RateLimitedError       rate_limited       too many failed logins/tokens from one address
    ├── TimeoutError_          timeout            the request passed its deadline
    ├── CancelledError_        cancelled          the request was cancelled
    ├── NoModelError           no_model           no model is loaded (yet)
    ├── WorkerCrashedError     worker_crashed     the inference worker died mid-request
    ├── ModelLoadError         load_failed        every setting of the fallback ladder failed
    ├── SignatureError         bad_signature      a manifest signature is missing or wrong
    ├── WheelIndexError        wheel_index_invalid  a signed wheel index is not one (schema, bounds)
    ├── UpgradeError           upgrade_failed     an agent upgrade could not be installed (wheel, pip, layout)
    ├── FleetAPIError          (the controller's) the fleet controller's API refused a call or is unreachable
    └── BrokerError            broker_failed      the embedded MQTT broker cannot start (port in use)

Third-party errors are translated at the boundary (``raise FetchError(...) from exc``),
never leaked. Code never classifies errors by matching message text; it uses ``code``.
A message that quotes a value a peer sent goes through :func:`shown`, so a hostile value
(a YAML alias bomb, a 100 MB string) cannot make the message itself the attack.
"""

from __future__ import annotations

import reprlib
from typing import Any

SHOWN_CHARS = 80  # how much of a quoted value a message carries


class _BoundedRepr(reprlib.Repr):
    """reprlib's limits, plus the two reprs it leaves unbounded: huge ints (``repr`` raises
    past 4300 digits) and bytes (reprlib would repr all of them before cutting)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4
        self.maxstring = self.maxother = self.maxlong = SHOWN_CHARS

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return super().repr_str(x[: self.maxstring], level) + ("..." if len(x) > self.maxstring else "")


_repr = _BoundedRepr()


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A repr of ``value`` for an error message: bounded in size and in the work it costs."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EdgeAgentError(Exception):
    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class ConfigError(EdgeAgentError):
    code = "config_invalid"


class ProbeError(EdgeAgentError):
    code = "probe_failed"


class ManifestError(EdgeAgentError):
    code = "manifest_invalid"


class GGUFError(EdgeAgentError):
    code = "gguf_invalid"


class SelectionError(EdgeAgentError):
    code = "no_fit"


class FetchError(EdgeAgentError):
    code = "fetch_failed"


class ChecksumError(FetchError):
    code = "checksum_mismatch"


class DiskFullError(FetchError):
    code = "disk_full"


class NoWheelError(FetchError):
    code = "no_wheel"


class StoreError(EdgeAgentError):
    code = "store_unsafe"


class RequestError(EdgeAgentError):
    code = "bad_request"


class TooLongError(RequestError):
    code = "too_long"


class TooLargeError(RequestError):
    code = "too_large"


class GrammarError(RequestError):
    code = "bad_grammar"


class FilterError(RequestError):
    """``at``: the character offset in the filter where it went wrong."""

    code = "bad_filter"


class UnknownOpError(RequestError):
    code = "unknown_op"


class InRolloutError(RequestError):
    """A rollout asked for devices another active rollout still has to move."""

    code = "in_rollout"


class BusyError(EdgeAgentError):
    code = "busy"


class RateLimitedError(EdgeAgentError):
    """``retry_after_s``: whole seconds until the caller may try again (HTTP Retry-After)."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class TimeoutError_(EdgeAgentError):
    code = "timeout"


class CancelledError_(EdgeAgentError):
    code = "cancelled"


class NoModelError(EdgeAgentError):
    code = "no_model"


class WorkerCrashedError(EdgeAgentError):
    code = "worker_crashed"


class ModelLoadError(EdgeAgentError):
    code = "load_failed"


class SignatureError(EdgeAgentError):
    code = "bad_signature"


class WheelIndexError(EdgeAgentError):
    code = "wheel_index_invalid"


class UpgradeError(EdgeAgentError):
    code = "upgrade_failed"


class FleetAPIError(EdgeAgentError):
    """Raised by the fleet API client; ``code`` is the one the controller answered with
    (``unauthorized``, ``not_found``, ``unknown_op`` …) or ``unreachable``."""

    code = "fleet_api"

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code


class BrokerError(EdgeAgentError):
    code = "broker_failed"
