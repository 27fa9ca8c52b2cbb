"""Calibration: second moments of each attention layer's input, captured one layer at a time.

Function-aware merging (``aligned.py``) and similarity grouping (``grouping.py``) need to know
what each attention module sees. Everything they fit is linear in the module's (normed) input
``x`` plus a constant 1 for biases, so one statistic per module suffices: the second moment
``Σ = E[x̃ x̃ᵀ]`` of ``x̃ = [x; 1]``, shape ``[hidden + 1, hidden + 1]``.

Memory stays bounded by one decoder layer plus the calibration activations: the original model is
built on the meta device, only the parameters that run before the first layer (embeddings) are
loaded, the inputs of layer 0 are caught, and then each layer in turn is loaded from the
checkpoint reader, run on the calibration batch (its attention input is accumulated into ``Σ``)
and dropped again; its outputs feed the next layer. The cost is about one forward pass of the
original model over the calibration tokens.

Calibration text comes from local text files (a file or a folder, read in sorted order) or, when
``gqa_uptrain.data.text`` is available, any dataset spec it understands.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture, ModuleTensors, get_architecture
from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import Source, TensorInfo

logger = logging.getLogger(__name__)

DEFAULT_TOKENS = 65_536
DEFAULT_SEQ_LEN = 512
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py", ".html", ".tex"}


class NotCalibratable(Exception):
    """The family's layers cannot be run one at a time by :func:`collect_moments` (e.g. encoder-decoder)."""


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from and how much of it to use."""

    data: str  # a local text file / folder, or a dataset spec (see ``gqa_uptrain.data.text``)
    num_tokens: int = DEFAULT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = 8


@dataclass
class ModuleMoments:
    """What calibration found about one attention module's input."""

    module_name: str  # checkpoint name of the attention module, e.g. ``model.layers.3.self_attn``
    sigma: torch.Tensor  # [n+1, n+1] float64, E[x̃ x̃ᵀ] with x̃ = [x; 1]
    num_tokens: int
    has_qk_norm: bool  # the module normalises K after projecting (a family fact): K is not linear in x


def _local_text(path: Path, max_chars: int) -> str:
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    )
    if path.is_dir():
        files = [p for p in files if p.suffix in TEXT_SUFFIXES or p.name.endswith(".rst.txt")]
    if not files:
        raise ConfigError(
            f"--calibration {path}: no text files found; point it at a .txt/.md/.rst file or a folder of them"
        )
    parts, total = [], 0
    for f in files:
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return "\n\n".join(parts)


def load_calibration_text(data: str, max_chars: int) -> str:
    """At least ``max_chars`` characters of text (or all there is) from ``data``."""
    path = Path(os.path.expanduser(data))
    if path.exists():
        return _local_text(path, max_chars)
    try:  # dataset specs as in uptraining (Hub ids, globs), when that module is available
        from ..data.text import DataConfig, load_text_dataset
    except ImportError:  # pragma: no cover - only before the data module exists
        raise ConfigError(
            f"--calibration {data!r} does not exist; give a local text file or folder"
        ) from None
    cfg = DataConfig(source=data, streaming=True)
    ds = load_text_dataset(cfg)
    parts, total = [], 0
    for row in ds:
        parts.append(str(row[cfg.text_column]))
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "\n\n".join(parts)


def load_tokenizer(src: Source) -> Any:
    """The source checkpoint's tokenizer (from its folder, or from GGUF metadata)."""
    from transformers import AutoTokenizer

    try:
        if src.gguf_file is not None:
            return AutoTokenizer.from_pretrained(src.gguf_file.parent, gguf_file=src.gguf_file.name)
        return AutoTokenizer.from_pretrained(src.folder)
    except Exception as e:
        raise CheckpointError(
            f"{src.name} has no usable tokenizer ({type(e).__name__}); calibration needs one: add the tokenizer files"
        ) from None


def calibration_tokens(src: Source, spec: CalibrationSpec) -> torch.Tensor:
    """``[B, T]`` token ids: the calibration text tokenized and cut into ``T = seq_len`` blocks."""
    tok = load_tokenizer(src)
    seq_len = _seq_len(src.config, spec.seq_len)
    text = load_calibration_text(spec.data, max_chars=8 * spec.num_tokens)  # ~4 chars per token, with margin
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_blocks = min(len(ids), spec.num_tokens) // seq_len
    if n_blocks == 0:
        raise ConfigError(
            f"--calibration {spec.data}: only {len(ids)} tokens, fewer than one block of {seq_len}; give more text"
        )
    if len(ids) < spec.num_tokens:
        logger.warning(
            "calibration data holds %d tokens, fewer than the %d asked for", len(ids), spec.num_tokens
        )
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


