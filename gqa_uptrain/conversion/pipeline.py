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

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.checkpoint import (
    Source,
    open_source,
)
from ..io.outputs import (
    atomic_output_dir,
    check_output_dir,
)
from ..io.writer import parse_size
from ..merging.methods import MergeMethod, build_method
from ..merging.refine import RefineSpec
from .plan import _check_output_room, _plan, _source_dtype, _target_dtype
from .stream import _declared, _stream, _write_support_files

logger = logging.getLogger(__name__)


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
    refine: bool | int | RefineSpec | None = None,
    device: str | None = None,
    max_device_memory: str | int | None = None,
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
        refine: layer-wise refinement of a calibrated method (each merged attention module
            trained to reproduce the original's output on ``calibration``, see
            :mod:`gqa_uptrain.merging.refine`): None or True for the default budget whenever the
            method is calibrated, False for the closed-form fit only, an int for a budget of that
            many steps per module, or a :class:`~gqa_uptrain.merging.refine.RefineSpec`.
        device: where a calibrated method computes (calibration, the closed-form fits and the
            refinement, one decoder layer at a time): ``auto`` or None (the first CUDA GPU when
            there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. The writer stays on the host.
        max_device_memory: the most the calibrated path may keep on ``device``, e.g. ``"20GB"``
            (None: 90% of a GPU's free memory; no limit on the CPU). Calibration activations that
            do not fit next to the layer at work live in host memory (pinned where CUDA exists).
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
    merge = _merge_method(
        method,
        calibration,
        calibration_tokens,
        calibration_seq_len,
        grouping,
        progress,
        refine,
        device=device,
        max_device_memory=max_device_memory,
    )
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
        reports = _declared(merge, "reports", None)  # layer-wise refinement ran in prepare()
        if reports:
            result.extra["refined_modules"] = sum(1 for rep in reports if rep.kept)

        # The space is checked again here: the calibration may have taken minutes, and other
        # writers may have used the disk meanwhile.
        with atomic_output_dir(output, overwrite, needed_bytes=planned.output_bytes) as tmp:
            weight_range = _stream(
                src, units, plan, tmp, shard_bytes, config, merge, num_kv_heads, seed, target_dtype, progress
            )
            if weight_range.source > 0:
                result.extra["attention_max_abs"] = {
                    "source": weight_range.source,
                    "output": weight_range.output,
                }
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


def refine_spec(refine: bool | int | RefineSpec) -> RefineSpec | None:
    """``refine=`` as :func:`convert` takes it, as a spec: False -> None, True -> the default
    budget, an int -> that many steps per module (0 is the same as False)."""
    if isinstance(refine, RefineSpec):
        return refine
    if isinstance(refine, bool):
        return RefineSpec() if refine else None
    if isinstance(refine, int):
        if refine < 0:
            raise ConfigError(f"--refine-steps must be >= 0, got {refine}")
        return RefineSpec(steps=refine) if refine else None
    raise ConfigError(f"refine= takes a bool, a number of steps or a RefineSpec, not {type(refine).__name__}")


def _no_prepare(src: Source, num_kv_heads: int) -> None:
    """What a method without a ``prepare`` step does before streaming."""


def _merge_method(
    method: str | MergeMethod,
    calibration: str | os.PathLike | None,
    tokens: int | None,
    seq_len: int | None,
    grouping: str,
    progress: bool,
    refine: bool | int | RefineSpec | None = None,
    *,
    device: str | None = None,
    max_device_memory: str | int | None = None,
) -> MergeMethod:
    """The method object :func:`convert` runs: a name resolved (calibrated when it needs to be)."""
    from ..merging.device import parse_memory, resolve_device

    resolve_device(device)  # a GPU that is not there is refused before anything starts
    budget = parse_memory(max_device_memory)
    if not isinstance(method, str):
        if (
            calibration is not None
            or grouping != "contiguous"
            or refine not in (None, False)
            or device is not None
            or budget is not None
        ):
            raise ConfigError(
                "calibration=, grouping=, refine=, device= and max_device_memory= apply to a method given by "
                "name; a MergeMethod object carries its own (see gqa_uptrain.merging.build_method)"
            )
        return method
    if calibration is None and (tokens is not None or seq_len is not None):
        raise ConfigError("calibration_tokens/calibration_seq_len were given without calibration= text")
    from ..merging.calibration import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, CalibrationSpec

    spec = None
    if calibration is not None:
        spec = CalibrationSpec(str(calibration), tokens or DEFAULT_TOKENS, seq_len or DEFAULT_SEQ_LEN)
    calibrated = method == "aligned" or grouping == "similarity"
    if refine is None:  # the default: refine whatever is calibrated
        refine = calibrated and spec is not None
    return build_method(
        method,
        spec,
        grouping,
        progress=progress,
        refine=refine_spec(refine),
        device=device,
        max_device_memory=budget,
    )
