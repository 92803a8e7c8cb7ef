"""Reused shared-memory slots that carry finished batches from our loader's workers.

torch's DataLoader sends every tensor a worker returns through a new shared-memory
segment and a file-descriptor handover. At 224 px (19 MB per batch of 128) that costs
a worker more than the pipeline itself: N workers on N cores delivered a third of N
times the in-process rate. torch has no way to reuse shared buffers across batches,
so this is written by hand:

- before its workers start, the loader makes one region of slots (a memfd: memory is
  only used where a batch is written, and no /dev/shm size limit applies), which
  forked workers inherit and spawned ones (forkserver, Python 3.14's Linux default)
  map from a duplicated file descriptor;
- in a worker, the pipeline's last step writes the batch's pixels straight into a
  free slot (BatchRing.lend, which the loader hands to the transform) and the worker
  returns the slot's number and the labels (RingBatch);
- the main process views the slot as the batch tensor, without a copy;
- the slot is free again only when the last tensor viewing it is gone (a finaliser on
  the array the tensor is made from), so a batch the training loop still holds is
  never overwritten.

When no slot is free (the caller holds many batches) or a batch does not fit, it
travels torch's usual way, as it does where there is no memfd (macOS, Windows). The
pixels are the same either way.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from multiprocessing import context, reduction

import numpy as np
import torch

# torch's DataLoader re-raises a batch that is an ExceptionWrapper in the training loop; there is
# no public way to hand it an error. torch._utils is private: checked on torch 2.13, and
# tests/test_batch_ring.py fails when torch changes it. Used by _receive only.
from torch._utils import ExceptionWrapper

try:
    import fcntl
except ImportError:  # Windows: no ring, batches travel torch's usual way
    fcntl = None

FREE, RECEIVED = 0, -1  # slot states; a worker's claim is a positive token: pid << 32 | count
MAX_IMAGE_BYTES = 3 * 1024 * 1024  # a slot holds a batch of images up to 1024 x 1024 RGB

_rings: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # this process's rings, by key


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class BatchRing:
    """Slots of shared memory for one loader's batches; made in the main process."""

    @classmethod
    def for_loader(cls, batch_size: int, num_workers: int, prefetch_factor: int) -> "BatchRing | None":
        """A ring for a loader with workers, or None where the system offers no memfd."""
        # Each worker's prefetched batches, plus those the training loop, accelerate's look-ahead
        # and the pin-memory thread may hold at once.
        slots = num_workers * prefetch_factor + 4
        if fcntl is None or not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(slots, batch_size * MAX_IMAGE_BYTES)
        except OSError:  # no room to map
            return None

    def __init__(self, slots: int, slot_bytes: int):
        fds = os.memfd_create("hf_finetune_batches"), os.memfd_create("hf_finetune_batch_states")
        os.ftruncate(fds[0], slots * slot_bytes)  # sparse: pages exist once written
        os.ftruncate(fds[1], 8 * slots)
        self._map(slots, slot_bytes, fds, owner=os.getpid(), key=os.urandom(8).hex())
        _rings[self.key] = self

    def _map(self, slots: int, slot_bytes: int, fds: tuple[int, int], owner: int, key: str) -> None:
        self.slot_bytes, self.fds, self.owner, self.key = slot_bytes, fds, owner, key
        weakref.finalize(self, _close, fds)
        self.memory = np.frombuffer(mmap.mmap(fds[0], slots * slot_bytes), dtype=np.uint8)
        self.state = np.frombuffer(mmap.mmap(fds[1], 8 * slots), dtype=np.int64)
        self.claims = 0
        self.lent = None  # in a worker: (slot, token, tensor) while a batch is being built
        self.receiving = threading.Lock()  # the record lock is per process, not per thread

    def __reduce__(self):
        # Pickled while a worker process starts (spawn, forkserver): the worker maps the same
        # memory. Pickled any other way (a copy of the dataset): the copy has no ring.
        if context.get_spawning_popen() is None:
            return _no_ring, ()
        return _attach, (len(self.state), self.slot_bytes, reduction.DupFd(self.fds[0]),
                         reduction.DupFd(self.fds[1]), self.owner, self.key)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor's memory lies in this ring."""
        start = self.memory.ctypes.data
        return start <= tensor.data_ptr() < start + self.memory.size

    def _slot(self, slot: int, shape) -> np.ndarray:
        start = slot * self.slot_bytes
        return self.memory[start:start + math.prod(shape)]

    # A record lock on the state file: between processes, and released by the kernel when its
    # holder dies (a killed worker never leaves the slots locked).

    def _lock(self) -> None:
        fcntl.lockf(self.fds[1], fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fds[1], fcntl.LOCK_UN)

    # In a worker.

    def lend(self, shape) -> torch.Tensor | None:
        """A uint8 tensor of `shape` in a free slot, or None; the same one until `send`."""
        if self.lent is not None:
            return self.lent[2] if tuple(self.lent[2].shape) == tuple(shape) else None
        if math.prod(shape) > self.slot_bytes:
            return None
        self._lock()
        try:
            states = self.state.tolist()
            free = states.index(FREE) if FREE in states else None
            if free is None:  # a slot claimed by a worker that died before its batch arrived is free again
                free = next((s for s, state in enumerate(states) if state > 0 and not _alive(state >> 32)), None)
            if free is None:
                return None
            self.claims += 1
            token = (os.getpid() << 32) | (self.claims & 0xFFFFFFFF)
            self.state[free] = token
        finally:
            self._unlock()
        self.lent = (free, token, torch.from_numpy(self._slot(free, shape)).view(shape))
        return self.lent[2]

    def send(self, batch: dict):
        """What the worker returns: a RingBatch when the batch's pixels are the lent slot, else
        the batch itself (then give_back)."""
        if self.lent is None:
            return batch
        slot, token, tensor = self.lent
        pixels = batch["pixel_values"].permute(0, 2, 3, 1)  # the NHWC memory PackClsInputs wrote
        if pixels.data_ptr() != tensor.data_ptr() or pixels.shape != tensor.shape or not pixels.is_contiguous():
            return batch
        self.lent = None
        return RingBatch(self.key, slot, token, tuple(tensor.shape), batch["labels"].numpy())

    def give_back(self) -> None:
        """Free the lent slot when the batch did not go through it."""
        if self.lent is not None:
            self.state[self.lent[0]] = FREE
            self.lent = None

    # In the main process.

    def receive(self, slot: int, token: int, shape, labels) -> dict:
        with self.receiving:
            self._lock()
            try:
                if self.state[slot] != token:
                    raise RuntimeError(f"slot {slot} of the loader's shared batches was reused before its batch "
                                       f"arrived")
                self.state[slot] = RECEIVED
            finally:
                self._unlock()
        pixels = self._slot(slot, shape)
        weakref.finalize(pixels, self._free, slot).atexit = False
        return {"pixel_values": torch.from_numpy(pixels).view(shape).permute(0, 3, 1, 2),
                "labels": torch.from_numpy(labels)}

    def _free(self, slot: int) -> None:
        # No lock: finalisers may run inside any allocation, even one made while the lock is held.
        # A forked worker inherits the main process's batches; their finalisers must not free slots.
        if os.getpid() == self.owner:
            self.state[slot] = FREE


class RingBatch:
    """A worker's batch whose pixels are in a ring slot: pickles to the slot's number."""

    def __init__(self, key: str, slot: int, token: int, shape: tuple, labels: np.ndarray):
        # Labels as an array: pickled inline, where a tensor would take a shared-memory segment.
        self.args = (key, slot, token, shape, labels)

    def __reduce__(self):
        return _receive, self.args


def _close(fds):
    for fd in fds:
        os.close(fd)


def _no_ring():
    return None


def _attach(slots, slot_bytes, memory_fd, state_fd, owner, key):
    ring = BatchRing.__new__(BatchRing)
    ring._map(slots, slot_bytes, (memory_fd.detach(), state_fd.detach()), owner, key)
    return ring


def _receive(key, slot, token, shape, labels):
    try:
        return _rings[key].receive(slot, token, shape, labels)
    except Exception:
        # An exception raised while unpickling would kill the loader's pin-memory thread; torch
        # re-raises a wrapped one in the training loop, as it does a worker's.
        return ExceptionWrapper(where="in the main process, receiving a batch from a DataLoader worker")
