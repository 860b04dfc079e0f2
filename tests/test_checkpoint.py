"""The streaming checkpoint I/O of lpconvert/checkpoint.py, on its own: shards written header-first, tensor by
tensor, from pieces, are the files the reference safetensors writer makes; rows are read without the rest;
shards are packed like transformers packs them. (The atomic output folder is tested in test_outputs.py.)"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lpconvert.checkpoint as checkpoint
from lpconvert.checkpoint import (
    INDEX_NAME,
    FileSlice,
    OutputTensor,
    SafetensorsFile,
    SafetensorsStore,
    TensorInfo,
    plan_shards,
    shard_file_names,
    write_index,
    write_shard,
)
from lpconvert.errors import LPError

# One key: the reference writer orders the keys of __metadata__ as a Rust HashMap iterates them, differently
# from run to run, so only with one key is its output deterministic, byte for byte.
METADATA = {"format": "pt"}


def sample_tensors() -> dict[str, torch.Tensor]:
    """A tensor of every dtype lpconvert reads, of several shapes (a scalar and an empty one included)."""
    g = torch.Generator().manual_seed(0)
    floats = {
        "f32": torch.randn(6, 5, generator=g),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "f16": torch.randn(4, 3, 2, generator=g).half(),
        "bf16": torch.randn(7, 3, generator=g).bfloat16(),
        "f8_e4m3": torch.randn(5, 4, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(9, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    ints = {
        "i64": torch.arange(-6, 6).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32),
        "i16": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
    }
    return floats | ints


def reference_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    save_file(tensors, path, metadata=metadata)
    return path.read_bytes()


def header_of(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def file_order(data: bytes) -> list[str]:
    """The tensors of a safetensors file in the order of their bytes (the reference writer sorts them)."""
    header = header_of(data)
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (compared as bytes: NaNs, float8 and scalars included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def whole(name: str, tensor: torch.Tensor) -> OutputTensor:
    return OutputTensor(name, TensorInfo(tuple(tensor.shape), tensor.dtype), lambda: iter([tensor]))


def built_from(name: str, info: TensorInfo, pieces: list) -> OutputTensor:
    return OutputTensor(name, info, lambda: iter(pieces))


# ----------------------------------------------------------------------------------------------
# A shard equals what safetensors.torch.save_file writes


@pytest.mark.parametrize("padding", range(8))
def test_shard_is_byte_for_byte_what_the_reference_writer_writes(padding, tmp_path):
    tensors = sample_tensors()
    metadata = {"format": "pt" + "x" * padding}  # every header length modulo 8: every amount of padding
    want = reference_shard(tmp_path / "reference.safetensors", tensors, metadata)
    write_shard(tmp_path / "mine.safetensors", [whole(n, tensors[n]) for n in file_order(want)], metadata)
    got = (tmp_path / "mine.safetensors").read_bytes()
    assert got == want
    (length,) = struct.unpack("<Q", got[:8])
    assert (8 + length) % 8 == 0  # the data starts 8-byte aligned
    loaded = load_file(tmp_path / "mine.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(raw(loaded[name]), raw(tensor)), name
    with safe_open(tmp_path / "mine.safetensors", "pt") as f:
        assert f.metadata() == metadata


def test_metadata_of_several_keys_differs_from_the_reference_only_in_their_order(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    metadata = {"format": "pt", "producer": "lpconvert", "lpconvert_version": "1.0"}  # as an export writes it
    want = reference_shard(tmp_path / "reference.safetensors", tensors, metadata)
    write_shard(tmp_path / "mine.safetensors", [whole(n, tensors[n]) for n in file_order(want)], metadata)
    got = (tmp_path / "mine.safetensors").read_bytes()
    assert got[:8] == want[:8]  # the same header length, so the same padding and data offsets
    assert header_of(got) == header_of(want) and header_of(got)["__metadata__"] == metadata
    start, length = len(b'{"__metadata__":{'), struct.unpack("<Q", got[:8])[0]
    assert got[8:8 + start] == want[8:8 + start]
    end = got.index(b"}", 8 + start)  # the metadata object (no braces in its values); after it, all the same
    assert got[end:] == want[end:] and end < 8 + length


def test_empty_metadata_is_written_as_the_reference_writer_writes_it(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    want = reference_shard(tmp_path / "reference.safetensors", tensors, {})
    write_shard(tmp_path / "mine.safetensors", [whole(n, tensors[n]) for n in file_order(want)], {})
    assert (tmp_path / "mine.safetensors").read_bytes() == want


def test_non_ascii_metadata_reads_back_the_same(tmp_path):
    metadata = {"format": "pt", "source": "/models/modèle-ä"}
    write_shard(tmp_path / "mine.safetensors", [whole("a", torch.ones(2))], metadata)
    with safe_open(tmp_path / "mine.safetensors", "pt") as f:
        assert f.metadata() == metadata


def test_non_ascii_metadata_is_byte_for_byte_what_the_reference_writer_writes(tmp_path):
    metadata = {"source": "/models/modèle-ä"}  # one key: the reference writer's key order varies between runs
    want = reference_shard(tmp_path / "reference.safetensors", {"a": torch.ones(2)}, metadata)
    write_shard(tmp_path / "mine.safetensors", [whole("a", torch.ones(2))], metadata)
    assert (tmp_path / "mine.safetensors").read_bytes() == want


# ----------------------------------------------------------------------------------------------
# Tensors built from pieces


@pytest.fixture
def source(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A safetensors file written by the reference writer, whose bytes pieces are copied from."""
    g = torch.Generator().manual_seed(1)
    tensors = {"big": torch.randn(8, 6, generator=g), "other": torch.randn(5, 3, generator=g).bfloat16()}
    save_file(tensors, tmp_path / "source.safetensors", metadata={"format": "pt"})
    return tmp_path / "source.safetensors", tensors


