"""The training loop class: TRL's SFTTrainer with our loss (the model's own, chunked, or an
objective's), token counting, the non-finite guard, our scheduler and model card, and the
projector's and embedding's own learning rates. Kept apart from trainer.py (which builds
everything it needs) so that trl is imported only when a run starts, and so the HF methods it
overrides stand in one place (tests/test_hf_contract.py pins them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import RandomSampler, SequentialSampler
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from ..model.context_parallel import ContextGroup
from ..model.dtypes import resolve_dtype
from ..outputs import write_atomic
from . import precision
from .adapters import group_lrs, unwrap
from .checkpoints import CompleteCheckpoints
from .console import Console
from .context import RepeatForContext, context_group, shard_batch
from .distributed import is_main_process
from .guards import NonFiniteGuard
from .metrics import MetricsCallback
from .model_card import model_card
from .objectives.base import Objective
from .recipe import Recipe, model_dir
from .saving import folder_files
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


def param_groups(
    named: list[tuple[str, torch.nn.Parameter]],
    lrs: dict[str, float],
    decay: set[str],
    weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups for the trainable `named` parameters: each at the lr of the first
    name fragment in `lrs` its name contains (else the optimizer's default, training.lr), with
    weight decay where HF's Trainer gives it (`decay`: not norms or biases). The default-lr
    groups come first (the Trainer logs the first group's lr); empty groups are left out."""
    groups: dict[tuple[float | None, bool], list] = {}
    for lr in (None, *lrs.values()):
        for decays in (True, False):
            groups.setdefault((lr, decays), [])
    for n, p in named:
        lr = next((v for k, v in lrs.items() if k in n), None)
        groups[(lr, n in decay)].append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decays else 0.0}
        | ({} if lr is None else {"lr": lr})
        for (lr, decays), ps in groups.items()
        if ps
    ]


def _trace_rows(step: int, rows: torch.Tensor) -> None:
    """With $GEMMA3_TUNE_TRACE_ROWS=PREFIX, each rank appends `step row...` for every
    micro-batch it trains on to PREFIX.RANK: an audit of the data order (resume tests use it)."""
    path = f"{os.environ[TRACE_ROWS]}.{os.environ.get('RANK', '0')}"
    with open(path, "a") as f:
        f.write(" ".join(str(x) for x in [step, *rows.tolist()]) + "\n")


class Gemma3Trainer(SFTTrainer):
    """SFTTrainer with an objective's loss and logs, token counts, the non-finite guard, our
    scheduler, card, and learning rates by parameter name (`group_lrs`: name fragment -> lr)."""

    def __init__(
        self,
        *a,
        objective: Objective,
        group_lrs: dict[str, float] | None = None,
        pad_id: int = 0,
        guard: NonFiniteGuard | None = None,
        card=None,
        **kw,
    ):
        self.objective = objective  # objectives/*.py: the loss, and what it logs
        self.card = card  # (step, max_steps, done) -> the run's README.md
        self.group_lrs = group_lrs or {}
        self.pad_id = pad_id
        self.guard = guard
        self._tokens = 0  # real (non-padding) tokens, this process, read at each log
        self._tokens_base = 0  # all processes' tokens before this train() (resume)
        self._tokens_pending: torch.Tensor | None = None  # counted on the device since
        self._last = (time.perf_counter(), 0, 0)  # time, tokens, step at the last train log
        self._context: ContextGroup | None = None  # training.context_parallel (context.py)
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
                **self.objective.train_logs(step - step0),
            )
            self._last = (now, tokens, step)
        if "eval_loss" in logs:
            logs.update(self.objective.eval_logs(logs["eval_loss"]))
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
        replicas = self.args.world_size // self.get_cp_size()  # a group's ranks share rows
        total = self._tokens_base + self.tokens_seen() * replicas
        self.state.num_input_tokens_seen = total
        return total

    def _save_checkpoint(self, model, trial):
        self.tokens_total()  # up to date in trainer_state.json, even between logged steps
        return super()._save_checkpoint(model, trial)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective's loss (objectives/*.py); the batch's row numbers go to it, not to
        the model (eval batches carry them too)."""
        rows = inputs.pop("row_ids", None)
        if self.context is not None:  # this rank's shard of the rows (context.py)
            inputs = shard_batch(inputs, self.context, self.image_token_id)
        loss, outputs = self.objective.loss(self, model, inputs, rows, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    @property
    def context(self) -> ContextGroup | None:
        return self._context

    @context.setter
    def context(self, group: ContextGroup | None) -> None:
        """Under context parallelism the evaluation gathers every rank's loss as it is: each
        rank of a group returns its rows' loss (context_eval), and accelerate's
        `gather_for_metrics` would trim the gathered values by the eval set's length, which
        the repeated sampler multiplies."""
        self._context = group
        if group is not None:
            self.gather_function = self.accelerator.gather

    @property
    def image_token_id(self) -> int | None:
        c = unwrap(self.model).config
        return c.image_token_id if c.is_multimodal else None

    def get_cp_size(self) -> int:
        """transformers' hook: a context-parallel group's ranks hold the same rows, so the step's
        labelled-token count over all ranks counts each row this many times."""
        return self.context.size if self.context is not None else 1

    def _get_train_sampler(self, train_dataset=None):
        """The objective's order (GRPO's repeated steps), else the Trainer's own."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.objective.train_sampler(len(dataset), self.args)
        sampler = sampler if sampler is not None else super()._get_train_sampler(train_dataset)
        return self._repeat(sampler)

    def _get_eval_sampler(self, eval_dataset):
        sampler = super()._get_eval_sampler(eval_dataset)
        if sampler is None and self.context is not None and eval_dataset is not None:
            sampler = SequentialSampler(eval_dataset)  # HF's None across processes means this
        return self._repeat(sampler)

    def _repeat(self, sampler):
        """Under context parallelism, each row to every rank of a group (context.py)."""
        if self.context is None or sampler is None:
            return sampler
        if (
            isinstance(sampler, RandomSampler)
            and self.accelerator.dataloader_config.use_seedable_sampler
        ):
            # what accelerate makes of a RandomSampler it sees (here it sees the wrapper): the
            # same order as one process, and a new one each epoch (set_epoch)
            sampler = SeedableRandomSampler(
                data_source=sampler.data_source, replacement=sampler.replacement,
                num_samples=sampler._num_samples, generator=sampler.generator,
                data_seed=self.args.data_seed,
            )  # fmt: skip
        return RepeatForContext(sampler, self.context.size)

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
        if self.optimizer is None and self.group_lrs:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            decay = set(self.get_decay_parameter_names(self.model))
            groups = param_groups(named, self.group_lrs, decay, self.args.weight_decay)
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(groups, **kwargs)
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


