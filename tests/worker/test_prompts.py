"""Prompt sets from text files (and the hub path's offline error)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hctl_worker.errors import PromptError
from hctl_worker.prompts import _read_column, load_prompts, parse_split
from hctl_worker.settings import PromptSource


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "\n".join(f"prompt {index}" for index in range(10)) + "\n\n  \n", encoding="utf-8"
    )
    return path


def test_text_file_one_prompt_per_line_blank_lines_dropped(prompt_file: Path) -> None:
    prompts = load_prompts(PromptSource(dataset=str(prompt_file)))
    assert prompts == [f"prompt {index}" for index in range(10)]


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("[:3]", [0, 1, 2]),
        ("[8:]", [8, 9]),
        ("train[2:4]", [2, 3]),
        ("[:20%]", [0, 1]),
        ("[-2:]", [8, 9]),
    ],
)
def test_splits_slice_the_file(prompt_file: Path, split: str, expected: list[int]) -> None:
    prompts = load_prompts(PromptSource(dataset=str(prompt_file), split=split))
    assert prompts == [f"prompt {index}" for index in expected]


def test_prefix_and_suffix_are_joined_with_spaces(prompt_file: Path) -> None:
    source = PromptSource(
        dataset=str(prompt_file), split="[:1]", prefix="Please:", suffix="Thanks."
    )
    assert load_prompts(source) == ["Please: prompt 0 Thanks."]


def test_empty_file_is_a_prompt_error_with_a_hint(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PromptError) as raised:
        load_prompts(PromptSource(dataset=str(empty)), "bad_prompts")
    assert "bad_prompts" in raised.value.message and str(empty) in raised.value.message
    assert "one prompt per line" in raised.value.hint


def test_split_beyond_the_file_is_empty_too(prompt_file: Path) -> None:
    with pytest.raises(PromptError, match="split"):
        load_prompts(PromptSource(dataset=str(prompt_file), split="[50:]"))


def test_missing_file_is_a_prompt_error(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(PromptSource(dataset=str(tmp_path / "missing.txt")))


def test_hub_dataset_while_offline_says_so() -> None:
    # The test environment sets HF_HUB_OFFLINE=1; `datasets` is not installed here.
    with pytest.raises(PromptError) as raised:
        load_prompts(PromptSource(dataset="mlabonne/harmless_alpaca", split="train[:4]"))
    assert "mlabonne/harmless_alpaca" in raised.value.message
    assert "text file" in raised.value.hint


def test_downloaded_json_lines_and_csv_columns_are_read(tmp_path: Path) -> None:
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    table = tmp_path / "train.csv"
    table.write_text("text,label\nc,1\nd,0\n", encoding="utf-8")
    assert _read_column(lines, "text", "good_prompts") == ["a", "b"]
    assert _read_column(table, "text", "good_prompts") == ["c", "d"]
    with pytest.raises(PromptError, match="column 'prompt'"):
        _read_column(lines, "prompt", "good_prompts")


def test_parse_split() -> None:
    assert parse_split("train[:400]") == ("train", None, "400")
    assert parse_split("test") == ("test", None, None)
    assert parse_split(None) == ("", None, None)


def test_rows_api_pages_until_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-pyarrow hub path, against a local stand-in of the datasets server."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    from hctl_worker import prompts as prompts_module

    requests: list[dict] = []

    class Rows(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            query = {key: values[0] for key, values in parse_qs(urlparse(self.path).query).items()}
            requests.append(query)
            offset, length = int(query["offset"]), int(query["length"])
            rows = [
                {"row": {"text": f"row {index}"}}
                for index in range(offset, min(offset + length, 250))
            ]
            body = json.dumps({"rows": rows, "num_rows_total": 250}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *arguments: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Rows)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(
            prompts_module, "DATASETS_SERVER", f"http://127.0.0.1:{server.server_port}/rows"
        )
        source = PromptSource(dataset="someone/prompts", split="train[:150]")
        rows = prompts_module._read_rows_api(source, "train", "good_prompts", limit=150)
        everything = prompts_module._read_rows_api(source, "train", "good_prompts")
    finally:
        server.shutdown()
    assert rows == [f"row {index}" for index in range(150)]
    assert [(query["offset"], query["length"]) for query in requests[:2]] == [
        ("0", "100"),
        ("100", "50"),
    ]
    assert len(everything) == 250 and requests[0]["dataset"] == "someone/prompts"


def test_a_binary_file_is_refused_as_not_text(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_bytes(b"\x00\x00\x00\x01prompt\n" * 10)
    with pytest.raises(PromptError, match="is a binary file"):
        load_prompts(PromptSource(dataset=str(path)), "bad_prompts")


def test_an_overlong_prompt_is_refused_with_its_number_and_the_limit(tmp_path: Path) -> None:
    from hctl_worker.prompts import MAX_PROMPT_CHARACTERS

    path = tmp_path / "prompts.txt"
    path.write_text("short one\n" + "x" * (MAX_PROMPT_CHARACTERS + 1) + "\n", encoding="utf-8")
    with pytest.raises(PromptError, match="prompt 2 of .* characters long") as caught:
        load_prompts(PromptSource(dataset=str(path)), "good_prompts")
    assert "line breaks" in caught.value.hint
    sliced = load_prompts(PromptSource(dataset=str(path), split="[:1]"))
    assert sliced == ["short one"]  # only the prompts a job uses count


@pytest.mark.parametrize("client", ["httpx", "httpx2"])
def test_hub_dataset_without_a_network_is_a_prompt_error(
    monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    """huggingface_hub reports an unreachable hub as an error of its HTTP client (httpx, or
    httpx2 from huggingface_hub 2.x on), not an OSError: still the user's error (no network),
    with a hint, not an internal one."""
    from huggingface_hub import HfApi

    module = pytest.importorskip(client)

    def unreachable(*args, **kwargs):
        raise module.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "list_repo_files", unreachable)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # the path without datasets
    with pytest.raises(PromptError) as raised:
        load_prompts(PromptSource(dataset="mlabonne/harmless_alpaca", split="train[:4]"))
    assert "cannot list dataset mlabonne/harmless_alpaca" in raised.value.message
    assert "local text file" in raised.value.hint


def test_a_folder_is_not_taken_for_a_hub_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `datasets` a local folder cannot be read: said so, not as a bad hub id."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where it is not installed
    with pytest.raises(PromptError) as raised:
        load_prompts(PromptSource(dataset=str(tmp_path)), "bad_prompts")
    assert raised.value.message == f"bad_prompts: {tmp_path} is a folder, not a prompt file"
    assert "one prompt per line" in raised.value.hint
