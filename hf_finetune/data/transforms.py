"""Batched uint8 pipeline steps (mmcls names) and the dataset transform that runs them.

Images travel as one uint8 tensor per batch in NHWC memory layout, i.e. what
PIL decodes into. Viewed as NCHW that is torch's ``channels_last`` format, the
layout in which ``F.interpolate`` has its fast uint8 kernels, and the layout
``PackClsInputs`` hands over: ``pixel_values`` is logically [N, 3, H, W] with
channels_last strides (no copy). Normalisation happens on the device inside the
model (``data_preprocessor``), never here.

Random steps split their work in two so tests can replay the exact draws:
``sample(n, height, width)`` draws the parameters for n images from the pipeline
RNG (see runtime.pipeline_generator), ``apply(images, params)`` uses them.
"""

from __future__ import annotations

import difflib
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RecipeError
from .decode import decode_image
from .runtime import BatchDataError, pipeline_generator

ROW_COLUMN = "__row__"  # original row index within the split, for error messages


def _did_you_mean(name, options) -> str:
    name, options = str(name), [str(o) for o in options]
    close = difflib.get_close_matches(name, options, n=1)
    if not close:  # "probability" -> "prob": a shared prefix is a good hint too
        close = [o for o in options if len(o) >= 3 and (name.startswith(o) or o.startswith(name))][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _size_pair(value, key: str) -> tuple[int, int]:
    """int -> (v, v); [h, w] -> (h, w); all >= 1."""
    if _is_int(value) and value >= 1:
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value):
        return int(value[0]), int(value[1])
    raise RecipeError(f"{key}: expected a positive int or [height, width] of positive ints, got {value!r}")


class PipelineStep:
    """Base class: argument validation shared by every step."""

    ARGS: tuple[str, ...] = ()
    REQUIRED: tuple[str, ...] = ()
    random = False

    @classmethod
    def from_config(cls, config: dict, key: str) -> "PipelineStep":
        args = {k: v for k, v in config.items() if k != "type"}
        for name in args:
            if name not in cls.ARGS:
                accepted = ", ".join(cls.ARGS) if cls.ARGS else "none"
                name = name if len(name) <= 200 else name[:197] + "..."  # keys can be megabytes
                raise RecipeError(f"{key}.{name}: unknown argument for {cls.__name__}{_did_you_mean(name, cls.ARGS)}; "
                                  f"accepted arguments: {accepted}")
        for name in cls.REQUIRED:
            if name not in args:
                raise RecipeError(f"{key}.{name}: {cls.__name__} requires '{name}'")
        return cls(**args, key=key)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.ARGS if hasattr(self, k))
        return f"{type(self).__name__}({args})"


