"""bench/peers.py sends each server the same JPEG in its own protocol and reads the same probabilities back."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from bench.peers import answered_probabilities, request_body, wrk_script

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3 + b"\xff\xd9"
PROBS = [0.05] * 9 + [0.55]


def test_multipart_carries_the_jpeg_as_the_file_field():
    body, headers = request_body("multipart", JPEG)
    boundary = headers["Content-Type"].split("boundary=")[1]
    head, rest = body.split(b"\r\n\r\n", 1)
    assert head.startswith(f"--{boundary}\r\n".encode()) and b'name="file"' in head
    assert rest == JPEG + f"\r\n--{boundary}--\r\n".encode()


def test_triton_binary_tensor_is_a_json_header_then_a_length_prefixed_bytes_element():
    body, headers = request_body("triton", JPEG)
    size = int(headers["Inference-Header-Content-Length"])
    header, tensor = json.loads(body[:size]), body[size:]
    assert header["inputs"][0]["parameters"]["binary_data_size"] == len(tensor)
    assert header["inputs"][0]["datatype"] == "BYTES" and header["inputs"][0]["shape"] == [1, 1]
    assert struct.unpack("<I", tensor[:4])[0] == len(JPEG) and tensor[4:] == JPEG


def test_v2_json_carries_the_jpeg_base64():
    body, headers = request_body("v2", JPEG)
    assert headers["Content-Type"] == "application/json"
    assert base64.b64decode(json.loads(body)["inputs"][0]["data"][0]) == JPEG


@pytest.mark.parametrize("protocol, answer", [
    ("multipart", {"class_id": 9, "probabilities": {str(i): p for i, p in enumerate(PROBS)}}),
    ("multipart", [{"class_id": 9, "probabilities": {str(i): p for i, p in enumerate(PROBS)}}]),
    ("triton", {"outputs": [{"name": "probabilities", "shape": [1, 10], "data": PROBS}]}),
    ("v2", {"outputs": [{"name": "probabilities", "shape": [1, 10], "data": PROBS}]}),
])
def test_every_answer_gives_the_probabilities(protocol, answer):
    assert answered_probabilities(protocol, json.dumps(answer).encode()).tolist() == PROBS


def test_wrk_script_posts_the_body_file_with_the_headers(tmp_path):
    text = wrk_script(tmp_path / "s.lua", {"Inference-Header-Content-Length": "123"}).read_text()
    assert 'os.getenv("BENCH_IMAGE")' in text and 'wrk.headers["Inference-Header-Content-Length"] = "123"' in text
    assert "done = function" in text
