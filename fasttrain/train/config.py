"""The run config: sections model (GPTConfig), optim, train and data (DataConfig), one dataclass each."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fasttrain.config import ConfigError, from_dict, merge, to_dict
from fasttrain.data import DataConfig
from fasttrain.model import GPTConfig
from fasttrain.optim.schedules import LRSchedule

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_NAN = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
ADAMW_BACKENDS = (None, "auto", "cuda", "cpu", "reference")
STRATEGIES = ("none", "ddp", "fsdp")
DIST_BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings only (not to norms or biases)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (inside fasttrain.optim.AdamW); None: no clipping."""
    schedule: str = "cosine"
    """'constant', 'cosine' or 'linear' (warmup then decay to min_lr_ratio * lr), or 'inverse_sqrt' (Noam)."""
    warmup_steps: int = 100
    """Steps of linear warmup."""
    min_lr_ratio: float = 0.1
    """The cosine/linear schedules end at min_lr_ratio * lr."""
    backend: str | None = None
    """AdamW backend: None or 'auto', 'cuda', 'cpu' or 'reference' (AdamW has no Triton kernel)."""

    def __post_init__(self) -> None:
        # Checked here so a wrong value fails at startup, not when the optimizer is built after data preparation.
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "weight_decay"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not 0.0 < self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be finite and > 0, or none, got {self.max_grad_norm}")
        if self.backend not in ADAMW_BACKENDS:
            raise ValueError(f"backend must be one of {ADAMW_BACKENDS}, got {self.backend!r}")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (tokens per step = batch_size * grad_accum * seq_len)."""
    seq_len: int = 256
    """Tokens per training sequence; at most model.max_seq_len."""
    eval_interval: int = 100
    """Evaluate on the validation split every this many steps and after the last (never if data.val_fraction is 0)."""
    eval_batches: int = 20
    """Validation batches per evaluation (the same ones every time)."""
    checkpoint_interval: int = 500
    """Write a checkpoint every this many steps (and after the last step)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a lower validation loss; None: never. Needs data.val_fraction > 0."""
    log_interval: int = 10
    """Steps between progress-bar / metrics updates (each one waits for the device)."""
    precision: str = "auto"
    """'auto' (bf16 on a GPU that has it, else fp16 with a GradScaler; fp32 on CPU), 'fp32', 'bf16' or 'fp16'."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    compile: bool = False
    """Run the model through torch.compile."""
    cuda_graph: bool = False
    """Capture the optimizer step (forward and backward over the micro-batches, then AdamW) once as a CUDA graph and
    replay it: one launch per step from the host instead of hundreds. CUDA only, bf16 or fp32 (fp16's GradScaler
    decides on the host), not with compile, AdamW on its cuda backend."""
    seed: int = 0
    """Seed of the initialisation, dropout and batch order."""
    out_dir: str = "runs/default"
    """Run directory: config.json, checkpoints/, training_metrics.json, plots, sample.txt."""
    tensorboard: bool = False
    """Also log to TensorBoard under out_dir/tensorboard (needs the tensorboard package)."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    sample_tokens: int = 200
    """Tokens sampled from the trained model at the end (0: none; at most model.max_seq_len + 1 - prompt tokens)."""
    sample_prompt: str = "def "
    """Prompt of that sample."""
    on_nan: str = "stop"
    """A step whose loss or gradient norm is not finite is skipped (the weights and optimizer state stay as they were;
    in fp16 the GradScaler's own skips count too). 'stop': end the run with an error after train.max_bad_steps such
    steps in a row; 'skip': go on, counting them (metrics' skipped_steps)."""
    max_bad_steps: int = 10
    """Consecutive non-finite steps after which on_nan 'stop' ends the run (checked at each log interval and before
    every checkpoint, so the run may take up to log_interval - 1 more steps before it stops)."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "keep_last",
            "log_interval",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1 or none, got {self.early_stopping_patience}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's seeds are), got {self.seed}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {self.sample_tokens}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.out_dir:
            raise ValueError("out_dir must name a folder, got ''")
        if self.on_nan not in ON_NAN:
            raise ValueError(f"on_nan must be one of {ON_NAN}, got {self.on_nan!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")


@dataclass
class InitConfig:
    from_: str | None = None
    """`--init.from DIR`: a Hugging Face checkpoint folder (config.json, model.safetensors or a sharded index,
    tokenizer.json) of GPT-2, Llama, Mistral or Qwen2 to start from: the model section, the weights and the
    tokenizer come from it. None: random weights."""


@dataclass
class FinetuneConfig:
    lora_rank: int = 0
    """LoRA rank r; 0: no LoRA (every weight not frozen trains). With LoRA only the adapters train."""
    lora_alpha: float = 8.0
    """LoRA updates are scaled by lora_alpha / lora_rank (PEFT's default alpha, 8)."""
    lora_dropout: float = 0.0
    """Dropout on the input of each LoRA branch."""
    lora_targets: list[str] = field(default_factory=list)
    """The transformers modules that get LoRA, as PEFT's target_modules list (q_proj, v_proj on Llama; c_attn on
    GPT-2; a module matches a name it equals or ends with after a dot) or 'all-linear'; empty: PEFT's default for
    the model's family."""
    freeze: list[str] = field(default_factory=list)
    """Parameters kept fixed: 'embeddings', 'blocks:N' (the first N blocks) or patterns over parameter names
    ('blocks.0.*'). Frozen parameters get no gradient and no optimizer state."""

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")


@dataclass
class DistConfig:
    strategy: str = "none"
    """'none' (one process), 'ddp' (each rank holds the whole model; gradients all-reduced) or 'fsdp' (FSDP2:
    parameters, gradients and optimizer state sharded over the ranks). 'ddp' and 'fsdp' need torchrun."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward and gather them again for its backward (less
    memory); False keeps them from forward to backward (less communication)."""
    timeout_s: float = 1800.0
    """Seconds a collective waits for the other ranks before the job fails (a rank that died), data preparation on
    rank 0 included."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend not in DIST_BACKENDS:
            raise ValueError(f"backend must be one of {DIST_BACKENDS}, got {self.backend!r}")
        if not 0 < self.timeout_s < math.inf:
            raise ValueError(f"timeout_s must be finite and > 0, got {self.timeout_s}")


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    """The model's shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: steps, batches, precision, evaluation, checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and split."""
    init: InitConfig = field(default_factory=InitConfig)
    """Where the weights start from."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """LoRA and frozen parameters."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Several processes under torchrun: DDP or FSDP2."""

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.train.early_stopping_patience is not None and self.data.val_fraction == 0:
            raise ValueError("train.early_stopping_patience needs a validation split, but data.val_fraction is 0")
        try:
            self.schedule()
        except ValueError as e:
            raise ValueError(f"optim: {e}") from None
        if self.train.cuda_graph:
            _check_cuda_graph(self)
            if self.dist.strategy != "none":
                raise ValueError(
                    f"train.cuda_graph takes one process; dist.strategy is {self.dist.strategy!r} (turn one off)"
                )

    def schedule(self) -> LRSchedule:
        o = self.optim
        return LRSchedule(
            o.schedule, lr=o.lr, warmup_steps=o.warmup_steps, total_steps=self.train.steps, min_lr=o.min_lr_ratio * o.lr
        )


def _check_cuda_graph(cfg: RunConfig) -> None:
    """What train.cuda_graph cannot take, refused before any data is prepared."""
    t = cfg.train
    if t.compile:
        raise ValueError(
            "train.cuda_graph and train.compile cannot both be on: the graph captures the eager step (pick one)"
        )
    if t.device == "cpu":
        raise ValueError("train.cuda_graph needs a CUDA device, but train.device is 'cpu'")
    if t.precision == "fp16":
        raise ValueError(
            "train.cuda_graph does not take precision 'fp16': its GradScaler decides on the host whether "
            "a step is skipped; use 'bf16' or 'fp32'"
        )
    if cfg.optim.backend in ("cpu", "reference"):
        raise ValueError(f"train.cuda_graph needs AdamW's cuda backend, but optim.backend is {cfg.optim.backend!r}")
    if cfg.data.format != "text":
        raise ValueError(
            "train.cuda_graph takes data.format 'text' only: packed examples change their segment offsets "
            "(cu_seqlens) every batch, which a captured graph cannot"
        )
    if t.on_nan == "skip":
        raise ValueError(
            "train.cuda_graph cannot skip a non-finite step (the graph always applies its update); "
            "use train.on_nan 'stop' or eager steps"
        )


def build(base: RunConfig, *updates: dict) -> RunConfig:
    """base with nested updates (from TOML files, then overrides) laid over it, checked as a RunConfig.

    model.n_kv_head, head_dim, d_ff, qkv_bias and norm_eps follow their inputs (n_head; d_model, activation; bias;
    norm) when base holds the values derived from them: `--model.d_model 256` on a preset also resizes its MLP
    unless `--model.d_ff` is given.
    """
    data = to_dict(base)
    for name in ("n_kv_head", "head_dim", "d_ff", "qkv_bias", "norm_eps"):
        if data["model"][name] == getattr(GPTConfig(**{**data["model"], name: None}), name):
            data["model"][name] = None
    for update in updates:
        data = merge(data, update)
    given = [u["init"]["from"] for u in updates if isinstance(u.get("init"), dict) and u["init"].get("from")]
    if given:
        data = _from_checkpoint(data, given[-1], updates)
    return from_dict(RunConfig, data)


# Model fields a run may set apart from its checkpoint's: they change training, not the function the weights compute.
_FREE_MODEL_FIELDS = ("dropout", "init")


def _from_checkpoint(data: dict, path: str, updates: tuple[dict, ...]) -> dict:
    """data with the model section of checkpoint folder path and its tokenizer.json; a model field or data.tokenizer
    the updates set otherwise is an error naming it. Read only when an update names init.from, so a resumed run
    needs its checkpoint folder no more."""
    from fasttrain.integrations.hf_checkpoint import checkpoint_config, tokenizer_file

    model = to_dict(checkpoint_config(path))
    tokenizer = str(tokenizer_file(path))
    for update in updates:
        for key, value in (update.get("model") or {}).items():
            if key not in model:
                raise ConfigError(f"unknown config key 'model.{key}' (known in this section: {', '.join(model)})")
            if key in _FREE_MODEL_FIELDS:
                model[key] = value
            elif value != model[key]:
                raise ConfigError(
                    f"model.{key} {value!r} conflicts with init.from {path!r}, whose config gives {model[key]!r} "
                    f"(leave model.{key} out: the model comes from the checkpoint)"
                )
        given = (update.get("data") or {}).get("tokenizer")
        if given is not None and given != tokenizer:
            raise ConfigError(
                f"data.tokenizer {given!r} conflicts with init.from {path!r}, whose tokenizer.json the data is "
                f"tokenized with (leave data.tokenizer out)"
            )
    return {**data, "model": model, "data": {**data["data"], "tokenizer": tokenizer}}
