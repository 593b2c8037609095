"""The config's sections as typed dataclasses, with InternEvo's section and field names (``JOB_NAME``,
``model``, ``data``, ``parallel``, ``adam``, ``lr_scheduler``, ``grad_scaler``, ``hybrid_zero_optimizer``,
``loss``, ``ckpt``, ``monitor``) and its defaults where it has one. A leaf: evo/config/load.py builds these from a
config file, evo/config/checks.py validates them, evo/config/layout.py holds the parallel layout's rules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

REQUIRED = object()  # marker default: the key must be given

DTYPES = ("torch.float32", "torch.float", "torch.tf32", "torch.bfloat16", "torch.float16", "torch.half")
MOE_MODEL_TYPES = ("QWEN3MOE", "MIXTRALMOE", "QWEN2MOE", "INTERNLM_MoE")  # InternEvo's mixture-of-experts models
MODEL_TYPES = ("INTERNLM2_PUBLIC", "INTERNLM2", "INTERNLM", "LLAMA2", "LLAMA", *MOE_MODEL_TYPES)
MOE_TYPES = ("Dropless", "GShard", "MegaBlock", "MegaBlock-Dropless")
CKPT_CONTENTS = ("model", "optimizer", "scheduler", "sampler", "all")


# ----------------------------------------------------------------------------------------------
# Sections. Field names are InternEvo's; defaults are InternEvo's where it has one.
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    num_layers: int = REQUIRED  # decoder layers
    hidden_size: int = REQUIRED  # the residual stream's width
    num_attention_heads: int = REQUIRED  # query heads
    vocab_size: int = REQUIRED  # rows of the embedding and of the output head
    num_kv_attention_heads: Optional[int] = None  # None: as many as query heads (MHA)
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads (Qwen3 and others set it apart)
    mlp_ratio: float = 8 / 3  # the SwiGLU width over hidden_size (before rounding up to multiple_of)
    multiple_of: int = 256  # the MLP width is mlp_ratio * hidden_size rounded up to this
    intermediate_size: Optional[int] = None  # evo: the MLP width itself (Hugging Face's key); wins over mlp_ratio
    dtype: str = "torch.bfloat16"  # compute dtype (DTYPES); masters and optimizer state are fp32 regardless
    norm_type: str = "rmsnorm"  # InternEvo's choice of norm; evo has RMSNorm only
    layer_norm_epsilon: float = 1e-5  # RMSNorm's epsilon (the q/k norms' too)
    rope_base: float = 10000.0  # rotary base (Hugging Face's rope_theta)
    rope_scaling: Optional[dict] = None  # Hugging Face's dict: rope_type linear | dynamic | llama3, factor, ...
    max_position_embeddings: int = 2048  # the trained context: dynamic NTK scaling starts past it
    use_dynamic_ntk_rope: bool = False  # InternEvo's switch: rope_scaling=dict(rope_type="dynamic", factor=1.0)
    qk_interleaved: bool = False  # rotary layout: False = GPT-NeoX halves, True = GPT-J pairs
    no_bias: bool = True  # the default for every bias below
    qkv_bias: Optional[bool] = None  # None: not no_bias (Qwen2: True)
    o_bias: Optional[bool] = None  # None: not no_bias
    mlp_bias: Optional[bool] = None  # None: not no_bias
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head, before rotary (Qwen3)
    sliding_window: Optional[int] = None  # each token attends to itself and the sliding_window - 1 before it (Mistral)
    tie_word_embeddings: bool = False  # the output head uses the embedding's weight
    num_experts: int = 1  # routed experts per MoE layer; 1: a dense model (docs/moe.md)
    top_k: int = 1  # experts each token goes to (InternEvo's; its older name moe_gate_k is read too)
    moe_type: str = "Dropless"  # MOE_TYPES: Dropless, GShard (capacity, dropping); MegaBlock(-Dropless): as Dropless
    num_shared_experts: int = 0  # experts every token goes through, besides its top_k
    moe_layer_kwargs: dict = field(default_factory=dict)  # the router's options (docs/moe.md): scoring_func, ...
    moe_intermediate_size: Optional[int] = None  # evo (HF's key): an expert's width; None: intermediate_size
    shared_expert_intermediate_size: Optional[int] = None  # evo (HF's key); None: num_shared_experts x an expert's
    shared_expert_gate: bool = False  # evo: the shared experts' output times sigmoid(x W), W (1, hidden) (Qwen2-MoE)
    mlp_only_layers: list = field(default_factory=list)  # evo (HF's key): layers that keep a dense MLP
    decoder_sparse_step: int = 1  # evo (HF's key): layer i (from 0) is MoE when (i + 1) % step == 0
    norm_head: bool = False  # InternEvo's normalised head: True is refused (not supported)
    apply_post_layer_norm: bool = False  # InternEvo's post-norm: True is refused (pre-norm only)
    checkpoint: Union[bool, float] = False  # activation checkpointing: True, or the fraction of (each stage's) layers
    compile: bool = False  # evo: torch.compile each decoder layer (evo.parallel.parallelize)
    num_chunks: int = 1  # pipeline stages per pipeline rank (interleaved 1F1B; ZBV: 2)
    init_type: str = "normal"  # InternEvo's choice of init; evo has the normal init only (the *_init_std below)
    embedding_init_std: float = 0.02  # normal-init std of the embedding
    attn_wqkv_init_std: float = 0.02  # ... of wq, wk, wv
    attn_other_init_std: float = 0.02  # ... of wo
    ffn_uplayer_init_std: float = 0.02  # ... of w1, w3
    ffn_other_init_std: float = 0.02  # ... of w2
    out_head_init_std: float = 0.02  # ... of the output head (untied)

    def __post_init__(self):
        self.derived: frozenset[str] = frozenset()  # the fields resolve() filled in (not a dataclass field)
        self.resolve()

    def resolve(self) -> None:
        """Fill the fields left None that follow from others: head_dim (hidden / heads), intermediate_size
        (mlp_ratio, multiple_of), the biases (no_bias), rope_scaling (use_dynamic_ntk_rope: dynamic, factor 1).
        ``derived`` names them, and ``Config.to_dict`` writes them as None again, so a saved config whose
        hidden_size is edited derives a new head_dim rather than keeping the old one."""
        filled = set()
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
                filled.add("head_dim")
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            m = self.multiple_of
            if isinstance(m, int) and m >= 1 and isinstance(self.mlp_ratio, (int, float)):
                self.intermediate_size = m * ((int(self.hidden_size * self.mlp_ratio) + m - 1) // m)
                filled.add("intermediate_size")
        for key in ("qkv_bias", "o_bias", "mlp_bias"):
            if getattr(self, key) is None:
                setattr(self, key, not self.no_bias)
                filled.add(key)
        if self.moe_intermediate_size is None and isinstance(self.intermediate_size, int):
            self.moe_intermediate_size = self.intermediate_size  # InternEvo's experts are its MLP's width
            filled.add("moe_intermediate_size")
        if self.shared_expert_intermediate_size is None and isinstance(self.moe_intermediate_size, int) and \
                isinstance(self.num_shared_experts, int):
            self.shared_expert_intermediate_size = self.num_shared_experts * self.moe_intermediate_size
            filled.add("shared_expert_intermediate_size")
        if self.rope_scaling is None and self.use_dynamic_ntk_rope:
            self.rope_scaling = {"rope_type": "dynamic", "factor": 1.0}  # InternEvo's dynamic NTK has factor 1
            filled.add("rope_scaling")
        self.derived = self.derived | filled

    @property
    def kv_heads(self) -> int:
        return self.num_kv_attention_heads or self.num_attention_heads

    @property
    def torch_dtype(self):
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}.get(
            self.dtype.split(".")[-1], torch.float32)

    @property
    def attention_window(self) -> tuple[int, int]:
        """flash-attn's (left, right) window of the causal attention: (sliding_window - 1, 0), or (-1, -1)."""
        return (self.sliding_window - 1, 0) if self.sliding_window else (-1, -1)

    @property
    def rope(self) -> dict:
        """The rotary scaling in force as one dict: rope_type default | linear | dynamic | llama3 and its fields."""
        scaling = dict(self.rope_scaling or {})
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        return dict(scaling, rope_type=kind, base=self.rope_base, max_position_embeddings=self.max_position_embeddings)


