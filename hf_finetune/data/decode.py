"""Encoded image bytes -> uint8 RGB arrays: the only per-image loop of the data path.

The datasets ``Image`` column is read undecoded (``Image(decode=False)``) so we
control conversion and errors. Two formats get a fast path because they are
what our sources hold: 8-bit RGB PNG (the Hub's CIFAR-10, synthetic data) and
binary PPM (our Arrow cache of local CIFAR copies: raw pixels behind a tiny
header, so decoding is a copy). Everything else goes through PIL and is
converted to 8-bit RGB by ``to_rgb8`` (every Pillow mode, see there). The EXIF
orientation is applied, as ``datasets``' Image feature and transformers'
``load_image`` do (``PIL.ImageOps.exif_transpose``): a phone photo stored
sideways is upright in training, evaluation, ``predict`` and ``pipeline()``.

``LazyImage`` defers decoding until a pipeline step knows which region it needs
and at what size: a JPEG is then decoded at a reduced scale (libjpeg's DCT
scaling, Pillow's ``draft``) whenever that still leaves at least as many pixels
as the step outputs, and only the region is converted.
"""

from __future__ import annotations

import io
import math
import re
import struct

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")
_CHUNK_HEAD = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")
# Where Pillow's getexif() finds an orientation in a PNG (eXIf, or text chunks with these keywords)
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
_PNG_EXIF_KEYWORDS = (b"Raw profile type exif", b"XML:com.adobe.xmp")

# EXIF orientation -> (transpose, flip rows, flip columns) taking the stored pixels to the upright
# image: exif_transpose's table (2: FLIP_LEFT_RIGHT, 3: ROTATE_180, 4: FLIP_TOP_BOTTOM,
# 5: TRANSPOSE, 6: ROTATE_270, 7: TRANSVERSE, 8: ROTATE_90) split into a transpose then flips,
# because LazyImage must also map a crop box back onto the stored pixels, which no library does.
_ORIENTATIONS = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
                 5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


def encode_ppm(image: np.ndarray) -> bytes:
    """Binary PPM of an [H, W, 3] uint8 array: lossless, and decoding it is a memcpy."""
    h, w, _ = image.shape
    return b"P6\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(image, dtype=np.uint8).tobytes()


def _decode_ppm(data: bytes) -> np.ndarray | None:
    m = _PPM_HEADER.match(data)
    if m is None:
        return None
    w, h = int(m.group(1)), int(m.group(2))
    if len(data) - m.end() < w * h * 3:
        return None  # truncated: let PIL produce the error message
    return np.frombuffer(data, dtype=np.uint8, count=w * h * 3, offset=m.end()).reshape(h, w, 3)


