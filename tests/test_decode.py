"""Image decoding: every Pillow mode to 8-bit RGB, and the region / reduced-scale JPEG path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hf_finetune.data.decode import LazyImage, decode_image
from hf_finetune.data.transforms import BatchTransform, build_pipeline
from hf_finetune.errors import DataError

RAMP16 = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # the whole 16-bit range


def encoded(im: Image.Image, fmt: str = "PNG", **save) -> dict:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return {"bytes": buf.getvalue(), "path": None}


def decoded(item) -> np.ndarray:
    """decode_image, checked against the lazy path the pipeline uses."""
    out = decode_image(item)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    np.testing.assert_array_equal(LazyImage(item).pixels(), out)
    return out


def gray_rgb(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


def rgb_over_white(rgb, alpha):
    """Alpha composite on white, rounded as Pillow does."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


# ---------------------------------------------------------------- one test per Pillow mode

def test_16bit_grayscale_png_is_scaled_not_clipped():
    im = Image.fromarray(RAMP16)
    assert im.mode == "I;16"
    out = decoded(encoded(im))
    np.testing.assert_array_equal(out, gray_rgb(np.rint(RAMP16 / 257)))
    assert out.mean() == pytest.approx(127.5, abs=1)  # not ~97% white


def test_16bit_big_endian():
    im = Image.frombytes("I;16B", (64, 64), RAMP16.astype(">u2").tobytes())
    assert im.mode == "I;16B"
    item = encoded(im, "TIFF")
    assert Image.open(io.BytesIO(item["bytes"])).mode == "I;16B"
    np.testing.assert_array_equal(decoded(item), gray_rgb(np.rint(RAMP16 / 257)))


def test_32bit_integer_mode_i_uses_the_16bit_range_and_clips():
    values = RAMP16.astype(np.int32)
    values[0, :4] = [-5, 70000, 65535, 257]
    item = encoded(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(item["bytes"])).mode == "I"
    out = decoded(item)
    expected = np.rint(np.clip(values, 0, 65535) / 257)
    np.testing.assert_array_equal(out, gray_rgb(expected))
    assert out[0, :4, 0].tolist() == [0, 255, 255, 1]


@pytest.mark.parametrize("scale, expected_factor", [(1.0, 255.0), (255.0, 1.0)])
def test_float_mode_f(scale, expected_factor):
    values = (RAMP16 / 65535 * scale).astype(np.float32)  # 0..1 floats, or 0..255 floats
    item = encoded(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(item["bytes"])).mode == "F"
    np.testing.assert_array_equal(decoded(item), gray_rgb(np.rint(values.astype(np.float64) * expected_factor)))


def test_la_is_composited_on_white():
    rng = np.random.default_rng(0)
    gray, alpha = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    out = decoded(encoded(Image.fromarray(np.dstack([gray, alpha]), mode="LA")))
    assert np.abs(out.astype(int) - rgb_over_white(gray_rgb(gray), alpha)).max() <= 1