def _seq_len(config: dict[str, Any], want: int) -> int:
    limit = config.get("max_position_embeddings") or config.get("n_positions") or want
    window = config.get("sliding_window") or limit
    # Layer inputs are caught at layer 0 only, so every layer must see the same mask: stay inside
    # any sliding window.
    return int(min(want, limit, window))


def hf_config(config: dict[str, Any]) -> Any:
    """A transformers config object from a ``config.json`` dict."""
    from transformers import AutoConfig

    d = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    return AutoConfig.for_model(config["model_type"], **d)


class _NameResolver:
    """Maps a model parameter name to the checkpoint's name for it (prefixes may differ)."""

    def __init__(self, infos: list[TensorInfo]):
        self.infos = {i.name: i for i in infos}
        self.by_suffix: dict[str, TensorInfo] = {}
        for i in infos:
            parts = i.name.split(".")
            for k in range(len(parts)):
                self.by_suffix.setdefault(".".join(parts[k:]), i)

    def __call__(self, name: str) -> TensorInfo | None:
        if name in self.infos:
            return self.infos[name]
        parts = name.split(".")
        for k in range(len(parts)):  # model has a prefix the checkpoint lacks, or the reverse
            hit = self.infos.get(".".join(parts[k:])) or (self.by_suffix.get(name) if k == 0 else None)
            if hit is not None:
                return hit
        return None


class _Stop(Exception):
    pass


