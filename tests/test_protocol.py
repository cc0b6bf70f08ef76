"""The wire format: encode/decode round trips and every way a frame can be wrong."""

import json

import pytest

from gen3d_wire import protocol as P
from gen3d_wire.protocol import Attachment, ErrorCode, ProtocolError


def frames_of(header, *atts):
    return [json.dumps(header).encode()] + list(atts)


def test_round_trip_with_attachments():
    frames = P.submit("reconstruct", {"iterations": 10}, [Attachment("a", "image/png", b"\x89PNGxx"), Attachment("b", "model/gltf-binary", b"glTF")], req="r1")
    msg = P.decode(frames, expect=P.REQUEST_TYPES)
    assert msg.type == P.SUBMIT
    assert msg.get("v") == P.PROTOCOL_VERSION
    assert msg.get("params") == {"iterations": 10}
    assert msg.get("req") == "r1"
    assert [a.name for a in msg.attachments] == ["a", "b"]
    assert msg.attachment("b").data == b"glTF"
    assert msg.attachment("b").mime == "model/gltf-binary"


def test_every_constructor_has_the_version_and_decodes():
    all_frames = [
        P.submit("k"), P.cancel("j"), P.status(), P.status("j"), P.fetch("j", True), P.ping(), P.capabilities_request(),
        P.accepted("j", "k", 0), P.progress("j", "stage", 0.5, "m", b"png", 0.2), P.result("j", {"a": 1}, []),
        P.error(ErrorCode.BAD_INPUT, "x", "j"), P.cancelled("j"), P.pong(1.0), P.status_reply({"state": "queued"}),
        P.capabilities_reply({"protocol": 1}),
    ]
    for frames in all_frames:
        msg = P.decode(frames)
        assert json.loads(frames[0])["v"] == P.PROTOCOL_VERSION
        assert msg.type in P.REQUEST_TYPES + P.REPLY_TYPES


def test_progress_fraction_is_clamped_and_finite():
    msg = P.decode(P.progress("j", "s", float("nan"), "m"))
    assert msg.get("fraction") == 0.0
    msg = P.decode(P.progress("j", "s", 7.0, "m"))
    assert msg.get("fraction") == 1.0


def test_encode_refuses_nan_in_header():
    with pytest.raises(ValueError):
        P.encode({"type": P.RESULT, "job": "j", "metadata": {"x": float("nan")}})


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], ErrorCode.BAD_MESSAGE),
        ([b"\xff\xfe\x00garbage"], ErrorCode.BAD_MESSAGE),
        ([b"not json"], ErrorCode.BAD_MESSAGE),
        ([b"[1, 2, 3]"], ErrorCode.BAD_MESSAGE),
        (frames_of({"type": "ping"}), ErrorCode.BAD_VERSION),
        (frames_of({"v": "1", "type": "ping"}), ErrorCode.BAD_VERSION),
        (frames_of({"v": 99, "type": "ping"}), ErrorCode.BAD_VERSION),
        (frames_of({"v": 1}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "explode"}), ErrorCode.UNKNOWN_TYPE),
        (frames_of({"v": 1, "type": "submit"}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "submit", "kind": 5}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "submit", "kind": "x", "params": [1]}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "cancel", "job": None}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "fetch", "job": "x", "watch": "yes"}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "ping", "attachments": "x"}), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "ping", "attachments": [{"name": "a"}]}), ErrorCode.BAD_MESSAGE),  # missing frame
        (frames_of({"v": 1, "type": "ping"}, b"extra"), ErrorCode.BAD_MESSAGE),  # undeclared frame
        (frames_of({"v": 1, "type": "ping", "attachments": [{"name": "a", "size": 3}]}, b"abcd"), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "ping", "attachments": [{"name": "a"}, {"name": "a"}]}, b"1", b"2"), ErrorCode.BAD_MESSAGE),
        (frames_of({"v": 1, "type": "ping", "attachments": [{"nome": "a"}]}, b"1"), ErrorCode.BAD_MESSAGE),
        ([b"{" + b" " * (P.MAX_HEADER_BYTES + 1) + b"}"], ErrorCode.TOO_LARGE),
    ],
)
def test_decode_rejects(frames, code):
    with pytest.raises(ProtocolError) as info:
        P.decode(frames, expect=P.REQUEST_TYPES)
    assert info.value.code == code
    assert info.value.message  # a human-readable reason


def test_server_only_accepts_requests():
    with pytest.raises(ProtocolError) as info:
        P.decode(P.pong(1.0), expect=P.REQUEST_TYPES)
    assert info.value.code == ErrorCode.UNKNOWN_TYPE
