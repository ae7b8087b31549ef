"""Real llama.cpp split GGUF files made from a ladder variant, with gguf-py's own writer.

gguf-py's ``GGUFWriter(split_max_tensors=…)`` writes the parts as llama.cpp's gguf-split
does: ``<name>-00001-of-0000N.gguf`` …, the metadata in the first part, and ``split.no``,
``split.count`` and ``split.tensors.count`` in each. Every key and tensor is copied from the
source file byte for byte, so the split is the same model: llama.cpp loads it from the first
part and answers as it does from the whole file.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import gguf
import pytest

SPLIT_QUANT = "Q3_K_M"  # a small ladder variant: quick to copy, fetch and load
SPLIT_PARTS = 3

_made: dict[tuple[Path, int, Path], list[Path]] = {}


def write_split(source: Path, out_dir: Path, parts: int) -> list[Path]:
    """Split ``source`` into ``parts`` files named after its stem in ``out_dir``; returns
    the parts in order. Tensors are spread by count, so every part holds some."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    per_part = math.ceil(len(reader.tensors) / parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_dir / source.name, arch, split_max_tensors=per_part)
    for field in reader.fields.values():
        # The writer adds the architecture itself; GGUF.* are the reader's virtual fields.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                               tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    stem = source.name.removesuffix(".gguf")
    written = [out_dir / f"{stem}-{n:05d}-of-{parts:05d}.gguf" for n in range(1, parts + 1)]
    assert all(path.is_file() for path in written), sorted(out_dir.iterdir())
    return written


def split_once(source: Path, cache_dir: Path, parts: int) -> list[Path]:
    """``write_split`` into ``cache_dir/<parts>`` once per session (a session fixture's
    directory): every test that asks again gets the same files."""
    key = (source, parts, cache_dir)
    if key not in _made:
        out_dir = cache_dir / f"{source.stem}.{parts}"
        shutil.rmtree(out_dir, ignore_errors=True)
        _made[key] = write_split(source, out_dir, parts)
    return _made[key]


def copy_parts(parts: list[Path], folder: Path) -> list[Path]:
    """Hard links of ``parts`` in ``folder`` (a test may delete or serve them there)."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for part in parts:
        target = folder / part.name
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(part)
        except OSError:
            shutil.copyfile(part, target)
        copied.append(target)
    return copied


@pytest.fixture(scope="session", name="ladder_split")
def ladder_split_fixture(tmp_path_factory: pytest.TempPathFactory,
                         ladder_dir: Path) -> list[Path]:
    """``ladder_split``: the ladder's SPLIT_QUANT variant as SPLIT_PARTS real split files
    (import ladder_split_fixture into a test module to use it; written once per session)."""
    source = ladder_dir / f"smollm2-135m-instruct.{SPLIT_QUANT}.gguf"
    return split_once(source, tmp_path_factory.getbasetemp() / "splits", SPLIT_PARTS)
