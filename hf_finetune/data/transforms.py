"""Batched uint8 pipeline steps (mmcls names) and the dataset transform that runs them.

Images travel as one uint8 tensor per batch in NHWC memory layout, i.e. what
PIL decodes into. Viewed as NCHW that is torch's ``channels_last`` format, the
layout in which ``F.interpolate`` has its fast uint8 kernels, and the layout
``PackClsInputs`` hands over: ``pixel_values`` is logically [N, 3, H, W] with
channels_last strides (no copy). Normalisation happens on the device inside the
model (``data_preprocessor``), never here.

Random steps split their work in two so tests can replay the exact draws:
``sample(n, height, width, generator)`` draws the parameters for n images from
``generator`` (None: torch's global RNG, as in DataLoader workers), ``apply(images,
params)`` uses them. The loader hands each batch its generator (loader.WholeBatches).

Images of different sizes (photos) reach the first step as a list of
``LazyImage`` (decoded on demand). Steps that can take such a list
(``accepts_list``: RandomResizedCrop, ResizeEdge, Resize, CenterCrop) decode
each image's region only, at a reduced JPEG scale when the output is much
smaller, and return one batch tensor when their outputs share a size.

In our loader's workers the batch's final pixels are written into shared memory the
main process reads without a copy (``lend``: ring.BatchRing.lend, handed over with the
batch): a final Resize writes there directly, PackClsInputs copies whatever else the
last step made.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..errors import RecipeError
from ..recipe import did_you_mean as _did_you_mean
from ..recipe import is_int as _is_int
from ..recipe import is_number as _is_number
from .decode import LazyImage
from .labels import class_lists_to_multi_hot
from .runtime import BatchDataError, record_skipped, undecodable_message

ROW_COLUMN = "__row__"  # original row index within the split, for error messages


def _size_pair(value, key: str) -> tuple[int, int]:
    """int -> (v, v); [h, w] -> (h, w); all >= 1."""
    if _is_int(value) and value >= 1:
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value):
        return int(value[0]), int(value[1])
    raise RecipeError(f"{key}: expected a positive int or [height, width] of positive ints, got {value!r}")


def _choice(value, options, key: str) -> str:
    if value not in options:
        raise RecipeError(f"{key}: expected one of {', '.join(options)}, got {value!r}{_did_you_mean(value, options)}")
    return value


def _probability(value, key: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise RecipeError(f"{key}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _range(value, key: str, low: float, high: float, *, ordered: bool = True) -> tuple[float, float]:
    """[a, b] of numbers within [low, high] (a <= b when ordered)."""
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and low <= v <= high for v in value)
            and (not ordered or value[0] <= value[1])):
        return float(value[0]), float(value[1])
    raise RecipeError(f"{key}: expected [min, max] with {low} <= min <= max <= {high}, got {value!r}")


def _color(value, key: str) -> tuple:
    """A number 0..255 or [r, g, b] of them (mmpretrain configs pass float means, e.g. fill_color=bgr_mean)."""
    if _is_number(value) and 0 <= value <= 255:
        return (value,) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) and 0 <= v <= 255 for v in value):
        return tuple(value)
    raise RecipeError(f"{key}: expected a number 0..255 or [r, g, b] of them, got {value!r}")


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# mmcv's resize backends: pillow antialiases when shrinking, cv2 does not. "cv2" is torch's
# bilinear (same geometry as cv2, rounding may differ by 1); "cv2-exact" reproduces cv2's
# fixed-point arithmetic bit for bit (bilinear only, slower): mmpretrain's pixels exactly.
BACKENDS = ("cv2", "pillow", "cv2-exact")


# F.interpolate's kernels with an `out` argument, by (mode, antialias): F.interpolate has none,
# and writing the resized batch straight into the loader's shared slot saves a copy of it.
# torch.ops.aten overloads are not a documented Python API: checked on torch 2.13 (the schema
# test in tests/test_batch_ring.py fails when torch changes them). Used by _resize only.
_RESIZE_INTO = {
    ("bilinear", False): torch.ops.aten.upsample_bilinear2d.out,
    ("bilinear", True): torch.ops.aten._upsample_bilinear2d_aa.out,
    ("bicubic", False): torch.ops.aten.upsample_bicubic2d.out,
    ("bicubic", True): torch.ops.aten._upsample_bicubic2d_aa.out,
}


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str, backend: str = "cv2",
            out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC -> uint8 NHWC of `size`, with half-pixel centres (cv2 / PIL geometry).
    out: an NHWC tensor to write into (the loader's shared memory), when the kernel can."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    if backend == "cv2-exact" and mode == "bilinear":
        return _resize_cv2_exact(images, *size)
    nchw = images.permute(0, 3, 1, 2)  # channels_last view of the NHWC batch
    if not nchw.is_contiguous(memory_format=torch.channels_last):
        nchw = nchw.contiguous(memory_format=torch.channels_last)
    antialias = backend == "pillow"
    if out is not None and (mode, antialias) in _RESIZE_INTO:
        _RESIZE_INTO[mode, antialias](nchw, list(size), False, None, None, out=out.permute(0, 3, 1, 2))
        return out
    extra = {} if mode == "nearest" else {"align_corners": False, "antialias": antialias}
    return F.interpolate(nchw, size=size, mode=mode, **extra).permute(0, 2, 3, 1)


def _resize_backend(backend, interpolation, key):
    backend = _choice(backend, BACKENDS, f"{key}.backend")
    if backend == "cv2-exact" and interpolation != "bilinear":
        raise RecipeError(f"{key}.backend: 'cv2-exact' reproduces cv2's bilinear resize only; "
                          f"use interpolation 'bilinear' or backend 'cv2'")
    return backend


def _cv2_taps(src: int, dst: int, clamp_weights: bool):
    """cv2 INTER_LINEAR source indices and 11-bit fixed-point weights per output position.
    Columns outside the image take the edge pixel at full weight (clamp_weights); rows keep
    their fractional weights and read the clamped edge row, as cv::resize does."""
    position = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).float()
    index = position.floor()
    fraction = position - index  # float32, as cv2
    index = index.long()
    if clamp_weights:
        fraction = torch.where((index < 0) | (index >= src - 1), torch.zeros_like(fraction), fraction)
    w0 = torch.round((1 - fraction) * 2048).to(torch.int32)  # cvRound: half to even
    w1 = torch.round(fraction * 2048).to(torch.int32)
    return index.clamp(0, src - 1), (index + 1).clamp(0, src - 1), w0, w1


def _resize_cv2_exact(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with cv2.resize's integer arithmetic (no cv2 needed): horizontal pass
    in 11-bit weights, then the vertical pass with cv2's shifts and rounding."""
    _, h, w, _ = images.shape
    x0, x1, a0, a1 = _cv2_taps(w, width, True)
    y0, y1, b0, b1 = _cv2_taps(h, height, False)
    src = images.to(torch.int32)
    rows = (src[:, :, x0] * a0.view(1, 1, -1, 1) + src[:, :, x1] * a1.view(1, 1, -1, 1)) >> 4
    top = (rows[:, y0] * b0.view(1, -1, 1, 1)) >> 16
    bottom = (rows[:, y1] * b1.view(1, -1, 1, 1)) >> 16
    return ((top + bottom + 2) >> 2).clamp(0, 255).to(torch.uint8)