def _find_layers(model: torch.nn.Module, n_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder layers (the longest one with ``num_hidden_layers`` entries)."""
    best = None
    for name, mod in model.named_modules():
        is_stack = isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers > 0
        if is_stack and (
            best is None or sum(1 for _ in mod.parameters()) > sum(1 for _ in best[1].parameters())
        ):
            best = (name, mod)
    if best is None:
        raise NotCalibratable("no list of decoder layers found")
    return best


def _load_params(
    model: torch.nn.Module,
    names: list[str],
    resolve: _NameResolver,
    read: Callable[[TensorInfo], torch.Tensor],
    strict: bool = True,
) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        info = resolve(name)
        if info is None and not strict:
            continue  # e.g. a task head's bias: stays on meta, never runs before layer 0
        if info is None:
            # e.g. Mixtral in transformers 5 fuses expert weights at load time under new names
            raise NotCalibratable(f"the checkpoint has no tensor named like the model's {name}")
        set_module_tensor_to_device(model, name, "cpu", value=read(info).to(torch.float32))


def collect_moments(
    src: Source,
    tokens: torch.Tensor,
    on_module: Callable[[ModuleMoments], None],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Run the original model layer by layer over ``tokens`` ``[B, T]`` and report each converted
    attention module's input moments to ``on_module`` as soon as its layer has run (and its
    weights are dropped). Nothing here keeps the moments afterwards: memory stays at one layer
    as long as ``on_module`` keeps only what it derives from them.

    Raises :class:`NotCalibratable` for families whose layers cannot run one at a time here
    (no causal-LM class, converted modules outside one stack of layers, e.g. T5's cross-attention).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = src.config
    arch: Architecture = get_architecture(config)
    if not arch.native:
        # The original skeleton of a family without native GQA may be one of ours (re-converting a
        # ``*_gqa`` checkpoint): the Auto classes know it only once registered.
        from ..modeling import register_auto_classes

        register_auto_classes()
    cfg = hf_config(config)
    cfg.use_cache = False
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg)
    except ValueError as e:
        raise NotCalibratable(f"no causal-LM class for model_type {config.get('model_type')!r}") from e
    model.eval()
    n_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    layers_name, layers = _find_layers(model, n_layers)
    resolve = _NameResolver(src.reader.infos())
    read = src.reader.read
    converted = arch.attention_modules((i.name for i in src.reader.infos()), converted_only=True)
    owner = {n: mt.name for mt in converted.values() for names in mt.tensors.values() for n in names}

    # Attention modules of each layer that the converter merges, by their checkpoint name.
    attn_of_layer: list[list[tuple[str, torch.nn.Module, str]]] = [[] for _ in range(len(layers))]
    for mname, mod in model.named_modules():
        if not mname.startswith(layers_name + "."):
            continue
        for pname, _ in mod.named_parameters():
            info = resolve(f"{mname}.{pname}")
            module_name = owner.get(info.name) if info is not None else None
            # ``mod`` is the attention module itself when the parameter's path inside it is the suffix.
            if module_name is not None and info.name == f"{module_name}.{pname}":  # type: ignore[union-attr]
                idx = int(mname[len(layers_name) + 1 :].split(".")[0])
                if all(a[2] != module_name for a in attn_of_layer[idx]):
                    attn_of_layer[idx].append((mname, mod, module_name))
                break
    n_found = sum(len(a) for a in attn_of_layer)
    n_ckpt = len(converted)
    if n_found != n_ckpt:
        raise NotCalibratable(
            f"found {n_found} of {n_ckpt} converted attention modules in the decoder layers"
        )

    layer_param_prefix = layers_name + "."
    outer = [n for n, _ in model.named_parameters() if not n.startswith(layer_param_prefix)]
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    named = dict(model.named_parameters())
    before = [n for n in outer if id(named[n]) not in head_params]
    _load_params(model, before, resolve, read, strict=False)

    # Catch the inputs of layer 0 (hidden states and whatever the model passes: masks, rotary).
    caught: list[tuple[tuple, dict]] = []

    def catch(_mod, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    hook = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in tokens.split(batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
                except (RuntimeError, NotImplementedError) as e:  # a parameter left on meta was needed
                    raise NotCalibratable(f"the model's embeddings could not run ({e})") from e
    finally:
        hook.remove()
    if len(caught) != len(tokens.split(batch_size)):
        raise NotCalibratable("the model did not call its first decoder layer")

    # The embeddings only made layer 0's inputs: drop them (0.5 GB in float32 at Llama-2-7B size).
    from accelerate.utils import set_module_tensor_to_device

    for name in before:
        set_module_tensor_to_device(model, name, "meta")
    # Hidden states live in ``states`` only (each layer's output replaces its input), not also in
    # ``caught``: one copy of the calibration activations, not two.
    states = []
    for b, (args, kwargs) in enumerate(caught):
        if args:
            states.append(args[0])
            caught[b] = ((None, *args[1:]), kwargs)
        else:
            states.append(kwargs["hidden_states"])
            caught[b] = (args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
    bar = tqdm(total=len(layers), desc="calibrating", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        lnames = [f"{layers_name}.{i}.{n}" for n, _ in layer.named_parameters()]
        _load_params(model, lnames, resolve, read)
        acc: dict[str, list] = {}
        hooks = []
        for _mname, mod, ckpt_name in attn_of_layer[i]:
            acc[ckpt_name] = [None, 0]

            def pre(_m, args, kwargs, key=ckpt_name, acc=acc):
                x = args[0] if args else kwargs["hidden_states"]
                x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)  # [N, n+1]
                s = x.T @ x
                acc[key][0] = s if acc[key][0] is None else acc[key][0] + s
                acc[key][1] += x.shape[0]

            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                for b, (args, kwargs) in enumerate(caught):
                    out = (
                        layer(states[b], *args[1:], **kwargs)
                        if args
                        else layer(**{**kwargs, "hidden_states": states[b]})
                    )
                    states[b] = out[0] if isinstance(out, tuple) else out
        finally:
            for h in hooks:
                h.remove()
        qk_norms = [converted[ckpt].has_key_norm for _mname, _mod, ckpt in attn_of_layer[i]]
        # Drop the layer's weights before handing on its moments: the consumer reads and fits the
        # attention weights next, so the two never sit in memory together.
        layer.to("meta")
        for (_mname, _mod, ckpt_name), qk_norm in zip(attn_of_layer[i], qk_norms, strict=True):
            s, n = acc.pop(ckpt_name)  # popped: each [n+1, n+1] moment is freed once consumed
            on_module(ModuleMoments(ckpt_name, s.div_(n), n, qk_norm))
            del s
        bar.update(1)
    bar.close()


def iter_isotropic(src: Source) -> Iterator[ModuleMoments]:
    """Data-free stand-in moments (``Σ = I``) for every converted module: used where a family
    cannot be calibrated layer by layer, so ``aligned`` still fits from the weights alone."""
    arch = get_architecture(src.config)
    infos = {i.name: i for i in src.reader.infos()}
    for name, mt in arch.attention_modules(infos, converted_only=True).items():
        n = _input_size(mt, infos)
        if n is not None:
            yield ModuleMoments(name, torch.eye(n + 1, dtype=torch.float64), 0, mt.has_key_norm)


def _input_size(mt: ModuleTensors, infos: dict[str, TensorInfo]) -> int | None:
    """The module's input width: the non-head axis of its first Q, K or V projection weight."""
    for suffix, names in mt.tensors.items():
        p = mt.module.tensors[suffix]
        is_input_proj = p.kind != "heads" or p.role in ("q", "k", "v")
        if is_input_proj and mt.module.tensor_kind(suffix) == "weight" and "weight" in suffix:
            return infos[names[0]].shape[1 - p.axis]
    return None
