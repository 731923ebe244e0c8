import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from packkv import PackKVConfig, compress_kv, decompress_kv
from packkv.codec import PackedTensor, decode_tensor
from packkv.codec.validate import pack_word_counts, validate_packed
from packkv.errors import CorruptDataError, PackKVError
from packkv.store import PackedStore

FIELDS = ("words", "offsets", "widths", "mins", "scale", "zero")


def random_kv(shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g) * torch.linspace(0.1, 4, shape[-1])
    v = torch.randn(*shape, generator=g)
    return k.to(dtype), v.to(dtype)


# Small layers covering groupings, min_bits, pack sizes, repack methods and a tail-only one.
SAMPLES = [
    ((1, 2, 70, 16), PackKVConfig(block_size=32, pack_size=32, k_grouping="channel")),
    ((2, 1, 150, 32), PackKVConfig(block_size=64, pack_size=32, k_grouping="token", min_bits=8, repack="median")),
    ((1, 1, 64, 16), PackKVConfig(block_size=64, pack_size=64, v_grouping="channel", min_bits=0, repack="none")),
    ((1, 1, 10, 16), PackKVConfig(block_size=32, pack_size=32)),
]


def sample(i: int):
    shape, config = SAMPLES[i]
    k, v = random_kv(shape, seed=i)
    return compress_kv(k, v, config)


BASES = [sample(i) for i in range(len(SAMPLES))]


def replace_side(kv, side, **changes):
    return dataclasses.replace(kv, **{side: dataclasses.replace(getattr(kv, side), **changes)})


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_valid_layers_pass(i):
    validate_packed(BASES[i])
    validate_packed(BASES[i].k)
    validate_packed(BASES[i].v)


def test_store_views_pass():
    # The store's metadata are non-contiguous slices of larger buffers.
    store = PackedStore(PackKVConfig(block_size=32, pack_size=32, repack="none"), initial_blocks=4)
    k, v = random_kv((2, 2, 96, 16))
    store.append(k, v)
    assert not store.k.offsets.is_contiguous()
    validate_packed(store.k)
    validate_packed(store.v)


def test_pack_word_counts_match_the_packer():
    kv = BASES[1]
    counts = pack_word_counts(kv.k.widths, kv.k.pack_size).reshape(-1)
    offsets = kv.k.offsets.reshape(-1).long()
    # The packer lays packs end to end: each pack's count is the gap to the next offset.
    assert torch.equal(offsets[1:] - offsets[:-1], counts[:-1])
    assert int(offsets[-1] + counts[-1]) == kv.k.words.numel()


def _negative_offset(kv):
    offsets = kv.k.offsets.clone()
    offsets[0, 1, 1] = -4
    return replace_side(kv, "k", offsets=offsets)


def _offset_past_end(kv):
    offsets = kv.v.offsets.clone()
    offsets[0, 0, 1] = kv.v.words.numel() - 4
    return replace_side(kv, "v", offsets=offsets)


def _widths_past_end(kv):
    # Every width 15 makes the last pack far longer than the words that remain (the bound
    # raised too, so that the lengths are what fails).
    return replace_side(kv, "k", widths=torch.full_like(kv.k.widths, 0xFF), width_bound=15)


def _widths_over_bound(kv):
    widths = kv.v.widths.clone()
    widths[0, 1, 1, 3] = (widths[0, 1, 1, 3] & 0x0F) | ((kv.v.width_bound + 1) << 4)  # channel 7
    return replace_side(kv, "v", widths=widths)


def _truncated_words(kv):
    return replace_side(kv, "k", words=kv.k.words[:-4])


def _tail_inf(kv):
    tail = kv.k_tail.clone()
    tail[0, 1, 4, 2] = float("-inf")
    return dataclasses.replace(kv, k_tail=tail)