def _pixels(image, box=None, min_size=None) -> torch.Tensor:
    """[H, W, 3] uint8 of a LazyImage (decoding only `box`) or an already decoded tensor."""
    if isinstance(image, LazyImage):
        pixels = image.pixels(box, min_size)
        # Decoders hand out read-only buffers; torch wants writable memory (a copy of the region only).
        return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
    if box is None:
        return image
    top, left, height, width = box
    return image[top:top + height, left:left + width]


def _image_size(image) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, LazyImage) else tuple(image.shape[:2])


def _stack_or_list(images: list[torch.Tensor]):
    """One batch tensor when every image has the same shape, else the list."""
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images)
    return images


class PipelineStep:
    """Base class: argument validation shared by every step."""

    ARGS: tuple[str, ...] = ()
    REQUIRED: tuple[str, ...] = ()
    random = False
    accepts_list = False  # apply_list(list of LazyImage / [H, W, 3] tensors, generator) -> batch tensor or list

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) this step outputs for an input of in_hw (the image-processor export asks)."""
        return tuple(in_hw)

    def sample(self, n: int, height: int = 0, width: int = 0, generator=None) -> dict | None:
        """This batch's random parameters (none for a step that draws nothing)."""
        return None

    def finish(self, images: torch.Tensor, generator=None, lend=None) -> torch.Tensor:
        """As the pipeline's last step (a step may write its output into `lend(shape)`)."""
        return self(images, generator)

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

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Draw this batch's parameters from `generator` (None: torch's global RNG) and apply them."""
        return self.apply(images, self.sample(*images.shape[:3], generator=generator))

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

    def output_size(self, in_hw):
        return self.crop_size

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        left, top, right, bottom = self.padding
        return height + top + bottom, width + left + right

    def sample(self, n: int, height: int, width: int, generator=None) -> dict:
        padded_h, padded_w = self._padded_size(height, width)
        crop_h, crop_w = self.crop_size
        if crop_h > padded_h or crop_w > padded_w:
            raise BatchDataError(f"RandomCrop: crop_size {crop_h}x{crop_w} is larger than the padded image "
                                 f"{padded_h}x{padded_w}; put a Resize before it or lower crop_size")
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


class RandomFlip(PipelineStep):
    """Flip each image with probability ``prob`` (mmcv RandomFlip).

    direction: 'horizontal', 'vertical', 'diagonal' (both axes) or a list of them.
    With a list, ``prob`` is either one number shared equally between the
    directions or a list with one probability per direction (sum <= 1); each
    image gets at most one flip.
    """

    ARGS = ("prob", "direction")
    DIRECTIONS = {"horizontal": (2,), "vertical": (1,), "diagonal": (1, 2)}  # the NHWC dims each one reverses
    random = True

    def __init__(self, prob=0.5, direction="horizontal", *, key="RandomFlip"):
        directions = [direction] if isinstance(direction, str) else direction
        if not isinstance(directions, (list, tuple)) or not directions:
            raise RecipeError(f"{key}.direction: expected one of {', '.join(self.DIRECTIONS)} or a list of them, "
                              f"got {direction!r}")
        for d in directions:
            _choice(d, self.DIRECTIONS, f"{key}.direction")
        if isinstance(prob, (list, tuple)):
            if len(prob) != len(directions) or not all(_is_number(p) and p >= 0 for p in prob) or sum(prob) > 1:
                raise RecipeError(f"{key}.prob: a list of prob needs one number >= 0 per direction "
                                  f"({len(directions)}) summing to at most 1, got {prob!r}")
            probs = [float(p) for p in prob]
        else:
            probs = [_probability(prob, f"{key}.prob") / len(directions)] * len(directions)
        self.prob = prob if isinstance(prob, (list, tuple)) else float(prob)
        self.direction = direction
        self.directions = list(directions)
        self.bounds = torch.tensor(probs, dtype=torch.float64).cumsum(0)  # direction k when u < bounds[k]

    def sample(self, n: int, height: int = 0, width: int = 0, generator=None) -> dict:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        choice = torch.searchsorted(self.bounds, u, right=True)  # == len(directions): no flip
        return {"flip": choice < len(self.directions), "direction": choice}

    def apply(self, images: torch.Tensor, params: dict, *, inplace: bool = False) -> torch.Tensor:
        if not params["flip"].any():
            return images
        out = images if inplace else images.clone()
        for k, name in enumerate(self.directions):
            chosen = (params["flip"] & (params["direction"] == k)).nonzero().squeeze(1)
            if chosen.numel():
                out[chosen] = images[chosen].flip(self.DIRECTIONS[name])
        return out

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        # The pipeline owns its batch tensor, so flipping in place saves a full copy.
        return self.apply(images, self.sample(images.shape[0], generator=generator), inplace=True)


class Resize(PipelineStep):
    """Resize to ``scale`` (int -> square, or [height, width]); no keep-ratio, as mmcv Resize.

    interpolation: bilinear (default), bicubic or nearest, with half-pixel centres
    and no antialiasing (cv2 semantics); backend 'pillow' antialiases when shrinking.
    """

    ARGS = ("scale", "interpolation", "backend")
    REQUIRED = ("scale",)
    accepts_list = True

    def __init__(self, scale, interpolation="bilinear", backend="cv2", *, key="Resize"):
        self.scale = _size_pair(scale, f"{key}.scale")
        self.interpolation = _choice(interpolation, INTERPOLATIONS, f"{key}.interpolation")
        self.backend = _resize_backend(backend, self.interpolation, key)

    def output_size(self, in_hw):
        return self.scale

    def apply(self, images: torch.Tensor, params: dict | None = None, out=None) -> torch.Tensor:
        return _resize(images, self.scale, self.interpolation, self.backend, out)

    def finish(self, images, generator=None, lend=None):
        # Write straight into the loader's shared memory: saves copying the enlarged batch there.
        return self.apply(images, out=lend((images.shape[0], *self.scale, images.shape[3])) if lend else None)

    def apply_list(self, images: list, generator=None) -> torch.Tensor:
        pixels = [_pixels(im, min_size=self.scale) for im in images]
        if all(p.shape == pixels[0].shape for p in pixels):
            return self.apply(torch.stack(pixels))
        return torch.cat([self.apply(p[None]) for p in pixels])


class CenterCrop(PipelineStep):
    """Crop the centre ``crop_size`` (int or [height, width]); offsets rounded as mmcv does."""

    ARGS = ("crop_size",)
    REQUIRED = ("crop_size",)
    accepts_list = True

    def __init__(self, crop_size, *, key="CenterCrop"):
        self.crop_size = _size_pair(crop_size, f"{key}.crop_size")

    def output_size(self, in_hw):
        return self.crop_size

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = self.crop_size
        if crop_h > height or crop_w > width:
            raise BatchDataError(f"CenterCrop: crop_size {crop_h}x{crop_w} is larger than the image "
                                 f"{height}x{width}; put a Resize before it or lower crop_size")
        top = max(0, int(round((height - crop_h) / 2.0)))
        left = max(0, int(round((width - crop_w) / 2.0)))
        return top, left, crop_h, crop_w

    def apply(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        top, left, crop_h, crop_w = self.box(*images.shape[1:3])
        return images[:, top:top + crop_h, left:left + crop_w]

    def apply_list(self, images: list, generator=None) -> torch.Tensor:
        return torch.stack([_pixels(im, self.box(*_image_size(im))) for im in images])


class RandomResizedCrop(PipelineStep):
    """Crop a random area and aspect ratio, resize it to ``scale`` (mmpretrain RandomResizedCrop).

    Per image: up to ``max_attempts`` draws of an area fraction in ``crop_ratio_range``
    and a log-uniform aspect ratio (width / height) in ``aspect_ratio_range``; the
    first crop that fits is taken at a uniform offset, else the centre crop of the
    whole image clamped to the ratio range. Takes a list of images of any sizes:
    only the crop is decoded (a JPEG at reduced scale when the crop is >= 2x scale).
    """

    ARGS = ("scale", "crop_ratio_range", "aspect_ratio_range", "max_attempts", "interpolation", "backend")
    REQUIRED = ("scale",)
    random = True
    accepts_list = True

    def __init__(self, scale, crop_ratio_range=(0.08, 1.0), aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
                 max_attempts=10, interpolation="bilinear", backend="cv2", *, key="RandomResizedCrop"):
        self.scale = _size_pair(scale, f"{key}.scale")
        self.crop_ratio_range = _range(crop_ratio_range, f"{key}.crop_ratio_range", 0.0, 1.0)
        if self.crop_ratio_range[1] <= 0:
            raise RecipeError(f"{key}.crop_ratio_range: the upper bound must be > 0, got {crop_ratio_range!r}")
        self.aspect_ratio_range = _range(aspect_ratio_range, f"{key}.aspect_ratio_range", 1e-6, 1e6)
        if not _is_int(max_attempts) or max_attempts < 0:
            raise RecipeError(f"{key}.max_attempts: expected an int >= 0, got {max_attempts!r}")
        self.max_attempts = int(max_attempts)
        self.interpolation = _choice(interpolation, INTERPOLATIONS, f"{key}.interpolation")
        self.backend = _resize_backend(backend, self.interpolation, key)

    def output_size(self, in_hw):
        return self.scale

    def sample(self, n: int, height, width, generator=None) -> dict:
        """Boxes (top, left, height, width) for n images of sizes height x width (ints or [n] tensors)."""
        h = torch.as_tensor(height, dtype=torch.float64).expand(n)
        w = torch.as_tensor(width, dtype=torch.float64).expand(n)
        attempts = max(self.max_attempts, 1)
        area = torch.empty(n, attempts, dtype=torch.float64).uniform_(*self.crop_ratio_range, generator=generator)
        area = area * (h * w)[:, None]
        log_low, log_high = math.log(self.aspect_ratio_range[0]), math.log(self.aspect_ratio_range[1])
        ratio = torch.empty(n, attempts, dtype=torch.float64).uniform_(log_low, log_high, generator=generator).exp()
        crop_w = (area * ratio).sqrt().round()
        crop_h = (area / ratio).sqrt().round()
        fits = (crop_w > 0) & (crop_w <= w[:, None]) & (crop_h > 0) & (crop_h <= h[:, None])
        fits[:, self.max_attempts:] = False  # max_attempts=0: always the fallback
        first = fits.int().argmax(1)
        found = fits.any(1)
        crop_h, crop_w = crop_h.gather(1, first[:, None])[:, 0], crop_w.gather(1, first[:, None])[:, 0]
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        top = (u[:, 0] * (h - crop_h + 1)).floor()
        left = (u[:, 1] * (w - crop_w + 1)).floor()
        # Fallback: the centre crop, clamped to the aspect ratio range.
        low, high = self.aspect_ratio_range
        in_ratio = w / h
        fb_w = torch.where(in_ratio > high, (h * high).round(), w)
        fb_h = torch.where(in_ratio < low, (w / low).round(), h)
        boxes = torch.stack([torch.where(found, top, ((h - fb_h) / 2).floor()),
                             torch.where(found, left, ((w - fb_w) / 2).floor()),
                             torch.where(found, crop_h, fb_h), torch.where(found, crop_w, fb_w)], 1)
        return {"boxes": boxes.long()}

    def apply_list(self, images: list, params: dict | None = None, generator=None) -> torch.Tensor:
        if params is None:
            sizes = torch.tensor([_image_size(im) for im in images])
            params = self.sample(len(images), sizes[:, 0], sizes[:, 1], generator)
        out = torch.empty((len(images), *self.scale, 3), dtype=torch.uint8)
        for i, (image, box) in enumerate(zip(images, params["boxes"].tolist())):
            out[i] = _resize(_pixels(image, box, self.scale)[None], self.scale, self.interpolation,
                             self.backend)[0]
        return out

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        return self.apply_list(list(images), params)


class ResizeEdge(PipelineStep):
    """Resize keeping the aspect ratio so that one edge equals ``scale`` (mmpretrain ResizeEdge).

    edge: 'short' (default), 'long', 'height' or 'width'; the other edge is
    int(scale * other / edge) as mmpretrain computes it. Images of different sizes
    give different outputs: follow it with a CenterCrop to make one batch.
    """

    ARGS = ("scale", "edge", "interpolation", "backend")
    REQUIRED = ("scale",)
    EDGES = ("short", "long", "height", "width")
    accepts_list = True

    def __init__(self, scale, edge="short", interpolation="bilinear", backend="cv2", *, key="ResizeEdge"):
        if not _is_int(scale) or scale < 1:
            raise RecipeError(f"{key}.scale: expected a positive int (the edge length), got {scale!r}")
        self.scale = int(scale)
        self.edge = _choice(edge, self.EDGES, f"{key}.edge")
        self.interpolation = _choice(interpolation, INTERPOLATIONS, f"{key}.interpolation")
        self.backend = _resize_backend(backend, self.interpolation, key)

    def output_size(self, in_hw):
        height, width = in_hw
        if (self.edge == "short" and width < height) or (self.edge == "long" and width > height) \
                or self.edge == "width":
            return max(1, int(self.scale * height / width)), self.scale
        return self.scale, max(1, int(self.scale * width / height))

    def _resize_one(self, pixels: torch.Tensor, size) -> torch.Tensor:
        return _resize(pixels[None], size, self.interpolation, self.backend)[0]

    def apply(self, images: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        return _resize(images, self.output_size(images.shape[1:3]), self.interpolation, self.backend)

    def apply_list(self, images: list, generator=None):
        sizes = [self.output_size(_image_size(im)) for im in images]
        return _stack_or_list([self._resize_one(_pixels(im, min_size=size), size) for im, size in zip(images, sizes)])


# ---------------------------------------------------------------- colour and pixel operations (float, per image)

def _gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float NHWC RGB in PIL's fixed point (its "L" mode) -> [N, H, W, 1]."""
    weights = images.new_tensor([[19595.0], [38470.0], [7471.0]])
    return torch.floor((images @ weights + 32768.0) / 65536.0)


