"""Data sources: every local CIFAR format, the conversion cache, the Hub path, bad input."""

import hashlib
import io
import os
import socket
import time
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cifar_writers import (write_cifar10_batches, write_cifar10_tarball, write_imagefolder,
                           write_save_to_disk)
from hf_finetune.config import apply_overrides, config_from_dict
from hf_finetune.data import CIFAR10_CLASSES, build_dataloader, build_datasets, label_names, synthetic_arrays
from hf_finetune.data import sources
from hf_finetune.data.synthetic import encode_png
from hf_finetune.errors import DataError, RecipeError

pytestmark = pytest.mark.floors  # every test here also runs at the declared floors (.ci/floors)

N_TRAIN, N_TEST = 30, 10
PACK = [{"type": "PackClsInputs"}]


def recipe(train=None, val=None, test=None, **top):
    """The typed config of a recipe with these dataset sections (and a model to match)."""
    num_classes = top.get("data_preprocessor", {}).get("num_classes", 10)
    topk = [1, 5] if num_classes >= 5 else [1]
    out = {"model": {"head": {"num_classes": num_classes, "topk": topk}}, **top}
    if train is not None:
        out["optim_wrapper"] = {"optimizer": {"type": "SGD", "lr": 0.1}}
    for name, cfg in (("train", train), ("val", val), ("test", test)):
        if cfg is not None:
            out[f"{name}_dataloader"] = {"batch_size": 4, "dataset": cfg}
    return config_from_dict(out)


def cifar(root, split="train", pipeline=PACK, **kw):
    return {"type": "CIFAR10", "data_root": str(root), "split": split, "pipeline": pipeline, **kw}


def images_of(ds):
    """All images (uint8 [N,32,32,3]) and labels of a built split, in dataset order."""
    batch = ds[list(range(len(ds)))]
    return batch["pixel_values"].permute(0, 2, 3, 1).numpy(), batch["labels"].numpy()


