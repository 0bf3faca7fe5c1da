"""Decoding, mode conversion and resizing of images (taxonomist.data.images)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from taxonomist.config import RESIZE_MODES
from taxonomist.data.images import ImageSpec, InvalidImage, decode

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def sample_image(mode: str, size: tuple[int, int] = (37, 23)) -> Image.Image:
    """A non-square image in ``mode`` with varied content."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        ramp = np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16)
        return Image.fromarray(ramp)
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16", "1", "CMYK"])
def test_decode_any_mode_to_spec(mode, channels, resize_mode):
    img = sample_image(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(img, fmt)
    if mode == "I;16":
        assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    out = decode(data, ImageSpec(size=16, channels=channels, resize_mode=resize_mode))
    assert out.shape == (16, 16, channels)
    assert out.dtype == np.uint8
    assert out.max() > out.min()  # content survived (not a blank image)


def test_decode_jpeg():
    out = decode(encode(sample_image("RGB"), "JPEG", quality=90), ImageSpec(20, 3))
    assert out.shape == (20, 20, 3)


def test_sixteen_bit_is_scaled_to_full_range():
    out = decode(encode(sample_image("I;16", (16, 16))), ImageSpec(16, 1))
    assert out.shape == (16, 16, 1)
    assert out.min() == 0 and out.max() == 255
    # A ramp stays a ramp: pixel values increase in reading order.
    assert np.all(np.diff(out.reshape(-1).astype(int)) >= 0)


def test_sixteen_bit_all_zero_does_not_divide_by_zero():
    img = Image.fromarray(np.zeros((10, 10), dtype=np.uint16))
    out = decode(encode(img), ImageSpec(10, 1))
    assert (out == 0).all()


def test_same_size_is_pixel_exact():
    pixels = np.random.default_rng(3).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(pixels, "RGB")), ImageSpec(12, 3))
    np.testing.assert_array_equal(out, pixels)


def test_rgb_to_grayscale_uses_luminance():
    img = Image.new("RGB", (8, 8), GREEN)
    out = decode(encode(img), ImageSpec(8, 1))
    assert out.shape == (8, 8, 1)
    assert np.all(out == 150)  # ITU-R 601-2 luma: 0.587 * 255 = 149.7


def test_grayscale_to_rgb_repeats_the_channel():
    img = Image.new("L", (8, 8), 77)
    out = decode(encode(img), ImageSpec(8, 3))
    assert np.all(out == 77)


@pytest.mark.parametrize("channels", [1, 3])
def test_transparency_is_flattened_onto_white(channels):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent
    rgba.putpixel((0, 0), (10, 20, 30, 255))  # one opaque pixel
    out = decode(encode(rgba), ImageSpec(8, channels))
    assert np.all(out[1:, :] == 255)
    assert np.all(out[0, 0] < 40)


def test_palette_transparency_is_flattened_onto_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.putpixel((0, 0), 1)
    data = encode(img, transparency=0)
    out = decode(data, ImageSpec(8, 3))
    assert tuple(out[4, 4]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (200, 0, 0)


def three_bands(width: int = 60, height: int = 20) -> Image.Image:
    """A wide image: left third red, middle green, right third blue."""
    img = Image.new("RGB", (width, height), GREEN)
    img.paste(RED, (0, 0, width // 3, height))
    img.paste(BLUE, (2 * width // 3, 0, width, height))
    return img


def test_squash_keeps_everything_and_stretches():
    out = decode(encode(three_bands()), ImageSpec(30, 3, "squash"))
    assert tuple(out[15, 2]) == RED
    assert tuple(out[15, 15]) == GREEN
    assert tuple(out[15, 27]) == BLUE
    assert tuple(out[0, 15]) == GREEN  # no padding rows


def test_center_crop_keeps_the_middle():
    out = decode(encode(three_bands()), ImageSpec(20, 3, "center_crop"))
    assert np.all(out == np.array(GREEN, dtype=np.uint8))


def test_pad_letterboxes_with_black():
    out = decode(encode(three_bands()), ImageSpec(30, 3, "pad"))
    # 60x20 -> 30x10 content centred vertically, black above and below.
    assert np.all(out[:8] == 0) and np.all(out[-8:] == 0)
    assert tuple(out[15, 2]) == RED
    assert tuple(out[15, 15]) == GREEN
    assert tuple(out[15, 27]) == BLUE


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(three_bands(60, 20), "JPEG", quality=95, exif=exif)
    out = decode(data, ImageSpec(30, 3, "pad"))
    # Displayed upright the image is tall (20x60): padding is left and right, not top and bottom.
    assert out[:, :8].max() < 20 and out[:, -8:].max() < 20
    assert out[15, 15].max() > 200


def test_truncated_png_is_invalid():
    data = encode(sample_image("RGB", (64, 64)))
    with pytest.raises(InvalidImage, match="cannot decode"):
        decode(data[: len(data) // 2], ImageSpec(16, 3))


def test_truncated_jpeg_is_invalid():
    data = encode(sample_image("RGB", (64, 64)), "JPEG")
    with pytest.raises(InvalidImage):
        decode(data[: len(data) // 2], ImageSpec(16, 3))


@pytest.mark.parametrize("data", [b"", np.random.default_rng(0).bytes(4096), b"GIF89a" + b"\x00" * 5])
def test_garbage_is_invalid(data):
    with pytest.raises(InvalidImage, match="cannot decode"):
        decode(data, ImageSpec(16, 3))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = bytearray(data[16:29])  # the IHDR chunk's data follows 8 (signature) + 8 (length, type) bytes
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_is_invalid():
    with pytest.raises(InvalidImage, match="too large"):
        decode(png_claiming_size(30_000, 30_000), ImageSpec(16, 1))
