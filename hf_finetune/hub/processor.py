"""preprocessor_config.json: an image processor that reproduces the recipe's test pipeline.

The processor resizes a PIL image exactly as the test pipeline does, scales to [0, 1] and
normalises with the model's mean / std (given on the 0-255 scale), so its float output can
go straight into the model (which takes float input as already normalised).

The class is transformers' ViTImageProcessor: plain resize / center-crop / rescale /
normalise, understood by every transformers release. Without torchvision (never installed
here) AutoImageProcessor picks its PIL backend; with torchvision it picks the torchvision
one, which does the same operations.

A timm model's folder is the exception: AutoImageProcessor reads a timm_wrapper folder's
preprocessing from config.json's `pretrained_cfg` (TimmWrapperImageProcessor, timm's own
transforms) and never its preprocessor_config.json. So for those the same preprocessing is
also written there, in timm's terms (timm_preprocessing).
"""

from __future__ import annotations

import json
import logging
import math
import os

logger = logging.getLogger("hf_finetune.hub")

PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_CLASS = "ViTImageProcessor"
EDGE_PROCESSOR_CLASS = "BitImageProcessor"
DEFAULT_SIZE = 224
# PIL resample codes for the pipeline's Resize interpolation. Upscaling (CIFAR 32 -> 224)
# gives the same pixels as the pipeline's tensor resize; PIL antialiases when downscaling.
PIL_RESAMPLE = {"bilinear": 2, "nearest": 0, "bicubic": 3}
TIMM_MODEL_TYPE = "timm_wrapper"


def pipeline_geometry(steps) -> dict | None:
    """How a pipeline (typed Steps) sizes an image, asked of its steps: {'resize': (h, w) |
    None, 'shortest_edge': int | None, 'crop': (h, w) | None, 'resample'}; None when no step
    fixes the output size."""
    from hf_finetune.data.transforms import CenterCrop, RandomCrop, RandomResizedCrop, Resize, ResizeEdge

    resize = edge = crop = None
    resample = PIL_RESAMPLE["bilinear"]
    for step in steps:
        op = step.op
        if isinstance(op, (Resize, ResizeEdge)):
            if crop is not None:
                # A processor resizes before it crops; keep the final size, drop the crop.
                logger.warning("a resize after a crop cannot be reproduced exactly; "
                               "the image processor resizes to the final size")
                crop = None
            resample = PIL_RESAMPLE[op.interpolation]
            if isinstance(op, ResizeEdge) and op.edge == "short":
                resize, edge = None, op.scale
            elif isinstance(op, Resize):
                resize, edge = op.output_size(None), None
            else:
                logger.warning("ResizeEdge edge=%r has no image-processor equivalent; the processor "
                               "keeps the crop size only", op.edge)
        elif isinstance(op, (CenterCrop, RandomCrop, RandomResizedCrop)):
            crop = tuple(op.output_size(None))
    if resize is None and edge is None and crop is None:
        return None
    return {"resize": resize, "shortest_edge": edge, "crop": crop, "resample": resample}


