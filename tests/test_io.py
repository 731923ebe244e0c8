import copy
import dataclasses
import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from packkv import PackKVConfig, __version__, compress_kv, decompress_kv
from packkv.codec.validate import validate_packed
from packkv.errors import CorruptDataError, FormatVersionError, ModelMismatchError, PackKVError
from packkv.io import FORMAT_VERSION, HEADER_KEY, HEADER_SHA256_KEY, load_packed, read_header, save_packed
from packkv.store import PackedStore

FINGERPRINT = "test-model L2 kv2 d16"


def random_kv(shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g) * torch.linspace(0.1, 4, shape[-1])
    v = torch.randn(*shape, generator=g)
    return k.to(dtype), v.to(dtype)


def make_layers():
    """Three layers: two configs and dtypes, one with no full block."""
    k, v = random_kv((1, 2, 70, 16))
    first = compress_kv(k, v, PackKVConfig(block_size=32, pack_size=32))
    k, v = random_kv((1, 2, 150, 16), torch.bfloat16, seed=1)
    second = compress_kv(k, v, PackKVConfig(block_size=64, pack_size=64, k_grouping="token", min_bits=8, repack="median"))
    k, v = random_kv((1, 2, 9, 16), torch.float32, seed=2)
    third = compress_kv(k, v, PackKVConfig(block_size=32, pack_size=32, min_bits=0))
    return [first, second, third]


LAYERS = make_layers()


