"""MHA → GQA conversion: stream a checkpoint's tensors, merge K/V heads, write a new checkpoint.

The flow (every step bounded by one attention module's tensors in memory):

1. resolve the source and read its config; find the family adapter (``architectures``);
2. list tensors from the file headers and group each attention module's head-carrying tensors;
3. check every such tensor's shape against the config, plan every output tensor's shape (the
   whole plan, output size included, is known before any tensor data is read:
   :func:`plan_conversion`, ``gqa-convert --dry-run``), and check the output's disk has room;
4. stream: pass-through tensors are copied byte for byte, attention modules are read, unpacked
   into head blocks, merged by the method, packed and written, into a temporary folder;
5. write config, tokenizer, generation config, model card (and modelling code for families
   without native GQA), then rename the folder into place.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture, AttentionModule, get_architecture
from ..architectures.base import AttentionDims
from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import (
    TOKENIZER_FILES,
    Source,
    TensorInfo,
    dtype_itemsize,
    iter_tensor_groups,
    open_source,
)
from ..io.outputs import (
    atomic_output_dir,
    check_free_space,
    check_output_dir,
    clean_stale_siblings,
    tree_bytes,
)
from ..io.portability import make_folder_portable
from ..io.writer import PlannedTensor, ShardedWriter, parse_size, planned_files
from ..merging.methods import MergeContext, MergeMethod, build_method

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Room for what is written besides the shards and is not known exactly in advance: config.json,
# generation_config.json and the model card (kilobytes).
_SMALL_FILES_MARGIN = 1 << 20
# A GGUF source's tokenizer is rebuilt from its metadata, so its size is unknown up front;
# Llama-3's tokenizer.json (128k tokens) is 9 MB.
_GGUF_TOKENIZER_MARGIN = 32 << 20


@dataclass
class ConversionResult:
    """What a conversion did, for the summary, the model card and callers."""

    output: str
    source: str
    architecture: str
    model_type: str
    method: str
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
    seconds: float
    needs_trust_remote_code: bool
    command: str | None = None
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_reduction(self) -> float:
        """Fraction of the KV cache saved, 0..1."""
        b = self.kv_bytes_per_token_before
        return 0.0 if not b else 1 - self.kv_bytes_per_token_after / b

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_reduction"] = self.kv_reduction
        return d


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


def _merge_unit(
    unit: _Unit,
    read: Callable[[TensorInfo], torch.Tensor],
    config: dict[str, Any],
    method: MergeMethod,
    g: int,
    seed: int,
    skip: frozenset[str] = frozenset(),
) -> list[torch.Tensor]:
    """Merge one module's K/V heads: unpack each tensor, merge the blocks, pack back.

    Returns the output tensors in the order of :func:`_plan_unit`, leaving out the slots named in
    ``skip`` (copied unchanged by the caller; only for methods that touch nothing but K/V).
    """
    module = unit.module
    assert module is not None
    dims: AttentionDims = module.dims(config)
    slots = [s for s in unit.slots if s.suffix not in skip]
    # Per-head lists are stacked into one [n * d] tensor so every slot is a plain packed tensor.
    tensors = {
        s.suffix: torch.cat([read(i) for i in s.infos]) if s.per_head else read(s.infos[0]) for s in slots
    }
    if module.convert:
        blocks = {s: module.tensors[s].unpack(t, dims) for s, t in tensors.items()}
        merged = method.merge(blocks, MergeContext(unit.module_name, g, seed))
        tensors = {s: module.tensors[s].pack(merged[s], dims) for s in tensors}
    out = []
    for slot in slots:
        t = tensors[slot.suffix]
        out += list(t.view(-1, dims.head_dim).unbind(0)) if slot.per_head else [t]
    return out


def _dtype_name(config: dict[str, Any], infos: list[TensorInfo]) -> str:
    name = config.get("dtype") or config.get("torch_dtype")
    if name:
        return str(name)
    floats = [i.dtype for i in infos if i.dtype.is_floating_point]
    return str(floats[0]).removeprefix("torch.") if floats else "float32"


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    num_kv_heads: int,
    method: str | MergeMethod = "mean",
    *,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int | None = None,
    calibration_seq_len: int | None = None,
    grouping: str = "contiguous",
    revision: str | None = None,
    token: str | bool | None = None,
    gguf_file: str | None = None,
    allow_pickle: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    seed: int = 0,
    command: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert the checkpoint at ``source`` to ``num_kv_heads`` K/V heads and write it to ``output``.

    Args:
        source: a local checkpoint folder, a ``.gguf`` file, or a Hub repo id.
        output: the folder to create (written to a temporary sibling, renamed when complete).
        num_kv_heads: G, the K/V heads wanted; must divide the source's K/V heads.
        method: ``mean`` (the paper), ``first`` or ``random`` (its ablations), ``aligned``
            (function-aware, needs ``calibration``), or a :class:`~gqa_uptrain.merging.methods.MergeMethod`.
        calibration: text the calibrated methods fit on: a local text file or folder, or a
            dataset spec as in uptraining. Needed by ``aligned`` and ``grouping="similarity"``.
        calibration_tokens: tokens of ``calibration`` to use [default: 65536].
        calibration_seq_len: length of the calibration blocks [default: 512, capped by the model].
        grouping: ``contiguous`` (heads ``i*H/G .. (i+1)*H/G - 1`` share a K/V head, the paper's
            rule) or ``similarity`` (equal-size groups of heads that merge best on ``calibration``).
        revision, token: Hub revision and token (None: ``HF_TOKEN`` or the login cache).
        gguf_file: which GGUF file in the source folder, when it holds several.
        allow_pickle: accept ``pytorch_model*.bin`` weights (loaded with ``weights_only=True``).
        dtype: ``float32``/``float16``/``bfloat16`` to cast floating tensors; None keeps them.
        max_shard_size: largest shard, e.g. ``"5GB"``.
        overwrite: replace a non-empty ``output``.
        seed: seed for ``random``.
        command: the command line, recorded in the model card.
        progress: show a progress bar.

    Returns:
        A :class:`ConversionResult` with head counts, parameter counts and KV-cache sizes.

    Raises:
        GQAError: bad input, an existing ``output`` without ``overwrite``, or
            :class:`~gqa_uptrain.errors.DiskFullError` when ``output``'s disk has less room than
            the planned output (checked before writing) or fills up while writing (the partial
            output is removed). Nothing at ``output`` changes unless the conversion completes.
    """
    t0 = time.perf_counter()
    merge = _merge_method(method, calibration, calibration_tokens, calibration_seq_len, grouping, progress)
    target_dtype = _target_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    check_output_dir(output, overwrite)

    src = open_source(source, revision=revision, token=token, gguf_file=gguf_file, allow_pickle=allow_pickle)
    try:
        config = src.config
        dtype = _source_dtype(src, dtype)
        target_dtype = _target_dtype(dtype)
        planned, arch, units = _plan(src, num_kv_heads, dtype, shard_bytes)
        plan = planned.tensors
        # Before the calibration (minutes) and before a byte is written: a disk too small to hold
        # the output is refused now, with the numbers, not with ENOSPC after gigabytes.
        _check_output_room(output, planned)
        _declared(merge, "prepare", _no_prepare)(src, num_kv_heads)  # e.g. calibration, fitting

        out_config = arch.output_config(config, num_kv_heads)
        if dtype:
            out_config["dtype"] = dtype
            if "torch_dtype" in out_config:
                out_config["torch_dtype"] = dtype
        result = ConversionResult(
            output=str(Path(output).absolute()),
            source=planned.source,
            architecture=planned.architecture,
            model_type=planned.model_type,
            method=merge.name,
            num_heads=planned.num_heads,
            num_kv_heads_before=planned.num_kv_heads_before,
            num_kv_heads_after=num_kv_heads,
            head_dim=planned.head_dim,
            converted_modules=planned.converted_modules,
            params_before=planned.params_before,
            params_after=planned.params_after,
            kv_bytes_per_token_before=planned.kv_bytes_per_token_before,
            kv_bytes_per_token_after=planned.kv_bytes_per_token_after,
            dtype=planned.dtype,
            seconds=0.0,
            needs_trust_remote_code=planned.needs_trust_remote_code,
            command=command,
        )
        notes = _declared(merge, "card_notes", None)
        if notes is not None:  # methods may describe themselves in the model card
            result.extra["card_notes"] = list(notes())
        result.extra["grouping"] = _declared(merge, "grouping", grouping)  # the card credits its source

        # The space is checked again here: the calibration may have taken minutes, and other
        # writers may have used the disk meanwhile.
        with atomic_output_dir(output, overwrite, needed_bytes=planned.output_bytes) as tmp:
            _stream(
                src, units, plan, tmp, shard_bytes, config, merge, num_kv_heads, seed, target_dtype, progress
            )
            _write_support_files(src, arch, tmp, out_config)
            result.seconds = time.perf_counter() - t0
            from .card import write_conversion_card

            write_conversion_card(tmp, result, config, source=src)
            result.files = sorted(p.name for p in tmp.iterdir())
    finally:
        src.close()
    result.seconds = time.perf_counter() - t0
    logger.info("converted %s to %d K/V heads in %.1fs: %s", src.name, num_kv_heads, result.seconds, output)
    return result


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
) -> ConversionPlan:
    """Plan the conversion :func:`convert` would run, from the tensor headers only.

    Reads the config and the safetensors headers (no tensor data), checks them exactly as
    :func:`convert` does, and returns every output tensor's name, shape and dtype, the output
    files and their sizes, and the KV-cache saving. With ``output`` it also runs the checks made
    before anything is written (an existing output without ``overwrite``, the free disk space), so
    a plan that comes back means the conversion would start. Writes nothing. A Hub ``source`` is
    downloaded first, as for :func:`convert`.

    Args are as for :func:`convert`.

    Raises:
        GQAError: anything :func:`convert` would refuse before writing.
    """
    _target_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if output is not None:
        check_output_dir(output, overwrite)
    src = open_source(source, revision=revision, token=token, gguf_file=gguf_file, allow_pickle=allow_pickle)
    try:
        planned, _, _ = _plan(src, num_kv_heads, _source_dtype(src, dtype), shard_bytes)
    finally:
        src.close()
    if output is not None:
        _check_output_room(output, planned, clean=False)
    return planned