def read_json(path: str):
    """A JSON file's content, None when there is no such file (the hub package's one reader)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    return config.to_dict()


def processor_dict(config, cfg=None) -> dict:
    """The preprocessor_config.json content for a model config (+ the run's Config)."""
    model = _config_dict(config)
    mean = [float(v) for v in model.get("mean") or (cfg.data_preprocessor.mean if cfg else (123.675, 116.28, 103.53))]
    std = [float(v) for v in model.get("std") or (cfg.data_preprocessor.std if cfg else (58.395, 57.12, 57.375))]
    to_rgb = bool(model.get("to_rgb", cfg.data_preprocessor.to_rgb if cfg else False))
    if to_rgb:
        # The model flips the channels, then normalises with (mean, std). An image
        # processor cannot reorder channels, so it normalises the unflipped image with the
        # statistics in the matching (flipped) order; the flip itself happens in the model
        # (remote code) or is folded into the first convolution (native export).
        mean, std = mean[::-1], std[::-1]

    geometry = None
    if cfg is not None and cfg.test_dataloader is not None:
        geometry = pipeline_geometry(cfg.test_dataloader.dataset.pipeline)
        if geometry is None and cfg.train_dataloader is not None:
            # The test images are used at their stored size: that is the size training saw
            # (its crop), so resizing any input image to it is exact on the test data.
            geometry = pipeline_geometry(cfg.train_dataloader.dataset.pipeline)
            if geometry is not None:
                geometry = {"resize": geometry["crop"] or geometry["resize"], "shortest_edge": None,
                            "crop": None, "resample": geometry["resample"]}
    if geometry is None:
        size = int(model.get("image_size") or DEFAULT_SIZE)
        geometry = {"resize": (size, size), "shortest_edge": None, "crop": None,
                    "resample": PIL_RESAMPLE["bilinear"]}

    resize, crop, edge = geometry["resize"], geometry["crop"], geometry["shortest_edge"]
    if edge is not None:
        # Short side to `edge`, aspect kept (mmpretrain's ResizeEdge): BiT's processor does that.
        size = {"shortest_edge": edge}
    else:
        size = {"height": (resize or crop)[0], "width": (resize or crop)[1]}
    return {
        "image_processor_type": PROCESSOR_CLASS if edge is None else EDGE_PROCESSOR_CLASS,
        "do_convert_rgb": True,
        "do_resize": resize is not None or edge is not None,
        "size": size,
        "resample": geometry["resample"],
        "do_center_crop": crop is not None,
        "crop_size": {"height": (crop or resize or (edge, edge))[0],
                      "width": (crop or resize or (edge, edge))[1]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [m / 255 for m in mean],
        "image_std": [s / 255 for s in std],
    }


def input_size(processor: dict) -> tuple[int, int]:
    """(height, width) of the tensors the processor produces."""
    key = "crop_size" if processor.get("do_center_crop") or "shortest_edge" in processor["size"] else "size"
    return processor[key]["height"], processor[key]["width"]


def saved_config(directory: str):
    """The Config of the run that wrote `directory` (its recipe.json), or None."""
    from hf_finetune.config import read_config

    path = os.path.join(directory, "recipe.json")
    return read_config(path) if os.path.exists(path) else None


def write_image_processor_config(work_dir_or_out_dir: str, config=None, cfg=None) -> str:
    """Write preprocessor_config.json into a work dir (or an export dir); returns its path.

    config: the model config (a PretrainedConfig or its dict); None reads DIR/config.json.
    cfg: the run's Config; None reads DIR/recipe.json when it exists.
    """
    directory = str(work_dir_or_out_dir)
    if config is None:
        config = read_json(os.path.join(directory, "config.json")) or {}
    if cfg is None:
        cfg = saved_config(directory)
    processor = processor_dict(config, cfg)
    if _config_dict(config).get("model_type") == TIMM_MODEL_TYPE and os.path.isfile(
            os.path.join(directory, "config.json")):
        write_timm_preprocessing(processor, directory)  # where AutoImageProcessor reads a timm model's
    return save_image_processor(processor, directory)


def timm_preprocessing(processor: dict) -> dict:
    """The pretrained_cfg keys with which timm's evaluation transform (transforms_imagenet_eval:
    resize to floor(input_size / crop_pct), center crop input_size, normalise) does what
    `processor` (a processor_dict) does. Exact for a shortest-edge resize and a square crop,
    and for a resize to (height, width) whose crop keeps the aspect ratio; otherwise the
    nearest timm has (said in a warning)."""
    height, width = input_size(processor)
    size = processor["size"]
    if "shortest_edge" in size:
        mode, target = "center", size["shortest_edge"]  # timm resizes the short side when the crop is square
        exact = height == width and processor["do_center_crop"]  # timm always crops
    else:
        mode, target = "squash", size["height"]  # timm resizes to (height, width) / crop_pct
        exact = size["height"] * width == size["width"] * height
    if not exact:
        logger.warning("timm's evaluation transform cannot reproduce a resize to %s and a %dx%d crop exactly; "
                       "the timm model's config.json has the nearest", size, height, width)
    crop_pct = height / target
    while math.floor(height / crop_pct) < target:  # timm floors height / crop_pct: land on target itself
        crop_pct = math.nextafter(crop_pct, 0.0)
    interpolation = {code: name for name, code in PIL_RESAMPLE.items()}[processor["resample"]]
    return {"input_size": [3, height, width], "crop_pct": crop_pct, "crop_mode": mode, "interpolation": interpolation,
            "mean": list(processor["image_mean"]), "std": list(processor["image_std"])}


def write_timm_preprocessing(processor: dict, directory: str) -> None:
    """Put timm_preprocessing(processor) into DIRECTORY/config.json's pretrained_cfg (atomically)."""
    from hf_finetune.workdir import dump_json

    path = os.path.join(directory, "config.json")
    config = read_json(path)
    config["pretrained_cfg"] = {**(config.get("pretrained_cfg") or {}), **timm_preprocessing(processor)}
    dump_json(config, path)


def save_image_processor(processor: dict, directory: str) -> str:
    """Write a processor_dict as transformers' image-processor class saves itself; returns the path."""
    from transformers import BitImageProcessorPil, ViTImageProcessorPil  # PIL backends: no torchvision needed

    cls = BitImageProcessorPil if processor["image_processor_type"] == EDGE_PROCESSOR_CLASS else ViTImageProcessorPil
    cls(**{key: value for key, value in processor.items() if key != "image_processor_type"}).save_pretrained(directory)
    return os.path.join(directory, PROCESSOR_FILE)
