"""llama.cpp's engine as the client: perplexity, prompt and decode speed, and the KV cache of GGUF files.

A converted model is worth converting when a serving engine sees its smaller KV cache. This module
runs GGUF files (from llama.cpp's ``convert_hf_to_gguf.py``) in llama.cpp itself, through the
``llama-cpp-python`` bindings' C API (``scripts/setup.sh`` builds and installs them), so the figures
are the engine's, not transformers':

- **KV cache**: the bytes llama.cpp allocates, read from the log line it writes when it creates a
  context (``llama_kv_cache: size = ... MiB``), next to the bytes computed from the GGUF's layout
  (``2 x layers x K/V heads x head size x cells x 2`` bytes for the default f16 cache);
- **prompt and decode speed** at a context of ``C`` tokens per sequence and ``S`` parallel sequences
  (a context of ``C x S`` cells, ``S`` sequences: what a server with ``S`` slots allocates). Every
  sequence gets a ``C - new_tokens`` token prompt (random ids: speed does not depend on the text),
  processed in chunks of ``n_batch`` (prompt tokens/s), then ``new_tokens`` greedy steps, each one
  batch holding one token of every sequence (decode tokens/s). The prompt is processed once; each
  timed decode repeat first removes the previous repeat's tokens from the cache, so every repeat
  decodes at the same positions. With a baseline, the two models' repeats alternate (side by side:
  load on a shared machine hits both alike) and the medians are reported;
- **perplexity** with the same strided windows as :func:`gqa_uptrain.evaluation.perplexity.perplexity`
  (each window decoded into an empty cache, each token after the first scored exactly once), on token
  ids from llama.cpp's own tokenizer or given by the caller.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, GQAError
from .perplexity import PerplexityResult, _windows

logger = logging.getLogger(__name__)

INSTALL_HINT = "install llama-cpp-python with scripts/setup.sh (it builds llama.cpp once per machine)"

# "llama_kv_cache: size =  180.00 MiB (  8192 cells,  30 layers,  1/1 seqs), K (f16):   90.00 MiB, V (f16):   90.00 MiB"
_KV_LINE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\),"
    r"\s*K \((\w+)\):\s*[\d.]+ MiB,\s*V \((\w+)\):\s*[\d.]+ MiB"
)
_MIB = 1024 * 1024
# llama.cpp's flash-attention setting (llama_flash_attn_type): "auto" lets llama.cpp decide (its own
# default, on for the CPU backend), "on"/"off" force it. It changes how attention reads the KV cache,
# so decode speed (and a GQA model's gain over its MHA original) depends on it: reported with every figure.
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


def _lib() -> Any:
    """The llama_cpp bindings, or a one-line error saying how to get them."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GQAError(f"--engine llama.cpp needs the llama_cpp module ({e}); {INSTALL_HINT}") from None
    return llama_cpp


class _LogCapture:
    """Routes llama.cpp's log to Python logging (debug level) and keeps the lines written while active.

    One callback for the process (llama.cpp has one log sink); a lock makes a capture belong to one
    caller at a time.
    """

    def __init__(self) -> None:
        self.lines: list[str] | None = None
        self.lock = threading.Lock()
        self._callback: Any = None

    def install(self, lib: Any) -> None:
        if self._callback is not None:
            return

        @lib.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", errors="replace")
            if self.lines is not None:
                self.lines.append(line)
            if line.strip():
                logger.debug("llama.cpp: %s", line.rstrip())

        self._callback = callback  # keep a reference: llama.cpp holds only the C pointer
        lib.llama_log_set(callback, ctypes.c_void_p(0))

    def __enter__(self) -> list[str]:
        self.lock.acquire()
        self.lines = []
        return self.lines

    def __exit__(self, *exc: object) -> None:
        self.lines = None
        self.lock.release()


_LOG = _LogCapture()


@dataclass
class EngineLayout:
    """What sizes a GGUF model's KV cache in llama.cpp, read from the loaded model."""

    architecture: str
    description: str  # llama.cpp's one-line description, e.g. "llama ?B F16"
    file_bytes: int
    parameters: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    vocab_size: int
    context_trained: int

    @property
    def attention(self) -> str:
        """MHA, GQA or MQA, from the head counts."""
        if self.num_kv_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    def kv_bytes(self, cells: int, bytes_per_element: int = 2) -> int:
        """Bytes of a cache of ``cells`` tokens (all sequences together) in an f16 (default) cache."""
        per_token = self.num_layers * self.num_kv_heads * (self.head_dim_k + self.head_dim_v)
        return per_token * cells * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {**asdict(self), "attention": self.attention}