def _no_prepare(src: Source, num_kv_heads: int) -> None:
    """What a method without a ``prepare`` step does before streaming."""


def _declared(merge: MergeMethod, attr: str, default: Any) -> Any:
    """What ``merge`` declares under the :class:`MergeMethod` protocol, or ``default``: a method
    object written before the protocol grew (one with only ``merge``) still converts."""
    return getattr(merge, attr, default)


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
    if src.gguf_file is not None:
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


def _merge_method(
    method: str | MergeMethod,
    calibration: str | os.PathLike | None,
    tokens: int | None,
    seq_len: int | None,
    grouping: str,
    progress: bool,
) -> MergeMethod:
    """The method object :func:`convert` runs: a name resolved (calibrated when it needs to be)."""
    if not isinstance(method, str):
        if calibration is not None or grouping != "contiguous":
            raise ConfigError(
                "calibration= and grouping= apply to a method given by name; a MergeMethod object "
                "carries its own (see gqa_uptrain.merging.build_method)"
            )
        return method
    if calibration is None and (tokens is not None or seq_len is not None):
        raise ConfigError("calibration_tokens/calibration_seq_len were given without calibration= text")
    from ..merging.calibration import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, CalibrationSpec

    spec = None
    if calibration is not None:
        spec = CalibrationSpec(str(calibration), tokens or DEFAULT_TOKENS, seq_len or DEFAULT_SEQ_LEN)
    return build_method(method, spec, grouping, progress=progress)


