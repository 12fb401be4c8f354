"""Memory per stage from the model's config alone, before any work starts.

``load_config`` reads a config (never weights), ``ModelShape.from_config`` builds the model on the meta
device and counts its tensors exactly, ``make_plan`` turns the counts into device and host bytes for
every stage of a search (rank tables, evaluator, Fisher traces, final pass, perplexity) and picks the
evaluator mode, ``check_plan`` refuses a plan that does not fit and says what to change, and
``render_plan`` prints it. Pure functions; no Ray.

Symbols in the docstrings: d = bytes per element of the run dtype, W = prunable linear weights of all
blocks, B = bytes of all block tensors in the dtype, N = bytes of everything outside the blocks
(embeddings, final norm, LM head; tied weights once), L = blocks, H = hidden size, I = intermediate
size, V = vocabulary, T = fitness tokens, s = fitness seqlen, b = batch size (windows per forward),
P = population advanced together in streamed mode, k = GPUs per actor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import SparseAllocError
from pruning.pruners import get_pruner
from scoring.evaluator import LOGPROB_CACHE_LIMIT, cached_logprob_windows, logprob_window_bytes

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
EVALUATOR_MODES = ("auto", "resident", "streamed")
RANK_BYTES = 2  # int16 rank table entry per prunable weight
MAX_GPUS_PER_ACTOR = 64  # how far the advice looks for a --gpus-per-actor that fits


@dataclass(frozen=True)
class ModelShape:
    """Exact tensor counts of a causal LM, read from its config (model built on the meta device)."""

    model_type: str
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    block_linear_weights: tuple[int, ...]  # prunable linear weights per block
    block_elements: tuple[int, ...]  # every tensor element per block (linears, biases, norms, buffers)
    block_linear_shapes: tuple[tuple[tuple[int, int], ...], ...]  # (rows, cols) of each linear, per block
    non_block_elements: int  # embeddings, final norm, LM head (tied once), buffers such as rotary tables
    non_block_buffers: int  # the buffer part of non_block_elements
    largest_linear: tuple[int, int]  # (rows, cols) of the linear with the most weights
    largest_input_width: int  # widest linear input (SparseGPT Hessian: cols² fp32)
    units: dict[str, int] | None = None  # profile entries per granularity (block, group, linear)

    @property
    def linear_weights(self) -> int:
        """W: prunable linear weights over all blocks."""
        return sum(self.block_linear_weights)

    @property
    def total_elements(self) -> int:
        """Every tensor element of the model (blocks and the rest)."""
        return sum(self.block_elements) + self.non_block_elements

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """Count a built model (meta, CPU or GPU; nothing is read from the tensors but their shapes)."""
        from core.units import GRANULARITIES
        from pruning.load import find_blocks, find_linears, unit_layout

        config = model.config
        text = getattr(config, "text_config", None) or config
        blocks = find_blocks(model)
        linear_weights, elements, shapes = [], [], []
        inside: set[int] = set()
        for block in blocks:
            linears = find_linears(block)
            shapes.append(tuple((int(lin.weight.shape[0]), int(lin.weight.shape[1])) for lin in linears.values()))
            linear_weights.append(sum(lin.weight.numel() for lin in linears.values()))
            tensors = {id(t): t for t in (*block.parameters(), *block.buffers())}
            inside.update(tensors)
            elements.append(sum(t.numel() for t in tensors.values()))
        seen: set[int] = set()
        non_block = buffers = 0
        buffer_ids = {id(t) for t in model.buffers()}
        for t in (*model.parameters(), *model.buffers()):
            if id(t) in inside or id(t) in seen:
                continue
            seen.add(id(t))
            non_block += t.numel()
            buffers += t.numel() if id(t) in buffer_ids else 0
        all_shapes = [shape for block in shapes for shape in block]
        if not all_shapes:
            raise SparseAllocError(f"{type(model).__name__} has no linear layers in its decoder blocks")
        largest = max(all_shapes, key=lambda rc: rc[0] * rc[1])
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) \
            or max(rows for rows, _ in all_shapes)
        return cls(
            model_type=str(getattr(config, "model_type", "?")), num_blocks=len(blocks),
            hidden_size=int(text.hidden_size), intermediate_size=int(intermediate), vocab_size=int(text.vocab_size),
            block_linear_weights=tuple(linear_weights), block_elements=tuple(elements),
            block_linear_shapes=tuple(shapes), non_block_elements=non_block, non_block_buffers=buffers,
            largest_linear=largest, largest_input_width=max(cols for _, cols in all_shapes),
            units={g: unit_layout(model).count(g) for g in GRANULARITIES},
        )

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Build the model on the meta device (no memory, no weights) and count it.

        The full config is built first (what ``load_model`` loads, e.g. Gemma3's vision tower too);
        if ``AutoModelForCausalLM`` cannot build it, its ``text_config`` is used."""
        import torch
        from transformers import AutoModelForCausalLM

        from pruning.load import check_supported

        def build(cfg):
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(cfg)

        try:
            model = build(config)
        except (ValueError, KeyError, TypeError) as exc:
            text = getattr(config, "text_config", None)
            if text is None:
                raise SparseAllocError(f"cannot build a causal LM from this config "
                                       f"(model_type {getattr(config, 'model_type', None)!r}): {exc}") from exc
            model = build(text)
        check_supported(model)
        return cls.from_model(model)