@dataclass
class KVAllocation:
    """The cache llama.cpp allocated for one context, from its log line, and the computed figure."""

    cells: int
    sequences: int
    allocated_bytes: int  # llama.cpp's "size = X MiB", to its 0.01 MiB rounding
    computed_bytes: int
    k_type: str
    v_type: str

    @property
    def match(self) -> bool:
        """Allocated and computed agree to the log's rounding (0.01 MiB, twice: K and V)."""
        return abs(self.allocated_bytes - self.computed_bytes) <= 0.02 * _MIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {**asdict(self), "match": self.match}


class EngineModel:
    """A GGUF file loaded into llama.cpp (CPU), with its tokenizer; make contexts with :meth:`context`."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, flash_attn: str = "auto") -> None:
        if flash_attn not in FLASH_ATTN:
            raise ConfigError(f"--flash-attn {flash_attn!r} is not one of {', '.join(FLASH_ATTN)}")
        self.flash_attn = flash_attn
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path} is not a file; --engine llama.cpp takes GGUF files (MODEL.gguf)"
            )
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(
                    f"{self.path} is not a GGUF file; convert the folder with llama.cpp's convert_hf_to_gguf.py first"
                )
        self.lib = _lib()
        _LOG.install(self.lib)
        self.lib.llama_backend_init()
        self.threads = threads or max(1, os.cpu_count() or 1)
        params = self.lib.llama_model_default_params()
        with _LOG as lines:
            self.model = self.lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            tail = "".join(lines).strip().splitlines()[-1:] or ["no log"]
            raise CheckpointError(f"llama.cpp could not load {self.path} ({tail[0]})")
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.layout = self._layout()

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def _layout(self) -> EngineLayout:
        lib, m = self.lib, self.model
        arch = self._meta("general.architecture") or "?"
        heads = lib.llama_model_n_head(m)
        default_dim = lib.llama_model_n_embd(m) // heads
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(m, desc, len(desc))
        return EngineLayout(
            architecture=arch,
            description=desc.value.decode(),
            file_bytes=self.path.stat().st_size,
            parameters=int(lib.llama_model_n_params(m)),
            num_layers=lib.llama_model_n_layer(m),
            num_attention_heads=heads,
            num_kv_heads=lib.llama_model_n_head_kv(m),
            head_dim_k=int(self._meta(f"{arch}.attention.key_length") or default_dim),
            head_dim_v=int(self._meta(f"{arch}.attention.value_length") or default_dim),
            vocab_size=lib.llama_vocab_n_tokens(self.vocab),
            context_trained=lib.llama_model_n_ctx_train(m),
        )

    @property
    def eos(self) -> int:
        """The end-of-sequence token id."""
        return int(self.lib.llama_vocab_eos(self.vocab))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with llama.cpp's tokenizer: no BOS/EOS added, special tokens as text."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.lib.llama_token * cap)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        if n < 0:  # more tokens than bytes cannot happen for BPE, but the API says how many it needs
            cap = -n
            buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        return list(buf[:n])

    def context(self, cells: int, sequences: int = 1, n_batch: int = 512) -> EngineContext:
        """A llama.cpp context of ``cells`` KV cells shared by ``sequences`` sequences (each ``cells //
        sequences`` long), processing at most ``n_batch`` tokens per call."""
        return EngineContext(self, cells, sequences, n_batch)

    def close(self) -> None:
        """Free the model."""
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> EngineModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineContext:
    """One llama.cpp context: its KV cache, a token batch, greedy steps and logits."""

    def __init__(self, model: EngineModel, cells: int, sequences: int, n_batch: int) -> None:
        lib = model.lib
        self.lib, self.model = lib, model
        self.sequences, self.n_batch = sequences, n_batch
        params = lib.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = sequences
        params.n_threads = model.threads
        params.n_threads_batch = model.threads
        params.flash_attn_type = FLASH_ATTN[model.flash_attn]
        params.no_perf = True
        with _LOG as lines:
            self.ctx = lib.llama_init_from_model(model.model, params)
        if not self.ctx:
            tail = "".join(lines).strip().splitlines()[-1:] or ["no log"]
            raise GQAError(f"llama.cpp could not create a context of {cells} cells ({tail[0]})")
        self.kv = self._allocation("".join(lines), cells, sequences)
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(max(n_batch, sequences), 0, 1)
        self.n_vocab = model.layout.vocab_size

    def _allocation(self, log: str, cells: int, sequences: int) -> KVAllocation:
        """Sum every cache line of the log (models with sliding-window layers get two caches)."""
        found = _KV_LINE.findall(log)
        if not found:
            raise GQAError(
                "llama.cpp's log has no 'llama_kv_cache: size = ...' line to read the allocated cache from "
                "(a llama-cpp-python version this toolkit does not know; reinstall it with scripts/setup.sh)"
            )
        lay = self.model.layout
        allocated = computed = total_cells = 0
        for total_mib, n_cells, n_layers, _, n_stream, k_type, _v in found:
            elem = {"f16": 2, "bf16": 2, "f32": 4}.get(k_type, 2)
            # cells per stream x streams (one stream per sequence unless the cache is unified)
            tokens = int(n_cells) * int(n_stream)
            allocated += round(float(total_mib) * _MIB)
            computed += int(n_layers) * lay.num_kv_heads * (lay.head_dim_k + lay.head_dim_v) * tokens * elem
            total_cells = max(total_cells, tokens)
        return KVAllocation(
            cells=total_cells,
            sequences=sequences,
            allocated_bytes=allocated,
            computed_bytes=computed,
            k_type=found[0][5],
            v_type=found[0][6],
        )

    def clear(self) -> None:
        """Empty the KV cache of every sequence."""
        self.lib.llama_memory_clear(self.mem, True)

    def remove(self, seq: int, start: int) -> None:
        """Drop sequence ``seq``'s cached tokens from position ``start`` on."""
        if not self.lib.llama_memory_seq_rm(self.mem, seq, start, -1):
            raise GQAError(f"llama.cpp could not remove positions {start}.. of sequence {seq}")

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], outputs: Sequence[bool]
    ) -> int:
        """One ``llama_decode`` call over the given tokens; returns how many rows of logits it produced."""
        b = self.batch
        n = len(tokens)
        if n > max(self.n_batch, self.sequences):
            raise ValueError(f"{n} tokens exceed the batch of {self.n_batch}")
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seqs[i]
            b.logits[i] = bool(outputs[i])
        b.n_tokens = n
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise GQAError(
                f"llama_decode failed with code {rc} (the KV cache is full or the batch is invalid)"
            )
        return sum(bool(o) for o in outputs)

    def logits(self, rows: int) -> np.ndarray:
        """The last decode's output logits, ``[rows, vocab]`` float32 (a view into llama.cpp's buffer)."""
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """Put each sequence's prompt in the cache (sequence ``s`` gets ``prompts[s]``, chunks of
        ``n_batch``); returns each sequence's greedy next token."""
        firsts = []
        for s, prompt in enumerate(prompts):
            for start in range(0, len(prompt), self.n_batch):
                chunk = prompt[start : start + self.n_batch]
                last = start + len(chunk) == len(prompt)
                outs = [False] * len(chunk)
                outs[-1] = last
                self.decode(chunk, range(start, start + len(chunk)), [s] * len(chunk), outs)
            firsts.append(int(np.argmax(self.logits(1)[0])))
        return firsts

    def step(self, tokens: Sequence[int], position: int) -> list[int]:
        """One greedy decode step: token ``tokens[s]`` at ``position`` of every sequence ``s``."""
        n = len(tokens)
        self.decode(tokens, [position] * n, range(n), [True] * n)
        return [int(i) for i in np.argmax(self.logits(n), axis=1)]

    def close(self) -> None:
        """Free the batch and the context."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> EngineContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def engine_generate(model: EngineModel, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy generation of ``new_tokens`` tokens after ``prompt`` in llama.cpp (one sequence)."""
    with model.context(len(prompt) + new_tokens, 1) as ctx:
        out = ctx.prefill([list(prompt)])
        while len(out) < new_tokens:
            out.append(ctx.step([out[-1]], len(prompt) + len(out) - 1)[0])
    return out


