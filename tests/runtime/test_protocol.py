"""The engine-worker pipe protocol: frames survive however the pipe splits or joins them."""

from __future__ import annotations

import os
import struct
import threading

import msgspec
import pytest

from agent.runtime.protocol import (
    MAX_FRAME_BYTES,
    Chunk,
    Final,
    FrameReader,
    FrameWriter,
    FromWorker,
    ProtocolError,
)


def test_frames_joined_in_one_write_come_out_one_by_one():
    read_fd, write_fd = os.pipe()
    frames = [Chunk(id="r", seq=n, delta=f" {n}") for n in range(50)] + [Final(id="r", text="t")]
    # What one read of many small frames looks like to the reader.
    os.write(write_fd, b"".join(_framed(frame) for frame in frames))
    os.close(write_fd)
    reader = FrameReader(read_fd, FromWorker)
    assert [reader.receive() for _ in frames] == frames
    assert reader.receive() is None
    reader.close()


def test_a_frame_written_a_byte_at_a_time_and_one_bigger_than_the_pipe():
    read_fd, write_fd = os.pipe()
    big = Chunk(id="big", seq=0, delta="x" * (1 << 20))  # 16 pipe buffers
    small = Chunk(id="small", seq=1, delta="y")
    framed = _framed(small)

    def write() -> None:
        for byte in framed:
            os.write(write_fd, bytes((byte,)))
        FrameWriter(write_fd).send(big)
        os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    reader = FrameReader(read_fd, FromWorker)
    assert reader.receive() == small
    assert reader.receive() == big
    assert reader.receive() is None
    writer.join()
    reader.close()


def test_end_of_file_inside_a_frame_is_the_end_and_a_huge_header_an_error():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, _framed(Chunk(id="r", seq=0, delta="cut"))[:-2])
    os.close(write_fd)
    assert FrameReader(read_fd, FromWorker).receive() is None
    os.close(read_fd)

    read_fd, write_fd = os.pipe()
    os.write(write_fd, struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameReader(read_fd, FromWorker).receive()
    os.close(read_fd)
    os.close(write_fd)


def _framed(frame) -> bytes:
    body = msgspec.msgpack.encode(frame)
    return struct.pack(">I", len(body)) + body
