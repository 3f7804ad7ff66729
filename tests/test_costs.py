"""Model costs: parameter counts against published sizes, FLOPs and activation formulas."""

import json

import pytest

from chipfuse.model.configs import from_hf_config
from chipfuse.model.costs import model_costs
from chipfuse.model.spec import SPEC_PRESETS, ModelSpec


@pytest.mark.parametrize("name,published", [("gpt2", 124.4e6), ("gpt2-xl", 1.558e9), ("llama-7b", 6.738e9),
                                            ("llama-13b", 13.016e9), ("llama-70b", 70.55e9)])
def test_parameter_counts_match_published_sizes(name, published):
    c = model_costs(SPEC_PRESETS[name])
    # Within 1%: published counts round, and gpt2's learned positions are counted at the model's context.
    assert c.total_params == pytest.approx(published, rel=0.01)


def test_flops_follow_6n_plus_attention():
    c = model_costs(SPEC_PRESETS["llama-7b"], 2048)
    s, h, L = 2048, 4096, 32
    expected = 6 * (c.num_layers * c.block_matmul_params + 4096 * 32000) + 3 * L * 4 * s * h
    assert c.model_flops_per_token() == pytest.approx(expected)
    # Backward is twice forward: the whole step is three forwards.
    assert c.model_flops_per_token() == pytest.approx(3 * (L * c.block_fwd_flops_per_token + c.head_fwd_flops_per_token))


def test_activation_bytes_gpt_is_34h_and_checkpointing_shrinks_it():
    spec = ModelSpec(name="g", num_layers=2, dim=256, num_heads=4, vocab_size=100, seq_len=64)
    c = model_costs(spec)
    assert c.act_bytes_per_token["none"] == 34 * 256  # Korthikanti et al., with fused attention
    assert c.act_bytes_per_token["full"] == 2 * 256
    assert c.act_bytes_per_token["full"] < c.act_bytes_per_token["selective"] < c.act_bytes_per_token["none"]
    assert c.act_bytes("none", "fp32") == 2 * c.act_bytes("none", "bf16")


def test_gqa_shrinks_kv_params_and_activations():
    full = model_costs(ModelSpec(name="a", family="llama", num_layers=2, dim=512, num_heads=8, ffn_dim=1024,
                                 vocab_size=100, seq_len=64))
    gqa = model_costs(ModelSpec(name="b", family="llama", num_layers=2, dim=512, num_heads=8, num_kv_heads=2,
                                ffn_dim=1024, vocab_size=100, seq_len=64))
    assert full.block_params - gqa.block_params == 2 * 512 * (512 - 128)
    assert gqa.act_bytes_per_token["none"] < full.act_bytes_per_token["none"]


def test_costs_from_hf_config(tmp_path):
    cfg = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
           "num_key_value_heads": 4, "intermediate_size": 688, "vocab_size": 1000, "max_position_embeddings": 128}
    p = tmp_path / "tiny-llama" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(cfg))
    c = model_costs(from_hf_config(p), 64)
    kv = 4 * 32
    block = 2 * 256 * 256 + 2 * 256 * kv + 3 * 256 * 688 + 2 * 256
    assert c.block_params == block
    assert c.total_params == 4 * block + 1000 * 256 + 256 + 1000 * 256
    assert c.seq_len == 64
