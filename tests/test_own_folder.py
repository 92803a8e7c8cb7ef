"""Own image folders: indexed by path (not copied), honest stratified splits, split folders and a separate
test folder, counts in the log / card / --print-recipe, and bad input on large data."""

import builtins
import json
import logging
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from hf_finetune.config import config_from_dict
from hf_finetune.data import build_dataloader, build_datasets, label_names
from hf_finetune.data import sources
from hf_finetune.data.imagefolder import images_under
from hf_finetune.errors import DataError, RecipeError
from hf_finetune.hub.card import write_data_splits, write_model_card
from hf_finetune.run import main

PACK = [{"type": "PackClsInputs"}]
RESIZE = [{"type": "Resize", "scale": 16}, {"type": "PackClsInputs"}]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shade(name: str, i: int) -> int:
    """Each image's own grey level, so a batch says which files it read."""
    return (sum(map(ord, name)) * 7 + i * 3) % 256


def write_folder(root, counts: dict, size=(12, 10), ext=".png", noise=0):
    """root/<class>/<i><ext>, a grey image each (shade(class, i), +- noise); -> root."""
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = shade(name, i) + rng.integers(-noise, noise + 1, (size[1], size[0], 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}{ext}")
    return root


def dataset(root, split=None, pipeline=PACK, **kw):
    return {"type": "HFImageDataset", "data_root": str(root), "split": split, "pipeline": pipeline, **kw}


def recipe(train=None, val=None, test=None, num_classes=None):
    out = {"model": {"head": {"num_classes": num_classes, "topk": [1]}}}
    if train is not None:
        out["optim_wrapper"] = {"optimizer": {"type": "SGD", "lr": 0.1}}
    for name, cfg in (("train", train), ("val", val), ("test", test)):
        if cfg is not None:
            out[f"{name}_dataloader"] = {"batch_size": 4, "dataset": cfg}
    return config_from_dict(out)


def shades(ds):
    """{(label, grey level)} of every image of a built split (read through the batch transform)."""
    batch = ds[list(range(len(ds)))]
    return sorted(zip(batch["labels"].tolist(), batch["pixel_values"][:, 0, 0, 0].tolist()))


def rows(ds):
    return ds.with_format("arrow")[:]["img"].to_pylist()


# ------------------------------------------------------------------ the index


def test_the_cache_holds_paths_and_labels_not_the_images(tmp_path, cache):
    root = write_folder(tmp_path / "photos", {"cat": 6, "dog": 6}, size=(300, 200), ext=".png", noise=20)
    dd = build_datasets(recipe(train=dataset(root, "all")))
    assert label_names(dd) == ["cat", "dog"]
    items = rows(dd["train"])
    assert all(item["bytes"] is None and os.path.isabs(item["path"]) and os.path.isfile(item["path"])
               for item in items)
    folder_bytes = sum(p.stat().st_size for p in root.rglob("*.png"))
    cache_bytes = sum(p.stat().st_size for p in (cache / "hf_finetune").rglob("*") if p.is_file())
    assert cache_bytes < folder_bytes / 10
    # The bytes are read when a batch needs them: the right pixels for the right class.
    expected = sorted((label, shade(name, i)) for label, name in enumerate(["cat", "dog"]) for i in range(6))
    got = shades(dd["train"])
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert all(abs(a - b) <= 20 for (_, a), (_, b) in zip(got, expected))  # the corner pixel's noise


def test_indexing_opens_no_image_file(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "photos", {"cat": 3, "dog": 3})
    real_open = builtins.open

    def no_image_open(file, *args, **kwargs):
        assert not str(file).endswith(".png"), f"opened {file} while indexing"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_image_open)
    monkeypatch.setattr(os, "open", lambda *a, **k: pytest.fail("os.open while indexing"))
    index = sources._index_imagefolder(root)
    assert len(index["all"]) == 6


