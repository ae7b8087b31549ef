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