def engine_perplexity(
    model: EngineModel, ids: Sequence[int], max_length: int, stride: int | None = None, progress: bool = True
) -> PerplexityResult:
    """Perplexity of ``ids`` in llama.cpp with the windows of :func:`~gqa_uptrain.evaluation.perplexity.perplexity`.

    Each window is decoded into an empty cache; position ``t`` predicts token ``t + 1``, and only the
    tokens the previous window did not score are scored (log-softmax in float64).
    """
    from tqdm.auto import tqdm

    stride = stride or max(1, max_length // 2)
    if not 1 <= stride < max_length:
        raise ConfigError(f"--stride must be between 1 and --max-length - 1 ({max_length - 1}), got {stride}")
    ids = [int(i) for i in ids]
    wins = _windows(len(ids), max_length, stride)
    nll_sum, scored = 0.0, 0
    with model.context(max_length, 1, n_batch=max_length) as ctx:
        for begin, end, trg in tqdm(wins, desc="perplexity (llama.cpp)", disable=not progress, leave=False):
            window = ids[begin:end]
            n = len(window)
            first = max(0, n - trg - 1)  # positions first .. n-2 predict the scored tokens
            outs = [first <= t <= n - 2 for t in range(n)]
            ctx.clear()
            rows = ctx.decode(window, range(n), [0] * n, outs)
            logits = ctx.logits(rows).astype(np.float64)  # (rows, V)
            top = logits.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            targets = np.asarray(window[first + 1 : n])
            nll_sum += float((lse - logits[np.arange(rows), targets]).sum())
            scored += rows
    mean = nll_sum / scored
    logger.info("llama.cpp perplexity %.3f over %d tokens (%d windows)", math.exp(mean), scored, len(wins))
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll_per_token=mean,
        tokens_scored=scored,
        max_length=max_length,
        stride=stride,
        windows=len(wins),
    )


