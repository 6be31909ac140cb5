"""safetensors files, read and written through the safetensors library (spec/io.md IO-2, IO-3).

Layout (IO-2): 8 bytes N (unsigned 64-bit little endian), then N bytes of UTF-8 JSON starting
with "{" and padded with spaces to a multiple of 8, then the data section. The JSON maps each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets counted from the start
of the data section; the optional "__metadata__" maps str to str. The ranges tile the data section
exactly: sorted by offset they start at 0, each begins where the previous ended, the last ends at
the end of the file, and end - begin = prod(shape) * itemsize. Data is little endian, row-major.

Files come from strangers, so the reader trusts nothing (IO-3): every number in the header is
checked against the file size before any memory is allocated, and every problem is a
CheckpointError naming the file, the key and what to do. Nothing is ever unpickled (IO-4).

BF16 has no NumPy dtype: it is read into float32 arrays holding the bf16 values exactly, and
written from float32 (nearest-even rounding) when asked with dtypes={name: "BF16"} (BACKEND-5).

What is ours and why: the library writes every file (layout, order, padding) and reads every
tensor but BF16, which its NumPy loader refuses (NumPy has no bfloat16; we read those bytes
ourselves). The header is checked here before the library sees the file, because the library's
errors name neither the key nor the remedy and some of its checks come after allocating.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
import safetensors
from safetensors import TensorSpec, safe_open, serialize_file

from .backend import bf16_bits_from_float32, float32_from_bf16_bits, to_host
from .errors import CheckpointError, ConfigError
from .fileio import atomic_path

MAX_HEADER = 100_000_000  # bytes; the safetensors reference rejects larger headers too
MAX_NDIM = 64  # NumPy's limit
# code -> NumPy storage dtype (little endian)
DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "BF16": "<u2", "I32": "<i4", "U32": "<u4", "F32": "<f4", "F64": "<f8", "I64": "<i8",
    "U64": "<u8",
}
_CODE_OF = {np.dtype(v).newbyteorder("<"): k for k, v in DTYPES.items() if k != "BF16"}
_FIX = "the file is damaged or was not written by a safetensors writer; download or save it again"


class TensorInfo(NamedTuple):
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


def _bad(path, key, problem, fix=_FIX) -> CheckpointError:
    """The error for a bad file: which file, which key (None: the header itself), what, what to do."""
    where = "header" if key is None else f"key {key!r}"
    return CheckpointError(f"{path}: {where}: {problem}; {fix}")


# ---- reading ------------------------------------------------------------------------------
def _no_duplicates(path):
    def hook(pairs):
        obj = {}
        for k, v in pairs:
            if k in obj:
                raise _bad(path, k, "duplicate key in the JSON header (the format forbids it)")
            obj[k] = v
        return obj
    return hook


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _parse_json(path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, None, f"header is not UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise _bad(path, None, f"header must start with '{{', starts with {text[:20]!r}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates(path), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, deep nesting
        raise _bad(path, None, f"header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise _bad(path, None, f"header must be a JSON object, got {type(obj).__name__}")
    return obj


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate, as the JSON escape "\\ud800" gives
        return False


def _utf8_key(path, key) -> str:
    if not _valid_unicode(key):
        raise _bad(path, key, "string holds a lone surrogate escape, not valid Unicode")
    return key


def _nbytes(path, key, shape, itemsize, limit) -> int:
    """prod(shape) * itemsize, stopping early once it exceeds `limit` (so no giant integers)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            raise _bad(path, key, f"shape {list(shape)[:8]} needs more bytes than the file holds ({limit})")
    return n