def as_multiset(images, labels):
    return sorted((int(lab), hashlib.sha1(img.tobytes()).hexdigest()) for img, lab in zip(images, labels))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The same synthetic CIFAR data in every local format, plus a module-wide cache dir."""
    root = tmp_path_factory.mktemp("copies")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(root / "cache"))
        paths = {
            "tarball": write_cifar10_tarball(root / "tarball", N_TRAIN, N_TEST, seed=0).parent,
            "tarball_file": write_cifar10_tarball(root / "tarball_file", N_TRAIN, N_TEST, seed=0),
            "batches": write_cifar10_batches(root / "batches", N_TRAIN, N_TEST, seed=0).parent,
            "batches_folder": write_cifar10_batches(root / "batches_folder", N_TRAIN, N_TEST, seed=0),
            "imagefolder": write_imagefolder(root / "imagefolder", N_TRAIN, N_TEST, seed=0),
            "save_to_disk": write_save_to_disk(root / "save_to_disk", N_TRAIN, N_TEST, seed=0),
        }
        yield paths


def test_every_local_source_yields_the_same_images_and_labels(copies):
    truth = {split: synthetic_arrays(n, 0, split) for split, n in (("train", N_TRAIN), ("test", N_TEST))}
    for name, root in copies.items():
        dd = build_datasets(recipe(train=cifar(root), test=cifar(root, "test")))
        assert label_names(dd) == list(CIFAR10_CLASSES), name
        for split, key in (("train", "train"), ("test", "test")):
            images, labels = images_of(dd[key])
            if name == "imagefolder":  # class-major file order: compare as multisets
                assert as_multiset(images, labels) == as_multiset(*truth[split]), name
            else:
                np.testing.assert_array_equal(images, truth[split][0], err_msg=name)
                np.testing.assert_array_equal(labels, truth[split][1], err_msg=name)


def test_imagefolder_without_split_folders_is_split_not_shared(tmp_path, cache):
    # Class folders only: train and test are disjoint (val_split 0.15 held out, at least one image per
    # class of 3), together every image; no longer the same images for every split.
    write_imagefolder(tmp_path / "flat", N_TRAIN, N_TEST, seed=0, split_dirs=False)
    dd = build_datasets(recipe(train=cifar(tmp_path / "flat"), test=cifar(tmp_path / "flat", "test")))
    assert (len(dd["train"]), len(dd["test"])) == (20, 10)
    train, test = as_multiset(*images_of(dd["train"])), as_multiset(*images_of(dd["test"]))
    assert not set(train) & set(test)
    assert sorted(train + test) == as_multiset(*synthetic_arrays(N_TRAIN, 0, "train"))


def test_conversion_cached_and_reused(tmp_path, cache):
    root = tmp_path / "data"
    tarball = write_cifar10_tarball(root, N_TRAIN, N_TEST)
    before = len(sources.CONVERSIONS)
    dd = build_datasets(recipe(train=cifar(root), val=cifar(root, "test"), test=cifar(root, "test")))
    assert len(sources.CONVERSIONS) == before + 1  # train, val and test: one conversion
    converted = sorted(p for p in (cache / "hf_finetune").iterdir() if not p.name.startswith("."))
    assert len(converted) == 1 and dd["train"].cache_files[0]["filename"].startswith(str(converted[0]))
    stamps = {p: p.stat().st_mtime_ns for p in converted[0].rglob("*")}

    build_datasets(recipe(train=cifar(root), test=cifar(root, "test")))
    assert len(sources.CONVERSIONS) == before + 1
    assert {p: p.stat().st_mtime_ns for p in converted[0].rglob("*")} == stamps

    # A changed source file (new mtime) is converted again.
    os.utime(tarball, ns=(time.time_ns(), time.time_ns() + 10**9))
    build_datasets(recipe(train=cifar(root)))
    assert len(sources.CONVERSIONS) == before + 2


def test_val_and_test_share_the_source(copies):
    same = build_datasets(recipe(train=cifar(copies["tarball"]), val=cifar(copies["tarball"], "test"),
                                 test=cifar(copies["tarball"], "test")))
    assert same["val"] is not same["test"] and same["val"].cache_files == same["test"].cache_files
    other = build_datasets(recipe(val=cifar(copies["tarball"], "test"),
                                  test=cifar(copies["tarball"], "test", pipeline=[{"type": "Resize", "scale": 16},
                                                                                  {"type": "PackClsInputs"}])))
    assert other["val"] is not other["test"]
    assert other["val"].cache_files == other["test"].cache_files  # one Arrow file behind both
    assert other["test"][[0]]["pixel_values"].shape == (1, 3, 16, 16)


def test_indices_int_and_list(copies):
    root = copies["save_to_disk"]
    images, labels = synthetic_arrays(N_TRAIN, 0, "train")
    dd = build_datasets(recipe(train=cifar(root, indices=5), test=cifar(root, "train", indices=[7, 2, 2, 19])))
    assert len(dd["train"]) == 5
    np.testing.assert_array_equal(images_of(dd["train"])[0], images[:5])
    got_images, got_labels = images_of(dd["test"])
    np.testing.assert_array_equal(got_images, images[[7, 2, 2, 19]])
    np.testing.assert_array_equal(got_labels, labels[[7, 2, 2, 19]])


@pytest.mark.parametrize("indices, match", [
    (0, r"train_dataloader\.dataset\.indices: expected 1\.\.30"),
    (31, r"train_dataloader\.dataset\.indices: expected 1\.\.30"),
    ([1, 30], r"train_dataloader\.dataset\.indices: index 30 is not an int in 0\.\.29"),
    ([], "empty"),
    ("5", r"indices: expected null or an integer or a list, got a string '5'"),
])
def test_bad_indices(copies, indices, match):
    with pytest.raises(RecipeError, match=match):
        build_datasets(recipe(train=cifar(copies["save_to_disk"], indices=indices)))


def test_synthetic_is_deterministic_and_learnable():
    a_images, a_labels = synthetic_arrays(200, seed=3, split="train")
    b_images, b_labels = synthetic_arrays(200, seed=3, split="train")
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, synthetic_arrays(200, seed=4, split="train")[0])
    assert not np.array_equal(a_images, synthetic_arrays(200, seed=3, split="test")[0])
    assert np.bincount(a_labels).tolist() == [20] * 10
    # Learnable: even a nearest-mean-colour classifier separates the classes.
    test_images, test_labels = synthetic_arrays(200, seed=3, split="test")
    centroids = np.stack([a_images[a_labels == k].reshape(-1, 3).mean(0) for k in range(10)])
    colours = test_images.reshape(len(test_images), -1, 3).mean(1)
    predicted = np.argmin(((colours[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test_labels).mean() > 0.6


def test_synthetic_dataset_type():
    cfg = {"type": "SyntheticCIFAR10", "num_samples": 40, "seed": 1, "pipeline": PACK}
    dd = build_datasets(recipe(train=dict(cfg, split="train"), test=dict(cfg, split="test")))
    assert len(dd["train"]) == len(dd["test"]) == 40
    assert isinstance(dd["train"].features["img"], datasets.Image)
    assert label_names(dd) == list(CIFAR10_CLASSES)
    images, labels = images_of(dd["train"])
    np.testing.assert_array_equal(images, synthetic_arrays(40, 1, "train")[0])
    with pytest.raises(RecipeError, match=r"train_dataloader\.dataset\.num_samples"):
        build_datasets(recipe(train=dict(cfg, num_samples=0)))


def _save(path, columns: dict, features: dict):
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return path


def _png(img: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_hf_image_dataset_with_custom_columns(tmp_path):
    images, labels = synthetic_arrays(12, 0, "train")
    path = _save(tmp_path / "beans_like", {"image": [_png(a) for a in images], "fine_label": labels.tolist()},
                 {"image": datasets.Image(), "fine_label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})
    cfg = {"type": "HFImageDataset", "hub_id": "someone/beans-like", "data_root": str(path), "split": "train",
           "image_column": "image", "label_column": "fine_label", "pipeline": PACK}
    dd = build_datasets(recipe(train=cfg))
    got_images, got_labels = images_of(dd["train"])
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert label_names(dd) == [f"c{i}" for i in range(10)]

    with pytest.raises(DataError, match=r"no image column 'img'.*columns found: image \(Image\), fine_label "
                                        r"\(ClassLabel\).*train_dataloader\.dataset\.image_column"):
        build_datasets(recipe(train={**cfg, "image_column": "img"}))
    with pytest.raises(DataError, match=r"no label column 'label'.*columns found"):
        build_datasets(recipe(train={**cfg, "label_column": "label"}))


def test_hub_cifar10_is_reencoded_once(tmp_path, cache, monkeypatch):
    """The CIFAR10 Hub path (download stood in by a save_to_disk copy in the Hub's layout)."""
    hub_copy = write_save_to_disk(tmp_path / "hub", N_TRAIN, N_TEST)
    calls = []

    def fake_hub(hub_id, config_name, revision, hint):
        calls.append((hub_id, config_name, revision))
        return datasets.load_from_disk(str(hub_copy))

    monkeypatch.setattr(sources, "load_hub_dataset", fake_hub)
    missing = tmp_path / "not_here"
    before = len(sources.CONVERSIONS)
    for _ in range(2):
        dd = build_datasets(recipe(train=cifar(missing, revision="abc"), test=cifar(missing, "test", revision="abc")))
        np.testing.assert_array_equal(images_of(dd["train"])[0], synthetic_arrays(N_TRAIN, 0, "train")[0])
        np.testing.assert_array_equal(images_of(dd["test"])[1], synthetic_arrays(N_TEST, 0, "test")[1])
    assert calls[0] == ("uoft-cs/cifar10", None, "abc")
    assert len(sources.CONVERSIONS) == before + 1
    assert dd["train"][[0]]["pixel_values"].dtype == torch.uint8


def test_hub_reencoding_streams_batches_into_the_cache(tmp_path, cache, monkeypatch):
    """No whole split in a Python list: rows go to the Arrow writer a batch at a time, and the split
    is memory-mapped from our cache folder (not copied again by save_to_disk)."""
    images, labels = synthetic_arrays(2500, 0, "train")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"img": [{"bytes": encode_png(a), "path": None} for a in images], "label": labels.tolist()},
        features=features)})
    monkeypatch.setattr(sources, "load_hub_dataset", lambda *args: hub)
    written = []
    real_write_batch = sources.ArrowWriter.write_batch

    def write_batch(self, batch, *args, **kwargs):
        written.append(len(batch["img"]))
        return real_write_batch(self, batch, *args, **kwargs)

    monkeypatch.setattr(sources.ArrowWriter, "write_batch", write_batch)
    ds = build_datasets(recipe(train=cifar(tmp_path / "none")))["train"]
    assert written == [1000, 1000, 500]
    assert ds.cache_files[0]["filename"].startswith(str(cache / "hf_finetune" / "hub-reencoded-"))
    np.testing.assert_array_equal(images_of(ds)[0][-3:], images[-3:])


