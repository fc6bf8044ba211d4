"""The PTY framing, as pure functions: markers found in noisy, chunked streams; sizes exact."""

from __future__ import annotations

import base64

import pytest

from hctl.remote import framing


def feed_in_pieces(reader: framing.FrameReader, stream: bytes, size: int) -> bytes:
    out = b""
    for start in range(0, len(stream), size):
        out += reader.feed(stream[start : start + size])
    return out


@pytest.mark.parametrize("piece", [1, 2, 7, 1000])
def test_output_between_markers_comes_back_exactly_whatever_the_chunking(piece: int) -> None:
    tag = "__HCTL_abc"
    body = b"line one\r\n\x1b[31mred\x1b[0m caf\xc3\xa9\nno newline at the end"
    noise = b"\x1b[?2004h\x1b[01;32mroot@pod\x1b[00m:~# __hctl_run __HCTL_abc <<'X'\r\n\x1b[?2004l"
    stream = noise + tag.encode() + b":begin\n" + body + b"\n" + tag.encode() + b":end 7\nPROMPT# "
    reader = framing.FrameReader(tag)
    assert feed_in_pieces(reader, stream, piece) == body
    assert reader.done and reader.status == 7
    assert "root@pod" in reader.noise_text()


def test_echoed_command_line_cannot_end_the_frame_early() -> None:
    tag = framing.new_tag()
    typed = framing.run_invocation(tag, "echo hello").encode()
    reader = framing.FrameReader(tag)
    # A shell that echoes what was typed (echo not yet off) shows the invocation first.
    assert reader.feed(typed) == b""
    assert not reader.started
    reader.feed(f"{tag}:begin\nhello\n\n{tag}:end 0\n".encode())
    assert reader.done and reader.status == 0


def test_commands_travel_base64_encoded_in_short_lines() -> None:
    command = "echo \"it's\" 'x' $HOME; " + "y" * 10_000
    text = framing.run_invocation("T", command)
    lines = text.splitlines()
    assert lines[0] == f"__hctl_run T <<'{framing.HEREDOC_END}'"
    assert lines[-1] == framing.HEREDOC_END
    assert all(len(line) < 4000 for line in lines)
    assert base64.b64decode("".join(lines[1:-1])).decode() == command


@pytest.mark.parametrize("size", [0, 1, 2, 3, 2999, 3000, 3001, 9000, 12345])
def test_encoded_size_matches_the_lines_sent(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    encoded = framing.encode_lines(data)
    assert framing.encoded_size(size) == len(encoded)
    assert base64.b64decode(encoded.replace(b"\n", b"")) == data


def test_strip_ansi_removes_colours_bracketed_paste_and_carriage_returns() -> None:
    assert framing.strip_ansi("\x1b[?2004h\x1b[01;32mok\x1b[0m\r\n") == "ok\n"
