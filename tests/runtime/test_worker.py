"""The worker process on its own: build info, framing, exit reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from agent.runtime.process import describe_exit
from agent.runtime.protocol import FrameReader, FrameWriter


def test_build_info_is_json_with_the_llama_cpp_build():
    out = subprocess.run(
        [sys.executable, "-m", "agent.runtime.worker", "--build-info"],
        capture_output=True, text=True, check=True,
    )
    info = json.loads(out.stdout)
    import llama_cpp

    assert info["version"] == llama_cpp.__version__
    assert isinstance(info["gpu_offload"], bool)
    assert "CPU" in info["system_info"]


def test_frames_survive_a_pipe_in_pieces():
    read_fd, write_fd = os.pipe()
    writer, reader = FrameWriter(write_fd), FrameReader(read_fd)
    big = {"op": "generate", "prompt": "x" * 200_000, "stop": ["\n"], "seed": None}
    threading.Thread(target=lambda: (writer.send(big), writer.send({"op": "stop"}), writer.close())).start()
    assert reader.receive() == big  # larger than a pipe buffer: read in several pieces
    assert reader.receive() == {"op": "stop"}
    assert reader.receive() is None


def test_exit_reasons_name_the_signal():
    assert describe_exit(-11) == "worker killed by SIGSEGV"
    assert describe_exit(-9) == "worker killed by SIGKILL"
    assert describe_exit(3) == "worker exited with status 3"


def _tiny_llama(ladder_model, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(ladder_model("Q4_K_M")), n_ctx=256, n_batch=64,
                           n_ubatch=64, n_threads=1, verbose=False, **kwargs)


def test_use_extra_bufts_reaches_the_model_params(ladder_model):
    """The first fallback rung turns off extra buffer types, which Llama() takes no argument
    for; this fails when a llama-cpp-python upgrade stops building from the default params."""
    from agent.runtime.worker import _model_params

    for wanted in (False, True):
        with _model_params(wanted):
            llama = _tiny_llama(ladder_model)
        assert bool(llama.model_params.use_extra_bufts) is wanted
        llama.close()
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts  # restored afterwards


def test_watched_sampling_counts_what_llama_cpp_python_reports(ladder_model):
    """usage and timings come from the watched sampler; this fails when an upgrade samples
    without going through Llama.sample, or samples a different number of tokens."""
    import llama_cpp

    from agent.runtime.worker import _watch_sampling

    llama = _tiny_llama(ladder_model)
    sampled: list[tuple[int, float]] = []
    _watch_sampling(llama, sampled)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    for prompt, max_tokens in (("Once upon a time", 12), ("Hello", 1)):
        sampled.clear()
        out = llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=1)
        completion = [t for t, _ in sampled if not llama_cpp.llama_vocab_is_eog(vocab, t)]
        assert len(completion) == out["usage"]["completion_tokens"] >= 1
        assert all(a[1] <= b[1] for a, b in zip(sampled, sampled[1:]))  # times in order
    llama.close()


def test_the_worker_runs_below_the_daemons_priority(tmp_path):
    """The daemon's short wake-ups (MQTT, replies, watchdog) must not wait for the worker's
    compute threads' time slices: the worker and the threads it starts run niced."""
    import psutil

    from agent.runtime.process import WorkerExit, WorkerProcess
    from agent.runtime.protocol import Load, LoadFailed
    from agent.runtime.worker import WORKER_NICE

    worker = WorkerProcess()
    try:
        worker.send(Load(settings={"model_path": str(tmp_path / "none.gguf")}))
        reply = worker.records.get(timeout=60)
        assert isinstance(reply, LoadFailed) and not isinstance(reply, WorkerExit), reply
        threads = psutil.Process(worker.pid).threads()
        expected = min(os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE, 19)
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in threads} == {expected}
    finally:
        worker.stop()
