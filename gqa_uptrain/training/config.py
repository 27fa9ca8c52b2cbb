"""Uptraining recipes: typed config dataclasses, YAML loading and ``key.sub=value`` overrides.

A recipe is a YAML mapping whose sections map one-to-one onto the dataclasses below
(``model``, ``data``, ``optim``, ``schedule``, ``budget``, ``distill``, ``freeze``, ``lora``, ``speed``, ``eval``,
``checkpoint``, ``output``, plus a top-level ``seed``). Validation is strict and happens before
anything is loaded: an unknown key, a value of the wrong type or a missing required field raises
:class:`~gqa_uptrain.errors.ConfigError` naming the dotted key, e.g.
``recipe key optim.lr: expected float, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.config import DataConfig
from ..errors import ConfigError
from ..io.locate import check_repo_id  # light: the standard library until a repo id is checked


@dataclass
class ModelConfig:
    """The converted checkpoint to uptrain."""

    path: str = ""
    """Folder written by ``gqa-convert`` (or any causal-LM checkpoint folder), or a Hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``path`` is a Hub id."""
    trust_remote_code: bool | None = None
    """Run modelling code shipped with the checkpoint; ``None``: yes when its config has an ``auto_map``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    attn_implementation: str | None = None
    """Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); ``None``: transformers' default."""


@dataclass
class OptimConfig:
    """AdamW and the batch: the per-device micro-batch times accumulation times processes."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not to biases, norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    batch_size: int = 8
    """Blocks per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a GPU that supports it, full precision on CPU."""
    fused: bool | None = None
    """Fused AdamW kernel; ``None``: use it where torch has it for the device."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over the optimizer steps of the budget."""

    kind: Literal["cosine", "constant"] = "cosine"
    """Cosine decay to ``min_lr_ratio × lr`` after warmup, or constant after warmup."""
    warmup_steps: int | None = None
    """Linear warmup steps; ``None``: ``warmup_fraction`` of the budget."""
    warmup_fraction: float = 0.05
    """Fraction of the budget's steps spent warming up when ``warmup_steps`` is not given."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""


@dataclass
class BudgetConfig:
    """How long to train, in the user's terms: exactly one of ``steps``, ``tokens`` or ``alpha``."""

    steps: int | None = None
    """Optimizer steps."""
    tokens: int | None = None
    """Training tokens (rounded up to whole optimizer steps)."""
    alpha: float | None = None
    """The paper's alpha: a fraction of the original pretraining tokens (5% is the headline)."""
    pretraining_tokens: int | None = None
    """Tokens the original model was pretrained on (needed with ``alpha``)."""


@dataclass
class DistillConfig:
    """Knowledge distillation from the original (pre-conversion) model."""

    teacher: str | None = None
    """The original checkpoint folder or Hub id; ``None``: no distillation."""
    weight: float = 1.0
    """loss = LM loss + weight × KL(teacher ‖ student)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the KL term (scaled by T² as usual)."""


@dataclass
class FreezeConfig:
    """Which parameters train."""

    mode: Literal["none", "attention", "kv"] = "none"
    """``none``: all; ``attention``: only attention projections; ``kv``: only K/V projections
    (a fused QKV tensor trains whole, Q rows included, since it is one parameter)."""


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, through peft) instead of full-parameter training; QLoRA on a 4-bit base.

    The final ``model/`` is the adapters merged into a plain checkpoint in the checkpoint's own dtype
    (no peft needed to load it); the adapters alone are saved beside it in ``adapters/``.
    """

    mode: Literal["none", "lora", "qlora"] = "none"
    """``none``: train the weights themselves (``freeze.mode`` decides which); ``lora``: train
    adapters on a frozen base in float32; ``qlora``: the frozen base's linear layers in 4 bits
    (bitsandbytes), the adapters in float32."""
    rank: int = 16
    """Rank r of each adapter (B @ A with A [r, in], B [out, r])."""
    alpha: float = 32.0
    """Scale: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    targets: list[str] = field(default_factory=lambda: ["attention"])
    """Which linear layers get adapters: ``attention`` (Q, K, V and output projections), ``kv``
    (K and V only), ``mlp`` (the feed-forward layers), or module-name suffixes such as ``k_proj``."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """QLoRA's 4-bit data type."""
    double_quant: bool = True
    """QLoRA: quantize the quantization constants too (about 0.4 bits per weight saved)."""


