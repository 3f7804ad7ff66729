"""Serving runtime: greedy parity with transformers' generate over 2- and 3-stage unequal placements,
KV caches split across stage boundaries, concurrent requests, a lost device, and the HTTP API driven by a
real client (httpx) with streaming, bad requests and a disconnect."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from chipfuse.cluster.builtin import default_pool
from chipfuse.plan.serve import fixed_plan
from chipfuse.serve.engine import Engine, Request, ServeConfig
from chipfuse.serve.hf import StageModel, load_tokenizer, model_spec
from tests.serve_models import reference, tiny_model

PROMPTS = [[5, 9, 33, 71, 4, 100], [7, 8, 9], [50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150], [3]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("llama"), "llama", layers=4)


@pytest.fixture(scope="module")
def engine3(llama):
    """3 stages of 1, 2 and 1 layers on the built-in pool's unequal emulated devices, paced (slowly enough
    that a streamed answer is still running when its client disconnects); prompts prefilled in chunks of 4
    tokens, so that every parity test below also runs chunked prefill across stage boundaries."""
    plan = fixed_plan(default_pool(), model_spec(llama), {"fast": 1, "mid": 2, "slow": 1}, context_len=128,
                      concurrency=4, dtype="fp32")
    eng = Engine(llama, default_pool(), plan, ServeConfig(emulated_step_s=0.002, prefill_chunk_tokens=4)).start()
    yield eng
    eng.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_stage_chain_kv_caches_equal_the_full_models(tmp_path, arch):
    """In one process: stages [0], [1, 2], [3] each keep the KV cache of their own layers only, and those
    caches equal the full model's for the same layers after a prefill and three decode steps."""
    from transformers import AutoModelForCausalLM

    d = tiny_model(tmp_path, arch, layers=4)
    stages = [StageModel(d, 0, 1), StageModel(d, 1, 2), StageModel(d, 3, 1)]
    caches = [s.new_cache() for s in stages]
    full = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = PROMPTS[2]
    x, ours = torch.tensor([prompt]), []
    for _ in range(4):
        h = x
        for s, c in zip(stages, caches, strict=True):
            h = s(h, c)
        ours.append(int(torch.argmax(h)))
        x = torch.tensor([[ours[-1]]])
    with torch.no_grad():
        out = full(torch.tensor([prompt + ours[:3]]), use_cache=True)
    ref_cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert ours == out.logits[0, len(prompt) - 1:].argmax(-1).tolist()
    for s, c in zip(stages, caches, strict=True):
        for layer in range(4):
            held = c.layers[layer].keys is not None and c.layers[layer].keys.numel() > 0 \
                if hasattr(c.layers[layer], "keys") else False
            assert held == (layer in s.layer_ids)  # a stage holds only its own layers' cache
            if held:
                # Same operations in the same order in fp32: equal up to float rounding of reordered sums.
                torch.testing.assert_close(c.layers[layer].keys, ref_cache.layers[layer].keys, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(c.layers[layer].values, ref_cache.layers[layer].values, rtol=1e-5,
                                           atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_prefilled_in_chunks_gives_the_full_models_tokens(tmp_path, arch):
    """Chunks after the first attend to the cached positions (a mask, not SDPA's top-left causal flag)."""
    from transformers import AutoModelForCausalLM

    d = tiny_model(tmp_path, arch, layers=2)
    stages = [StageModel(d, 0, 1), StageModel(d, 1, 1)]
    caches = [s.new_cache() for s in stages]
    prompt = PROMPTS[2]
    for start in range(0, len(prompt), 4):
        h = torch.tensor([prompt[start:start + 4]])
        for s, c in zip(stages, caches, strict=True):
            h = s(h, c)
    full = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = full(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4)  # fp32, sums in another order: rounding only


@pytest.mark.slow
def test_decode_keeps_going_while_a_long_prompt_is_prefilled(llama, engine3):
    """A request decoding when a 60-token prompt arrives keeps getting tokens while that prompt is prefilled
    in chunks of 4 (the whole prompt in one step would hold it for that step), and both answers stay exact."""
    order: list[str] = []
    running = threading.Event()
    done = threading.Semaphore(0)

    def on(name: str):
        def f(ev: tuple) -> None:
            if ev[0] == "token":
                order.append(name)
                if order.count("a") == 2:
                    running.set()
            else:
                done.release()
        return f

    long_prompt = [(7 * i) % 200 + 3 for i in range(60)]
    a = Request(prompt=PROMPTS[1], max_new=40, on_event=on("a"))
    engine3.submit(a)
    running.wait(60)
    order.append("submit")
    c = Request(prompt=long_prompt, max_new=4, on_event=on("c"))
    engine3.submit(c)
    done.acquire(timeout=120)
    done.acquire(timeout=120)
    between = order[order.index("submit"):order.index("c")]
    assert between.count("a") >= 4, order  # 15 chunks: several trips around the pipeline, a token each
    assert a.generated == reference(llama, PROMPTS[1], 40) and c.generated == reference(llama, long_prompt, 4)


def test_three_stage_unequal_greedy_equals_transformers_and_concurrency_changes_nothing(llama, engine3):
    refs = [reference(llama, p, 10) for p in PROMPTS]
    solo = [engine3.generate(p, 10)[0] for p in PROMPTS]
    assert solo == refs  # token for token
    got: list = [None] * len(PROMPTS)

    def go(i: int) -> None:
        got[i] = engine3.generate(PROMPTS[i], 10)[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == refs  # requests joining and leaving between decode steps change no token
    a = engine3.generate(PROMPTS[0], 8, temperature=0.9, top_p=0.8, seed=7)[0]
    b = engine3.generate(PROMPTS[0], 8, temperature=0.9, top_p=0.8, seed=7)[0]
    assert a == b and a != refs[0][:8]  # sampled with the seed, reproducible


def test_stage_workers_meet_at_the_store_training_launchers_host(engine3):
    """The engine hosts the rendezvous as training's supervisor does (runtime.launch.dist.rendezvous): a
    store on a port the OS picked, named in torchrun's environment, where the running workers registered."""
    from torch.distributed import TCPStore

    from chipfuse.runtime.launch import dist as cfdist

    store, env = cfdist.rendezvous(2)
    assert env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == str(store.port) and env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    client = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)
    client.set("k", "v")
    assert store.get("k") == b"v"
    running = TCPStore(cfdist.LOCAL_ADDR, engine3._store.port, is_master=False)
    assert running.num_keys() > 0  # the 3 workers' process group keys


@pytest.mark.slow
def test_two_stage_qwen2_with_tied_embeddings(tmp_path):
    d = tiny_model(tmp_path, "qwen2", layers=3)
    plan = fixed_plan(default_pool(), model_spec(d), {"mid": 2, "fast": 1}, context_len=64, concurrency=2,
                      dtype="fp32")
    eng = Engine(d, default_pool(), plan).start()
    try:
        assert [eng.generate(p, 8)[0] for p in PROMPTS[:2]] == [reference(d, p, 8) for p in PROMPTS[:2]]
    finally:
        eng.close()


@pytest.mark.slow
def test_lost_device_is_reported_and_the_survivors_finish_the_answer(llama):
    plan = fixed_plan(default_pool(), model_spec(llama), {"fast": 2, "mid": 1, "slow": 1}, context_len=64,
                      concurrency=2, dtype="fp32")
    eng = Engine(llama, default_pool(), plan, ServeConfig(fail_after_steps={"mid": 4})).start()
    try:
        toks, reason = eng.generate(PROMPTS[0], 10)
        assert eng.lost == ["mid"] and "mid" not in eng.plan.devices
        assert toks == reference(llama, PROMPTS[0], 10) and reason == "length"  # greedy continues exactly
    finally:
        eng.close()


# ------------------------------------------------------------------------------------------ HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(llama, engine3):
    import uvicorn

    from chipfuse.serve.http import make_app

    port = _free_port()
    app = make_app(engine3, load_tokenizer(llama), model_name="tiny", api_key="sekrit")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


def test_http_api(server, llama, engine3):
    import httpx

    auth = {"Authorization": "Bearer sekrit"}
    with httpx.Client(base_url=server, headers=auth, timeout=60) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["emulated"] is True
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["usage"]["completion_tokens"] == 6
        tok = load_tokenizer(llama)
        assert body["choices"][0]["text"] == tok.decode(reference(llama, PROMPTS[0], 6), skip_special_tokens=True)
        # Streaming chat: server-sent events ending with [DONE], the same text as the answer in one piece.
        msgs = [{"role": "user", "content": "w1 w2 w3"}]
        whole = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0}).json()
        parts = []
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": msgs, "max_tokens": 5, "temperature": 0, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            parts.append(json.loads(ln[6:])["choices"][0]["delta"].get("content", ""))
        assert "".join(parts) == whole["choices"][0]["message"]["content"]
        # Bad requests: 4xx with a message naming the field.
        for payload, status, param in (({"prompt": "w1", "max_tokens": -3}, 400, "max_tokens"),
                                       ({"prompt": 7}, 400, "prompt"),
                                       ({"prompt": "w1", "temperature": "hot"}, 400, "temperature"),
                                       ({"prompt": [99999]}, 400, "prompt"),
                                       ({"prompt": "w1", "model": "other"}, 404, "model")):
            r = c.post("/v1/completions", json=payload)
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
        r = c.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": "hi"}).status_code == 400
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "w1"}).status_code == 401


