"""Batched uint8 pipeline steps against per-image references, and the batch-fetching DataLoader."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from hf_finetune.data import PIPELINE_STEPS, build_dataloader, build_datasets, build_pipeline, synthetic_arrays
from hf_finetune.data.transforms import CenterCrop, RandomCrop, RandomFlip, Resize
from hf_finetune.config import config_from_dict
from hf_finetune.errors import DataError, RecipeError

TRAIN_PIPELINE = [
    {"type": "RandomCrop", "crop_size": 32, "padding": 4},
    {"type": "RandomFlip", "prob": 0.5, "direction": "horizontal"},
    {"type": "Resize", "scale": 64},
    {"type": "PackClsInputs"},
]


def random_images(n=16, h=32, w=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def synthetic_recipe(pipeline, num_samples=64, **dataset):
    """The typed config of a recipe whose train split is SyntheticCIFAR10 through `pipeline`."""
    return config_from_dict({
        "model": {"head": {"num_classes": 10}},
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
        "train_dataloader": {"batch_size": 4, "dataset": {
            "type": "SyntheticCIFAR10", "num_samples": num_samples, "seed": 0, "pipeline": pipeline,
            **dataset}},
    })


# ---------------------------------------------------------------- steps vs per-image references

@pytest.mark.parametrize("crop_size, padding, pad_val", [
    (32, 4, 0), ([24, 28], [1, 2, 3, 5], [10, 20, 30]), (20, None, 0), (32, [2, 6], 255),
])
def test_random_crop_matches_per_image_reference(crop_size, padding, pad_val):
    images = random_images()
    step = RandomCrop(crop_size, padding=padding, pad_val=pad_val)
    params = step.sample(len(images), 32, 32)
    out = step.apply(images, params)
    left, top, right, bottom = step.padding
    crop_h, crop_w = step.crop_size
    assert out.shape == (len(images), crop_h, crop_w, 3) and out.dtype == torch.uint8
    for i, img in enumerate(images.numpy()):
        padded = np.empty((32 + top + bottom, 32 + left + right, 3), np.uint8)
        padded[:] = np.array(step.pad_val, np.uint8)
        padded[top:top + 32, left:left + 32] = img
        y, x = int(params["top"][i]), int(params["left"][i])
        np.testing.assert_array_equal(out[i].numpy(), padded[y:y + crop_h, x:x + crop_w])


def test_random_crop_offsets_cover_the_whole_range():
    step = RandomCrop(32, padding=4)
    params = step.sample(4000, 32, 32)
    assert params["top"].min() == 0 and params["top"].max() == 8
    assert sorted(params["left"].unique().tolist()) == list(range(9))


@pytest.mark.parametrize("direction, axis", [("horizontal", 1), ("vertical", 0)])
def test_random_flip_matches_per_image_reference(direction, axis):
    images = random_images()
    step = RandomFlip(prob=0.5, direction=direction)
    params = step.sample(len(images))
    out = step.apply(images, params)
    for i, img in enumerate(images.numpy()):
        expected = np.flip(img, axis=axis) if params["flip"][i] else img
        np.testing.assert_array_equal(out[i].numpy(), expected)
    assert not torch.equal(out, images) and params["flip"].any() and not params["flip"].all()


def test_random_flip_probability_extremes():
    images = random_images(8)
    assert torch.equal(RandomFlip(prob=0.0)(images.clone()), images)
    assert torch.equal(RandomFlip(prob=1.0)(images.clone()), images.flip(2))


@pytest.mark.parametrize("scale, size", [(64, (64, 64)), ([48, 80], (48, 80)), (17, (17, 17)), (32, (32, 32))])
def test_resize_matches_per_image_bilinear_reference(scale, size):
    images = random_images(6)
    out = Resize(scale).apply(images)
    assert out.shape == (6, *size, 3) and out.dtype == torch.uint8
    for i in range(len(images)):
        ref = F.interpolate(images[i].permute(2, 0, 1)[None].double(), size=size, mode="bilinear",
                            align_corners=False, antialias=False)
        ref = ref.round().clamp(0, 255)[0].permute(1, 2, 0)
        assert (out[i].double() - ref).abs().max() <= 1  # uint8 kernels round in fixed point


def test_center_crop_matches_reference():
    images = random_images(4, 37, 40)
    out = CenterCrop([30, 31]).apply(images)
    top, left = int(round((37 - 30) / 2)), int(round((40 - 31) / 2))  # mmcv's rounding
    torch.testing.assert_close(out, images[:, top:top + 30, left:left + 31])


def test_train_pipeline_output_contract():
    dd = build_datasets(synthetic_recipe(TRAIN_PIPELINE + []))
    batch = dd["train"][list(range(10))]
    assert set(batch) == {"pixel_values", "labels"}
    pixels, labels = batch["pixel_values"], batch["labels"]
    assert pixels.shape == (10, 3, 64, 64) and pixels.dtype == torch.uint8
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (10,)
    assert 0 <= int(labels.min()) and int(labels.max()) <= 9
    assert pixels.float().std() > 10  # real image content, not a constant
    single = dd["train"][0]  # a single row works too
    assert single["pixel_values"].shape == (3, 64, 64) and single["labels"].dim() == 0


def test_pipeline_replays_with_the_same_draws():
    """The whole train pipeline equals the per-image composition of references on the same draws."""
    images = random_images(8)
    crop, flip, resize = build_pipeline(TRAIN_PIPELINE)[:3]
    torch.manual_seed(5)
    out = resize(flip(crop(images.clone())))
    torch.manual_seed(5)
    crop_params = crop.sample(8, 32, 32)
    flip_params = flip.sample(8)
    manual = resize.apply(flip.apply(crop.apply(images, crop_params), flip_params))
    assert torch.equal(out, manual)


def test_mixed_image_sizes_in_one_batch():
    small, big = random_images(3, 32, 32), random_images(2, 40, 48, seed=1)
    from hf_finetune.data.transforms import BatchTransform

    def rows(*arrays):
        from hf_finetune.data.decode import encode_ppm

        items = [{"bytes": encode_ppm(a.numpy()), "path": None} for a in arrays]
        return {"img": items, "label": list(range(len(items))), "__row__": list(range(len(items)))}

    batch = rows(small[0], big[0], small[1], big[1], small[2])
    resized = BatchTransform(build_pipeline([{"type": "Resize", "scale": 24}, {"type": "PackClsInputs"}]),
                             image_column="img", label_column="label", source="test")(batch)
    assert resized["pixel_values"].shape == (5, 3, 24, 24)
    torch.testing.assert_close(resized["pixel_values"][1], Resize(24).apply(big[:1])[0].permute(2, 0, 1))
    assert resized["labels"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"different sizes \(32x32, 48x40\).*add a Resize"):
        BatchTransform(build_pipeline(None), image_column="img", label_column="label", source="test")(batch)


# ---------------------------------------------------------------- recipe validation of steps

@pytest.mark.parametrize("pipeline, match", [
    ([{"type": "RandomCorp", "crop_size": 32}, {"type": "PackClsInputs"}],
     r"pipeline\.0\.type: unknown pipeline step 'RandomCorp' \(did you mean 'RandomCrop'\?\); known: "
     r"AutoAugment, CenterCrop, ColorJitter, PackClsInputs, RandAugment, RandomCrop, RandomErasing, "
     r"RandomFlip, RandomResizedCrop, Resize, ResizeEdge"),
    ([{"type": "RandomFlip", "probability": 0.5}, {"type": "PackClsInputs"}],
     r"pipeline\.0\.probability: unknown argument for RandomFlip \(did you mean 'prob'\?\); "
     r"accepted arguments: prob, direction"),
    ([{"type": "Resize", "scale": 224}, {"type": "RandomFlip", "prob": 1.5}, {"type": "PackClsInputs"}],
     r"pipeline\.1\.prob: expected a number in \[0, 1\], got 1\.5"),
    ([{"type": "RandomFlip", "direction": "diagonl"}, {"type": "PackClsInputs"}],
     r"pipeline\.0\.direction: expected one of horizontal, vertical, diagonal, got 'diagonl' "
     r"\(did you mean 'diagonal'\?\)"),
    ([{"type": "RandomCrop"}, {"type": "PackClsInputs"}], r"pipeline\.0\.crop_size: RandomCrop requires"),
    ([{"type": "RandomCrop", "crop_size": 0}, {"type": "PackClsInputs"}], r"pipeline\.0\.crop_size: expected a "
                                                                          r"positive int"),
    ([{"type": "RandomCrop", "crop_size": 32, "padding_mode": "reflect"}, {"type": "PackClsInputs"}],
     r"pipeline\.0\.padding_mode: only 'constant'"),
    ([{"type": "RandomCrop", "crop_size": 32, "pad_val": 300}, {"type": "PackClsInputs"}], r"pipeline\.0\.pad_val"),
    ([{"type": "Resize", "scale": [224]}, {"type": "PackClsInputs"}], r"pipeline\.0\.scale: expected a positive"),
    ([{"type": "Resize", "scale": 224, "interpolation": "bicubik"}, {"type": "PackClsInputs"}],
     r"pipeline\.0\.interpolation: expected one of bilinear, bicubic, nearest, got 'bicubik'"),
    ([{"type": "PackClsInputs", "meta_keys": []}], r"pipeline\.0\.meta_keys: unknown argument for PackClsInputs"),
    ([{"type": "Resize", "scale": 224}], r"pipeline: the pipeline must end with"),
    ([{"type": "PackClsInputs"}, {"type": "Resize", "scale": 8}], r"pipeline: the pipeline must end with"),
    ([{"type": "PackClsInputs"}, {"type": "PackClsInputs"}],
     r"pipeline: step 0 is PackClsInputs, which must be the last"),
    ([{"crop_size": 3}], r"pipeline\.0\.type: unknown pipeline step null; known: AutoAugment"),
    (["RandomCrop"], r"pipeline\.0: a pipeline step is an object, got a string 'RandomCrop'"),
])
def test_bad_pipeline_steps_name_the_key(pipeline, match):
    with pytest.raises(RecipeError, match="train_dataloader\\.dataset\\." + match):
        build_datasets(synthetic_recipe(pipeline))


def test_registry_names():
    assert list(PIPELINE_STEPS) == ["RandomCrop", "RandomFlip", "Resize", "CenterCrop", "PackClsInputs",
                                    "RandomResizedCrop", "ResizeEdge", "ColorJitter", "RandAugment",
                                    "AutoAugment", "RandomErasing"]


def test_crop_larger_than_image_is_a_data_error():
    dd = build_datasets(synthetic_recipe([{"type": "CenterCrop", "crop_size": 40}, {"type": "PackClsInputs"}]))
    with pytest.raises(DataError, match=r"CenterCrop: crop_size 40x40 is larger than the image 32x32"):
        dd["train"][[0, 1]]


# ---------------------------------------------------------------- DataLoader

def collect(loader):
    return [(b["pixel_values"].clone(), b["labels"].clone()) for b in loader]


@pytest.fixture(scope="module")
def train_split():
    return build_datasets(synthetic_recipe(TRAIN_PIPELINE, num_samples=40))["train"]


def test_loader_fetches_whole_batches(train_split):
    loader = build_dataloader(train_split, 16, shuffle=True, drop_last=False, seed=0)
    assert isinstance(loader.batch_sampler, BatchSampler)
    batches = collect(loader)
    assert len(loader) == len(batches) == 3
    assert [len(labels) for _, labels in batches] == [16, 16, 8]
    assert batches[0][0].shape == (16, 3, 64, 64) and batches[0][0].dtype == torch.uint8
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == sorted(
        synthetic_arrays(40, 0, "train")[1].tolist())
    assert len(build_dataloader(train_split, 16, drop_last=True)) == 2


def test_loader_reproducible_per_seed_and_different_per_epoch(train_split):
    first = collect(build_dataloader(train_split, 8, shuffle=True, seed=1))
    again = collect(build_dataloader(train_split, 8, shuffle=True, seed=1))
    other = collect(build_dataloader(train_split, 8, shuffle=True, seed=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # Same order (no shuffle), two epochs of one loader: the augmentation differs.
    loader = build_dataloader(train_split, 8, shuffle=False, seed=1)
    epoch1, epoch2 = collect(loader), collect(loader)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch1, epoch2))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(epoch1, epoch2))


def test_loader_differs_per_rank(train_split, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    rank0 = collect(build_dataloader(train_split, 8, seed=1))
    monkeypatch.setenv("RANK", "1")
    rank1 = collect(build_dataloader(train_split, 8, seed=1))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(rank0, rank1))


def test_workers_draw_independent_streams(monkeypatch):
    """One image repeated: any two batches with identical augmentation would mean shared RNG streams."""
    same_image = build_datasets(synthetic_recipe(TRAIN_PIPELINE, num_samples=10, indices=[3] * 48))["train"]
    loader = build_dataloader(same_image, 8, num_workers=2, seed=7)
    batches = [b for b, _ in collect(loader)]
    assert len(batches) == 6
    for i in range(len(batches)):
        for j in range(i + 1, len(batches)):
            assert not torch.equal(batches[i], batches[j]), (i, j)
    again = [b for b, _ in collect(build_dataloader(same_image, 8, num_workers=2, seed=7))]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # reproducible per seed
    next_epoch = [b for b, _ in collect(loader)]
    assert not any(torch.equal(a, b) for a, b in zip(batches, next_epoch))
    monkeypatch.setenv("RANK", "1")
    rank1 = [b for b, _ in collect(build_dataloader(same_image, 8, num_workers=2, seed=7))]
    assert not any(torch.equal(a, b) for a, b in zip(batches, rank1))


def test_a_users_own_loader_with_workers_gets_whole_images():
    """torch's default DataLoader (per-image collate, as transformers' Trainer uses) over the
    dataset, with workers, gets ordinary batches of the full-size images."""
    ds = build_datasets(synthetic_recipe(TRAIN_PIPELINE, num_samples=24))["train"]
    batches = list(torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2))
    assert len(batches) == 4
    assert all(b["pixel_values"].shape == (6, 3, 64, 64) and b["labels"].shape == (6,) for b in batches)


def test_pipeline_error_in_a_worker_is_one_line():
    ds = build_datasets(synthetic_recipe([{"type": "RandomFlip", "prob": 0.5}, {"type": "CenterCrop", "crop_size": 40},
                                          {"type": "PackClsInputs"}], num_samples=24))["train"]
    with pytest.raises(DataError) as caught:
        next(iter(build_dataloader(ds, 8, num_workers=2, seed=0)))
    assert str(caught.value) == ("CenterCrop: crop_size 40x40 is larger than the image 32x32; put a Resize "
                                 "before it or lower crop_size")


@pytest.mark.floors
def test_loader_under_accelerate_sharding(train_split):
    """accelerate.prepare recognises the BatchSampler and shards whole batches per process."""
    from accelerate.data_loader import prepare_data_loader

    loader = build_dataloader(train_split, 8, shuffle=False, seed=0)
    labels = synthetic_arrays(40, 0, "train")[1]
    seen = []
    for rank in (0, 1):
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        seen.append(torch.cat([b["labels"] for b in shard]).tolist())
        assert all(b["pixel_values"].shape[0] == 8 for b in shard)
    assert seen[0][:8] == labels[:8].tolist() and seen[1][:8] == labels[8:16].tolist()


@pytest.mark.parametrize("settings, match", [
    ({"batch_size": 0}, r"train_dataloader\.batch_size: 0 is out of range; expected >= 1"),
    ({"batch_size": 4, "num_workers": -1}, r"train_dataloader\.num_workers: -1 is out of range; expected >= 0"),
])
def test_bad_loader_settings(settings, match):
    loader = {"dataset": {"type": "SyntheticCIFAR10", "pipeline": [{"type": "PackClsInputs"}]}, **settings}
    with pytest.raises(RecipeError, match=match):
        config_from_dict({"model": {"head": {"num_classes": 10}}, "train_dataloader": loader})
