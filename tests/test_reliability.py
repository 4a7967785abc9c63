"""Hard kills, checkpoint integrity, the non-finite guard, out-of-memory messages."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import is_out_of_memory, main, out_of_memory_message
from gemma3_tune.errors import UserError
from gemma3_tune.model.checkpoint import load_model, save_model
from gemma3_tune.train.checkpoints import (
    MARKER,
    mark_complete,
    newest_complete,
    remove_incomplete,
    rotate,
)
from gemma3_tune.train.guards import NonFiniteGuard


def _recipe(tmp_path, tiny_dir, name: str):
    data = chat_set(tmp_path / "chat.jsonl", n=16)
    return write_recipe(
        tmp_path / f"{name}.yaml", tiny_dir, data, tmp_path / name,
        lora={"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the RNG state must resume too
        data__packing=False,  # 16 rows, 8 steps per epoch: the resumed part crosses an epoch
        training__max_steps=12, training__save_steps=2, training__save_total_limit=2,
        training__lr_scheduler="cosine", training__warmup_steps=2,
    )  # fmt: skip


@pytest.mark.slow
def test_sigkill_mid_checkpoint_then_resume_equals_unbroken_run(tmp_path, tiny_dir, capsys):
    """Kill a run the moment checkpoint-6/ appears (its files possibly half-written), resume
    it, and end with the adapter an unbroken run ends with."""
    assert main(["train", str(_recipe(tmp_path, tiny_dir, "unbroken"))]) == 0
    want = load_file(tmp_path / "unbroken" / "adapter" / "adapter_model.safetensors")

    recipe = _recipe(tmp_path, tiny_dir, "killed")
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemma3_tune.cli", "train", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-6").exists():
        assert proc.poll() is None, "the run ended before checkpoint-6 appeared"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter").exists()
    half_written = not (run / "checkpoint-6" / MARKER).exists()

    capsys.readouterr()
    assert main(["train", str(recipe), "training.resume=true"]) == 0
    err = capsys.readouterr().err
    assert ("resuming from checkpoint-4" if half_written else "resuming from checkpoint-6") in err
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, worst
    # save_total_limit=2 kept the two newest checkpoints, each complete.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    assert all((p / MARKER).is_file() for p in run.glob("checkpoint-*"))


def _fake_checkpoint(out, step: int, complete: bool):
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (ckpt / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(ckpt)
    return ckpt


def test_half_written_checkpoints_are_never_resumed_or_counted(tmp_path):
    _fake_checkpoint(tmp_path, 2, complete=True)
    _fake_checkpoint(tmp_path, 4, complete=False)  # killed before its marker
    six = _fake_checkpoint(tmp_path, 6, complete=True)
    (six / "adapter_model.safetensors").write_bytes(b"x" * 10)  # changed after the marker
    assert newest_complete(tmp_path).name == "checkpoint-2"
    # Rotation with a limit of 1 must keep checkpoint-2: the newer folders are not complete.
    assert rotate(tmp_path, 1) == []
    assert sorted(p.name for p in remove_incomplete(tmp_path)) == ["checkpoint-4", "checkpoint-6"]
    _fake_checkpoint(tmp_path, 8, complete=True)
    _fake_checkpoint(tmp_path, 10, complete=False)
    assert [p.name for p in rotate(tmp_path, 1)] == ["checkpoint-2"]
    assert newest_complete(tmp_path).name == "checkpoint-8"


def test_guard_skips_a_non_finite_step_exactly():
    """A NaN gradient leaves parameters and AdamW state untouched; the run then continues as
    if that step had never happened."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    grads = [torch.randn(4, 3), torch.full((4, 3), float("nan")), torch.randn(4, 3)]

    def run(seq, guard):
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([p], lr=0.1)
        if guard:
            guard.install(opt)
        for g in seq:
            p.grad = g.clone()
            opt.step()
            opt.zero_grad()
        return p.detach(), opt.state[p]["step"]

    guard = NonFiniteGuard(limit=3)
    got, steps = run(grads, guard)
    want, want_steps = run([grads[0], grads[2]], None)
    assert guard.skipped == 1 and guard.in_a_row == 0
    assert torch.equal(got, want) and steps == want_steps == 2