def test_http_client_that_disconnects_frees_its_slot(server, engine3):
    import httpx

    with httpx.Client(base_url=server, headers={"Authorization": "Bearer sekrit"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 110, "stream": True,
                                                       "temperature": 0}) as s:
            for n, _ in enumerate(s.iter_lines()):
                if n >= 4:
                    break  # leave mid-answer: the response is closed here
    deadline = time.time() + 20
    while engine3.requests and time.time() < deadline:
        time.sleep(0.1)
    assert not engine3.requests  # cancelled on every stage, slot free
    # and the server still answers
    assert engine3.generate(PROMPTS[3], 3)[0] == engine3.generate(PROMPTS[3], 3)[0]


@pytest.mark.slow
def test_generate_from_a_training_checkpoint_equals_transformers_on_its_export(tmp_path, capsys):
    """`chipfuse generate --model CHECKPOINT`: the checkpoint of 2 training steps is exported on the fly
    (chipfuse export's reader) and gives transformers' greedy tokens on the exported folder; a folder that
    is neither a model nor a checkpoint is one line naming it."""
    from chipfuse.cli import main
    from chipfuse.model.build import build_stage
    from chipfuse.model.configs import resolve_model
    from chipfuse.model.export import export_checkpoint
    from chipfuse.model.gpt import loss_sum
    from chipfuse.runtime.endure import checkpoint
    from tests.pipeline_helpers import plan_of

    src = tiny_model(tmp_path / "src", "llama", layers=2)
    spec = resolve_model(str(src))
    plan = plan_of(spec, [([("a", 2)], 2, 2)])
    module = build_stage(spec, plan.replicas[0].stages, 0, init_from=str(src))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, spec.vocab_size, (2, 33))
        opt.zero_grad()
        loss_sum(module(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
    ck = checkpoint.save(tmp_path / "ck", step=2, model=module, optimizer=opt, plan=plan.to_dict(),
                         extra={"tokenizer": str(src)})
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(ck), "--prompt", "w1 w5 w9 w2", "--max-new-tokens", "6",
                 "--dtype", "fp32", "--prefill-chunk", "3", "--json", str(out)]) == 0  # 2 chunks
    got = json.loads(out.read_text())
    exported = tmp_path / "hf"
    export_checkpoint(ck, exported)
    ids = list(load_tokenizer(src)("w1 w5 w9 w2")["input_ids"])
    assert got["tokens"] == reference(exported, ids, 6) and got["emulated"] is True
    assert got["tokens"] != reference(src, ids, 6)  # the trained weights, not the ones training started from
    assert "EMULATED" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "manifest.json" in err[0] and "Fix:" in err[0]
