"""Where a split's images come from: a local copy, the Hub, or synthetic data.

Every source ends as a ``datasets.Dataset`` with an ``Image`` column and a label
column. Local CIFAR copies (tarball, extracted batches folder) are converted once
into an Arrow cache under the datasets cache directory, keyed by the source files'
path, size and mtime, and memory-mapped after that. A ``save_to_disk`` directory
already is Arrow and is used in place.

The converted cache stores each image as binary PPM inside the ``Image``
feature: lossless, readable by PIL like any image, and decoding it is a copy
(PNG decoding costs more than the whole rest of the pipeline at 32 px).

An image folder is indexed, not copied: the cache holds each file's absolute path
(an ``Image`` value with no bytes) and its class, and the batch transform reads the
file when a batch needs it, as ``load_dataset("imagefolder")``, timm and mmpretrain do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import datasets
from datasets.arrow_writer import ArrowWriter

from ..errors import DataError
from . import cifar, imagefolder
from .decode import decode_image, encode_ppm
from .synthetic import synthetic_dataset

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the converted layout or pixels change (2: EXIF orientation applied; 3: folders indexed)
HUB_PROBE_TIMEOUT_S = 5.0
_SPLITS_FILE = "splits.json"
ACCEPTED_FORMATS = (
    f"{cifar.TARBALL_NAME}, the extracted {cifar.BATCHES_DIR}/ folder, a datasets save_to_disk directory, "
    "or an image folder <root>/<class>/<image>.jpg (or <root>/<split>/<class>/<image>.jpg, split: train, val, "
    "validation, test)"
)

# Cache directories this process converted (tests read it to tell a conversion from a reuse).
CONVERSIONS: list[str] = []


# ---------------------------------------------------------------- cache location

def datasets_cache_dir() -> Path:
    """The datasets cache directory, honouring HF_DATASETS_CACHE / HF_HOME set after import."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    return Path(datasets.config.HF_DATASETS_CACHE).expanduser()


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _cached(kind: str, fingerprint: str, write, done: str) -> Path:
    """The cache folder for this fingerprint, written first by write(folder) if absent.

    Written to a private temporary folder and renamed into place, so concurrent
    processes (DDP ranks) never read a half-written cache; the last rename loses
    and its copy is discarded. `done` names the file whose presence marks it complete.
    """
    root = datasets_cache_dir() / "hf_finetune"
    target = root / f"{kind}-{fingerprint}"
    if not (target / done).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        logger.info("writing %s into the cache %s (once; reused while the source is unchanged)", kind, target)
        try:
            tmp.mkdir()
            write(tmp)
            try:
                os.rename(tmp, target)
                CONVERSIONS.append(str(target))
            except OSError:
                if not (target / done).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cached_conversion(kind: str, fingerprint: str, convert) -> datasets.DatasetDict:
    """Load the converted DatasetDict for this fingerprint, converting first if absent."""
    target = _cached(kind, fingerprint, lambda tmp: convert().save_to_disk(str(tmp)), "dataset_dict.json")
    return datasets.load_from_disk(str(target))


def _cached_arrow(kind: str, fingerprint: str, write) -> datasets.DatasetDict:
    """Like _cached_conversion for a writer that streams: write(folder) writes <split>.arrow files
    and returns their split names; nothing is held in memory and nothing is copied again."""
    def write_all(tmp: Path):
        (tmp / _SPLITS_FILE).write_text(json.dumps(write(tmp)))

    target = _cached(kind, fingerprint, write_all, _SPLITS_FILE)
    splits = json.loads((target / _SPLITS_FILE).read_text())
    return datasets.DatasetDict({split: datasets.Dataset.from_file(str(target / f"{split}.arrow"))
                                 for split in splits})


# ---------------------------------------------------------------- local copies

def find_local_copy(root: Path) -> tuple[str, Path] | None:
    """(format, path) of the local copy at root, None if root does not exist.

    Raises DataError when root exists but holds none of the known formats.
    Preference when several are present: the ones that need no or the cheapest conversion first.
    """
    if not root.exists():
        return None
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "tarball", root
        raise DataError(f"data_root {root} is a file but not a CIFAR-10 tarball; accepted: {ACCEPTED_FORMATS}")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return "save_to_disk", root
    for folder in (root / cifar.BATCHES_DIR, root):
        if any((folder / name).is_file() for name in cifar.TRAIN_FILES + cifar.TEST_FILES):
            return "batches", folder
    if (root / cifar.TARBALL_NAME).is_file():
        return "tarball", root / cifar.TARBALL_NAME
    if imagefolder.looks_like_image_folder(root):
        return "imagefolder", root
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    found = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    raise DataError(f"data_root {root} holds no dataset in a known format (found: {found or 'nothing, it is empty'}). "
                    f"Accepted: {ACCEPTED_FORMATS}")