def test_guard_skips_on_the_device_without_a_host_sync_per_step():
    """With a fused AdamW (the Trainer's default) a NaN step is skipped by the optimizer's own
    found_inf input: the weights and the state equal a run without that step, and the host reads
    the verdicts (a device sync: `aten._local_scalar_dense`) only every `read_every` steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSyncs.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    grads = [
        torch.randn(4, 3),
        torch.full((4, 3), float("nan")),
        torch.randn(4, 3),
        torch.randn(4, 3),
    ]

    def run(seq, guard):
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        syncs = []
        if guard:
            guard.install(opt)
        for g in seq:
            p.grad = g.clone()
            with CountSyncs():
                CountSyncs.n = 0
                opt.step()
            syncs.append(CountSyncs.n)
            opt.zero_grad()
        return p.detach(), opt.state[p], syncs

    guard = NonFiniteGuard(limit=3, read_every=4)
    got, state, syncs = run(grads, guard)
    want, want_state, _ = run([grads[0], grads[2], grads[3]], None)
    assert syncs[:3] == [0, 0, 0] and syncs[3] > 0, syncs
    assert guard.skipped == 1 and guard.in_a_row == 0
    assert torch.equal(got, want) and state["step"] == want_state["step"] == 3
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[k], want_state[k]), k


def test_guard_counts_a_non_finite_loss_and_stops_after_k_in_a_row():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    guard = NonFiniteGuard(limit=2, dtype_hint="float16")
    guard.install(opt)
    guard.saw_loss(torch.tensor(float("inf")))
    p.grad = torch.ones(2)  # finite gradient, but the loss was not
    opt.step()
    assert guard.skipped == 1 and torch.equal(p.detach(), torch.zeros(2))
    guard.saw_loss(torch.tensor(float("nan")))
    p.grad = torch.ones(2)
    with pytest.raises(UserError, match=r"step 2: .*2 steps in a row.*bfloat16"):
        opt.step()


def test_nan_in_the_weights_stops_the_run_with_one_line(tmp_path, tiny_dir, capsys):
    """A NaN injected into a decoder weight: every step is skipped, and after
    training.max_skipped_steps in a row the run stops, naming the step and the fix."""
    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, bad)
    model = load_model(bad)
    with torch.no_grad():
        model.text_model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    save_model(model, bad)
    r = write_recipe(
        tmp_path / "r.yaml", bad, chat_set(tmp_path / "c.jsonl"), tmp_path / "run",
        training__max_skipped_steps=3,
    )  # fmt: skip
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("step skipped") == 3
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: step 3: loss or gradients not finite for 3 steps in a row")
    assert "training.lr" in errors[0]


def test_out_of_memory_gets_the_recipe_keys_to_change():
    with pytest.raises(RuntimeError) as info:  # a real allocator failure on this machine
        torch.empty(1 << 62, dtype=torch.uint8)
    assert is_out_of_memory(info.value)
    msg = out_of_memory_message(info.value)
    assert "\n" not in msg
    for key in (
        "training.micro_batch_size",
        "data.max_seq_len",
        "training.gradient_checkpointing",
        "method: qlora",
        "deepspeed: zero3_offload",
    ):
        assert key in msg
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


class _Payload:
    """What a tampered checkpoint carries: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_code_pickle_is_refused_before_it_runs(tmp_path, tiny_dir, capsys):
    """A checkpoint whose rng_state.pth was replaced by a pickle that runs a command (and whose
    marker was rewritten to match) is refused by resume and by export with one line naming the
    file; the command never runs. Untouched, the same checkpoint resumes."""
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, chat_set(tmp_path / "c.jsonl", n=8), tmp_path / "run",
        training__max_steps=2, training__save_steps=1,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert not (ckpt / "training_args.bin").exists()  # the never-read pickle is not kept
    assert not (ckpt / "README.md").exists()  # nor peft's blank model card
    pwned = tmp_path / "PWNED"
    torch.save({"python": _Payload(pwned)}, ckpt / "rng_state.pth")
    mark_complete(ckpt)  # the marker matches the tampered files: only the pickle check is left
    capsys.readouterr()
    resume = ["train", str(r), "training.resume=true", "training.max_steps=3"]
    export = ["export", str(tmp_path / "run"), "--checkpoint", "2", "--out", str(tmp_path / "o")]
    for argv in (resume, export):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {ckpt / 'rng_state.pth'}: refused to load"), err
        assert "system" in err[-1] and "Traceback" not in "\n".join(err)
        assert not pwned.exists()
    shutil.rmtree(ckpt)
    assert main(resume) == 0  # checkpoint-1, untouched, resumes
    assert not pwned.exists()
