"""The work dir: one run at a time, no silent mixing of two runs, writes that a reader never sees
half done, and the checkpoints a resume or an evaluation can trust."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .errors import CheckpointError, TrainingError, UserError
from .models.checkpoints import WEIGHT_FILES, read_checkpoint, verify_weights, weights_file

logger = logging.getLogger("hf_finetune")

LOCK_FILE = ".hf_finetune.lock"
# How long a start waits for a held lock: a run killed a moment ago releases it once torn down.
LOCK_WAIT_S = 5.0
# Every temporary file or folder of an atomic write starts with this, so the next start can find
# what a killed save left behind.
TEMP_PREFIX = ".tmp-hf_finetune-"
# What --resume needs besides the weights (the Trainer writes trainer_state.json last).
RESUME_FILES = ("config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt")
# Read on resume when present.
OPTIONAL_RESUME_FILES = ("scaler.pt",)
FINAL_MODEL_FILES = ("config.json",) + WEIGHT_FILES
# safetensors' save_file writes `.tmpXXXXXX` (Rust tempfile crate, mode 0600) and renames it.
_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
_DISK_FULL_SIGNS = ("No space left on device", "Disk quota exceeded", "inline_container.cc")


# --------------------------------------------------------------------------- one run per work dir
# Descriptors of the work-dir locks this process holds: a forked child closes its copies at once.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)  # only this copy: the parent's flock stays
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class WorkDirLock:
    """Hold `work_dir` for this run: a second run on it refuses, naming the process that holds it.

    An flock on `.hf_finetune.lock`, which records the holder's pid and host. The kernel releases
    it when the holder dies, however it dies, so a lock file left by a killed run is taken over
    with a warning. An flock lasts while any copy of its descriptor is open, so forked children
    (DataLoader workers) close theirs at once: the lock ends with this process, not with the
    workers a SIGKILL leaves running for seconds.

    Hand-written: filelock locks with flock too, and only its recent releases close it in forked
    children (huggingface_hub accepts filelock 3.10); a POSIX record lock (fcntl.lockf) is not
    inherited, but this process closing any descriptor of the file (an upload of the work dir
    reading it) would silently drop it.

    A lock still held is waited for up to `wait_s` (a run killed a moment ago is still being
    torn down) before refusing. Only the main process locks (`is_main`); the others skip.
    """

    def __init__(self, work_dir, *, is_main: bool = True, wait_s: float = LOCK_WAIT_S):
        self.path = Path(work_dir) / LOCK_FILE
        self.is_main = is_main
        self.wait_s = wait_s
        self._fd = None

    def __enter__(self):
        if self.is_main:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = self._acquire()
            except OSError as e:  # a file in the way, no permission, a read-only disk
                raise UserError(f"work dir {self.path.parent}: not writable ({e.strerror}); choose "
                                "another with --work-dir") from None
        return self

    def __exit__(self, *exc_info):
        if self._fd in _HELD_LOCKS:  # not in a forked child, whose copy is closed
            _HELD_LOCKS.discard(self._fd)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # while held: a waiter that opened this file retries on a new one
            os.close(self._fd)  # releases the flock
        self._fd = None

    def _acquire(self) -> int | None:
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd) or "pid not recorded yet"
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"work dir {self.path.parent} is in use by another run ({holder}); wait for it to finish "
                        "or choose another --work-dir"
                    ) from None
                time.sleep(0.1)
                continue
            except OSError as exc:  # a file system without locks (some network / FUSE mounts)
                os.close(fd)
                logger.warning("work dir %s: cannot be locked (%s); a second run on it would not be stopped",
                               self.path.parent, exc.strerror)
                return None
            # The holder may have removed the file between our open and flock: lock the file on disk.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        _HELD_LOCKS.add(fd)
        previous = _read_holder(fd)
        if previous:
            logger.warning("work dir %s: taking over the lock left by %s, which is no longer running",
                           self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        os.fsync(fd)
        return fd


def _read_holder(fd) -> str:
    """'pid N on host H' from a lock file, '' when empty or unreadable."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {holder['pid']} on host {holder['host']}"
    return ""


