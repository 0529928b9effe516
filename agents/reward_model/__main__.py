"""Reward modelling — Bradley-Terry and pairwise preference models (RLHF Workflow, https://arxiv.org/abs/2405.07863).

Run:
    python -m agents.reward_model                                # embedded env: pairs labelled by the LLM judge
    python -m agents.reward_model +env=arithmetic                # correct-vs-incorrect pairs from the verifier
    python -m agents.reward_model +env=arithmetic kind=pairwise  # an "A or B" preference model instead
    python -m agents.reward_model data.source=file data.path=pairs.jsonl
    python -m agents.reward_model +env=arithmetic +experiment=smoke   # tiny model, a few steps

The trained model is written to ``<run_dir>/reward_model`` (safetensors; LoRA merged) and its held-out evaluation
to ``<run_dir>/eval.json``; the pairs to ``pairs_train.jsonl`` / ``pairs_test.jsonl`` and, with ``data.source=task``,
every env dialogue they came from to the rollout store ``pairs_rollouts.jsonl``. Use it as the env reward by path:
``gym.make("MultiTurnDialogue-v0", task="arithmetic", reward="<run_dir>/reward_model")`` (kind=bt), or
``reward="pairwise:<run_dir>/reward_model"`` (kind=pairwise).

kind=bt: the backbone with a bias-free one-output linear head (``AutoModelForSequenceClassification``,
num_labels=1), read at the last non-pad token of the chat-templated conversation (the end-of-turn token of the
reply), trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).
kind=pairwise: the causal LM itself, prompted with context, reply A and reply B, trained so that the next token is
the letter of the preferred reply (loss -log sigmoid(logit_correct - logit_other)); every pair is shown in both
orders; served by :class:`dialogue_gym.rewards.PairwisePreferenceReward`, which averages both orders.

Departures from the paper and its reference code:
  1. Pairs come from the env (n replies of a generator model to each task row, played through the agents'
     branching primitive with seeded branches and scored by the env's reward: a verifier for verifiable tasks,
     else the LLM judge) or from a preference file / hub data set; the paper trains on a fixed mixture of public
     preference data sets.
  2. LoRA by default (full fine-tuning with policy.lora_r=0; trainable_layers=k trains the top k layers only) and
     defaults sized for a 2-core CPU (lr 1e-4, small batches, max_length 512); the reference is full fine-tuning
     at lr 2e-6, batch 512, 1 epoch, max length 4096.
  3. The padding token is a token distinct from EOS (the model's config and the saved tokenizer say so), because
     EOS-as-padding makes chosen and rejected score alike (the pitfall the paper reports).
  4. The pairwise model's loss covers the two letter logits only (a softmax over {"A", "B"}), which is exactly the
     quantity the server reads; the reference trains the full next-token cross-entropy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agents.common.config import build_task_early, merge_schema
from agents.common.evaluation import save_json
from agents.common.logging import MetricLogger
from agents.common.policy import export_policy, trainable_parameters
from agents.common.preferences import Preference
from agents.common.run import setup_logging
from agents.common.train import make_optimizer
from agents.reward_model.config import RewardModelConfig, validate
from agents.reward_model.data import read_pairs, sample_task_pairs, write_pairs
from agents.reward_model.losses import bt_loss, preference_loss
from dialogue_gym.rewards.classifier import (
    SequenceClassifierReward,
    choose_pad_id,
    classifier_forward,
    conversation_token_ids,
)
from dialogue_gym.rewards.pairwise import (
    PairwisePreferenceReward,
    letter_token_ids,
    next_letter_logits,
    pairwise_prompt_ids,
)

log = logging.getLogger("agents.reward_model")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# ---- model --------------------------------------------------------------------------------------------------------


def load_backbone(kind: str, name: str, seed: int = 0, device: str = "auto", dtype: str = "auto"
                  ) -> tuple[Any, Any]:
    """The untrained reward model and its tokenizer: a one-output classifier (bt) or the causal LM (pairwise).

    ``device``/``dtype``: as :class:`agents.common.policy.PolicySettings` (bf16 weights on CUDA, fp32 on CPU;
    the new classifier head follows the backbone's dtype, scores are read in fp32).
    The classifier head (new weights) is initialised from ``seed``. The padding token is set to a token distinct
    from EOS, in the tokenizer and in the model's config, so the saved model reads at the right position.
    """
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    from dialogue_gym.models import (
        TINY,
        embedded_model_dir,
        load_model,
        load_pretrained,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        resolve_source,
    )
    from dialogue_gym.models import tiny_config as make_tiny_config

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "pairwise":
            model, tokenizer = load_model(name, shared=False, dtype=torch_dtype, device=dev)
        elif name == TINY:
            tokenizer = load_tokenizer(TINY)
            config = make_tiny_config(len(tokenizer))
            config.num_labels = 1
            model = LlamaForSequenceClassification(config).to(torch_dtype)
        else:
            source = str(embedded_model_dir()) if name == "embedded" else resolve_source(name)
            tokenizer = load_tokenizer(name)
            model = load_pretrained(AutoModelForSequenceClassification, source, name, num_labels=1,
                                     dtype=torch_dtype)
    model.to(dev)
    pad_id = choose_pad_id(tokenizer, model)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    model.config.pad_token_id = pad_id
    model.eval()
    return model, tokenizer


def _cuda_devices(model: Any) -> list[torch.device]:
    """The model's CUDA device, if any: adapters initialised there draw from its generator."""
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


def add_lora(model: Any, kind: str, r: int, alpha: int, dropout: float, targets: list[str], seed: int) -> Any:
    """Wrap the model with LoRA adapters (for bt, the head is trained in full through peft's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                        task_type="SEQ_CLS" if kind == "bt" else "CAUSAL_LM")
    with torch.random.fork_rng(devices=_cuda_devices(model), device_type="cuda"):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def keep_top_layers(model: Any, k: int) -> None:
    """Freeze the embeddings and every decoder layer below the top ``k`` (no-op for k = 0)."""
    if k <= 0:
        return
    layers = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER.search(n))]
    if not layers:
        raise ValueError("trainable_layers needs a model whose parameters are named '...layers.<i>...'")
    lowest = max(layers) + 1 - k
    for n, p in model.named_parameters():
        m = _LAYER.search(n)
        if "embed" in n or (m is not None and int(m.group(1)) < lowest):
            p.requires_grad_(False)


def build_model(cfg: RewardModelConfig) -> tuple[Any, Any]:
    """Backbone + LoRA (policy.lora_r > 0) + layer freezing (trainable_layers), seeded."""
    model, tokenizer = load_backbone(cfg.kind, cfg.policy.model, cfg.seed, cfg.policy.device, cfg.policy.dtype)
    p = cfg.policy
    if p.lora_r > 0:
        model = add_lora(model, cfg.kind, p.lora_r, p.lora_alpha, p.lora_dropout, p.lora_targets, cfg.seed)
    keep_top_layers(model, cfg.trainable_layers)
    if p.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


# ---- data ---------------------------------------------------------------------------------------------------------


def load_pairs(cfg: RewardModelConfig) -> tuple[list[Preference], list[Preference], dict[str, Any]]:
    """Training and held-out pairs, and data statistics."""
    d = cfg.data
    if d.source == "task":
        from agents.common.run import make_vec, sampling_params
        from dialogue_gym.generation.hf import HFEngine
        from dialogue_gym.models import load_model
        from dialogue_gym.rewards import build_reward
        from dialogue_gym.rollout_store import RolloutStore

        task = build_task_early(cfg.env)
        env_config = dataclasses.replace(cfg.env, task=task, task_kwargs={})  # the built task, shared
        reward = build_reward(cfg.env.reward if cfg.env.reward is not None else task.default_reward, task, env_config)
        env_config = dataclasses.replace(env_config, reward=reward)  # one reward (one judge) for every env
        for name, want, split in (("dialogues", cfg.dialogues, "train"),
                                  ("eval.dialogues", cfg.eval.dialogues, "test")):
            if want > len(task.rows(split)):
                raise ValueError(f"{name} is {want} but the task has {len(task.rows(split))} rows in that split")
        engine = HFEngine(load_model(d.generator, device=cfg.policy.device, dtype=cfg.policy.dtype),
                          max_batch_size=d.generation_batch_size, seed=cfg.seed)
        params = sampling_params(cfg.sampling)
        chunk = max(1, d.generation_batch_size // d.n)  # rows per chunk: n replies each in one generate call
        store = RolloutStore(Path(cfg.run_dir) / "pairs_rollouts.jsonl")  # every reply played, scored as paired
        store.path.unlink(missing_ok=True)

        def sample(split: str, count: int, seed: int) -> tuple[list[Preference], dict[str, Any]]:
            size = min(chunk, count)
            rollin = make_vec(env_config, size, split=split, reward_mode="terminal")
            branches = make_vec(env_config, size * d.n, split=split, reward_mode="terminal")
            return sample_task_pairs(rollin, branches, engine, params, list(range(count)), d.n, d.pairs_per_row,
                                     d.min_gap, d.reference_chosen, seed, store, {"split": split})

        train, train_stats = sample("train", cfg.dialogues, cfg.seed)
        test, test_stats = sample("test", cfg.eval.dialogues, cfg.seed + 1)
        stats = {"source": "task", "task": task.describe(), "reward": reward.describe(), "generator": d.generator,
                 "train": train_stats, "test": test_stats}
    else:
        train, dropped = read_pairs(d.source, d.path, d.hub_id, d.hub_split)
        stats = {"source": d.source, "dropped": dropped}
        if d.eval_path is not None:
            test, _ = read_pairs("file", d.eval_path, None)
        else:
            n_test = max(1, round(d.test_fraction * len(train)))
            if n_test >= len(train):
                raise ValueError(f"{len(train)} pairs cannot be split into train and held-out (test_fraction "
                                 f"{d.test_fraction})")
            train, test = train[:-n_test], train[-n_test:]
    if d.max_pairs:
        train = train[:d.max_pairs]
    if not train:
        raise ValueError(f"no training pairs: {stats}. With source=task, sample more rows (dialogues), more "
                         "replies per row (data.n), lower data.min_gap or set data.reference_chosen=true")
    stats["train_pairs"], stats["test_pairs"] = len(train), len(test)
    return train, test, stats


def tokenize(pairs: list[Preference], kind: str, tokenizer: Any, max_length: int) -> list[tuple[list[int], ...]]:
    """Per pair: (chosen ids, rejected ids) for bt; (prompt with chosen as A, prompt with chosen as B) for pairwise."""
    if kind == "bt":
        return [(conversation_token_ids(tokenizer, p.context + [{"role": "assistant", "content": p.chosen}],
                                        max_length),
                 conversation_token_ids(tokenizer, p.context + [{"role": "assistant", "content": p.rejected}],
                                        max_length)) for p in pairs]
    return [(pairwise_prompt_ids(tokenizer, p.context, p.chosen, p.rejected, max_length),
             pairwise_prompt_ids(tokenizer, p.context, p.rejected, p.chosen, max_length)) for p in pairs]


# ---- training -----------------------------------------------------------------------------------------------------


def pair_loss(model: Any, kind: str, batch: list[tuple[list[int], ...]], pad_id: int,
              letters: tuple[int, int]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch of tokenised pairs (one forward pass over all its sequences)."""
    if kind == "bt":
        scores = classifier_forward(model, [b[0] for b in batch] + [b[1] for b in batch], pad_id, "right",
                                    pass_positions=False)  # (2b,)
        return bt_loss(scores[:len(batch)], scores[len(batch):])
    logits = next_letter_logits(model, [b[0] for b in batch] + [b[1] for b in batch], letters, pad_id)  # (2b, 2)
    n = len(batch)
    # the chosen reply is A in the first n prompts and B in the last n
    correct = torch.cat([logits[:n, 0], logits[n:, 1]])
    other = torch.cat([logits[:n, 1], logits[n:, 0]])
    return preference_loss(correct, other)


def train_step(model: Any, optimizer: Any, scheduler: Any, kind: str, batch: list[tuple[list[int], ...]],
               micro: int, pad_id: int, letters: tuple[int, int], max_grad_norm: float) -> dict[str, float]:
    """One optimizer step over ``batch`` pairs, ``micro`` pairs per forward/backward."""
    model.train()
    totals: dict[str, float] = {}
    for start in range(0, len(batch), micro):
        chunk = batch[start:start + micro]
        loss, metrics = pair_loss(model, kind, chunk, pad_id, letters)
        (loss * len(chunk) / len(batch)).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk) / len(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    totals["optim/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals["optim/lr"] = float(scheduler.get_last_lr()[0])
    model.eval()
    return totals


# ---- evaluation ---------------------------------------------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation, or None when either side has no variance (or fewer than 2 points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def evaluate(model: Any, tokenizer: Any, kind: str, pairs: list[Preference], max_length: int,
             batch_size: int) -> dict[str, Any]:
    """Held-out pairwise accuracy, mean margin and the correlation of the reward with reply length.

    bt: accuracy = share of pairs with r(chosen) > r(rejected); margin = mean r(chosen) - r(rejected);
    length_pearson = Pearson correlation of the reward with the reply's characters over all 2N replies.
    pairwise: accuracy = share with P(chosen beats rejected) > 0.5 (both orders averaged); margin = mean of
    P - 0.5; length_pearson = correlation of logit(P) with len(chosen) - len(rejected).
    """
    if not pairs:
        return {"pairs": 0, "accuracy": None, "mean_margin": None, "length_pearson": None}
    chosen_lens = np.array([len(p.chosen) for p in pairs], dtype=np.float64)
    rejected_lens = np.array([len(p.rejected) for p in pairs], dtype=np.float64)
    if kind == "bt":
        scorer = SequenceClassifierReward((model, tokenizer), max_length=max_length, batch_size=batch_size)
        convs = [p.context + [{"role": "assistant", "content": r}] for p in pairs for r in (p.chosen, p.rejected)]
        scores = scorer.score(convs)
        rc, rr = scores[0::2], scores[1::2]
        correct, margins = rc > rr, rc - rr
        length = pearson(scores, np.stack([chosen_lens, rejected_lens], axis=1).reshape(-1))
        extra = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std())}
    else:
        judge = PairwisePreferenceReward((model, tokenizer), batch_size=batch_size, max_prompt_tokens=max_length)
        prob = judge.prefer([p.context for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
        correct, margins = prob > 0.5, prob - 0.5
        clipped = np.clip(prob, 1e-12, 1 - 1e-12)
        length = pearson(np.log(clipped / (1 - clipped)), chosen_lens - rejected_lens)
        extra = {"ties": int((prob == 0.5).sum())}
    out: dict[str, Any] = {"pairs": len(pairs), "accuracy": float(correct.mean()),
                           "mean_margin": float(margins.mean()), "length_pearson": length, **extra}
    kinds = np.array([p.kind for p in pairs])
    out["by_kind"] = {k: {"pairs": int((kinds == k).sum()), "accuracy": float(correct[kinds == k].mean())}
                      for k in sorted(set(kinds))}
    return out


def _eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}


# ---- the run ------------------------------------------------------------------------------------------------------


def run(cfg: RewardModelConfig) -> dict[str, Any]:
    """Build the pairs, train, evaluate, export. Returns the evaluation record (also written to eval.json)."""
    from dialogue_gym.progress import Progress

    validate(cfg)
    if cfg.data.source == "task":
        build_task_early(cfg.env)  # a bad task setting fails here, before any model loads
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    train_pairs, test_pairs, data_stats = load_pairs(cfg)
    write_pairs(run_dir / "pairs_train.jsonl", train_pairs)
    write_pairs(run_dir / "pairs_test.jsonl", test_pairs)
    data_seconds, data_cpu = time.perf_counter() - t0, time.process_time() - c0
    log.info("data: %d training and %d held-out pairs in %.0f s (%s)", len(train_pairs), len(test_pairs),
             data_seconds, data_stats.get("train", data_stats.get("source")))

    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg)
    pad_id = model.config.pad_token_id
    letters = letter_token_ids(tokenizer)
    o = cfg.optim
    train_ids = tokenize(train_pairs, cfg.kind, tokenizer, o.max_length)
    steps_per_epoch = math.ceil(len(train_ids) / o.batch_size)
    total_steps = cfg.iterations * o.epochs * steps_per_epoch
    optimizer, scheduler = make_optimizer(model, o, total_steps)
    logger = MetricLogger(run_dir)
    n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
    log.info("%s reward model on %s: %d trainable parameters, %d steps of %d pairs", cfg.kind, cfg.policy.model,
             n_trainable, total_steps, o.batch_size)

    eval_batch = 2 * o.micro_batch_size
    initial = evaluate(model, tokenizer, cfg.kind, test_pairs, o.max_length, eval_batch)
    logger.log(0, _eval_metrics(initial))
    rng = np.random.default_rng(cfg.seed)
    step, t_train, c_train = 0, time.perf_counter(), time.process_time()
    bar = Progress(total=total_steps, desc=f"training ({cfg.kind})", unit="step")
    for _ in range(cfg.iterations * o.epochs):
        order = rng.permutation(len(train_ids))
        for start in range(0, len(order), o.batch_size):
            t_step = time.perf_counter()
            batch = [train_ids[i] for i in order[start:start + o.batch_size]]
            metrics = train_step(model, optimizer, scheduler, cfg.kind, batch, o.micro_batch_size, pad_id, letters,
                                 o.max_grad_norm)
            step += 1
            elapsed = time.perf_counter() - t_step
            metrics.update({"perf/step_s": elapsed, "perf/pairs_per_s": len(batch) / elapsed,
                            "perf/tokens_per_s": sum(len(s) for b in batch for s in b) / elapsed})
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                metrics.update(_eval_metrics(evaluate(model, tokenizer, cfg.kind, test_pairs, o.max_length,
                                                      eval_batch)))
            logger.log(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=float(metrics.get('loss/bt', metrics.get('loss/preference', 0.0))),
                            acc=float(metrics['rm/accuracy']))
    bar.close()
    train_seconds, train_cpu = time.perf_counter() - t_train, time.process_time() - c_train
    final = evaluate(model, tokenizer, cfg.kind, test_pairs, o.max_length, eval_batch)
    logger.log(step, _eval_metrics(final))
    logger.close()

    trainables = trainable_parameters(model)
    if n_trainable < sum(p.numel() for p in model.parameters()):  # LoRA or frozen layers: keep them apart too
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in trainables.items()},
                  str(run_dir / "trainable.safetensors"))
    model_dir = run_dir / "reward_model"
    if cfg.export:
        export_policy(model, tokenizer, model_dir)
    record = {
        "kind": cfg.kind, "model_dir": str(model_dir) if cfg.export else None,
        "serve_as": (str(model_dir) if cfg.kind == "bt" else f"pairwise:{model_dir}") if cfg.export else None,
        "initial": initial, "final": final, "data": data_stats,
        "train": {"pairs": len(train_pairs), "steps": step, "trainable_parameters": n_trainable,
                  "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
                  "total_seconds": round(time.perf_counter() - t0, 1),
                  # CPU time of this process (all its threads): on a shared machine, wall time also counts waiting
                  "data_cpu_seconds": round(data_cpu, 1), "train_cpu_seconds": round(train_cpu, 1),
                  "total_cpu_seconds": round(time.process_time() - c0, 1), "threads": torch.get_num_threads()},
        "config": asdict(cfg),
    }
    save_json(run_dir / "eval.json", record)
    log.info("held-out pairs: %d | accuracy %s -> %s | mean margin %s -> %s | length Pearson %s -> %s",
             final["pairs"], *(_fmt(r[k]) for k in ("accuracy", "mean_margin", "length_pearson")
                               for r in (initial, final)))
    print(f"reward model ({cfg.kind}): held-out accuracy {_fmt(final['accuracy'])} on {final['pairs']} pairs, mean "
          f"margin {_fmt(final['mean_margin'])}, length Pearson {_fmt(final['length_pearson'])}; "
          f"model: {record['serve_as']}; eval: {run_dir / 'eval.json'}")
    return record


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


Config = RewardModelConfig  # the contract with the leaderboard: an agent exports its Config schema and run(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="reward_model")
def main(raw: DictConfig) -> None:
    setup_logging()
    from hydra.core.hydra_config import HydraConfig

    cfg = merge_schema(raw, RewardModelConfig)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
