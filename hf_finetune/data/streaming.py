"""Streamed splits: data bigger than one disk, or shared by many machines.

Two sources, both read as ``datasets``' IterableDataset (nothing is downloaded, converted or
cached up front):
- a Hub dataset with ``"streaming": true`` (``load_dataset(..., streaming=True)``), or a local
  Hub-format folder (parquet, imagefolder, ... files) in data_root;
- WebDataset tar shards (type ``WebDataset``): a folder of .tar files, a glob, or a list of paths or
  http(s) URLs, read by datasets' ``webdataset`` loader (a sample is the members sharing a key:
  ``s0001.jpg`` + ``s0001.cls``).

Training (build_stream_loader with epoch_batches): the stream is shuffled with a buffer (datasets'
``shuffle``: the shard order and a buffer of images, both re-seeded every epoch through
``set_epoch``), each rank reads its own shards (``datasets.distributed.split_dataset_by_node``) and
the DataLoader's workers split a rank's shards again (datasets does this in each worker). An epoch
is ``num_samples`` images (the recipe's, else the split's ``num_examples`` in the dataset's info),
rounded up to whole updates; the stream repeats, so a rank whose shards hold fewer images wraps
around instead of stopping early (every rank must run the same number of updates). Each batch
goes through the split's BatchTransform whole, as in the indexed path: {"pixel_values": uint8,
"labels"}.

Evaluation (no epoch_batches): the split is read once, in order; accelerate then dispatches its
batches from the main process to the ranks (its rule for iterable datasets), so every image is
counted once.

Resume: an epoch's stream and augmentation are fixed by (seed, epoch, rank, worker, batch), so the
Trainer's own skip of the batches already trained on (accelerate's skip_first_batches) lands exactly
where the run stopped; the batches it skips are read but not decoded (RESUME_NOTE).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import datasets
import datasets.distributed
import torch
from accelerate.data_loader import DataLoaderShard
from torch.utils.data import DataLoader

from ..errors import DataError
from .labels import check_columns, label_kind_fix, label_layout
from .loader import return_batch, seed_worker
from .ring import BatchRing
from .runtime import BatchDataError, mix_seed
from .sources import _forced_offline, _hub_endpoint, hub_reachable
from .transforms import BatchTransform

logger = logging.getLogger("hf_finetune")

URL_PROBE_TIMEOUT_S = 5.0
RESUME_NOTE = ("resuming a streamed training split: the images of this epoch already trained on are read again "
               "(not decoded) and skipped, so training continues with exactly the batches and augmentation of an "
               "uninterrupted run; datasets' IterableDataset.state_dict, which would not read them, is not used: it "
               "drops the shuffle buffer's images, and with loader workers it needs torchdata's StatefulDataLoader")
# What a skipped batch is in its place: the Trainer drops it unseen (accelerate's skip_first_batches).
SKIPPED = {"skipped_on_resume": True}


class StreamingSplit:
    """A streamed split as build_datasets returns it.

    stream: datasets.IterableDataset with the `columns` (image, label): Image(decode=False) and int;
    transform: the split's BatchTransform; names: class names; num_samples: images per epoch, or None
    where neither the recipe nor the dataset's info says (only training needs it); key: the recipe
    section, for messages; features: as a Dataset's, the label a ClassLabel (build.label_names)."""

    def __init__(self, stream, transform: BatchTransform, names: list[str], num_samples: int | None, *,
                 source: str, key: str, shuffle_buffer: int, columns: tuple[str, str]):
        self.stream = stream
        self.transform = transform
        self.names = names
        self.num_samples = num_samples
        self.source = source
        self.key = key
        self.shuffle_buffer = shuffle_buffer
        self.columns = columns
        self.features = datasets.Features({columns[0]: datasets.Image(decode=False),
                                           columns[1]: datasets.ClassLabel(names=names)})

    def __len__(self):
        """Images per epoch."""
        if self.num_samples is None:
            raise DataError(f"{self.source}: the number of images per epoch is not known (the dataset's info "
                            f"declares none and a stream is not counted up front); set {self.key}.num_samples")
        return self.num_samples