@dataclass
class SpeedConfig:
    """How the training step runs (not what it computes: every setting gives the same loss curve)."""

    compile: bool | None = None
    """``torch.compile`` the model; ``None``: on a CUDA GPU, off on CPU (where compiling takes longer
    than a short run saves)."""
    compile_mode: str | None = None
    """``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``); ``None``: default."""
    loss_chunk_tokens: int = 4096
    """Compute the loss from hidden states this many positions at a time, never materialising the
    float32 ``[B, T, V]`` logits (0: the plain loss from the model's logits)."""


@dataclass
class EvalConfig:
    """Held-out loss and perplexity."""

    every: int = 100
    """Evaluate every N optimizer steps (0: only before and after training)."""
    max_blocks: int | None = 128
    """Held-out blocks used per evaluation (``None``: all)."""
    batch_size: int | None = None
    """Blocks per device per evaluation batch (``None``: ``optim.batch_size``)."""
    at_start: bool = True
    """Evaluate before the first step, so the run reports before → after."""


@dataclass
class CheckpointConfig:
    """Resumable training state (``accelerate`` ``save_state``) under ``OUTPUT/checkpoints``."""

    every: int = 500
    """Save every N optimizer steps (0: only at the end, on Ctrl-C and never on a crash)."""
    keep_last: int = 2
    """Keep only the newest K checkpoints."""
    save_on_each_node: bool = False
    """``false``: all nodes share one filesystem, and the run's main process alone creates, renames
    and deletes checkpoint folders (several nodes doing it would race). ``true``: every node has its
    own disk and its first process writes and rotates that node's copy (accelerate's
    ``save_on_each_node``)."""


