"""`chipfuse plan` end to end: table, JSON that `Plan.from_json` reads, timeline picture, refusals."""

import json
from pathlib import Path

import pytest

from chipfuse.cli import main
from chipfuse.cluster.pool import load_pool
from chipfuse.plan.plan import Plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plan_command_writes_json_and_timeline(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "timeline.png"
    rc = main(["plan", "--pool", str(EXAMPLES / "amp-v100-t4.toml"), "--model", "gpt2-xl", "--global-batch", "64",
               "--seq-len", "1024", "--time-budget", "2", "--json", str(out), "--timeline", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan for gpt2-xl on amp-v100-t4" in text and "proportional-dp" in text and "fastest-only" in text
    d = json.loads(out.read_text())
    assert {"plan", "predicted", "baselines", "search_s", "emulated"} <= set(d)
    assert {"step_s", "tokens_per_s", "mfu", "memory_bytes"} <= set(d["predicted"])
    assert set(d["baselines"]) == {"even", "fastest-only", "proportional-dp"}
    for b in d["baselines"].values():
        assert b is None or {"step_s", "tokens_per_s", "mfu", "memory_bytes"} <= set(b)
    plan = Plan.from_json(out)  # the whole output, as `chipfuse train --plan` reads it
    plan.check_against_pool(load_pool(EXAMPLES / "amp-v100-t4.toml"))
    assert plan.strategy == "chipfuse" and set(d["predicted"]["memory_bytes"]) == set(plan.devices)
    assert png.read_bytes()[:4] == b"\x89PNG" and d["simulated_step_s"] > 0
    # The written plan can be evaluated again without a search, to the same prediction.
    again = tmp_path / "again.json"
    assert main(["plan", "--pool", str(EXAMPLES / "amp-v100-t4.toml"), "--evaluate", str(out), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["predicted"]["step_s"] == pytest.approx(d["predicted"]["step_s"])


def test_plan_reads_a_hugging_face_config(tmp_path):
    cfg = tmp_path / "mini" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 8, "hidden_size": 1024,
                               "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 2816,
                               "vocab_size": 32000, "max_position_embeddings": 2048}))
    out = tmp_path / "p.json"
    assert main(["plan", "--pool", str(EXAMPLES / "metis-a100-v100-t4.toml"), "--model", str(cfg), "--global-batch",
                 "32", "--seq-len", "2048", "--time-budget", "1", "--json", str(out)]) == 0
    assert Plan.from_json(out).model.num_kv_heads == 4


@pytest.mark.parametrize("args,match", [
    (["--model", "no-such-model"], "not a preset nor a config.json"),
    (["--seq-len", "999999"], "seq-len is 999999"),
    (["--pool", "missing.toml"], "no such pool file"),
    (["--evaluate", "missing-plan.json"], "no such plan file"),
])
def test_plan_command_refusals(args, match, capsys):
    base = {"--pool": str(EXAMPLES / "amp-v100-t4.toml"), "--model": "gpt2", "--global-batch": "8", "--seq-len": "128"}
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v
    rc = main(["plan", *[x for kv in base.items() for x in kv], "--time-budget", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "Fix:" in err


def test_plan_command_refuses_a_model_that_fits_nowhere(tmp_path, capsys):
    pool = tmp_path / "tiny.toml"
    pool.write_text('name = "tiny"\n[[node]]\nname = "n"\n[[node.device]]\nname = "t"\nchip = "T4"\nmemory_gib = 0.5\n')
    rc = main(["plan", "--pool", str(pool), "--model", "llama-70b", "--global-batch", "8", "--seq-len", "4096",
               "--time-budget", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no plan fits model 'llama-70b'" in err and "GiB missing" in err and "Fix: add devices" in err


def test_example_pools_load():
    sizes = {p.stem: len(load_pool(p).devices) for p in EXAMPLES.glob("*.toml")}
    assert sizes["big-1024"] == 1024
    assert {"amp-v100-t4", "metis-a100-v100-t4", "export-mix"} <= set(sizes)


def test_plan_for_the_builtin_emulated_pool_says_so(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--pool", "builtin", "--model", "small", "--global-batch", "56", "--seq-len", "128",
                 "--time-budget", "1", "--json", str(out)]) == 0
    assert "EMULATED" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["emulated"] is True
    # The fast emulated device gets the largest share.
    plan = Plan.from_json(out)
    assert plan.global_batch == 56 and set(plan.devices) <= {"fast", "mid", "slow"}


def test_search_flags_are_required_without_evaluate(capsys):
    assert main(["plan", "--pool", str(EXAMPLES / "amp-v100-t4.toml"), "--model", "gpt2"]) == 2
    assert "--global-batch is missing" in capsys.readouterr().err
