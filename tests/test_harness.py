"""The accuracy harness on the real SmolLM2 (loaded from the packkv disk cache after the
first run) over a little real text."""

import pytest
import torch

from packkv.baselines import Fp16, GroupQuant
from packkv.data import load_text, token_windows
from packkv.harness import evaluate
from packkv.models import load_model


@pytest.fixture(scope="module")
def lm_and_ids():
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    return model, token_windows(load_text(), tokenizer, 1, 256, "tune")


def test_fp16_matches_a_plain_forward(lm_and_ids):
    model, ids = lm_and_ids
    ids = ids[:, :192]
    result = evaluate(model, ids, Fp16(), buffer_size=64)
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert result.nll.shape == (1,)
    assert abs(result.nll.item() - nll.item()) < 1e-3
    assert result.argmax.equal(logits[:, :-1].argmax(-1))


def test_chunks_equal_token_by_token_decoding(lm_and_ids):
    """Block-sized chunks give what one-token steps give: the older blocks are read only
    compressed in both, as in real decoding."""
    model, ids = lm_and_ids
    ids = ids[:, :96]
    method = GroupQuant("kivi", 2, "channel", "token", 32, block_size=32)
    chunked = evaluate(model, ids, method, buffer_size=32)
    stepwise = evaluate(model, ids, method, buffer_size=32, chunk_size=1)
    assert abs(chunked.nll.item() - stepwise.nll.item()) < 2e-3
    assert (chunked.argmax == stepwise.argmax).float().mean() > 0.99
    # After token 64 (of 96), block 0 left the 32-token buffer: 1 block a layer, read
    # compressed by tokens 64..95.
    layers, heads, head_dim = 30, 3, 64
    assert chunked.k_fp16_nbytes == stepwise.k_fp16_nbytes == layers * 1 * 32 * heads * head_dim * 2
    assert chunked.k_fp16_nbytes / chunked.k_nbytes == pytest.approx(16 / 3)  # 2 bits + 1 bit of scale/zero
    exact = evaluate(model, ids, Fp16(), buffer_size=32)
    assert chunked.nll.item() != exact.nll.item()


def test_bad_buffer(lm_and_ids):
    model, ids = lm_and_ids
    with pytest.raises(ValueError, match="buffer_size"):
        evaluate(model, ids, Fp16(), buffer_size=-1)
