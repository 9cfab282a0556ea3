"""Decoding one image: fast path equals general path, every mode becomes RGB, resize policy, bombs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import black_png, documented, encode, make_images, png_header_only
from serving import images
from serving.images import InvalidImage, decode_image, to_rgb32


def _general_path(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb32(img)


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}, {"quality": 30}, {"keep_rgb": True}])
def test_jpeg_fast_path_gives_the_same_pixels_as_the_general_path(options):
    x, _ = make_images(3, ["a", "b"])
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", **options)
        data = buf.getvalue()
        assert images.decode_jpeg_32(data) is not None
        np.testing.assert_array_equal(decode_image(data), _general_path(data))


def test_fast_path_refuses_other_sizes_and_truncated_data():
    # Refused means None (the general path then decides), never pixels: a truncated JPEG would
    # otherwise decode with its missing rows grey.
    good = encode(make_images(1, ["a"])[0][0], "JPEG")
    white, tall = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(white, "JPEG")
    Image.new("RGB", (32, 64), (0, 0, 0)).save(tall, "JPEG")
    assert images.decode_jpeg_32(white.getvalue()) is not None
    assert images.decode_jpeg_32(tall.getvalue()) is None  # wrong size
    assert images.decode_jpeg_32(good[: len(good) // 2]) is None  # truncated: refused half-way
    np.testing.assert_array_equal(images.decode_jpeg_32(good), _general_path(good))


def test_a_jpeg_with_4_4_1_sampling_is_decoded_as_pillow_decodes_it():
    # simplejpeg has no name for this subsampling (KeyError in its header read); Pillow decodes it.
    buf = io.BytesIO()
    Image.fromarray(make_images(1, ["a"])[0][0]).save(buf, "JPEG", subsampling=0)
    data = bytearray(buf.getvalue())
    data[data.index(b"\xff\xc0") + 11] = 0x14  # the luma component's sampling: 1 across, 4 down
    out = decode_image(bytes(data))
    np.testing.assert_array_equal(out, _general_path(bytes(data)))


def test_a_jpeg_of_more_scans_than_the_limit_is_refused_before_decoding():
    # A progressive JPEG's cost grows with its scans, which neither its bytes nor its pixels bound.
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 40)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    assert 1 < images.jpeg_scans(data) <= images.MAX_JPEG_SCANS
    assert images.decode_jpeg_32(data) is not None
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # the last scan, up to the end-of-image marker
    many = data[:last] + scan * images.MAX_JPEG_SCANS + data[-2:]
    assert images.jpeg_scans(many) > images.MAX_JPEG_SCANS
    assert images.decode_jpeg_32(many) is None
    with pytest.raises(InvalidImage, match="scans"):
        decode_image(many)


def _arithmetic(data: bytes) -> bytes:
    """``data`` with its frame header saying arithmetic coding (Pillow cannot write it): refused before its
    scans are read, so they need not be arithmetic-coded."""
    marker, _ = images.jpeg_frame(data)
    at = data.index(bytes([0xFF, marker]))
    return data[:at + 1] + bytes([{0xC0: 0xC9, 0xC2: 0xCA}[marker]]) + data[at + 2:]


@pytest.mark.parametrize("size, options", [(32, {}), (32, {"progressive": True}), (64, {"progressive": True})])
def test_an_arithmetic_coded_jpeg_is_refused_on_every_path(size, options):
    # Its cost is bounded by neither its bytes nor its scans: a few KB can make the decoder visit every
    # coefficient once per scan.
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "JPEG", **options)
    data = _arithmetic(buf.getvalue())
    assert images.jpeg_frame(data)[0] in (0xC9, 0xCA)
    assert images.decode_jpeg_32(data) is None
    with pytest.raises(InvalidImage, match="arithmetic-coded JPEG: not accepted"):
        decode_image(data)


def test_the_frame_header_is_found_by_walking_the_segments_not_by_searching_bytes():
    # A comment holding a frame marker's bytes comes before the real frame header: a byte search would
    # read it as an arithmetic-coded frame of another size.
    buf = io.BytesIO()
    Image.new("RGB", (48, 40)).save(buf, "JPEG", comment=b"\xff\xc9\x00\x11\x08\xff\xff\xff\xff")
    data = buf.getvalue()
    assert data.index(b"\xff\xc9") < data.index(b"\xff\xc0")
    assert images.jpeg_frame(data) == (0xC0, 48 * 48)  # 48x40: whole 16x16 units
    assert decode_image(data).shape == (32, 32, 3)
    assert images.jpeg_frame(b"\xff\xd8\xff\xda\x00\x08" + bytes(20)) == (None, 0)  # a scan, no frame


def test_bytes_between_segments_do_not_hide_the_frame_header():
    # libjpeg skips them (with a warning, which Pillow ignores), so the walk must skip them too: else an
    # arithmetic-coded file with one extra byte after its first segment went through unchecked.
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG", progressive=True)
    data = _arithmetic(buf.getvalue())
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    junk = data[:after_app0] + b"\x00\x17\xff\x00" + data[after_app0:]
    assert images.jpeg_frame(junk) == (0xCA, 64 * 64)
    with pytest.raises(InvalidImage, match="arithmetic-coded JPEG"):
        decode_image(junk)


def test_a_jpeg_whose_frame_header_the_walk_cannot_find_is_refused(monkeypatch):
    # Fails closed: were the walk and Pillow ever to disagree, the file is refused rather than decoded unchecked.
    monkeypatch.setattr(images, "jpeg_frame", lambda data: (None, 0))
    with pytest.raises(InvalidImage, match="JPEG whose frame header cannot be found from its markers; send it "
                                           "re-encoded"):
        images.open_image(encode(make_images(1, ["a"])[0][0], "JPEG"))


def _as_mpo(jpeg: bytes) -> bytes:
    """``jpeg`` with a multi-picture (MPF) segment, which makes Pillow open it as MPO."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    mpo = buf.getvalue()
    at = mpo.index(b"\xff\xe2")
    return jpeg[:2] + mpo[at:at + 2 + int.from_bytes(mpo[at + 2:at + 4], "big")] + jpeg[2:]