def test_hub_download_of_large_images_is_not_reencoded(tmp_path, cache, monkeypatch):
    big = np.random.default_rng(0).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"img": [_png(a) for a in big], "label": [0, 1, 2]}, features=features)})
    monkeypatch.setattr(sources, "load_hub_dataset", lambda *args: hub)
    before = len(sources.CONVERSIONS)
    dd = build_datasets(recipe(train=cifar(tmp_path / "none")))
    assert len(sources.CONVERSIONS) == before
    np.testing.assert_array_equal(images_of(dd["train"])[0], big)


def _no_copy_checks(message, root):
    assert "--data-root" in message and "data_root" in message
    assert "cifar-10-python.tar.gz" in message and "cifar-10-batches-py" in message and "save_to_disk" in message
    assert str(root) in message


def test_offline_without_local_copy_fails_fast(tmp_path, cache):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        build_datasets(recipe(train=cifar(tmp_path / "data" / "cifar10")))
    assert time.monotonic() - start < 30
    _no_copy_checks(str(info.value), tmp_path / "data" / "cifar10")
    assert "offline" in str(info.value)


def test_unreachable_hub_fails_fast(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # read from the environment at import
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        build_datasets(recipe(train=cifar(tmp_path / "nothing")))
    assert time.monotonic() - start < 30
    _no_copy_checks(str(info.value), tmp_path / "nothing")
    assert "cannot be reached" in str(info.value)


def test_data_root_with_unknown_content(tmp_path, cache):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "notes.txt").write_text("hi")
    (tmp_path / "weird" / "models").mkdir()
    with pytest.raises(DataError, match=r"holds no dataset in a known format \(found: models/, notes\.txt\)"
                                        r".*cifar-10-python\.tar\.gz"):
        build_datasets(recipe(train=cifar(tmp_path / "weird")))


