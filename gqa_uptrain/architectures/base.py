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
from collections.abc import Callable, Mapping
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

    def match(self, name: str) -> tuple[str, str, int | None] | None:
        """``(module_name, suffix, head)`` if ``name`` is one of this module's head-carrying tensors.

        A suffix may be a *per-head template* such as ``k_layernorm.norms.{i}.weight`` (one module
        per head, as StableLM's qk_layernorm): its tensors are stacked in head order into one
        ``[n * d]`` tensor for merging, and ``head`` is the index parsed from ``name``.
        """
        for suffix in self.tensors:
            if "{i}" in suffix:
                tail = re.escape(suffix).replace(re.escape("{i}"), r"(\d+)")
                m = re.search(rf"^(.*)\.{tail}$", name)
                module, head = (m.group(1), int(m.group(2))) if m else (None, None)
            elif name.endswith("." + suffix):
                module, head = name[: -len(suffix) - 1], None
            else:
                continue
            if module is not None and re.search(rf"(?:^|\.){self.pattern}$", module):
                return module, suffix, head
        return None


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
    kv_heads_key: str = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"  # written explicitly to the output config when set
    remote_code: RemoteCode | None = None
    notes: str = ""
    extra_checks: tuple[Callable[[Mapping[str, Any]], None], ...] = field(default_factory=tuple)

    @property
    def native(self) -> bool:
        """True when stock transformers loads the converted checkpoint with no custom code."""
        return self.remote_code is None

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