def _stream(
    src: Source,
    units: list[_Unit],
    plan: list[PlannedTensor],
    folder: Path,
    shard_bytes: int,
    config: dict[str, Any],
    merge: MergeMethod,
    g: int,
    seed: int,
    target_dtype: torch.dtype | None,
    progress: bool,
) -> None:
    reader = src.reader
    copy_raw = getattr(reader, "copy_raw", None)
    total = sum(i.nbytes for u in units for i in u.infos)

    # Safetensors sources: the next attention module is read and merged in a worker thread while
    # this thread kernel-copies the tensors before it, so merging overlaps the disk instead of
    # adding to it (torch ops and copy_file_range release the GIL). One module ahead at most,
    # so memory stays bounded by two modules' K/V tensors. Other readers run in order.
    ahead = 1 if copy_raw is not None else 0
    modules = [i for i, u in enumerate(units) if u.module is not None]
    rank = {i: r for r, i in enumerate(modules)}
    skips = {
        i: _copyable_slots(units[i], merge, target_dtype) if copy_raw is not None else frozenset()
        for i in modules
    }
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="gqa-merge") as pool,
        ShardedWriter(folder, plan, shard_bytes) as writer,
        tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar,
    ):
        futures: dict[int, Future[list[torch.Tensor]]] = {}
        submitted = 0  # modules[:submitted] have been handed to the worker

        def submit_through(r: int) -> None:
            nonlocal submitted
            while submitted <= min(r, len(modules) - 1):
                i = modules[submitted]
                futures[i] = pool.submit(_merge_unit, units[i], reader.read, config, merge, g, seed, skips[i])
                submitted += 1

        for idx, u in enumerate(units):
            if u.module is None:
                if ahead and not futures:
                    submit_through(submitted)  # the next module merges while this tensor copies
                (info,) = u.infos
                if copy_raw is not None and _out_dtype(info.dtype, target_dtype) == info.dtype:
                    writer.write_with(info.name, lambda f, info=info: copy_raw(info, f))
                else:
                    t = reader.read(info)
                    writer.write(info.name, t.to(_out_dtype(t.dtype, target_dtype)))
            else:
                submit_through(rank[idx] + ahead)
                outputs = iter(futures.pop(idx).result())
                copied = {s.infos[0].name: s.infos[0] for s in u.slots if s.suffix in skips[idx]}
                for p in _plan_unit(u, config, g, target_dtype):  # plan order, copies interleaved
                    if p.name in copied:
                        writer.write_with(p.name, lambda f, info=copied[p.name]: copy_raw(info, f))
                    else:
                        writer.write(p.name, next(outputs).to(p.dtype).contiguous())
            bar.update(sum(i.nbytes for i in u.infos))


