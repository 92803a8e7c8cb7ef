"""preprocessor_config.json: an image processor that reproduces the recipe's test pipeline.

The processor resizes a PIL image exactly as the test pipeline does, scales to [0, 1] and
normalises with the model's mean / std (given on the 0-255 scale), so its float output can
go straight into the model (which takes float input as already normalised).

The class is transformers' ViTImageProcessor: plain resize / center-crop / rescale /
normalise, understood by every transformers release. Without torchvision (never installed
here) AutoImageProcessor picks its PIL backend; with torchvision it picks the torchvision
one, which does the same operations.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("hf_finetune.hub")

PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_CLASS = "ViTImageProcessor"
DEFAULT_SIZE = 224
# PIL resample codes for the pipeline's Resize interpolation. Upscaling (CIFAR 32 -> 224)
# gives the same pixels as the pipeline's tensor resize; PIL antialiases when downscaling.
PIL_RESAMPLE = {"bilinear": 2, "nearest": 0}


def _hw(value, key: str) -> tuple[int, int]:
    """An mmcls size argument (int or [h, w]) as (height, width)."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{key}={value!r} is not a size: expected an int or [height, width]")


def pipeline_geometry(pipeline: list | None, where: str = "pipeline") -> dict | None:
    """Resize / center-crop of a pipeline as {'resize': (h, w) | None, 'crop': (h, w) | None, 'resample'}.

    Returns None when the pipeline has no step that fixes the output size.
    """
    resize = crop = None
    resample = PIL_RESAMPLE["bilinear"]
    for index, step in enumerate(pipeline or []):
        kind = step.get("type")
        if kind == "Resize":
            if crop is not None:
                # A processor resizes before it crops; keep the final size, drop the crop.
                logger.warning("%s.%d: Resize after CenterCrop cannot be reproduced exactly; "
                               "the image processor resizes to the final size", where, index)
                crop = None
            resize = _hw(step.get("scale"), f"{where}.{index}.scale")
            resample = PIL_RESAMPLE.get(step.get("interpolation", "bilinear"), PIL_RESAMPLE["bilinear"])
        elif kind in ("CenterCrop", "RandomCrop", "RandomResizedCrop"):
            size_key = "scale" if kind == "RandomResizedCrop" else "crop_size"
            crop = _hw(step.get(size_key), f"{where}.{index}.{size_key}")
    if resize is None and crop is None:
        return None
    return {"resize": resize, "crop": crop, "resample": resample}


def _read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    return config.to_dict()


def processor_dict(config, recipe: dict | None = None) -> dict:
    """The preprocessor_config.json content for a model config (+ the merged recipe)."""
    cfg = _config_dict(config)
    preprocessor = (recipe or {}).get("data_preprocessor") or {}
    mean = [float(v) for v in cfg.get("mean") or preprocessor.get("mean") or (123.675, 116.28, 103.53)]
    std = [float(v) for v in cfg.get("std") or preprocessor.get("std") or (58.395, 57.12, 57.375)]
    to_rgb = bool(cfg.get("to_rgb", preprocessor.get("to_rgb", False)))
    if to_rgb:
        # The model flips the channels, then normalises with (mean, std). An image
        # processor cannot reorder channels, so it normalises the unflipped image with the
        # statistics in the matching (flipped) order; the flip itself happens in the model
        # (remote code) or is folded into the first convolution (native export).
        mean, std = mean[::-1], std[::-1]

    geometry = None
    if recipe:
        test_pipeline = recipe.get("test_dataloader", {}).get("dataset", {}).get("pipeline")
        geometry = pipeline_geometry(test_pipeline, "test_dataloader.dataset.pipeline")
        if geometry is None:
            # The test images are used at their stored size: that is the size training saw
            # (its crop), so resizing any input image to it is exact on the test data.
            train_pipeline = recipe.get("train_dataloader", {}).get("dataset", {}).get("pipeline")
            geometry = pipeline_geometry(train_pipeline, "train_dataloader.dataset.pipeline")
            if geometry is not None:
                geometry = {"resize": geometry["crop"] or geometry["resize"], "crop": None,
                            "resample": geometry["resample"]}
    if geometry is None:
        size = int(cfg.get("image_size") or DEFAULT_SIZE)
        geometry = {"resize": (size, size), "crop": None, "resample": PIL_RESAMPLE["bilinear"]}

    resize, crop = geometry["resize"], geometry["crop"]
    return {
        "image_processor_type": PROCESSOR_CLASS,
        "do_convert_rgb": True,
        "do_resize": resize is not None,
        "size": {"height": (resize or crop)[0], "width": (resize or crop)[1]},
        "resample": geometry["resample"],
        "do_center_crop": crop is not None,
        "crop_size": {"height": (crop or resize)[0], "width": (crop or resize)[1]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [m / 255 for m in mean],
        "image_std": [s / 255 for s in std],
    }


def input_size(processor: dict) -> tuple[int, int]:
    """(height, width) of the tensors the processor produces."""
    key = "crop_size" if processor.get("do_center_crop") else "size"
    return processor[key]["height"], processor[key]["width"]


def write_image_processor_config(work_dir_or_out_dir: str, config=None, recipe: dict | None = None) -> str:
    """Write preprocessor_config.json into a work dir (or an export dir); returns its path.

    config: the model config (a PretrainedConfig or its dict); None reads DIR/config.json.
    recipe: the merged recipe; None reads DIR/recipe.json when it exists.
    """
    directory = str(work_dir_or_out_dir)
    if config is None:
        config_path = os.path.join(directory, "config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
    if recipe is None:
        recipe_path = os.path.join(directory, "recipe.json")
        recipe = _read_json(recipe_path) if os.path.exists(recipe_path) else None
    content = processor_dict(config, recipe)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROCESSOR_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")
    return path
