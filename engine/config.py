"""Frozen configuration, built once at each entry point from flags and passed down (no torch:
the gateway reads :class:`ModelConfig` too)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class DType(enum.Enum):
    """Element type of weights and KV cache."""

    AUTO = "auto"
    """The device's: bfloat16 on CUDA (float16 on a GPU without bfloat16), float32 elsewhere
    (the CPU kernels are float32's; CPUs without AMX gain nothing from bfloat16)."""
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    def resolve(self, device_type: str, has_bfloat16: bool = True) -> DType:
        """The dtype this choice means on a ``device_type`` (``"cpu"``, ``"cuda"``) device;
        ``has_bfloat16``: whether that GPU computes in bfloat16 natively. Only AUTO depends
        on them."""
        if self is not DType.AUTO:
            return self
        if device_type != "cuda":
            return DType.FLOAT32
        return DType.BFLOAT16 if has_bfloat16 else DType.FLOAT16


@dataclass(frozen=True)
class ModelConfig:
    """Which model to serve and how to place it."""

    model: str = DEFAULT_MODEL
    """The default model's name, a local transformers folder, or a hub id in the local cache."""
    dtype: DType = DType.AUTO
    """AUTO: the device's (:meth:`DType.resolve`); both tiers must end with the same one."""
    device: str = "auto"
    """"auto" picks CUDA when a GPU is present, else CPU."""
    cache_dir: Path | None = None
    """Where the default model is converted to once; ``~/.cache/pdserve`` when unset."""
    max_model_len: int | None = None
    """Cap on prompt + output tokens; the model's own context length when unset."""


AUTO_BLOCK_SIZE = 0
"""``CacheConfig.block_size`` when none was given (``--block-size auto``): the engine picks the
device's (as port 0 asks for any port; no block has 0 slots)."""


@dataclass(frozen=True)
class CacheConfig:
    """Shape of the paged KV pool."""

    block_size: int = AUTO_BLOCK_SIZE
    """Token slots per block; :data:`AUTO_BLOCK_SIZE` (the default): the engine picks it for
    its device once it starts (:func:`engine.attention_varlen.choose_block_size`): 16 on CPU
    (the last partial block's waste stays small), 256 on CUDA where varlen FlashAttention
    runs (it reads pages of a multiple of 256 slots), else 16. Both tiers must end with the
    same one (it is part of the KV fingerprint)."""
    num_blocks: int = 2048
    """Blocks in the pool. 2048 x 16 slots x 46 KB/token is ~1.5 GB for the default model."""
    memory: str | None = None
    """Size the pool from memory instead: bytes ("4GiB", "512MiB", "1000000") or a fraction
    ("0.9"). On CUDA a fraction is of the GPU's total memory, less the weights and the peak
    activations of a profiling forward pass at the worst-case step
    (:func:`engine.kv_memory.plan_kv_pool`); on CPU it is of MemAvailable at start."""

    def __post_init__(self) -> None:
        if self.block_size < 0:
            raise ValueError(f"--block-size must be positive (or auto), not {self.block_size}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 64
    """Sequences in the running batch at most."""
    max_num_batched_tokens: int = 2048
    """Tokens computed in one forward pass at most (prompt tokens + one per running sequence)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose token prefix was computed before (chained hashes)."""


class SpeculativeMethod(enum.Enum):
    """Where a decoding sequence's draft tokens come from (``--speculative``)."""

    OFF = "off"
    NGRAM = "ngram"
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last few tokens (in its prompt or its output); no extra model."""
    DRAFT = "draft"
    """A smaller model with the same tokenizer (``draft_model``) proposes greedily, over its
    own KV at the target's block ids (one pool, one accounting)."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding on this worker (:mod:`engine.speculative`)."""

    method: SpeculativeMethod = SpeculativeMethod.OFF
    num_tokens: int = 3
    """Draft tokens per sequence and step at most (fewer while its drafts are rejected)."""
    ngram_min: int = 2
    """The shortest trailing n-gram looked up in the sequence (prompt lookup)."""
    ngram_max: int = 4
    """The longest trailing n-gram looked up (the longest match wins)."""
    max_seqs: int = 8
    """No sequence speculates in a step with more decoding sequences than this: a large batch
    already reads each weight once for many tokens, and draft rows then cost compute."""
    draft_model: str | None = None
    """``draft``: the draft model (a local transformers folder, or the default model's name)."""

    def __post_init__(self) -> None:
        if (self.method is SpeculativeMethod.DRAFT) != (self.draft_model is not None):
            raise ValueError("--draft-model goes with --speculative draft, and only with it")
        if self.num_tokens < 1:
            raise ValueError(f"--num-speculative-tokens must be at least 1, not {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"need 1 <= --prompt-lookup-min ({self.ngram_min}) <= --prompt-lookup-max "
                f"({self.ngram_max})"
            )


class KernelChoice(enum.Enum):
    """Whether a part of the forward pass runs a native kernel of :mod:`engine.kernels`."""

    AUTO = "auto"
    """``native`` where it applies and builds here; else ``torch``."""
    NATIVE = "native"
    """The C kernel, built on this machine; an error if it cannot be built or does not apply
    (device, dtype, CPU features)."""
    TORCH = "torch"
    """torch's operators (any device)."""


class WeightsChoice(enum.Enum):
    """Which numbers the linear layers compute from (``--weights``)."""

    AUTO = "auto"
    """As the model ships: ``gguf`` for the default model (it ships as GGUF), else ``float``."""
    FLOAT = "float"
    """The float weights as loaded (the default model's GGUF de-quantized once at conversion)."""
    GGUF = "gguf"
    """The GGUF file's Q8_0 / Q4_0 / Q4_1 blocks, de-quantized inside the matrix product to the
    same float32 numbers ``float`` uses (CPU, AVX2 + FMA + F16C); other tensors stay float."""
    INT8 = "int8"
    """Float checkpoints quantized at load to int8 per group of 32 inputs (Q8_0 blocks: one
    float16 scale each); the same kernel. Changes the numbers slightly (see BENCHMARKS.md)."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    num_threads: int | None = None
    """torch intra-op threads for this process; torch's default when unset."""
    cpus: tuple[int, ...] | None = None
    """Pin this process to these CPU cores (a tier per core keeps prefill off decode's core)."""
    attention_kernel: KernelChoice = KernelChoice.AUTO
    """Decode attention: the paged kernel reads each block in place (CPU, float32 or bfloat16);
    torch gathers the blocks per layer, then runs scaled-dot-product attention."""
    layer_kernels: KernelChoice = KernelChoice.AUTO
    """The rest of a decoder layer in float32 on CPU: linear layers through the panel kernel,
    RMSNorm, RoPE and SiLU one call each (C built here); torch runs its operators (oneDNN for
    linear layers)."""
    weights: WeightsChoice = WeightsChoice.AUTO
    """Float or quantized linear layers (:class:`WeightsChoice`)."""
    cuda_graphs: bool = True
    """On CUDA, decode steps replay a CUDA graph per batch-size bucket (``engine.cuda_graphs``)
    instead of launching each kernel; off CUDA there are none, whatever this says."""
    step_timeout_s: float = 60.0
    """Seconds the busy engine may go without progress (a step begun, a layer finished) before
    the worker declares it stalled and exits (``server_runtime.engine_watchdog``; 0: never).
    Not a bound on a step: the default model's longest step took 68 s on two shared CPU cores,
    with 6.5 s at most between moves (see ``engine.engine_thread``)."""