@dataclass
class EngineSpeed:
    """Prompt and decode speed in llama.cpp at one (context per sequence, parallel sequences)."""

    context: int
    sequences: int
    prompt_tokens: int  # per sequence
    new_tokens: int
    repeats: int
    threads: int
    prompt_tokens_per_s: float
    decode_tokens_per_s: float  # all sequences together: sequences x new_tokens / median decode time
    decode_runs_tokens_per_s: list[float]
    kv: KVAllocation

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        d = asdict(self)
        d["kv"] = self.kv.to_dict()
        return d


class _SpeedRun:
    """One model's context at one setting: the prompt is processed on creation, decode repeats on call."""

    def __init__(self, model: EngineModel, context: int, sequences: int, new_tokens: int, seed: int) -> None:
        self.context, self.sequences, self.new_tokens = context, sequences, new_tokens
        self.prompt_len = context - new_tokens
        rng = np.random.default_rng(seed)
        prompts = [
            rng.integers(0, model.layout.vocab_size, self.prompt_len).tolist() for _ in range(sequences)
        ]
        self.ctx = model.context(context * sequences, sequences)
        start = time.perf_counter()
        self.firsts = self.ctx.prefill(prompts)
        self.prompt_s = time.perf_counter() - start
        self.decode_s: list[float] = []

    def decode_once(self) -> float:
        """``new_tokens`` greedy steps of every sequence after the prompt; returns the seconds taken."""
        for s in range(self.sequences):
            self.ctx.remove(s, self.prompt_len)
        tokens = list(self.firsts)
        start = time.perf_counter()
        for i in range(self.new_tokens):
            tokens = self.ctx.step(tokens, self.prompt_len + i)
        return time.perf_counter() - start


def engine_speed(
    models: Sequence[EngineModel],
    context: int,
    sequences: int = 1,
    new_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> list[EngineSpeed]:
    """Prompt and decode tokens/s of each model at ``context`` tokens per sequence, ``sequences`` at once.

    The models' decode repeats alternate (model, baseline, model, ...) so both see the same load.
    """
    if context <= new_tokens:
        raise ConfigError(f"--context {context} must be larger than --new-tokens {new_tokens}")
    runs = []
    try:
        for m in models:
            logger.info("%s: prompt of %d x %d tokens", m.path.name, sequences, context - new_tokens)
            runs.append(_SpeedRun(m, context, sequences, new_tokens, seed))
        for _ in range(warmup):
            for r in runs:
                r.decode_once()
        for _ in range(repeats):
            for r in runs:
                r.decode_s.append(r.decode_once())
        out = []
        for m, r in zip(models, runs, strict=True):
            per_run = [sequences * new_tokens / t for t in r.decode_s]
            out.append(
                EngineSpeed(
                    context=context,
                    sequences=sequences,
                    prompt_tokens=r.prompt_len,
                    new_tokens=new_tokens,
                    repeats=repeats,
                    threads=m.threads,
                    prompt_tokens_per_s=sequences * r.prompt_len / r.prompt_s,
                    decode_tokens_per_s=sequences * new_tokens / statistics.median(r.decode_s),
                    decode_runs_tokens_per_s=per_run,
                    kv=r.ctx.kv,
                )
            )
            logger.info(
                "%s: context %d x %d sequences: prompt %.1f tokens/s, decode %.1f tokens/s, KV %.2f MiB",
                m.path.name,
                context,
                sequences,
                out[-1].prompt_tokens_per_s,
                out[-1].decode_tokens_per_s,
                r.ctx.kv.allocated_bytes / _MIB,
            )
        return out
    finally:
        for r in runs:
            r.ctx.close()


@dataclass
class EngineModelEval:
    """All llama.cpp measurements of one GGUF file."""

    name: str
    role: str  # "model" or "baseline"
    layout: EngineLayout
    perplexity: PerplexityResult | None = None
    speed: list[EngineSpeed] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "name": self.name,
            "role": self.role,
            "engine": "llama.cpp",
            "layout": self.layout.to_dict(),
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "speed": [s.to_dict() for s in self.speed],
        }