def _blend(images: torch.Tensor, other, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, per image, clipped to 0..255 (PIL ImageEnhance)."""
    f = factor.view(-1, 1, 1, 1).to(images.dtype)
    if not isinstance(other, torch.Tensor):  # a constant: brightness blends with black
        return (images * f).clamp_(0, 255)
    return torch.lerp(other.expand_as(images), images, f).clamp_(0, 255)


def _adjust_brightness(images, factor):
    return _blend(images, 0.0, factor)


def _adjust_contrast(images, factor):
    return _blend(images, _gray(images).mean((1, 2, 3), keepdim=True).round(), factor)


def _adjust_saturation(images, factor):
    return _blend(images, _gray(images), factor)


def _adjust_sharpness(images, factor):
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5, /13; border pixels kept), as ImageEnhance.Sharpness."""
    rows = images[:, :-2] + images[:, 1:-1] + images[:, 2:]  # separable 3x3 box sum: rows, then columns
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    degenerate = images.clone()
    degenerate[:, 1:-1, 1:-1] = (box + 4 * images[:, 1:-1, 1:-1]) / 13
    return _blend(images, degenerate, factor)


def _shift_hue(images, shift):
    """Rotate the hue by `shift` (fraction of a turn) per image, through HSV (torchvision's formulas)."""
    x = images / 255.0
    r, g, b = x.unbind(-1)
    maxc, minc = x.max(-1).values, x.min(-1).values
    flat = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    sat = chroma / torch.where(flat, ones, maxc)
    chroma = torch.where(flat, ones, chroma)
    rc, gc, bc = (maxc - r) / chroma, (maxc - g) / chroma, (maxc - b) / chroma
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = (hue / 6.0 + 1.0 + shift.view(-1, 1, 1).to(x.dtype)) % 1.0
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    v = maxc
    p = (v * (1 - sat)).clamp(0, 1)
    q = (v * (1 - sat * frac)).clamp(0, 1)
    t = (v * (1 - sat * (1 - frac))).clamp(0, 1)
    table = torch.stack([torch.stack(c, -1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], -2)
    rgb = table.gather(-1, sector[..., None, None].expand(*sector.shape, 3, 1))[..., 0]
    return rgb * 255.0


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.round_().clamp_(0, 255).to(torch.uint8)


class ColorJitter(PipelineStep):
    """Random brightness, contrast, saturation and hue per image, in a random order (mmpretrain ColorJitter).

    brightness / contrast / saturation: b -> factor uniform in [max(0, 1 - b), 1 + b],
    or [min, max]; hue: h in [0, 0.5] -> shift uniform in [-h, h] (fraction of a turn), or [min, max].
    """

    ARGS = ("brightness", "contrast", "saturation", "hue", "backend")
    random = True
    FACTORS = ("brightness", "contrast", "saturation", "hue")
    OPS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _shift_hue)

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, backend="pillow", *, key="ColorJitter"):
        self.brightness = self._factor_range(brightness, f"{key}.brightness")
        self.contrast = self._factor_range(contrast, f"{key}.contrast")
        self.saturation = self._factor_range(saturation, f"{key}.saturation")
        if _is_number(hue) and 0 <= hue <= 0.5:
            self.hue = (-float(hue), float(hue))
        else:
            self.hue = _range(hue, f"{key}.hue", -0.5, 0.5)
        self.backend = _choice(backend, BACKENDS, f"{key}.backend")

    @staticmethod
    def _factor_range(value, key):
        if _is_number(value) and value >= 0:
            return max(0.0, 1.0 - value), 1.0 + float(value)
        return _range(value, key, 0.0, math.inf)

    def _identity(self, name) -> bool:
        return getattr(self, name) == ((0.0, 0.0) if name == "hue" else (1.0, 1.0))

    def sample(self, n: int, height: int = 0, width: int = 0, generator=None) -> dict:
        params = {"order": torch.rand(n, 4, generator=generator).argsort(1)}
        for name in self.FACTORS:
            params[name] = torch.empty(n, dtype=torch.float64).uniform_(*getattr(self, name), generator=generator)
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        out = images.float()
        for position in range(4):
            for op_index, (name, op) in enumerate(zip(self.FACTORS, self.OPS)):
                if self._identity(name):
                    continue
                chosen = (params["order"][:, position] == op_index).nonzero().squeeze(1)
                if chosen.numel():
                    out[chosen] = op(out[chosen], params[name][chosen])
        return _to_uint8(out)


