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

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..architectures import ModuleTensors, get_architecture
from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import Source, TensorInfo
from .device import Placement, device_budget, place_activations

# Re-exported: their home was this module.
from .moments import ModuleMoments, MomentAccumulator

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
            from ..io.gguf import gguf_tokenizer

            return gguf_tokenizer(src)
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
    _warn_if_uncovered(tok, ids[: spec.num_tokens], spec.data)
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


def _warn_if_uncovered(tok: Any, ids: list[int], what: str) -> None:
    """One warning line when the tokenizer does not cover the calibration text (binary data, an
    unknown script: mostly unknown or byte-fallback tokens), with the measured share."""
    from ..data.coverage import coverage_warning, token_coverage

    message = coverage_warning(token_coverage(tok, ids), what)
    if message:
        logger.warning("%s", message)


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
    device: torch.device | str = "cpu",
) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        info = resolve(name)
        # Not stored under its own name: transformers may build it at load time from tensors stored
        # under others (Mixtral's experts in transformers 5), as the family's data describes.
        value = read(info).to(torch.float32) if info is not None else _read_fused(model, name, resolve, read)
        if value is None and not strict:
            continue  # e.g. a task head's bias: stays on meta, never runs before layer 0
        if value is None:
            raise NotCalibratable(f"the checkpoint has no tensor named like the model's {name}")
        set_module_tensor_to_device(model, name, device, value=value)


def _read_fused(
    model: torch.nn.Module,
    name: str,
    resolve: _NameResolver,
    read: Callable[[TensorInfo], torch.Tensor],
) -> torch.Tensor | None:
    """Model parameter ``name`` (float32) built from the checkpoint as transformers builds it at load
    time, by the first of the family's ``fused_params`` whose tensors the checkpoint has; None if
    none applies. Filled in place, one source tensor at a time: no stacked or concatenated copies."""
    try:
        recipes = get_architecture({"model_type": model.config.model_type}).fused_params
    except (AttributeError, CheckpointError):
        return None
    for fp in recipes:
        parent = fp.parent(name)
        groups = _fused_sources(parent, fp.sources, resolve) if parent is not None else None
        if groups is None:
            continue
        stacked = ["{i}" in s for s in fp.sources]
        shapes = [
            (len(g), *g[0].shape) if st else tuple(g[0].shape) for g, st in zip(groups, stacked, strict=True)
        ]
        want = tuple(model.get_parameter(name).shape)
        axis = fp.cat_axis % max(len(want), 1)
        fits = all(len({tuple(i.shape) for i in g}) == 1 for g in groups)  # experts all alike
        fits = fits and all(
            len(s) == len(want) and s[:axis] + s[axis + 1 :] == want[:axis] + want[axis + 1 :] for s in shapes
        )
        if not (fits and sum(s[axis] for s in shapes) == want[axis]):
            raise NotCalibratable(
                f"the model's {name} {list(want)} cannot be built from the checkpoint's "
                f"{', '.join(parent + s for s in fp.sources)} (shapes {[list(s) for s in shapes]})"
            )
        out = torch.empty(want, dtype=torch.float32)
        offset = 0
        for g, st, shape in zip(groups, stacked, shapes, strict=True):
            part = out.narrow(axis, offset, shape[axis])
            offset += shape[axis]
            for i, info in enumerate(g):
                (part.select(0, i) if st else part).copy_(read(info))
        return out
    return None


def _fused_sources(
    parent: str, sources: tuple[str, ...], resolve: _NameResolver
) -> list[list[TensorInfo]] | None:
    """Per source name under ``parent``, the checkpoint tensors behind it: one, or for a numbered
    template (``experts.{i}.w1.weight``) those of ``i = 0, 1, ...`` while they exist. None if any
    source has none."""
    groups = []
    for src in sources:
        if "{i}" not in src:
            info = resolve(parent + src)
            found = [info] if info is not None else []
        else:
            found = []
            while (info := resolve(parent + src.replace("{i}", str(len(found))))) is not None:
                found.append(info)
        if not found:
            return None
        groups.append(found)
    return groups


