"""scripts/gpu_check.sh on this CPU machine, with stub `python3` and `nvidia-smi` standing in
for the GPU machine's: the report lands at $OUT/gpu_check.md (the folder a device call brings
back), the stages run in the order a reader needs them, their ceilings fit the 540 s of a
10-minute call, and a stage that fails does not stop the next."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGE_1 = ["machine", "wheels", "smoke", "bench-1b-8k", "bench-4b-8k", "pytest", "cache"]
STAGE_2 = [
    "machine",
    "wheels",
    "bench-4b-4k-qlora",
    "bench-1b-32k-gc",
    "bench-loss",
    "pytest",
    "cache",
]

# The stand-in for the GPU machine's Python: it logs each call, answers each stage with a line,
# and fails the smoke test.
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >>"$STUB_LOG"
case "$*" in
  *"gpu_check.py machine"*) echo "Machine: Stub H100, torch 2.11" ;;
  *"gpu_check.py install"*) echo "installed 3 wheels" ;;
  *"gpu_check.py versions"*) echo "Versions: trl 1.16.0 (.gpu-site)" ;;
  *"gpu_check.py smoke"*) echo "smoke: flex DIFFERS from SDPA"; exit 1 ;;
  *"gpu_check.py save-cache"*) echo "compile cache: saved" ;;
  *"bench.py"*) echo "| table of ${@: -1} |" ;;
  *"import pytest_timeout"*) exit 0 ;;
  *"-m pytest"*) echo "tests/test_gpu.py::test_a PASSED" ;;
  *) echo "stub python3: unexpected $*" >&2; exit 3 ;;
esac
"""


def _stub_path(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", STUB_PYTHON), ("nvidia-smi", "#!/bin/sh\necho 'Stub H100'\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT")}
    return env | {"PATH": f"{bin_dir}:{env['PATH']}", "STUB_LOG": str(tmp_path / "calls.log")}


@pytest.mark.parametrize("stage,names", [("1", STAGE_1), ("2", STAGE_2)])
def test_dry_run_lists_the_stages_in_order_within_the_budget(stage, names):
    done = subprocess.run(
        [str(SCRIPT), "--dry-run", "--stage", stage], capture_output=True, text=True, check=True
    )
    rows = re.findall(r"^  (\S+)\s+(\d+) s", done.stdout, re.M)
    stages = {name: int(s) for name, s in rows if name != "total"}
    assert list(stages) == names
    assert sum(stages.values()) == int(dict(rows)["total"]) <= 540
    assert stages["pytest"] >= 60


def test_dry_run_refuses_a_budget_the_stages_do_not_fit():
    done = subprocess.run(
        [str(SCRIPT), "--dry-run", "--budget", "300"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "more than --budget 300" in done.stderr


def test_report_lands_in_out_and_a_failing_stage_does_not_stop_the_next(tmp_path):
    out = tmp_path / "out"
    env = _stub_path(tmp_path) | {"OUT": str(out)}
    before = (ROOT / "gpu_check.md").stat().st_mtime if (ROOT / "gpu_check.md").exists() else None
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    done = subprocess.run(
        [str(SCRIPT), "--wheelhouse", str(wheels)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    report = (out / "gpu_check.md").read_text()
    assert done.returncode == 1  # the smoke stage failed
    # every stage ran, in order, each heading in the report and printed as it went
    headings = re.findall(r"^## (\S+)", report, re.M)
    assert headings == [n for n in STAGE_1 if n != "cache"], headings  # no compile cache to save
    assert re.findall(r"^## (\S+)", done.stdout, re.M) == headings
    assert "**smoke: failed, exit 1**" in report
    assert "| table of 1b-8k |" in report and "| table of 4b-8k |" in report
    assert "tests/test_gpu.py::test_a PASSED" in report
    assert "not passed or cut short: smoke;" in report.splitlines()[-1]
    calls = (tmp_path / "calls.log").read_text().splitlines()
    bench = [c for c in calls if "bench.py" in c]
    assert len(bench) == 2 and all("--impls ours,hf" in c and "--profile" in c for c in bench)
    assert all(re.search(r"--budget (\d+)", c) for c in bench)  # @T@ became the stage's ceiling
    pytest_call = next(c for c in calls if "-m pytest" in c)
    assert (
        "gpu and not gpu_long" in pytest_call
        and " -v " in pytest_call
        and "--timeout=" in pytest_call
    )
    # nothing written beside the checkout's own report
    after = (ROOT / "gpu_check.md").stat().st_mtime if (ROOT / "gpu_check.md").exists() else None
    assert after == before


def test_profiled_step_is_split_by_what_the_kernels_do():
    """bench_gpu.categorize on profiler-like events: ops with the vocabulary in an input's shape
    (and what they call) are the LM head + loss, the rest by kernel name; idle is the wall time
    no kernel covers."""
    import sys
    from types import SimpleNamespace as E

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_gpu import categorize

    def k(name, us):
        return E(name=name, duration=us)

    vocab = 262144
    head = E(input_shapes=[[8192, 1152], [vocab, 1152]], cpu_parent=None, kernels=[])
    events = [
        E(input_shapes=[[8192, 1152], [1152, 6912]], cpu_parent=None,
          kernels=[k("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128", 4000)]),
        E(input_shapes=[], cpu_parent=None, kernels=[k("triton_tem_fused_flex_attention_0", 3000)]),
        E(input_shapes=[[8192, vocab]], cpu_parent=head,  # a child of the head's op
          kernels=[k("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", 2500), k("reduce_kernel", 500)]),
        E(input_shapes=[[8192, 1152]], cpu_parent=None,
          kernels=[k("triton_poi_fused_add_mul_rsqrt_0", 1000)]),
    ]  # fmt: skip
    ms = categorize(events, wall_ms=12.0, vocab=vocab)
    assert ms == {
        "GEMM": 4.0,
        "attention": 3.0,
        "LM head + loss": 3.0,
        "elementwise + other": 1.0,
        "idle / host": 1.0,
    }