def _arrays_to_dataset_dict(splits: dict, label_names: list[str]) -> datasets.DatasetDict:
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=label_names)})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"img": [{"bytes": encode_ppm(a), "path": None} for a in images], "label": labels.tolist()},
            features=features)
        for split, (images, labels) in splits.items()
    })


def _convert_batches(kind: str, path: Path) -> datasets.DatasetDict:
    if kind == "tarball":
        fingerprint = _fingerprint(kind, _file_stamp(path.resolve()))
        return _cached_conversion("cifar10-tarball", fingerprint,
                                  lambda: _arrays_to_dataset_dict(*cifar.read_tarball(path)))
    names = cifar.TRAIN_FILES + cifar.TEST_FILES + (cifar.META_FILE,)
    stamps = [_file_stamp(path.resolve() / n) for n in names if (path / n).is_file()]
    return _cached_conversion("cifar10-batches", _fingerprint(kind, stamps),
                              lambda: _arrays_to_dataset_dict(*cifar.read_batches_folder(path)))


def _index_imagefolder(root: Path) -> datasets.DatasetDict:
    """The folder's index ({split: Dataset of img paths, label, key}; "all" without split folders),
    rebuilt when a file's name, size or mtime changed, one was added or removed."""
    return _cached_arrow("imagefolder", imagefolder.fingerprint(root, CACHE_VERSION),
                         lambda tmp: imagefolder.write_index(root, tmp))


def _reencode_split(ds: datasets.Dataset, image_column: str, label_column: str, path: Path) -> None:
    """path: the same rows with every decodable image stored as PPM (undecodable ones keep their
    bytes, so on_corrupt still sees them), written a batch at a time."""
    ds = ds.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image(decode=False))
    features = datasets.Features({"img": datasets.Image(), "label": ds.features[label_column]})
    writer = ArrowWriter(features=features, path=str(path))
    for batch in ds.iter(batch_size=1000):
        images = []
        for item in batch[image_column]:
            try:
                images.append({"bytes": encode_ppm(decode_image(item)), "path": None})
            except Exception:
                images.append(item)
        writer.write_batch({"img": images, "label": batch[label_column]})
    writer.finalize()


def _imagefolder_splits(index: datasets.DatasetDict, description: str,
                        val_split: float | None) -> dict[str, tuple[datasets.Dataset, str]]:
    """{split: (Dataset, description)} of an indexed image folder.

    With val_split (the training split reads this folder) a folder of class folders only, or with a
    train folder only, is split here, stratified by class (imagefolder.stratified_split): "train",
    and the held-out "val", which also serves "test"; "all" stays every image of a folder without
    split folders.
    """
    parts = {name: (ds.remove_columns("key"), f"{description}, split {name!r}") for name, ds in index.items()}
    if imagefolder.WHOLE in index:
        whole = index[imagefolder.WHOLE]
        parts[imagefolder.WHOLE] = (whole.remove_columns("key"),
                                    f"{description} (all {len(whole)} images; no split folders)")
        base = imagefolder.WHOLE
    else:
        base = "train" if list(index) == ["train"] else None  # nothing held out yet
    if base is None or val_split is None:
        return parts
    ds = index[base].remove_columns("key")
    train, val, singles = imagefolder.stratified_split(index[base], val_split)
    names = ds.features["label"].names
    if singles:
        shown = ", ".join(repr(names[i]) for i in singles[:10]) + (", ..." if len(singles) > 10 else "")
        logger.warning("%s: %d class(es) have a single image (%s); it is used for training only, so validation "
                       "has none of them", description, len(singles), shown)
    where = f"{description}{'' if base == imagefolder.WHOLE else ', split folder ' + repr(base)}"
    parts["train"] = (ds.select(train), f"{where}, split 'train' ({len(train)} of its {len(ds)} images; "
                                        f"val_split {val_split} holds out the rest, stratified by class)")
    if val_split > 0:
        held = (ds.select(val), f"{where}, split 'val' (the {len(val)} of its {len(ds)} images held out by "
                                f"val_split {val_split}, stratified by class; never trained on)")
    else:
        held = (ds, f"{where}, split 'val' is every training image")
    parts["val"] = parts["test"] = held
    logger.info("%s: %d images for training, %d held out for validation (val_split %s, stratified by class)",
                where, len(train), len(val), val_split)
    return parts