def _same_file(fd, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def check_fresh_start(work_dir, *, resume, overwrite: bool = False) -> None:
    """Refuse to start a new run on top of another run's checkpoints or final model.

    With `overwrite`, those are removed first, so the new run's outputs never mix with them.
    """
    work_dir = Path(work_dir)
    if resume or not work_dir.is_dir():
        return
    checkpoints = sort_checkpoints(str(work_dir), PREFIX_CHECKPOINT_DIR)
    model_files = [name for name in FINAL_MODEL_FILES if (work_dir / name).is_file()]
    if not checkpoints and not model_files:
        return
    found = ", ".join([Path(c).name for c in checkpoints[-3:]] + model_files)
    if not overwrite:
        raise UserError(
            f"work dir {work_dir} already holds a run ({found}); continue it with --resume, start a new run "
            "with another --work-dir, or pass --overwrite to delete those outputs first"
        )
    logger.warning("--overwrite: deleting %s in %s", found, work_dir)
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)
    for name in model_files:
        (work_dir / name).unlink()


# --------------------------------------------------------------------------- writes that never show half done
def _file_mode() -> int:
    """The mode open() gives a new file (0666 less the umask); temp files start as 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it wraps) says the disk or the quota is full.

    safetensors wraps ENOSPC in a SafetensorError; torch.save fails in its zip writer
    (inline_container.cc) without naming the cause.
    """
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(error) for sign in _DISK_FULL_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_guard(path):
    """Turn a disk-full failure while writing `path` into one TrainingError line."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        written = getattr(exc, "filename", None) or path
        raise TrainingError(
            f"writing {written} failed: the disk is full (no space left on device); free some space or choose "
            "another --work-dir, then --resume (checkpoints saved before are intact)"
        ) from None


def _fsync_dir(folder) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """A file object whose content replaces `path` only once fully written and synced.

    The temp file lives in the same folder (so the rename is atomic) and is removed on any
    failure, Ctrl-C included.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with disk_full_guard(path):
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temp, _file_mode())
            os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def dump_json(obj, path, *, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON, atomically: NaN and +-inf (not JSON) become null."""
    with atomic_write(path) as f:
        json.dump(_finite_or_none(obj), f, indent=indent, allow_nan=False)
        f.write("\n")


def save_atomically(write, out_dir, *, last: tuple[str, ...] = ("config.json",)) -> list[Path]:
    """Run `write(temp_dir)` (e.g. `model.save_pretrained`), then move its files into `out_dir`.

    The files named in `last` move after all the others, so a reader that finds config.json
    also finds the weights. Files get the usual mode (safetensors writes 0600). Returns the
    paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out_dir))
    try:
        with disk_full_guard(out_dir):
            write(str(temp_dir))
            files = sorted((p for p in temp_dir.iterdir() if p.is_file()), key=lambda p: (p.name in last, p.name))
            mode = _file_mode()
            for file in files:
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(file, mode)
            for file in files:
                os.replace(file, out_dir / file.name)
        _fsync_dir(out_dir)
        return [out_dir / file.name for file in files]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def save_model_atomically(model, work_dir) -> list[Path]:
    """`model.save_pretrained(work_dir)`, written so that a reader never sees a half-written model."""
    return save_atomically(model.save_pretrained, work_dir)


