"""Plan a conversion from the source's headers alone: every output tensor's shape and dtype, the
output files and their sizes, the KV-cache saving, and the checks made before anything is written
(``gqa-convert --dry-run`` prints it). No tensor data is read here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..architectures import Architecture, AttentionModule, get_architecture
from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import (
    TOKENIZER_FILES,
    Source,
    TensorInfo,
    dtype_itemsize,
    iter_tensor_groups,
    open_source,
)
from ..io.locate import is_hub_id
from ..io.outputs import (
    check_free_space,
    check_output_dir,
    clean_stale_siblings,
    tree_bytes,
)
from ..io.writer import PlannedTensor, parse_size, planned_files

if TYPE_CHECKING:
    from .budget import CalibratedEstimate

logger = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Room for what is written besides the shards and is not known exactly in advance: config.json,
# generation_config.json and the model card (kilobytes).
_SMALL_FILES_MARGIN = 1 << 20


# A GGUF source's tokenizer is rebuilt from its metadata, so its size is unknown up front;
# Llama-3's tokenizer.json (128k tokens) is 9 MB.
_GGUF_TOKENIZER_MARGIN = 32 << 20


@dataclass
class ConversionPlan:
    """What a conversion will write, known from the source's tensor headers before any data is read.

    :func:`plan_conversion` returns it (``gqa-convert --dry-run`` prints it); :func:`convert`
    follows it tensor by tensor. The merge method does not change any shape, so the plan does
    not depend on it.
    """

    source: str
    architecture: str
    model_type: str
    num_heads: int
    num_kv_heads_before: int
    num_kv_heads_after: int
    head_dim: int
    converted_modules: int
    params_before: int
    params_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    dtype: str
    input_bytes: int
    """Bytes of tensor data in the source."""
    tensors: list[PlannedTensor]
    """Every output tensor's name, shape and dtype, in the order it is written."""
    shards: list[tuple[str, int]]
    """Every output weights file (shards and index) with its exact size in bytes."""
    support_bytes: int = 0
    """Room kept for config, tokenizer, generation config, model card and modelling code."""
    needs_trust_remote_code: bool = False
    calibrated: CalibratedEstimate | None = None
    """The calibrated path's peak memory and time, when the plan was asked for with calibration."""

    @property
    def tensor_bytes(self) -> int:
        """Bytes of output tensor data."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        """Exact size of the output weights files (tensor data, headers and index)."""
        return sum(size for _, size in self.shards)

    @property
    def output_bytes(self) -> int:
        """The disk space the whole output folder needs (weights plus :attr:`support_bytes`)."""
        return self.weights_bytes + self.support_bytes

    @property
    def kv_reduction(self) -> float:
        """Fraction of the KV cache saved, 0..1."""
        b = self.kv_bytes_per_token_before
        return 0.0 if not b else 1 - self.kv_bytes_per_token_after / b


@dataclass
class _Slot:
    """One head-carrying tensor of a module, or a per-head list of tensors (``{i}`` template)."""

    suffix: str
    infos: list[TensorInfo]  # one tensor, or one per head in head order

    @property
    def per_head(self) -> bool:
        return "{i}" in self.suffix


@dataclass
class _Unit:
    """One attention module's head-carrying tensors (or a lone pass-through tensor)."""

    infos: list[TensorInfo]  # storage order
    module: AttentionModule | None = None
    module_name: str = ""
    slots: list[_Slot] = field(default_factory=list)


def _group_units(arch: Architecture, infos: list[TensorInfo]) -> list[_Unit]:
    """Storage-ordered units: each attention module's head-carrying tensors together (as the family
    describes them, :meth:`Architecture.attention_modules`), every other tensor alone."""
    modules = arch.attention_modules(i.name for i in infos)
    owner = {n: mt for mt in modules.values() for names in mt.tensors.values() for n in names}
    by_name = {i.name: i for i in infos}
    units = []
    for key, group in iter_tensor_groups(infos, lambda i: owner[i.name].name if i.name in owner else None):
        mt = owner.get(group[0].name)
        if mt is None:
            units.append(_Unit(group))
            continue
        # Slots in the storage order of their first tensor, per-head lists in head order.
        first = {}
        for info in group:
            for suffix, names in mt.tensors.items():
                if info.name in names:
                    first.setdefault(suffix, None)
        slots = [_Slot(s, [by_name[n] for n in mt.tensors[s]]) for s in first]
        units.append(_Unit(group, mt.module, key, slots))
    return units