REENCODE_MAX_PIXELS = 64 * 64


def _small_images(loaded: datasets.DatasetDict, image_column: str) -> bool:
    """Whether the first image of the first non-empty split is CIFAR-sized."""
    for ds in loaded.values():
        if len(ds):
            item = ds.cast_column(image_column, datasets.Image(decode=False))[0][image_column]
            try:
                height, width, _ = decode_image(item).shape
            except Exception:
                return False
            return height * width <= REENCODE_MAX_PIXELS
    return False


def _convert_hub_download(loaded: datasets.DatasetDict, identity: tuple, image_column: str, label_column: str):
    """The Hub download re-encoded into our PPM cache (small images only: CIFAR10 type).

    PNG decoding costs more than the whole rest of the pipeline at 32 px; paying
    it once here instead of every epoch is what keeps the loader fast.
    """
    for ds in loaded.values():
        if image_column not in ds.features or label_column not in ds.features or not isinstance(
                ds.features[image_column], datasets.Image):
            return loaded, False  # leave it: the column check names the problem
    if not _small_images(loaded, image_column):
        return loaded, False  # raw pixels of large images would bloat the cache many times over
    stamps = {split: ([_file_stamp(Path(f["filename"])) for f in ds.cache_files] or ds._fingerprint)
              for split, ds in loaded.items()}
    fingerprint = _fingerprint("hub", identity, image_column, label_column, stamps)

    def write(tmp: Path) -> list[str]:
        for split, ds in loaded.items():
            _reencode_split(ds, image_column, label_column, tmp / f"{split}.arrow")
        return list(loaded)

    return _cached_arrow("hub-reencoded", fingerprint, write), True


def _load_save_to_disk(path: Path):
    # save_to_disk writes no data file for a split of 0 rows, and load_from_disk then fails
    # with an IndexError: name the empty split instead.
    for state in [path / "state.json"] + sorted(path.glob("*/state.json")):
        try:
            empty = not json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError):
            continue
        if empty:
            split = f"split {state.parent.name!r} of " if state.parent != path else ""
            raise DataError(f"{split}the save_to_disk directory {path} is empty (0 rows)")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load the save_to_disk directory {path}: {exc}") from exc


# ---------------------------------------------------------------- the Hub

def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the Hub endpoint, bounded in time (DNS included).

    Without this, an unreachable Hub costs minutes of HTTP retries before
    datasets gives up.
    """
    url = urlparse(_hub_endpoint())
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")  # behind a proxy, reach the proxy
    port = url.port or (443 if url.scheme == "https" else 80)
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


@contextmanager
def _forced_offline():
    """Make datasets / huggingface_hub use only their local cache (no network calls)."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_hub_dataset(hub_id: str, config_name, revision, no_copy_hint: str) -> datasets.DatasetDict:
    """load_dataset(hub_id, config_name, revision) failing fast when the Hub is out of reach.

    Offline (env vars set, or the endpoint does not answer): only the local
    datasets cache is tried, and a miss is a DataError carrying no_copy_hint.
    """
    offline_reason = None
    if datasets.config.HF_HUB_OFFLINE:  # HF_DATASETS_OFFLINE, else huggingface_hub's HF_HUB_OFFLINE
        offline_reason = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    elif not hub_reachable():
        offline_reason = f"the Hub ({_hub_endpoint()}) cannot be reached"
    where = f"'{hub_id}'" + (f" (config {config_name!r})" if config_name else "") + (
        f" at revision {revision!r}" if revision else "")
    try:
        if offline_reason:
            with _forced_offline():
                loaded = datasets.load_dataset(hub_id, config_name, revision=revision,
                                               cache_dir=str(datasets_cache_dir()))
        else:
            loaded = datasets.load_dataset(hub_id, config_name, revision=revision,
                                           cache_dir=str(datasets_cache_dir()))
    except Exception as exc:
        if offline_reason or isinstance(exc, ConnectionError):
            raise DataError(f"cannot load dataset {where}: {offline_reason or exc}, and it is not in the local "
                            f"datasets cache ({datasets_cache_dir()}). {no_copy_hint}") from exc
        raise DataError(f"cannot load dataset {where} from the Hub: {exc}") from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