class RandomCrop(PipelineStep):
    """Pad with a constant, then crop ``crop_size`` at a uniformly drawn offset (mmcls RandomCrop).

    padding: int (all sides), [left/right, top/bottom] or [left, top, right, bottom].
    pad_val: int or [r, g, b] in 0..255.
    """

    ARGS = ("crop_size", "padding", "pad_val", "padding_mode")
    REQUIRED = ("crop_size",)
    random = True

    def __init__(self, crop_size, padding=None, pad_val=0, padding_mode="constant", *, key="RandomCrop"):
        self.crop_size = _size_pair(crop_size, f"{key}.crop_size")
        self.padding = self._parse_padding(padding, f"{key}.padding")
        if _is_int(pad_val) and 0 <= pad_val <= 255:
            self.pad_val = (int(pad_val),) * 3
        elif (isinstance(pad_val, (list, tuple)) and len(pad_val) == 3
              and all(_is_int(v) and 0 <= v <= 255 for v in pad_val)):
            self.pad_val = tuple(int(v) for v in pad_val)
        else:
            raise RecipeError(f"{key}.pad_val: expected an int 0..255 or [r, g, b] of them, got {pad_val!r}")
        if padding_mode != "constant":
            raise RecipeError(f"{key}.padding_mode: only 'constant' is supported, got {padding_mode!r}")
        self.padding_mode = padding_mode

    @staticmethod
    def _parse_padding(padding, key) -> tuple[int, int, int, int]:
        """-> (left, top, right, bottom)."""
        if padding is None:
            return (0, 0, 0, 0)
        if _is_int(padding) and padding >= 0:
            return (int(padding),) * 4
        if isinstance(padding, (list, tuple)) and all(_is_int(v) and v >= 0 for v in padding):
            if len(padding) == 2:
                return (int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1]))
            if len(padding) == 4:
                return tuple(int(v) for v in padding)
        raise RecipeError(f"{key}: expected a non-negative int, [left/right, top/bottom] or "
                          f"[left, top, right, bottom], got {padding!r}")

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        left, top, right, bottom = self.padding
        return height + top + bottom, width + left + right

    def sample(self, n: int, height: int, width: int) -> dict:
        padded_h, padded_w = self._padded_size(height, width)
        crop_h, crop_w = self.crop_size
        if crop_h > padded_h or crop_w > padded_w:
            raise BatchDataError(f"RandomCrop: crop_size {crop_h}x{crop_w} is larger than the padded image "
                                 f"{padded_h}x{padded_w}; put a Resize before it or lower crop_size")
        generator = pipeline_generator()
        return {"top": torch.randint(0, padded_h - crop_h + 1, (n,), generator=generator),
                "left": torch.randint(0, padded_w - crop_w + 1, (n,), generator=generator)}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        n, height, width, channels = images.shape
        left, top, right, bottom = self.padding
        padded_h, padded_w = self._padded_size(height, width)
        if any(self.padding):
            if len(set(self.pad_val)) == 1:
                padded = images.new_full((n, padded_h, padded_w, channels), self.pad_val[0])
            else:
                padded = images.new_empty((n, padded_h, padded_w, channels))
                for c, value in enumerate(self.pad_val):
                    padded[..., c].fill_(value)
            padded[:, top:top + height, left:left + width] = images
        else:
            padded = images.contiguous()
        # A view of every crop window ([n, offsets_y, offsets_x, crop_h, crop_w, c], no copy),
        # then one indexed copy picks each image's window.
        crop_h, crop_w = self.crop_size
        s_n, s_h, s_w, s_c = padded.stride()
        windows = padded.as_strided((n, padded_h - crop_h + 1, padded_w - crop_w + 1, crop_h, crop_w, channels),
                                    (s_n, s_h, s_w, s_h, s_w, s_c))
        return windows[torch.arange(n), params["top"], params["left"]]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], images.shape[1], images.shape[2]))


class RandomFlip(PipelineStep):
    """Flip each image with probability ``prob`` (mmcls RandomFlip)."""

    ARGS = ("prob", "direction")
    DIRECTIONS = {"horizontal": 2, "vertical": 1}  # the NHWC dim each direction reverses
    random = True

    def __init__(self, prob=0.5, direction="horizontal", *, key="RandomFlip"):
        if not isinstance(prob, numbers.Real) or isinstance(prob, bool) or not 0.0 <= prob <= 1.0:
            raise RecipeError(f"{key}.prob: expected a number in [0, 1], got {prob!r}")
        if direction not in self.DIRECTIONS:
            raise RecipeError(f"{key}.direction: expected one of {', '.join(self.DIRECTIONS)}, got {direction!r}"
                              f"{_did_you_mean(direction, self.DIRECTIONS)}")
        self.prob = float(prob)
        self.direction = direction

    def sample(self, n: int, height: int = 0, width: int = 0) -> dict:
        return {"flip": torch.rand(n, generator=pipeline_generator()) < self.prob}

    def apply(self, images: torch.Tensor, params: dict, *, inplace: bool = False) -> torch.Tensor:
        chosen = params["flip"].nonzero().squeeze(1)
        if chosen.numel() == 0:
            return images
        out = images if inplace else images.clone()
        out[chosen] = images[chosen].flip(self.DIRECTIONS[self.direction])
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The pipeline owns its batch tensor, so flipping in place saves a full copy.
        return self.apply(images, self.sample(images.shape[0]), inplace=True)