def load_config(spec: str):
    """The transformers config of ``default``, a local HF directory (config.json alone is enough),
    a ``.gguf`` file or a hub id; no weights and no tokenizer are read."""
    from transformers import AutoConfig

    from pruning.load import _resolve_spec

    resolved = _resolve_spec(spec)
    local = Path(resolved).expanduser()
    try:
        if resolved.endswith(".gguf"):
            if not local.is_file():
                raise SparseAllocError(f"GGUF file {local} does not exist")
            return AutoConfig.from_pretrained(local.parent, gguf_file=local.name)
        if local.exists() and not (local / "config.json").is_file():
            raise SparseAllocError(f"{local} has no config.json; give a Hugging Face model directory, "
                                   "a .gguf file, 'default' or a hub id")
        return AutoConfig.from_pretrained(str(local) if local.exists() else resolved)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SparseAllocError(f"could not read the config of model {spec!r}: {first}. Give a local Hugging Face "
                               "directory (config.json alone is enough), a .gguf file, 'default', or a hub id "
                               "reachable from this machine.") from exc


def shape_of(spec: str) -> ModelShape:
    """``ModelShape`` of a model spec, from its config alone."""
    return ModelShape.from_config(load_config(spec))


@dataclass(frozen=True)
class StagePlan:
    """One stage's peak memory: on the (busiest) device and on the host."""

    name: str
    mode: str
    device_bytes: int
    host_bytes: int
    fits: bool


@dataclass(frozen=True)
class Plan:
    """Memory per stage for one model and setting, and the evaluator mode chosen."""

    shape: ModelShape
    dtype: str
    device_memory_bytes: int  # budget per device
    host_memory_bytes: int | None  # None: host bytes are reported, not checked
    gpus_per_actor: int
    evaluator_requested: str
    evaluator: str  # "resident" or "streamed"
    stages: tuple[StagePlan, ...]
    fits: bool
    bytes_per_weight: float  # evaluator's weights + rank tables + masked scratch on its busiest device, per parameter
    resident_bytes: int  # evaluator device bytes (per device) in each mode, for the advice
    streamed_bytes: int
    resident_gpus_needed: int | None  # smallest --gpus-per-actor whose resident evaluator fits, if any

    def stage(self, name: str) -> StagePlan:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def _activations(batch: int, seqlen: int, shape: ModelShape, d: int) -> int:
    """Working activations of one forward chunk: b·s·(4·H + 2·I)·d·2."""
    return batch * seqlen * (4 * shape.hidden_size + 2 * shape.intermediate_size) * d * 2


def _logits(batch: int, seqlen: int, shape: ModelShape) -> int:
    """A chunk of fp32 logits with its softmax/KL temporaries: b·s·V·4·3 (the evaluator runs its head
    one window at a time, so b = 1 there)."""
    return batch * seqlen * shape.vocab_size * 4 * 3