def test_cli_data_root_overrides_and_must_exist(copies, tmp_path):
    cfg = cifar("/nonexistent/recipe/root")
    dd = build_datasets(apply_overrides(recipe(train=cfg), data_root=str(copies["batches"])))
    assert len(dd["train"]) == N_TRAIN
    with pytest.raises(RecipeError, match=r"--data-root .*missing: no such file or folder"):
        build_datasets(apply_overrides(recipe(train=cfg), data_root=str(tmp_path / "missing")))


def test_missing_split(copies):
    with pytest.raises(DataError, match=r"split 'validation' not found .* available: train, test"):
        build_datasets(recipe(train=cifar(copies["tarball"], "validation")))


def test_label_out_of_range(tmp_path):
    images, _ = synthetic_arrays(4, 0)
    path = _save(tmp_path / "labels", {"img": [_png(a) for a in images], "label": [0, 3, 12, 1]},
                 {"img": datasets.Image(), "label": datasets.Value("int64")})
    cfg = {"type": "HFImageDataset", "hub_id": "x/y", "data_root": str(path), "split": "train", "pipeline": PACK}
    with pytest.raises(DataError, match=r"label 12 at index 2 .* outside 0\.\.9 \(model\.head\.num_classes\)"):
        build_datasets(recipe(train=cfg, data_preprocessor={"num_classes": 10}))
    dd = build_datasets(recipe(train=cfg, data_preprocessor={"num_classes": 13}))
    assert label_names(dd) == [str(i) for i in range(13)]


def test_empty_split(monkeypatch):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    empty = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": [], "label": []}, features=features)})
    monkeypatch.setattr(sources, "load_hub_dataset", lambda *args: empty)
    cfg = {"type": "HFImageDataset", "hub_id": "x/y", "split": "train", "pipeline": PACK}
    with pytest.raises(DataError, match=r"Hub dataset 'x/y', split 'train' is empty"):
        build_datasets(recipe(train=cfg))


def test_wrong_column_types(tmp_path):
    path = _save(tmp_path / "types", {"img": ["a", "b"], "label": [0, 1]},
                 {"img": datasets.Value("string"), "label": datasets.Value("int64")})
    cfg = {"type": "HFImageDataset", "hub_id": "x/y", "data_root": str(path), "split": "train", "pipeline": PACK}
    with pytest.raises(DataError, match=r"column 'img' .* is string, not an Image feature"):
        build_datasets(recipe(train=cfg))