def test_the_index_is_reused_until_a_file_changes_is_added_or_removed(tmp_path):
    root = write_folder(tmp_path / "photos", {"cat": 4, "dog": 4})
    cfg = recipe(train=dataset(root, "all"))
    before = len(sources.CONVERSIONS)
    build_datasets(cfg)
    build_datasets(cfg)
    assert len(sources.CONVERSIONS) == before + 1

    os.utime(root / "cat" / "0.png", ns=(0, 10**9))  # same name and size, new mtime
    build_datasets(cfg)
    assert len(sources.CONVERSIONS) == before + 2
    write_folder(tmp_path / "photos", {"emu": 2})  # added
    assert len(build_datasets(cfg)["train"]) == 10 and len(sources.CONVERSIONS) == before + 3
    (root / "dog" / "3.png").unlink()  # removed
    assert len(build_datasets(cfg)["train"]) == 9 and len(sources.CONVERSIONS) == before + 4


def test_which_files_count_as_images_follows_load_dataset_imagefolder(tmp_path):
    root = write_folder(tmp_path / "photos", {"cat": 2, "dog": 2})
    (root / "cat" / "UPPER.JPG").write_bytes((root / "cat" / "0.png").read_bytes())  # any case
    (root / "cat" / ".hidden.png").write_bytes(b"x")  # hidden: skipped
    (root / "cat" / "notes.txt").write_text("not an image")
    write_folder(root / "cat" / "nested", {"deeper": 1})  # subfolders of a class folder belong to it
    write_folder(root / ".thumbnails", {"x": 1})  # hidden folder
    write_folder(root / "__MACOSX", {"x": 1})  # as datasets: "__" folders skipped
    elsewhere = write_folder(tmp_path / "elsewhere", {"fox": 2})
    os.symlink(elsewhere / "fox", root / "fox")  # a class folder that is a link
    ds = build_datasets(recipe(train=dataset(root, "all")))["train"]
    assert label_names({"train": ds}) == ["cat", "dog", "fox"]
    names = sorted(os.path.relpath(item["path"], root) for item in rows(ds))
    assert names == ["cat/0.png", "cat/1.png", "cat/UPPER.JPG", "cat/nested/deeper/0.png", "dog/0.png",
                     "dog/1.png", "fox/0.png", "fox/1.png"]


# ------------------------------------------------------------------ honest splits


def test_class_folders_only_are_split_stratified_and_never_shared(tmp_path, caplog):
    root = write_folder(tmp_path / "photos", {"cat": 20, "dog": 7, "emu": 2, "yak": 1})
    cfg = recipe(train=dataset(root, "train"), val=dataset(root, "val"), test=dataset(root, "test"))
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        dd = build_datasets(cfg)
    train = {os.path.relpath(item["path"], root) for item in rows(dd["train"])}
    val = {os.path.relpath(item["path"], root) for item in rows(dd["val"])}
    assert not train & val and len(train | val) == 30
    assert rows(dd["val"]) == rows(dd["test"])  # no test folder: test is the held-out part too
    per_class = lambda names, c: sum(n.startswith(c + "/") for n in names)  # noqa: E731
    # round(n * 0.15), at least 1 and at most n - 1 for classes of 2 or more; a class of 1 trains only.
    assert [per_class(val, c) for c in ("cat", "dog", "emu", "yak")] == [3, 1, 1, 0]
    assert [per_class(train, c) for c in ("cat", "dog", "emu", "yak")] == [17, 6, 1, 1]
    assert "1 class(es) have a single image ('yak'); it is used for training only" in caplog.text
    # The training log states the counts per split and class.
    assert "photos: 25 images for training, 5 held out for validation (val_split 0.15, stratified" in caplog.text
    assert "train: 25 images, 4 classes (cat 17, dog 6, emu 1, yak 1)" in caplog.text
    assert "val: 5 images, 4 classes (cat 3, dog 1, emu 1, yak 0)" in caplog.text
    # Deterministic: the same split in a new build, and adding images moves none of the others.
    assert rows(build_datasets(cfg)["val"]) == rows(dd["val"])
    write_folder(tmp_path / "more", {"cat": 4})
    for i in range(4):
        os.rename(tmp_path / "more" / "cat" / f"{i}.png", root / "cat" / f"new{i}.png")
    again = {os.path.basename(i["path"]) for i in rows(build_datasets(cfg)["val"]) if "/cat/" in i["path"]}
    old = {os.path.basename(i["path"]) for i in rows(dd["val"]) if "/cat/" in i["path"]}
    assert len(again) == 4 and len(old - again) <= 1


