"""mmpretrain-level pipeline steps: semantics against per-image references, draw distributions,
replayable seeding, mixed-size batches and one-line recipe errors."""

import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from hf_finetune.config import config_from_dict
from hf_finetune.data import build_dataloader, build_datasets
from hf_finetune.data.decode import encode_ppm
from hf_finetune.data.transforms import (
    AUTOAUG_POLICIES, GEOMETRIC_OPS, PIPELINE_STEPS, AugOp, AutoAugment, BatchTransform, CenterCrop, ColorJitter,
    RandAugment, RandomCrop, RandomErasing, RandomFlip, RandomResizedCrop, Resize, ResizeEdge, build_pipeline,
)
from hf_finetune.errors import RecipeError


def random_images(n=8, h=32, w=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def smooth_images(n=4, h=48, w=40, seed=0):
    """Images with smooth structure (waves of random frequency), for ops whose result depends on content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.05, 0.3, 3)
        out.append(np.stack([120 + 100 * np.sin(x * a), 120 + 100 * np.cos(y * b), 120 + 100 * np.sin((x + y) * c)],
                            -1))
    return torch.from_numpy(np.stack(out).round().astype(np.uint8))


@pytest.fixture
def seeded():
    """Steps called without a generator draw from torch's global RNG (as in loader workers):
    seeded(n) seeds it; the test's draws leave the RNG of later tests as it was."""
    with torch.random.fork_rng():
        yield torch.manual_seed


def resize_reference(image: torch.Tensor, size, mode="bilinear") -> torch.Tensor:
    """Per-image float interpolation, rounded: what the uint8 kernels approximate (<= 1 apart)."""
    extra = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(image.permute(2, 0, 1)[None].double(), size=size, mode=mode, **extra)
    return out.round().clamp(0, 255)[0].permute(1, 2, 0)


def rows(*images, fmt="PPM"):
    """Dataset rows of encoded images for BatchTransform."""
    items = []
    for im in images:
        array = im.numpy() if isinstance(im, torch.Tensor) else im
        if fmt == "PPM":
            data = encode_ppm(array)
        else:
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, format=fmt, quality=95)
            data = buf.getvalue()
        items.append({"bytes": data, "path": None})
    return {"img": items, "label": list(range(len(items))), "__row__": list(range(len(items)))}


def transform(pipeline):
    return BatchTransform(build_pipeline(pipeline + [{"type": "PackClsInputs"}]), image_column="img",
                          label_column="label", source="test")


# ---------------------------------------------------------------- RandomResizedCrop

def test_random_resized_crop_draws_follow_mmpretrain(seeded):
    seeded(0)
    step = RandomResizedCrop(16, crop_ratio_range=(0.2, 0.6), aspect_ratio_range=(0.5, 2.0))
    boxes = step.sample(4000, 100, 120)["boxes"].double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 120).all()
    area = h * w / (100 * 120)
    assert area.min() >= 0.2 - 0.02 and area.max() <= 0.6 + 0.02  # rounding of the sides
    log_ratio = (w / h).log()
    assert log_ratio.min() >= math.log(0.5) - 0.05 and log_ratio.max() <= math.log(2.0) + 0.05
    assert abs(log_ratio.mean()) < 0.05  # log-uniform: symmetric around ratio 1
    assert abs(area.mean() - 0.4) < 0.02  # uniform area fraction (every draw fits here)
    assert top.max() > 60 and left.max() > 70  # offsets reach far sides


@pytest.mark.parametrize("height, width, expected", [
    (10, 100, (0, 43, 10, 13)),   # too wide: height kept, width = round(10 * 4/3), centred
    (100, 10, (43, 0, 13, 10)),   # too tall: width kept, height = round(10 / (3/4)), centred
    (30, 35, (0, 0, 30, 35)),     # ratio within range: the whole image
])
def test_random_resized_crop_fallback_is_a_centre_crop(height, width, expected):
    step = RandomResizedCrop(8, max_attempts=0)
    box = step.sample(1, height, width)["boxes"][0].tolist()
    assert box == list(expected)