# ---------------------------------------------------------------- RandAugment / AutoAugment operations
# Each takes uint8 NHWC images and a float64 magnitude per image and returns uint8, like
# mmpretrain's transforms of the same names (each of which rounds to uint8 too).

def _auto_contrast(images, magnitude):
    """Stretch each channel's min..max to 0..255 (channels with one value stay)."""
    low, high = images.amin((1, 2), keepdim=True).float(), images.amax((1, 2), keepdim=True).float()
    scale = torch.where(high > low, 255.0 / (high - low).clamp(min=1), 1.0)
    low = torch.where(high > low, low, 0.0)
    return ((images.float() - low) * scale).floor_().clamp_(0, 255).to(torch.uint8)


def _equalize(images, magnitude):
    """Histogram equalisation per channel, PIL ImageOps.equalize's lookup table."""
    n, height, width, channels = images.shape
    # One histogram and one lookup table per (image, channel): bin = value + 256 * (image * channels + channel).
    offsets = (torch.arange(n * channels, dtype=torch.int32) * 256).view(n, 1, 1, channels)
    bins = images.int() + offsets
    histogram = torch.bincount(bins.view(-1), minlength=n * channels * 256).view(-1, 256)
    top_count = histogram.gather(1, 255 - histogram.flip(1).ne(0).int().argmax(1, keepdim=True))[:, 0]
    step = (height * width - top_count) // 255
    lut = (histogram.cumsum(1) + (step // 2)[:, None]) // step.clamp(min=1)[:, None]
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(max=255)
    lut = torch.where((step > 0)[:, None], lut, torch.arange(256))
    return lut.to(torch.uint8).view(-1)[bins]


def _invert(images, magnitude):
    return 255 - images


def _posterize(images, magnitude):
    """Keep the ceil(magnitude) highest bits."""
    shift = 8 - magnitude.ceil().clamp(0, 8).long()
    mask = ((255 << shift) & 255).to(torch.uint8)
    return images & mask.view(-1, 1, 1, 1)


def _solarize(images, magnitude):
    """Invert the pixels >= magnitude (the threshold); compared in uint8: x >= t <=> x >= ceil(t)."""
    threshold = magnitude.ceil().clamp(0, 256).view(-1, 1, 1, 1)
    invert = (images >= threshold.clamp(max=255).to(torch.uint8)) & (threshold < 256)
    return torch.where(invert, 255 - images, images)


def _solarize_add(images, magnitude):
    """Add magnitude to the pixels < 128, saturating, truncated to an integer as mmpretrain does."""
    added = (images.short() + magnitude.floor().short().view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)
    return torch.where(images < 128, added, images)


def _enhance(adjust):
    """A PIL ImageEnhance-style op: factor = 1 + magnitude."""
    return lambda images, magnitude: _to_uint8(adjust(images.float(), 1.0 + magnitude))


def _rotate_matrix(magnitude, height, width):
    """Clockwise rotation by magnitude degrees about the image centre (mmcv imrotate): output -> input."""
    angle = torch.deg2rad(magnitude)
    cos, sin = angle.cos(), angle.sin()
    cx, cy = (width - 1) * 0.5, (height - 1) * 0.5
    return torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
                        torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1)], 1)


