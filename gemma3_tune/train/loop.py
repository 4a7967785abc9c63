"""The training loop class: TRL's SFTTrainer with our loss (the model's own, chunked, or an
objective's), token counting, the non-finite guard, our scheduler and model card, and a
projector learning rate. Kept apart from trainer.py (which builds everything it needs) so
that trl is imported only when a run starts, and so the HF methods it overrides stand in one
place (tests/test_hf_contract.py pins them).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from ..model.gemma3 import Output
from ..outputs import write_atomic
from .adapters import PROJECTOR
from .guards import NonFiniteGuard
from .recipe import Recipe
from .schedule import restart_at_current_step, scheduler


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


TRACE_ROWS = "GEMMA3_TUNE_TRACE_ROWS"


def _trace_rows(step: int, rows: torch.Tensor) -> None:
    """With $GEMMA3_TUNE_TRACE_ROWS=PREFIX, each rank appends `step row...` for every
    micro-batch it trains on to PREFIX.RANK: an audit of the data order (resume tests use it)."""
    path = f"{os.environ[TRACE_ROWS]}.{os.environ.get('RANK', '0')}"
    with open(path, "a") as f:
        f.write(" ".join(str(x) for x in [step, *rows.tolist()]) + "\n")


class Gemma3Trainer(SFTTrainer):
    """SFTTrainer with our loss (the model's own, chunked) and a projector learning rate."""

    def __init__(
        self,
        *a,
        projector_lr: float | None = None,
        pad_id: int = 0,
        guard: NonFiniteGuard | None = None,
        card=None,
        distiller=None,
        recipe: Recipe | None = None,
        **kw,
    ):
        self.distiller = distiller  # objectives/distill.py, or None (SFT)
        self.objective = recipe.objective if recipe is not None else "sft"
        self.preference = recipe.preference if recipe is not None else None
        self._pref: dict[str, list] = {"train": [], "eval": []}  # stats since the last log
        self._kd: list = []  # this process's (kd_loss, ce_loss) sums since the last log
        self.card = card  # (step, max_steps, done) -> the run's README.md
        self.projector_lr = projector_lr
        self.pad_id = pad_id
        self.guard = guard
        self._tokens = 0  # real (non-padding) tokens, this process, read at each log
        self._tokens_base = 0  # all processes' tokens before this train() (resume)
        self._tokens_pending: torch.Tensor | None = None  # counted on the device since
        self._last = (time.perf_counter(), 0, 0)  # time, tokens, step at the last train log
        super().__init__(*a, **kw)
        self.add_callback(_TrainBegin(self))

    def train_begins(self, state) -> None:
        """Called once the Trainer has restored a checkpoint (or not): counters go on from
        the checkpoint's, and a resumed step runs at this run's lr (schedule.py)."""
        self._tokens_base = state.num_input_tokens_seen
        self._last = (time.perf_counter(), self._tokens_base, state.global_step)
        if state.global_step > 0 and isinstance(
            self.lr_scheduler, torch.optim.lr_scheduler.LambdaLR
        ):
            restart_at_current_step(self.lr_scheduler)

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs.get("row_ids")  # compute_loss takes it out
        if TRACE_ROWS in os.environ and rows is not None:
            _trace_rows(self.state.global_step + 1, rows)
        n = (inputs["input_ids"] != self.pad_id).sum()  # no host sync per micro-batch
        self._tokens_pending = n if self._tokens_pending is None else self._tokens_pending + n
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.saw_loss(loss)
        return loss

    def log(self, logs, start_time=None):
        """Adds tokens, tokens/s, s/step and peak memory to train logs (the progress bar
        shows them too) and perplexity to eval logs."""
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            tokens = self.tokens_total()
            t0, tok0, step0 = self._last
            dt = max(now - t0, 1e-9)
            logs.update(
                lr=logs.get("learning_rate"),
                tokens=tokens,
                tokens_per_second=round((tokens - tok0) / dt, 1),
                step_seconds=round(dt / max(step - step0, 1), 4),
                peak_memory_gb=round(peak_memory_gb(), 3),
                skipped_steps=self.guard.skipped if self.guard else 0,
                **self.distill_logs(step - step0),
                **self.preference_logs("train"),
            )
            self._last = (now, tokens, step)
        if "eval_loss" in logs:
            if self.objective == "sft":
                logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            else:  # a preference loss has no perplexity: TRL's reward stats instead
                logs.update(self.preference_logs("eval"))
            # the next step's tokens/s and s/step must not count the evaluation's time
            self._last = (time.perf_counter(), *self._last[1:])
        super().log(logs, start_time)

    def tokens_seen(self) -> int:
        """Real tokens trained on by this process (one host read per log, not per step)."""
        if self._tokens_pending is not None:
            self._tokens += int(self._tokens_pending)
            self._tokens_pending = None
        return self._tokens

    def tokens_total(self) -> int:
        """Real tokens trained on by all processes since step 0 (this process's count x
        processes), kept in the trainer state, whose trainer_state.json carries it across
        a resume."""
        total = self._tokens_base + self.tokens_seen() * self.args.world_size
        self.state.num_input_tokens_seen = total
        return total

    def _save_checkpoint(self, model, trial):
        self.tokens_total()  # up to date in trainer_state.json, even between logged steps
        return super()._save_checkpoint(model, trial)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss: SFT, or with a distiller (training steps only; evaluation
        scores the labels) the distillation loss on the batch's teacher targets."""
        rows = inputs.pop("row_ids", None)  # eval batches carry it too; not for the model
        if self.objective != "sft":
            return self.preference_loss(model, inputs, return_outputs)
        if self.distiller is None or not model.training:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        inputs["soft_targets"] = self.distiller.soft_targets(inputs, rows)
        loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        self._kd.append((outputs["kd_loss"].detach(), outputs["ce_loss"].detach()))
        return (loss, outputs) if return_outputs else loss

    def preference_loss(self, model, inputs, return_outputs: bool):
        """DPO (against the batch's reference log-probs) or ORPO, on the per-pair reply
        log-probs the model computes in chunks (objectives/preference.py). A micro-batch's
        loss is its mean over pairs, divided by the accumulation steps (as TRL's DPOTrainer);
        the stats are kept for the next train or eval log."""
        from .objectives import preference as pref

        ref = inputs.pop("ref_logps", None)
        out = model(**inputs, sequence_logps=True)
        policy, tokens = pref.pairs(out["logps"], out["tokens"])  # [P, 2] each
        s = self.preference
        if self.objective == "dpo":
            if ref is None or ref.shape != policy.shape:
                raise RuntimeError(
                    f"reference log-probs for {None if ref is None else tuple(ref.shape)}"
                    f" pairs, the batch has {tuple(policy.shape)}; delete the reference"
                    " cache folder to rebuild it"
                )
            loss, stats = pref.dpo_loss(
                policy, ref.to(policy), tokens, s.beta, s.loss, s.label_smoothing
            )
        else:
            loss, stats = pref.orpo_loss(policy, tokens, s.orpo_lambda)
        self._pref["train" if model.training else "eval"].append(stats)
        if model.training:  # HF divides only losses it did not see normalised: not ours
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, Output(loss=loss)) if return_outputs else loss

    def preference_logs(self, split: str) -> dict:
        """The mean of each stat (TRL's names) since the last log of this split."""
        stats, self._pref[split] = self._pref[split], []
        if not stats:
            return {}
        prefix = "eval_" if split == "eval" else ""
        keys = list(stats[0])
        means = torch.stack([torch.stack([s[k].float() for k in keys]) for s in stats]).mean(0)
        return {prefix + k: v for k, v in zip(keys, means.tolist(), strict=True)}

    def distill_logs(self, steps: int) -> dict:
        """kd_loss and ce_loss, per step, averaged since the last log (one host read)."""
        if not self._kd:
            return {}
        kd, ce = torch.stack([torch.stack(p) for p in self._kd]).sum(0).tolist()
        self._kd = []
        return {"kd_loss": kd / max(steps, 1), "ce_loss": ce / max(steps, 1)}

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """schedule.py's warmup (from lr / warmup_steps, not from 0) and decay."""
        if self.lr_scheduler is None:
            self.lr_scheduler = scheduler(
                optimizer or self.optimizer,
                self.args.get_warmup_steps(num_training_steps),
                num_training_steps,
                self.args.lr_scheduler_type.value,  # a SchedulerType: "cosine", ...
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def card_text(self, done: bool) -> str:
        return self.card(self.state.global_step, self.state.max_steps, done)

    def create_model_card(self, *args, **kwargs):
        """Our card (model_card.py) in output_dir/README.md, instead of TRL's draft; TRL
        calls this at every checkpoint."""
        if self.card is not None and self.is_world_process_zero():
            write_atomic(Path(self.args.output_dir) / "README.md", self.card_text(done=False))

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.projector_lr is not None:
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            proj = [p for n, p in params if PROJECTOR in n]
            rest = [p for n, p in params if PROJECTOR not in n]
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = [{"params": rest}, {"params": proj, "lr": self.projector_lr}]
            self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
        else:
            super().create_optimizer()
        if self.guard is not None:
            self.guard.install(self.optimizer)
        return self.optimizer


class _TrainBegin(TrainerCallback):
    """Tells the trainer when train() has restored its state (the Trainer has no hook there)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        self.trainer.train_begins(state)
