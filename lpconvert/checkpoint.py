"""Checkpoint I/O that streams: lazy tensor reading, shard planning and streaming shard writing (the
atomic output folder they are written into is in outputs.py).

Memory stays bounded by the largest single output tensor whatever the model size: tensors are read
with plain file reads at the offsets of the safetensors header (no mmap whose pages would pile up
in RSS), and shards are written header-first (every shape is known before a byte is written), then
tensor after tensor, so no shard is ever held in memory.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .errors import LPError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype_size(dtype)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


# ----------------------------------------------------------------------------------------------
# Reading


class SafetensorsFile:
    """One .safetensors file: header parsed once, each tensor read on demand with a plain read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        try:
            self._parse_header()
        except OSError as exc:
            raise self._unreadable(exc) from None

    def _read_into(self, buffer, offset: int) -> int:
        """Fill `buffer` from `offset`. The file is opened once and read with pread where the OS has it: a streamed
        model reads a layer's tensors from its shard without opening the file (a Hub cache's link) per tensor."""
        if not hasattr(os, "preadv"):
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.readinto(buffer)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done, view = 0, memoryview(buffer).cast("B")
        while done < len(view):  # pread may return less than asked for a large read
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                break
            done += got
        return done

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _corrupt(self, why: str) -> LPError:
        return LPError(f"{self.path.name} is not a valid safetensors file: {why}",
                       "re-download or re-save the checkpoint")

    def _unreadable(self, exc: OSError) -> LPError:
        # In a Hugging Face cache the file is a link into blobs/, and a cleaned or partial cache
        # leaves the link without its blob.
        if self.path.is_symlink() and not self.path.exists():
            return LPError(f"{self.path.name} is a broken symlink (its target {os.readlink(self.path)} is missing)",
                           "re-download the checkpoint")
        return LPError(f"cannot read {self.path}: {exc.strerror or exc}",
                       "check the file's permissions, or re-download the checkpoint")

    def _parse_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise self._corrupt("file too short for a header")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise self._corrupt("header length beyond the end of the file")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise self._corrupt(f"header is not JSON ({exc.__class__.__name__})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad header entry for {name}") from None
            info = TensorInfo(shape, dtype)
            # Two different faults: a header that contradicts itself was written wrong (or edited);
            # only data that would lie past the end of an otherwise consistent header means truncation.
            if begin < 0 or end - begin != info.nbytes:
                raise self._corrupt(f"the header's shape and data offsets disagree for tensor {name} "
                                    f"(shape {list(shape)} of {entry['dtype']} is {info.nbytes} bytes, "
                                    f"offsets {begin}..{end} span {end - begin})")
            if data_start + end > size:
                raise self._corrupt(f"tensor {name} runs past the end of the file (truncated?)")
            self.entries[name] = (info, data_start + begin, data_start + end)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or only its rows start..stop (rows are contiguous bytes in the file)."""
        info, begin, end = self.entries[name]
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else min(stop, rows)
        row_bytes = (end - begin) // rows if rows else 0
        count = (stop - start) * row_bytes
        buffer = torch.empty(count, dtype=torch.uint8)
        if self._read_into(buffer.numpy(), begin + start * row_bytes) != count:
            raise self._corrupt(f"tensor {name} is truncated")
        shape = info.shape if (start, stop) == (0, rows) else (stop - start, *info.shape[1:])
        return buffer.view(info.dtype).reshape(shape)


@dataclass(frozen=True)
class FileSlice:
    """Bytes of a source file that go to the output unchanged: copied in the kernel, never through Python."""

    path: Path
    start: int
    length: int


class TensorStore:
    """Named tensors of a source checkpoint, read one at a time."""

    def slice(self, name: str) -> FileSlice | None:
        """Where the tensor's bytes lie on disk, when they do (so an unchanged copy needs no read)."""
        return None

    def infos(self) -> Mapping[str, TensorInfo]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of a tensor, without reading the rest where the store allows it."""
        return self.read(name)[start:stop]

    def __contains__(self, name: str) -> bool:
        return name in self.infos()

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos().values())

    def main_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding most of the weights (by element count)."""
        counts: dict[torch.dtype, int] = {}
        for info in self.infos().values():
            if info.dtype.is_floating_point:
                counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
        return max(counts, key=counts.get) if counts else None


def shard_path(folder: Path, shard: object, index_name: str) -> Path:
    """FOLDER/SHARD for a shard name read from a checkpoint index, refusing names that leave the folder.

    The name is checked as text and the path is then opened as it is, links followed: in a Hugging
    Face cache every file of a snapshot is a symlink into ../../blobs/, so resolving the path and
    asking whether it stays in the folder would refuse every sharded Hub model. What the index must
    not do is climb out by itself: '..' components, an absolute path, a Windows drive or separator.
    """
    if not isinstance(shard, str):
        raise LPError(f"{index_name} names a shard that is not a file name: {shard!r}",
                      "re-download the checkpoint")
    if (not shard or "\\" in shard or "\x00" in shard or shard.startswith("/")
            or re.match(r"[A-Za-z]:", shard) or ".." in PurePosixPath(shard).parts):
        raise LPError(f"{index_name} names a shard outside the model folder: {_shown(shard)}",
                      "refusing to read it; fix the index")
    path = folder / shard
    if not path.is_file():  # a dangling cache link too: the blob was deleted or never arrived
        raise LPError(f"{index_name} names a missing shard: {_shown(shard)}", "re-download the checkpoint")
    return path


def _shown(name: str) -> str:
    """A name from a file, quoted when it holds what would break the one-line message (or is empty)."""
    return name if name and name.isprintable() else repr(name)