def _shear_matrix(magnitude, height, width, direction):
    """mmcv imshear: x' = x + m * y (horizontal) or y' = y + m * x; output -> input."""
    m, zero, one = magnitude, torch.zeros_like(magnitude), torch.ones_like(magnitude)
    rows = ([one, -m, zero], [zero, one, zero]) if direction == "horizontal" else ([one, zero, zero], [-m, one, zero])
    return torch.stack([torch.stack(r, -1) for r in rows], 1)


def _translate_matrix(magnitude, height, width, direction):
    """mmcv imtranslate by magnitude * width (or height) pixels; output -> input."""
    zero, one = torch.zeros_like(magnitude), torch.ones_like(magnitude)
    if direction == "horizontal":
        rows = ([one, zero, -magnitude * width], [zero, one, zero])
    else:
        rows = ([one, zero, zero], [zero, one, -magnitude * height])
    return torch.stack([torch.stack(r, -1) for r in rows], 1)


def _warp(images, matrices, interpolation: str, pad_val) -> torch.Tensor:
    """Sample each image at matrices[i] @ (x, y, 1) (pixel coordinates); outside pixels get pad_val."""
    n, height, width, _ = images.shape
    # Pixel -> grid_sample's [-1, 1] coordinates (align_corners=True): theta = N @ A @ N^-1.
    to_unit = torch.tensor([[2.0 / max(width - 1, 1), 0, -1], [0, 2.0 / max(height - 1, 1), -1], [0, 0, 1]],
                           dtype=torch.float64)
    full = torch.cat([matrices, matrices.new_tensor([0, 0, 1]).expand(n, 1, 3)], 1)
    theta = (to_unit @ full @ torch.linalg.inv(to_unit))[:, :2].float()
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=True)
    pad = torch.tensor(pad_val, dtype=torch.float32).view(1, 3, 1, 1)
    # Sampling (image - pad) with zero padding, then adding pad back, pads with pad_val exactly.
    shifted = images.permute(0, 3, 1, 2).float() - pad
    out = F.grid_sample(shifted, grid, mode=interpolation, padding_mode="zeros", align_corners=True) + pad
    return _to_uint8(out).permute(0, 2, 3, 1).contiguous()


PIXEL_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Posterize": _posterize,
    "Solarize": _solarize, "SolarizeAdd": _solarize_add, "ColorTransform": _enhance(_adjust_saturation),
    "Contrast": _enhance(_adjust_contrast), "Brightness": _enhance(_adjust_brightness),
    "Sharpness": _enhance(_adjust_sharpness),
}
GEOMETRIC_OPS = {"Rotate": "nearest", "Shear": "bicubic", "Translate": "nearest"}  # mmpretrain's interpolation
SIGNED_OPS = {"Rotate", "Shear", "Translate", "ColorTransform", "Contrast", "Brightness", "Sharpness"}


class AugOp:
    """One RandAugment / AutoAugment policy: an op, its magnitude (fixed or a level range), prob, direction."""

    def __init__(self, name, magnitude=None, magnitude_range=None, prob=0.5, direction="horizontal"):
        self.name, self.magnitude, self.magnitude_range = name, magnitude, magnitude_range
        self.prob, self.direction = prob, direction

    def __call__(self, images, magnitude, interpolation, pad_val):
        if self.name not in GEOMETRIC_OPS:
            return PIXEL_OPS[self.name](images, magnitude)
        height, width = images.shape[1:3]
        if self.name == "Rotate":
            matrices = _rotate_matrix(magnitude, height, width)
        elif self.name == "Shear":
            matrices = _shear_matrix(magnitude, height, width, self.direction)
        else:
            matrices = _translate_matrix(magnitude, height, width, self.direction)
        return _warp(images, matrices, interpolation or GEOMETRIC_OPS[self.name], pad_val)

    def __repr__(self):
        return f"{self.name}({self.magnitude if self.magnitude_range is None else self.magnitude_range})"


RANDAUG_POLICIES = {  # mmpretrain's RANDAUG_POLICIES (timm's _RAND_INCREASING_TRANSFORMS)
    "timm_increasing": [
        AugOp("AutoContrast"), AugOp("Equalize"), AugOp("Invert"),
        AugOp("Rotate", magnitude_range=(0, 30)), AugOp("Posterize", magnitude_range=(4, 0)),
        AugOp("Solarize", magnitude_range=(256, 0)), AugOp("SolarizeAdd", magnitude_range=(0, 110)),
        AugOp("ColorTransform", magnitude_range=(0, 0.9)), AugOp("Contrast", magnitude_range=(0, 0.9)),
        AugOp("Brightness", magnitude_range=(0, 0.9)), AugOp("Sharpness", magnitude_range=(0, 0.9)),
        AugOp("Shear", magnitude_range=(0, 0.3), direction="horizontal"),
        AugOp("Shear", magnitude_range=(0, 0.3), direction="vertical"),
        AugOp("Translate", magnitude_range=(0, 0.45), direction="horizontal"),
        AugOp("Translate", magnitude_range=(0, 0.45), direction="vertical"),
    ],
    "simple_increasing": [
        AugOp("AutoContrast"), AugOp("Equalize"), AugOp("Rotate", magnitude_range=(0, 30)),
        AugOp("Shear", magnitude_range=(0, 0.3), direction="horizontal"),
        AugOp("Shear", magnitude_range=(0, 0.3), direction="vertical"),
    ],
}


def _autoaug(*pairs):
    return [AugOp(name, magnitude, prob=prob, direction="horizontal") for name, magnitude, prob in pairs]