def test_grayscale_rgba_palette_are_converted(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pil_images = [
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)]), mode="RGBA"),
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
        Image.fromarray(rgb).convert("LA"),
        Image.fromarray(rgb),
    ]
    encoded = []
    for im in pil_images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": None})
    path = _save(tmp_path / "modes", {"img": encoded, "label": [0, 1, 0, 1, 0]},
                 {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    cfg = {"type": "HFImageDataset", "hub_id": "x/y", "data_root": str(path), "split": "train", "pipeline": PACK}
    images, _ = images_of(build_datasets(recipe(train=cfg, data_preprocessor={"num_classes": 2}))["train"])
    assert images.shape == (5, 32, 32, 3)
    white = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    for got, im in zip(images, pil_images):
        if "A" in im.mode:  # transparent pixels shown over white, as transformers' convert_to_rgb
            im = Image.alpha_composite(white, im.convert("RGBA"))
        np.testing.assert_array_equal(got, np.asarray(im.convert("RGB")))


@pytest.fixture
def corrupt_copy(tmp_path):
    images, labels = synthetic_arrays(8, 0)
    encoded = [{"bytes": encode_png(a), "path": None} for a in images]
    encoded[3] = {"bytes": b"\x89PNG\r\n\x1a\nthis is not an image", "path": None}
    encoded[6] = {"bytes": encoded[6]["bytes"][:100], "path": None}  # truncated PNG
    path = _save(tmp_path / "corrupt", {"img": encoded, "label": labels.tolist()},
                 {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    return {"type": "HFImageDataset", "hub_id": "x/y", "data_root": str(path), "split": "train", "pipeline": PACK}


def test_corrupt_image_error_names_index_and_source(corrupt_copy):
    ds = build_datasets(recipe(train=corrupt_copy))["train"]
    with pytest.raises(DataError, match=r"cannot decode image at index 3 of save_to_disk directory .*corrupt.*"
                                        r"on_corrupt"):
        ds[[2, 3, 4]]
    with pytest.raises(DataError, match=r"index 6"):
        ds[[6]]
    assert ds[[0, 1, 2]]["pixel_values"].shape == (3, 3, 32, 32)


def _first_error(loader):
    """(class, message) of the error iterating loader raises. Not pytest.raises: torch re-raises
    from a frame that holds the exception, a cycle through the traceback keeps the iterator alive
    until a gc pass, and a gc-driven worker shutdown waits ~10 s. Dropping the traceback frees it now."""
    try:
        for _ in loader:
            pass
    except Exception as exc:
        exc.__traceback__ = None
        return type(exc), str(exc)
    return None, None


def test_corrupt_image_error_through_dataloader_workers(corrupt_copy):
    ds = build_datasets(recipe(train=corrupt_copy))["train"]
    error_class, message = _first_error(build_dataloader(ds, 4, num_workers=2))
    assert issubclass(error_class, DataError)
    assert message.startswith("cannot decode image at index 3 of save_to_disk directory")
    assert "Traceback" not in message and "worker" not in message


def test_corrupt_images_skipped_with_one_counted_warning(corrupt_copy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_datasets(recipe(train={**corrupt_copy, "on_corrupt": "skip"}))["train"]
    messages = [str(w.message) for w in caught if "undecodable" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 undecodable image(s)" in messages[0] and "index 3" in messages[0]
    assert len(ds) == 6
    batch = ds[list(range(6))]
    np.testing.assert_array_equal(batch["labels"].numpy(), synthetic_arrays(8, 0)[1][[0, 1, 2, 4, 5, 7]])


@pytest.mark.parametrize("cfg, match", [
    ({"type": "CIFAR100"}, r"train_dataloader\.dataset\.type: unknown type 'CIFAR100' \(did you mean "
                           r"'CIFAR10'\?\); known: CIFAR10, HFImageDataset, SyntheticCIFAR10"),
    ({"type": "HFImageDataset"}, r"train_dataloader\.dataset\.hub_id: HFImageDataset needs a hub_id"),
    ({"type": "SyntheticCIFAR10", "on_corrupt": "ignore"},
     r"train_dataloader\.dataset\.on_corrupt: a string 'ignore' is not allowed; expected one of \"error\", \"skip\""),
])
def test_bad_dataset_settings(cfg, match):
    with pytest.raises(RecipeError, match=match):
        build_datasets(recipe(train={**cfg, "pipeline": PACK}))


def test_data_errors_name_the_hub_model_keys(tmp_path, cache):
    """A Hub model's recipe sets its classes at model.num_classes and multi-label at model.loss:
    the data errors name those keys, not the ResNet head's."""
    write_imagefolder(tmp_path / "f", N_TRAIN, N_TEST, seed=0)
    model = {"type": "HuggingFaceClassifier", "model_name": "some/model", "num_classes": 4}
    test = {"batch_size": 4, "dataset": cifar(tmp_path / "f", "test")}
    with pytest.raises(DataError, match=r"has 10 classes but model.num_classes is 4; set model.num_classes=10$"):
        build_datasets(config_from_dict({"model": model, "test_dataloader": test}))
    multi = {**model, "num_classes": None, "loss": {"type": "CrossEntropyLoss", "use_sigmoid": True}}
    with pytest.raises(DataError, match=r"the model is multi-label; set model.loss.use_sigmoid to false$"):
        build_datasets(config_from_dict({"model": multi, "test_dataloader": test,
                                         "val_evaluator": {"type": "MultiLabelMetric"},
                                         "test_evaluator": {"type": "MultiLabelMetric"}}))