@dataclass
class EngineReport:
    """The result of :func:`evaluate_engine`: the model first, then its baseline when one was given."""

    models: list[EngineModelEval]
    data: dict[str, Any] | None
    options: dict[str, Any]

    @property
    def model(self) -> EngineModelEval:
        """The evaluated model."""
        return self.models[0]

    @property
    def baseline(self) -> EngineModelEval | None:
        """The baseline, if one was measured."""
        return self.models[1] if len(self.models) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view, with model/baseline ratios."""
        d: dict[str, Any] = {
            "engine": "llama.cpp",
            "models": [m.to_dict() for m in self.models],
            "data": self.data,
            "options": self.options,
        }
        base = self.baseline
        if base is not None:
            m = self.model
            d["relative"] = {
                "perplexity": m.perplexity.perplexity / base.perplexity.perplexity
                if m.perplexity and base.perplexity
                else None,
                "speed": [
                    {
                        "context": a.context,
                        "sequences": a.sequences,
                        "decode_tokens_per_s": a.decode_tokens_per_s / b.decode_tokens_per_s,
                        "prompt_tokens_per_s": a.prompt_tokens_per_s / b.prompt_tokens_per_s,
                        "kv_bytes": a.kv.allocated_bytes / b.kv.allocated_bytes,
                    }
                    for a, b in zip(m.speed, base.speed, strict=True)
                ],
            }
        return d


def tokenize_for_engine(
    model: EngineModel, texts: Any, max_tokens: int | None, add_eos: bool = True
) -> list[int]:
    """Documents -> one token stream with llama.cpp's tokenizer, EOS after each (as uptraining does)."""
    ids: list[int] = []
    for text in texts:
        if isinstance(text, str) and text.strip():
            ids.extend(model.tokenize(text))
            if add_eos:
                ids.append(model.eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise GQAError("the evaluation text is empty (fewer than 2 tokens); point --data at files with text")
    return ids


def evaluate_engine(
    model: str | os.PathLike,
    *,
    baseline: str | os.PathLike | None = None,
    texts: Any = None,
    contexts: Sequence[int] = (512,),
    sequences: Sequence[int] = (1,),
    new_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = None,
    flash_attn: str = "auto",
    max_length: int = 512,
    stride: int | None = None,
    max_eval_tokens: int | None = None,
    skip_speed: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> EngineReport:
    """Measure GGUF ``model`` (and ``baseline``) in llama.cpp: perplexity on ``texts`` (documents; None
    skips it), and prompt/decode speed with the KV cache allocated at each (context, sequences)."""
    if not contexts or any(c < 2 for c in contexts) or not sequences or any(s < 1 for s in sequences):
        raise ConfigError("--context and --batch-size need positive integers")
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("--new-tokens and --repeats must be at least 1, --warmup at least 0")
    paths = [p for p in (model, baseline) if p is not None]
    loaded = [
        EngineModel(p, threads, flash_attn) for p in paths
    ]  # every file is checked before any measurement
    try:
        evals = [
            EngineModelEval(name=str(p), role=role, layout=m.layout)
            for p, m, role in zip(paths, loaded, ("model", "baseline"), strict=False)
        ]
        data_info = None
        if texts is not None:
            texts = list(texts)
            streams = [tokenize_for_engine(m, texts, max_eval_tokens) for m in loaded]
            data_info = {"documents": len(texts), "tokens": max(len(s) for s in streams)}
            for e, m, ids in zip(evals, loaded, streams, strict=True):
                e.perplexity = engine_perplexity(m, ids, max_length, stride, progress=progress)
        if not skip_speed:
            for c in contexts:
                for s in sequences:
                    for e, r in zip(
                        evals, engine_speed(loaded, c, s, new_tokens, warmup, repeats, seed), strict=True
                    ):
                        e.speed.append(r)
    finally:
        for m in loaded:
            m.close()
    options = {
        "contexts": list(contexts),
        "sequences": list(sequences),
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "threads": loaded[0].threads,
        "flash_attn": flash_attn,
        "max_length": max_length,
        "stride": stride or max(1, max_length // 2),
        "max_eval_tokens": max_eval_tokens,
        "seed": seed,
    }
    return EngineReport(models=evals, data=data_info, options=options)