def _copyable_slots(unit: _Unit, merge: MergeMethod, target: torch.dtype | None) -> frozenset[str]:
    """Slots of ``unit`` that come out byte-identical: a query or output projection of its own
    (not fused with K/V) under a method that changes only K/V blocks, with the dtype kept."""
    if not _declared(merge, "kv_only", False) or unit.module is None:
        return frozenset()
    return frozenset(
        s.suffix
        for s in unit.slots
        if not s.per_head
        and unit.module.tensors[s.suffix].roles() in (("q",), ("o",))
        and _out_dtype(s.infos[0].dtype, target) == s.infos[0].dtype
    )


def _write_support_files(src: Source, arch: Architecture, folder: Path, out_config: dict[str, Any]) -> None:
    """config.json, tokenizer files, generation config and, where needed, modelling code."""
    (folder / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
    if src.gguf_file is not None:
        from ..io.gguf import write_gguf_support_files

        write_gguf_support_files(src, folder)
    else:
        for name in TOKENIZER_FILES:
            p = src.folder / name
            if p.is_file():
                shutil.copyfile(p, folder / name)
    if not (folder / "generation_config.json").exists():
        # Written by hand, not through transformers.GenerationConfig: importing transformers costs
        # the converter seconds, and this is the whole file save_pretrained writes for these keys.
        gen = {
            k: out_config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if out_config.get(k) is not None
        }
        gen["_from_model_config"] = True
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            gen["transformers_version"] = importlib.metadata.version("transformers")
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if arch.remote_code is not None:
        for path in arch.remote_code.files():
            shutil.copyfile(path, folder / Path(path).name)
    # Loadable by transformers 4.x too (llama.cpp's converter pins it), with no flags of this machine;
    # a tokenizer rebuilt from GGUF metadata gets the model's context length instead of "no limit".
    make_folder_portable(folder, fill_model_max_length=src.gguf_file is not None)
