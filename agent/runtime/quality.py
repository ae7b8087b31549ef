"""Measured quality: each variant's divergence from a reference variant of the same model.

quality = exp(-mean KL(reference || variant)) of the next-token distributions over a text
(by default the shipped quality-text.txt), so the reference is 1.0 and lower is further from
it. ``scripts/make-test-models`` (the demo ladder) and ``edge-agent manifest build
--measure-quality`` (users' models) both come here, so their figures are the same measure.

llama.cpp runs only in a child process (``python -m agent.runtime.quality``), as the
inference worker does: a native crash or an out-of-memory kill on a large model ends the
child, not the command, and the parent never imports llama_cpp. The child loads one model at
a time; the reference's log-probabilities (tokens x vocabulary, float64) are the one thing
kept across loads. Results come back as one JSON line per variant on a private pipe, since
llama.cpp writes its own noise to stdout and stderr; that noise goes to a file (the caller's
build log, or a temporary one) whose last lines the error quotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from agent.errors import ModelLoadError

DEFAULT_TEXT = Path(__file__).with_name("quality-text.txt")
STDERR_TAIL_CHARS = 2000
STDERR_TAIL_LINES = 20


class Measurement(msgspec.Struct, kw_only=True):
    path: str
    mean_kl: float  # rounded to 6 places
    quality: float  # exp(-mean_kl), rounded to 4 places
    tokens: int


def measure_quality(
    reference: Path,
    candidates: list[Path],
    text: str | None = None,
    progress: Callable[[Measurement], None] | None = None,
    log: Path | None = None,
) -> list[Measurement]:
    """Measure each candidate against ``reference`` in a child process; in candidate order.

    The child's stdout and stderr (llama.cpp's own log) are appended to ``log`` when given,
    and the error on failure names it; otherwise they go to a temporary file."""
    text = DEFAULT_TEXT.read_text() if text is None else text
    read_fd, write_fd = os.pipe()
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as text_file, \
            (open(log, "a+b") if log else tempfile.TemporaryFile("w+b")) as stderr:
        text_file.write(text)
        text_file.flush()
        command = [sys.executable, "-m", "agent.runtime.quality", "--fd", str(write_fd),
                   "--text", text_file.name, str(reference), *map(str, candidates)]
        # The child imports this same package, whichever checkout or install the parent runs.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                 pass_fds=(write_fd,), env=env)
        os.close(write_fd)
        results = []
        with os.fdopen(read_fd) as lines:
            for line in lines:
                measurement = msgspec.json.decode(line, type=Measurement)
                results.append(measurement)
                if progress:
                    progress(measurement)
        rc = child.wait()
        if rc != 0 or len(results) != len(candidates):
            where = f"llama.cpp's log is {log}, ending:" if log else "llama.cpp said:"
            raise ModelLoadError(f"measuring quality failed (exit {rc}) after {len(results)} of "
                                 f"{len(candidates)} variants; {where}\n{output_tail(stderr)}")
    return results


def output_tail(file: BinaryIO) -> str:
    """The last lines of a log file, bounded: what an error quotes of llama.cpp's output."""
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - STDERR_TAIL_CHARS))
    text = file.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:]).strip()


# ---- the child -----------------------------------------------------------------------


def _log_probs(llama_cpp: Any, np: Any, path: str, tokens: list[int]) -> Any:
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=len(tokens) + 8, n_batch=len(tokens), logits_all=True,
        n_threads=os.cpu_count() or 2, verbose=False,
    )
    try:
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _child(argv: list[str]) -> int:
    import argparse

    import llama_cpp
    import numpy as np

    parser = argparse.ArgumentParser(prog="python -m agent.runtime.quality")
    parser.add_argument("--fd", type=int, required=True,
                        help="write one JSON line per variant here")
    parser.add_argument("--text", required=True)
    parser.add_argument("reference")
    parser.add_argument("candidates", nargs="+")
    args = parser.parse_args(argv)
    out = os.fdopen(args.fd, "w")
    vocab = llama_cpp.Llama(model_path=args.reference, vocab_only=True, verbose=False)
    try:
        tokens = vocab.tokenize(Path(args.text).read_text().encode(), add_bos=True)
    finally:
        vocab.close()
    reference = _log_probs(llama_cpp, np, args.reference, tokens)
    for path in args.candidates:
        candidate = reference if path == args.reference else _log_probs(llama_cpp, np, path, tokens)
        kl = float((np.exp(reference) * (reference - candidate)).sum(axis=1).mean())
        result = {"path": path, "mean_kl": round(kl, 6), "quality": round(float(np.exp(-kl)), 4),
                  "tokens": len(tokens)}
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