def test_random_resized_crop_matches_per_image_reference_on_mixed_sizes(seeded):
    images = [random_images(1, 40, 50, seed=1)[0], random_images(1, 64, 30, seed=2)[0], random_images(1, 33, 33)[0]]
    step = RandomResizedCrop([20, 24])
    seeded(3)
    sizes = torch.tensor([im.shape[:2] for im in images])
    params = step.sample(3, sizes[:, 0], sizes[:, 1])
    out = step.apply_list(images, params)
    assert out.shape == (3, 20, 24, 3) and out.dtype == torch.uint8
    for image, box, got in zip(images, params["boxes"].tolist(), out):
        top, left, h, w = box
        assert (got.double() - resize_reference(image[top:top + h, left:left + w], (20, 24))).abs().max() <= 1


def test_random_resized_crop_on_a_batch_of_encoded_photos(seeded):
    """Mixed-size JPEG/PNG rows -> one batch; with equal draws, PNG rows equal the tensor path.
    The draws come from the generator handed to the transform, not from torch's global RNG."""
    a, b = smooth_images(1, 90, 120, seed=1)[0], smooth_images(1, 140, 100, seed=2)[0]
    step = transform([{"type": "RandomResizedCrop", "scale": 32}])
    seeded(1)
    packed = step(rows(a, b, fmt="PNG"), torch.Generator().manual_seed(7))
    assert packed["pixel_values"].shape == (2, 3, 32, 32)
    seeded(2)
    direct = RandomResizedCrop(32).apply_list([a, b], generator=torch.Generator().manual_seed(7))
    assert torch.equal(packed["pixel_values"].permute(0, 2, 3, 1), direct)
    assert not torch.equal(RandomResizedCrop(32).apply_list([a, b]), direct)  # global RNG: other draws
    jpeg = step(rows(a, b, fmt="JPEG"), torch.Generator().manual_seed(7))
    assert (jpeg["pixel_values"].float() - packed["pixel_values"].float()).abs().mean() < 6


# ---------------------------------------------------------------- ResizeEdge, Resize, CenterCrop

@pytest.mark.parametrize("edge, in_hw, expected", [
    ("short", (300, 400), (256, 341)), ("short", (400, 300), (341, 256)),
    ("long", (300, 400), (192, 256)), ("height", (300, 400), (256, 341)), ("width", (300, 400), (192, 256)),
])
def test_resize_edge_sizes_as_mmpretrain(edge, in_hw, expected):
    assert ResizeEdge(256, edge=edge).output_size(in_hw) == expected


def test_resize_edge_then_center_crop_on_mixed_sizes():
    # Smooth content: uint8 bicubic rounds between its two passes, which only matters at sharp edges.
    a, b = smooth_images(1, 40, 60, seed=1)[0], smooth_images(1, 50, 30, seed=2)[0]
    packed = transform([{"type": "ResizeEdge", "scale": 24, "interpolation": "bicubic"},
                        {"type": "CenterCrop", "crop_size": 20}])(rows(a, b))
    assert packed["pixel_values"].shape == (2, 3, 20, 20)
    for image, got in zip((a, b), packed["pixel_values"].permute(0, 2, 3, 1)):
        resized = ResizeEdge(24, interpolation="bicubic").apply(image[None])[0]
        assert torch.equal(got, CenterCrop(20).apply(resized[None])[0])
        ref = resize_reference(image, ResizeEdge(24).output_size(image.shape[:2]), "bicubic")
        assert (resized.double() - ref).abs().max() <= 1


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_resize_interpolations_match_reference(mode):
    images = smooth_images(4, 30, 26) if mode == "bicubic" else random_images(4, 30, 26)
    out = Resize([17, 41], interpolation=mode).apply(images)
    for image, got in zip(images, out):
        assert (got.double() - resize_reference(image, (17, 41), mode)).abs().max() <= 1


