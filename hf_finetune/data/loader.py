"""DataLoader that fetches whole batches, and the seeding that keeps augmentation honest.

The DataLoader's ``batch_sampler`` yields lists of indices; the dataset is
wrapped so torch's fetcher hands each whole list to ``dataset[list_of_indices]``
once, the dataset's batched transform builds the batch tensor, and that tensor
IS the batch (no split into samples and re-stacking; see DESIGN.md). With
workers, the batch's pixels travel in reused shared-memory slots (ring.BatchRing).
accelerate shards a batch_sampler per process and skips into it on resume.

Randomness of the pipeline:
- in DataLoader workers it draws from the worker's global torch RNG. torch seeds
  it per worker from a base seed drawn from the loader's generator at every
  epoch; our worker_init_fn mixes in the process rank so DDP ranks differ too.
- in the main process (num_workers=0) it draws from the loader's generator, which
  the batch sampler re-seeds at every epoch from (seed, epoch, rank).
Both are reproducible for a given seed and differ per epoch, worker and rank.
WholeBatches hands the generator (main process) or the shared slot (workers) to the
dataset's BatchTransform with each batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from .ring import BatchRing
from ..devices import process_rank
from .runtime import mix_seed
from .transforms import BatchTransform

logger = logging.getLogger("hf_finetune")


class EpochSeededBatchSampler(BatchSampler):
    """A BatchSampler that re-seeds `generator`, the main-process pipeline RNG, at each epoch.

    drop_single: drop a final batch of one image. BatchNorm cannot normalise a single
    image whose feature map is 1x1 (small inputs) and would stop training after a whole
    epoch of work; one image less per epoch changes nothing else.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, seed: int = 0, drop_single: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(sampler, batch_size, drop_last)
        self.seed = seed
        self.generator = generator
        self.drop_single = drop_single and batch_size > 1 and not drop_last
        self._epochs_started = 0

    def _single_at_end(self):
        return self.drop_single and len(self.sampler) % self.batch_size == 1

    def __len__(self):
        return super().__len__() - self._single_at_end()

    def __iter__(self):
        # Trainer/accelerate call set_epoch on the sampler they use; fall back to our own count.
        epoch = getattr(self.sampler, "epoch", None)
        epoch = self._epochs_started if epoch is None else epoch
        self._epochs_started += 1
        if self.generator is not None:
            self.generator.manual_seed(mix_seed(self.seed, epoch, process_rank(), 0x5EED))
        if self._single_at_end() and self._epochs_started == 1:
            logger.warning("the last training batch of each epoch holds a single image, which "
                           "BatchNorm cannot normalise; it is dropped")
        batches = super().__iter__()
        return itertools.islice(batches, len(self)) if self._single_at_end() else batches


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: make each (rank, worker, epoch) stream distinct and reproducible.

    torch.initial_seed() here is base_seed + worker_id, base_seed being drawn from
    the loader's generator each epoch (once, for persistent workers).
    """
    seed = mix_seed(torch.initial_seed(), process_rank())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def return_batch(batch):
    """collate_fn: the transform already built the batch."""
    return batch


class WholeBatches(torch.utils.data.Dataset):
    """Hands the DataLoader's list of indices to the dataset's transform in one call.

    torch's fetcher calls ``__getitems__(indices)`` when a dataset has it; ``datasets``
    would split the batch it built into per-sample dicts there, and collate would stack
    them again. Here the rows are read without the split's transform and the transform is
    called with what it needs besides them: in the process that made the loader, the
    epoch's `generator`; in its workers (which draw from their own global RNG), a slot of
    `ring` to write the batch's pixels into. The batch it builds is returned as it is.
    """

    def __init__(self, dataset, ring: BatchRing | None = None, generator: torch.Generator | None = None):
        # set_transform is the public way build_datasets attaches the pipeline; Dataset.format reads it back.
        self.transform = dataset.format["format_kwargs"].get("transform")
        if not isinstance(self.transform, BatchTransform):
            raise TypeError("build_dataloader takes a split of build_datasets (its transform is a BatchTransform)")
        self.rows = dataset.with_format(None, columns=dataset.format["columns"])
        self.ring = ring
        self.generator = generator
        self.owner = os.getpid()

    def __getstate__(self):
        # Workers (and copies) draw from their own global RNG: the generator stays here.
        return {**self.__dict__, "generator": None}

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, indices):
        rows = self.rows[list(indices)]
        if self.owner == os.getpid():
            return self.transform(rows, self.generator)
        if self.ring is None:
            return self.transform(rows)
        try:
            return self.ring.send(self.transform(rows, lend=self.ring.lend))
        finally:
            self.ring.give_back()  # the slot lent for a batch that failed or went another way

    def __getitem__(self, index):
        return self.__getitems__([index])


def build_dataloader(dataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                     num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                     prefetch_factor: int | None = None, seed: int = 0, drop_single: bool = False,
                     shared_slots: bool = True) -> DataLoader:
    """A torch DataLoader over ``dataset`` (built by build_datasets) yielding
    {"pixel_values": uint8 [B,3,H,W], "labels": int64 [B]}.

    ``batch_sampler`` is a BatchSampler over a RandomSampler (generator seeded by
    ``seed``) when shuffling, else over a SequentialSampler. With workers, batches
    travel in reused shared-memory slots (ring.BatchRing); shared_slots=False sends
    them torch's usual way. Arguments are checked by the config
    (hf_finetune.config.DataloaderCfg).
    """
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(mix_seed(seed, 0x5A3B1E)))
    else:
        sampler = SequentialSampler(dataset)
    generator = torch.Generator()  # the pipeline's, in this process; re-seeded at every epoch
    batches = EpochSeededBatchSampler(sampler, batch_size, drop_last, seed=seed, drop_single=drop_single,
                                      generator=generator)
    workers = num_workers > 0
    prefetch_factor = (prefetch_factor or 2) if workers else None
    ring = BatchRing.for_loader(batch_size, num_workers, prefetch_factor) if workers and shared_slots else None
    # A plain batch_sampler (not a BatchSampler passed as `sampler`): accelerate shards it per
    # process and skips into it on resume on every number of processes.
    return DataLoader(
        WholeBatches(dataset, ring, generator),
        batch_sampler=batches,
        collate_fn=return_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=bool(persistent_workers) and workers,
        prefetch_factor=prefetch_factor,
        worker_init_fn=seed_worker if workers else None,
        generator=torch.Generator().manual_seed(mix_seed(seed, 0x10ADE5)),
    )