def test_val_split_zero_and_split_all_are_the_explicit_ways_to_share(tmp_path, caplog):
    root = write_folder(tmp_path / "photos", {"cat": 5, "dog": 5})
    with caplog.at_level(logging.WARNING, logger="hf_finetune"):
        dd = build_datasets(recipe(train=dataset(root, "train", val_split=0), val=dataset(root, "val")))
    assert len(dd["train"]) == len(dd["val"]) == 10
    assert "val_split is 0" in caplog.text and "measures fit, not generalisation" in caplog.text
    dd = build_datasets(recipe(train=dataset(root, "train"), val=dataset(root, "all")))
    assert (len(dd["train"]), len(dd["val"])) == (8, 10)


@pytest.mark.parametrize("where, value, match", [
    ("val", 0.2, r"val_dataloader\.dataset\.val_split: the training set is what is split: set "
                 r"train_dataloader\.dataset\.val_split"),
    ("train", 1.0, r"train_dataloader\.dataset\.val_split: .*1"),
    ("train", -0.1, r"train_dataloader\.dataset\.val_split: .*-0\.1"),
])
def test_bad_val_split(tmp_path, where, value, match):
    sections = {"train": dataset(tmp_path, "train"), "val": dataset(tmp_path, "val")}
    sections[where]["val_split"] = value
    with pytest.raises(RecipeError, match=match):
        recipe(**sections)


def test_split_folders_train_val_validation_test(tmp_path):
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        write_folder(tmp_path / "data" / split, {"cat": n, "dog": n})
    root = tmp_path / "data"
    dd = build_datasets(recipe(train=dataset(root, "train"), val=dataset(root, "val"), test=dataset(root, "test")))
    assert {split: len(ds) for split, ds in dd.items()} == {"train": 12, "val": 4, "test": 6}  # nothing split off
    assert all("/validation/" in item["path"] for item in rows(dd["val"]))
    # A train folder alone is split like class folders only.
    write_folder(tmp_path / "only_train" / "train", {"cat": 10})
    dd = build_datasets(recipe(train=dataset(tmp_path / "only_train", "train"),
                               val=dataset(tmp_path / "only_train", "validation")))
    assert (len(dd["train"]), len(dd["val"])) == (8, 2)


def test_a_separate_test_folder_is_used_whole_with_the_training_class_ids(tmp_path):
    train = write_folder(tmp_path / "train_photos", {"ant": 4, "bee": 4, "cat": 4})
    test = write_folder(tmp_path / "test_photos", {"bee": 2, "cat": 3})  # lacks "ant": ids must not shift
    dd = build_datasets(recipe(train=dataset(train, "train"), test=dataset(test, "test")))
    assert len(dd["test"]) == 5 and label_names(dd) == ["ant", "bee", "cat"]
    assert shades(dd["test"]) == sorted([(1, shade("bee", i)) for i in range(2)] +
                                         [(2, shade("cat", i)) for i in range(3)])
    evaluated = build_datasets(recipe(train=dataset(train, "train"), test=dataset(test, "test")), splits=("test",))
    assert shades(evaluated["test"]) == shades(dd["test"])  # --eval-only: the training folder's class ids too
    write_folder(test, {"dog": 1})
    with pytest.raises(DataError, match=r"test_photos.* has class\(es\) the training data lacks: 'dog'; "
                                        r"the training classes are ant, bee, cat"):
        build_datasets(recipe(train=dataset(train, "train"), test=dataset(test, "test")))


