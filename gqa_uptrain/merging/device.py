"""Where the calibrated path computes: the device, its memory budget, and where activations live.

The calibrated default (calibration, closed-form fits, layer-wise refinement) runs on one
``torch.device``: ``cpu`` or a CUDA GPU. The layer walk moves one decoder layer at a time onto it;
the calibration activations (per batch: the layer's input states and, while refining, each
attention module's input and output) stay on the device when they fit its memory budget and
otherwise live in host memory (pinned where CUDA exists, so copies to the device are asynchronous),
moved to the device one batch at a time. The checkpoint writer never sees the device: host memory
stays bounded by one layer whatever the model size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# Share of the device's free memory the default budget takes: the rest is left for the CUDA
# context, the allocator's fragmentation and other processes on the same card.
DEFAULT_BUDGET_SHARE = 0.9


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None: the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N`` as a :class:`torch.device`; a one-line error for a GPU that is not there."""
    spec = str(device) if isinstance(device, torch.device) else (device or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {spec}: no CUDA GPU is visible to torch here; use --device cpu (or auto)"
        )
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) visible; use cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


def parse_memory(size: str | int | None) -> int | None:
    """``--max-device-memory`` (``"20GB"``, ``"512MiB"``, a byte count; None: the default) in bytes."""
    if size is None:
        return None
    from ..io.writer import parse_size

    try:
        return parse_size(size)
    except ConfigError:
        raise ConfigError(
            f"--max-device-memory {size!r} is not a size; use e.g. 20GB, 512MiB or a byte count"
        ) from None


def device_budget(device: torch.device, max_bytes: int | None) -> int | None:
    """Bytes the calibrated path may keep on ``device``: ``max_bytes`` when given, else
    :data:`DEFAULT_BUDGET_SHARE` of the GPU's free memory now; None (no limit) for the CPU without one."""
    if max_bytes is not None:
        return max_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(DEFAULT_BUDGET_SHARE * free)
    return None


@dataclass(frozen=True)
class Placement:
    """Where calibration activations live: on the compute ``device``, or in host memory (pinned when
    ``pin``) and moved to the device one batch at a time."""

    device: torch.device
    on_device: bool
    pin: bool = False

    @property
    def home(self) -> torch.device:
        """The device the activations are kept on between uses."""
        return self.device if self.on_device else torch.device("cpu")

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` moved to where activations are kept (itself if it is there already)."""
        if t.device == self.home:
            return t
        if self.pin:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t)
        return t.to(self.home)

    def use(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the compute device (an asynchronous copy from pinned memory)."""
        return t.to(self.device, non_blocking=self.pin)

    def describe(self) -> str:
        """For the log: where the activations are."""
        if self.on_device:
            return f"on {self.device}" + (" (host memory is the device)" if self.device.type == "cpu" else "")
        return "in pinned host memory" if self.pin else "in host memory"


def place_activations(
    device: torch.device, activation_bytes: int, working_bytes: int, budget: int | None
) -> Placement:
    """Keep the activations (``activation_bytes``) on ``device`` when they fit its ``budget`` next to
    the ``working_bytes`` the layer walk needs there anyway (a layer's weights, one step's
    intermediates); otherwise in host memory, pinned only where CUDA exists."""
    fits = budget is None or activation_bytes + working_bytes <= budget
    placement = Placement(device, fits, pin=not fits and torch.cuda.is_available())
    if budget is not None:
        logger.info(
            "calibration activations (%.2f GB) %s: device budget %.2f GB, %.2f GB of it for the layer at work",
            activation_bytes / 1e9,
            placement.describe(),
            budget / 1e9,
            working_bytes / 1e9,
        )
    else:
        logger.info("calibration activations (%.2f GB) %s", activation_bytes / 1e9, placement.describe())
    return placement


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (faster than float32)."""
    if device.type == "cuda":
        # Ampere (compute capability 8) and later have bf16 tensor cores.
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        # oneDNN's bf16 kernels need AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower.
        # torch exposes the check only as an operator; without it, assume emulation (float32 then).
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    return False


# Narrowest module trained in bf16 autocast on a CPU: below a few hundred wide the casts cost more
# than bf16 saves there (twice the time at width 128). GPUs gain at every width.
CPU_AUTOCAST_MIN_WIDTH = 512


def use_autocast(enabled: bool, device: torch.device, width: int, native: bool | None = None) -> bool:
    """Whether refinement's training steps run in bf16 autocast: ``enabled`` (``RefineSpec.autocast``),
    ``device`` computes bf16 natively (``native``, or :func:`bf16_native` when None), and on a CPU
    the module is at least :data:`CPU_AUTOCAST_MIN_WIDTH` wide."""
    if not enabled:
        return False
    if native is None:
        native = bf16_native(device)
    if not native:
        return False
    return device.type == "cuda" or width >= CPU_AUTOCAST_MIN_WIDTH


def peak_device_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA ``device`` since the last reset; None for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