def test_a_jpeg_pillow_opens_as_mpo_is_checked_and_drafted_as_a_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 40)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    many = _as_mpo(data[:last] + data[last:-2] * images.MAX_JPEG_SCANS + data[-2:])
    assert Image.open(io.BytesIO(many)).format == "MPO"
    with pytest.raises(InvalidImage, match="scans"):
        decode_image(many)
    with pytest.raises(InvalidImage, match="arithmetic-coded JPEG"):
        decode_image(_as_mpo(_arithmetic(data)))
    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000), (20, 40, 60)).save(photo, "JPEG")  # 12 Mpx: decodes at 1/8, within the limit
    img = images.open_image(_as_mpo(photo.getvalue()))
    assert img.format == "MPO" and img.size == (500, 375)


def test_a_thin_image_costs_its_pixels_not_its_scaled_size():
    # Scaled so that its shorter side is 32 before the crop, a 4,194,304x1 PNG (the per-image limit) would
    # have been 4.3 Gpx (262,144x1 took 1.8 s and 1.35 GB); only the crop is resampled.
    import time

    buf = io.BytesIO()
    Image.new("L", (images.MAX_PIXELS, 1), 200).save(buf, "PNG")
    start = time.perf_counter()
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3) and (out == 200).all()
    assert time.perf_counter() - start < 1.0  # ~15 ms here
    thin = io.BytesIO()
    Image.new("RGB", (65500, 1)).save(thin, "JPEG", progressive=True)
    assert images.jpeg_frame(thin.getvalue()) == (0xC2, 65504 * 16)  # whole rows of blocks, for the passes


def test_grey_jpeg_takes_the_fast_path_and_matches():
    buf = io.BytesIO()
    Image.fromarray(make_images(1, ["a"])[0][0]).convert("L").save(buf, "JPEG")
    assert images.decode_jpeg_32(buf.getvalue()) is not None
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, _general_path(buf.getvalue()))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("size", [(64, 64), (32, 48), (48, 32), (16, 16), (640, 480)])
def test_jpeg_of_other_sizes_leaves_the_fast_path_and_is_resized(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buf, "JPEG", quality=95)
    assert images.decode_jpeg_32(buf.getvalue()) is None
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[16, 16, 0]) - 200) < 8 and out[16, 16, 1] < 45


