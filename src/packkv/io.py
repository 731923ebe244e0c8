"""Save and load a packed cache (every layer) as one file; docs/format.md, "On disk".

The file is a safetensors file: an 8-byte little-endian header length, a JSON header (the
tensor table plus ``__metadata__``), then the tensor bytes. ``__metadata__`` holds the
packkv header, a JSON string (format version, packkv version, model fingerprint, per
layer: config, dtype, encoding attributes and tensor shapes, and a SHA-256 of the tensor
bytes), and the SHA-256 of that string. Loading trusts nothing: it checks sizes against
the file size before reading, both checksums, every header field, and validates every
layer (:func:`validate_packed`) before returning it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import safetensors.numpy
import safetensors.torch
import torch

from .codec.format import PackedKV, PackedTensor
from .codec.quantize import level_bits
from .codec.validate import TENSOR_FIELDS, validate_packed
from .config import PackKVConfig
from .errors import CorruptDataError, FormatVersionError, ModelMismatchError

FORMAT_NAME = "packkv-kv-cache"
FORMAT_VERSION = 1
# Keys of safetensors' __metadata__ (string to string); every format version keeps both,
# so a reader verifies the header before it reads the version.
HEADER_KEY = "packkv.header"
HEADER_SHA256_KEY = "packkv.header_sha256"
# safetensors refuses headers above 100 MB; a larger length is corrupt, not a big file.
MAX_HEADER_BYTES = 100_000_000
LENGTH_BYTES = 8

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS_DTYPES = {torch.int32: "I32", torch.uint8: "U8", torch.float16: "F16"}
SIDE_ATTRS = ("grouping", "block_size", "pack_size", "min_bits")
TAILS = ("k_tail", "v_tail")


def _tensor_name(layer: int, side: str, field: str | None = None) -> str:
    return f"layers.{layer}.{side}" + (f".{field}" if field else "")


def _expected_dtype(name: str) -> torch.dtype:
    """The dtype of tensor ``name`` (``layers.i.k.words``, ``layers.i.k_tail``, ...)."""
    field = name.rsplit(".", 1)[-1]
    return torch.float16 if field in TAILS else TENSOR_FIELDS[field][0]


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in sorted name order: name, a zero byte, its raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _layer_tensors(i: int, kv: PackedKV) -> dict[str, torch.Tensor]:
    out = {_tensor_name(i, tail): getattr(kv, tail) for tail in TAILS}
    for side in ("k", "v"):
        for field, t in getattr(kv, side).tensors().items():
            out[_tensor_name(i, side, field)] = t
    return {name: t.detach().to("cpu").contiguous() for name, t in out.items()}


def _layer_header(kv: PackedKV, tensors: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
    layer: dict[str, Any] = {"config": kv.config.to_dict(), "dtype": str(kv.dtype).removeprefix("torch.")}
    for side in ("k", "v"):
        packed = getattr(kv, side)
        layer[side] = {attr: getattr(packed, attr) for attr in SIDE_ATTRS}
        layer[side]["shapes"] = {f: list(tensors[_tensor_name(i, side, f)].shape) for f in TENSOR_FIELDS}
    for tail in TAILS:
        layer[tail] = list(tensors[_tensor_name(i, tail)].shape)
    return layer


def save_packed(path: str | os.PathLike, layers: Sequence[PackedKV], *, model_fingerprint: str = "") -> None:
    """Write a packed cache, every layer, to one file at ``path``.

    The file is written to a temporary name beside ``path`` and renamed over it, so
    ``path`` holds either the old file or the whole new one, never a partial write.

    Args:
        path: file to write (conventionally ``*.packkv``).
        layers: one :class:`PackedKV` per layer, on any device; each is validated first.
        model_fingerprint: names the model the cache belongs to (e.g. its name, layer
            count, KV heads and head_dim); :func:`load_packed` can require it to match.

    Raises:
        CorruptDataError: a layer fails :func:`validate_packed`.
        TypeError: ``layers`` holds something else than PackedKV, or the fingerprint is
            not a string.
    """
    # Imported here: the package's __init__ imports this module before defining it.
    from . import __version__

    if not isinstance(model_fingerprint, str):
        raise TypeError(f"model_fingerprint must be a str, got {type(model_fingerprint).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    layer_headers = []
    for i, kv in enumerate(layers):
        if not isinstance(kv, PackedKV):
            raise TypeError(f"layers[{i}] must be a PackedKV, got {type(kv).__name__}")
        validate_packed(kv, where=f"layer {i}")
        layer_tensors = _layer_tensors(i, kv)
        layer_headers.append(_layer_header(kv, layer_tensors, i))
        tensors.update(layer_tensors)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "packkv_version": __version__,
        "model_fingerprint": model_fingerprint,
        "layers": layer_headers,
        "tensors_sha256": _tensors_sha256(tensors),
    }
    header_json = json.dumps(header, sort_keys=True)
    metadata = {HEADER_KEY: header_json, HEADER_SHA256_KEY: hashlib.sha256(header_json.encode()).hexdigest()}
    # Through numpy: safetensors.torch refuses tensors that share memory (a layer saved
    # twice, or views of one store's buffers); every name gets its own bytes in the file.
    data = safetensors.numpy.save({name: t.numpy() for name, t in tensors.items()}, metadata=metadata)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _field(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``d[key]``, which must be of type ``kind`` (ints exclude bools)."""
    if key not in d:
        raise CorruptDataError(f"header field {where}{key} is missing")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptDataError(f"header {where}{key} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _shape(value: Any, ndim: int, where: str) -> tuple[int, ...]:
    ok = isinstance(value, list) and len(value) == ndim
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise CorruptDataError(f"header {where} must be {ndim} non-negative ints, got {value!r:.80}")
    return tuple(value)


def _parse_json(text: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise CorruptDataError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CorruptDataError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _read_outer_header(f, file_size: int) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    if file_size < LENGTH_BYTES:
        raise CorruptDataError(f"the file is {file_size} bytes, too short for a packkv file")
    raw_length = f.read(LENGTH_BYTES)
    if len(raw_length) != LENGTH_BYTES:
        raise CorruptDataError("the file ended inside its header length")
    (n,) = struct.unpack("<Q", raw_length)
    if n > min(file_size - LENGTH_BYTES, MAX_HEADER_BYTES):
        raise CorruptDataError(f"the header length {n} does not fit in the {file_size}-byte file")
    raw = f.read(n)
    if len(raw) != n:
        raise CorruptDataError(f"the file ended inside its {n}-byte header")
    return _parse_json(raw, "the safetensors header"), LENGTH_BYTES + n


def _verified_header(outer: dict[str, Any]) -> dict[str, Any]:
    """The packkv header of a safetensors header, its checksum and version checked."""
    meta = outer.get("__metadata__")
    text = meta.get(HEADER_KEY) if isinstance(meta, dict) else None
    digest = meta.get(HEADER_SHA256_KEY) if isinstance(meta, dict) else None
    if not isinstance(text, str) or not isinstance(digest, str):
        raise CorruptDataError(f"not a packkv file: no {HEADER_KEY!r} / {HEADER_SHA256_KEY!r} metadata")
    actual = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if actual != digest:
        raise CorruptDataError(f"the packkv header's checksum does not match (sha256 {actual}, stored {digest:.64})")
    header = _parse_json(text, "the packkv header")
    if header.get("format") != FORMAT_NAME:
        raise CorruptDataError(f"header format must be {FORMAT_NAME!r}, got {header.get('format')!r:.80}")
    version = _field(header, "format_version", int, "")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"the file has format version {version}, written by packkv {header.get('packkv_version')!r:.40}; "
            f"this packkv reads versions up to {FORMAT_VERSION}: upgrade packkv"
        )
    if version < 1:
        raise CorruptDataError(f"header format_version must be >= 1, got {version}")
    return header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a saved cache, its checksum and format version verified.

    Reads only the file's header, not the tensors: for listing what a file holds. Use
    :func:`load_packed` to verify the whole file.

    Raises:
        CorruptDataError, FormatVersionError: as :func:`load_packed`.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        outer, _ = _read_outer_header(f, os.fstat(f.fileno()).st_size)
    return _verified_header(outer)


def _parse_layer(layer: Any, i: int) -> tuple[PackKVConfig, torch.dtype, dict[str, dict], dict[str, tuple[int, ...]]]:
    """Config, dtype, per-side attributes and expected tensor shapes of header layer ``i``."""
    where = f"layers[{i}]."
    if not isinstance(layer, dict):
        raise CorruptDataError(f"header layers[{i}] must be an object, got {type(layer).__name__}")
    try:
        config = PackKVConfig.from_dict(_field(layer, "config", dict, where))
    except (ValueError, TypeError, OverflowError) as exc:
        raise CorruptDataError(f"header {where}config is invalid: {exc}") from exc
    dtype_name = _field(layer, "dtype", str, where)
    if dtype_name not in DTYPES:
        raise CorruptDataError(f"header {where}dtype must be one of {sorted(DTYPES)}, got {dtype_name!r:.40}")
    attrs: dict[str, dict] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for side in ("k", "v"):
        entry = _field(layer, side, dict, where)
        attrs[side] = {attr: _field(entry, attr, str if attr == "grouping" else int, f"{where}{side}.") for attr in SIDE_ATTRS}
        side_shapes = _field(entry, "shapes", dict, f"{where}{side}.")
        for field, (_, ndim) in TENSOR_FIELDS.items():
            value = _field(side_shapes, field, list, f"{where}{side}.shapes.")
            shapes[_tensor_name(i, side, field)] = _shape(value, ndim, f"{where}{side}.shapes.{field}")
    for tail in TAILS:
        shapes[_tensor_name(i, tail)] = _shape(_field(layer, tail, list, where), 4, f"{where}{tail}")
    return config, DTYPES[dtype_name], attrs, shapes


def _check_table(outer: dict[str, Any], shapes: dict[str, tuple[int, ...]], data_bytes: int) -> None:
    """The safetensors tensor table must list exactly the tensors the header declares."""
    table = {name: entry for name, entry in outer.items() if name != "__metadata__"}
    if set(table) != set(shapes):
        extra, missing = sorted(set(table) - set(shapes)), sorted(set(shapes) - set(table))
        raise CorruptDataError(f"the file's tensors differ from the header's: extra {extra[:3]}, missing {missing[:3]}")
    total = 0
    for name, shape in shapes.items():
        dtype = _expected_dtype(name)
        entry = table[name]
        if not isinstance(entry, dict) or entry.get("dtype") != SAFETENSORS_DTYPES[dtype] or entry.get("shape") != list(shape):
            raise CorruptDataError(f"tensor {name} is {entry!r:.120} in the file, the header says {dtype} {list(shape)}")
        numel = 1
        for n in shape:
            numel *= n
        total += numel * dtype.itemsize
    if total != data_bytes:
        raise CorruptDataError(
            f"the header's tensors take {total} bytes, the file holds {data_bytes} after its header (truncated or padded)"
        )


def _load_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(blob)
    # A hostile file may fail the parser in any way; every failure means a corrupt file.
    except Exception as exc:  # noqa: BLE001
        raise CorruptDataError(f"safetensors could not parse the file: {exc}") from exc


def load_packed(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", model_fingerprint: str | None = None
) -> list[PackedKV]:
    """Read a cache written by :func:`save_packed`, verifying everything before use.

    Args:
        path: the file.
        device: where the returned tensors live.
        model_fingerprint: when given, the file's fingerprint must equal it.

    Returns:
        One :class:`PackedKV` per layer, each validated, with tensors of its own (no two
        layers or loads share memory).

    Raises:
        FormatVersionError: the file was written in a newer format version.
        ModelMismatchError: its model fingerprint differs from ``model_fingerprint``.
        CorruptDataError: anything else wrong (short, truncated or padded file, checksum
            mismatch, bad header field, tensors inconsistent with the format), naming it.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        outer, data_start = _read_outer_header(f, file_size)
        header = _verified_header(outer)
        fingerprint = _field(header, "model_fingerprint", str, "")
        if model_fingerprint is not None and fingerprint != model_fingerprint:
            raise ModelMismatchError(
                f"the cache was saved for model {fingerprint!r:.200}, not {model_fingerprint!r:.200}"
            )
        layers = [_parse_layer(layer, i) for i, layer in enumerate(_field(header, "layers", list, ""))]
        digest = _field(header, "tensors_sha256", str, "")
        shapes = {name: shape for *_, layer_shapes in layers for name, shape in layer_shapes.items()}
        _check_table(outer, shapes, file_size - data_start)
        f.seek(0)
        blob = f.read()
    if len(blob) != file_size:
        raise CorruptDataError(f"the file changed while being read ({file_size} then {len(blob)} bytes)")
    tensors = _load_tensors(blob)
    del blob
    if set(tensors) != set(shapes):
        raise CorruptDataError("safetensors returned other tensors than its header lists")
    for name, t in tensors.items():
        if t.dtype != _expected_dtype(name) or tuple(t.shape) != shapes[name]:
            raise CorruptDataError(f"tensor {name} is {t.dtype} {tuple(t.shape)}, the header says {shapes[name]}")
    actual = _tensors_sha256(tensors)
    if actual != digest:
        raise CorruptDataError(f"the tensor data's checksum does not match (sha256 {actual}, stored {digest:.64})")
    out = []
    for i, (config, dtype, attrs, _) in enumerate(layers):
        # The width bound is not stored: it follows from the layer's config (and is then
        # checked against the widths by validate_packed).
        bounds = {"k": level_bits(config.k_rel), "v": level_bits(config.v_rel)}
        sides = {
            side: PackedTensor(**{f: tensors[_tensor_name(i, side, f)] for f in TENSOR_FIELDS}, **attrs[side],
                               width_bound=bounds[side])
            for side in ("k", "v")
        }
        kv = PackedKV(**sides, k_tail=tensors[_tensor_name(i, "k_tail")], v_tail=tensors[_tensor_name(i, "v_tail")],
                      config=config, dtype=dtype)
        validate_packed(kv, where=f"layer {i}")
        out.append(kv.to(device))
    return out