AUTOAUG_POLICIES = {  # mmpretrain's AUTOAUG_POLICIES["imagenet"] (DeepVoltaire/AutoAugment)
    "imagenet": [
        _autoaug(("Posterize", 4, 0.4), ("Rotate", 30.0, 0.6)),
        _autoaug(("Solarize", 256 / 9 * 4, 0.6), ("AutoContrast", 0, 0.6)),
        _autoaug(("Equalize", 0, 0.8), ("Equalize", 0, 0.6)),
        _autoaug(("Posterize", 5, 0.6), ("Posterize", 5, 0.6)),
        _autoaug(("Equalize", 0, 0.4), ("Solarize", 256 / 9 * 5, 0.2)),
        _autoaug(("Equalize", 0, 0.4), ("Rotate", 30 / 9 * 8, 0.8)),
        _autoaug(("Solarize", 256 / 9 * 6, 0.6), ("Equalize", 0, 0.6)),
        _autoaug(("Posterize", 6, 0.8), ("Equalize", 0, 1.0)),
        _autoaug(("Rotate", 10.0, 0.2), ("Solarize", 256 / 9, 0.6)),
        _autoaug(("Equalize", 0, 0.6), ("Posterize", 5, 0.4)),
        _autoaug(("Rotate", 30 / 9 * 8, 0.8), ("ColorTransform", 0.0, 0.4)),
        _autoaug(("Rotate", 30.0, 0.4), ("Equalize", 0, 0.6)),
        _autoaug(("Equalize", 0, 0.0), ("Equalize", 0, 0.8)),
        _autoaug(("Invert", 0, 0.6), ("Equalize", 0, 1.0)),
        _autoaug(("ColorTransform", 0.4, 0.6), ("Contrast", 0.8, 1.0)),
        _autoaug(("Rotate", 30 / 9 * 8, 0.8), ("ColorTransform", 0.2, 1.0)),
        _autoaug(("ColorTransform", 0.8, 0.8), ("Solarize", 256 / 9 * 2, 0.8)),
        _autoaug(("Sharpness", 0.7, 0.4), ("Invert", 0, 0.6)),
        _autoaug(("Shear", 0.3 / 9 * 5, 0.6), ("Equalize", 0, 1.0)),
        _autoaug(("ColorTransform", 0.0, 0.4), ("Equalize", 0, 0.6)),
        _autoaug(("Equalize", 0, 0.4), ("Solarize", 256 / 9 * 5, 0.2)),
        _autoaug(("Solarize", 256 / 9 * 4, 0.6), ("AutoContrast", 0, 0.6)),
        _autoaug(("Invert", 0, 0.6), ("Equalize", 0, 1.0)),
        _autoaug(("ColorTransform", 0.4, 0.6), ("Contrast", 0.8, 1.0)),
        _autoaug(("Equalize", 0, 0.8), ("Equalize", 0, 0.6)),
    ],
}


def _hparams(hparams, key: str) -> tuple:
    """mmpretrain's hparams: pad_val (int or [r, g, b]) and interpolation for the geometric ops."""
    if not isinstance(hparams, dict):
        raise RecipeError(f"{key}: expected a dict with pad_val and/or interpolation, got {hparams!r}")
    for name in hparams:
        if name not in ("pad_val", "interpolation"):
            raise RecipeError(f"{key}.{name}: unknown hparam{_did_you_mean(name, ('pad_val', 'interpolation'))}; "
                              f"accepted: pad_val, interpolation")
    pad_val = _color(hparams.get("pad_val", 128), f"{key}.pad_val")
    interpolation = hparams.get("interpolation")
    if interpolation is not None:
        _choice(interpolation, INTERPOLATIONS, f"{key}.interpolation")
    return pad_val, interpolation


def _apply_ops(images: torch.Tensor, ops: list, chosen_op: torch.Tensor, magnitude: torch.Tensor,
               interpolation, pad_val) -> torch.Tensor:
    """images[i] <- ops[chosen_op[i]](images[i], magnitude[i]) for chosen_op >= 0, batched per op."""
    for k, op in enumerate(ops):
        chosen = (chosen_op == k).nonzero().squeeze(1)
        if chosen.numel():
            images[chosen] = op(images[chosen], magnitude[chosen], interpolation, pad_val)
    return images


class RandAugment(PipelineStep):
    """mmpretrain RandAugment: per image, num_policies ops drawn from the policy set, each applied with
    probability 0.5 at magnitude level magnitude_level (of total_level), Gaussian noise magnitude_std
    ('inf': uniform in [0, level]), and a random sign for the signed ops.
    """

    ARGS = ("policies", "num_policies", "magnitude_level", "magnitude_std", "total_level", "hparams")
    REQUIRED = ("policies", "num_policies", "magnitude_level")
    random = True

    def __init__(self, policies, num_policies, magnitude_level, magnitude_std=0.0, total_level=10,
                 hparams=None, *, key="RandAugment"):
        self.policies = _choice(policies, RANDAUG_POLICIES, f"{key}.policies")
        self.ops = RANDAUG_POLICIES[policies]
        if not _is_int(num_policies) or num_policies < 1:
            raise RecipeError(f"{key}.num_policies: expected an int >= 1, got {num_policies!r}")
        if not _is_number(total_level) or total_level <= 0:
            raise RecipeError(f"{key}.total_level: expected a number > 0, got {total_level!r}")
        if not _is_number(magnitude_level) or magnitude_level < 0:
            raise RecipeError(f"{key}.magnitude_level: expected a number >= 0, got {magnitude_level!r}")
        if magnitude_std != "inf" and not _is_number(magnitude_std):
            raise RecipeError(f"{key}.magnitude_std: expected a number or 'inf', got {magnitude_std!r}")
        self.num_policies, self.magnitude_level = int(num_policies), float(magnitude_level)
        self.magnitude_std, self.total_level = magnitude_std, float(total_level)
        self.hparams = {"pad_val": 128} if hparams is None else hparams
        self.pad_val, self.interpolation = _hparams(self.hparams, f"{key}.hparams")
        self.ranges = torch.tensor([op.magnitude_range or (0, 0) for op in self.ops], dtype=torch.float64)
        self.signed = torch.tensor([op.name in SIGNED_OPS for op in self.ops])

    def _levels(self, n: int, generator) -> torch.Tensor:
        level = torch.full((n,), self.magnitude_level, dtype=torch.float64)
        if self.magnitude_std == "inf":
            return level * torch.rand(n, generator=generator, dtype=torch.float64)
        if self.magnitude_std > 0:
            noise = torch.randn(n, generator=generator, dtype=torch.float64) * self.magnitude_std
            return (level + noise).clamp(0, self.total_level)
        return level

    def sample(self, n: int, height: int = 0, width: int = 0, generator=None) -> dict:
        """Per round: op index per image (-1: skipped) and its signed magnitude."""
        rounds = []
        for _ in range(self.num_policies):
            op = torch.randint(len(self.ops), (n,), generator=generator)
            applied = torch.rand(n, generator=generator) < 0.5
            negative = torch.rand(n, generator=generator) < 0.5
            low, high = self.ranges[op].unbind(1)
            magnitude = low + (high - low) * self._levels(n, generator) / self.total_level
            magnitude = torch.where(negative & self.signed[op], -magnitude, magnitude)
            rounds.append({"op": torch.where(applied, op, -1), "magnitude": magnitude})
        return {"rounds": rounds}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        images = images.clone()
        for r in params["rounds"]:
            images = _apply_ops(images, self.ops, r["op"], r["magnitude"], self.interpolation, self.pad_val)
        return images


