"""The data that describes a model family's attention heads, and the operations on it.

A family is an :class:`Architecture`: which config keys hold the head counts, which tensors belong
to an attention module, and how heads are laid out inside each of those tensors (a
:class:`Packing`). Everything else (reading, merging, writing) is generic and driven by this data,
so adding a family is a few lines in ``native.py`` or ``custom.py``.

Conventions: ``H`` query heads, ``Hkv`` key/value heads in the source, ``G`` key/value heads wanted,
``d`` the head dimension. A packing turns a tensor into *head blocks*: for each role it carries
(``q``, ``k``, ``v`` or ``o``) a tensor of shape ``[n_heads, d, *rest]`` with the heads first, and
back. Query head ``i`` reads K/V head ``i // (H // Hkv)`` (transformers' ``repeat_kv``), so the
group of a new K/V head ``j`` is the contiguous run of source K/V heads ``j*g .. j*g+g-1``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import CheckpointError, ConfigError

Role = Literal["q", "k", "v", "o"]


@dataclass(frozen=True)
class AttentionDims:
    """Head counts of one attention module type, read from the config."""

    num_heads: int  # H, query heads
    num_kv_heads: int  # Hkv, key/value heads in the checkpoint
    head_dim: int  # d

    def check_target(self, num_kv_heads: int) -> None:
        """Refuse a target number of K/V heads that cannot be reached by merging whole groups."""
        g = num_kv_heads
        if g <= 0:
            raise ConfigError(f"--num-kv-heads must be a positive integer, got {g}")
        if g > self.num_kv_heads:
            raise ConfigError(
                f"--num-kv-heads {g} is larger than the model's {self.num_kv_heads} K/V heads; "
                f"merging can only reduce them: pick a divisor of {self.num_kv_heads}"
            )
        if self.num_kv_heads % g:
            divisors = [x for x in range(1, self.num_kv_heads + 1) if self.num_kv_heads % x == 0]
            raise ConfigError(
                f"--num-kv-heads {g} does not divide the model's {self.num_kv_heads} K/V heads; "
                f"pick one of {divisors}"
            )


@dataclass(frozen=True)
class Packing:
    """How the heads of one tensor are laid out along ``axis``.

    kind:
      - ``heads``: the axis is ``[n * d]`` for the single role ``role`` (``k_proj.weight`` rows,
        a bias, OLMo2's whole-projection ``k_norm``; ``o_proj.weight`` columns with ``axis=1``).
      - ``qkv_blocks``: the axis is ``[Q (H*d) | K (Hkv*d) | V (Hkv*d)]`` (Phi-3 ``qkv_proj`` rows,
        GPT-2 ``c_attn`` columns with ``axis=1`` since Conv1D stores the weight transposed).
      - ``grouped_qkv``: the axis is ``[Hkv, H/Hkv + 2, d]``: per K/V group its query heads, then
        its K head, then its V head (Falcon; GPT-NeoX is the case ``Hkv == H``).
    """

    kind: Literal["heads", "qkv_blocks", "grouped_qkv"]
    role: Role | None = None
    axis: int = 0

    def roles(self) -> tuple[Role, ...]:
        return (self.role,) if self.kind == "heads" else ("q", "k", "v")  # type: ignore[return-value]

    def axis_size(self, dims: AttentionDims, num_kv_heads: int) -> int:
        """Length of the packed axis for a module with ``num_kv_heads`` K/V heads."""
        h, d = dims.num_heads, dims.head_dim
        if self.kind == "heads":
            return (h if self.role in ("q", "o") else num_kv_heads) * d
        return (h + 2 * num_kv_heads) * d

    def unpack(self, t: torch.Tensor, dims: AttentionDims) -> dict[Role, torch.Tensor]:
        """Split ``t`` into head blocks ``{role: [n_heads, d, *rest]}`` (views where possible)."""
        h, hkv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
        x = t.movedim(self.axis, 0)  # [axis, *rest]
        rest = x.shape[1:]
        if self.kind == "heads":
            return {self.role: x.reshape(-1, d, *rest)}  # type: ignore[dict-item]
        if self.kind == "qkv_blocks":
            q, k, v = x.split([h * d, hkv * d, hkv * d], dim=0)
            return {"q": q.reshape(h, d, *rest), "k": k.reshape(hkv, d, *rest), "v": v.reshape(hkv, d, *rest)}
        g = h // hkv
        x = x.reshape(hkv, g + 2, d, *rest)  # per K/V group: g query heads, K, V
        return {"q": x[:, :g].reshape(h, d, *rest), "k": x[:, g], "v": x[:, g + 1]}

    def pack(self, parts: Mapping[Role, torch.Tensor], dims: AttentionDims) -> torch.Tensor:
        """Inverse of :meth:`unpack`; the number of K/V heads is read off ``parts``."""
        if self.kind == "heads":
            x = parts[self.role]  # type: ignore[index]
            x = x.reshape(-1, *x.shape[2:])
        elif self.kind == "qkv_blocks":
            x = torch.cat([parts[r].reshape(-1, *parts[r].shape[2:]) for r in ("q", "k", "v")], dim=0)
        else:
            q, k, v = parts["q"], parts["k"], parts["v"]
            n_kv, d, rest = k.shape[0], k.shape[1], k.shape[2:]
            q = q.reshape(n_kv, -1, d, *rest)  # [G, g, d, *rest]
            x = torch.cat([q, k.unsqueeze(1), v.unsqueeze(1)], dim=1).reshape(-1, *rest)
        return x.movedim(0, self.axis).contiguous()


def heads(role: Role, axis: int = 0) -> Packing:
    """Shorthand for a single-role :class:`Packing`."""
    return Packing("heads", role, axis)


@dataclass(frozen=True)
class Rotary:
    """Where RoPE applies in a family's heads: merging methods that mix dimensions within a head
    (``aligned``) must commute with the rotation, so they need to know which dims it turns.

    kind:
      - ``none``: no rotary embedding (learned or relative positions: GPT-2, OPT, T5, BERT);
      - ``full``: every dim of the head is rotated;
      - ``partial``: the leading ``factor * head_dim`` dims are rotated, the factor read from the
        first of ``factor_keys`` the config (or its ``rope_parameters``) sets, else 1.

    ``layout`` is how rotated dims pair up: in ``rotate_half`` dim ``p`` pairs with ``p + R/2``.
    """

    kind: Literal["none", "full", "partial"] = "full"
    factor_keys: tuple[str, ...] = ("partial_rotary_factor", "rotary_pct")
    layout: Literal["rotate_half"] = "rotate_half"

    def dims(self, config: Mapping[str, Any], head_dim: int) -> int:
        """How many leading dims of each head RoPE rotates (even); 0 without RoPE."""
        if self.kind == "none":
            return 0
        if self.kind == "full":
            return head_dim - head_dim % 2
        rope = config.get("rope_parameters")
        rope = rope if isinstance(rope, Mapping) else {}
        factor = next((config[k] for k in self.factor_keys if config.get(k)), None)
        factor = factor or next((rope[k] for k in self.factor_keys if rope.get(k)), None) or 1.0
        r = int(head_dim * float(factor))
        return r - r % 2


NO_ROPE = Rotary("none")
PARTIAL_ROPE = Rotary("partial")


@dataclass(frozen=True)
class Norm:
    """A normalisation applied to one role's heads after projecting (Qwen3 / OLMo2 ``k_norm``,
    StableLM ``qk_layernorm``): keys (or queries) are then no longer linear in the module's input.

    scope:
      - ``shared``: one ``[d]`` weight applied to every head alone (Qwen3); conversion leaves it
        unchanged, so it is not among the module's head-carrying ``tensors``;
      - ``heads``: a weight that follows the heads (OLMo2's whole-projection ``[Hkv*d]`` norm,
        StableLM's per-head modules); it is in ``tensors`` too, and merged with the heads.
    """

    role: Role
    scope: Literal["shared", "heads"]


def _match_suffix(name: str, suffix: str, pattern: str) -> tuple[str, int | None] | None:
    """``(module_name, head)`` if ``name`` is ``<module matching pattern>.<suffix>`` (a suffix may be
    a per-head template with ``{i}``); None otherwise."""
    if "{i}" in suffix:
        tail = re.escape(suffix).replace(re.escape("{i}"), r"(\d+)")
        m = re.search(rf"^(.*)\.{tail}$", name)
        if m is None:
            return None
        module, head = m.group(1), int(m.group(2))
    elif name.endswith("." + suffix):
        module, head = name[: -len(suffix) - 1], None
    else:
        return None
    if re.search(rf"(?:^|\.){pattern}$", module):
        return module, head
    return None


@dataclass(frozen=True)
class AttentionModule:
    """One kind of attention module in a family (e.g. decoder self-attention).

    ``pattern`` is a regular expression for the module's dotted name, matched at the end of the
    tensor's name minus its suffix (so ``model.`` / ``transformer.`` prefixes need no care).
    ``tensors`` maps each tensor suffix that carries heads to its packing; suffixes that a
    checkpoint does not have (optional biases) are simply absent. ``dims`` reads the head counts
    from the config; ``convert`` says whether K/V heads of this module are merged (T5's encoder
    stays MHA, as in the paper). ``cached`` says whether the module keeps a KV cache at decode time.
    """

    pattern: str
    tensors: Mapping[str, Packing]
    dims: Callable[[Mapping[str, Any]], AttentionDims]
    convert: bool = True
    cached: bool = True
    count: Callable[[Mapping[str, Any]], int] = lambda cfg: int(cfg["num_hidden_layers"])
    norms: Mapping[str, Norm] = field(default_factory=dict)
    """Normalisations of Q or K heads, by tensor suffix (see :class:`Norm`)."""

    def match(self, name: str) -> tuple[str, str, int | None] | None:
        """``(module_name, suffix, head)`` if ``name`` is one of this module's head-carrying tensors.

        A suffix may be a *per-head template* such as ``k_layernorm.norms.{i}.weight`` (one module
        per head, as StableLM's qk_layernorm): its tensors are stacked in head order into one
        ``[n * d]`` tensor for merging, and ``head`` is the index parsed from ``name``.
        """
        for suffix in self.tensors:
            hit = _match_suffix(name, suffix, self.pattern)
            if hit is not None:
                return hit[0], suffix, hit[1]
        return None

    def match_norm(self, name: str) -> tuple[str, str] | None:
        """``(module_name, suffix)`` if ``name`` is one of this module's Q/K norm tensors."""
        for suffix in self.norms:
            hit = _match_suffix(name, suffix, self.pattern)
            if hit is not None:
                return hit[0], suffix
        return None

    def tensor_kind(self, suffix: str) -> Literal["weight", "bias", "norm"]:
        """What a head-carrying tensor is: a projection's weight or bias, or a norm's parameter."""
        if suffix in self.norms:
            return "norm"
        return "bias" if suffix.endswith("bias") else "weight"


@dataclass(frozen=True)
class ModuleTensors:
    """One attention module of a checkpoint: its name, its family description, its tensors.

    ``tensors`` maps each head-carrying suffix present to the tensor names behind it (one name, or
    one per head in head order for a per-head template), in the order the names were given;
    ``norms`` maps each Q/K norm suffix present (shared ones included) to its tensor names.
    """

    name: str
    module: AttentionModule
    tensors: Mapping[str, tuple[str, ...]]
    norms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def has_key_norm(self) -> bool:
        """True when keys are normalised after projecting (so not linear in the module's input)."""
        return any(self.module.norms[s].role == "k" for s in self.norms)


@dataclass(frozen=True)
class FusedParam:
    """A model parameter that transformers assembles at load time from checkpoint tensors stored
    under other names (transformers 5 fuses Mixtral's experts; 4.x keeps the checkpoint's layout,
    so its names match and this is never consulted). Calibration runs the original model one layer
    at a time and loads each parameter itself, so it needs the same recipe.

    ``param`` is the end of the model's parameter name after its parent module's path (e.g.
    ``mlp.experts.gate_up_proj`` under ``model.layers.3.``). Each of ``sources`` is a checkpoint
    tensor name under that same parent; one with ``{i}`` stands for a numbered list of modules
    (``experts.{i}.w1.weight``): its tensors ``i = 0, 1, ...`` are stacked along a new first axis.
    The sources, stacked or not, are then concatenated along ``cat_axis``. One source without
    ``{i}`` is a plain rename.
    """

    param: str
    sources: tuple[str, ...]
    cat_axis: int = 0

    def parent(self, name: str) -> str | None:
        """The parent path of model parameter ``name`` (with its trailing dot) if this recipe builds
        it, else None."""
        if name == self.param:
            return ""
        return name[: -len(self.param)] if name.endswith("." + self.param) else None


@dataclass(frozen=True)
class RemoteCode:
    """Modelling code shipped inside a converted checkpoint (families without native GQA)."""

    model_type: str  # the model_type written to config.json
    files: Callable[[], list[Any]]  # paths of the .py files to copy next to the weights
    auto_map: Mapping[str, str]  # config.json "auto_map"
    architectures: Callable[[list[str]], list[str]] = lambda archs: archs


@dataclass(frozen=True)
class Architecture:
    """A model family: its config keys and attention modules, as data."""

    name: str
    model_types: tuple[str, ...]
    modules: tuple[AttentionModule, ...]
    rotary: Rotary = Rotary("full")
    kv_heads_key: str = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"  # written explicitly to the output config when set
    remote_code: RemoteCode | None = None
    notes: str = ""
    extra_checks: tuple[Callable[[Mapping[str, Any]], None], ...] = field(default_factory=tuple)
    fused_params: tuple[FusedParam, ...] = ()
    """Model parameters transformers renames or fuses at load time (see :class:`FusedParam`)."""

    @property
    def native(self) -> bool:
        """True when stock transformers loads the converted checkpoint with no custom code."""
        return self.remote_code is None

    def locate(self, name: str) -> tuple[AttentionModule, str, str, int | None] | None:
        """``(module, module_name, suffix, head)`` for a head-carrying attention tensor, else None."""
        for module in self.modules:
            hit = module.match(name)
            if hit:
                return module, *hit
        return None

    def attention_modules(
        self, names: Iterable[str], *, converted_only: bool = False
    ) -> dict[str, ModuleTensors]:
        """The attention modules among tensor ``names``, by module name, in order of first
        appearance: every head-carrying tensor of each (the one place that decides which tensors
        belong to which module, for conversion, calibration and merging alike).

        ``converted_only`` leaves out modules whose K/V heads are not merged (T5's encoder).
        """
        found: dict[str, tuple[AttentionModule, dict[str, list[tuple[int, str]]], dict[str, list[str]]]] = {}
        names = list(names)
        for name in names:
            hit = self.locate(name)
            if hit is None or (converted_only and not hit[0].convert):
                continue
            module, module_name, suffix, head = hit
            entry = found.setdefault(module_name, (module, {}, {}))
            entry[1].setdefault(suffix, []).append((head or 0, name))
        for name in names:  # norms, shared ones included, of the modules found
            for module in self.modules:
                hit = module.match_norm(name)
                if hit and hit[0] in found and found[hit[0]][0] is module:
                    found[hit[0]][2].setdefault(hit[1], []).append(name)
                    break
        return {
            module_name: ModuleTensors(
                module_name,
                module,
                {s: tuple(n for _, n in sorted(items, key=lambda x: x[0])) for s, items in tensors.items()},
                {s: tuple(v) for s, v in norms.items()},
            )
            for module_name, (module, tensors, norms) in found.items()
        }

    def converted_dims(self, config: Mapping[str, Any]) -> AttentionDims:
        """Head counts of the modules whose K/V heads are merged (they must agree)."""
        dims = {m.dims(config) for m in self.modules if m.convert}
        if len(dims) != 1:
            raise CheckpointError(f"{self.name}: attention modules disagree on head counts: {sorted(dims)}")
        return dims.pop()

    def check_config(self, config: Mapping[str, Any]) -> AttentionDims:
        """Validate the head counts in ``config`` and return those of the converted modules."""
        for check in self.extra_checks:
            check(config)
        dims = self.converted_dims(config)
        if dims.num_heads % dims.num_kv_heads:
            raise CheckpointError(
                f"config.json: {dims.num_heads} attention heads is not a multiple of "
                f"{dims.num_kv_heads} K/V heads; the checkpoint's config is inconsistent"
            )
        return dims

    def output_config(self, config: Mapping[str, Any], num_kv_heads: int) -> dict[str, Any]:
        """The config of the converted checkpoint."""
        out = dict(config)
        dims = self.converted_dims(config)
        out[self.kv_heads_key] = num_kv_heads
        if self.head_dim_key:
            out[self.head_dim_key] = dims.head_dim
        if self.remote_code is not None:
            rc = self.remote_code
            out["model_type"] = rc.model_type
            out["auto_map"] = dict(rc.auto_map)
            out["architectures"] = rc.architectures(list(config.get("architectures") or []))
        return out

    def kv_cache_bytes_per_token(
        self, config: Mapping[str, Any], num_kv_heads: int | None, itemsize: int
    ) -> int:
        """Bytes of K and V cached per generated token, over all cached modules.

        ``num_kv_heads`` overrides the converted modules' K/V heads (None: as in ``config``).
        """
        total = 0
        for m in self.modules:
            if not m.cached:
                continue
            dims = m.dims(config)
            n = num_kv_heads if (m.convert and num_kv_heads is not None) else dims.num_kv_heads
            total += 2 * m.count(config) * n * dims.head_dim * itemsize
        return total


def standard_dims(
    heads_key: str = "num_attention_heads",
    kv_key: str | None = "num_key_value_heads",
    hidden_key: str = "hidden_size",
    head_dim_key: str | None = "head_dim",
) -> Callable[[Mapping[str, Any]], AttentionDims]:
    """A ``dims`` reader for configs laid out like Llama's."""

    def read(cfg: Mapping[str, Any]) -> AttentionDims:
        try:
            h = int(cfg[heads_key])
            hkv = cfg.get(kv_key) if kv_key else None
            hkv = h if hkv is None else int(hkv)
            d = cfg.get(head_dim_key) if head_dim_key else None
            d = int(d) if d else int(cfg[hidden_key]) // h
        except KeyError as e:
            raise CheckpointError(
                f"config.json has no {e.args[0]!r}; is this a complete checkpoint?"
            ) from None
        return AttentionDims(h, hkv, d)

    return read