class LayerWalk:
    """A model run one decoder layer at a time over calibration tokens, loading each layer's
    weights from the checkpoint only while it runs.

    The skeleton is built on the meta device from ``config`` (the source's by default; refinement
    builds a second one for the converted model), only the parameters that run before the first
    layer (embeddings) are loaded, and the inputs of layer 0 are caught for every batch:
    ``states[b]`` ``[batch, T, hidden]`` are the hidden states and ``extras[b]`` the other arguments
    the model passes its layers (masks, rotary tables), which stay the same for every layer.

    Everything runs on ``device``, one layer's weights at a time; ``states`` live where
    :attr:`placement` says (on the device when ``copies`` activations of every calibration token fit
    ``max_device_memory``, else in host memory): :meth:`run` takes them to the device and
    :meth:`keep` brings results home.

    Raises :class:`NotCalibratable` for families whose layers cannot run one at a time here
    (no causal-LM class, converted modules outside one stack of layers, e.g. T5's cross-attention).
    """

    def __init__(
        self,
        src: Source,
        tokens: torch.Tensor,
        *,
        batch_size: int = 8,
        config: dict[str, Any] | None = None,
        device: torch.device | None = None,
        copies: int = 1,
        max_device_memory: int | None = None,
    ):
        self.src = src
        self.device = device or torch.device("cpu")
        self.model, self.layers_name, self.layers = _skeleton(config or src.config, src, self.device)
        self.placement = _placement(
            self.model, self.layers[0], tokens, batch_size, self.device, copies, max_device_memory
        )
        self.resolve = _NameResolver(src.reader.infos())
        self.converted = get_architecture(src.config).attention_modules(
            (i.name for i in src.reader.infos()), converted_only=True
        )
        self.attention = _attention_of_layers(
            self.model, self.layers_name, self.layers, self.resolve, self.converted
        )
        self.states, self.extras = _catch_layer_inputs(self.model, self.layers[0], tokens, batch_size, self)

    def load_params(
        self, model: torch.nn.Module, names: list[str], overrides: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Load ``model``'s parameters ``names`` from the checkpoint (``overrides`` by model name first)."""
        from accelerate.utils import set_module_tensor_to_device

        overrides = overrides or {}
        for name in names:
            if name in overrides:
                set_module_tensor_to_device(
                    model, name, self.device, value=overrides[name].detach().to(torch.float32)
                )
        rest = [n for n in names if n not in overrides]
        _load_params(model, rest, self.resolve, self.src.reader.read, device=self.device)

    def load_layer(
        self,
        i: int,
        model: torch.nn.Module | None = None,
        overrides: dict[str, torch.Tensor] | None = None,
        skip: set[str] | frozenset[str] = frozenset(),
    ) -> torch.nn.Module:
        """Layer ``i`` of ``model`` (this walk's skeleton by default) with its weights loaded (those
        named in ``skip`` are left as they are: already loaded)."""
        model = model or self.model
        layers = self.layers if model is self.model else _find_layers(model, len(self.layers))[1]
        layer = layers[i]
        names = [f"{self.layers_name}.{i}.{n}" for n, _ in layer.named_parameters()]
        self.load_params(model, [n for n in names if n not in skip], overrides)
        return layer

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """An activation moved to where this walk keeps them (:attr:`placement`)."""
        return self.placement.keep(t)

    def run(
        self, layer: torch.nn.Module, b: int, hidden: torch.Tensor, *, bf16: bool = False
    ) -> torch.Tensor:
        """``layer`` on batch ``b``'s arguments with ``hidden`` as its input: its output states (on
        the device, in ``hidden``'s dtype; :meth:`keep` them). ``bf16``: in bfloat16 autocast."""
        args, kwargs = self.extras[b]
        hidden = self.placement.use(hidden)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
        out = out[0] if isinstance(out, tuple) else out
        return out.to(hidden.dtype)


def _skeleton(
    config: dict[str, Any], src: Source, device: torch.device | None = None
) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """``config``'s causal LM on the meta device (its buffers, e.g. rotary tables, on ``device``), and
    its stack of decoder layers."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if not get_architecture(config).native or not get_architecture(src.config).native:
        # The skeleton of a family without native GQA may be one of ours (re-converting a
        # ``*_gqa`` checkpoint, or the converted model): the Auto classes know it once registered.
        from ..modeling import register_auto_classes

        register_auto_classes()
    cfg = hf_config(config)
    cfg.use_cache = False
    model = None
    # A language-model head is only there to find the embeddings and layers: encoders (BERT, ours
    # among them) have a masked-LM class where they have no causal one.
    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):
        with contextlib.suppress(ValueError), init_empty_weights(include_buffers=False):
            model = auto.from_config(cfg)
            break
    if model is None:
        raise NotCalibratable(f"no causal-LM class for model_type {config.get('model_type')!r}")
    # Calibration runs in float32 whatever the checkpoint's dtype (a config may ask for bf16):
    # loaded values take the dtype of the meta parameter they replace.
    model.to(torch.float32).eval()
    if device is not None and device.type != "cpu":
        for name, buf in list(model.named_buffers()):
            if buf.device.type != "meta":
                set_module_tensor_to_device(model, name, device, value=buf)
    n_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    name, layers = _find_layers(model, n_layers)
    return model, name, layers


def _placement(
    model: torch.nn.Module,
    first: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int,
    device: torch.device,
    copies: int,
    max_device_memory: int | None,
) -> Placement:
    """Where the walk keeps its activations: ``copies`` float32 vectors of the hidden size per
    calibration token, on ``device`` when they fit its budget next to the working memory (the
    layer's weights twice, original and converted; a batch's intermediates, generously)."""
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    activation = copies * tokens.numel() * hidden * 4
    layer_bytes = sum(p.numel() for p in first.parameters()) * 4
    batch_tokens = min(batch_size, tokens.shape[0]) * tokens.shape[1]
    heads = int(getattr(model.config, "num_attention_heads", 1) or 1)
    scores = min(batch_size, tokens.shape[0]) * heads * tokens.shape[1] ** 2 * 4  # eager attention
    working = 2 * layer_bytes + 16 * batch_tokens * hidden * 4 + 3 * scores
    return place_activations(device, activation, working, device_budget(device, max_device_memory))


def _attention_of_layers(
    model: torch.nn.Module,
    layers_name: str,
    layers: torch.nn.ModuleList,
    resolve: _NameResolver,
    converted: dict[str, ModuleTensors],
) -> list[list[tuple[str, torch.nn.Module, str]]]:
    """Per layer: ``(model path, module, checkpoint name)`` of each attention module the converter merges."""
    owner = {n: mt.name for mt in converted.values() for names in mt.tensors.values() for n in names}
    found: list[list[tuple[str, torch.nn.Module, str]]] = [[] for _ in range(len(layers))]
    for mname, mod in model.named_modules():
        if not mname.startswith(layers_name + "."):
            continue
        for pname, _ in mod.named_parameters():
            info = resolve(f"{mname}.{pname}")
            module_name = owner.get(info.name) if info is not None else None
            # ``mod`` is the attention module itself when the parameter's path inside it is the suffix.
            if module_name is not None and info.name == f"{module_name}.{pname}":  # type: ignore[union-attr]
                idx = int(mname[len(layers_name) + 1 :].split(".")[0])
                if all(a[2] != module_name for a in found[idx]):
                    found[idx].append((mname, mod, module_name))
                break
    n_found = sum(len(a) for a in found)
    if n_found != len(converted):
        raise NotCalibratable(
            f"found {n_found} of {len(converted)} converted attention modules in the decoder layers"
        )
    return found


def _catch_layer_inputs(
    model: torch.nn.Module, first: torch.nn.Module, tokens: torch.Tensor, batch_size: int, walk: LayerWalk
) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """Run the embeddings over ``tokens`` and catch what the first layer receives, per batch."""
    from accelerate.utils import set_module_tensor_to_device

    prefix = walk.layers_name + "."
    outer = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    named = dict(model.named_parameters())
    before = [n for n in outer if id(named[n]) not in head_params]
    _load_params(model, before, walk.resolve, walk.src.reader.read, strict=False, device=walk.device)

    caught: list[tuple[tuple, dict]] = []

    def catch(_mod, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    hook = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in tokens.split(batch_size):
                try:
                    model(input_ids=batch.to(walk.device), use_cache=False)
                except _Stop:
                    pass
                except (RuntimeError, NotImplementedError) as e:  # a parameter left on meta was needed
                    raise NotCalibratable(f"the model's embeddings could not run ({e})") from e
    finally:
        hook.remove()
    if len(caught) != len(tokens.split(batch_size)):
        raise NotCalibratable("the model did not call its first decoder layer")
    # The embeddings only made layer 0's inputs: drop them (0.5 GB in float32 at Llama-2-7B size).
    for name in before:
        set_module_tensor_to_device(model, name, "meta")
    # Hidden states live in ``states`` only (each layer's output replaces its input), not also in
    # the caught arguments: one copy of the calibration activations, not two.
    states, extras = [], []
    for args, kwargs in caught:
        if args:
            states.append(walk.keep(args[0]))
            extras.append(((None, *args[1:]), kwargs))
        else:
            states.append(walk.keep(kwargs["hidden_states"]))
            extras.append((args, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
    return states, extras


def collect_moments(
    src: Source,
    tokens: torch.Tensor,
    on_module: Callable[[ModuleMoments], None],
    *,
    batch_size: int = 8,
    progress: bool = True,
    device: torch.device | None = None,
    max_device_memory: int | None = None,
) -> None:
    """Run the original model layer by layer over ``tokens`` ``[B, T]`` and report each converted
    attention module's input moments to ``on_module`` as soon as its layer has run (and its
    weights are dropped). Nothing here keeps the moments afterwards: memory stays at one layer
    as long as ``on_module`` keeps only what it derives from them. Runs on ``device`` (the CPU by
    default); the moments arrive there, in float64.

    Raises :class:`NotCalibratable` where :class:`LayerWalk` cannot run the family.
    """
    walk = LayerWalk(src, tokens, batch_size=batch_size, device=device, max_device_memory=max_device_memory)
    # When the calibration inputs are smaller than the moment matrix (few tokens of a wide model:
    # 2,048 tokens at Llama-2-7B width are 34 MB against 134 MB), they are kept and summed after
    # the layer's weights are dropped, so the moments never sit beside the float32 layer. The same
    # products in the same order: the same figures, bit for bit.
    hidden = int(getattr(walk.model.config, "hidden_size", 0) or 0)
    defer = 0 < tokens.numel() * hidden * 4 <= (hidden + 1) ** 2 * 8
    bar = tqdm(total=len(walk.layers), desc="calibrating", unit="layer", disable=not progress)
    for i in range(len(walk.layers)):
        layer = walk.load_layer(i)
        acc = {ckpt: MomentAccumulator(defer=defer) for _m, _mod, ckpt in walk.attention[i]}
        hooks = [
            mod.register_forward_pre_hook(acc[ckpt].hook, with_kwargs=True)
            for _m, mod, ckpt in walk.attention[i]
        ]
        try:
            for b in range(len(walk.states)):
                walk.states[b] = walk.keep(walk.run(layer, b, walk.states[b]))
        finally:
            for h in hooks:
                h.remove()
        # Drop the layer's weights before handing on its moments: the consumer reads and fits the
        # attention weights next, so the two never sit in memory together.
        layer.to("meta")
        for _mname, _mod, ckpt in walk.attention[i]:
            on_module(acc.pop(ckpt).moments(ckpt, walk.converted[ckpt].has_key_norm))
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