class AutoAugment(PipelineStep):
    """mmpretrain AutoAugment: per image, one sub-policy (a pair of ops with fixed magnitudes and
    probabilities) drawn uniformly from the set; signed ops get a random sign.
    """

    ARGS = ("policies", "hparams")
    REQUIRED = ("policies",)
    random = True

    def __init__(self, policies, hparams=None, *, key="AutoAugment"):
        self.policies = _choice(policies, AUTOAUG_POLICIES, f"{key}.policies")
        self.sub_policies = AUTOAUG_POLICIES[policies]
        self.hparams = {"pad_val": 128} if hparams is None else hparams
        self.pad_val, self.interpolation = _hparams(self.hparams, f"{key}.hparams")
        length = max(len(sub) for sub in self.sub_policies)
        self.probs = torch.tensor([[op.prob for op in sub] + [0.0] * (length - len(sub))
                                   for sub in self.sub_policies], dtype=torch.float64)

    def sample(self, n: int, height: int = 0, width: int = 0, generator=None) -> dict:
        policy = torch.randint(len(self.sub_policies), (n,), generator=generator)
        u = torch.rand(n, self.probs.shape[1], generator=generator, dtype=torch.float64)
        negative = torch.rand(n, self.probs.shape[1], generator=generator) < 0.5
        return {"policy": policy, "applied": u < self.probs[policy], "negative": negative}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        images = images.clone()
        for k, sub in enumerate(self.sub_policies):
            for j, op in enumerate(sub):
                chosen = ((params["policy"] == k) & params["applied"][:, j]).nonzero().squeeze(1)
                if not chosen.numel():
                    continue
                magnitude = torch.full((chosen.numel(),), float(op.magnitude), dtype=torch.float64)
                if op.name in SIGNED_OPS:
                    magnitude = torch.where(params["negative"][chosen, j], -magnitude, magnitude)
                images[chosen] = op(images[chosen], magnitude, self.interpolation, self.pad_val)
        return images


class RandomErasing(PipelineStep):
    """mmpretrain RandomErasing: with probability erase_prob, fill one rectangle of area fraction
    [min_area_ratio, max_area_ratio] and log-uniform aspect ratio in aspect_range per image.

    mode 'const' fills fill_color; 'rand' fills uniform noise 0..255, or Gaussian noise around
    fill_color with fill_std when that is given.
    """

    ARGS = ("erase_prob", "min_area_ratio", "max_area_ratio", "aspect_range", "mode", "fill_color", "fill_std")
    random = True
    MODES = ("const", "rand")

    def __init__(self, erase_prob=0.5, min_area_ratio=0.02, max_area_ratio=1 / 3, aspect_range=(3 / 10, 10 / 3),
                 mode="const", fill_color=(128, 128, 128), fill_std=None, *, key="RandomErasing"):
        self.erase_prob = _probability(erase_prob, f"{key}.erase_prob")
        self.min_area_ratio = _probability(min_area_ratio, f"{key}.min_area_ratio")
        self.max_area_ratio = _probability(max_area_ratio, f"{key}.max_area_ratio")
        if self.min_area_ratio > self.max_area_ratio:
            raise RecipeError(f"{key}.min_area_ratio: {min_area_ratio} is above max_area_ratio {max_area_ratio}")
        if _is_number(aspect_range) and aspect_range > 0:  # mmpretrain: a number r means [min(r, 1/r), max(r, 1/r)]
            aspect_range = sorted((aspect_range, 1 / aspect_range))
        self.aspect_range = _range(aspect_range, f"{key}.aspect_range", 1e-6, 1e6)
        self.mode = _choice(mode, self.MODES, f"{key}.mode")
        self.fill_color = _color(fill_color, f"{key}.fill_color")
        if fill_std is not None and not (_is_number(fill_std) and fill_std >= 0) and not (
                isinstance(fill_std, (list, tuple)) and len(fill_std) == 3 and all(_is_number(v) and v >= 0
                                                                                   for v in fill_std)):
            raise RecipeError(f"{key}.fill_std: expected a number >= 0 or [r, g, b] of them, got {fill_std!r}")
        self.fill_std = fill_std

    def sample(self, n: int, height: int, width: int, generator=None) -> dict:
        erase = torch.rand(n, generator=generator, dtype=torch.float64) < self.erase_prob
        log_low, log_high = math.log(self.aspect_range[0]), math.log(self.aspect_range[1])
        ratio = torch.empty(n, dtype=torch.float64).uniform_(log_low, log_high, generator=generator).exp()
        area = torch.empty(n, dtype=torch.float64).uniform_(self.min_area_ratio, self.max_area_ratio,
                                                            generator=generator) * (height * width)
        h = (area * ratio).sqrt().round().clamp(max=height)
        w = (area / ratio).sqrt().round().clamp(max=width)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        # mmpretrain: randint(0, size - h) when size > h, else 0
        top = (u[:, 0] * (height - h)).floor()
        left = (u[:, 1] * (width - w)).floor()
        return {"erase": erase, "boxes": torch.stack([top, left, h, w], 1).long(),
                "fill": self._fill(int(erase.sum()), height, width, generator)}

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        chosen = params["erase"].nonzero().squeeze(1)
        if not chosen.numel():
            return images
        height, width = images.shape[1:3]
        top, left, h, w = (v.view(-1, 1) for v in params["boxes"][chosen].unbind(1))
        rows = (torch.arange(height) >= top) & (torch.arange(height) < top + h)
        cols = (torch.arange(width) >= left) & (torch.arange(width) < left + w)
        inside = (rows[:, :, None] & cols[:, None, :])[..., None]
        out = images.clone()
        out[chosen] = torch.where(inside, params["fill"], images[chosen])
        return out

    def _fill(self, n: int, height: int, width: int, generator) -> torch.Tensor:
        """What the erased boxes of n images are filled with: the colour, or noise (mode 'rand')."""
        color = torch.tensor(self.fill_color, dtype=torch.float64)
        if self.mode == "const":
            return color.to(torch.uint8)
        if self.fill_std is None:
            return torch.randint(0, 256, (n, height, width, 3), generator=generator, dtype=torch.uint8)
        noise = torch.randn(n, height, width, 3, generator=generator, dtype=torch.float64)
        return (color + noise * torch.tensor(self.fill_std, dtype=torch.float64)).clamp(0, 255).to(torch.uint8)


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

    def pack(self, images: torch.Tensor, labels: torch.Tensor, lend=None) -> dict:
        out = lend(tuple(images.shape)) if lend else None  # in our loader's workers: shared memory
        if out is not None and not (out.data_ptr() == images.data_ptr() and images.is_contiguous()):
            images = out.copy_(images)
        elif not images.is_contiguous():
            images = images.contiguous()
        return {"pixel_values": images.permute(0, 3, 1, 2), "labels": labels}

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return images