# ---------------------------------------------------------------- per-build loader

class SourceLoader:
    """Loads each distinct source once per build, so splits that share one share its Arrow data."""

    def __init__(self):
        self._loaded: dict[tuple, object] = {}

    def _once(self, key: tuple, load):
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def local(self, root: Path, split: str, key: str, val_split: float | None = None,
              whole: bool = True) -> tuple[datasets.Dataset, str, bool] | None:
        """(split, description, converted by us) from the local copy at root; None if root does not exist.

        val_split: set when the training split comes from root too; an image folder with no val images
        is then split into train and a held-out val (also serving test when the folder has none). None:
        an image folder without split folders is a separate folder, used whole for any split, unless
        `whole` is false (the training split streams all of it).
        """
        found = find_local_copy(root)
        if found is None:
            return None
        kind, path = found
        if kind == "save_to_disk":
            loaded = self._once(("save_to_disk", str(path.resolve())), lambda: _load_save_to_disk(path))
            description = f"save_to_disk directory {path}"
            if isinstance(loaded, datasets.Dataset):
                return loaded, description, False  # a single split: used for whichever split is asked
        elif kind == "imagefolder":
            index = self._once(("imagefolder", str(path.resolve())), lambda: _index_imagefolder(path))
            parts = self._once(("imagefolder-splits", str(path.resolve()), val_split),
                               lambda: _imagefolder_splits(index, f"image folder {path}", val_split))
            name = "val" if split == "validation" else split
            if name not in parts and imagefolder.WHOLE in parts and val_split is None:
                if not whole:
                    raise DataError(f"{key}: image folder {path} has no {split!r} split folder, and the training "
                                    f"split streams all of its images (a stream is not split), so {key} would "
                                    f"evaluate on them; put the images in train/ and val/ folders, or give "
                                    f"{key}.data_root its own folder")
                name = imagefolder.WHOLE  # a separate folder of class folders: all of it, whatever the split name
            if name not in parts:
                raise DataError(f"split {split!r} not found in image folder {path}; available: {', '.join(parts)} "
                                f"(set {key}.split; split folders are named train, val, validation or test)")
            ds, description = parts[name]
            if val_split == 0 and name in ("val", "test") and name not in index:
                logger.warning("%s: val_split is 0, so %s: its accuracy measures fit, not generalisation",
                               key, description)
            return ds, description, True
        else:
            loaded = self._once((kind, str(path.resolve())), lambda: _convert_batches(kind, path))
            description = f"CIFAR-10 {'tarball' if kind == 'tarball' else 'batches folder'} {path}"
        if split not in loaded:
            raise DataError(f"split {split!r} not found in {description}; available: {', '.join(loaded)} "
                            f"(set {key}.split)")
        return loaded[split], f"{description}, split {split!r}", kind != "save_to_disk"

    def hub(self, hub_id: str, config_name, revision, split: str, key: str, hint: str, *,
            reencode_columns: tuple[str, str] | None = None) -> tuple[datasets.Dataset, str, bool]:
        """(split, description, converted by us). reencode_columns=(image, label) re-encodes
        the download into the PPM cache, columns renamed img/label."""
        identity = (hub_id, config_name, revision)
        loaded = self._once(("hub", *identity), lambda: load_hub_dataset(hub_id, config_name, revision, hint))
        converted = False
        if reencode_columns:
            loaded, converted = self._once(("hub-reencoded", *identity, *reencode_columns),
                                           lambda: _convert_hub_download(loaded, identity, *reencode_columns))
        description = f"Hub dataset {hub_id!r}" + (f" ({config_name})" if config_name else "")
        if split not in loaded:
            raise DataError(f"split {split!r} not found in {description}; available: {', '.join(loaded)} "
                            f"(set {key}.split)")
        return loaded[split], f"{description}, split {split!r}", converted

    def synthetic_multilabel(self, num_samples: int, seed: int, split: str) -> tuple[datasets.Dataset, str]:
        from .synthetic_multilabel import synthetic_multilabel_dataset

        return (synthetic_multilabel_dataset(num_samples, seed, split),
                f"synthetic multi-label shapes (num_samples {num_samples}, seed {seed}, split {split!r})")

    def synthetic(self, num_samples: int, seed: int, split: str) -> tuple[datasets.Dataset, str]:
        return (synthetic_dataset(num_samples, seed, split),
                f"synthetic CIFAR-10 (num_samples {num_samples}, seed {seed}, split {split!r})")