@dataclass
class OutputConfig:
    """Where the run writes, and how it logs."""

    dir: str = ""
    """Run folder: ``model/`` (final checkpoint), ``checkpoints/``, ``logs/``, ``cache/``, ``recipe.yaml``."""
    overwrite: bool = False
    """Start over in a folder that holds a previous run (deletes its checkpoints and model)."""
    resume: bool = False
    """Continue from the newest checkpoint in ``dir`` (starts fresh when there is none)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard of the final model."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """``accelerate`` trackers by name (``tensorboard``, ``wandb``, ``mlflow``, ...); ``[]``: none."""
    log_every: int = 10
    """Log training loss, learning rate and throughput every N optimizer steps."""
    push_to_hub: str | None = None
    """Hub model repo (``OWNER/NAME``) that ``model/`` is uploaded to when training finishes (created if
    needed). The repo id and a token (``HF_TOKEN`` or ``hf auth login``) are checked before training."""
    hub_private: bool = False
    """Create the ``push_to_hub`` repo private (an existing repo keeps its visibility)."""
    hub_revision: str | None = None
    """Branch of the ``push_to_hub`` repo to upload to (created from main if missing); ``None``: main."""


@dataclass
class UptrainConfig:
    """A whole uptraining recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    """Seed of initialisation-free randomness: data order and any dropout."""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``recipe.yaml`` in the run folder holds)."""
        return dataclasses.asdict(self)

    def tokens_per_step(self, num_processes: int = 1) -> int:
        """Tokens consumed by one optimizer step."""
        return self.data.block_size * self.optim.batch_size * self.optim.grad_accum * num_processes

    def total_steps(self, num_processes: int = 1) -> int:
        """Optimizer steps the budget asks for, with ``num_processes`` data-parallel processes."""
        b = self.budget
        if b.steps is not None:
            return b.steps
        tokens = b.tokens if b.tokens is not None else b.alpha * b.pretraining_tokens  # type: ignore[operator]
        return max(1, math.ceil(tokens / self.tokens_per_step(num_processes)))


# Keys whose empty default means "missing".
_REQUIRED = ("model.path", "data.source", "output.dir")


# --------------------------------------------------------------------------------------------------
# Validation: plain data -> typed dataclasses, every error naming its dotted key
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"recipe key {key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"recipe key {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 2.0e12 tokens
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string: accept any numeric string.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"recipe key {key}: unsupported type {_type_name(tp)}")  # a bug in this module


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            raise ConfigError(
                f"recipe key {prefix}{k}: unknown key; known keys of {prefix.rstrip('.') or 'the recipe'}: {', '.join(fields)}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _check(cfg: UptrainConfig) -> UptrainConfig:
    """Cross-field rules that types cannot express."""
    for dotted in _REQUIRED:
        section, key = dotted.split(".")
        if not getattr(getattr(cfg, section), key):
            raise ConfigError(f"recipe key {dotted}: missing (required)")
    b = cfg.budget
    given = [k for k in ("steps", "tokens", "alpha") if getattr(b, k) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"recipe key budget: give exactly one of budget.steps, budget.tokens, budget.alpha (got {', '.join(given) or 'none'})"
        )
    if b.alpha is not None and not b.pretraining_tokens:
        raise ConfigError("recipe key budget.pretraining_tokens: missing (required with budget.alpha)")
    positive = {
        "budget.steps": b.steps,
        "budget.tokens": b.tokens,
        "budget.alpha": b.alpha,
        "optim.batch_size": cfg.optim.batch_size,
        "optim.grad_accum": cfg.optim.grad_accum,
        "data.block_size": cfg.data.block_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "output.log_every": cfg.output.log_every,
    }
    for k, v in positive.items():
        if v is not None and v <= 0:
            raise ConfigError(f"recipe key {k}: must be positive, got {v}")
    nonneg = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "eval.every": cfg.eval.every,
        "checkpoint.every": cfg.checkpoint.every,
        "distill.weight": cfg.distill.weight,
    }
    for k, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"recipe key {k}: must be >= 0, got {v}")
    if len(cfg.optim.betas) != 2 or not all(0 <= x < 1 for x in cfg.optim.betas):
        raise ConfigError(f"recipe key optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(
            f"recipe key data.eval_fraction: expected a fraction in [0, 1), got {cfg.data.eval_fraction}"
        )
    if cfg.distill.temperature <= 0:
        raise ConfigError(f"recipe key distill.temperature: must be positive, got {cfg.distill.temperature}")
    if cfg.output.resume and cfg.output.overwrite:
        raise ConfigError(
            "recipe keys output.resume and output.overwrite: pick one (continue, or start over)"
        )
    _check_lora_and_speed(cfg)
    _check_hub(cfg.output)
    return cfg


def _check_lora_and_speed(cfg: UptrainConfig) -> None:
    """The LoRA and speed keys: positive sizes, known targets, no second say on what trains."""
    lo, sp = cfg.lora, cfg.speed
    if sp.loss_chunk_tokens < 0:
        raise ConfigError(f"recipe key speed.loss_chunk_tokens: must be >= 0, got {sp.loss_chunk_tokens}")
    if lo.mode == "none":
        return
    if lo.rank <= 0:
        raise ConfigError(f"recipe key lora.rank: must be positive, got {lo.rank}")
    if lo.alpha <= 0:
        raise ConfigError(f"recipe key lora.alpha: must be positive, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"recipe key lora.dropout: expected a fraction in [0, 1), got {lo.dropout}")
    if not lo.targets or any(not t.strip() for t in lo.targets):
        raise ConfigError(
            "recipe key lora.targets: give at least one of attention, kv, mlp or a module name such as k_proj"
        )
    if cfg.freeze.mode != "none":
        raise ConfigError(
            f"recipe keys lora.mode={lo.mode} and freeze.mode={cfg.freeze.mode}: with LoRA the adapters are "
            "what trains; choose lora.targets instead and leave freeze.mode=none"
        )


def _check_hub(out: OutputConfig) -> None:
    """The Hub keys: a valid repo id, and no Hub option without a repo to apply it to."""
    if out.push_to_hub is None:
        for key, value in (("hub_private", out.hub_private), ("hub_revision", out.hub_revision)):
            if value:
                raise ConfigError(
                    f"recipe key output.{key}: only applies with output.push_to_hub (the repo to upload to); "
                    f"set output.push_to_hub=OWNER/NAME or drop output.{key}"
                )
        return
    check_repo_id(out.push_to_hub, "recipe key output.push_to_hub:")  # imports huggingface_hub only now
    if out.hub_revision is not None and not out.hub_revision.strip():
        raise ConfigError("recipe key output.hub_revision: empty; give a branch name or null for main")


def config_from_dict(data: dict[str, Any]) -> UptrainConfig:
    """Validate plain data (a parsed recipe) into an :class:`UptrainConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe: expected a mapping of sections (model, data, ...), got {type(data).__name__}"
        )
    return _check(_build(UptrainConfig, data))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (``["optim", "lr"]``, ``1e-4``); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, the type check decides
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``section.key=value`` of ``overrides`` in a copy of the recipe data."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> UptrainConfig:
    """Read a YAML recipe, apply ``key=value`` overrides, validate, and return the typed config.

    Relative paths in ``model.path``, ``data.source``, ``distill.teacher`` and ``output.dir``
    stay relative to the current directory (where the command runs), as on the command line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; give the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"recipe {path}: not valid YAML{at}; fix the syntax") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def dump_recipe(cfg: UptrainConfig) -> str:
    """The config as a YAML recipe that :func:`load_recipe` reads back to the same config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