def streamed_split(cfg, key: str, split: str, model, steps: list, columns: tuple[str, str]) -> StreamingSplit:
    """The split the dataset section `cfg` (at recipe key `key`) names, as a stream; model: the
    recipe's model section; columns: the (image, label) names every split uses after building."""
    if model.multi_label:
        raise DataError(f"{key}: a streamed split needs a single-label model; {label_kind_fix(model, False)}")
    num_classes, classes_key = model.num_classes, model.key("num_classes")
    if cfg.type == "WebDataset":
        stream, names, num_samples, source = _webdataset(cfg, key, split, num_classes, classes_key, columns)
    else:
        stream, names, num_samples, source = _hub_stream(cfg, key, split, num_classes, classes_key, columns)
    if cfg.indices is not None:  # an int (the config refuses lists): the stream's first N images
        stream = stream.take(cfg.indices)
        num_samples = min(num_samples or cfg.indices, cfg.indices)
    transform = BatchTransform(steps, image_column=columns[0], label_column=columns[1], source=source,
                               on_corrupt=cfg.on_corrupt, class_names=names)
    return StreamingSplit(stream, transform, names, cfg.num_samples or num_samples, source=source, key=key,
                          shuffle_buffer=cfg.shuffle_buffer, columns=columns)


# ---------------------------------------------------------------- WebDataset shards

def _shard_files(cfg, key: str, split: str) -> tuple[list[str], str]:
    """(the shards' paths or URLs, the recipe key that named them)."""
    where = f"{key}.shards" if cfg.shards is not None else f"{key}.data_root"
    given = cfg.shards if cfg.shards is not None else cfg.data_root
    files = []
    for item in given if isinstance(given, list) else [given]:
        if item.startswith(("http://", "https://")):
            files.append(item)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            folder = path / split if (path / split).is_dir() else path
            found = sorted(str(p) for p in folder.glob("*.tar"))
        else:
            found = sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
        if not found:
            raise DataError(f"{where}: no .tar shards found at {item} (accepted: a folder of .tar files, a glob "
                            f"such as shards/train-*.tar, or a list of paths / http(s) URLs)")
        files += found
    return files, where