def test_output_size_of_every_step():
    expected = {RandomCrop(24): (24, 24), Resize([20, 30]): (20, 30), CenterCrop([10, 12]): (10, 12),
                RandomResizedCrop(224): (224, 224), ResizeEdge(256): (256, 341), RandomFlip(): (300, 400),
                ColorJitter(0.4): (300, 400), RandAugment("timm_increasing", 2, 9): (300, 400),
                AutoAugment("imagenet"): (300, 400), RandomErasing(): (300, 400)}
    for step, size in expected.items():
        assert step.output_size((300, 400)) == size, step


# ---------------------------------------------------------------- RandomFlip

def test_random_flip_direction_list_with_probabilities(seeded):
    seeded(0)
    step = RandomFlip(prob=[0.1, 0.2, 0.3], direction=["horizontal", "vertical", "diagonal"])
    params = step.sample(20000)
    counts = [int((params["flip"] & (params["direction"] == k)).sum()) for k in range(3)]
    assert [round(c / 20000, 2) for c in counts] == pytest.approx([0.1, 0.2, 0.3], abs=0.015)
    assert (~params["flip"]).float().mean() == pytest.approx(0.4, abs=0.015)
    images = random_images(64)
    out = step.apply(images, params := step.sample(64))
    for i, image in enumerate(images):
        direction = step.directions[params["direction"][i]] if params["flip"][i] else None
        dims = {"horizontal": (1,), "vertical": (0,), "diagonal": (0, 1), None: ()}[direction]
        assert torch.equal(out[i], image.flip(dims) if dims else image)


def test_random_flip_shared_prob_is_split_between_directions(seeded):
    seeded(1)
    params = RandomFlip(prob=0.6, direction=["horizontal", "vertical"]).sample(20000)
    for k in range(2):
        assert float((params["flip"] & (params["direction"] == k)).float().mean()) == pytest.approx(0.3, abs=0.015)


# ---------------------------------------------------------------- ColorJitter

def test_color_jitter_factors_and_order(seeded):
    seeded(0)
    step = ColorJitter(brightness=0.4, contrast=[0.5, 0.9], saturation=0.2, hue=0.1)
    params = step.sample(5000)
    assert params["brightness"].min() >= 0.6 and params["brightness"].max() <= 1.4
    assert params["contrast"].min() >= 0.5 and params["contrast"].max() <= 0.9
    assert params["hue"].abs().max() <= 0.1 and abs(float(params["hue"].mean())) < 0.005
    assert (params["order"].sort(1).values == torch.arange(4)).all()  # a permutation per image
    assert len({tuple(o) for o in params["order"].tolist()}) == 24


def test_color_jitter_ops_against_pil(seeded):
    images = smooth_images(3)
    for name, enhancer in (("brightness", ImageEnhance.Brightness), ("contrast", ImageEnhance.Contrast),
                           ("saturation", ImageEnhance.Color)):
        step = ColorJitter(**{name: 0.5})
        seeded(2)
        params = step.sample(3)
        out = step.apply(images, params)
        for image, factor, got in zip(images, params[name].tolist(), out):
            ref = np.asarray(enhancer(Image.fromarray(image.numpy())).enhance(factor))
            assert np.abs(got.numpy().astype(int) - ref).max() <= 1, name


def test_color_jitter_hue_shift_matches_pil_hsv():
    images = smooth_images(2)
    step = ColorJitter(hue=0.5)
    params = step.sample(2)
    params["hue"] = torch.tensor([0.25, -0.1], dtype=torch.float64)
    out = step.apply(images, params)
    for image, shift, got in zip(images, params["hue"].tolist(), out):
        hsv = np.asarray(Image.fromarray(image.numpy()).convert("HSV")).astype(int)
        got_hsv = np.asarray(Image.fromarray(got.numpy()).convert("HSV")).astype(int)
        mask = hsv[..., 1] > 60  # hue is defined where there is colour
        dh = (got_hsv[..., 0] - hsv[..., 0] - round(shift * 256)) % 256
        dh = np.minimum(dh, 256 - dh)
        assert np.median(dh[mask]) <= 2


# ---------------------------------------------------------------- RandAugment / AutoAugment operations

