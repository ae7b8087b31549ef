"""Installing from the controller's wheelhouse: the signed index, then one verified wheel.

``read_index`` reads ``<base>/files/wheels/index.json`` and its ``.sig`` and checks the
signature with the pinned controller key (agent.catalog.wheels.parse_index): what an engine
or an agent wheel is checked against. ``fetch_engine_wheel`` then downloads
the wheel of the given build key with agent.fetch.downloader, which puts it in place only
when its size and sha256 are the ones the signed index names. scripts/setup runs this module
(``python -m agent.fetch.wheels``) before it would compile llama.cpp.

What fails how (the exit status of the command, and what setup does):

- 0: the wheel is in place (its path is printed).
- 3 ``no_wheel`` (no wheel for this key) or ``fetch_failed`` (the wheelhouse cannot be
  reached): nothing says anyone tampered with anything, so setup compiles, and says why.
- 4 ``bad_signature``, ``wheel_index_invalid``, ``checksum_mismatch``: what arrived is not
  what the controller signed. setup stops without touching the installed venv rather than
  compile: a build that starts whenever an index fails to verify would hide the attack,
  and would let whoever can alter the traffic send every device into a long compile.

Must not install anything: pip does that, from the file this leaves.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from agent.catalog.signing import SIGNATURE_SUFFIX
from agent.catalog.wheels import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    EngineWheel,
    WheelIndex,
    parse_index,
)
from agent.errors import (
    ChecksumError,
    EdgeAgentError,
    FetchError,
    NoWheelError,
    SignatureError,
    WheelIndexError,
)
from agent.fetch.downloader import Downloader

INDEX_TIMEOUT_S = 30.0
NO_WHEEL_EXIT = 3
REFUSED_EXIT = 4
REFUSED = (SignatureError, WheelIndexError, ChecksumError)


WHEELS_PATH = "/files/wheels/"  # where a controller serves its wheelhouse


def wheels_base(url: str) -> str:
    """``<controller>/files/wheels/`` from the controller's URL (or that base itself)."""
    url = url.rstrip("/")
    return url + "/" if url.endswith("/files/wheels") else url + WHEELS_PATH


def _read(url: str, *, missing_ok: bool) -> bytes | None:
    """A small document of the wheelhouse; None for a 404 when ``missing_ok``."""
    try:
        with urllib.request.urlopen(url, timeout=INDEX_TIMEOUT_S) as response:
            body = response.read(MAX_INDEX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and missing_ok:
            return None
        raise FetchError(f"{url}: HTTP {exc.code}", url=url, status=exc.code) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{url}: cannot reach the wheelhouse: {getattr(exc, 'reason', exc)}",
                         url=url) from exc
    if len(body) > MAX_INDEX_BYTES:
        raise WheelIndexError(f"{url}: larger than {MAX_INDEX_BYTES} bytes")
    return body


def read_index(base: str, public_key: str | None) -> WheelIndex:
    """The wheelhouse's index at ``base`` (``wheels_base``), its signature checked with
    ``public_key``. NoWheelError when the controller hosts none (404), FetchError when it
    cannot be reached, SignatureError or WheelIndexError when it is not what it signed."""
    index_url = base + INDEX_NAME
    data = _read(index_url, missing_ok=True)
    if data is None:
        raise NoWheelError(f"{index_url}: this controller hosts no wheelhouse (404)")
    signature = _read(index_url + SIGNATURE_SUFFIX, missing_ok=True)
    if signature is None:
        raise SignatureError(f"{index_url}{SIGNATURE_SUFFIX}: missing; a controller signs every "
                             "index it serves, so an unsigned one is not used")
    try:
        return parse_index(data, signature, public_key)
    except SignatureError:
        # The index may have changed between the two reads (a wheel was added): ask once more
        # before calling it tampered.
        data = _read(index_url, missing_ok=False) or b""
        signature = _read(index_url + SIGNATURE_SUFFIX, missing_ok=True)
        return parse_index(data, signature, public_key)


def find_engine_wheel(base: str, key: str, public_key: str | None) -> EngineWheel:
    """The signed index's entry for ``key``; NoWheelError when there is none."""
    index = read_index(base, public_key)
    wheel = index.engine_for(key)
    if wheel is None:
        raise NoWheelError(f"{base}{INDEX_NAME}: no engine wheel for build key {key} "
                           f"({len(index.engine)} hosted)")
    return wheel


def fetch_engine_wheel(base: str, key: str, public_key: str | None, dest_dir: Path) -> Path:
    """The wheel of ``key`` at ``dest_dir/<file>``, verified; raises EdgeAgentError."""
    wheel = find_engine_wheel(base, key, public_key)
    dest_dir.mkdir(parents=True, exist_ok=True)
    return Downloader().download([base + wheel.path], dest_dir / wheel.file, size=wheel.size,
                                 sha256=wheel.sha256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.fetch.wheels",
                                     description="fetch a verified engine wheel from a wheelhouse")
    parser.add_argument("--from", dest="url", required=True, help="the controller's URL")
    parser.add_argument("--key", required=True, help="the build key (scripts/setup)")
    parser.add_argument("--public-key", required=True, help="the controller's pinned key, base64")
    parser.add_argument("--dest", required=True, help="directory the wheel goes to")
    args = parser.parse_args(argv)
    try:
        path = fetch_engine_wheel(wheels_base(args.url), args.key, args.public_key,
                                  Path(args.dest))
    except REFUSED as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return REFUSED_EXIT
    except EdgeAgentError as exc:  # no_wheel, fetch_failed, disk_full: compile instead
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return NO_WHEEL_EXIT
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