class Resize(PipelineStep):
    """Resize to ``scale`` (int -> square, or [height, width]); no keep-ratio, as mmcv Resize.

    Bilinear uses half-pixel centres without antialiasing (cv2.INTER_LINEAR semantics).
    """

    ARGS = ("scale", "interpolation")
    REQUIRED = ("scale",)
    MODES = ("bilinear", "nearest")

    def __init__(self, scale, interpolation="bilinear", *, key="Resize"):
        self.scale = _size_pair(scale, f"{key}.scale")
        if interpolation not in self.MODES:
            raise RecipeError(f"{key}.interpolation: expected one of {', '.join(self.MODES)}, got {interpolation!r}"
                              f"{_did_you_mean(interpolation, self.MODES)}")
        self.interpolation = interpolation

    def apply(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if tuple(images.shape[1:3]) == self.scale:
            return images
        nchw = images.permute(0, 3, 1, 2)  # channels_last view of the NHWC batch
        if not nchw.is_contiguous(memory_format=torch.channels_last):
            nchw = nchw.contiguous(memory_format=torch.channels_last)
        extra = {"align_corners": False, "antialias": False} if self.interpolation == "bilinear" else {}
        out = F.interpolate(nchw, size=self.scale, mode=self.interpolation, **extra)
        return out.permute(0, 2, 3, 1)

    __call__ = apply


class CenterCrop(PipelineStep):
    """Crop the centre ``crop_size`` (int or [height, width]); offsets rounded as mmcv does."""

    ARGS = ("crop_size",)
    REQUIRED = ("crop_size",)

    def __init__(self, crop_size, *, key="CenterCrop"):
        self.crop_size = _size_pair(crop_size, f"{key}.crop_size")

    def apply(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        height, width = images.shape[1:3]
        crop_h, crop_w = self.crop_size
        if crop_h > height or crop_w > width:
            raise BatchDataError(f"CenterCrop: crop_size {crop_h}x{crop_w} is larger than the image "
                                 f"{height}x{width}; put a Resize before it or lower crop_size")
        top = max(0, int(round((height - crop_h) / 2.0)))
        left = max(0, int(round((width - crop_w) / 2.0)))
        return images[:, top:top + crop_h, left:left + crop_w]

    __call__ = apply


class PackClsInputs(PipelineStep):
    """Last step: {"pixel_values": uint8 [N, 3, H, W] (channels_last memory), "labels": int64 [N]}.

    channels_last because the batch already is in that memory order: making it
    NCHW-contiguous would copy the whole batch (at 224 px this more than halves
    the loader's throughput), and the model's first op (uint8 -> float,
    normalise) keeps the layout, which convolutions accept as is.
    """

    ARGS = ()

    def __init__(self, *, key="PackClsInputs"):
        pass

    def pack(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        if not images.is_contiguous():
            images = images.contiguous()
        return {"pixel_values": images.permute(0, 3, 1, 2), "labels": labels}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images


PIPELINE_STEPS: dict[str, type[PipelineStep]] = {
    "RandomCrop": RandomCrop,
    "RandomFlip": RandomFlip,
    "Resize": Resize,
    "CenterCrop": CenterCrop,
    "PackClsInputs": PackClsInputs,
}


def build_pipeline(config, key: str = "pipeline") -> list[PipelineStep]:
    """Validate a recipe pipeline (list of {"type": STEP, ...args}) into step objects."""
    if config is None:
        config = [{"type": "PackClsInputs"}]
    if not isinstance(config, (list, tuple)):
        raise RecipeError(f"{key}: expected a list of steps, got {type(config).__name__}")
    known = ", ".join(PIPELINE_STEPS)
    steps = []
    for i, step_config in enumerate(config):
        step_key = f"{key}.{i}"
        if not isinstance(step_config, dict) or "type" not in step_config:
            raise RecipeError(f"{step_key}: each pipeline step is a dict with a 'type' (one of {known})")
        name = step_config["type"]
        if name not in PIPELINE_STEPS:
            raise RecipeError(f"{step_key}.type: unknown pipeline step {name!r}{_did_you_mean(name, PIPELINE_STEPS)}; "
                              f"known steps: {known}")
        steps.append(PIPELINE_STEPS[name].from_config(step_config, step_key))
    if not steps or not isinstance(steps[-1], PackClsInputs):
        raise RecipeError(f"{key}: the pipeline must end with {{\"type\": \"PackClsInputs\"}}")
    for i, step in enumerate(steps[:-1]):
        if isinstance(step, PackClsInputs):
            raise RecipeError(f"{key}.{i}.type: PackClsInputs must be the last step")
    return steps


class BatchTransform:
    """The ``set_transform`` callable: a batch of dataset rows -> model inputs.

    Decodes the (undecoded) image column, runs the steps on the whole batch and
    packs it. Batches whose images differ in size run the steps per size group;
    the pipeline must then bring them to one size (Resize / CenterCrop).
    """

    def __init__(self, steps, *, image_column: str, label_column: str, source: str, on_corrupt: str = "error",
                 label_names: list[str] | None = None):
        self.steps = list(steps[:-1])
        self.packer = steps[-1]
        self.image_column = image_column
        self.label_column = label_column
        self.source = source
        self.on_corrupt = on_corrupt
        self.label_names = label_names  # index = label id; read by data.label_names()
        self.skipped = 0  # per process

    def decode(self, items, rows) -> tuple[list[np.ndarray], list[int]]:
        arrays, kept = [], []
        for pos, item in enumerate(items):
            try:
                arrays.append(decode_image(item))
            except Exception as exc:
                path = item.get("path") if isinstance(item, dict) else None
                where = f"index {rows[pos]}" + (f" ({path})" if path else "")
                if self.on_corrupt != "skip":
                    raise BatchDataError(
                        f"cannot decode image at {where} of {self.source}: {exc}. Fix or remove it, or set "
                        f"dataset.on_corrupt to \"skip\" to drop undecodable images") from exc
                self.skipped += 1
                if self.skipped == 1:
                    warnings.warn(f"skipping undecodable image at {where} of {self.source}: {exc} "
                                  f"(on_corrupt='skip'; later ones are skipped silently)", stacklevel=2)
                continue
            kept.append(pos)
        return arrays, kept

    def run_steps(self, images: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            images = step(images)
        return images

    def __call__(self, batch: dict) -> dict:
        items = batch[self.image_column]
        rows = batch.get(ROW_COLUMN) or list(range(len(items)))
        arrays, kept = self.decode(items, rows)
        if not arrays:
            raise BatchDataError(f"no image of this batch of {self.source} could be decoded (indices {list(rows)[:8]})")
        labels = batch[self.label_column]
        labels = torch.tensor(labels if len(kept) == len(items) else [labels[p] for p in kept], dtype=torch.int64)
        first_shape = arrays[0].shape
        if all(a.shape == first_shape for a in arrays):
            images = self.run_steps(torch.from_numpy(np.stack(arrays)))
        else:
            images = self._run_by_size(arrays)
        return self.packer.pack(images, labels)

    def _run_by_size(self, arrays: list[np.ndarray]) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        outputs = {shape: self.run_steps(torch.from_numpy(np.stack([arrays[i] for i in idx])))
                   for shape, idx in groups.items()}
        out_shapes = {tuple(o.shape[1:]) for o in outputs.values()}
        if len(out_shapes) > 1:
            sizes = sorted({f"{s[1]}x{s[0]}" for s in groups})
            raise BatchDataError(f"images of {self.source} have different sizes ({', '.join(sizes)}) and the pipeline "
                                 f"does not bring them to one size; add a Resize (or Resize + CenterCrop) step")
        out = torch.empty((len(arrays), *out_shapes.pop()), dtype=torch.uint8)
        for shape, idx in groups.items():
            out[torch.tensor(idx)] = outputs[shape]
        return out