def _logprob_cache(shape: ModelShape, tokens: int, seqlen: int) -> int:
    """The evaluator's dense log-prob cache: (s − 1)·V·4 per fitness window, for the leading windows that fit
    in scoring.evaluator's ``LOGPROB_CACHE_LIMIT``."""
    windows = cached_logprob_windows(-(-tokens // seqlen), seqlen, shape.vocab_size, LOGPROB_CACHE_LIMIT)
    return windows * logprob_window_bytes(seqlen, shape.vocab_size)


def _resident_evaluator(shape: ModelShape, d: int, k: int, tokens: int, seqlen: int, batch: int,
                        rank_sets: int = 1) -> tuple[int, int]:
    """(device bytes per device, split part): B + N + 2·W + one block's linears in dtype (masked scratch)
    + L·T·H·d (dense block inputs) + T·H·d (dense final hidden) + the dense log-prob cache + activations
    + logits chunk; with k devices
    the weights and ranks (B + 2·W) split k ways and the rest sits on device 0. ``rank_sets`` 2: a second
    set of rank tables (kl-seq fitness builds one per profile while the dense one is kept)."""
    split = sum(shape.block_elements) * d + rank_sets * RANK_BYTES * shape.linear_weights
    weights_part = -(-split // k) + shape.non_block_elements * d + max(shape.block_linear_weights) * d
    caches = (shape.num_blocks + 1) * tokens * shape.hidden_size * d + _logprob_cache(shape, tokens, seqlen)
    return weights_part + caches + _activations(batch, seqlen, shape, d) + _logits(1, seqlen, shape), weights_part


def _streamed_block(shape: ModelShape, d: int) -> int:
    """One streamed block on the device: its tensors + int16 ranks of its linears + masked scratch."""
    return max(e * d + RANK_BYTES * w + w * d for e, w in zip(shape.block_elements, shape.block_linear_weights))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def make_plan(shape: ModelShape, *, dtype: str, device_memory_bytes: int, gpus_per_actor: int = 1,
              evaluator: str = "auto", fitness_tokens: int = 1024, fitness_seqlen: int = 128, batch_size: int = 4,
              calib_samples: int = 32, seqlen: int = 512, population: int = 8, pruner: str = "wanda",
              host_memory_bytes: int | None = None, sequential_fitness: bool = False) -> Plan:
    """Device and host bytes of every stage, and the evaluator mode (``auto``: resident when it fits the
    per-device budget, else streamed). Host bytes are checked only when ``host_memory_bytes`` is given.
    ``sequential_fitness``: the kl-seq fitness holds a second set of rank tables where the first lives."""
    if dtype not in DTYPE_BYTES:
        raise SparseAllocError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    if evaluator not in EVALUATOR_MODES:
        raise SparseAllocError(f"unknown evaluator mode {evaluator!r}; choose one of {', '.join(EVALUATOR_MODES)}")
    stats_bytes = get_pruner(pruner).stats_bytes
    if gpus_per_actor < 1:
        raise SparseAllocError(f"--gpus-per-actor must be at least 1, not {gpus_per_actor}")
    if device_memory_bytes <= 0:
        raise SparseAllocError("--device-memory-gb must be positive")
    for flag, value in (("fitness tokens", fitness_tokens), ("--fitness-seqlen", fitness_seqlen),
                        ("--batch-size", batch_size), ("--calib-samples", calib_samples), ("--seqlen", seqlen),
                        ("population", population)):
        if value < 1:
            raise SparseAllocError(f"{flag} must be at least 1, not {value}")

    d = DTYPE_BYTES[dtype]
    k = gpus_per_actor
    H, V, L, T = shape.hidden_size, shape.vocab_size, shape.num_blocks, fitness_tokens
    B = sum(shape.block_elements) * d
    N = shape.non_block_elements * d
    W = shape.linear_weights
    block = max(shape.block_elements) * d
    block_linears = max(shape.block_linear_weights)
    params = shape.total_elements
    work = _activations(batch_size, fitness_seqlen, shape, d) + _logits(1, fitness_seqlen, shape)
    calib = 2 * calib_samples * seqlen * H * d

    def device_ok(n: int) -> bool:
        return n <= device_memory_bytes

    def host_ok(n: int) -> bool:
        return host_memory_bytes is None or n <= host_memory_bytes

    rank_sets = 2 if sequential_fitness else 1
    resident, resident_weights = _resident_evaluator(shape, d, k, T, fitness_seqlen, batch_size, rank_sets)
    streamed_weights = N + 2 * _streamed_block(shape, d)
    streamed = streamed_weights + population * T * H * d + T * H * d + _logprob_cache(shape, T, fitness_seqlen) + work
    streamed_host = B + rank_sets * RANK_BYTES * W + L * T * H * d
    if evaluator == "auto":
        mode = "resident" if device_ok(resident) else "streamed"
    else:
        mode = evaluator
    resident_gpus_needed = next((g for g in range(1, MAX_GPUS_PER_ACTOR + 1)
                                 if device_ok(_resident_evaluator(shape, d, g, T, fitness_seqlen, batch_size,
                                                                  rank_sets)[0])),
                                None)

    stages: list[StagePlan] = []

    def add(name: str, stage_mode: str, device: int, host: int) -> None:
        stages.append(StagePlan(name, stage_mode, int(device), int(host), device_ok(device) and host_ok(host)))

    rows, cols = shape.largest_linear
    if mode == "resident":
        add("rank tables", "resident", resident, 0)
        add("evaluator", "resident", resident, 0)
    else:
        add("rank tables", "streamed", N + block + calib + rows * cols * 12, B + RANK_BYTES * W)
        add("evaluator", "streamed", streamed, streamed_host)
    add("fisher traces", "block by block",
        N + 2 * block + 2 * block_linears * 4 + 12 * seqlen * (H + shape.intermediate_size) * 4 + seqlen * V * 4 * 2,
        L * seqlen * H * 4)
    # Statistics of every linear of one block are gathered together (pruning.sequential), so they add up.
    largest_block_shapes = max(shape.block_linear_shapes, key=lambda s: sum(c * c for _, c in s))
    stats = sum(stats_bytes(c) for _, c in largest_block_shapes)
    add(f"final pass ({pruner})", "block by block", N + block + calib + stats, B + N)
    ppl_resident = B + N + _activations(batch_size, seqlen, shape, d) + _logits(batch_size, seqlen, shape)
    if device_ok(ppl_resident):
        add("perplexity", "resident", ppl_resident, 0)
    else:
        add("perplexity", "block by block", N + block + calib, B + N)

    weight_bytes = resident_weights if mode == "resident" else streamed_weights
    return Plan(
        shape=shape, dtype=dtype, device_memory_bytes=int(device_memory_bytes), host_memory_bytes=host_memory_bytes,
        gpus_per_actor=k, evaluator_requested=evaluator, evaluator=mode, stages=tuple(stages),
        fits=all(s.fits for s in stages), bytes_per_weight=weight_bytes / params, resident_bytes=resident,
        streamed_bytes=streamed, resident_gpus_needed=resident_gpus_needed,
    )


def check_plan(plan: Plan) -> None:
    """Raise ``SparseAllocError`` naming every stage that does not fit (bytes needed vs the budget)
    and what to change."""
    if plan.fits:
        return
    budget = plan.device_memory_bytes
    per = "per device" if plan.gpus_per_actor > 1 else "on the device"
    lines = [f"the run does not fit in {_gib(budget)} {per} ({plan.dtype}, {plan.gpus_per_actor} "
             f"device{'s' if plan.gpus_per_actor > 1 else ''} per actor):"]
    worst = 0
    for stage in plan.stages:
        if stage.fits:
            continue
        if stage.device_bytes > budget:
            worst = max(worst, stage.device_bytes)
            lines.append(f"  - {stage.name} ({stage.mode}): needs {_gib(stage.device_bytes)} {per}, "
                         f"budget {_gib(budget)}")
        if plan.host_memory_bytes is not None and stage.host_bytes > plan.host_memory_bytes:
            lines.append(f"  - {stage.name} ({stage.mode}): needs {_gib(stage.host_bytes)} of host memory, "
                         f"host has {_gib(plan.host_memory_bytes)}")
    fixes = []
    evaluator = plan.stage("evaluator")
    if not evaluator.fits and evaluator.device_bytes > budget:
        if plan.evaluator == "resident":
            if plan.streamed_bytes <= budget:
                fixes.append(f"--evaluator streamed (needs {_gib(plan.streamed_bytes)} on the device; blocks "
                             "stream from host memory)")
            if plan.resident_gpus_needed is not None and plan.resident_gpus_needed > plan.gpus_per_actor:
                fixes.append(f"--gpus-per-actor {plan.resident_gpus_needed} (the resident evaluator split over "
                             f"{plan.resident_gpus_needed} devices)")
            elif plan.resident_gpus_needed is None:
                fixes.append(f"--gpus-per-actor: even {MAX_GPUS_PER_ACTOR} devices of {_gib(budget)} cannot hold "
                             "the resident evaluator")
        else:
            fixes.append(f"a device with at least {_gib(plan.streamed_bytes)}: the streamed evaluator keeps two "
                         "blocks, their rank tables and the population's hidden states on it")
            if plan.resident_gpus_needed is not None and plan.resident_gpus_needed > plan.gpus_per_actor:
                fixes.append(f"--gpus-per-actor {plan.resident_gpus_needed} --evaluator resident")
    if worst:
        fixes.append(f"--device-memory-gb {math.ceil(worst / GIB)} if the devices really have that much")
    if plan.dtype == "fp32":
        fixes.append("--dtype bf16 (half the bytes of weights and activations)")
    if any(s.device_bytes > budget for s in plan.stages if s.mode == "block by block"):
        fixes.append("fewer --calib-samples, a shorter --seqlen or a smaller --batch-size for the block-by-block "
                     "stages")
    if plan.host_memory_bytes is not None and any(s.host_bytes > plan.host_memory_bytes for s in plan.stages):
        fixes.append("a host with more memory (streamed and block-by-block stages keep the model on the host)")
    lines.append("change: " + "; or ".join(fixes))
    raise SparseAllocError("\n".join(lines))


def render_plan(plan: Plan) -> str:
    """A readable table of the plan, in GiB."""
    s = plan.shape
    budget = f"{plan.device_memory_bytes / GIB:.2f} GiB per device, {plan.gpus_per_actor} " \
             f"device{'s' if plan.gpus_per_actor > 1 else ''} per actor"
    if plan.host_memory_bytes is not None:
        budget += f"; host {plan.host_memory_bytes / GIB:.2f} GiB"
    chosen = plan.evaluator + (" (auto)" if plan.evaluator_requested == "auto" else "")
    lines = [
        f"model       {s.model_type}: {s.num_blocks} blocks, hidden {s.hidden_size}, intermediate "
        f"{s.intermediate_size}, vocab {s.vocab_size}",
        f"parameters  {s.total_elements:,} ({s.linear_weights:,} prunable in blocks)",
        *([f"units       {', '.join(f'{count} {name}s' for name, count in s.units.items())} (--granularity): a "
           "finer one needs no more device or host memory (each linear is masked just in time)"] if s.units else []),
        f"budget      {plan.dtype}; {budget}",
        f"evaluator   {chosen}; {plan.bytes_per_weight:.2f} bytes per parameter on the device "
        "(weights, rank tables, masked scratch)",
        "",
        f"{'stage':<22}{'mode':<16}{'device GiB':>12}{'host GiB':>12}  fits",
    ]
    for stage in plan.stages:
        lines.append(f"{stage.name:<22}{stage.mode:<16}{stage.device_bytes / GIB:>12.2f}"
                     f"{stage.host_bytes / GIB:>12.2f}  {'yes' if stage.fits else 'NO'}")
    lines.append("")
    lines.append("fits" if plan.fits else "does not fit")
    return "\n".join(lines)


def detect_device_memory() -> tuple[int, bool]:
    """(bytes, is_cuda): the first CUDA device's memory when present, else the host's total memory
    (CPU actors)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), True
    return host_memory(), False


def host_memory() -> int:
    """The host's total physical memory in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