def rows_slice(path: Path, name: str, start: int, stop: int) -> FileSlice:
    """FileSlice of rows start..stop of tensor NAME in the safetensors file PATH."""
    info, begin, end = SafetensorsFile(path).entries[name]
    row_bytes = (end - begin) // info.shape[0]
    return FileSlice(path, begin + start * row_bytes, (stop - start) * row_bytes)


def test_tensor_and_file_pieces_land_in_order(source, tmp_path):
    path, tensors = source
    big = tensors["big"]
    not_contiguous = big.t().contiguous().t()  # the same values, laid out column-major
    assert not not_contiguous[3:5].is_contiguous()
    pieces = [big[0:2], rows_slice(path, "big", 2, 3), not_contiguous[3:5], rows_slice(path, "big", 5, 7),
              big[7:8].clone()]
    info = TensorInfo(tuple(big.shape), big.dtype)
    write_shard(tmp_path / "mine.safetensors", [built_from("big", info, pieces)], METADATA)
    want = reference_shard(tmp_path / "reference.safetensors", {"big": big}, METADATA)
    assert (tmp_path / "mine.safetensors").read_bytes() == want


def test_several_tensors_from_pieces_and_whole_file_copies(source, tmp_path):
    path, tensors = source
    other = tensors["other"]
    extra = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    outputs = [
        built_from("big", TensorInfo((8, 6), torch.float32), [rows_slice(path, "big", 0, 8)]),
        whole("extra", extra),
        built_from("other", TensorInfo((5, 3), torch.bfloat16),
                   [other[:1], rows_slice(path, "other", 1, 4), other[4:]]),
    ]
    write_shard(tmp_path / "mine.safetensors", outputs, METADATA)
    want = reference_shard(tmp_path / "reference.safetensors", {**tensors, "extra": extra}, METADATA)
    assert file_order(want) == ["big", "extra", "other"]  # F32 before BF16, then by name
    assert (tmp_path / "mine.safetensors").read_bytes() == want


def test_progress_is_reported_after_each_tensor_is_on_the_file(tmp_path):
    tensors = {"a": torch.ones(100), "b": torch.zeros(50), "c": torch.full((30,), 2.0)}
    path = tmp_path / "mine.safetensors"
    seen = []

    def on_tensor(t: OutputTensor) -> None:
        seen.append((t.name, path.stat().st_size))

    write_shard(path, [whole(n, t) for n, t in tensors.items()], METADATA, on_tensor=on_tensor)
    data = path.read_bytes()
    header, data_start = header_of(data), 8 + struct.unpack("<Q", data[:8])[0]
    assert [name for name, _ in seen] == ["a", "b", "c"]
    for name, size in seen:
        assert size >= data_start + header[name]["data_offsets"][1], name


# ----------------------------------------------------------------------------------------------
# Copies in the kernel (copy_file_range) and through Python give the same bytes

needs_copy_file_range = pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no os.copy_file_range")


def copied_shard(source, tmp_path, name: str) -> bytes:
    """A shard of both source tensors, each copied whole from the source file."""
    path, tensors = source
    outputs = [built_from(n, TensorInfo(tuple(t.shape), t.dtype), [rows_slice(path, n, 0, t.shape[0])])
               for n, t in tensors.items()]
    write_shard(tmp_path / name, outputs, METADATA)
    return (tmp_path / name).read_bytes()


