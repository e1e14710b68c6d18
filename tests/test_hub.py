"""Models by Hugging Face Hub id, offline against a hub cache laid out here (HF_HUB_CACHE + HF_HUB_OFFLINE=1):
`convert`/`inspect`/`chat` on ORG/NAME[@revision] behave exactly as on the snapshot directory; local paths win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.hub import parse_hub_id
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

REPO, COMMIT, OLD_COMMIT = "VPTQ-community/tiny-llama", "a" * 40, "b" * 40
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HOME", None)
    cmd = [sys.executable, "-c", "from vptq_mlc.cli import main; main()", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, Path]:
    """A hub cache holding REPO at two commits (refs/main -> COMMIT) as huggingface_hub lays it out."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    make_synthetic_checkpoint(repo / "snapshots" / COMMIT, variant="v8-k256-0", seed=1)
    make_synthetic_checkpoint(repo / "snapshots" / OLD_COMMIT, variant="v8-k256-0", seed=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root, cache


def _cache_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("params_shard_")}


def test_convert_by_hub_id_equals_convert_of_the_snapshot(hub):
    root, cache = hub
    snap = cache / ("models--" + REPO.replace("/", "--")) / "snapshots"
    for source, want_dir in [(REPO, snap / COMMIT), (f"{REPO}@{OLD_COMMIT}", snap / OLD_COMMIT)]:
        tag = want_dir.name[:8]
        by_id = _cli("convert", source, "-o", str(root / f"by-id-{tag}"), cache=cache, cwd=root)
        assert by_id.returncode == 0, by_id.stderr
        convert_checkpoint(want_dir, root / f"local-{tag}")
        assert _cache_files(root / f"by-id-{tag}") == _cache_files(root / f"local-{tag}")
        a, b = (json.loads((root / f"{k}-{tag}" / "mlc-chat-config.json").read_text()) for k in ("by-id", "local"))
        assert a == b
    assert _cache_files(root / "by-id-aaaaaaaa") != _cache_files(root / f"by-id-{OLD_COMMIT[:8]}")


def test_inspect_by_hub_id(hub):
    root, cache = hub
    r = _cli("inspect", REPO, "--json", "--no-validate", cache=cache, cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "llama"


def test_local_directory_wins_over_hub_id(hub, tmp_path):
    _, cache = hub
    local = make_synthetic_checkpoint(tmp_path / REPO, variant="v8-k256-0", seed=3)  # ./VPTQ-community/tiny-llama
    r = _cli("convert", REPO, "-o", str(tmp_path / "out"), cache=cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    convert_checkpoint(local, tmp_path / "ref")
    assert _cache_files(tmp_path / "out") == _cache_files(tmp_path / "ref")


def test_chat_by_hub_id_reads_the_snapshot(hub, tmp_path):
    """chat resolves the id before anything else: the snapshot (a checkpoint, no library) is what it then opens."""
    _, cache = hub
    r = _cli("chat", REPO, "--prompt", "hi", "--device", "cpu", cache=cache, cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and f"snapshots/{COMMIT}" in r.stderr, r.stderr


@pytest.mark.parametrize("source, match", [
    ("VPTQ-community/not-there", "not in the Hugging Face cache"),
    (f"{REPO}@v9", "not in the Hugging Face cache"),
])
def test_missing_offline_is_one_line(hub, tmp_path, source, match):
    _, cache = hub
    r = _cli("convert", source, "-o", str(tmp_path / "out"), cache=cache, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_hub_id_syntax():
    assert parse_hub_id("VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-0-woft") == (
        "VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-0-woft", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for path in ("./org/name", "/abs/dir", "~/x/y", "a/b/c", "name", "org/", "../x"):
        assert parse_hub_id(path) is None, path