class LastStep(TrainerCallback):
    """Log the last step whatever `training.logging_steps` says (a 5-step run with logging_steps
    2 ended metrics.jsonl, the console and the card at step 4), and evaluate there whatever
    `training.eval_steps` says (unset: eval_strategy "no", so only there). HF's
    DefaultFlowCallback does the same for a step strategy whose eval_steps do not divide the last
    step, and runs at most one evaluation per step, so an eval_steps that divides it gets no
    second one. In the loop, the evaluation comes before the final checkpoint, whose trainer
    state (and so a resumed run) then records it, and metrics.jsonl gets it like any other. Every
    rank flags it, so every rank joins the (collective) evaluation."""

    def __init__(self, evaluate: bool):
        self.evaluate = evaluate

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            control.should_log = True
            control.should_evaluate = control.should_evaluate or self.evaluate


def make_trainer(recipe: Recipe, model, args, objective, collator, train_ds, eval_ds, data, out):
    """The loop for a built model and data: our callbacks (metrics.jsonl, complete
    checkpoints, the last step, the console) in place of HF's printers."""
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    folder = model_dir(recipe)
    t = recipe.training
    # on a GPU the guard reads its verdicts when the Trainer logs, not at every step (a sync)
    read_every = t.logging_steps if torch.cuda.is_available() else 1
    report = data.report.summary()
    checkpoints = CompleteCheckpoints(
        out, t.save_total_limit, lambda ckpt: folder_files(ckpt, folder)
    )
    trainer = Gemma3Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=AutoTokenizer.from_pretrained(str(folder)),
        callbacks=[
            MetricsCallback(out, objective.log_prefixes),
            checkpoints,
            LastStep(evaluate=eval_ds is not None),
        ],
        objective=objective,
        group_lrs=group_lrs(recipe),
        pad_id=collator.pad_id,
        guard=NonFiniteGuard(t.max_skipped_steps, recipe.model.dtype, read_every),
        card=lambda step, max_steps, done: model_card(recipe, out, report, step, max_steps, done),
    )
    # TRL casts a 4-bit model's adapter weights to bf16 (pure bf16 updates, whatever the
    # recipe's dtype): give them back the dtype precision.py's rule gives every trainable.
    precision.prepare(
        trainer.model, resolve_dtype(recipe.model.dtype), recipe.deepspeed is not None
    )
    trainer.context = context_group(recipe, unwrap(model))  # training.context_parallel
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if is_main_process():
        trainer.add_callback(Console())
    return trainer
