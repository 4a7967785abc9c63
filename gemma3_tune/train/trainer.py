"""`gemma3-tune train`: one recipe -> one run directory.

The loop is TRL's `SFTTrainer` (HF Trainer underneath: checkpoints, resume, schedulers,
gradient accumulation, DeepSpeed, wandb). We hand it our own pre-packed rows and collator
(`skip_prepare_dataset`), and our model computes its own chunked loss, so `compute_loss` is
the plain Trainer's (TRL's would ask for full logits to compute token accuracy).

Run directory: `checkpoint-N/`, `adapter/` (peft; a full HF folder in `model/` for full SFT),
`metrics.jsonl`, `loss.png`, `recipe.yaml`, `data_report.json`, and README.md (our model card,
model_card.py). Console output is console.py's; the lr schedule is schedule.py's.

Resume (`training.resume: true`): the token count in metrics.jsonl goes on from the
checkpoint's (trainer_state.json's `num_input_tokens_seen`); another length rebuilds the lr
schedule for the new total (schedule.py); a checkpoint that already completes the run is
refused with the key to raise.

With eval data, the last step is always evaluated (`training.eval_steps` unset: only there),
inside the loop and so before the final checkpoint (LastStep), as HF does at the end of a run
whose eval_steps do not divide its last step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..data.collate import Collator, bucket_lengths, row_features
from ..data.feature_cache import FeatureCache, weights_fingerprint
from ..data.images import preprocess
from ..data.template import ensure_chat_template
from ..data.tokenizer import copy_tokenizer_files
from ..errors import UserError
from ..model.checkpoint import load_model, save_model
from ..model.dtypes import announce_auto, dtype_name, resolve_dtype
from ..model.gemma3 import bound_recompiles, check_image_batch, flex_graph_budget
from ..outputs import replace_dir, write_atomic
from . import precision, qat, refusals, trackers
from .adapters import PROJECTOR, apply_method, parameter_table, unwrap, write_portable_config
from .checkpoints import (
    UNREAD,
    CompleteCheckpoints,
    newest_complete,
    remove_incomplete,
    verify_pickles,
    written_by,
)
from .console import Console
from .data_check import load_data
from .distributed import finish, init_distributed, load_model_zero3, world_size, zero_to_universal
from .guards import NonFiniteGuard
from .metrics import MetricsCallback
from .model_card import model_card
from .objectives.reference import reference_logps, row_reference
from .qlora import load_quantized, write_settings
from .recipe import Recipe, model_dir, output_dir, recipe_to_yaml

log = logging.getLogger("gemma3_tune")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _rows_dataset(rows, teacher=None, reference=None):
    """Rows for the Trainer as a `datasets.Dataset` (TRL wants one) holding only the row
    numbers; each row's tokens are read from the prepared, memory-mapped data when the
    DataLoader asks for it (`set_transform`), so nothing is copied up front. With a teacher
    cache, each row also carries its cached teacher targets, and with DPO's reference
    log-probs ([samples, 2]) its pairs' (the collator batches them)."""
    if not len(rows):
        return None
    import datasets

    def fetch(batch: dict) -> dict:
        keys = ("input_ids", "labels", "position_ids", "image_refs")
        out: dict[str, list] = {k: [] for k in keys}
        for i in batch["row"]:
            r = row_features(rows[i])
            for k in keys:
                out[k].append(r[k])
        out["row"] = batch["row"]  # which row: the collator passes it on as row_ids
        if teacher is not None:
            out["teacher"] = [teacher.targets(i) for i in batch["row"]]
        if reference is not None:
            out["reference"] = [row_reference(reference, rows, i) for i in batch["row"]]
        return out

    ds = datasets.Dataset.from_dict({"row": list(range(len(rows)))})
    ds.set_transform(fetch)
    return ds


def _fill_cache(cache: FeatureCache, refs: list) -> None:
    """Under ZeRO-3 the tower's weights are partitioned, and a tower run during training is a
    collective every rank must join: a cache miss in one rank's collator would hang the
    others. So, with the tower gathered once, the cache is filled before training: each rank
    encodes its share of the images, then every rank completes what it cannot see (all of it
    hits on a shared filesystem; a node with its own disk computes the rest)."""
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    for ref in refs[rank::world]:
        cache.features(ref)
    dist.barrier()
    for ref in refs:
        cache.features(ref)