def test_cmyk_jpeg_is_converted():
    buf = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(buf, "JPEG")
    assert images.decode_jpeg_32(buf.getvalue()) is None  # Pillow's CMYK conversion, on the general path
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 32, 3) and out[0, 0, 0] > 200 and out[0, 0, 1] < 60


def _image_in_mode(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32))
    if mode in ("PA", "La", "I;16B"):  # Pillow cannot convert RGB to these
        return Image.new(mode, (40, 24))
    return Image.fromarray(make_images(1, ["a"])[0][0]).convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "1", "RGBA", "LA", "La", "PA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
                                  "I;16", "I;16B", "I", "F", "RGBX"])
def test_every_mode_becomes_rgb_uint8(mode):
    img = _image_in_mode(mode)
    assert img.mode == mode
    out = to_rgb32(img)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped():
    png = encode(np.full((32, 32), 40000, dtype=np.uint16))  # saved as a 16-bit grey PNG
    out = decode_image(png)
    assert out[0, 0, 0] == round(40000 * 255 / 65535)  # 156, where clipping would give 255


def test_float_images_in_0_1_are_scaled():
    out = to_rgb32(Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)))
    assert out[0, 0, 0] == 128  # 0.5 * 255 = 127.5, rounded half to even


def test_transparency_is_composited_on_black():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half, opaque on the right
    rgba[:, 16:, 3] = 255
    out = decode_image(encode(rgba))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 31].tolist() == [255, 0, 0]


def test_resize_keeps_aspect_ratio_and_crops_the_centre():
    # 128x64: left quarter red, middle half green, right quarter blue. Shorter side -> 32
    # gives 64x32; the centre crop keeps only the green middle.
    img = np.zeros((64, 128, 3), dtype=np.uint8)
    img[:, :32] = (255, 0, 0)
    img[:, 32:96] = (0, 255, 0)
    img[:, 96:] = (0, 0, 255)
    out = decode_image(encode(img))
    assert out.shape == (32, 32, 3)
    assert out[:, 1:-1, 1].min() > 200 and out[:, 1:-1, 0].max() < 60 and out[:, 1:-1, 2].max() < 60


def test_first_frame_of_an_animated_gif_is_used():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(InvalidImage, match="decompression bomb"):
        decode_image(png_header_only(100_000, 100_000))


def test_the_documented_pixel_limit_of_one_image_is_4194304_and_a_jpeg_may_declare_4x():
    assert decode_image(black_png(2048, 2048)).shape == (32, 32, 3)  # 4,194,304 pixels: at the limit
    with pytest.raises(InvalidImage, match="image is 2048x2049 pixels, over the 4,194,304-pixel limit for one image"):
        decode_image(png_header_only(2048, 2049))
    jpegs = [io.BytesIO(), io.BytesIO()]
    for buf, height in zip(jpegs, (4096, 4097)):  # a JPEG decodes at 1/8 scale, so it may declare 4x as many
        Image.new("RGB", (4096, height)).save(buf, "JPEG")
    assert decode_image(jpegs[0].getvalue()).shape == (32, 32, 3)
    with pytest.raises(InvalidImage, match="image is 4096x4097 pixels, over the 16,777,216-pixel limit for one image"):
        decode_image(jpegs[1].getvalue())
    documented("docs/serving.md", "at most **4,194,304 pixels as decoded** per image (a JPEG decodes at the smallest "
                                  "of 1/1–1/8 scale that still covers 32×32, and may declare at most 4× that")


def test_pillow_guard_stays_on_behind_ours():
    # With our own limit lifted, Pillow's guard (2x MAX_IMAGE_PIXELS) still refuses.
    assert Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(InvalidImage, match="not a readable image"):
        decode_image(png_header_only(100_000, 100_000), max_pixels=10**12)


