"""What the batch transform and the DataLoader share: errors raised inside DataLoader
worker processes (which torch re-raises in the main process with the worker's whole
traceback glued into the message), the process rank and the seeds mixed from it.

The random generator the pipeline draws from and the shared memory a worker writes a
batch into are not shared here: the loader hands both to the transform with each batch
(loader.WholeBatches).
"""

from __future__ import annotations

import hashlib
import json

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
    """The one line for an image that cannot be read or decoded (`where`: its index, path and source)."""
    if isinstance(exc, FileNotFoundError):  # an indexed folder's file, moved or deleted since
        return (f"cannot read image at {where}: the file is gone (moved or deleted after the folder was indexed). "
                f"Restore it, or set dataset.on_corrupt to \"skip\" to drop unreadable images")
    if isinstance(exc, PermissionError):
        return (f"cannot read image at {where}: permission denied. Make it readable, or set dataset.on_corrupt "
                f"to \"skip\" to drop unreadable images")
    return (f"cannot decode image at {where}: {exc}. Fix or remove it, or set dataset.on_corrupt to \"skip\" "
            f"to drop undecodable images")


SKIPPED_IMAGES_FILE = "skipped_images.jsonl"  # in the work dir: each image on_corrupt="skip" left out


def record_skipped(log_path: str | None, where: str, exc: Exception) -> None:
    """Append a skipped image (where it is, why) to log_path, one JSON line. Every process that
    builds batches appends, loader workers included: they share no counter with the main process,
    and a file also says which images to fix. A failed write (disk full) loses only the record."""
    if log_path is None:
        return
    line = json.dumps({"image": where, "error": " ".join(str(exc).split()) or type(exc).__name__}) + "\n"
    try:
        with open(log_path, "a", encoding="utf-8") as f:  # one short append: whole lines, whatever the process
            f.write(line)
    except OSError:
        pass


def skipped_images(log_path: str) -> list[str]:
    """The distinct images recorded in log_path (one skipped in every epoch counts once)."""
    try:
        with open(log_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    places = set()
    for line in lines:
        try:
            places.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill or a full disk
    return sorted(places)


def _strip_worker_traceback(message: str, cls: type) -> str:
    if not (isinstance(message, str) and message.startswith("Caught ") and "Original Traceback" in message):
        return message
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind(marker)
    if start < 0:
        return message
    return message[start + len(marker):].rstrip("\n")


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (seed, epoch, rank, ...)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
