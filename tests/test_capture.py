"""KV capture returns what the cache holds: K after RoPE, V, per layer."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from packkv.capture import capture_kv


def test_capture_shapes_and_rope():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 24))
    kv = capture_kv(model, ids)
    assert len(kv) == 2 and all(k.shape == v.shape == (2, 2, 24, 16) for k, v in kv)
    # Layer 0 by hand: K = RoPE(k_proj(norm(embed))), V = v_proj(norm(embed)).
    with torch.no_grad():
        layer = model.model.layers[0]
        h = layer.input_layernorm(model.model.embed_tokens(ids))
        k = layer.self_attn.k_proj(h).view(2, 24, 2, 16).transpose(1, 2)
        v = layer.self_attn.v_proj(h).view(2, 24, 2, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(24).unsqueeze(0))
        k_rope, _ = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(kv[0][0], k_rope)
    torch.testing.assert_close(kv[0][1], v)
    assert not torch.allclose(kv[0][0], k)  # RoPE did change K