def test_missing_split_names_what_is_there(tmp_path):
    write_folder(tmp_path / "data" / "train", {"cat": 2})
    write_folder(tmp_path / "data" / "test", {"cat": 2})
    with pytest.raises(DataError, match=r"split 'val' not found in image folder .*data; available: test, train "
                                        r"\(set val_dataloader\.dataset\.split"):
        build_datasets(recipe(train=dataset(tmp_path / "data", "train"), val=dataset(tmp_path / "data", "val")))


def test_counts_in_print_recipe_as_the_readme_prints_it_and_in_the_model_card(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "my_images", {"cat": 10, "dog": 10})
    shutil.copytree(os.path.join(REPO, "recipes"), tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    command = "recipes/imagefolder_finetune.json --data-root my_images/ --print-recipe"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        assert f"hf-finetune {command}" in readme.read()
    assert main(command.split()) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["train_dataloader"]["dataset"]["val_split"] == 0.15
    assert "# train: 16 images, 2 classes (cat 8, dog 8) from image folder" in err
    assert "# val: 4 images, 2 classes (cat 2, dog 2)" in err

    work = tmp_path / "work"
    work.mkdir()
    cfg = recipe(train=dataset(root, "train"), val=dataset(root, "val"), test=dataset(root, "test"), num_classes=2)
    (work / "recipe.json").write_text(json.dumps(cfg.to_dict()))
    from hf_finetune.data.build import split_counts

    write_data_splits(str(work), {split: split_counts(ds) for split, ds in build_datasets(cfg).items()})
    text = open(write_model_card(str(work)), encoding="utf-8").read()
    assert "- train: HFImageDataset — `HFImageDataset`, split `train`: 16 images, 2 classes (cat 8, dog 8)" in text
    assert "- test: HFImageDataset — `HFImageDataset`, split `test`: 4 images, 2 classes (cat 2, dog 2)" in text


# ------------------------------------------------------------------ bad input on large data


def test_a_class_folder_without_images_is_one_line(tmp_path):
    root = write_folder(tmp_path / "photos", {"cat": 2, "dog": 2})
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("todo")
    with pytest.raises(DataError, match=r"^class folder .*photos/emu holds no image \(accepted: files ending in "
                                        r"\.bmp, .*\.jpg.*any case.*\); add images or remove the folder$"):
        build_datasets(recipe(train=dataset(root, "train")))


def test_a_symlink_loop_is_one_line(tmp_path):
    root = write_folder(tmp_path / "photos", {"cat": 2})
    os.symlink(root, root / "cat" / "again")  # a folder link back to an ancestor
    with pytest.raises(DataError, match=r"^symlink loop: .*photos/cat/again leads back to a folder above it"):
        build_datasets(recipe(train=dataset(root, "train")))
    (root / "cat" / "again").unlink()
    os.symlink("self.jpg", root / "cat" / "self.jpg")  # a link to itself
    with pytest.raises(DataError, match=r"^.*photos/cat/self\.jpg is a symlink loop \(a link that points to itself\); "
                                        r"remove it$"):
        build_datasets(recipe(train=dataset(root, "train")))


def folder_with_trouble(tmp_path):
    """A 2-class folder, indexed, whose cat/1.png then breaks (the caller says how)."""
    root = write_folder(tmp_path / "photos", {"cat": 4, "dog": 4})
    return root, root / "cat" / "1.png"


@pytest.mark.parametrize("trouble", ["vanished", "undecodable", "unreadable"])
def test_a_file_that_breaks_after_indexing(tmp_path, trouble):
    if trouble == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a file without read permission")
    root, victim = folder_with_trouble(tmp_path)
    cfg = dataset(root, "all", pipeline=RESIZE)
    ds = build_datasets(recipe(train=cfg))["train"]  # indexed while intact
    skip = build_datasets(recipe(train={**cfg, "on_corrupt": "skip"}))["train"]
    if trouble == "vanished":
        victim.unlink()
    elif trouble == "undecodable":
        victim.write_bytes(victim.read_bytes()[:40])
    else:
        victim.chmod(0)
    order = [os.path.relpath(item["path"], root) for item in rows(ds)]
    where = order.index("cat/1.png")
    with pytest.raises(DataError, match=rf"^cannot (decode|read) image at index {where} \(.*cat/1\.png in class "
                                        rf"folder 'cat'\) of image folder .*on_corrupt"):
        ds[list(range(len(ds)))]
    # on_corrupt "skip": the batch goes on without it, counted.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = skip[list(range(len(skip)))]
    assert batch["pixel_values"].shape[0] == 7 and skip.format["format_kwargs"]["transform"].skipped == 1
    assert any("cat/1.png" in str(w.message) for w in caught)


def test_the_loader_workers_read_files_by_path(tmp_path):
    root = write_folder(tmp_path / "photos", {"cat": 6, "dog": 6})
    ds = build_datasets(recipe(train=dataset(root, "all", pipeline=RESIZE)))["train"]
    batches = list(build_dataloader(ds, 4, shuffle=False, seed=0, num_workers=2))
    got = sorted((int(l), int(p[0, 0, 0])) for b in batches for l, p in zip(b["labels"], b["pixel_values"]))
    assert got == shades(ds)


def test_images_under_reads_one_folder_at_a_time(tmp_path):
    root = write_folder(tmp_path / "photos", {"a": 3})
    walk = images_under(str(root))  # a generator: nothing listed before the first image is asked for
    assert next(walk)[0].endswith("a/0.png")


def test_images_cut_short_are_skipped_counted_and_listed(tmp_path, caplog):
    """A JPEG cut short (its header reads, its data does not: it fails only when decoded, in a
    loader worker) is left out of every batch with on_corrupt "skip"; the run ends, saying how many
    images were left out and where they are listed, once each however many epochs read them."""
    root = write_folder(tmp_path / "photos", {"cat": 6, "dog": 6}, size=(40, 30), ext=".jpg", noise=40)
    victim = root / "cat" / "1.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    data = {"num_workers": 2, "dataset": {"_delete_": True, **dataset(root, "all", pipeline=RESIZE, on_corrupt="skip")}}
    body = {"_base_": [os.path.join(REPO, "recipes", "cifar10.json")],
            "model": {"backbone": {"depth": 18, "init_cfg": None}, "head": {"in_channels": 512, "num_classes": 2,
                                                                             "topk": [1]}},
            "data_preprocessor": {"num_classes": 2}, "train_dataloader": data, "val_dataloader": data,
            "test_dataloader": None, "val_evaluator": {"type": "Accuracy", "topk": [1]},
            "test_evaluator": {"type": "Accuracy", "topk": [1]},
            "train_cfg": {"max_epochs": 2, "total_batch_size": 4}, "param_scheduler": [], "randomness": {"seed": 0}}
    (tmp_path / "skip.json").write_text(json.dumps(body))
    work = tmp_path / "work"
    assert main([str(tmp_path / "skip.json"), "--work-dir", str(work)]) == 0
    records = [json.loads(line) for line in (work / "skipped_images.jsonl").read_text().splitlines()]
    assert len(records) >= 3  # two epochs of training and the evaluations, from the loader workers
    assert {r["image"] for r in records} == {r["image"] for r in records[:1]} and "cat/1.jpg" in records[0]["image"]
    assert "truncated" in records[0]["error"].lower()
    assert f"1 undecodable image(s) left out (on_corrupt='skip'): listed in {work / 'skipped_images.jsonl'}" \
        in caplog.text
    assert json.loads((work / "trainer_state.json").read_text())["global_step"] == 6  # 2 epochs of 3 updates
    assert json.loads((work / "all_results.json").read_text())["eval_num_samples"] == 11
