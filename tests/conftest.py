import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, MLC model dir, llvm library) of a tiny synthetic llama, built once per test session.

    Sized for server tests: context 1024 (long generations to cancel), prefill chunk 64, up to 32 sequences.
    """
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    root = tmp_path_factory.mktemp("tiny-served")
    ckpt = make_synthetic_checkpoint(root / "ckpt", arch="llama", variant="v8-k256-0", dtype="float32", seed=11)
    model_dir = convert_checkpoint(ckpt, root / "tiny", context_window_size=1024, prefill_chunk_size=64,
                                   max_batch_size=32)
    (lib,) = compile_model(model_dir, "llvm")
    return ckpt, model_dir, lib
