"""A request's uploads to pixels: both pixel budgets, the cheap and costly lanes, never on the event loop."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time

import numpy as np
import pytest

from serving import decoding
from serving.decoding import (CHEAP_PIXELS, MAX_REQUEST_JPEG_PASSES, MAX_REQUEST_PIXELS, Decoder, Refused, load_all,
                              open_all)
from tests.helpers import black_png, documented, encode, image_bytes, make_images


def test_a_cheap_request_is_decoded_with_its_headers():
    files = [image_bytes(1), encode(make_images(1, ["a"])[0][0], "PNG"), black_png(64, 64)]
    pixels, pending = open_all(files)
    assert pending == {} and all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in pixels)


def test_a_costly_request_is_only_opened_then_decoded_in_the_costly_lane():
    side = int(CHEAP_PIXELS ** 0.5) + 1
    pixels, pending = open_all([image_bytes(1), black_png(side, side)])
    assert pixels[0].shape == (32, 32, 3) and pixels[1] is None and list(pending) == [1]
    assert pending[1].tile  # opened: header read, its tiles not decoded yet
    load_all(pixels, pending)
    assert pixels[1].shape == (32, 32, 3) and pixels[1].max() == 0


def test_the_request_budget_counts_decoded_pixels_of_all_files():
    fits = [black_png(2048, 2048)] * 4  # 16,777,216 pixels: the documented budget, filled
    documented("docs/serving.md", "and **16,777,216 per request**, all files together")
    assert len(open_all(fits)[1]) == 4
    with pytest.raises(Refused, match=r"over 16,777,216 pixels together \(at file 4 \(0-based\)\), the limit per "
                                      "request; send fewer or smaller images"):
        open_all(fits + [black_png(1, 1)])


def test_the_request_budget_counts_the_pixel_passes_of_progressive_jpegs():
    # Each scan of a progressive JPEG passes over every declared pixel, at any decoding scale and however
    # few bytes it holds: 4096x4096 flat in 64 scans (the per-image limits) is ~100 KB and ~0.5 s of a core.
    from PIL import Image

    from serving.images import MAX_JPEG_SCANS, jpeg_frame, jpeg_scans

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 90, 90)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    worst = data[:last] + data[last:-2] * (MAX_JPEG_SCANS - jpeg_scans(data) + 1) + data[-2:]
    assert jpeg_scans(worst) == MAX_JPEG_SCANS and jpeg_frame(worst)[1] * MAX_JPEG_SCANS == MAX_REQUEST_JPEG_PASSES
    # The worst one JPEG may be fills the request's budget, and goes to the costly lane although it decodes
    # to the cheap lane's pixels (512x512).
    assert len(open_all([worst])[1]) == 1 and jpeg_frame(worst)[1] // 64 == CHEAP_PIXELS
    with pytest.raises(Refused, match=r"take over 1,073,741,824 pixel passes to decode \(declared pixels times "
                                      r"scans, at file 1 \(0-based\)\), the limit per request"):
        open_all([worst, data])
    # A photo's worth: ten scans of 4096x4096, six to a request.
    assert len(open_all([data] * (MAX_REQUEST_JPEG_PASSES // (jpeg_frame(data)[1] * jpeg_scans(data))))[1]) == 6
    documented("docs/reliability.md", "1,073,741,824 pixel passes")


def test_the_cheap_lane_and_the_inline_jpegs_are_bounded_as_documented():
    assert (MAX_REQUEST_PIXELS, CHEAP_PIXELS, decoding.INLINE_JPEG_BYTES) == (16_777_216, 262_144, 8192)
    documented("docs/serving.md", "decodes it at once when it decodes to at most 262,144 pixels")
    documented("docs/serving.md", "a request of 32×32 JPEGs of at most 8 KiB each")


def test_a_bad_file_is_named_by_its_place():
    with pytest.raises(Refused, match=r"^file 1 \(0-based\): not a readable image"):
        open_all([image_bytes(1), b"not an image"])
    with pytest.raises(Refused, match=r"^file: image is 9000x9000 pixels, over the 4,194,304-pixel limit"):
        open_all([black_png(9000, 9000)])


def test_decoding_runs_off_the_event_loop_which_keeps_answering():
    """The loop ticks every 5 ms while costly requests (each near the budget) are decoded."""
    side = int((MAX_REQUEST_PIXELS / 16) ** 0.5) - 1
    costly = [black_png(side, side, bits=16, colour="rgba")] * 16

    async def main():
        decoder, lags, done = Decoder(threads=2, nice=0), [], asyncio.Event()

        async def ticker():
            while not done.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t0 - 0.005)

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(*(decoder(costly) for _ in range(3)))
        done.set()
        await tick
        return results, lags

    results, lags = asyncio.run(main())
    assert all(r.shape == (16, 32, 32, 3) for r in results)
    assert len(lags) > 5 and max(lags) < 0.1, max(lags)


def test_the_costly_lane_runs_at_the_lowest_priority():
    decoder = Decoder(threads=1, nice=0)
    seen = decoder._costly.submit(lambda: (threading.current_thread().name,
                                           os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))).result()
    assert seen[0].startswith("decode-costly") and seen[1] == min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                   + decoding.COSTLY_NICE)


def test_only_small_single_scan_32x32_jpegs_are_decoded_on_the_event_loop(monkeypatch):
    """They cost less than the hand-off; anything else, a larger or a progressive 32x32 JPEG too, goes to a lane."""
    from PIL import Image
    import io

    lanes = []
    monkeypatch.setattr(decoding, "open_all", lambda files: lanes.append(len(files)) or open_all(files))
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        noisy, "BMP")
    big_jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        big_jpeg, "JPEG", quality=100, subsampling=0, optimize=False, comment=b"x" * decoding.INLINE_JPEG_BYTES)
    assert len(big_jpeg.getvalue()) > decoding.INLINE_JPEG_BYTES
    progressive = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 40)).save(progressive, "JPEG", progressive=True)
    assert len(progressive.getvalue()) <= decoding.INLINE_JPEG_BYTES

    async def main():
        decoder = Decoder(threads=1, nice=0)
        small = await decoder([image_bytes(1)] * 3)
        assert lanes == [] and small.shape == (3, 32, 32, 3)
        for files in ([image_bytes(1), noisy.getvalue()], [big_jpeg.getvalue()], [progressive.getvalue()]):
            assert (await decoder(files)).shape == (len(files), 32, 32, 3)
        return lanes

    assert asyncio.run(main()) == [2, 1, 1]