def _with(kv, side, field, index, value):
    t = getattr(getattr(kv, side), field).clone()
    t[index] = value
    return replace_side(kv, side, **{field: t})


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_negative_offset, r"k\.offsets\[0, 1, 1\] = -4 is negative"),
        (_offset_past_end, r"v\.offsets\[0, 0, 1\] = \d+: the pack ends at word \d+, past the \d+ words"),
        (lambda kv: _with(kv, "v", "offsets", (0, 1, 0), 2), r"v\.offsets\[0, 1, 0\] = 2 is not a multiple of 4"),
        (_widths_past_end, r"k\.offsets\[0, \d, \d\].*past the"),
        (_widths_over_bound, r"v\.widths: channel 7 of pack \[0, 1, 1\] is \d+ bits wide, more than width_bound \d+"),
        (lambda kv: replace_side(kv, "k", width_bound=16), r"k\.width_bound must be an int from 0 to 15, got 16"),
        (_truncated_words, r"k\.offsets\[0, 1, 1\].*past the"),
        (lambda kv: _with(kv, "k", "scale", (0, 1, 0, 3), 0.0), r"k\.scale\[0, 1, 0, 3\] = 0\.0"),
        (lambda kv: _with(kv, "v", "scale", (0, 0, 1, 2), -1.0), r"v\.scale\[0, 0, 1, 2\] = -1\.0"),
        (lambda kv: _with(kv, "v", "scale", (0, 0, 0, 0), float("inf")), r"v\.scale\[0, 0, 0, 0\] = inf"),
        (lambda kv: _with(kv, "k", "zero", (0, 0, 1, 5), float("nan")), r"k\.zero\[0, 0, 1, 5\] = nan"),
        (_tail_inf, r"k_tail\[0, 1, 4, 2\] = -inf"),
        (lambda kv: replace_side(kv, "k", words=kv.k.words.long()), r"k\.words must be torch\.int32, got torch\.int64"),
        (lambda kv: replace_side(kv, "v", scale=kv.v.scale.float()), r"v\.scale must be torch\.float16"),
        (lambda kv: replace_side(kv, "k", widths=kv.k.widths[..., :4]), r"k\.widths gives head_dim 8; supported"),
        (lambda kv: replace_side(kv, "k", mins=kv.k.mins[..., :3]), r"k\.mins has shape \(1, 2, 2, 3\), expected \(1, 2, 2, 8\)"),
        (lambda kv: replace_side(kv, "v", zero=kv.v.zero[:, :, :1]), r"v\.zero has shape \(1, 2, 1, 32\), expected \(1, 2, 2, 32\)"),
        (lambda kv: replace_side(kv, "k", offsets=kv.k.offsets[:, :, :1]), r"k\.widths has shape"),
        (lambda kv: replace_side(kv, "k", offsets=kv.k.offsets[:1, :1], widths=kv.k.widths[:1, :1],
                                 mins=kv.k.mins[:1, :1], scale=kv.k.scale[:1, :1], zero=kv.k.zero[:1, :1]),
         r"k and v differ in \(batch, heads, n_packs, head_dim\)"),
        (lambda kv: replace_side(kv, "k", offsets=kv.k.offsets[:0]), r"batch and heads must be >= 1"),
        (lambda kv: dataclasses.replace(kv, k=kv.v), r"k\.grouping is 'token', the config says 'channel'"),
        (lambda kv: replace_side(kv, "v", grouping="head"), r"v\.grouping must be one of"),
        (lambda kv: replace_side(kv, "v", min_bits=8), r"v\.mins has shape"),
        (lambda kv: replace_side(kv, "k", pack_size=16), r"k\.pack_size must be one of \(32, 64\), got 16"),
        (lambda kv: replace_side(kv, "k", block_size=128), r"k\.offsets holds 2 packs of 32 tokens, not whole blocks of 128"),
        (lambda kv: replace_side(kv, "k", block_size=True), r"k\.block_size must be a multiple"),
        (lambda kv: dataclasses.replace(kv, config=PackKVConfig(block_size=64, pack_size=32, k_grouping="channel")), r"k\.block_size is 32, the config says 64"),
        (lambda kv: dataclasses.replace(kv, v_tail=kv.v_tail[:, :, :2]), r"v_tail has shape \(1, 2, 2, 16\), expected \(1, 2, 6, 16\)"),
        (lambda kv: dataclasses.replace(kv, k_tail=kv.k_tail.float()), r"k_tail must be torch\.float16"),
        (lambda kv: dataclasses.replace(kv, dtype=torch.int32), r"dtype must be one of"),
        (lambda kv: dataclasses.replace(kv, config=None), r"config must be a PackKVConfig"),
    ],
)
def test_corruption_names_field_and_index(corrupt, match):
    with pytest.raises(CorruptDataError, match=match):
        validate_packed(corrupt(BASES[0]))