def _check_entry(path, key, entry, data_len) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, key, f"entry must be an object, got {type(entry).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise _bad(path, key, f"entry has no {field!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _bad(path, key, f"unknown or unsupported dtype {str(code)[:40]!r} (supported: {', '.join(DTYPES)})",
                   "convert the file to one of the supported dtypes")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, key, f"shape must be a list of non-negative integers, got {str(shape)[:80]}")
    if len(shape) > MAX_NDIM:
        raise _bad(path, key, f"shape has {len(shape)} dimensions, NumPy allows at most {MAX_NDIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad(path, key, f"data_offsets must be [begin, end] integers, got {str(offsets)[:80]}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _bad(path, key, f"data_offsets {offsets} lie outside the data section [0, {data_len}]")
    nbytes = _nbytes(path, key, shape, np.dtype(DTYPES[code]).itemsize, data_len)
    if end - begin != nbytes:
        raise _bad(path, key, f"data_offsets {offsets} hold {end - begin} bytes but {code} "
                              f"shape {shape} needs {nbytes}")
    return TensorInfo(code, tuple(shape), begin, end)


def _check_metadata(path, meta) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise _bad(path, "__metadata__", f"must be an object of strings, got {type(meta).__name__}")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise _bad(path, f"__metadata__.{k}", f"metadata values must be strings, got {type(v).__name__}")
        _utf8_key(path, k), _utf8_key(path, v)
    return meta


def _read_checked_header(f, path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate the header of the open file f; returns (infos, metadata, data start)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise _bad(path, None, f"file has {size} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER:
        raise _bad(path, None, f"header length {n} is over the {MAX_HEADER}-byte limit")
    if 8 + n > size:
        raise _bad(path, None, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, None, "file shrank while being read")
    header = _parse_json(path, raw)
    data_len = size - 8 - n
    metadata = _check_metadata(path, header.pop("__metadata__", {}))
    infos = {_utf8_key(path, k): _check_entry(path, k, v, data_len) for k, v in header.items()}
    position = 0  # the ranges, sorted, must tile [0, data_len): no gap, no overlap, no tail
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise _bad(path, key, f"data_offsets [{info.begin}, {info.end}] {what} (expected begin {position})")
        position = info.end
    if position != data_len:
        raise _bad(path, None, f"tensors cover {position} bytes of the {data_len}-byte data section; "
                               "the format forbids unindexed bytes")
    return infos, metadata, 8 + n


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names, dtypes, shapes and offsets of the tensors, plus metadata; no tensor data is read.
    The whole header is validated (IO-3), including that it fits the file size."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            infos, metadata, _ = _read_checked_header(f, path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e}); check the path and permissions") from e
    return infos, metadata


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as NumPy arrays (BF16 as float32), and its metadata."""
    path = os.fspath(path)
    tensors = {}
    try:
        with open(path, "rb") as f:
            infos, metadata, start = _read_checked_header(f, path)
            with safe_open(path, framework="numpy") as lib:
                for key, info in infos.items():
                    if info.dtype == "BF16":  # the library's NumPy loader has no bfloat16
                        tensors[key] = float32_from_bf16_bits(_read_bytes(f, path, key, start, info)
                                                              .view(DTYPES["BF16"]).reshape(info.shape))
                    else:
                        tensors[key] = _checked(path, key, info, lib.get_tensor(key))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e}); check the path and permissions") from e
    except safetensors.SafetensorError as e:  # changed since the header was checked
        raise _bad(path, None, f"the safetensors library refuses it ({e})") from None
    return tensors, metadata  # header order


class TensorFile:
    """One safetensors file read a tensor at a time: the header is validated once (IO-3), then `get(key)`
    maps only that tensor's bytes (np.memmap, read-only), so a reader holds the tensors it keeps, not
    the file. F32/F16/F64 come back as views of the mapping, BF16 as float32 copies (BACKEND-5)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                self.infos, self.metadata, self.start = _read_checked_header(f, self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the file ({e}); check the path and permissions") from e

    def get(self, key: str) -> np.ndarray:
        info = self.infos[key]
        dt = DTYPES[info.dtype]
        if info.end == info.begin:  # np.memmap cannot map zero bytes
            return np.zeros(info.shape, np.float32 if info.dtype == "BF16" else dt)
        a = np.memmap(self.path, dtype=dt, mode="r", offset=self.start + info.begin, shape=info.shape)
        return float32_from_bf16_bits(np.asarray(a)) if info.dtype == "BF16" else _checked(self.path, key, info, a)

    def read_flat(self, key: str, start: int, count: int) -> np.ndarray:
        """Values start .. start + count - 1 of the tensor in C order (fewer at its end), read from the file into an
        array of their own (BF16 as float32): a reader that goes through a large tensor this way holds one range,
        where a mapping would keep every page it touched resident."""
        info = self.infos[key]
        dt = np.dtype(DTYPES[info.dtype])
        n = (info.end - info.begin) // dt.itemsize
        start, count = min(max(start, 0), n), max(0, min(count, n - start))
        with open(self.path, "rb") as f:
            f.seek(self.start + info.begin + start * dt.itemsize)
            a = np.fromfile(f, dtype=dt, count=count)
        if a.size != count:
            raise _bad(self.path, key, "file shrank while being read")
        return float32_from_bf16_bits(a) if info.dtype == "BF16" else a


def _read_bytes(f, path, key, start, info: TensorInfo) -> np.ndarray:
    buf = np.empty(info.end - info.begin, np.uint8)  # a validated size, within the file
    f.seek(start + info.begin)
    view, got = memoryview(buf), 0
    while got < buf.size:  # one read() returns at most ~2 GiB on Linux
        k = f.readinto(view[got:])
        if not k:
            raise _bad(path, key, "file shrank while being read")
        got += k
    return buf


def _checked(path, key, info: TensorInfo, a: np.ndarray) -> np.ndarray:
    if tuple(a.shape) != info.shape or a.dtype.newbyteorder("<") != np.dtype(DTYPES[info.dtype]):
        raise _bad(path, key, f"the file changed while being read ({a.dtype} {a.shape} read, {info} checked)")
    if info.dtype == "BOOL" and a.size and a.view(np.uint8).max() > 1:
        raise _bad(path, key, "BOOL tensor holds bytes other than 0 and 1")
    return a


# ---- writing ------------------------------------------------------------------------------
def _encode(name, a, code) -> tuple[str, np.ndarray]:
    """The safetensors code and the little-endian, C-ordered array to store."""
    a = np.asarray(to_host(a))
    if code == "BF16":
        if a.dtype.kind != "f":
            raise ConfigError(f"tensor {name!r}: BF16 needs a float array, got {a.dtype}")
        return code, bf16_bits_from_float32(a.astype(np.float32)).astype("<u2", order="C", copy=False)
    if code is not None:
        if code not in DTYPES:
            raise ConfigError(f"tensor {name!r}: unknown dtype {code!r}; choose one of {', '.join(DTYPES)}")
        a = a.astype(DTYPES[code])
    dt = a.dtype.newbyteorder("<")
    if dt not in _CODE_OF:
        raise ConfigError(f"tensor {name!r}: NumPy dtype {a.dtype} has no safetensors code; "
                          f"cast it to one of {', '.join(sorted(set(_CODE_OF.values())))}")
    return _CODE_OF[dt], a.astype(dt, order="C", copy=False)  # keeps 0-d arrays 0-d


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None,
                      dtypes: dict[str, str] | None = None) -> None:
    """Write tensors (NumPy, or any backend's arrays) atomically (IO-1) with the safetensors
    library (IO-2). dtypes={name: "BF16"} stores that float array as bfloat16 (rounded to nearest
    even); any other code casts with NumPy's astype."""
    dtypes = dtypes or {}
    unknown = set(dtypes) - set(tensors)
    if unknown:
        raise ConfigError(f"dtypes names tensors that are not given: {sorted(unknown)[:5]}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ConfigError("metadata must map str to str (safetensors stores text only)")
    encoded = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__" or not _valid_unicode(name):
            raise ConfigError(f"tensor name {name!r} is not allowed; use a string other than '__metadata__'")
        encoded[name] = _encode(name, a, dtypes.get(name))
    specs = {name: TensorSpec(dtype=_LIBRARY_DTYPE[code], shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
             for name, (code, a) in encoded.items()}  # `encoded` keeps the arrays alive meanwhile
    with atomic_path(path) as tmp:
        serialize_file(specs, tmp, metadata=metadata)


# the library's dtype names (NumPy's, and "bfloat16" for the raw bits) of each safetensors code
_LIBRARY_DTYPE = {code: ("bfloat16" if code == "BF16" else "bool" if code == "BOOL" else np.dtype(v).name)
                  for code, v in DTYPES.items()}