def test_oversized_file_is_refused_without_parsing(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(InvalidImage, match="over the 1,000-byte limit"):
        decode_image(encode(make_images(1, ["a"])[0][0]) + bytes(1000))


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a readable image"),
    (b"\xff\xd8\xff\xe0" + bytes(100), "corrupt|not a readable"),
])
def test_unreadable_bytes_raise_invalid_image(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise_invalid_image(fmt):
    data = encode(make_images(1, ["a"])[0][0], fmt)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["TIFF", "PCX", "PPM", "ICO"])
def test_only_the_documented_formats_are_opened(fmt):
    """Pillow reads these, but an upload in them is refused: its other plugins (EPS runs Ghostscript) never run."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format=fmt)
    with pytest.raises(InvalidImage, match="not a PNG, JPEG, BMP, GIF or WebP image"):
        decode_image(buf.getvalue())


def test_postscript_never_reaches_pillow_s_eps_plugin(monkeypatch):
    from PIL import EpsImagePlugin

    def never(*args):
        raise AssertionError("the EPS plugin was asked to open an upload")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    with pytest.raises(InvalidImage, match="not a PNG, JPEG, BMP, GIF or WebP image"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n%%EOF\n")


DECODE_COST = """
import resource, sys, time
from tests.helpers import black_png
from serving.images import InvalidImage, decode_image

png = black_png(int(sys.argv[1]), int(sys.argv[1]), bits=16)
decode_image(black_png(64, 64, bits=16))  # imports and plugins loaded before measuring
before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
try:
    decode_image(png)
    outcome = "decoded"
except InvalidImage as exc:
    outcome = str(exc)
took = time.perf_counter() - t0
print(took, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, outcome)
"""


@pytest.mark.parametrize("side, outcome", [(6000, "over the 4,194,304-pixel limit"), (2047, "decoded")])
def test_a_deep_image_costs_under_0_2_s_and_100_mb(side, outcome):
    """A 16-bit greyscale PNG: 6000x6000 (70 KB) took 2.3-2.7 s and ~1 GB through a float64 copy; now it is
    refused from its header, and the largest one under the limit decodes without full-size float copies."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, "-c", DECODE_COST, str(side)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    took, extra_mb, said = out.stdout.split(" ", 2)
    assert outcome in said
    assert float(took) < 0.2 and float(extra_mb) < 100, (took, extra_mb)


def test_a_jpeg_may_declare_more_pixels_than_it_decodes_but_not_without_bound():
    big = io.BytesIO()
    Image.new("L", (3000, 2000), 90).save(big, format="JPEG", quality=20)  # 6 Mpx declared: decodes at 1/8
    img = images.open_image(big.getvalue())
    assert images.decoded_pixels(img) == 375 * 250
    assert np.abs(decode_image(big.getvalue()).astype(int) - 90).max() <= 3
    huge = io.BytesIO()
    Image.new("L", (5000, 4000), 90).save(huge, format="JPEG", quality=20)  # 20 Mpx: over 4x the limit
    with pytest.raises(InvalidImage, match="over the 16,777,216-pixel limit"):
        decode_image(huge.getvalue())


def test_large_images_are_reduced_before_their_mode_is_converted_with_the_same_result():
    """Reducing first (transparency premultiplied) gives what compositing on black and then resizing gave."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8).repeat(128, axis=0).repeat(128, axis=1)  # 1024x1024
    img = Image.fromarray(rgba, "RGBA")
    composited = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("RGB")
    expected = np.asarray(composited.resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=2.0))
    got = to_rgb32(img)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_a_large_sixteen_bit_image_is_scaled_by_its_own_white_level():
    img = Image.fromarray(np.full((256, 256), 40000, dtype=np.uint16))  # reduced by 4 before scaling to 8 bits
    assert to_rgb32(img)[0, 0, 0] == round(40000 * 255 / 65535)
    # 8-bit data stored wide: its white level is 255, not 65535
    assert to_rgb32(Image.fromarray(np.full((256, 256), 200, dtype=np.uint16)))[5, 5, 0] == 200