def _check_shapes(unit: _Unit, config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors disagree with its config, naming the tensor."""
    assert unit.module is not None
    dims = unit.module.dims(config)
    for slot in unit.slots:
        p = unit.module.tensors[slot.suffix]
        want = p.axis_size(dims, dims.num_kv_heads)
        if slot.per_head:
            n_want = want // dims.head_dim
            bad = [i for i in slot.infos if i.shape != (dims.head_dim,)]
            if len(slot.infos) != n_want or bad:
                raise CheckpointError(
                    f"{unit.module_name}.{slot.suffix}: expected {n_want} per-head tensors of shape "
                    f"[{dims.head_dim}], found {len(slot.infos)}"
                    + (f" ({bad[0].name} has shape {list(bad[0].shape)})" if bad else "")
                    + "; the config does not match the weights"
                )
            continue
        (info,) = slot.infos
        if len(info.shape) <= p.axis or info.shape[p.axis] != want:
            raise CheckpointError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json ({dims.num_heads} heads, "
                f"{dims.num_kv_heads} K/V heads, head_dim {dims.head_dim}) implies {want} along dim {p.axis}; "
                "the config does not match the weights"
            )
    if unit.module.convert and not any(
        r in ("k", "v") for s in unit.slots for r in unit.module.tensors[s.suffix].roles()
    ):
        raise CheckpointError(
            f"attention module {unit.module_name} has no K/V projection tensors; the checkpoint is incomplete"
        )


def _out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if (target is not None and dtype.is_floating_point) else dtype


def _plan_unit(
    unit: _Unit, config: dict[str, Any], g: int, target: torch.dtype | None
) -> list[PlannedTensor]:
    """The output tensors of one unit, in the order they will be written."""
    if unit.module is None:
        return [PlannedTensor(i.name, i.shape, _out_dtype(i.dtype, target)) for i in unit.infos]
    dims = unit.module.dims(config)
    n_kv = g if unit.module.convert else dims.num_kv_heads
    plan = []
    for slot in unit.slots:
        p = unit.module.tensors[slot.suffix]
        dtype = _out_dtype(slot.infos[0].dtype, target)
        if slot.per_head:
            n = p.axis_size(dims, n_kv) // dims.head_dim
            plan += [
                PlannedTensor(f"{unit.module_name}.{slot.suffix.format(i=j)}", (dims.head_dim,), dtype)
                for j in range(n)
            ]
        else:
            (info,) = slot.infos
            shape = list(info.shape)
            shape[p.axis] = p.axis_size(dims, n_kv)
            plan.append(PlannedTensor(info.name, tuple(shape), dtype))
    return plan


def _dtype_name(config: dict[str, Any], infos: list[TensorInfo]) -> str:
    name = config.get("dtype") or config.get("torch_dtype")
    if name:
        return str(name)
    floats = [i.dtype for i in infos if i.dtype.is_floating_point]
    return str(floats[0]).removeprefix("torch.") if floats else "float32"


def plan_conversion(
    source: str | os.PathLike,
    num_kv_heads: int,
    *,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    revision: str | None = None,
    token: str | bool | None = None,
    gguf_file: str | None = None,
    allow_pickle: bool = False,
    calibration_tokens: int | None = None,
    calibration_seq_len: int = 512,
    refine_steps: int = 0,
    device: str | None = None,
    max_device_memory: str | int | None = None,
    time_steps: bool = True,
) -> ConversionPlan:
    """Plan the conversion :func:`convert` would run, from the tensor headers only.

    Reads the config and the safetensors headers (no tensor data), checks them exactly as
    :func:`convert` does, and returns every output tensor's name, shape and dtype, the output
    files and their sizes, and the KV-cache saving. With ``output`` it also runs the checks made
    before anything is written (an existing output without ``overwrite``, the free disk space), so
    a plan that comes back means the conversion would start. Writes nothing. A Hub ``source`` with
    safetensors weights is planned from its ``config.json`` and the headers of its weights files,
    read with HTTP range requests (:mod:`gqa_uptrain.io.hub_headers`): no weights are downloaded.
    Other Hub sources (GGUF, pickles) are downloaded first, as for :func:`convert`.

    With ``calibration_tokens`` the plan also estimates the calibrated path
    (:attr:`ConversionPlan.calibrated`): its peak host and device memory from the shapes, and its time
    from a few refinement steps of one synthetic layer at the real width, timed on ``device``
    (seconds; ``time_steps=False`` skips the timing and the time estimate).

    Args are as for :func:`convert`; ``refine_steps`` is the refinement budget per module (0: the
    closed-form fit only).

    Raises:
        GQAError: anything :func:`convert` would refuse before writing.
    """
    _target_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if output is not None:
        check_output_dir(output, overwrite)
    src = None
    if gguf_file is None and is_hub_id(source):  # headers by HTTP range requests, not the weights
        from ..io.hub_headers import open_hub_headers

        src = open_hub_headers(str(source), revision=revision, token=token)
    if src is None:  # local, or a Hub repo without safetensors (GGUF, pickles): downloaded
        src = open_source(
            source, revision=revision, token=token, gguf_file=gguf_file, allow_pickle=allow_pickle
        )
    try:
        planned, _, _ = _plan(src, num_kv_heads, _source_dtype(src, dtype), shard_bytes)
        if calibration_tokens is not None:
            from .budget import plan_calibrated

            planned.calibrated = plan_calibrated(
                src.config,
                src.reader.infos(),
                planned,
                tokens=calibration_tokens,
                seq_len=calibration_seq_len,
                refine_steps=refine_steps,
                device=device,
                max_device_memory=max_device_memory,
                time_steps=time_steps,
            )
    finally:
        src.close()
    if output is not None:
        _check_output_room(output, planned, clean=False)
    return planned


def _source_dtype(src: Source, dtype: str | None) -> str | None:
    """``dtype``, or the source's own default when none is asked for (a GGUF is read dequantized to
    float32; a quantized one is written in bfloat16, see ``gguf_source.NATURAL_DTYPES``)."""
    default = src.extra.get("default_dtype")
    if dtype is None and default:
        logger.info(
            "writing %s weights (the source is a %s GGUF); --dtype float32 keeps full float32",
            default,
            src.extra.get("gguf_weight_type", "quantized"),
        )
        return str(default)
    return dtype


def _target_dtype(dtype: str | None) -> torch.dtype | None:
    """The dtype ``--dtype`` casts floating tensors to (None: keep), refusing unknown names."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _plan(
    src: Source, num_kv_heads: int, dtype: str | None, shard_bytes: int
) -> tuple[ConversionPlan, Architecture, list[_Unit]]:
    """Check ``src`` against its config and plan every output tensor and file (headers only)."""
    target_dtype = _target_dtype(dtype)
    config = src.config
    arch = get_architecture(config)
    dims = arch.check_config(config)
    dims.check_target(num_kv_heads)
    infos = src.reader.infos()
    units = _group_units(arch, infos)
    modules = [u for u in units if u.module is not None]
    for u in modules:
        _check_shapes(u, config)
    n_converted = len({u.module_name for u in modules if u.module.convert})  # type: ignore[union-attr]
    if n_converted == 0:
        raise CheckpointError(
            f"no attention tensors of the {arch.name} layout found in {src.name}; "
            "the weights do not match config.json's model_type"
        )
    tensors = [t for u in units for t in _plan_unit(u, config, num_kv_heads, target_dtype)]
    dtype_name = dtype or _dtype_name(config, infos)
    itemsize = dtype_itemsize(DTYPES.get(dtype_name, torch.float32))
    planned = ConversionPlan(
        source=src.name,
        architecture=arch.name,
        model_type=str(config.get("model_type")),
        num_heads=dims.num_heads,
        num_kv_heads_before=dims.num_kv_heads,
        num_kv_heads_after=num_kv_heads,
        head_dim=dims.head_dim,
        converted_modules=n_converted,
        params_before=sum(i.nbytes // dtype_itemsize(i.dtype) for i in infos),
        params_after=sum(p.nbytes // dtype_itemsize(p.dtype) for p in tensors),
        kv_bytes_per_token_before=arch.kv_cache_bytes_per_token(config, None, itemsize),
        kv_bytes_per_token_after=arch.kv_cache_bytes_per_token(config, num_kv_heads, itemsize),
        dtype=dtype_name,
        input_bytes=sum(i.nbytes for i in infos),
        tensors=tensors,
        shards=planned_files(tensors, shard_bytes),
        support_bytes=_support_bytes(src, arch),
        needs_trust_remote_code=not arch.native,
    )
    return planned, arch, units


def _support_bytes(src: Source, arch: Architecture) -> int:
    """Disk room for the files written besides the weights (see :func:`_write_support_files`)."""
    n = _SMALL_FILES_MARGIN
    remote = src.extra.get("remote_file_bytes")
    if remote is not None:  # planned from the Hub's headers: the repo's listing gives the sizes
        n += sum(remote.values())
    elif src.gguf_file is not None:
        n += _GGUF_TOKENIZER_MARGIN
    else:
        n += sum(p.stat().st_size for p in (src.folder / f for f in TOKENIZER_FILES) if p.is_file())
    if arch.remote_code is not None:
        n += sum(Path(p).stat().st_size for p in arch.remote_code.files())
    return n


def _check_output_room(output: str | os.PathLike, planned: ConversionPlan, clean: bool = True) -> None:
    """Remove stale temporary outputs (their space counts), then refuse a disk without room.

    With ``clean=False`` (a dry run, which writes nothing) they are reported and counted as free.
    """
    stale = clean_stale_siblings(output, remove=clean)
    reclaimable = 0 if clean else sum(tree_bytes(p) for p in stale)
    check_free_space(output, planned.output_bytes, "the converted checkpoint", reclaimable=reclaimable)
