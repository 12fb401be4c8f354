"""Load a causal LM and its tokenizer; find its decoder blocks and their linear layers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from core.errors import SparseAllocError
from core.units import UnitLayout
from pruning.gguf import load_gguf

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
# model_type values whose decoder blocks and linears we find and prune.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "opt",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` spelling of ``dtype`` (fp32, bf16, fp16)."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SparseAllocError(f"--device {requested} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on CUDA and fp32 on CPU."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise SparseAllocError(f"unknown dtype {requested!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def _resolve_spec(spec: str) -> str:
    """``default`` (or another packaged model's name, e.g. ``gemma3-270m``) → its cached directory; a hub id
    fetched with ``sparsealloc fetch --model`` → its directory in ``$SPARSEALLOC_MODEL_CACHE`` (no network);
    anything else unchanged."""
    from pruning.assets import PACKAGED_MODELS, packaged_model_dir

    if spec in PACKAGED_MODELS:
        return str(packaged_model_dir(spec))
    if not spec.endswith(".gguf") and not Path(spec).expanduser().exists():
        from pruning.hub import cached_model_dir

        cached = cached_model_dir(spec)
        if cached is not None:
            log.debug("model %s from the fetched copy in %s", spec, cached)
            return str(cached)
    return spec


def num_blocks_of(spec: str) -> int:
    """Number of decoder blocks, read from the model's config without loading weights."""
    from transformers import AutoConfig

    spec = _resolve_spec(spec)
    try:
        if spec.endswith(".gguf"):
            config = AutoConfig.from_pretrained(Path(spec).parent, gguf_file=Path(spec).name)
        else:
            config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise SparseAllocError(f"could not read the config of model {spec!r}: {str(exc).splitlines()[0]}") from exc
    return int((getattr(config, "text_config", None) or config).num_hidden_layers)


def load_tokenizer(spec: str):
    """Just the tokenizer of a model spec (for drivers that hold no model)."""
    from transformers import AutoTokenizer

    spec = _resolve_spec(spec)
    try:
        if spec.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(Path(spec).parent, gguf_file=Path(spec).name)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise SparseAllocError(f"could not load the tokenizer of {spec!r}: {str(exc).splitlines()[0]}") from exc


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """Model (eval mode) and tokenizer from ``default``, a ``.gguf`` file, a local HF dir or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _resolve_spec(spec)
    if spec.endswith(".gguf"):
        model, tokenizer = load_gguf(Path(spec), dtype)
    else:
        local = Path(spec).expanduser()
        if local.exists() and not (local / "config.json").exists():
            raise SparseAllocError(f"{local} exists but is not a Hugging Face model directory (no config.json)")
        if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise SparseAllocError(f"model path {spec} does not exist; give a local directory, a .gguf file, "
                                   "a Hugging Face model id, or 'default'")
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise SparseAllocError(
                f"could not load model {spec!r}: {str(exc).splitlines()[0]}. Give a local Hugging Face "
                "directory, a .gguf file, 'default', or a hub id reachable from this machine (or cached "
                "beforehand with `sparsealloc fetch --model ID`)."
            ) from exc
    check_supported(model)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def check_supported(model) -> None:
    """Raise unless the model's architecture is one whose blocks we know how to prune."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SparseAllocError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _num_layers(model) -> int:
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    return int(text_config.num_hidden_layers)


def find_blocks(model) -> nn.ModuleList:
    """The decoder blocks: the ``...layers`` ModuleList with ``num_hidden_layers`` entries."""
    expected = _num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == expected:
            return module
    raise SparseAllocError(f"could not find {expected} decoder blocks in {type(model).__name__}")


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in a block, by its name inside the block (all are pruned)."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def unit_layout(model) -> UnitLayout:
    """The model's prunable linears per block, with their weight counts (what profiles' units cover)."""
    return UnitLayout(tuple(tuple((name, lin.weight.numel()) for name, lin in find_linears(block).items())
                            for block in find_blocks(model)))


def block_param_counts(model) -> list[int]:
    """Prunable weights per block (sum over its linears), for parameter-weighted means."""
    return [sum(lin.weight.numel() for lin in find_linears(block).values()) for block in find_blocks(model)]
