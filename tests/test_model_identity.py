"""A model's identity: the digest of its folder's files (which count, what a change of bytes does, the
cache that spares re-reading them and its one blind spot), a declared revision instead of it."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from annotate.config import ModelConfig
from annotate.engines import model_identity as mi
from annotate.engines.model_identity import default_cache_path, model_files, model_identity, weights_digest


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    (folder / "code").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "code" / "modeling_x.py").write_text("class X: pass\n")
    (folder / "README.md").write_text("# a model\n")
    (folder / "LICENSE").write_text("MIT\n")
    (folder / ".git" / "HEAD").write_text("ref: main\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return folder


@pytest.fixture
def counted_reads(monkeypatch) -> list[Path]:
    """The files whose contents are hashed from now on."""
    reads: list[Path] = []
    real = mi.file_sha256

    def counting(path, advance=None):
        reads.append(path)
        return real(path, advance)

    monkeypatch.setattr(mi, "file_sha256", counting)
    return reads


def rewrite_keeping_size(path: Path, data: bytes, mtime_ns: int) -> None:
    assert len(data) == path.stat().st_size
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_weights_config_tokenizer_and_code_count_docs_and_hidden_files_do_not(model_dir):
    names = [p.relative_to(model_dir).as_posix() for p in model_files(model_dir)]
    assert names == ["code/modeling_x.py", "config.json", "model.safetensors", "tokenizer.json"]


def test_new_bytes_of_the_same_size_change_the_digest(model_dir, tmp_path):
    cache = tmp_path / "digests.json"
    weights = model_dir / "model.safetensors"
    before = weights_digest(model_dir, cache)
    rewrite_keeping_size(weights, b"\x01" * 1000, weights.stat().st_mtime_ns + 1_000_000_000)
    assert weights_digest(model_dir, cache) != before


def test_same_size_and_mtime_is_not_detected_which_a_revision_is_for(model_dir, tmp_path):
    """The documented blind spot of the digest cache: a file replaced by one of the same size and the
    same mtime keeps its cached digest. A declared revision is the identity then."""
    cache = tmp_path / "digests.json"
    weights = model_dir / "model.safetensors"
    before = weights_digest(model_dir, cache)
    rewrite_keeping_size(weights, b"\x01" * 1000, weights.stat().st_mtime_ns)
    assert weights_digest(model_dir, cache) == before  # not detected
    assert weights_digest(model_dir, tmp_path / "fresh.json") != before  # the bytes did change
    a = model_identity(ModelConfig(engine="vllm", path=str(model_dir), revision="ft-step-1000"), cache)
    b = model_identity(ModelConfig(engine="vllm", path=str(model_dir), revision="ft-step-2000"), cache)
    assert a != b


def test_an_unchanged_folder_is_not_read_again(model_dir, tmp_path, counted_reads):
    cache = tmp_path / "digests.json"
    first = weights_digest(model_dir, cache)
    assert len(counted_reads) == 4
    counted_reads.clear()
    assert weights_digest(model_dir, cache) == first
    assert counted_reads == []
    (model_dir / "config.json").write_text('{"hidden_size": 16}')
    assert weights_digest(model_dir, cache) != first
    assert counted_reads == [model_dir / "config.json"]  # only the changed file


def test_docs_do_not_count_but_names_do(model_dir, tmp_path):
    cache = tmp_path / "digests.json"
    before = weights_digest(model_dir, cache)
    (model_dir / "README.md").write_text("# a model, now documented\n")
    assert weights_digest(model_dir, cache) == before
    (model_dir / "tokenizer.json").rename(model_dir / "tokenizer_config.json")
    assert weights_digest(model_dir, cache) != before


def test_a_corrupt_cache_is_rebuilt(model_dir, tmp_path):
    cache = tmp_path / "sub" / "digests.json"
    expected = weights_digest(model_dir, tmp_path / "good.json")
    cache.parent.mkdir()
    for garbage in ("{not json", "[1, 2]", '{"version": 1, "files": 3}'):
        cache.write_text(garbage)
        assert weights_digest(model_dir, cache) == expected
        stored = json.loads(cache.read_text())
        assert stored["version"] == mi.DIGEST_CACHE_VERSION and len(stored["files"]) == 4
    assert [p.name for p in cache.parent.iterdir()] == ["digests.json"]  # no temporary file left


def test_identity_of_a_folder_a_revision_and_a_served_name(model_dir, tmp_path, counted_reads):
    cache = tmp_path / "digests.json"
    local = model_identity(ModelConfig(engine="vllm", path=str(model_dir)), cache)
    assert local == {"path": str(model_dir), "revision": None, "weights": weights_digest(model_dir, cache)}
    counted_reads.clear()
    declared = model_identity(ModelConfig(engine="vllm", path=str(model_dir), revision="v2"), cache)
    assert declared == {"path": str(model_dir), "revision": "v2"} and counted_reads == []
    served = model_identity(ModelConfig(engine="openai", path="Qwen/Qwen2-72B-Instruct"), cache)
    assert served == {"path": "Qwen/Qwen2-72B-Instruct", "revision": None}


def test_home_paths_are_resolved_and_the_cache_defaults_under_xdg(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(model_dir.parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "longgrit" / "file-digests.json"
    identity = model_identity(ModelConfig(engine="vllm", path="~/model"))
    assert identity["path"] == "~/model" and identity["weights"] == weights_digest(model_dir, tmp_path / "x.json")
    assert default_cache_path().is_file()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_path() == model_dir.parent / ".cache" / "longgrit" / "file-digests.json"


def test_a_first_digest_worth_a_bar_shows_the_bytes_it_reads_and_a_cached_one_none(model_dir, tmp_path, monkeypatch):
    """Hashing a 76B checkpoint's ~150 GB takes minutes: the bar counts exactly the bytes read."""
    bars: list[dict] = []
    real = mi.hashing_progress

    def recorded(name, total, console=None):
        bar = {"name": name, "total": total, "read": 0}
        bars.append(bar)
        with real(name, total, console) as advance:
            def counting(n):
                bar["read"] += n
                advance(n)
            yield counting if advance is not None else None

    monkeypatch.setattr(mi, "hashing_progress", contextmanager(recorded))
    monkeypatch.setattr(mi, "PROGRESS_BYTES", 1)
    cache = tmp_path / "digests.json"
    weights_digest(model_dir, cache)
    size = sum(p.stat().st_size for p in model_files(model_dir))
    assert bars == [{"name": "model", "total": size, "read": size}]
    weights_digest(model_dir, cache)
    assert bars[1]["total"] == 0 and bars[1]["read"] == 0  # nothing to read: no bar (under PROGRESS_BYTES)