@needs_copy_file_range
def test_file_pieces_are_copied_in_the_kernel(source, tmp_path, monkeypatch):
    real, copied = os.copy_file_range, []

    def spy(src, dst, count, offset_src=None, *args):
        n = real(src, dst, count, offset_src, *args)
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", spy)
    got = copied_shard(source, tmp_path, "kernel.safetensors")
    assert copied and sum(copied) == sum(t.numel() * t.element_size() for t in source[1].values())
    assert got == reference_shard(tmp_path / "reference.safetensors", source[1], METADATA)


@needs_copy_file_range
@pytest.mark.parametrize("code", ["EXDEV", "EINVAL", "ENOSYS", "EOPNOTSUPP"])
def test_copy_falls_back_to_python_with_the_same_bytes(code, source, tmp_path, monkeypatch):
    want = copied_shard(source, tmp_path, "kernel.safetensors")

    def refuse(*args):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert copied_shard(source, tmp_path, "python.safetensors") == want


@needs_copy_file_range
def test_fallback_after_a_partial_kernel_copy_continues_where_it_stopped(source, tmp_path, monkeypatch):
    want = copied_shard(source, tmp_path, "kernel.safetensors")
    real, calls = os.copy_file_range, []

    def partly(src, dst, count, offset_src=None, *args):  # 40 bytes, then the filesystem refuses
        calls.append(count)
        if len(calls) == 1:
            return real(src, dst, min(count, 40), offset_src, *args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", partly)
    assert copied_shard(source, tmp_path, "partial.safetensors") == want
    assert len(calls) >= 2


@needs_copy_file_range
def test_other_copy_errors_are_raised_not_hidden(source, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(OSError) as info:
        copied_shard(source, tmp_path, "mine.safetensors")
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel copy", "python copy"])
def test_file_piece_past_the_end_of_its_file_is_named_truncated(kernel, source, tmp_path, monkeypatch):
    path, _ = source
    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    if not kernel:
        monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    elif not hasattr(os, "copy_file_range"):
        pytest.skip("no os.copy_file_range")
    size = path.stat().st_size
    piece = FileSlice(path, size - 8, 16)  # 8 bytes there, 16 asked for
    with pytest.raises(LPError, match="source.safetensors ended early"):
        write_shard(tmp_path / "mine.safetensors", [built_from("x", TensorInfo((4,), torch.float32), [piece])], {})


# ----------------------------------------------------------------------------------------------
# A piece that does not match the planned tensor


@pytest.mark.parametrize("pieces, message", [
    ([torch.ones(2, 3, dtype=torch.float16)], "x: built torch.float16, planned torch.float32"),
    ([torch.ones(1, 3)], "x: built 12 bytes, planned 24"),
    ([torch.ones(2, 3), torch.ones(1, 3)], "x: built 36 bytes, planned 24"),
    ([torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bfloat16)], "x: built torch.bfloat16, planned torch.float32"),
    ([], "x: built 0 bytes, planned 24"),
], ids=["wrong dtype", "too few bytes", "too many bytes", "one piece of a wrong dtype", "no pieces"])
def test_piece_of_the_wrong_dtype_or_size_is_refused(pieces, message, tmp_path):
    with pytest.raises(RuntimeError, match=message):
        write_shard(tmp_path / "x.safetensors", [built_from("x", TensorInfo((2, 3), torch.float32), pieces)], {})


def test_file_piece_of_the_wrong_size_is_refused(source, tmp_path):
    path, _ = source
    with pytest.raises(RuntimeError, match="big: built 96 bytes, planned 192"):
        write_shard(tmp_path / "x.safetensors",
                    [built_from("big", TensorInfo((8, 6), torch.float32), [rows_slice(path, "big", 0, 4)])], {})


def test_error_while_building_a_tensor_stops_the_writer(tmp_path):
    def failing():
        yield torch.ones(1, 3)
        raise ValueError("simulated read error")

    with pytest.raises(ValueError, match="simulated read error"):
        write_shard(tmp_path / "x.safetensors", [OutputTensor("x", TensorInfo((2, 3), torch.float32), failing)], {})


# ----------------------------------------------------------------------------------------------
# Reading


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("read") / "model.safetensors"
    tensors = sample_tensors()
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_whole_tensors_read_as_the_reference_reader_reads_them(saved):
    path, tensors = saved
    file = SafetensorsFile(path)
    assert file.metadata == {"format": "pt"} and set(file.entries) == set(tensors)
    for name, tensor in tensors.items():
        got = file.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(raw(got), raw(tensor)), name


@pytest.mark.parametrize("start, stop", [(0, None), (0, 1), (2, 5), (3, 3), (4, 100), (1, None)])
def test_rows_read_equal_the_slice_of_the_full_tensor(start, stop, saved):
    path, tensors = saved
    file = SafetensorsFile(path)
    for name, tensor in tensors.items():
        if tensor.dim() == 0 or start > tensor.shape[0]:  # rows exist only from dim 1 on, and up to the last
            continue
        want = tensor[start:stop]
        got = file.read(name, start, stop)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(raw(got), raw(want)), name


def test_store_rows_and_slices_point_at_the_tensor_bytes(saved):
    path, tensors = saved
    store = SafetensorsStore(path.parent)
    data = path.read_bytes()
    assert store.paths == [path] and set(store.infos()) == set(tensors)
    for name, tensor in tensors.items():
        piece = store.slice(name)
        assert data[piece.start:piece.start + piece.length] == raw(tensor).numpy().tobytes(), name
        if tensor.dim() and tensor.shape[0] >= 3:
            assert torch.equal(raw(store.read_rows(name, 1, 3)), raw(tensor[1:3])), name


# ----------------------------------------------------------------------------------------------
# Shards: packed like transformers, named like transformers, indexed like transformers


def sized(*nbytes: int) -> list[OutputTensor]:
    """Float32 tensors of the given sizes in bytes, named t0, t1, ..."""
    return [whole(f"t{i}", torch.zeros(n // 4)) for i, n in enumerate(nbytes)]


@pytest.mark.parametrize("sizes, limit, groups", [
    ((40, 40, 40), 1000, [[0, 1, 2]]),  # all fit: one shard
    ((40, 40, 40), 80, [[0, 1], [2]]),  # exactly at the limit still fits
    ((40, 44, 40, 4), 80, [[0], [1], [2, 3]]),  # greedy in order: t2 and t3 fill the third shard
    ((200, 40, 40), 80, [[0], [1, 2]]),  # larger than the limit: its own shard
    ((40, 200, 40), 80, [[0], [1], [2]]),
    ((200, 200), 80, [[0], [1]]),
    ((), 80, [[]]),
])
def test_shards_are_packed_greedily_and_a_tensor_above_the_limit_gets_its_own(sizes, limit, groups):
    tensors = sized(*sizes)
    shards = plan_shards(tensors, limit)
    assert [[int(t.name[1:]) for t in shard] for shard in shards] == groups
    assert [t for shard in shards for t in shard] == tensors  # the order is kept
    for shard in shards:
        assert len(shard) == 1 or sum(t.info.nbytes for t in shard) <= limit


@pytest.mark.parametrize("sizes, limit", [((40, 40, 40), 1000), ((40, 40, 40), 80), ((40, 44, 40, 4), 80),
                                          ((12,) * 20, 50), ((200, 40, 40), 80)])
def test_shards_and_their_names_are_those_transformers_would_write(sizes, limit):
    """save_pretrained splits with huggingface_hub; where no tensor but the first is above the limit, the
    shards are the same. (Above the limit later on, huggingface_hub puts it in its own shard but keeps
    filling the shard before it, so its grouping differs; each tensor is alone there too.)"""
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = sized(*sizes)
    shards = plan_shards(tensors, limit)
    mine = {name: [t.name for t in shard] for shard, name in zip(shards, shard_file_names(len(shards)), strict=True)}
    split = split_torch_state_dict_into_shards({t.name: next(t.build()) for t in tensors}, max_shard_size=limit)
    assert mine == {name: list(names) for name, names in split.filename_to_tensors.items()}


def test_sharded_checkpoint_and_index_load_like_a_transformers_one(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {f"model.layers.{i}.weight": torch.randn(10, 10, generator=g) for i in range(5)}
    outputs = [whole(name, tensor) for name, tensor in sorted(tensors.items())]
    shards = plan_shards(outputs, 1000)  # 400 bytes each: two per shard
    names = shard_file_names(len(shards))
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    for shard, name in zip(shards, names, strict=True):
        write_shard(tmp_path / name, shard, METADATA)
        reference = {t.name: tensors[t.name] for t in shard}
        assert (tmp_path / name).read_bytes() == reference_shard(tmp_path / "reference", reference, METADATA)
    write_index(tmp_path, shards, names, {"producer": "lpconvert"})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 5 * 400, "producer": "lpconvert"}
    assert set(index["weight_map"]) == set(tensors)
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / file)[name], tensors[name])
    store = SafetensorsStore(tmp_path)  # lpconvert reads it back through the index, as transformers would
    assert {n: torch.equal(store.read(n), t) for n, t in tensors.items()} == dict.fromkeys(tensors, True)


def test_one_shard_is_model_safetensors():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert checkpoint.dtype_size(torch.bfloat16) == 2 and checkpoint.tensor_nbytes((3, 4), torch.float16) == 24
