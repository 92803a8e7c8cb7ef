"""Per-process state shared by the batch transform and the DataLoader.

Three things cross the boundary between the dataset transform and the loader:
the random stream the pipeline draws from, errors raised inside DataLoader
worker processes (which torch re-raises in the main process with the worker's
whole traceback glued into the message), and, in our loader's workers, the
shared memory the batch's final pixels are written into (see output_buffer).
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch
from accelerate.utils import get_int_from_env

from ..errors import DataError


class BatchDataError(DataError):
    """A DataError raised while building a batch; survives DataLoader workers.

    torch re-raises a worker's exception in the main process as
    ``type(exc)("Caught X in DataLoader worker process N.\\nOriginal Traceback ...")``.
    This constructor recognises that text and keeps only the original message,
    so the user sees the same one-line error with or without workers.
    """

    def __init__(self, message: str = ""):
        super().__init__(_strip_worker_traceback(message, type(self)))


def undecodable_message(where: str, exc: Exception) -> str:
    """The one line for an image that cannot be decoded (`where`: its index, path and source)."""
    return (f"cannot decode image at {where}: {exc}. Fix or remove it, or set dataset.on_corrupt to \"skip\" "
            f"to drop undecodable images")


def _strip_worker_traceback(message: str, cls: type) -> str:
    if not (isinstance(message, str) and message.startswith("Caught ") and "Original Traceback" in message):
        return message
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind(marker)
    if start < 0:
        return message
    return message[start + len(marker):].rstrip("\n")


def process_rank() -> int:
    """Global rank of this process: torch.distributed's once initialised, else the launcher's
    $RANK / $LOCAL_RANK, else 0. The one place the package reads it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return get_int_from_env(["RANK", "LOCAL_RANK"], 0)


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (seed, epoch, rank, ...)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# The generator the pipeline draws from in the main process (num_workers=0).
# Tagged with the pid that created it: a forked worker inherits the object but
# must not use it, or every worker would replay the same stream.
_pipeline_generator: tuple[int, torch.Generator] | None = None


def set_pipeline_generator(generator: torch.Generator | None) -> None:
    global _pipeline_generator
    _pipeline_generator = None if generator is None else (os.getpid(), generator)


def pipeline_generator() -> torch.Generator | None:
    """Generator for pipeline draws; None means torch's global RNG.

    Inside DataLoader workers this is always None: the worker's global RNG is
    seeded by torch per worker and per epoch (and per rank by our worker_init_fn).
    """
    if _pipeline_generator is None or _pipeline_generator[0] != os.getpid():
        return None
    return _pipeline_generator[1]


# Set while one of our loader's workers builds a batch: hands out a shared-memory slot for the
# batch's final pixels (ring.BatchRing.lend). Any other caller (the main process, a user's own
# DataLoader or Trainer over the dataset) gets ordinary tensors.
_lend = None


@contextlib.contextmanager
def lending_output(lend):
    global _lend
    _lend = lend
    try:
        yield
    finally:
        _lend = None


def output_buffer(shape) -> torch.Tensor | None:
    """An empty uint8 tensor of `shape` (N, H, W, C) to write a batch's final pixels into, or None."""
    return None if _lend is None else _lend(shape)
