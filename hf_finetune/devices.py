"""Which accelerator this machine offers (one answer for training, predict and the model card),
and this process's rank."""

import torch
from accelerate.utils import get_int_from_env


def accelerator():
    """"cuda", "mps" or "xpu" when one is usable, else None (the CPU).

    Written out because torch.accelerator, which answers this, is newer (2.6) than our torch
    floor, and accelerate's equivalent is newer than its floor too."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return None


def default_device() -> str:
    """The device a model runs on when none is asked for."""
    return accelerator() or "cpu"


def describe_device() -> str:
    """The device in words, for the model card: the GPU's name, or "CPU"."""
    kind = accelerator()
    if kind == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    if kind == "xpu":
        return f"{torch.xpu.get_device_name(0)} (XPU)"
    return {"mps": "Apple MPS"}.get(kind, "CPU")


def process_rank() -> int:
    """Global rank of this process: torch.distributed's once initialised, else the launcher's
    $RANK / $LOCAL_RANK, else 0. The one place the package reads it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return get_int_from_env(["RANK", "LOCAL_RANK"], 0)