def test_rgba_is_composited_on_white():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    out = decoded(encoded(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")))
    assert np.abs(out.astype(int) - rgb_over_white(rgb, alpha)).max() <= 1
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == rgb[0, 1].tolist()


def test_palette_with_transparency():
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    im.putdata([0, 1, 2, 1, 0, 2, 2, 1])
    item = encoded(im, transparency=0)  # palette entry 0 is fully transparent
    assert "transparency" in Image.open(io.BytesIO(item["bytes"])).info
    out = decoded(item)
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not the black hidden under it
    assert out[0, 1].tolist() == [200, 10, 10] and out[0, 2].tolist() == [10, 200, 10]


def test_cmyk_jpeg():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink-wise
    item = encoded(im, "JPEG", quality=100)
    assert Image.open(io.BytesIO(item["bytes"])).mode == "CMYK"
    out = decoded(item)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_bilevel_mode_1():
    bits = np.random.default_rng(2).integers(0, 2, (16, 16)).astype(bool)
    out = decoded(encoded(Image.fromarray(bits)))
    np.testing.assert_array_equal(out, gray_rgb(bits * 255))


def test_grayscale_l():
    gray = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    np.testing.assert_array_equal(decoded(encoded(Image.fromarray(gray))), gray_rgb(gray))


# ---------------------------------------------------------------- regions and reduced-scale JPEG decoding

@pytest.fixture(scope="module")
def photo():
    """A smooth 400x320 image (so a downscaled decode is close to the full one), as JPEG."""
    y, x = np.mgrid[0:320, 0:400].astype(np.float64)
    rgb = np.stack([128 + 100 * np.sin(x / 40), 128 + 100 * np.cos(y / 30), (x + y) / 3], -1).astype(np.uint8)
    return rgb, encoded(Image.fromarray(rgb), "JPEG", quality=95)


def test_lazy_image_reads_the_size_from_the_header(photo):
    _, item = photo
    image = LazyImage({"bytes": item["bytes"][:2000], "path": None})  # header and a little data
    assert (image.height, image.width) == (320, 400)
    with pytest.raises(OSError):
        image.pixels()
    assert image.failed


def test_png_region_is_exact():
    rgb = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    region = LazyImage(encoded(Image.fromarray(rgb))).pixels((5, 7, 20, 30), min_size=(4, 4))
    np.testing.assert_array_equal(region, rgb[5:25, 7:37])


def test_jpeg_region_full_scale_when_output_is_not_much_smaller(photo):
    _, item = photo
    full = decode_image(item)
    region = LazyImage(item).pixels((10, 20, 200, 300), min_size=(150, 160))
    np.testing.assert_array_equal(region, full[10:210, 20:320])


def test_jpeg_region_decoded_at_reduced_scale(photo):
    rgb, item = photo
    region = LazyImage(item).pixels((40, 80, 240, 240), min_size=(56, 56))  # 1/4 scale still gives >= 56 px
    assert region.shape == (60, 60, 3)
    reference = torch.nn.functional.interpolate(torch.from_numpy(rgb[40:280, 80:320]).permute(2, 0, 1)[None].float(),
                                                size=(60, 60), mode="area")[0].permute(1, 2, 0).numpy()
    assert np.abs(region.astype(float) - reference).mean() < 4


def test_truncated_jpeg_in_the_lazy_path_is_one_line(photo):
    _, item = photo
    good = {"bytes": item["bytes"], "path": "cats/ok.jpg"}
    cut = {"bytes": item["bytes"][: len(item["bytes"]) // 2], "path": "cats/cut.jpg"}
    transform = BatchTransform(build_pipeline([{"type": "RandomResizedCrop", "scale": 32}, {"type": "PackClsInputs"}]),
                               image_column="img", label_column="label", source="image folder x")
    batch = {"img": [good, cut], "label": [0, 1], "__row__": [7, 8]}
    with pytest.raises(DataError, match=r"^cannot decode image at index 8 \(cats/cut\.jpg\) of image folder x: .*"
                                        r"on_corrupt to \"skip\"") as info:
        transform(batch)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the RGB PNG path without Image.open

@pytest.mark.parametrize("height, width, smooth", [(1, 1, False), (32, 32, False), (17, 300, True), (200, 200, False)])
def test_rgb_png_fast_path_equals_image_open(height, width, smooth):
    """8-bit RGB PNGs (one IDAT chunk or several, each PNG row filter Pillow picks) decode
    through Image.frombytes's zlib decoder to Image.open's pixels."""
    from hf_finetune.data.decode import _decode_png_rgb8

    rng = np.random.default_rng(height)
    if smooth:
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([x % 256, (3 * y) % 256, (x + y) % 256], -1).astype(np.uint8)
    else:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(rgb))["bytes"]
    if (height, width) == (200, 200):
        assert data.count(b"IDAT") > 1
    fast = _decode_png_rgb8(data)
    assert fast is not None
    np.testing.assert_array_equal(fast, rgb)
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(fast, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("damage", ["cut", "scrambled"])
def test_damaged_png_leaves_the_fast_path_for_pillows_error(damage):
    from hf_finetune.data.decode import _decode_png_rgb8

    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(rgb))["bytes"]
    start = data.index(b"IDAT") + 4
    if damage == "cut":  # the file ends inside the image data
        data = data[:len(data) // 2]
    else:  # the image data's zlib stream is broken, its chunk intact
        data = data[:start + 2] + bytes(200) + data[start + 202:]
    assert _decode_png_rgb8(data) is None
    with pytest.raises((OSError, ValueError, SyntaxError)):
        decode_image({"bytes": data, "path": None})


# ---------------------------------------------------------------- EXIF orientation, as exif_transpose applies it

def quadrants(height, width) -> np.ndarray:
    """Four flat colours, none mapped onto another by any flip or rotation."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[: height // 2, : width // 2] = (220, 30, 30)
    rgb[: height // 2, width // 2:] = (30, 30, 220)
    rgb[height // 2:, : width // 2] = (30, 200, 30)
    rgb[height // 2:, width // 2:] = (240, 240, 240)
    return rgb


def with_orientation(rgb, orientation, fmt="JPEG", **save) -> dict:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(rgb), fmt, exif=exif, **save)


def upright(item) -> np.ndarray:
    """What datasets' Image feature and transformers' load_image show."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(item["bytes"])) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # an RGB PNG would otherwise take the fast path
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_exif_transpose(orientation, fmt):
    item = with_orientation(quadrants(32, 64), orientation, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    expected = upright(item)
    assert expected.shape == ((64, 32, 3) if orientation >= 5 else (32, 64, 3))
    np.testing.assert_array_equal(decoded(item), expected)
    image = LazyImage(item)
    assert (image.height, image.width) == expected.shape[:2]
    box = (5, 3, 20, 14)  # (top, left, height, width) on the upright image
    np.testing.assert_array_equal(image.pixels(box), expected[5:25, 3:17])
    np.testing.assert_array_equal(image.pixels(box, min_size=(20, 14)), expected[5:25, 3:17])


@pytest.fixture(scope="module")
def sideways_photo():
    """A smooth 800x600 photo, no two corners alike, stored with each orientation (JPEG)."""
    y, x = np.mgrid[0:600, 0:800].astype(np.float64)
    rgb = np.stack([x / 800 * 230, y / 600 * 230, 128 + 90 * np.sin(x / 90)], -1).astype(np.uint8)
    return {o: with_orientation(rgb, o, quality=95) for o in (1, 3, 6, 8)}


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_reduced_scale_region_of_a_sideways_jpeg(sideways_photo, orientation):
    item = sideways_photo[orientation]
    full = upright(item)
    image = LazyImage(item)
    assert (image.height, image.width) == full.shape[:2]
    box = (40, 100, 240, 360)  # wide on the upright image, whatever the stored layout
    region = image.pixels(box, min_size=(56, 84))  # 1/4 scale still gives enough pixels
    assert region.shape == (60, 90, 3)
    reference = torch.nn.functional.interpolate(torch.from_numpy(full[40:280, 100:460].copy()).permute(2, 0, 1)[None].float(),
                                                size=region.shape[:2], mode="area")[0].permute(1, 2, 0).numpy()
    assert np.abs(region.astype(float) - reference).mean() < 4


def test_transformers_load_image_agrees_on_a_sideways_photo(tmp_path):
    from transformers.image_utils import load_image

    path = tmp_path / "phone.jpg"
    path.write_bytes(with_orientation(quadrants(32, 64), 6, quality=95)["bytes"])
    ours = decode_image({"bytes": None, "path": str(path)})
    assert ours.shape == (64, 32, 3)
    np.testing.assert_array_equal(ours, np.asarray(load_image(str(path))))