class SafetensorsStore(TensorStore):
    """A Hugging Face folder of safetensors: one file, or shards named by model.safetensors.index.json."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._where: dict[str, SafetensorsFile] = {}
        files = self._files()
        self.paths = [file.path for file in files]  # the weight files, as opened (links not resolved)
        for file in files:
            for name in file.entries:
                self._where[name] = file
        self._infos = {name: file.entries[name][0] for name, file in self._where.items()}

    def _files(self) -> list[SafetensorsFile]:
        index = self.folder / INDEX_NAME
        if not index.exists():
            files = sorted(self.folder.glob("*.safetensors"))
            return [SafetensorsFile(p) for p in files]
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise LPError(f"{index} is not a valid safetensors index", "re-download the checkpoint") from None
        files: dict[str, SafetensorsFile] = {}
        for shard in weight_map.values():
            path = shard_path(self.folder, shard, INDEX_NAME)
            if shard not in files:
                files[shard] = SafetensorsFile(path)
        for name, shard in weight_map.items():
            if name not in files[shard].entries:
                raise LPError(f"tensor {name} is missing from {shard} although the index names it",
                              "re-download the checkpoint")
        return [files[shard] for shard in sorted(files)]

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._where[name].read(name, start, stop)

    def slice(self, name: str) -> FileSlice:
        file = self._where[name]
        _, begin, end = file.entries[name]
        return FileSlice(file.path, begin, end - begin)


class MemoryStore(TensorStore):
    """Tensors already in memory (a GGUF or .bin source, or a model built in memory)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)
        self._infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in self._tensors.items()}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class OutputTensor:
    """A tensor of the exported checkpoint: known shape and dtype, built only when written.

    `build` yields pieces whose bytes, concatenated, are the tensor in row-major order (a
    concatenation along dim 0 never needs to be materialised): tensors, or FileSlices of bytes
    that are copied unchanged.
    """

    name: str
    info: TensorInfo
    build: Callable[[], Iterator[torch.Tensor | FileSlice]]
    origin: str = ""  # where its values come from when not the source ("heal file X"), for messages


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy in-order packing, like transformers: a tensor larger than the limit gets its own shard."""
    shards: list[list[OutputTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if shards[-1] and filled + tensor.info.nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += tensor.info.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_CODES[t.info.dtype], "shape": list(t.info.shape),
                          "data_offsets": [offset, offset + t.info.nbytes]}
        offset += t.info.nbytes
    # UTF-8 as the reference writer writes it (not \uXXXX escapes): a source path in the metadata may not be ASCII
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, tensors: list[OutputTensor], metadata: dict[str, str],
                on_tensor: Callable[[OutputTensor], None] | None = None) -> None:
    """Write one shard header-first, then each tensor's pieces as they are built.

    A writer thread takes the pieces in order, so reading and folding the next piece overlaps with
    writing this one; the queue is short, so memory stays at a few pieces.
    """
    # Unbuffered, so kernel-side copies (copy_file_range) and Python writes share one file offset.
    with open(path, "wb", buffering=0) as f, _OrderedWriter(f) as writer:
        writer.put(_header_bytes(tensors, metadata))
        for t in tensors:
            written = 0
            for piece in t.build():
                if isinstance(piece, FileSlice):
                    written += piece.length
                else:
                    if piece.dtype != t.info.dtype:
                        raise RuntimeError(f"{t.name}: built {piece.dtype}, planned {t.info.dtype}")
                    written += piece.numel() * piece.element_size()
                writer.put(piece)
            if written != t.info.nbytes:
                raise RuntimeError(f"{t.name}: built {written} bytes, planned {t.info.nbytes}")
            if on_tensor:
                writer.put(functools.partial(on_tensor, t))


class _OrderedWriter:
    """Writes pieces (bytes, tensors, FileSlices; callables are progress callbacks) on a thread, in order."""

    def __init__(self, f, depth: int = 3):
        self.f = f
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, piece) -> None:
        while self.thread.is_alive():
            try:
                self.queue.put(piece, timeout=0.2)
                return
            except queue.Full:
                continue
        self._raise()

    def _run(self) -> None:
        try:
            while (piece := self.queue.get()) is not None:
                if self.error is None:
                    self._write(piece)
        except BaseException as exc:  # re-raised in the main thread
            self.error = exc
            while self.queue.get() is not None:  # drain so the producer never blocks
                pass

    def _write(self, piece) -> None:
        if isinstance(piece, FileSlice):
            _copy_slice(piece, self.f)
        elif isinstance(piece, bytes):
            _write_all(self.f, memoryview(piece))
        elif callable(piece):
            piece()
        else:
            _write_all(self.f, memoryview(piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
        self.thread.join()
        if exc_type is None:
            self._raise()


def _write_all(f, data: memoryview) -> int:
    done = 0
    while done < len(data):
        done += f.write(data[done:])
    return done


def _copy_slice(piece: FileSlice, out) -> int:
    with open(piece.path, "rb", buffering=0) as src:
        done = 0
        try:
            while done < piece.length:
                n = os.copy_file_range(src.fileno(), out.fileno(), piece.length - done, piece.start + done)
                if n == 0:
                    raise LPError(f"{piece.path.name} ended early (truncated?)", "re-download the checkpoint")
                done += n
        except OSError as exc:
            if exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: copy through Python
                raise
            src.seek(piece.start + done)
            while done < piece.length:
                chunk = src.read(min(64 << 20, piece.length - done))
                if not chunk:
                    raise LPError(f"{piece.path.name} ended early (truncated?)", "re-download the checkpoint") from None
                done += _write_all(out, memoryview(chunk))
        return done


def write_index(folder: Path, shards: list[list[OutputTensor]], names: list[str], metadata: dict) -> None:
    weight_map = {t.name: file for shard, file in zip(shards, names, strict=True) for t in shard}
    total = sum(t.info.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