def op(name, magnitude, images, **kwargs):
    return AugOp(name, **kwargs)(images, torch.full((len(images),), float(magnitude), dtype=torch.float64),
                                 None, (128, 128, 128))


def pil_each(images, fn):
    return torch.from_numpy(np.stack([np.asarray(fn(Image.fromarray(im.numpy()))) for im in images]))


def test_pixel_ops_against_pil_and_numpy():
    images = smooth_images(3)
    x = images.numpy().astype(int)
    assert torch.equal(op("Invert", 0, images), 255 - images)
    assert torch.equal(op("Posterize", 2.3, images), images & 0b11100000)  # ceil(2.3) = 3 bits kept
    assert torch.equal(op("Posterize", 0, images), torch.zeros_like(images))
    assert torch.equal(op("Solarize", 100, images), torch.from_numpy(np.where(x >= 100, 255 - x, x).astype(np.uint8)))
    assert torch.equal(op("SolarizeAdd", 50, images),
                       torch.from_numpy(np.where(x < 128, np.minimum(x + 50, 255), x).astype(np.uint8)))
    assert torch.equal(op("Equalize", 0, images), pil_each(images, ImageOps.equalize))
    assert (op("AutoContrast", 0, images).int() - pil_each(images, ImageOps.autocontrast).int()).abs().max() <= 1
    for name, enhancer in (("Brightness", ImageEnhance.Brightness), ("Contrast", ImageEnhance.Contrast),
                           ("ColorTransform", ImageEnhance.Color), ("Sharpness", ImageEnhance.Sharpness)):
        for magnitude in (-0.7, 0.4):
            got = op(name, magnitude, images)
            ref = pil_each(images, lambda im: enhancer(im).enhance(1 + magnitude))
            assert (got.int() - ref.int()).abs().max() <= 1, (name, magnitude)


