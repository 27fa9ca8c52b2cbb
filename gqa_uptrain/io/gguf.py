"""GGUF checkpoints (llama.cpp's single-file format) as a tensor-by-tensor source.

The GGUF file is memory-mapped by ``gguf.GGUFReader`` and each tensor is dequantized to float32
only when the converter asks for it. Tensor names and llama.cpp's row permutation of Q and K are
undone with transformers' own GGUF tables (``transformers.modeling_gguf_pytorch_utils``), the
same code ``from_pretrained(..., gguf_file=...)`` uses, so both routes give the same weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .tensors import Source, TensorInfo

logger = logging.getLogger(__name__)

# The dtype a conversion writes by default for a GGUF whose weights are of this type; any quantized
# type (Q4_1, Q8_0, K-quants, ...) gets bfloat16.
NATURAL_DTYPES = {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}
_NAME_MAP_LOCK = threading.Lock()


class GGUFReader:
    """Reads and dequantizes GGUF tensors one at a time, under their Hugging Face names."""

    def __init__(self, path: Path, config, parsed_config: dict[str, Any]):
        """``config``: the model's config; ``parsed_config``: the ``config`` part of what
        ``load_gguf_checkpoint`` parsed from the file (its tensor processors take that form)."""
        import gguf
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self._dequantize = gguf.dequantize
        self._reader = gguf.GGUFReader(path)
        arch = parsed_config.get("model_type")
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed_config)
        # The name map is computed from a weightless model skeleton on the meta device.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        with _cached_tensor_name_maps():
            self._names = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {}
        self._infos = []
        for t in self._reader.tensors:
            hf = self._names.get(t.name)
            if hf is None:
                logger.debug("GGUF tensor %s has no Hugging Face counterpart; skipped", t.name)
                continue
            shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
            self._tensors[hf] = t
            self._infos.append(TensorInfo(hf, shape, torch.float32))

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def weight_type(self) -> str:
        """The GGUF type of most weight matrices (``Q4_1``, ``F16``, ...); norms and biases do not count."""
        from collections import Counter

        types = Counter(t.tensor_type.name for t in self._tensors.values() if len(t.shape) >= 2)
        return types.most_common(1)[0][0] if types else "F32"

    def metadata(self) -> dict[str, Any]:
        """The file's ``general.*`` metadata (name, license, base models, source URLs) as plain values."""
        out: dict[str, Any] = {}
        for key, f in self._reader.fields.items():
            if key.startswith("general."):
                try:
                    out[key] = f.contents()
                except Exception:  # an odd field type must not stop a conversion for a card detail
                    logger.debug("GGUF field %s could not be read", key)
        return out

    def read(self, info: TensorInfo) -> torch.Tensor:
        t = self._tensors[info.name]
        w = self._dequantize(t.data, t.tensor_type)
        w = self._processor.process(
            weights=w, name=t.name, tensor_key_mapping=self._names, parsed_parameters={}
        ).weights
        # Unquantized GGUF tensors come back as read-only views of the mmap: copy those.
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:
            w = w.copy()
        return torch.from_numpy(w).reshape(info.shape)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _cached_tensor_name_maps() -> Iterator[None]:
    """Within the block, ``gguf.get_tensor_name_map`` returns one table per (architecture, layers).

    transformers' ``get_gguf_hf_weights_map`` walks the model module by module and builds llama.cpp's
    whole name table afresh for each (about 400 builds for SmolLM2: 5.5 of a conversion's seconds).
    The table is only read, so one per arguments gives the same map. Should transformers stop
    looking the function up in ``gguf`` at call time, this only stops saving the time."""
    import gguf

    with _NAME_MAP_LOCK:  # two conversions in threads must not restore each other's patch
        original = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
        try:
            yield
        finally:
            gguf.get_tensor_name_map = original


def open_gguf(path: Path, name: str) -> Source:
    """Open a GGUF file as a :class:`~gqa_uptrain.io.tensors.Source` (config from its metadata)."""
    try:
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # Parsed once, here: the metadata of a 49k-token vocabulary takes seconds to parse, and
        # ``AutoConfig.from_pretrained(gguf_file=...)`` would parse it again to build the same config.
        parsed = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        config = AutoConfig.for_model(**parsed)
    except Exception as e:  # gguf raises plain ValueError/struct errors on corrupt or truncated files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} could not be read as GGUF ({reason}); it may be truncated or corrupt: re-download it"
        ) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Only what differs from the family's defaults, as save_pretrained writes it.
    config_dict = config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config_dict.get("model_type", ""))
    if arch and not config_dict.get("architectures"):
        config_dict["architectures"] = [arch]
    reader = GGUFReader(path, config, parsed)
    weight_type = reader.weight_type()
    # Tensors are dequantized to float32 when read; what is written by default is the narrowest
    # float that holds the file's weights: a quantized GGUF in bfloat16 (its blocks carry far less
    # than bf16's precision, and float32 would double the size for nothing), F16/BF16 as they are.
    natural = NATURAL_DTYPES.get(weight_type, "bfloat16")
    config_dict["dtype"] = natural
    return Source(
        folder=path.parent,
        config=config_dict,
        reader=reader,
        name=name,
        gguf_file=path,
        extra={"default_dtype": natural, "gguf_weight_type": weight_type, "gguf_metadata": reader.metadata()},
    )


def gguf_tokenizer(src: Source) -> Any:
    """The tokenizer rebuilt from ``src``'s GGUF metadata, built once per source: each build parses
    the whole file's metadata again (seconds for a 49k-token vocabulary), and a conversion needs it
    twice (calibration text, and the output's tokenizer files). Raises what transformers raises."""
    from transformers import AutoTokenizer

    assert src.gguf_file is not None
    if "tokenizer" not in src.extra:
        src.extra["tokenizer"] = AutoTokenizer.from_pretrained(
            src.gguf_file.parent, gguf_file=src.gguf_file.name
        )
    return src.extra["tokenizer"]


def write_gguf_support_files(src: Source, folder: Path) -> None:
    """Tokenizer and generation config rebuilt from the GGUF metadata, as transformers reads them."""
    from transformers import GenerationConfig, PretrainedConfig

    assert src.gguf_file is not None
    try:
        gguf_tokenizer(src).save_pretrained(folder)
    except Exception as e:  # a model without a usable tokenizer is still a model
        logger.warning("could not rebuild the tokenizer from %s: %s", src.gguf_file.name, e)
    cfg = PretrainedConfig.from_dict({k: v for k, v in src.config.items() if k.endswith("token_id")})
    GenerationConfig.from_model_config(cfg).save_pretrained(folder)
