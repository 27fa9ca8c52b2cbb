"""Stream a planned conversion: copy pass-through tensors byte for byte, read each attention module's
tensors, merge their K/V heads with the method, write the planned shards; then the support files.

Memory stays bounded by one attention module's tensors (the next one is merged in a worker thread
while the current one is copied).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture
from ..architectures.base import AttentionDims
from ..io.checkpoint import (
    TOKENIZER_FILES,
    Source,
    TensorInfo,
)
from ..io.portability import make_folder_portable
from ..io.writer import PlannedTensor, ShardedWriter
from ..merging.methods import MergeContext, MergeMethod
from .plan import _out_dtype, _plan_unit, _Unit

logger = logging.getLogger(__name__)


@dataclass
class WeightRange:
    """The largest |w| among the matrices the merge rewrote (attention projections), in the source
    and in the output: a merge that folds maps into weights can push them out of the range bf16 and
    8-bit formats keep well (the model card reports both)."""

    source: float = 0.0
    output: float = 0.0

    def update(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        """Take in one module's tensors before and after merging (matrices only: norms and biases
        are not where the fold puts its scale)."""
        self.source = max(self.source, _peak(before.values()))
        self.output = max(self.output, _peak(after.values()))


def _peak(tensors: Iterable[torch.Tensor]) -> float:
    """The largest |w| over the matrices among ``tensors`` (0 when there are none)."""
    return max((float(t.abs().max()) for t in tensors if t.dim() >= 2 and t.numel()), default=0.0)


def _merge_unit(
    unit: _Unit,
    read: Callable[[TensorInfo], torch.Tensor],
    config: dict[str, Any],
    method: MergeMethod,
    g: int,
    seed: int,
    skip: frozenset[str] = frozenset(),
    weight_range: WeightRange | None = None,
) -> list[torch.Tensor]:
    """Merge one module's K/V heads: unpack each tensor, merge the blocks, pack back.

    Returns the output tensors in the order of :func:`_plan_unit`, leaving out the slots named in
    ``skip`` (copied unchanged by the caller; only for methods that touch nothing but K/V), and
    takes the merged tensors' ranges into ``weight_range``.
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
        packed = {s: module.tensors[s].pack(merged[s], dims) for s in tensors}
        if weight_range is not None:
            weight_range.update(tensors, packed)
        tensors = packed
    out = []
    for slot in slots:
        t = tensors[slot.suffix]
        out += list(t.view(-1, dims.head_dim).unbind(0)) if slot.per_head else [t]
    return out


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
) -> WeightRange:
    """Write the output's shards: copied tensors as they are, attention modules merged (one ahead
    in a worker thread for safetensors sources). Returns the merged matrices' weight range."""
    reader = src.reader
    weight_range = WeightRange()
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
                futures[i] = pool.submit(
                    _merge_unit, units[i], reader.read, config, merge, g, seed, skips[i], weight_range
                )
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
    return weight_range


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


def _declared(merge: MergeMethod, attr: str, default: Any) -> Any:
    """What ``merge`` declares under the :class:`MergeMethod` protocol, or ``default``: a method
    object written before the protocol grew (one with only ``merge``) still converts."""
    return getattr(merge, attr, default)
