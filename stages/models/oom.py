"""Out of memory is an answer: device memory, the stage's predicted need, and one OutOfMemory line (exit 5).

A CUDA out-of-memory (torch.OutOfMemoryError, or a RuntimeError saying "out of memory"), a CPU
allocator failure (torch's "can't allocate memory", numpy's and Python's MemoryError) become stages.common.errors.OutOfMemory in one place, `answer_oom`, which the stage
runners use (so `vd batch` receives OutOfMemory unchanged and does not retry it) and vdcli.common.run
falls back on for any stage. The message names the predicted need (stages.models.memory), the device's
memory, and what reduces the need: --checkpointing layers, --window 8, a smaller `vd mask --size`.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Union

from stages.common.errors import OutOfMemory
from stages.models import memory

GIB = 1 << 30
OOM_TEXTS = ("out of memory", "can't allocate memory")  # CUDA's message, and the CPU allocator's
UNMODELLED = ("tiny",)  # model specs that are not the SD1.5 + AnimateDiff v3 architecture


@dataclass(frozen=True)
class MemoryPlan:
    """What a stage runs, as far as memory goes: the clip, the frames per UNet call, dtype, checkpointing."""

    stage: str  # "invert" or "edit" (stages.models.memory.STAGE_PASSES)
    frames: int  # frames of the clip
    height: int
    width: int
    dtype: str  # fp32 | bf16 | fp16 (as memory.canonical_dtype reads it)
    window: int | None = None  # frames per UNet call; None: the whole clip
    checkpointing: str = "off"  # the level of the grad passes (memory.LEVELS)
    model: str = ""
    device: str = ""  # where it runs ("cuda:0", "cpu"); "" when unknown
    grad_passes: tuple[str, ...] = ("stdg", "null_text")  # the backpropagating passes this run has

    def need(self) -> int | None:
        """Predicted peak bytes of the stage's heaviest pass, or None when it is not modelled."""
        if self.model in UNMODELLED:
            return None
        try:
            return memory.predict_stage_peak(self.stage, self.frames, self.height, self.width, self.dtype,
                                             self.checkpointing, self.window, self.device or "cuda")
        except ValueError:  # no measured table for this pass/dtype yet, or sizes the model refuses
            return None

    def per_call(self) -> int:
        """Frames of one UNet call."""
        return min(int(self.frames), int(self.window)) if self.window else int(self.frames)


PlanSource = Union[MemoryPlan, Callable[[], Union[MemoryPlan, None]], None]