def _missing_feature(pixels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("feature cache: an image was not encoded before training (ZeRO-3)")


def _crop_args(d) -> dict:
    """data.pan_and_scan_* as preprocess() takes them."""
    return {
        "min_crop_size": d.pan_and_scan_min_crop_size,
        "max_crops": d.pan_and_scan_max_crops,
        "min_ratio": d.pan_and_scan_min_ratio,
    }


def _image_loader(recipe: Recipe, model, cfg, data):
    """pixels per image, or cached SigLIP features when data.feature_cache is set."""
    from ..data.template import ImageRef

    if not cfg.is_multimodal:
        return None, "pixel_values"
    d = recipe.data
    pas = _crop_args(d)
    size = cfg.vision.image_size
    if d.feature_cache:
        base = unwrap(model)
        tower = list(base.vision_tower.parameters())
        device = tower[0].device

        def encode(pixels):
            return base.vision_features(pixels.to(device, tower[0].dtype)).float()

        zero3 = hasattr(tower[0], "ds_id")  # DeepSpeed marks the parameters it partitions
        gather = contextlib.nullcontext()
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(tower)
        with gather:
            cache = FeatureCache(
                recipe.base_dir / d.feature_cache,
                encode,
                weights_fingerprint(base.vision_tower),
                size,
                d.pan_and_scan,
                pas,
            )
            if zero3:
                _fill_cache(cache, data.image_refs())
                cache.encode = _missing_feature  # every image is cached now
        return (lambda im: cache.features(ImageRef(im["path"], im["views"]))), "vision_features"
    return _pixel_loader(recipe, cfg), "pixel_values"


def _image_check(cfg):
    """The model's image-block check, run by the collator on the CPU batch: the model skips it
    in GPU training steps, where each would be a host sync."""
    if not cfg.is_multimodal:
        return None
    per_image = cfg.mm_tokens_per_image

    def check(batch: dict) -> None:
        images = batch.get("pixel_values", batch.get("vision_features"))
        n_features = 0 if images is None else images.shape[0] * per_image
        check_image_batch(batch["input_ids"] == cfg.image_token_id, n_features, per_image)

    return check


def _device() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _pixel_loader(recipe: Recipe, cfg):
    """Image ref -> pixels (Pan & Scan as data: says); None for a text-only model. Training's
    images without a feature cache, and a second model's (a teacher, a reference): it runs its
    own tower on the pixels, never on the policy's cached features."""
    if not cfg.is_multimodal:
        return None
    d, size = recipe.data, cfg.vision.image_size
    pas = _crop_args(d)

    def load_image(im):
        return preprocess(im["path"], size, d.pan_and_scan, **pas)

    return load_image


def _distill_data(recipe: Recipe):
    """Data for distillation: prompt-only samples answered by the teacher, the rows prepared,
    and the teacher's targets cached (objectives/distill.py), all before the student loads."""
    from ..data.collate import Collator
    from .data_check import tokenizer_and_config
    from .objectives import distill

    tok, cfg = tokenizer_and_config(recipe)
    load_image = _pixel_loader(recipe, cfg)  # the teacher sees the pixels (its own tower)
    data, distiller = distill.setup(
        recipe,
        tok,
        cfg,
        resolve_dtype(recipe.model.dtype),
        _device(),
        lambda answers, prompts: load_data(recipe, answers=answers, prompts=prompts)[2],
        Collator(tok.pad_id, load_image),
    )
    return tok, cfg, data, distiller


def prepare_output_dir(recipe: Recipe) -> Path:
    out = output_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_point(out: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones are removed, and metrics.jsonl loses
    the rows logged after the checkpoint (the resumed run logs those steps again)."""
    for p in remove_incomplete(out):
        print(f"removed {p.name}: it was not completely written", file=sys.stderr)
    ckpt = newest_complete(out)
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        step = int(ckpt.name.removeprefix("checkpoint-")) if ckpt else 0
        rows = [r for r in metrics.read_text().splitlines() if json.loads(r)["step"] <= step]
        write_atomic(metrics, "".join(r + "\n" for r in rows))
    return ckpt


def deepspeed_config(recipe: Recipe, load_universal: bool = False) -> str | dict | None:
    ds = recipe.deepspeed
    if ds is None:
        return None
    path = str(refusals.deepspeed_config_path(recipe))
    if not load_universal:
        return path
    cfg = json.loads(Path(path).read_text())
    cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def checkpointing_off(config_cls: type) -> dict[str, bool]:
    """The argument that turns the Trainer's own activation checkpointing off, by its name in
    the installed transformers: `activation_checkpointing` from 5.2x, `gradient_checkpointing`
    before (5.17 has no `activation_checkpointing` and refuses it). TRL's SFTConfig defaults
    it to on, which would checkpoint every layer again under our own (~30% slower)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    key = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    return {key: False}


def build_args(recipe: Recipe, out: Path, has_eval: bool, load_universal: bool = False):
    from trl import SFTConfig

    t = recipe.training
    report_to = trackers.report_to(recipe, out)
    return SFTConfig(
        output_dir=str(out),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        save_steps=t.save_steps,
        save_total_limit=None,  # CompleteCheckpoints rotates, after the marker is written
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        # precision.py: fp32 masters for what trains, compute in model.dtype (autocast, or
        # DeepSpeed's own bf16 mode).
        **precision.mixed_precision_flags(resolve_dtype(recipe.model.dtype)),
        **checkpointing_off(SFTConfig),  # our model checkpoints its own layers (see below)
        report_to=report_to,
        run_name=out.name,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(recipe, load_universal),
        save_only_model=False,
        disable_tqdm=True,  # console.Console draws the one progress bar
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        ddp_timeout=t.ddp_timeout,
        logging_first_step=True,
    )


def compile_enabled(recipe: Recipe, zero3: bool) -> bool:
    """training.compile: auto is on with CUDA (see BENCHMARKS.md for CPU, where it does not
    pay); never under ZeRO-3, whose parameter-gathering hooks torch.compile cannot trace."""
    want = recipe.training.compile  # true with ZeRO-3 is refused (refusals.py)
    if want == "auto":
        return torch.cuda.is_available() and not zero3
    return bool(want)


def build_trainer(recipe: Recipe):
    """Everything up to `trainer.train()`: data, model, method, compile, collator, trainer.
    Returns (trainer, output dir, base model folder)."""
    from ..data.dataset import DataErrors, data_loss

    if not torch.cuda.is_available():
        # accelerate imports DeepSpeed whenever it is installed; name its accelerator (the one
        # it would pick) so it does not warn "Setting accelerator to CPU" in every CPU run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = prepare_output_dir(recipe)
    # `auto` becomes the dtype it means here, once: the run's recipe.yaml records that one
    asked, recipe.model.dtype = recipe.model.dtype, dtype_name(resolve_dtype(recipe.model.dtype))
    refusals.refuse(recipe)
    # Data first: bad data is refused before the model is loaded.
    distiller = None
    teacher_recipe = qat.teacher_recipe(recipe) or recipe  # QAT full SFT: its checkpoint teaches
    try:
        if teacher_recipe.distill is None:
            tok, cfg, data = load_data(recipe)
        else:
            tok, cfg, data, distiller = _distill_data(teacher_recipe)
    except DataErrors as e:
        n = f"{len(e.errors)}{'+' if e.more else ''}"
        raise UserError(
            f"{n} bad sample(s), the first: {e.errors[0]}; `gemma3-tune data check` lists them all"
        ) from None
    warning, refusal = data_loss(data.report, recipe.data)
    if refusal:
        raise UserError(refusal)
    if warning and is_main_process():
        print(warning, file=sys.stderr)
    if not data.train_rows:
        raise UserError("data.train: no samples left to train on")
    reference = None
    if recipe.objective == "dpo":  # before the policy loads: never both in memory
        # On CUDA, buckets: FlexAttention compiles one graph per length (collate.py)
        bucket = recipe.data.max_seq_len if torch.cuda.is_available() else None
        collate = Collator(tok.pad_id, _pixel_loader(recipe, cfg), bucket_to=bucket)
        reference = reference_logps(
            recipe, data, collate, resolve_dtype(recipe.model.dtype), _device()
        )
    folder = model_dir(recipe)
    init_distributed(recipe.deepspeed is not None, recipe.training.ddp_timeout)
    resume = find_resume(recipe, out)
    # A ZeRO checkpoint is partitioned by world size: on another one, load it through
    # DeepSpeed's universal format (converted once, by global rank 0).
    universal = False
    if resume is not None:
        wrote, batch = written_by(resume)
        check_global_batch(recipe, resume, batch)
        verify_pickles(resume)  # before the Trainer or DeepSpeed unpickles anything in it
        universal = recipe.deepspeed is not None and wrote is not None and wrote != world_size()
        if universal:
            zero_to_universal(resume, wrote, world_size())
    args = build_args(recipe, out, bool(data.eval_rows), universal)  # sets up DeepSpeed
    # Every rank has checked output_dir by now (process groups rendezvous above): write into it.
    if is_main_process():
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (out / "data_report.json").write_text(json.dumps(data.report.summary(), indent=2) + "\n")
    device = _device()
    dtype = resolve_dtype(recipe.model.dtype)
    torch.manual_seed(recipe.training.seed)
    zero3 = recipe.deepspeed is not None and args.hf_deepspeed_config.is_zero3()
    compiled = compile_enabled(recipe, zero3)
    if zero3:  # qlora, qat and compile: true were refused (refusals.py)
        model = load_model_zero3(
            folder, dtype, args.hf_deepspeed_config.config, recipe.model.attn_backend
        )
    elif recipe.method == "qlora":  # quantized tensor by tensor while loading
        model = load_quantized(folder, dtype, device, recipe.model.attn_backend)
        if is_main_process():
            write_settings(out, dtype, torch.device(device))
    else:
        model = load_model(
            folder, dtype=dtype, device=device, attn_backend=recipe.model.attn_backend
        )
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if recipe.qat is not None:  # decoder linears fake-quantized, before peft wraps them
        qat.apply(model, recipe.qat, trains_embedding=recipe.method == "full")
    torch.manual_seed(recipe.training.seed)  # LoRA init must not depend on how the model was built
    model = apply_method(model, recipe)
    if recipe.qat is not None:
        qat.attach_lora(model)
        if recipe.qat.target == "teacher" and distiller is None:  # LoRA: the adapter off
            from .objectives.distill import Distiller
            from .recipe import DistillSection

            distiller = Distiller(
                recipe, None, qat.SelfTeacher(model), DistillSection(teacher="(the model itself)")
            )
    precision.prepare(model, dtype, deepspeed=recipe.deepspeed is not None)
    if compiled:
        unwrap(model).compile_layers()
    if is_main_process():
        print(parameter_table(model), file=sys.stderr)

    load_image, image_key = _image_loader(recipe, model, cfg, data)
    # Compiled code and FlexAttention specialise on the batch length: pad to a few buckets.
    # Eager SDPA does not, so there each batch pads only to its longest row (less compute).
    flex = unwrap(model)._backend(torch.device(device)) == "flex"
    bucket_to, rows_to = None, None
    if compiled or flex:  # a known number of shapes, so of compiled graphs (collate.py)
        bucket_to, rows_to = recipe.data.max_seq_len, recipe.training.micro_batch_size
        lengths = len(bucket_lengths(recipe.data.max_seq_len))
        bound_recompiles(flex_graph_budget(lengths, len(set(cfg.layer_types))))
    collator = Collator(
        tok.pad_id, load_image, image_key, bucket_to, rows_to, validate=_image_check(cfg)
    )
    train_ds = _rows_dataset(data.train_rows, distiller.cache if distiller else None, reference)
    eval_ds = _rows_dataset(data.eval_rows, reference=reference)
    metrics = MetricsCallback(out)
    # on a GPU the guard reads its verdicts when the Trainer logs, not at every step (a sync)
    read_every = recipe.training.logging_steps if torch.cuda.is_available() else 1
    guard = NonFiniteGuard(recipe.training.max_skipped_steps, recipe.model.dtype, read_every)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    report = data.report.summary()

    def card(step: int, max_steps: int, done: bool) -> str:
        return model_card(recipe, out, report, step, max_steps, done)

    from .loop import Gemma3Trainer

    trainer = Gemma3Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=hf_tok,
        callbacks=[
            metrics,
            CompleteCheckpoints(
                out, recipe.training.save_total_limit, lambda ckpt: folder_files(ckpt, folder)
            ),
        ]
        + [LastStep(evaluate=eval_ds is not None)],
        projector_lr=recipe.train_projector_lr,
        pad_id=tok.pad_id,
        guard=guard,
        card=card,
        distiller=distiller,
        recipe=recipe,
    )
    # TRL casts a 4-bit model's adapter weights to bf16 (pure bf16 updates, whatever the
    # recipe's dtype): give them back the dtype precision.py's rule gives every trainable.
    precision.prepare(trainer.model, dtype, deepspeed=recipe.deepspeed is not None)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if is_main_process():
        trainer.add_callback(Console())
    trainer.resume_checkpoint = resume
    if asked == "auto" and is_main_process():
        announce_auto()  # after every refusal: those stay one line
    return trainer, out, folder


def find_resume(recipe: Recipe, out: Path) -> Path | None:
    if not recipe.training.resume:
        return None
    resume = resume_point(out) if is_main_process() else newest_complete(out)
    if resume is None:
        print(f"no complete checkpoint in {out}; starting from scratch", file=sys.stderr)
    else:
        print(f"resuming from {resume.name}", file=sys.stderr)
    return resume


def check_global_batch(recipe: Recipe, ckpt: Path, batch: int | None) -> None:
    """Resuming continues the data order at step x global batch: on another number of
    processes that holds only if micro_batch_size x grad_accum x processes is unchanged."""
    t = recipe.training
    now = t.micro_batch_size * t.grad_accum * world_size()
    if batch is None or batch == now:
        return
    per = t.micro_batch_size * world_size()
    fix = (
        f"set training.grad_accum={batch // per}"
        if batch % per == 0
        else "choose micro_batch_size and grad_accum whose product with the processes matches"
    )
    raise UserError(
        f"training.resume: {ckpt.name} was trained with a global batch of {batch} rows"
        f" (micro_batch_size x grad_accum x processes), this run has {now}; {fix} to continue"
        " the same data order"
    )


def refuse_finished(trainer, ckpt: Path) -> None:
    """Resuming at or past this run's last step would train one more step (HF's loop checks
    the step count only after a step) at the schedule's end lr, 0: say so instead."""
    done = int(ckpt.name.removeprefix("checkpoint-"))
    total, by_epochs = trainer.args.max_steps, trainer.args.max_steps <= 0
    if by_epochs:  # the Trainer's own count for these epochs, this data and batch
        loader = trainer.get_train_dataloader()
        total = trainer.set_initial_training_values(trainer.args, loader)[-1]
    if done >= total:
        epochs = " (or raise training.epochs)" if by_epochs else ""
        raise UserError(
            f"training.resume: {ckpt.name} already completes this run ({done} of {total} steps);"
            f" set training.max_steps above {done}{epochs} to train more (the lr schedule is"
            " rebuilt for the new length)"
        )


def train(recipe: Recipe, recipe_path: str = "") -> Path:
    trainer, out, folder = build_trainer(recipe)
    resume = trainer.resume_checkpoint
    if resume is not None:
        refuse_finished(trainer, resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    save_final(trainer, recipe, out, folder)
    finish()  # the process group, once every rank has saved
    return out


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


def folder_files(dest: Path, base: Path) -> None:
    """What every folder of trained weights carries besides them (adapter/, model/ and each
    checkpoint-N/): the base's tokenizer files and the chat template, and for a peft adapter
    an adapter_config.json that peft's AutoPeftModel loads onto transformers' Gemma 3."""
    copy_tokenizer_files(base, dest)
    ensure_chat_template(dest)
    if (dest / "adapter_config.json").is_file():
        write_portable_config(dest, base)


def save_final(trainer, recipe: Recipe, out: Path, base_folder: Path) -> None:
    """adapter/ (peft) or model/ (full SFT), written under a temporary name and renamed when
    complete, and the final model card in it and in the run. Every rank takes part: under
    ZeRO-3 the weights are gathered from all of them; rank 0 writes."""
    name = "model" if recipe.method == "full" else "adapter"
    dest, tmp = out / name, out / f".{name}.partial"
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    masters = precision.trainable_fp32_state(trainer)  # every rank: gathered under ZeRO-3
    if recipe.method in ("lora", "qlora"):
        if main:  # peft: adapter_config.json + adapter_model.safetensors, fp32
            trainer.model.save_pretrained(str(tmp), state_dict=masters)
    else:
        engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
        state = trainer.accelerator.get_state_dict(engine)  # gathered under ZeRO-3
        if main:
            state = {k.removeprefix("module."): v for k, v in state.items()}
            state.update(masters)  # DeepSpeed's module holds bf16 copies of them
            if recipe.method == "full":  # the fp32 masters, and the rest in fp32 alongside
                save_model(unwrap(trainer.model), tmp, state_dict=state, dtype=torch.float32)
            else:  # projector only
                from safetensors.torch import save_file

                tmp.mkdir(parents=True, exist_ok=True)
                proj = {
                    k: v.detach().cpu().contiguous() for k, v in state.items() if PROJECTOR in k
                }
                save_file(proj, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
    if not main:
        return
    (tmp / UNREAD).unlink(missing_ok=True)  # HF's pickled TrainingArguments (docs/training.md)
    card = trainer.card_text(done=True)
    write_atomic(tmp / "README.md", card)  # replaces peft's template
    folder_files(tmp, base_folder)
    replace_dir(tmp, dest)
    write_atomic(out / "README.md", card)  # the run's card, final
    print(f"saved {dest}", file=sys.stderr)