PIPELINE_STEPS: dict[str, type[PipelineStep]] = {
    "RandomCrop": RandomCrop,
    "RandomFlip": RandomFlip,
    "Resize": Resize,
    "CenterCrop": CenterCrop,
    "PackClsInputs": PackClsInputs,
    "RandomResizedCrop": RandomResizedCrop,
    "ResizeEdge": ResizeEdge,
    "ColorJitter": ColorJitter,
    "RandAugment": RandAugment,
    "AutoAugment": AutoAugment,
    "RandomErasing": RandomErasing,
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
    problem = pipeline_order_problem([step_config["type"] for step_config in config])
    if problem:
        raise RecipeError(f"{key}: {problem}")
    return steps


def pipeline_order_problem(step_types) -> str | None:
    """What is wrong with the order of a pipeline's steps (their type names), or None:
    PackClsInputs hands the batch to the model, so it comes last, once."""
    if not step_types or step_types[-1] != "PackClsInputs":
        return 'the pipeline must end with {"type": "PackClsInputs"}'
    packs = [i for i, name in enumerate(step_types[:-1]) if name == "PackClsInputs"]
    return f"step {packs[0]} is PackClsInputs, which must be the last step" if packs else None


class BatchTransform:
    """The ``set_transform`` callable: a batch of dataset rows -> model inputs.

    Opens the (undecoded) images of the batch, runs the steps on the whole batch
    and packs it. A first step that ``accepts_list`` gets the opened images and
    decodes what it needs; otherwise the images are decoded here, and batches
    whose images differ in size run the steps per size group (the pipeline must
    then bring them to one size).
    """

    def __init__(self, steps, *, image_column: str, label_column: str, source: str, on_corrupt: str = "error",
                 multi_label_classes: int | None = None, class_names: list[str] | None = None):
        self.steps = list(steps[:-1])
        self.packer = steps[-1]
        self.image_column = image_column
        self.label_column = label_column
        self.source = source
        self.on_corrupt = on_corrupt
        # Multi-label: the label column holds class lists; targets are multi-hot float [N, C].
        self.multi_label_classes = multi_label_classes
        self.class_names = class_names  # for error messages: an image folder's class is its folder
        self.skipped = 0  # per process
        self.skip_log = None  # a file every process records its skipped images in (runtime.record_skipped)

    def _where(self, item, row, label=None) -> str:
        path = item.get("path") if isinstance(item, dict) else None
        if path and self.class_names and isinstance(label, int):  # an image folder: say which class folder
            path += f" in class folder {self.class_names[label]!r}"
        return f"index {row}" + (f" ({path})" if path else "") + f" of {self.source}"

    def open(self, items, rows, labels=None) -> tuple[list[LazyImage], list[int]]:
        images, kept = [], []
        for pos, item in enumerate(items):
            try:
                images.append(LazyImage(item))
            except Exception as exc:
                self._undecodable(self._where(item, rows[pos], labels[pos] if labels else None), exc)
                continue
            kept.append(pos)
        return images, kept

    def _undecodable(self, where: str, exc: Exception) -> None:
        """Raise the one-line error, or with on_corrupt "skip" count and record the image."""
        if self.on_corrupt != "skip":
            raise BatchDataError(undecodable_message(where, exc)) from exc
        self.skipped += 1
        record_skipped(self.skip_log, where, exc)
        if self.skipped == 1:
            listed = f"all are listed in {self.skip_log}" if self.skip_log else "later ones are skipped silently"
            warnings.warn(f"skipping undecodable image at {where}: {exc} (on_corrupt='skip'; {listed})",
                          stacklevel=3)

    def run_steps(self, images, generator=None, lend=None):
        """images: a uint8 NHWC batch, or a list of LazyImage / [H, W, 3] tensors of any sizes."""
        for i, step in enumerate(self.steps):
            if isinstance(images, list):
                if not step.accepts_list:
                    return self._run_by_size(images, self.steps[i:], generator, lend)
                images = step.apply_list(images, generator=generator)
            else:
                images = self._apply(step, images, generator, lend)
        return self._run_by_size(images, [], generator, lend) if isinstance(images, list) else images

    def _apply(self, step, images: torch.Tensor, generator, lend, whole_batch: bool = True) -> torch.Tensor:
        if whole_batch and step is self.steps[-1]:
            return step.finish(images, generator, lend)
        return step(images, generator)

    def __call__(self, batch: dict, generator: torch.Generator | None = None, lend=None) -> dict:
        """generator: what the random steps draw from (None: torch's global RNG); lend(shape): a
        tensor in shared memory to write the batch's final pixels into, or None (loader.WholeBatches
        hands both over; datasets' set_transform calls this with the batch alone)."""
        items, labels = batch[self.image_column], batch[self.label_column]
        rows = batch.get(ROW_COLUMN) or list(range(len(items)))
        while True:
            images, kept = self.open(items, rows, labels)
            if not images:
                raise BatchDataError(f"no image of this batch of {self.source} could be decoded "
                                     f"(indices {list(rows)[:8]})")
            if len(kept) < len(items):
                items, rows, labels = ([values[p] for p in kept] for values in (items, rows, labels))
            try:
                pixels = self.run_steps(images, generator, lend)
                break
            except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises on a truncated or corrupt file
                failed = next((p for p, im in enumerate(images) if isinstance(im, LazyImage) and im.failed), None)
                if failed is None:
                    raise
                # A file whose header reads but whose data does not (cut short): it fails only when
                # decoded, so with on_corrupt "skip" the batch is built again without it.
                self._undecodable(self._where(items[failed], rows[failed], labels[failed]), exc)
                items, rows, labels = ([v for p, v in enumerate(values) if p != failed]
                                       for values in (items, rows, labels))
        if self.multi_label_classes:
            labels = class_lists_to_multi_hot(labels, self.multi_label_classes, self.label_column)
        else:
            labels = torch.tensor(labels, dtype=torch.int64)
        return self.packer.pack(pixels, labels, lend)

    def _run_by_size(self, images: list, steps: list, generator, lend) -> torch.Tensor:
        """Decode what is still lazy, run `steps` once per group of equal sizes, reassemble the batch."""
        pixels = [_pixels(im) for im in images]
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        outputs = {}
        for shape, idx in groups.items():
            out = torch.stack([pixels[i] for i in idx])
            for step in steps:
                out = self._apply(step, out, generator, lend, whole_batch=len(groups) == 1)
            outputs[shape] = out
        out_shapes = {tuple(o.shape[1:]) for o in outputs.values()}
        if len(out_shapes) > 1:
            sizes = sorted({f"{s[1]}x{s[0]}" for s in groups})
            raise BatchDataError(f"images of {self.source} have different sizes ({', '.join(sizes)}) and the pipeline "
                                 f"does not bring them to one size; add a Resize (or Resize + CenterCrop) step")
        if len(groups) == 1:
            return outputs.popitem()[1]
        out = torch.empty((len(pixels), *out_shapes.pop()), dtype=torch.uint8)
        for shape, idx in groups.items():
            out[torch.tensor(idx)] = outputs[shape]
        return out