@dataclass
class DataConfig:
    seq_len: int = 2048  # the longest attention span; a packed row holds seq_len * micro_bsz tokens
    micro_num: int = 1  # micro-batches (packed rows) per step and per data-parallel rank
    micro_bsz: int = 1  # seq_len slots per packed row
    valid_micro_num: int = 1  # rows per validation batch
    valid_every: int = 0  # 0: never evaluate during training (still at the end if there are val sets)
    valid_max_batches: Optional[int] = None  # evo: cap on batches per validation set (None: all)
    valid_split: float = 0.0  # evo: the fraction of training documents held out as the validation set 'valid'
    total_steps: int = 50000  # training steps
    pack_sample_into_one: bool = False  # attention boundaries every seq_len, ignoring documents
    use_packed_dataset: bool = True  # False: one document per seq_len slot, truncated and padded
    skip_batches: str = ""  # batch indices to skip, "10-20,30" (InternEvo's way past a bad batch)
    min_length: int = 0  # documents shorter than this are dropped
    type: Optional[str] = None  # None: "tokenized" with train_folder, else "dummy"
    train_folder: Optional[str] = None  # the training data (docs/data.md)
    valid_folder: Optional[str] = None  # validation sets, one per subfolder (or one)
    tokenizer_path: Optional[str] = None  # a tokenizer.json (streaming; the sample at the end of fit)
    seed: int = 1024  # the data order's seed (the model's is --seed)
    num_dummy_samples: int = 10000  # evo: size of the random dummy dataset (documents)
    max_bad_lines: int = 0  # evo: malformed .jsonl lines a streaming run may skip (0: the first one is an error)

    @property
    def packed_length(self) -> int:
        return self.seq_len * self.micro_bsz