def test_where_prefixes_the_message():
    with pytest.raises(CorruptDataError, match=r"^layer 7: k\.offsets\[0, 1, 1\] = -4"):
        validate_packed(_negative_offset(BASES[0]), where="layer 7")


def test_not_packed_data():
    with pytest.raises(CorruptDataError, match="expected a PackedKV or PackedTensor, got dict"):
        validate_packed({})


def test_errors_are_value_errors():
    assert issubclass(CorruptDataError, PackKVError) and issubclass(PackKVError, ValueError)


# ---- fuzzing: mutated packed data either fails validation or decodes safely ----

# Values a mutation may set, as raw bit patterns of the tensor's dtype and as small deltas.
ELEMENT_BITS = {torch.int32: 32, torch.uint8: 8, torch.float16: 16}
INT_VIEW = {torch.int32: torch.int32, torch.uint8: torch.uint8, torch.float16: torch.int16}
OTHER_DTYPES = [torch.int32, torch.uint8, torch.float16, torch.int64, torch.float32]
ATTR_VALUES = {
    "grouping": ["token", "channel", "head", None, 3],
    "block_size": [0, 16, 32, 48, 64, 128, 2048, True, "64"],
    "pack_size": [0, 16, 32, 64, None],
    "min_bits": [0, 4, 8, 2, -1, True],
}


def _set_element(t: torch.Tensor, data) -> torch.Tensor:
    if t.numel() == 0:
        return t
    t = t.clone()
    flat = t.view(-1).view(INT_VIEW[t.dtype])
    i = data.draw(st.integers(0, t.numel() - 1), label="index")
    bits = ELEMENT_BITS[t.dtype]
    if data.draw(st.booleans(), label="raw bits"):
        value = data.draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        flat[i] = value % 256 if t.dtype == torch.uint8 else value
    else:
        delta = data.draw(st.integers(-3, 3))
        t.view(-1)[i] = t.view(-1)[i] + delta
    return t


def _noise(t: torch.Tensor, data) -> torch.Tensor:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    bits = ELEMENT_BITS[t.dtype]
    raw = torch.randint(0, 2**bits, t.shape, generator=g, dtype=torch.int64)
    raw = torch.where(raw >= 2 ** (bits - 1), raw - 2**bits, raw) if t.dtype != torch.uint8 else raw
    return raw.to(INT_VIEW[t.dtype]).view(t.dtype)


def _reshape(t: torch.Tensor, data) -> torch.Tensor:
    ndim = max(1, t.dim() + data.draw(st.integers(-1, 1)))
    shape = [data.draw(st.integers(0, 2 * (t.shape[i] if i < t.dim() else 1) + 2)) for i in range(ndim)]
    n = 1
    for s in shape:
        n *= s
    flat = t.reshape(-1)
    reps = -(-n // max(flat.numel(), 1))
    src = flat.repeat(reps) if flat.numel() else torch.zeros(n, dtype=t.dtype)
    return src[:n].reshape(shape)


def _mutate_tensor(t: torch.Tensor, data) -> torch.Tensor:
    if t.dtype not in ELEMENT_BITS:
        return t
    op = data.draw(st.sampled_from(["set", "set", "noise", "reshape", "dtype"]), label="op")
    if op == "set":
        return _set_element(t, data)
    if op == "noise":
        return _noise(t, data)
    if op == "reshape":
        return _reshape(t, data)
    return t.to(data.draw(st.sampled_from(OTHER_DTYPES)))


def mutate(kv, data):
    """Apply 1 to 3 random mutations to tensors, attributes, config or dtype of a layer."""
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        target = data.draw(st.sampled_from(["tensor", "tensor", "tensor", "tail", "attr", "config", "dtype"]))
        side = data.draw(st.sampled_from(["k", "v"]))
        if target == "tensor":
            field = data.draw(st.sampled_from(FIELDS), label="field")
            kv = replace_side(kv, side, **{field: _mutate_tensor(getattr(getattr(kv, side), field), data)})
        elif target == "tail":
            tail = f"{side}_tail"
            kv = dataclasses.replace(kv, **{tail: _mutate_tensor(getattr(kv, tail), data)})
        elif target == "attr":
            attr = data.draw(st.sampled_from(sorted(ATTR_VALUES)))
            kv = replace_side(kv, side, **{attr: data.draw(st.sampled_from(ATTR_VALUES[attr]))})
        elif target == "config":
            changes = data.draw(st.sampled_from([
                {"block_size": 64}, {"pack_size": 64, "block_size": 64}, {"min_bits": 0}, {"min_bits": 8},
                {"k_grouping": "token"}, {"v_grouping": "channel"}, {"k_rel": 0.3},
            ]))
            kv = dataclasses.replace(kv, config=dataclasses.replace(kv.config, **changes))
        else:
            kv = dataclasses.replace(kv, dtype=data.draw(st.sampled_from(
                [torch.float16, torch.bfloat16, torch.float32, torch.int32, "float16"])))
    return kv


def check_decodes_safely(kv) -> None:
    """After validation passes, decoding raises nothing and gives finite values of the declared shape."""
    try:
        validate_packed(kv)
    except CorruptDataError:
        event("rejected")
        return
    event("decoded")
    k, v = decompress_kv(kv)
    assert tuple(k.shape) == tuple(v.shape) == kv.shape
    assert torch.isfinite(k).all() and torch.isfinite(v).all()


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.data())
def test_fuzz_mutated_layers(data):
    kv = BASES[data.draw(st.integers(0, len(BASES) - 1), label="base")]
    check_decodes_safely(mutate(kv, data))