def gib(n: float | None) -> str:
    """Bytes as "12.3 GiB" ("?" for None)."""
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is the device (or the CPU allocator) running out of memory."""
    import sys

    if isinstance(exc, MemoryError):  # numpy's "Unable to allocate ..." and Python's own
        return True
    torch = sys.modules.get("torch")  # an OOM can only come from torch once it is imported
    if torch is not None:
        kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if k)
        if kinds and isinstance(exc, kinds):
            return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(t in text for t in OOM_TEXTS)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_memory(device: Any = None) -> dict[str, Any]:
    """{"device", "name", "total", "available"} in bytes (None when unknown). On CUDA `available` is the
    driver's free memory plus what this process's allocator holds in reserve (it can reuse that); on the
    CPU it is MemAvailable."""
    import sys

    torch = sys.modules.get("torch")
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda") and torch is not None and torch.cuda.is_available():
        index = torch.device(dev).index
        index = torch.cuda.current_device() if index is None else index
        try:
            free, total = torch.cuda.mem_get_info(index)
            reserved = torch.cuda.memory_reserved(index)
            name = torch.cuda.get_device_name(index)
        except RuntimeError:  # the device is in a bad state after the failure: say what we can
            return {"device": dev, "name": "", "total": None, "available": None}
        return {"device": f"cuda:{index}", "name": name, "total": int(total), "available": int(free + reserved)}
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    return {"device": "cpu", "name": "", "total": total, "available": _meminfo_available()}


def _options(plan: MemoryPlan | None) -> str:
    """What reduces the need, each with its predicted peak when the model knows it."""
    def shown(p: MemoryPlan) -> str:
        n = p.need()
        return f" (about {gib(n)})" if n is not None else ""

    opts = []
    if plan is None or plan.stage == "invert":
        if plan is None or plan.checkpointing != memory.LEVELS[-1]:
            opts.append(f"--checkpointing {memory.LEVELS[-1]}"
                        + (shown(replace(plan, checkpointing=memory.LEVELS[-1])) if plan else ""))
        if plan is None or plan.per_call() > 8:
            opts.append("--window 8" + (shown(replace(plan, window=8)) if plan else ""))
    elif plan.per_call() > 8:
        opts.append("a shorter --window in `vd invert` (8)")
    opts.append("a smaller `vd mask --size` (e.g. 384)")
    return ", ".join(opts)


def oom_message(plan: MemoryPlan | None, info: dict[str, Any], stage: str | None = None) -> str:
    """The one-line answer: what was needed, what the device has, what reduces the need."""
    total = f"{gib(info['total'])} total, {gib(info.get('available'))} free" if info.get("total") else ""
    parts = ", ".join(p for p in (info.get("name"), total) if p)
    have = (info.get("device") or "the device") + (f" ({parts})" if parts else "")
    name = stage or (plan.stage if plan else "")
    text = f"out of memory on {have}" + (f" in vd {name}" if name else "")
    if plan is not None:
        need = plan.need()
        setting = (f"{plan.per_call()} frames of {plan.width}x{plan.height} per UNet call, "
                   f"{memory.canonical_dtype(plan.dtype) if plan.dtype else '?'}, checkpointing "
                   f"{plan.checkpointing}")
        if need is not None:
            text += f": predicted need about {gib(need)} ({setting})"
        else:
            text += f": predicted need unknown for these settings ({setting}; the memory model covers SD1.5 + " \
                    "AnimateDiff v3 and needs bench/memory.py's table)"
    return f"{text}; reduce it with {_options(plan)}"


def _resolve(plan: PlanSource) -> MemoryPlan | None:
    if plan is None or isinstance(plan, MemoryPlan):
        return plan
    try:
        return plan()
    except Exception:  # the answer must not fail while explaining a failure
        return None


def _release(exc: BaseException) -> None:
    """Drop the failed call's frames (and the tensors their locals hold) so a long-lived process (a `vd
    batch` worker) gets the memory back before its next clip."""
    tb = exc.__traceback__
    if tb is not None:
        traceback.clear_frames(tb)
    exc.__traceback__ = None


def out_of_memory(exc: BaseException, plan: PlanSource = None, device: Any = None,
                  stage: str | None = None) -> OutOfMemory:
    """The OutOfMemory (exit code 5) answering the out-of-memory `exc`; frees what the failed call held."""
    _release(exc)
    p = _resolve(plan)
    if device is None and p is not None and p.device:
        device = p.device
    if device is None:
        device = "cuda" if "cuda" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError" else "cpu"
    return OutOfMemory(oom_message(p, device_memory(device), stage))


@contextlib.contextmanager
def answer_oom(plan: PlanSource = None, device: Any = None, stage: str | None = None) -> Iterator[None]:
    """Turn an out-of-memory inside the block into OutOfMemory; `plan` (or a function giving it, called
    only on failure) names the predicted need. Every other exception passes unchanged."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as exc:
        if not is_oom(exc):
            raise
        err = out_of_memory(exc, plan, device, stage)
        raise err from None


def oom_answered(plan_of: Callable[..., MemoryPlan | None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a stage runner: an out-of-memory inside it becomes OutOfMemory, its plan built by
    plan_of(*args, **kwargs) (the runner's own arguments), only on failure."""
    import functools

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with answer_oom(lambda: plan_of(*args, **kwargs)):
                return fn(*args, **kwargs)
        return run
    return wrap
