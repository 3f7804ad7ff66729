"""Every supported Hugging Face architecture against transformers itself: the planner's parameter
count, chipfuse's staged model loaded with --init-from giving transformers' logits, and the same
stages serving a sequence with a KV cache (chunked prompt, then decode) giving transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch

from chipfuse.errors import ChipfuseError
from chipfuse.model.build import build_full, build_stage, full_logits
from chipfuse.model.configs import from_hf_config, resolve_model
from chipfuse.model.costs import model_costs
from chipfuse.model.export import check_init_from
from chipfuse.model.split import param_count
from chipfuse.model.weights import WeightsError
from tests.hf_tiny import TINY, hf_model, save_tiny
from tests.pipeline_helpers import plan_of


@pytest.mark.parametrize("arch", sorted(TINY))
def test_planner_parameter_count_equals_transformers(tmp_path, arch):
    (tmp_path / "config.json").write_text(json.dumps(TINY[arch]))
    spec = from_hf_config(tmp_path / "config.json")
    real = sum(p.numel() for p in hf_model(TINY[arch]).parameters())  # a tied matrix counted once
    assert model_costs(spec).total_params == real
    json.dumps(spec.to_dict())  # the spec (with its whole HF config) stays JSON for the plan file


@pytest.mark.parametrize("arch", sorted(TINY))
def test_staged_model_from_init_from_gives_transformers_logits(tmp_path, arch):
    torch.manual_seed(0)
    ref = save_tiny(TINY[arch], tmp_path, seed=1).eval()
    spec = resolve_model(str(tmp_path))  # a model folder is a --model too
    plan = plan_of(spec, [([("a", 1), ("b", 2)], 2, 2)])
    stages = [build_stage(spec, plan.replicas[0].stages, i, seed=7, init_from=str(tmp_path)).eval() for i in range(2)]
    # Each stage holds its own part only: the embedding on the first, the head (or the tied
    # matrix's copy) on the last; together every tensor of transformers' model.
    names = set().union(*(dict(s.named_parameters()) for s in stages))
    assert names - set(stages[1].tied) == set(dict(ref.named_parameters()))
    idx = torch.randint(0, spec.vocab_size, (2, 32))
    with torch.no_grad():
        logits = stages[1](stages[0](idx))
        want = ref(idx).logits
    # transformers' own modules run in transformers' order on the same weights: bit-identical.
    torch.testing.assert_close(logits, want, atol=0, rtol=0)


def test_layout_independent_init_matches_the_full_reference():
    # Weights come from (seed, module name): a stage built alone equals the same piece of the
    # whole model, for every split, with no weights loaded.
    from chipfuse.model.configs import spec_from_config_dict
    from tests.hf_tiny import TINY as T

    spec = spec_from_config_dict(T["qwen2"], name="q", source="t")
    full = build_full(spec, seed=3)
    plan = plan_of(spec, [([("a", 2), ("b", 1)], 2, 2)])
    last = build_stage(spec, plan.replicas[0].stages, 1, seed=3)
    ref = dict(full.named_parameters(remove_duplicate=False))
    for n, p in last.named_parameters():
        torch.testing.assert_close(p, ref[n], atol=0, rtol=0, msg=n)
    # The tied head's copy starts as the embedding.
    torch.testing.assert_close(dict(last.named_parameters())["lm_head.weight"], ref["model.embed_tokens.weight"])
    assert param_count(last) < param_count(full)


def test_unsupported_architecture_is_refused_with_the_reason(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "t5", "vocab_size": 100, "d_model": 64, "num_layers": 2,
                             "num_heads": 4}))
    with pytest.raises(ChipfuseError, match="config.json: model_type 't5': chipfuse has no stage split.*Fix"):
        from_hf_config(p)
    p.write_text(json.dumps({**TINY["gemma3_text"], "use_bidirectional_attention": True}))
    with pytest.raises(ChipfuseError, match="use_bidirectional_attention.*Fix"):
        from_hf_config(p)


def test_missing_and_misshapen_tensors_are_refused_before_any_step(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny(TINY["llama"], tmp_path)
    spec = resolve_model(str(tmp_path))
    weights = load_file(str(tmp_path / "model.safetensors"))
    # A missing tensor: named, with the file and the fix; checked from headers before any worker.
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                           r"missing.*Fix"):
        check_init_from(spec, tmp_path)
    # A wrong shape: found and needed shapes named.
    bad = dict(weights)
    bad["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(bad, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    plan = plan_of(spec, [([("a", 2), ("b", 1)], 2, 2)])
    with pytest.raises(WeightsError, match=r"tensor 'model.layers.2.self_attn.k_proj.weight': shape \[64, 64\], "
                                           r"the model's config needs \[32, 64\].*Fix"):
        build_stage(spec, plan.replicas[0].stages, 1, init_from=str(tmp_path))
    # A stage that does not hold the bad tensor loads: each rank reads only its own tensors.
    build_stage(spec, plan.replicas[0].stages, 0, init_from=str(tmp_path))


def test_sharded_safetensors_with_index_load(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = hf_model(TINY["qwen3"], seed=2).eval()
    ref.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    spec = resolve_model(str(tmp_path))
    full = build_full(spec, init_from=str(tmp_path)).eval()
    idx = torch.randint(0, spec.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(full_logits(full, idx), AutoModelForCausalLM.from_pretrained(str(tmp_path))(idx).logits,
                                   atol=0, rtol=0)


def test_train_export_round_trip_loads_in_transformers_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from chipfuse.model.export import export_checkpoint
    from chipfuse.model.gpt import loss_sum
    from chipfuse.runtime.endure import checkpoint

    src = tmp_path / "src"
    save_tiny(TINY["gpt2"], src)
    (src / "tokenizer.json").write_text("{}")  # a tokenizer file travels with the export
    spec = resolve_model(str(src))
    plan = plan_of(spec, [([("a", 3)], 2, 2)])
    module = build_stage(spec, plan.replicas[0].stages, 0, init_from=str(src))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, spec.vocab_size, (2, 33))
        opt.zero_grad()
        loss_sum(module(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
    ck = checkpoint.save(tmp_path / "ck", step=3, model=module, optimizer=opt, plan=plan.to_dict())
    out = tmp_path / "hf"
    res = export_checkpoint(ck, out, tokenizer=src)
    assert res["tokenizer_files"] == ["tokenizer.json"]
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, spec.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, module.eval()(idx), atol=0, rtol=0)
    before = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    with torch.no_grad():
        assert not torch.equal(before(idx).logits, hf(idx).logits)  # the trained weights, not the initial ones


def test_export_refuses_the_builtin_gpt(tmp_path):
    from chipfuse.model.export import export_checkpoint
    from chipfuse.model.spec import SPEC_PRESETS
    from chipfuse.runtime.endure import checkpoint

    spec = SPEC_PRESETS["tiny"]
    plan = plan_of(spec, [([("a", 3)], 2, 2)])
    module = build_stage(spec, plan.replicas[0].stages, 0)
    ck = checkpoint.save(tmp_path / "ck", step=0, model=module, optimizer=torch.optim.AdamW(module.parameters()),
                         plan=plan.to_dict())
    with pytest.raises(ChipfuseError, match="family: 'gpt'.*no Hugging Face architecture.*Fix"):
        export_checkpoint(ck, tmp_path / "out")


def test_train_init_from_refuses_a_misshapen_folder_before_any_worker(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from chipfuse.cli import main

    save_tiny(TINY["qwen2"], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    w = load_file(str(f))
    w["model.norm.weight"] = torch.ones(32)
    save_file(w, str(f), metadata={"format": "pt"})
    rc = main(["train", "--init-from", str(tmp_path / "m"), "--steps", "1", "--global-batch", "4", "--seq-len", "32",
               "--solo-samples", "0", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.safetensors: tensor 'model.norm.weight': shape [32], the model's config needs [64]" in err
    errors = [ln for ln in err.splitlines() if ln.startswith("chipfuse: error")]
    assert len(errors) == 1 and "Fix:" in errors[0]  # one line (torchao may print its own load notes)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran


@pytest.mark.parametrize("arch", sorted(TINY))
def test_served_stages_with_kv_caches_give_transformers_logits(tmp_path, arch):
    """Serving runs training's stage modules (same class, same tensors as --init-from loads) with a
    DynamicCache: a 20-token prompt in chunks of 7, then 6 decode steps, over 3 stages of one layer;
    the logits of every step equal transformers' forward over the whole sequence. 26 positions pass
    the sliding windows of 16 (Mistral, Gemma 2 / 3), so the cached window masks are exercised."""
    from chipfuse.serve.hf import StageModel

    ref = save_tiny(TINY[arch], tmp_path, seed=1).eval()
    spec = resolve_model(str(tmp_path))
    served = [StageModel(tmp_path, i, 1) for i in range(3)]
    plan = plan_of(spec, [([("a", 1), ("b", 1), ("c", 1)], 2, 2)])
    trained = build_stage(spec, plan.replicas[0].stages, 1, init_from=str(tmp_path))
    assert type(served[1].module) is type(trained)
    for (n, p), (m, q) in zip(served[1].module.named_parameters(), trained.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)
    caches = [s.new_cache() for s in served]
    torch.manual_seed(3)
    seq = torch.randint(3, spec.vocab_size, (20,)).tolist()
    chunks = [seq[0:7], seq[7:14], seq[14:20]]
    got = []
    for step in range(9):  # 3 prompt chunks, then 6 decode steps each feeding the token the last one chose
        h = torch.tensor([chunks[step] if step < 3 else [seq[-1]]])
        for s, c in zip(served, caches, strict=True):
            h = s(h, c)
        got.append(h)
        if step >= 2:
            seq.append(int(torch.argmax(h)))
    with torch.no_grad():
        want = ref(torch.tensor([seq[:-1]])).logits[0]
    for i, end in enumerate([6, 13, 19, *range(20, 26)]):
        torch.testing.assert_close(got[i], want[end], rtol=1e-4, atol=1e-4, msg=f"step {i} (position {end})")


def test_served_stage_reads_only_its_tensors_through_the_training_reader(tmp_path):
    """A stage holding a missing tensor is refused by model/weights.py's check (the --init-from reader),
    naming it; a stage that does not hold it serves."""
    from safetensors.torch import load_file, save_file

    from chipfuse.serve.hf import StageModel

    save_tiny(TINY["llama"], tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "model.layers.2.mlp.up_proj.weight"},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'model.layers.2.mlp.up_proj.weight' "
                                           r"missing.*Fix"):
        StageModel(tmp_path, 2, 1)
    first = StageModel(tmp_path, 0, 2)
    torch.testing.assert_close(first.blocks[1].mlp.up_proj.weight, weights["model.layers.1.mlp.up_proj.weight"],
                               atol=0, rtol=0)


def test_one_reader_of_safetensors_in_the_package():
    """Training's --init-from, export's checks and serving share model/weights.py: no other module opens
    a safetensors file."""
    from pathlib import Path

    import chipfuse

    root = Path(chipfuse.__file__).parent
    readers = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if "safe_open" in p.read_text())
    assert readers == ["model/weights.py"]