def test_geometric_ops():
    images = random_images(2, 20, 20)
    assert torch.equal(op("Rotate", 90, images), torch.rot90(images, -1, (1, 2)))  # positive = clockwise
    assert torch.equal(op("Rotate", -90, images), torch.rot90(images, 1, (1, 2)))
    shifted = op("Translate", 0.25, images, direction="horizontal")  # 5 px to the right
    assert torch.equal(shifted[:, :, 5:], images[:, :, :15]) and (shifted[:, :, :5] == 128).all()
    shifted = op("Translate", -0.1, images, direction="vertical")  # 2 px up
    assert torch.equal(shifted[:, :18], images[:, 2:]) and (shifted[:, 18:] == 128).all()
    sheared = op("Shear", 0.5, images, direction="horizontal")  # row y moves right by y / 2
    for y in (0, 4, 10):
        assert torch.equal(sheared[:, y, y // 2:], images[:, y, :20 - y // 2])
    assert torch.equal(op("Shear", 0.0, images, direction="vertical"), images)


def test_geometric_interpolation_and_pad_value_from_hparams():
    images = smooth_images(2, 24, 24)
    step = RandAugment("timm_increasing", 1, 9, hparams={"pad_val": [10, 20, 30], "interpolation": "bilinear"})
    rotate = next(o for o in step.ops if o.name == "Rotate")
    out = rotate(images, torch.tensor([45.0, 45.0], dtype=torch.float64), step.interpolation, step.pad_val)
    assert out[:, 0, 0].tolist() == [[10, 20, 30]] * 2  # a corner rotated out is padding
    nearest = rotate(images, torch.tensor([45.0, 45.0], dtype=torch.float64), None, step.pad_val)
    assert GEOMETRIC_OPS["Rotate"] == "nearest" and not torch.equal(out, nearest)


def test_rand_augment_draws(seeded):
    seeded(0)
    step = RandAugment("timm_increasing", num_policies=2, magnitude_level=9)
    params = step.sample(30000)
    assert len(params["rounds"]) == 2
    r = params["rounds"][0]
    applied = r["op"] >= 0
    assert float(applied.float().mean()) == pytest.approx(0.5, abs=0.01)
    counts = torch.bincount(r["op"][applied], minlength=len(step.ops)).double()
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()
    for k, aug in enumerate(step.ops):
        if aug.magnitude_range is None:
            continue
        magnitude = r["magnitude"][r["op"] == k]
        low, high = aug.magnitude_range
        expected = low + (high - low) * 0.9
        if aug.name in ("Rotate", "Shear", "Translate", "ColorTransform", "Contrast", "Brightness", "Sharpness"):
            assert torch.allclose(magnitude.abs(), torch.tensor(expected, dtype=torch.float64))
            assert float((magnitude < 0).double().mean()) == pytest.approx(0.5, abs=0.1)
        else:
            assert torch.allclose(magnitude, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("std", [0.5, "inf"])
def test_rand_augment_magnitude_noise(seeded, std):
    seeded(1)
    step = RandAugment("timm_increasing", 1, magnitude_level=6, magnitude_std=std)
    r = step.sample(20000)["rounds"][0]
    rotate = next(k for k, o in enumerate(step.ops) if o.name == "Rotate")
    level = r["magnitude"][r["op"] == rotate].abs() / 30 * 10  # Rotate: 0..30 degrees over 10 levels
    if std == "inf":
        assert level.min() >= 0 and level.max() <= 6 and float(level.mean()) == pytest.approx(3, abs=0.15)
    else:
        assert float(level.mean()) == pytest.approx(6, abs=0.05) and float(level.std()) == pytest.approx(0.5, abs=0.03)


def test_rand_augment_applies_the_drawn_ops(seeded):
    images = smooth_images(16)
    step = RandAugment("timm_increasing", 2, 9)
    seeded(5)
    params = step.sample(16)
    out = step.apply(images, params)
    for i in range(16):
        expected = images[i:i + 1]
        for r in params["rounds"]:
            k = int(r["op"][i])
            if k >= 0:
                expected = step.ops[k](expected, r["magnitude"][i:i + 1], step.interpolation, step.pad_val)
        assert torch.equal(out[i], expected[0])


def test_auto_augment_draws_and_application(seeded):
    seeded(0)
    step = AutoAugment("imagenet")
    params = step.sample(25000)
    counts = torch.bincount(params["policy"], minlength=25).double()
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()
    for k, sub in enumerate(AUTOAUG_POLICIES["imagenet"]):
        applied = params["applied"][params["policy"] == k]
        for j, aug in enumerate(sub):
            assert float(applied[:, j].double().mean()) == pytest.approx(aug.prob, abs=0.06)
    images = smooth_images(12)
    seeded(3)
    params = step.sample(12)
    out = step.apply(images, params)
    for i in range(12):
        expected = images[i:i + 1]
        for j, aug in enumerate(step.sub_policies[int(params["policy"][i])]):
            if params["applied"][i, j]:
                sign = -1 if params["negative"][i, j] and aug.name in ("Rotate", "Shear", "ColorTransform",
                                                                       "Contrast", "Sharpness") else 1
                magnitude = torch.tensor([sign * float(aug.magnitude)], dtype=torch.float64)
                expected = aug(expected, magnitude, None, (128, 128, 128))
        assert torch.equal(out[i], expected[0])


# ---------------------------------------------------------------- RandomErasing

def test_random_erasing_draws(seeded):
    seeded(0)
    step = RandomErasing(erase_prob=0.3, min_area_ratio=0.1, max_area_ratio=0.2, aspect_range=(0.5, 2.0))
    params = step.sample(20000, 50, 60)
    assert float(params["erase"].float().mean()) == pytest.approx(0.3, abs=0.015)
    top, left, h, w = params["boxes"].double().unbind(1)
    assert (top + h <= 50).all() and (left + w <= 60).all() and (top >= 0).all() and (left >= 0).all()
    area = h * w / 3000
    assert area.min() >= 0.1 - 0.02 and area.max() <= 0.2 + 0.02


@pytest.mark.parametrize("mode, fill_std", [("const", None), ("rand", None), ("rand", 5.0)])
def test_random_erasing_fills_only_the_box(seeded, mode, fill_std):
    images = random_images(6, 30, 40)
    step = RandomErasing(erase_prob=1.0, mode=mode, fill_color=[10, 200, 30], fill_std=fill_std)
    seeded(1)
    params = step.sample(6, 30, 40)
    out = step.apply(images, params)
    for image, got, (top, left, h, w) in zip(images, out, params["boxes"].tolist()):
        inside = torch.zeros(30, 40, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.equal(got[~inside], image[~inside])
        patch = got[inside].double()
        if mode == "const":
            assert (patch == torch.tensor([10.0, 200.0, 30.0])).all()
        elif fill_std is None:
            assert patch.std() > 50  # uniform noise
        else:
            assert (patch.mean(0) - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 3 and patch.std(0).max() < 8


# ---------------------------------------------------------------- seeding through the DataLoader

IMAGENET_STYLE = [
    {"type": "RandomResizedCrop", "scale": 24, "backend": "pillow", "interpolation": "bicubic"},
    {"type": "RandomFlip", "prob": 0.5, "direction": ["horizontal", "vertical"]},
    {"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
    {"type": "RandAugment", "policies": "timm_increasing", "num_policies": 2, "magnitude_level": 9,
     "magnitude_std": 0.5, "hparams": {"pad_val": [104, 116, 124], "interpolation": "bicubic"}},
    {"type": "RandomErasing", "erase_prob": 0.25, "mode": "rand", "min_area_ratio": 0.02,
     "max_area_ratio": 1 / 3, "fill_color": [103, 116, 123], "fill_std": [58, 57, 57]},
    {"type": "PackClsInputs"},
]


def test_imagenet_style_pipeline_reproducible_per_seed_and_epoch(seeded):  # seeded: resets the generator after
    recipe = {"model": {"head": {"num_classes": 10}},
              "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
              "train_dataloader": {"batch_size": 8, "dataset": {"type": "SyntheticCIFAR10", "num_samples": 16,
                                                                "seed": 0, "pipeline": IMAGENET_STYLE}}}
    ds = build_datasets(config_from_dict(recipe))["train"]

    def epochs(seed):
        loader = build_dataloader(ds, 8, shuffle=False, seed=seed)
        return [torch.cat([b["pixel_values"] for b in loader]) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first[0].shape == (16, 3, 24, 24) and first[0].dtype == torch.uint8
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])


# ---------------------------------------------------------------- recipe errors: one line naming the key

@pytest.mark.parametrize("step, match", [
    ({"type": "RandomResizedCrop"}, r"0\.scale: RandomResizedCrop requires 'scale'"),
    ({"type": "RandomResizedCrop", "scale": 224, "crop_ratio_range": [0.5, 0.1]}, r"0\.crop_ratio_range: expected"),
    ({"type": "RandomResizedCrop", "scale": 224, "ratio": [0.5, 1]},
     r"0\.ratio: unknown argument for RandomResizedCrop"),
    ({"type": "RandomResizedCrop", "scale": 224, "interpolation": "lanczos"}, r"0\.interpolation: expected one of"),
    ({"type": "ResizeEdge", "scale": 256, "edge": "shortest"}, r"0\.edge: expected one of .*did you mean 'short'"),
    ({"type": "ResizeEdge", "scale": [256, 256]}, r"0\.scale: expected a positive int"),
    ({"type": "RandomFlip", "direction": ["horizontal", "diagonl"]}, r"0\.direction: .*did you mean 'diagonal'"),
    ({"type": "RandomFlip", "prob": [0.6, 0.6], "direction": ["horizontal", "vertical"]}, r"0\.prob: a list of prob"),
    ({"type": "ColorJitter", "hue": 0.7}, r"0\.hue: expected"),
    ({"type": "ColorJitter", "brightness": -1}, r"0\.brightness: expected"),
    ({"type": "RandAugment", "policies": "timm", "num_policies": 2, "magnitude_level": 9},
     r"0\.policies: expected one of timm_increasing"),
    ({"type": "RandAugment", "policies": "timm_increasing", "num_policies": 0, "magnitude_level": 9},
     r"0\.num_policies: expected an int >= 1"),
    ({"type": "RandAugment", "policies": "timm_increasing", "num_policies": 2, "magnitude_level": 9,
      "magnitude_std": "big"}, r"0\.magnitude_std: expected a number or 'inf'"),
    ({"type": "RandAugment", "policies": "timm_increasing", "num_policies": 2, "magnitude_level": 9,
      "hparams": {"pad": 0}}, r"0\.hparams\.pad: unknown hparam \(did you mean 'pad_val'\?\)"),
    ({"type": "AutoAugment", "policies": "imagenet", "hparams": {"pad_val": 300}}, r"0\.hparams\.pad_val: expected"),
    ({"type": "RandomErasing", "erase_prob": 2}, r"0\.erase_prob: expected a number in \[0, 1\]"),
    ({"type": "RandomErasing", "mode": "random"}, r"0\.mode: expected one of const, rand"),
    ({"type": "RandomErasing", "min_area_ratio": 0.5, "max_area_ratio": 0.2}, r"0\.min_area_ratio: 0\.5 is above"),
])
def test_bad_step_arguments_name_the_key(step, match):
    with pytest.raises(RecipeError, match=r"^pipeline\." + match) as info:
        build_pipeline([step, {"type": "PackClsInputs"}])
    assert "\n" not in str(info.value)


def test_registry_has_the_mmpretrain_steps():
    assert {"RandomResizedCrop", "ResizeEdge", "ColorJitter", "RandAugment", "AutoAugment",
            "RandomErasing"} <= set(PIPELINE_STEPS)


def test_mmpretrain_imagenet_pipelines_run_on_mixed_size_jpegs(seeded):
    """mmpretrain's ImageNet fine-tune train / test pipelines, argument for argument (sizes scaled down)."""
    bgr_mean, bgr_std = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
    train = [
        {"type": "RandomResizedCrop", "scale": 32, "backend": "pillow", "interpolation": "bicubic"},
        {"type": "RandomFlip", "prob": 0.5, "direction": "horizontal"},
        {"type": "RandAugment", "policies": "timm_increasing", "num_policies": 2, "total_level": 10,
         "magnitude_level": 9, "magnitude_std": 0.5,
         "hparams": {"pad_val": [round(x) for x in bgr_mean], "interpolation": "bicubic"}},
        {"type": "RandomErasing", "erase_prob": 0.25, "mode": "rand", "min_area_ratio": 0.02,
         "max_area_ratio": 1 / 3, "fill_color": bgr_mean, "fill_std": bgr_std},
    ]
    test = [{"type": "ResizeEdge", "scale": 36, "edge": "short", "backend": "pillow", "interpolation": "bicubic"},
            {"type": "CenterCrop", "crop_size": 32}]
    photos = rows(*(smooth_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(60, 80), (80, 60), (50, 50)])),
                  fmt="JPEG")
    seeded(0)
    out = transform(train)(photos)["pixel_values"]
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    out = transform(test)(photos)["pixel_values"]
    assert out.shape == (3, 3, 32, 32)
    assert [ResizeEdge(36).output_size(hw) for hw in [(60, 80), (80, 60)]] == [(36, 48), (48, 36)]


def test_cv2_exact_backend_matches_opencv_bit_for_bit():
    """Resize backend 'cv2-exact' gives mmcv/cv2's pixels (reference written by cv2.resize)."""
    with open(os.path.join(os.path.dirname(__file__), "cv2_resize_reference.json")) as f:
        reference = json.load(f)
    image = torch.tensor(reference["img"], dtype=torch.uint8)[None]
    for size, expected in reference["out"].items():
        height, width = map(int, size.split("x"))
        exact = build_pipeline([{"type": "Resize", "scale": [height, width], "backend": "cv2-exact"},
                                {"type": "PackClsInputs"}])[0]
        assert torch.equal(exact(image)[0], torch.tensor(expected, dtype=torch.uint8)), size
    with pytest.raises(RecipeError, match="cv2-exact"):
        build_pipeline([{"type": "Resize", "scale": 8, "interpolation": "bicubic", "backend": "cv2-exact"},
                        {"type": "PackClsInputs"}])