def remove_interrupted_saves(work_dir) -> list[Path]:
    """Delete what killed saves left in `work_dir`: temp files of atomic writes and of safetensors,
    and checkpoint folders without trainer_state.json (the Trainer writes it last; resume never
    uses such a folder).

    Call at start, holding the WorkDirLock, on the main process.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    checkpoints = [Path(c) for c in sort_checkpoints(str(work_dir), PREFIX_CHECKPOINT_DIR)]
    stale = sorted(work_dir.glob(TEMP_PREFIX + "*"))
    for folder in [work_dir] + checkpoints:
        stale += sorted(p for p in folder.iterdir() if _SAFETENSORS_TEMP.fullmatch(p.name) and p.is_file())
    stale += [c for c in checkpoints if not (c / "trainer_state.json").is_file()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if stale:
        logger.warning("removed what an interrupted save left in %s: %s", work_dir,
                       ", ".join(str(p.relative_to(work_dir)) for p in stale))
    return stale


# --------------------------------------------------------------------------- checkpoints to trust
def verify_checkpoint(path) -> list[str]:
    """Problems with the files `--resume` will load from checkpoint folder `path` (empty: usable).

    Each file is read as resume reads it, but safely: weights (finite), optimizer, scheduler,
    scaler and rng states (no code run), trainer_state.json (parses).
    """
    path = Path(path)
    missing = [name for name in RESUME_FILES if not (path / name).is_file()]
    if weights_file(path) is None:
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        return [f"{path.name}: missing {', '.join(missing)} (interrupted while saving)"]
    problems = []
    try:
        verify_weights(path, key=path.name)
    except CheckpointError as exc:
        problems.append(str(exc))
    state_files = [path / name for name in ("optimizer.pt", "scheduler.pt") + OPTIONAL_RESUME_FILES]
    for file in state_files + sorted(path.glob("rng_state*.pth")):
        if file.is_file():
            try:
                read_checkpoint(file, key=path.name)
            except CheckpointError as exc:
                problems.append(str(exc))
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: {path / 'trainer_state.json'} is not readable JSON ({exc})")
    return problems


def usable_checkpoints(work_dir):
    """The checkpoint folders of `work_dir` that verify, newest first.

    A generator: each is verified only when reached, so `next(usable_checkpoints(d), None)` reads
    just the newest usable one. Skipped folders are logged with the bad file.
    """
    if not Path(work_dir).is_dir():
        return
    for checkpoint in reversed(sort_checkpoints(str(work_dir), PREFIX_CHECKPOINT_DIR)):
        problems = verify_checkpoint(checkpoint)
        if problems:
            logger.warning("skipping %s", "; ".join(problems))
            continue
        yield checkpoint


def resume_checkpoint(work_dir, resume) -> str | None:
    """The checkpoint folder `--resume` continues from (None: start fresh).

    `resume`: None/False (fresh), True/"auto" (the newest usable checkpoint of `work_dir`), or a
    checkpoint folder. Raises CheckpointError when checkpoints exist but none can be used.
    """
    if resume in (None, False):
        return None
    if resume not in (True, "auto"):
        problems = verify_checkpoint(resume) if Path(resume).is_dir() else [f"{resume} is not a folder"]
        if problems:
            raise CheckpointError(f"--resume: {problems[0]}")
        return str(resume)
    checkpoint = next(usable_checkpoints(work_dir), None)
    if checkpoint is not None:
        return checkpoint
    if Path(work_dir).is_dir() and sort_checkpoints(str(work_dir), PREFIX_CHECKPOINT_DIR):
        raise CheckpointError(
            f"--resume: no checkpoint in {work_dir} can be used (see the warnings above for each bad file); "
            "start a new run with --overwrite or another --work-dir"
        )
    logger.warning("--resume: no checkpoint in %s; starting from scratch", work_dir)
    return None


def eval_source(work_dir) -> str:
    """What `--eval-only` with no path evaluates: the final model, else the newest usable checkpoint."""
    work_dir = Path(work_dir)
    if (work_dir / "config.json").is_file():
        try:
            verify_weights(work_dir, key="--eval-only")
            return str(work_dir)
        except CheckpointError as exc:
            logger.warning("the final model in %s is not usable (%s)", work_dir, exc)
    checkpoint = next(usable_checkpoints(work_dir), None)
    if checkpoint is None:
        raise CheckpointError(
            f"--eval-only: no complete model or checkpoint in {work_dir}; pass a checkpoint folder or weights "
            "file: --eval-only PATH"
        )
    logger.warning("--eval-only: evaluating the newest usable checkpoint, %s", checkpoint)
    return checkpoint


__all__ = [
    "WorkDirLock",
    "atomic_write",
    "check_fresh_start",
    "disk_full_guard",
    "dump_json",
    "eval_source",
    "is_disk_full",
    "remove_interrupted_saves",
    "resume_checkpoint",
    "save_atomically",
    "save_model_atomically",
    "usable_checkpoints",
    "verify_checkpoint",
]
