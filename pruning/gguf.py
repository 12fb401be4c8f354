"""Models stored as a single ``.gguf`` file, dequantized to float on load."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from core.errors import SparseAllocError


def _drop_gguf_quantizer(model) -> None:
    """GGUF weights are dequantized on load; forget the quantizer so the model saves as float."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a ``.gguf`` file (dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise SparseAllocError(f"GGUF file {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (struct.error, ValueError, KeyError, IndexError, OSError, EOFError, MemoryError) as exc:
        raise SparseAllocError(
            f"could not read GGUF file {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it is truncated or not a GGUF model: download it again, or give a Hugging Face directory") from exc
    _drop_gguf_quantizer(model)
    return model, tokenizer