@dataclass
class ParallelDim:
    size: int = 1  # ranks in this dimension's groups
    mode: Optional[str] = None  # tensor: TENSOR_MODES; pipeline: PIPELINE_MODES (evo/config/layout.py)


@dataclass
class ExpertDim:
    size: int = 1  # ranks an expert group spreads a MoE layer's experts over (evo/parallel/expert.py); <= 0: the
    # data-parallel size capped at num_experts (InternEvo's default, -1); 1: every rank holds every expert
    no_tp: bool = False  # InternEvo's: experts not split over the tensor group; evo never splits one (False is logged)


@dataclass
class Placement:
    head_first: bool = True  # a head group's ranks are consecutive (share a node); False: a context group's are
    interleaved: bool = False  # windows take every other rank of a context group (InternEvo's NIC balance)


@dataclass
class Sequence2DConfig:
    """InternEvo's 2D sequence parallelism (evo/parallel/sequence_2d.py): isp's sequence group split into head groups
    (Ulysses) x context groups (rings over packed rows)."""

    enable: bool = False  # on: parallel.tensor.size ranks split as head_size x context_size
    head_size: int = 1  # ranks splitting the heads (Ulysses' all-to-all); head_size x context_size = tensor.size
    context_size: int = 1  # ranks splitting every document of a row (ring attention)
    window_size: int = 1  # ranks in an inner ring of the double ring; it divides context_size
    device_placement_strategy: Placement = field(default_factory=Placement)  # where head and context ranks sit
    kv_exchange: str = "ring"  # evo: how a context group shares keys and values: 'ring' or 'all_gather'


@dataclass
class ParallelConfig:
    zero1: ParallelDim = field(default_factory=lambda: ParallelDim(size=-1))  # <= 0: the whole data group; 1: off
    tensor: ParallelDim = field(default_factory=lambda: ParallelDim(mode="mtp"))  # tensor (or isp's sequence) groups
    pipeline: ParallelDim = field(default_factory=ParallelDim)  # pipeline stages and their schedule
    weight: ParallelDim = field(default_factory=ParallelDim)  # isp: weight groups that shard the weights
    expert: ExpertDim = field(default_factory=ExpertDim)  # MoE: expert groups (expert parallelism)
    sequence_2D: Sequence2DConfig = field(default_factory=Sequence2DConfig)  # isp's group as head x context
    sequence_parallel: Optional[bool] = None  # InternEvo's switch: True needs tensor.mode msp or fsp
    timeout_s: float = 1800.0  # evo: collective timeout in seconds


@dataclass
class AdamConfig:
    lr: float = 1e-4  # peak learning rate
    adam_beta1: float = 0.9  # AdamW's beta1
    adam_beta2: float = 0.95  # AdamW's beta2
    adam_eps: float = 1e-8  # AdamW's epsilon
    weight_decay: float = 0.01  # decoupled weight decay, on matrices only (not norms and biases)


@dataclass
class LrSchedulerConfig:
    total_steps: Optional[int] = None  # None: data.total_steps
    init_steps: int = 0  # the schedule starts as if this many steps had run
    warmup_ratio: float = 0.01  # linear warmup over ceil(warmup_ratio * total_steps) steps, then cosine decay
    eta_min: float = 1e-5  # the lr the cosine decays to


@dataclass
class Fp16ScalerConfig:
    initial_scale: float = 2.0**16  # the first loss scale
    min_scale: float = 1.0  # the scale never backs off below this
    growth_interval: int = 1000  # steps without overflow before the scale grows