def _decode_png_rgb8(data: bytes) -> np.ndarray | None:
    """8-bit non-interlaced RGB PNG through PIL's zlib decoder (Image.frombytes), without Image.open.

    At 32x32 px, Image.open's plugin probing and chunk bookkeeping cost more than
    the decompression itself; this path is about 2.5x faster. Any other PNG, or
    anything unexpected, returns None and the caller uses the general path.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, end_of_data, idat, size = 8, len(data), [], None
    while pos + 8 <= end_of_data:
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        start, stop = pos + 8, pos + 8 + length
        if stop + 4 > end_of_data:
            return None
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = _IHDR.unpack_from(data, start)
            if depth != 8 or colour != 2 or interlace != 0:
                return None
            size = (width, height)
        elif kind == b"IDAT":
            idat.append(data[start:stop])
        elif kind == b"eXIf" or (kind in _PNG_TEXT and data[start:stop].split(b"\0", 1)[0] in _PNG_EXIF_KEYWORDS):
            return None  # may hold an orientation: Image.open's path applies it
        elif kind == b"IEND":
            break
        pos = stop + 4
    if size is None or not idat:
        return None
    try:  # "zip" is the decoder PIL's PNG plugin uses; rawmode RGB: 3 bytes a pixel, PNG row filters
        image = Image.frombytes("RGB", size, idat[0] if len(idat) == 1 else b"".join(idat), "zip", "RGB")
    except ValueError:  # truncated or corrupt
        return None
    return np.asarray(image)


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Transparent pixels shown over white, as transformers' convert_to_rgb does at inference."""
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _scaled_to_8bit(values: np.ndarray, full_scale: float) -> np.ndarray:
    gray = np.clip(np.rint(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> uint8 [H, W, 3] RGB.

    Pillow's own convert() clips wide grayscale modes at 255 (a 16-bit image turns
    white), so those are scaled here: I;16* and I (Pillow's mode for 16-bit sources)
    from 0..65535, i.e. divided by 257; F from 0..1 when its values lie there (the
    usual float convention), else from 0..255 like Pillow. Alpha (LA, RGBA, PA,
    palette or RGB transparency) is composited on white; 1, L, P, CMYK, YCbCr ...
    convert as Pillow does.
    """
    if im.mode == "RGB" and "transparency" not in im.info:
        return np.asarray(im)
    if im.mode.startswith("I"):
        return _scaled_to_8bit(np.asarray(im), 65535.0)
    if im.mode == "F":
        values = np.nan_to_num(np.asarray(im))
        return _scaled_to_8bit(values, 1.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 255.0)
    if "A" in im.getbands() or "transparency" in im.info:
        return np.asarray(_composite_on_white(im))
    return np.asarray(im.convert("RGB"))


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation exif_transpose applies, read from the header: a JPEG's
    pixels stay undecoded (a PNG's are loaded when its eXIf chunk may follow the image data)."""
    return im.getexif().get(0x0112, 1)


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored [H, W, 3] pixels (the whole image or a region) as exif_transpose shows them."""
    transpose, flip_rows, flip_columns = _ORIENTATIONS.get(orientation, (False, False, False))
    if transpose:
        pixels = pixels.transpose(1, 0, 2)
    if flip_rows:
        pixels = pixels[::-1]
    if flip_columns:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def _decode_with_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return _upright(to_rgb8(im), _orientation(im))


def image_bytes(item) -> bytes:
    """The encoded bytes of one undecoded datasets Image value ({"bytes", "path"})."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return item["bytes"]
        if item.get("path"):
            with open(item["path"], "rb") as f:
                return f.read()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    raise ValueError(f"no image data (got {type(item).__name__}: {str(item)[:80]})")


def decode_image(item) -> np.ndarray:
    """One image value -> uint8 [H, W, 3] RGB array. Raises on undecodable data."""
    data = image_bytes(item)
    arr = _decode_fast(data)
    if arr is None:
        arr = _decode_with_pil(data)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"decoded to an array of shape {arr.shape}, expected [H, W, 3]")
    return arr


def _decode_fast(data: bytes) -> np.ndarray | None:
    """PPM or 8-bit RGB PNG without Image.open; None for anything else."""
    arr = _decode_ppm(data)
    if arr is None:
        try:
            arr = _decode_png_rgb8(data)
        except Exception:
            pass  # malformed: the general path raises a readable error
    return arr


class LazyImage:
    """One encoded image whose size is known (from its header) before it is decoded.

    ``pixels(box, min_size)`` decodes the region ``box`` = (top, left, height, width)
    at a resolution of at least ``min_size`` = (height, width) for that region: a
    JPEG is decoded at 1/2, 1/4 or 1/8 scale when that is still enough. Sizes and
    boxes are the upright image's (EXIF orientation applied); a box is mapped onto
    the stored pixels, and only that region is decoded and turned upright. Raises
    ValueError (or OSError) on undecodable data, like decode_image.
    """

    def __init__(self, item):
        data = image_bytes(item)
        self._array = _decode_fast(data)
        self._pil = None
        self._orientation = 1
        self.failed = False  # set when pixels() raised: tells the batch which file it was
        if self._array is not None:
            self.height, self.width = self._array.shape[:2]
        else:
            self._pil = Image.open(io.BytesIO(data))
            self._orientation = _orientation(self._pil)
            self._stored_size = self.width, self.height = self._pil.size  # draft() changes im.size
            if _ORIENTATIONS.get(self._orientation, (False,))[0]:  # stored sideways
                self.width, self.height = self.height, self.width
        if self.height == 0 or self.width == 0:
            raise ValueError(f"image of size {self.width}x{self.height}")

    def pixels(self, box=None, min_size=None) -> np.ndarray:
        top, left, height, width = box or (0, 0, self.height, self.width)
        if self._array is not None:
            return self._array[top:top + height, left:left + width]
        transpose, flip_rows, flip_columns = _ORIENTATIONS.get(self._orientation, (False, False, False))
        # The box on the stored pixels: undo the flips, then the transpose.
        if flip_rows:
            top = self.height - top - height
        if flip_columns:
            left = self.width - left - width
        if transpose:
            top, left, height, width = left, top, width, height
            min_size = min_size and min_size[::-1]
        try:
            return _upright(self._decode_region(top, left, height, width, min_size), self._orientation)
        except Exception:
            self.failed = True
            raise

    def _decode_region(self, top, left, height, width, min_size) -> np.ndarray:
        """The region of the stored (not yet upright) pixels."""
        im = self._pil
        stored_width, stored_height = self._stored_size
        if min_size is not None and im.format == "JPEG":
            # Ask for the whole image at the size that gives the region min_size pixels.
            wanted = (math.ceil(stored_width * min_size[1] / width), math.ceil(stored_height * min_size[0] / height))
            im.draft("RGB", wanted)
        im.load()
        if im.size != (stored_width, stored_height):  # the region on the reduced grid, never below min_size
            scale_x, scale_y = im.size[0] / stored_width, im.size[1] / stored_height
            left, top = int(left * scale_x), int(top * scale_y)
            width = min(max(math.ceil(width * scale_x), min_size[1]), im.size[0] - left)
            height = min(max(math.ceil(height * scale_y), min_size[0]), im.size[1] - top)
        if (top, left, height, width) != (0, 0, im.size[1], im.size[0]):
            im = im.crop((left, top, left + width, top + height))
        return to_rgb8(im)