def _probe_url(url: str, where: str) -> None:
    """Fail fast, in one line, when a shard server does not answer (datasets would retry for minutes)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=URL_PROBE_TIMEOUT_S) as response:
            response.read(1)
    except urllib.error.HTTPError as exc:
        raise DataError(f"{where}: {url} answers HTTP {exc.code} ({exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{where}: cannot reach {url}: {reason}") from None


def _class_names(cfg, key: str, source: str, num_classes: int | None, classes_key: str) -> list[str]:
    """Class names from the `classes` key (a list or a file), else '0'.. for num_classes (recipe key classes_key)."""
    classes = cfg.classes
    if isinstance(classes, str):
        path = Path(classes).expanduser()
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise DataError(f"{key}.classes: cannot read {path}: {exc.strerror or exc}") from None
        if not names:
            raise DataError(f"{key}.classes: {path} holds no class names (one per line)")
    elif classes:
        names = list(classes)
    elif num_classes:
        names = [str(i) for i in range(num_classes)]
    else:
        raise DataError(f"{source}: the class names must be known up front (a stream is not scanned): set "
                        f"{key}.classes (a list, or a file with one name per line) or {classes_key}")
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{source} has {len(names)} classes ({key}.classes) but {classes_key} is "
                        f"{num_classes}; set {classes_key}={len(names)}")
    return names


def _webdataset(cfg, key, split, num_classes, classes_key, columns):
    files, where = _shard_files(cfg, key, split)
    urls = [f for f in files if f.startswith(("http://", "https://"))]
    if urls:
        _probe_url(urls[0], where)
    source = (f"WebDataset shards {files[0]}" if len(files) == 1 else
              f"WebDataset shards {files[0]} ... ({len(files)} shards)")
    names = _class_names(cfg, key, source, num_classes, classes_key)
    image_keys = cfg.image_column if isinstance(cfg.image_column, list) else [cfg.image_column]
    label_key = cfg.label_column
    # Declared features: members of any listed extension (samples may mix jpg and png), the
    # label as an int, and the shard each sample comes from, for error messages.
    features = datasets.Features({**{k: datasets.Image(decode=False) for k in image_keys},
                                  label_key: datasets.Value("int64"), "__key__": datasets.Value("string"),
                                  "__url__": datasets.Value("string")})
    try:
        stream = datasets.load_dataset("webdataset", data_files={split: files}, split=split, streaming=True,
                                       features=features)
    except Exception as exc:
        raise DataError(f"{where}: cannot read the shards: {exc}") from None

    def to_columns(sample):
        image = next((sample[k] for k in image_keys if sample[k] is not None), None)
        if image is not None:
            image = {"bytes": image["bytes"], "path": f"{sample['__url__']}/{image['path']}"}
        return {columns[0]: image, columns[1]: sample[label_key]}

    stream = stream.map(to_columns, remove_columns=list(features), features=datasets.Features(
        {columns[0]: datasets.Image(decode=False), columns[1]: datasets.Value("int64")}))
    return stream, names, None, source


# ---------------------------------------------------------------- Hub datasets

def _hub_stream(cfg, key, split, num_classes, classes_key, columns):
    root = Path(cfg.data_root).expanduser() if cfg.data_root else None
    where = f"'{cfg.hub_id}'" + (f" (config {cfg.config_name!r})" if cfg.config_name else "")
    if root is not None and root.exists():
        path, source = str(root), f"dataset folder {root} (streamed), split {split!r}"
    elif cfg.hub_id and (cfg.download or root is None):
        path, source = cfg.hub_id, f"Hub dataset {where} (streamed), split {split!r}"
        if datasets.config.HF_HUB_OFFLINE or not hub_reachable():
            raise DataError(f"cannot stream {where}: the Hub ({_hub_endpoint()}) cannot be reached or offline mode "
                            f"is on; streaming reads the Hub while training. Set {key}.streaming to false to use "
                            f"a local copy, or point {key}.data_root at a Hub-format folder")
    else:
        raise DataError(f"{key}.data_root: {root} does not exist (a streamed split reads a Hub-format folder: "
                        f"parquet, imagefolder or webdataset files)")
    try:
        if path == cfg.hub_id:
            stream = datasets.load_dataset(path, cfg.config_name, revision=cfg.revision, split=split, streaming=True)
        else:
            with _forced_offline():  # a local folder: no Hub lookups
                stream = datasets.load_dataset(path, cfg.config_name, split=split, streaming=True)
    except Exception as exc:
        raise DataError(f"cannot stream {source}: {exc}") from None
    image_column, label_column = cfg.image_column, cfg.label_column
    features = stream.features
    if features is None:
        raise DataError(f"{source} declares no features, so its image and label columns are unknown; "
                        f"set {key}.streaming to false")
    names = check_columns(features, image_column, label_column, source, key)
    if label_layout(features[label_column], label_column) != "single_label":
        raise DataError(f"column {label_column!r} of {source} holds several classes per image; a streamed split "
                        f"needs one class per image (ClassLabel or integer). Set {key}.label_column")
    if names is None:  # plain integers
        if not num_classes:
            raise DataError(f"{source}: the labels in column {label_column!r} are integers without class names "
                            f"and a stream is not scanned; set {classes_key}")
        names = [str(i) for i in range(num_classes)]
    elif num_classes is not None and len(names) != num_classes:
        raise DataError(f"{source} has {len(names)} classes but {classes_key} is {num_classes}; "
                        f"set {classes_key}={len(names)}")
    stream = stream.select_columns([image_column, label_column])
    renames = {old: new for old, new in zip((image_column, label_column), columns) if old != new}
    stream = stream.rename_columns(renames) if renames else stream
    stream = stream.cast_column(columns[0], datasets.Image(decode=False))
    splits = stream.info.splits or {}
    num_samples = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return stream, names, num_samples, source


# ---------------------------------------------------------------- loading batches

class StreamBatches(torch.utils.data.IterableDataset):
    """The DataLoader's dataset for a streamed split: whole batches through its BatchTransform.

    epoch_batches: batches per epoch on this rank (training: the stream repeats, each epoch is cut
    to this many, and the workers take turns as torch's DataLoader does); None: the stream once
    (evaluation). Each batch's pipeline draws from a generator seeded by (seed, epoch, rank, worker,
    batch), so an epoch replays exactly. resume: (epoch, batches) the Trainer skips when resuming;
    those batches are read but not decoded. With workers and `ring`, the batch's pixels travel in
    shared slots (ring.BatchRing), as in loader.WholeBatches."""

    def __init__(self, split: StreamingSplit, batched, epoch_batches: int | None, *, seed: int, rank: int,
                 ring: BatchRing | None = None, resume: tuple[int, int] | None = None):
        self.batched = batched  # split.stream, prepared and batched by build_stream_loader
        self.transform = split.transform
        self.source = split.source
        self.num_classes = len(split.names)
        self.image_column, self.label_column = split.columns
        self.epoch_batches = epoch_batches
        self.seed = seed
        self.rank = rank
        self.ring = ring
        self.resume = resume
        self.owner = os.getpid()

    def __len__(self):
        if self.epoch_batches is None:
            raise TypeError("a streamed evaluation split has no length; it is read to its end")
        return self.epoch_batches

    def set_epoch(self, epoch: int) -> None:
        # datasets keeps the epoch in shared memory: persistent workers see it too.
        self.batched.set_epoch(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        epoch = self.batched.epoch
        rows = iter(self.batched)
        if self.epoch_batches is not None:  # this worker's turns among the epoch's batches
            rows = itertools.islice(rows, len(range(worker, self.epoch_batches, workers)))
        skip = len(range(worker, self.resume[1], workers)) if self.resume and self.resume[0] == epoch else 0
        for index in itertools.count():
            try:
                batch = next(rows)
            except StopIteration:
                return
            except (ValueError, OSError, tarfile.TarError) as exc:  # a truncated shard, a non-integer label member
                raise BatchDataError(f"cannot read {self.source}: {exc}") from exc
            if index < skip:
                yield SKIPPED  # read but not decoded: the Trainer drops it (accelerate's skip_first_batches)
                continue
            # Seeded per batch, so a batch's augmentation does not depend on the batches before it.
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, worker, index, 0x57EA))
            yield self._send(batch, generator)

    def _send(self, rows, generator):
        if self.ring is None or self.owner == os.getpid():
            return self._build(rows, generator)
        try:
            return self.ring.send(self._build(rows, generator, lend=self.ring.lend))
        finally:
            self.ring.give_back()  # the slot lent for a batch that failed or went another way

    def _build(self, rows, generator, lend=None):
        labels = rows[self.label_column]
        bad = next((i for i, label in enumerate(labels) if label is None or not 0 <= label < self.num_classes), None)
        if bad is not None:
            item = rows[self.image_column][bad]
            path = item.get("path") if isinstance(item, dict) else None
            raise BatchDataError(f"label {labels[bad]!r} of {path or 'a sample'} in {self.source} is outside "
                                 f"0..{self.num_classes - 1} (its classes)")
        return self.transform(rows, generator, lend)  # on_corrupt "skip": it leaves undecodable images out


def build_stream_loader(split: StreamingSplit, batch_size: int, *, epoch_batches: int | None = None,
                        shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                        num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                        prefetch_factor: int | None = None, shared_slots: bool = True,
                        resume: tuple[int, int] | None = None):
    """A DataLoader of whole batches over a streamed split.

    Training (epoch_batches: this rank's batches per epoch): shuffled with a buffer when `shuffle`,
    this rank's shards only, repeated, and returned as accelerate's DataLoaderShard (set_epoch
    reaches the stream; skip_first_batches works on it); accelerate.prepare would instead have the
    main process read every shard and dispatch. Evaluation: the whole split once, a plain DataLoader
    for accelerate to prepare (it dispatches batches of an iterable dataset from the main process).
    resume: (epoch, batches already trained on in it) when the Trainer resumes (see StreamBatches).
    """
    stream = split.stream
    shards = stream.num_shards
    if epoch_batches is not None:
        if shuffle:
            stream = stream.shuffle(seed=mix_seed(seed, 0x5B0F) % 2**32, buffer_size=split.shuffle_buffer)
        if world_size > 1:
            if shards % world_size == 0:
                _log(rank, f"streamed training split: each of the {world_size} ranks reads its own "
                           f"{shards // world_size} of the {shards} shards")
            else:
                _log(rank, f"streamed training split: {shards} shards do not divide among {world_size} ranks, "
                           f"so every rank reads all of them and keeps every {world_size}th batch; a shard "
                           f"count that is a multiple of {world_size} reads {world_size} times less")
            stream = datasets.distributed.split_dataset_by_node(stream, rank, world_size)
            shards = shards // world_size if shards % world_size == 0 else shards
        stream = stream.repeat(None)
        if num_workers > shards:
            _log(rank, f"{split.key.rsplit('.', 1)[0]}.num_workers: {num_workers} loader workers but each rank reads "
                       f"{shards} shard(s), and a worker reads whole shards: using {shards}")
            num_workers = shards
    batched = stream.batch(batch_size)
    workers = num_workers > 0
    prefetch_factor = (prefetch_factor or 2) if workers else None
    ring = BatchRing.for_loader(batch_size, num_workers, prefetch_factor) if workers and shared_slots else None
    kwargs = dict(batch_size=None, collate_fn=return_batch, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=bool(persistent_workers) and workers, prefetch_factor=prefetch_factor,
                  worker_init_fn=seed_worker if workers else None)
    dataset = StreamBatches(split, batched, epoch_batches, seed=seed, rank=rank, ring=ring, resume=resume)
    return DataLoader(dataset, **kwargs) if epoch_batches is None else DataLoaderShard(dataset, **kwargs)


def _log(rank: int, message: str) -> None:
    if rank == 0:
        logger.info(message)