@FUZZ
@given(st.data())
def test_fuzz_mutated_packed_tensor(data):
    kv = BASES[data.draw(st.integers(0, 2), label="base")]
    packed = mutate(kv, data).k
    try:
        validate_packed(packed)
    except CorruptDataError:
        event("rejected")
        return
    event("decoded")
    x = decode_tensor(packed)
    assert tuple(x.shape) == (packed.batch, packed.heads, packed.n_tokens, packed.head_dim)
    assert torch.isfinite(x).all()


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_fuzz_random_tensors(data):
    """Packed data built from scratch out of random bytes and shapes."""
    b, h, n_packs = (data.draw(st.integers(1, 2)) for _ in range(3))
    d = data.draw(st.sampled_from([16, 32]))
    pack_size = data.draw(st.sampled_from([32, 64]))
    min_bits = data.draw(st.sampled_from([0, 4, 8]))
    block_size = pack_size * data.draw(st.sampled_from([1, 2]))
    n_blocks = n_packs * pack_size // block_size if n_packs * pack_size % block_size == 0 else 1
    grouping = data.draw(st.sampled_from(["token", "channel"]))
    group = block_size if grouping == "token" else d
    shapes = {
        "words": (data.draw(st.integers(0, 400)),), "offsets": (b, h, n_packs), "widths": (b, h, n_packs, d // 2),
        "mins": (b, h, n_packs, d * min_bits // 8), "scale": (b, h, n_blocks, group), "zero": (b, h, n_blocks, group),
    }
    dtypes = {"words": torch.int32, "offsets": torch.int32, "widths": torch.uint8, "mins": torch.uint8,
              "scale": torch.float16, "zero": torch.float16}
    tensors = {f: _noise(torch.zeros(shapes[f], dtype=dtypes[f]), data) for f in FIELDS}
    if data.draw(st.booleans(), label="plausible offsets"):
        tensors["words"] = _noise(torch.zeros(600, dtype=torch.int32), data)
        tensors["offsets"] = tensors["offsets"] & 255
        tensors["widths"] = tensors["widths"] & 0x11
        tensors["scale"] = tensors["scale"].abs().nan_to_num(1.0, 1.0).clamp(min=1e-3)
        tensors["zero"] = tensors["zero"].nan_to_num(0.0, 0.0, 0.0)
    packed = PackedTensor(**tensors, grouping=grouping, block_size=block_size, pack_size=pack_size, min_bits=min_bits)
    try:
        validate_packed(packed)
    except CorruptDataError:
        event("rejected")
        return
    event("decoded")
    assert torch.isfinite(decode_tensor(packed)).all()

