"""Checkpoint I/O that streams: lazy tensor reading, shard planning, streaming shard writing, and an
atomic output folder.

Memory stays bounded by the largest single output tensor whatever the model size: tensors are read
with plain file reads at the offsets of the safetensors header (no mmap whose pages would pile up
in RSS), and shards are written header-first (every shape is known before a byte is written), then
tensor after tensor, so no shard is ever held in memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LPError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# The dtypes a user may ask for by name (--dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str, extra: tuple[str, ...] = ()) -> torch.dtype:
    if name not in DTYPES:
        raise LPError(f"--dtype '{name}' does not exist", f"use one of {', '.join((*extra, *DTYPES))}")
    return DTYPES[name]
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
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        self._parse_header()

    def _corrupt(self, why: str) -> LPError:
        return LPError(f"{self.path.name} is not a valid safetensors file: {why}",
                       "re-download or re-save the checkpoint")

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
            if end - begin != info.nbytes or data_start + end > size:
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
        with open(self.path, "rb") as f:
            f.seek(begin + start * row_bytes)
            if f.readinto(buffer.numpy()) != count:
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


class SafetensorsStore(TensorStore):
    """A Hugging Face folder of safetensors: one file, or shards named by model.safetensors.index.json."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._where: dict[str, SafetensorsFile] = {}
        for file in self._files():
            for name in file.entries:
                self._where[name] = file
        self._infos = {name: file.entries[name][0] for name, file in self._where.items()}

    def _files(self) -> list[SafetensorsFile]:
        index = self.folder / INDEX_NAME
        if not index.exists():
            files = sorted(self.folder.glob("*.safetensors"))
            return [SafetensorsFile(p) for p in files]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LPError(f"{index} is not a valid safetensors index", "re-download the checkpoint") from None
        root = self.folder.resolve()
        shard_names = sorted(set(weight_map.values()))
        files = {}
        for shard in shard_names:
            path = (self.folder / shard).resolve()
            if root not in path.parents:
                raise LPError(f"{INDEX_NAME} names a shard outside the model folder: {shard}",
                              "refusing to read it; fix the index")
            if not path.exists():
                raise LPError(f"{INDEX_NAME} names a missing shard: {shard}", "re-download the checkpoint")
            files[shard] = SafetensorsFile(path)
        for name, shard in weight_map.items():
            if name not in files[shard].entries:
                raise LPError(f"tensor {name} is missing from {shard} although the index names it",
                              "re-download the checkpoint")
        return list(files.values())

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
    raw = json.dumps(header, separators=(",", ":")).encode()
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


# ----------------------------------------------------------------------------------------------
# Atomic output folder


def check_output_path(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LPError(f"output path {out} exists and is a file", "choose a folder path")
    if out.exists() and not overwrite:
        raise LPError(f"output folder {out} already exists", "pass --overwrite or choose another path")
    parent = out.resolve().parent
    if not parent.exists():
        raise LPError(f"the parent folder of {out} does not exist", f"create {parent} first")
    if not os.access(parent, os.W_OK):
        raise LPError(f"cannot write into {parent}", "choose a writable output path")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; rename it to OUT only if the block succeeds.

    SIGTERM is turned into KeyboardInterrupt meanwhile, so an interrupted export (Ctrl-C or a CI
    timeout) removes the temporary folder and leaves OUT as it was.
    """
    out = Path(out)
    check_output_path(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lpconvert-tmp-", dir=out.resolve().parent))

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.lpconvert-old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == 28:  # ENOSPC
            raise LPError(f"disk full while writing {out}; nothing was left behind",
                          "free space or choose another output path") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