def assert_same_layers(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.config == b.config and a.dtype == b.dtype
        for x, y in zip(decompress_kv(a), decompress_kv(b)):
            assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "cache.packkv"
    save_packed(path, LAYERS, model_fingerprint=FINGERPRINT)
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch") / "mutated.packkv"


def split(path):
    """A saved file's tensors and packkv header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    return safetensors.torch.load(raw), json.loads(meta[HEADER_KEY])


def tensors_sha256(tensors):
    # Written from docs/format.md, independently of packkv.io.
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write(path, tensors, header, *, fix_tensors_sha=True):
    """Write a file the way save_packed does, from any tensors and header, checksums recomputed."""
    header = dict(header)
    if fix_tensors_sha:
        header["tensors_sha256"] = tensors_sha256(tensors)
    text = json.dumps(header)
    meta = {HEADER_KEY: text, HEADER_SHA256_KEY: hashlib.sha256(text.encode()).hexdigest()}
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))


# ---- round trip ----


def test_round_trip(valid_file):
    assert_same_layers(load_packed(valid_file, model_fingerprint=FINGERPRINT), LAYERS)
    assert_same_layers(load_packed(valid_file), LAYERS)


def test_header_fields(valid_file):
    header = read_header(valid_file)
    assert header["format_version"] == FORMAT_VERSION
    assert header["packkv_version"] == __version__
    assert header["model_fingerprint"] == FINGERPRINT
    assert [layer["dtype"] for layer in header["layers"]] == ["float16", "bfloat16", "float32"]
    assert PackKVConfig.from_dict(header["layers"][1]["config"]) == LAYERS[1].config
    assert header["layers"][0]["k"]["shapes"]["offsets"] == list(LAYERS[0].k.offsets.shape)


def test_is_a_plain_safetensors_file(valid_file):
    from safetensors import safe_open

    with safe_open(str(valid_file), framework="pt") as f:
        assert torch.equal(f.get_tensor("layers.0.k.words"), LAYERS[0].k.words)
        assert HEADER_KEY in f.metadata()


def test_store_views_shared_tensors_and_empty_list(tmp_path):
    store = PackedStore(PackKVConfig(block_size=32, pack_size=32, repack="none"), initial_blocks=4)
    k, v = random_kv((2, 2, 64, 16))
    store.append(k, v)
    empty_tail = torch.zeros(2, 2, 0, 16, dtype=torch.float16)
    kv = compress_kv(k, v, store.config)
    from_store = dataclasses.replace(kv, k=store.k, v=store.v, k_tail=empty_tail, v_tail=empty_tail)
    save_packed(tmp_path / "store.packkv", [from_store])
    assert_same_layers(load_packed(tmp_path / "store.packkv"), [from_store])
    # One layer object saved twice: tensors that share memory.
    save_packed(tmp_path / "twice.packkv", [from_store, from_store])
    assert_same_layers(load_packed(tmp_path / "twice.packkv"), [from_store, from_store])
    save_packed(tmp_path / "empty.packkv", [])
    assert load_packed(tmp_path / "empty.packkv") == []


def test_save_validates_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "cache.packkv"
    save_packed(path, LAYERS[:1])
    before = path.read_bytes()
    bad = dataclasses.replace(LAYERS[0], k=dataclasses.replace(LAYERS[0].k, offsets=LAYERS[0].k.offsets - 1000))
    with pytest.raises(CorruptDataError, match=r"^layer 1: k\.offsets\[0, 0, 0\] = -1000 is negative"):
        save_packed(path, [LAYERS[0], bad])
    with pytest.raises(TypeError, match=r"layers\[0\] must be a PackedKV"):
        save_packed(path, [decompress_kv(LAYERS[0])])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.packkv"]


def test_loads_are_independent_copies(valid_file):
    a, b = load_packed(valid_file), load_packed(valid_file)
    ptrs = [
        t.untyped_storage().data_ptr()
        for layers in (a, b)
        for kv in layers
        for t in (*kv.k.tensors().values(), *kv.v.tensors().values(), kv.k_tail, kv.v_tail)
        if t.numel()
    ]
    assert len(set(ptrs)) == len(ptrs)
    a[0].k.words.add_(1)
    a[0].k_tail.zero_()
    assert_same_layers(b, LAYERS)


def test_load_to_device(valid_file):
    layers = load_packed(valid_file, device=torch.device("cpu"))
    assert all(kv.k.words.device.type == "cpu" for kv in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(valid_file):
    layers = load_packed(valid_file, device="cuda")
    for kv, ref in zip(layers, LAYERS):
        validate_packed(kv)
        assert kv.k.words.is_cuda and kv.v_tail.is_cuda
        assert torch.equal(decompress_kv(kv)[1].cpu(), decompress_kv(ref)[1])


# ---- the documented errors ----


def test_newer_format_version(valid_file, scratch):
    tensors, header = split(valid_file)
    write(scratch, tensors, {**header, "format_version": FORMAT_VERSION + 1, "layers": "a future layout"})
    with pytest.raises(FormatVersionError, match=f"format version {FORMAT_VERSION + 1}.*upgrade packkv"):
        load_packed(scratch)
    with pytest.raises(FormatVersionError):
        read_header(scratch)


def test_wrong_model(valid_file):
    with pytest.raises(ModelMismatchError, match="saved for model 'test-model L2 kv2 d16', not 'other'"):
        load_packed(valid_file, model_fingerprint="other")


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1, -1000])
def test_truncated(valid_file, scratch, keep):
    raw = valid_file.read_bytes()
    scratch.write_bytes(raw[:keep])
    with pytest.raises(CorruptDataError):
        load_packed(scratch)


def test_bit_flip_in_tensor_data(valid_file, scratch):
    raw = bytearray(valid_file.read_bytes())
    raw[-3] ^= 0x10
    scratch.write_bytes(raw)
    with pytest.raises(CorruptDataError, match="tensor data's checksum does not match"):
        load_packed(scratch)


def test_bit_flip_in_header(valid_file, scratch):
    raw = valid_file.read_bytes()
    at = raw.index(b"packkv_version")
    scratch.write_bytes(raw[:at] + b"q" + raw[at + 1 :])
    with pytest.raises(CorruptDataError, match="packkv header's checksum does not match"):
        load_packed(scratch)


def test_header_length_past_end(scratch):
    scratch.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CorruptDataError, match="header length 9223372036854775808 does not fit in the 10-byte file"):
        load_packed(scratch)


def test_not_a_packkv_file(scratch):
    scratch.write_bytes(safetensors.torch.save({"x": torch.zeros(3)}))
    with pytest.raises(CorruptDataError, match="not a packkv file"):
        load_packed(scratch)


def test_shapes_differ_from_header(valid_file, scratch):
    tensors, header = split(valid_file)
    tensors["layers.0.k.words"] = tensors["layers.0.k.words"][:-4]
    write(scratch, tensors, header)
    with pytest.raises(CorruptDataError, match=r"tensor layers\.0\.k\.words is .*the header says torch\.int32 \[\d+\]"):
        load_packed(scratch)


def test_shapes_inconsistent_with_format(valid_file, scratch):
    # Header and tensors agree, but offsets no longer fit the words: validation catches it.
    tensors, header = split(valid_file)
    header = copy.deepcopy(header)
    tensors["layers.1.v.words"] = tensors["layers.1.v.words"][:-8].clone()
    header["layers"][1]["v"]["shapes"]["words"][0] -= 8
    write(scratch, tensors, header)
    with pytest.raises(CorruptDataError, match=r"^layer 1: v\.offsets\[0, 1, 1\] = \d+: the pack ends at word"):
        load_packed(scratch)


def test_declared_sizes_checked_before_reading(valid_file, scratch):
    tensors, header = split(valid_file)
    header = copy.deepcopy(header)
    header["layers"][0]["k"]["shapes"]["words"] = [10**15]
    write(scratch, tensors, header)
    with pytest.raises(CorruptDataError, match=r"layers\.0\.k\.words"):
        load_packed(scratch)


def test_deeply_nested_header(valid_file, scratch):
    tensors, _ = split(valid_file)
    # Past Python's recursion limit when parsed.
    nested = "[" * 100_000 + "]" * 100_000
    meta = {HEADER_KEY: nested, HEADER_SHA256_KEY: hashlib.sha256(nested.encode()).hexdigest()}
    scratch.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    with pytest.raises(CorruptDataError, match="packkv header is not valid JSON"):
        load_packed(scratch)


def test_errors_share_a_base():
    for error in (CorruptDataError, FormatVersionError, ModelMismatchError):
        assert issubclass(error, PackKVError) and issubclass(error, ValueError)


# ---- fuzzing: hostile files raise only PackKVError, and never load wrong values ----

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def load_or_error(path):
    """The loaded layers, or None when a documented error was raised."""
    try:
        layers = load_packed(path, model_fingerprint=FINGERPRINT)
    except PackKVError as exc:
        event(type(exc).__name__)
        return None
    event("loaded")
    return layers


@FUZZ
@given(st.data())
def test_fuzz_file_bytes(valid_file, scratch, data):
    raw = bytearray(valid_file.read_bytes())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "flip", "overwrite", "truncate", "insert", "append"]), label="op")
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "overwrite":
            raw[at : at + 4] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    scratch.write_bytes(raw)
    layers = load_or_error(scratch)
    if layers is not None:
        # Only changes that mean nothing (JSON whitespace) may load, and then load the same.
        assert_same_layers(layers, LAYERS)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["none", "length", "prefix"]))
def test_fuzz_random_bytes(valid_file, scratch, junk, start):
    if start == "length":
        junk = struct.pack("<Q", len(junk)) + junk
    elif start == "prefix":
        junk = valid_file.read_bytes()[:200] + junk
    scratch.write_bytes(junk)
    with pytest.raises(PackKVError):
        load_packed(scratch)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["token", "channel", "float16", "bfloat16", 0, 1, 2, 4, 8, 16, 32, 64, -1, [], {}]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _paths(node, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@FUZZ
@given(st.data())
def test_fuzz_header_fields(valid_file, scratch, data):
    tensors, header = split(valid_file)
    header = copy.deepcopy(header)
    paths = [p for p in _paths(header) if p and p[0] != "tensors_sha256"]
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        parent = header
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans(), label="delete"):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(JSON_VALUES, label="value")
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced this path
    write(scratch, tensors, header)
    layers = load_or_error(scratch)
    for kv in layers or []:
        validate_packed(kv)
        k, v = decompress_kv(kv)
        assert torch.isfinite(k.float()).all() and torch.isfinite(v.float()).all()


@FUZZ
@given(st.data())
def test_fuzz_tensors(valid_file, scratch, data):
    """Tensor values, shapes and dtypes changed, with the header and checksums made to agree."""
    tensors, header = split(valid_file)
    header = copy.deepcopy(header)
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[name]
    op = data.draw(st.sampled_from(["set", "set", "shape", "dtype"]), label="op")
    if op == "set" and t.numel():
        t = t.clone()
        raw = t.view(-1).view(torch.uint8)
        at = data.draw(st.integers(0, raw.numel() - 1))
        raw[at] = data.draw(st.integers(0, 255))
    elif op == "shape":
        t = t.reshape(-1)[: data.draw(st.integers(0, t.numel()))]
        if t.numel() and data.draw(st.booleans()):
            t = t.reshape(1, -1)
    elif op == "dtype":
        t = t.to(data.draw(st.sampled_from([torch.int32, torch.uint8, torch.float16, torch.int64, torch.float32])))
    tensors[name] = t
    _, layer, field = name.split(".", 2)
    entry = header["layers"][int(layer)]
    if field.endswith("_tail"):
        entry[field] = list(t.shape)
    else:
        side, field = field.split(".")
        entry[side]["shapes"][field] = list(t.shape)
    write(scratch, tensors, header)
    layers = load_or_error(scratch)
    for kv in layers or []:
        k, v = decompress_kv(kv)
        assert torch.isfinite(k.float()).all() and torch.isfinite(v.float()).all()