@dataclass
class GradScalerConfig:
    fp16: Fp16ScalerConfig = field(default_factory=Fp16ScalerConfig)  # the scale's start, floor and growth interval
    growth_factor: float = 2.0  # the scale is multiplied by this when it grows
    backoff_factor: float = 0.5  # ... and by this on an overflow
    max_scale: float = 2.0**24  # the scale never grows past this
    hysteresis: int = 2  # overflows tolerated before backing off


@dataclass
class HybridZeroConfig:
    clip_grad_norm: float = 1.0  # <= 0: no clipping (inf/NaN steps are still skipped)
    cpu_offload: bool = False  # the fp32 masters, gradients and AdamW state on the CPU (FSDP2's CPUOffloadPolicy)


@dataclass
class CpuOffloadingConfig:
    enable: bool = False  # InternEvo's: the first num_layers layers' saved activations wait on the CPU
    num_layers: int = 0  # how many layers, from the first (0 when not enabled)


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # cross-entropy's label smoothing
    moe_loss_coeff: float = 0.001  # the load-balancing loss's weight (docs/moe.md; HF's router_aux_loss_coef)


@dataclass
class CkptConfig:
    enable_save_ckpt: bool = True  # save checkpoints
    save_ckpt_folder: Optional[str] = None  # None: <run folder>/checkpoints
    checkpoint_every: int = 0  # 0: only at the end
    auto_resume: bool = True  # continue from the newest complete checkpoint in save_ckpt_folder
    load_ckpt_info: Optional[dict] = None  # dict(path=..., content=("model", ...), ckpt_type="evo")
    keep_latest: int = 0  # evo: keep only this many complete checkpoints (0: all), removing older ones after a save
    stop_file_path: Optional[str] = None  # InternEvo's: write -N (save after step N) or N (save and stop) into it
    async_upload: bool = False  # write checkpoints in the background (dcp.async_save); InternEvo: remote uploads


@dataclass
class MonitorConfig:
    run_folder: Optional[str] = None  # None: runs/<JOB_NAME>
    log_every: int = 1  # evo: console/metrics cadence in steps
    sample_prompt: Optional[str] = None  # evo: at the end of fit(), print a sample generated from this
    sample_tokens: int = 64  # tokens of that sample
    peak_tflops: Optional[float] = None  # evo: the device's peak for MFU (None: the table of known GPUs)
    curves: bool = True  # evo: draw curves.png in the run folder at every evaluation and at the end (matplotlib)


@dataclass
class Config:
    JOB_NAME: str = "evo"  # names the run folder, runs/<JOB_NAME>
    model: ModelConfig = REQUIRED  # the decoder (the sections below are documented in docs/config.md)
    data: DataConfig = field(default_factory=DataConfig)  # what is read, packed and how long
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the layout over the processes
    adam: AdamConfig = field(default_factory=AdamConfig)  # the optimizer
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)  # the lr of each step
    grad_scaler: GradScalerConfig = field(default_factory=GradScalerConfig)  # fp16's dynamic loss scale
    hybrid_zero_optimizer: HybridZeroConfig = field(default_factory=HybridZeroConfig)  # clipping, CPU offload
    cpu_offloading: CpuOffloadingConfig = field(default_factory=CpuOffloadingConfig)  # activations to the CPU
    # InternEvo's Selective Checkpoint++: checkpointed layers keep attention's output and log-sum-exp from the
    # forward, so their recomputation skips attention (evo/model/selective.py)
    selective_checkpoint: bool = False
    selective_checkpoint_offload: bool = False  # ... and the kept tensors wait on the CPU
    loss: LossConfig = field(default_factory=LossConfig)  # the training loss
    ckpt: CkptConfig = field(default_factory=CkptConfig)  # saving, resuming, loading
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # the run folder, metrics, logs
    model_type: str = "INTERNLM2_PUBLIC"  # InternEvo's model registry name (MODEL_TYPES): one decoder for all
    source: Optional[str] = None  # the file this config came from
    extra: dict = field(default_factory=dict)  # the config's own keys (never checked, saved in config.json)

    def to_dict(self) -> dict:
        """The config as nested dicts (what config.json holds); model fields derived from others are None."""
        out = dataclasses.asdict(self)
        out["model"].update(dict.fromkeys(self.model.derived))
        return out


TOP_LEVEL_SWITCHES = ("selective_checkpoint", "selective_checkpoint_offload")  # top-level True / False keys
SECTIONS = [f.name for f in dataclasses.fields(Config)
            if f.name not in ("JOB_NAME", "model_type", "source", "extra", *TOP_LEVEL_SWITCHES)]
