"""Datasets for image classification: sources, batched uint8 pipeline, batch-fetching DataLoader.

    dd = build_datasets(cfg)                          # DatasetDict train/val/test, transforms set
    dd["train"][[0, 5, 9]]                            # {"pixel_values": uint8 [3,3,H,W], "labels": int64 [3]}
    names = label_names(dd)                           # class names from the ClassLabel feature
    loader = build_dataloader(dd["train"], 128, shuffle=True, seed=0, num_workers=2)
    # a streamed split (WebDataset shards, "streaming": true) is a StreamingSplit:
    loader = build_stream_loader(dd["train"], 128, epoch_batches=100, shuffle=True, seed=0, num_workers=2)
"""

from .build import build_datasets, label_names
from .loader import build_dataloader, seed_worker
from .runtime import BatchDataError
from .sources import ACCEPTED_FORMATS
from .streaming import StreamingSplit, build_stream_loader
from .synthetic import CIFAR10_CLASSES, synthetic_arrays, synthetic_dataset
from .transforms import PIPELINE_STEPS, BatchTransform, build_pipeline

__all__ = [
    "ACCEPTED_FORMATS", "BatchDataError", "BatchTransform", "CIFAR10_CLASSES", "PIPELINE_STEPS", "StreamingSplit",
    "build_dataloader", "build_stream_loader", "build_datasets", "build_pipeline", "label_names", "seed_worker", "synthetic_arrays",
    "synthetic_dataset",
]
