"""Quantization-aware training: the forward pass sees exactly the weights a GGUF will hold.

`qat: {format: q4_0|q5_0|q8_0, embeddings: q8_0|f16|same, target: labels|teacher}` puts every
decoder linear (q/k/v/o, gate/up/down) through model/quants.py's fake quantization: its forward
weight is, bitwise in fp32, what the gguf package's quantize -> dequantize makes of it; the
backward pass is straight-through (the gradient of the weight is the gradient of its quantized
copy). Unsloth and Axolotl train through torchao's int4 (scale amax / 7.5, its own rounding),
which is not the Q4_0 llama.cpp runs; this trains what ships, because export/ writes the same
blocks (tested: every tensor of the exported file dequantizes to the last step's forward weight).

- Full SFT: the weight W is quantized. LoRA: the merged weight W + s B A, what `export --merge`
  writes (computed with peft's own `get_delta_weight`, as its merge does). The LoRA path still
  adds `x (s B A)^T` after the base layer, so the base layer returns `x (fq(W + dW) - dW)^T`: the
  sum is `x fq(W + dW)^T`, and the gradient reaching dW is the straight-through one. The base
  layer's weight is a constant for autograd (its gradient to dW cancels), so it is computed
  without a graph: QAT with LoRA costs LoRA's FLOPs, not full fine-tuning's.
- The tied embedding (input and LM head): `embeddings: q8_0` (the default: the head is the
  most sensitive matrix, and Q8_0 keeps the quickstart at 100%), `f16`, or `same` (the linears'
  format). Frozen under LoRA, it is quantized once; under full SFT, straight-through each step.
- `target: teacher` is the report's recipe (section 2.3): the checkpoint the run starts from,
  without fake quantization, is the teacher (objectives/distill.py's loss), on every position.
  `distribution: full` (the default) targets its whole softmax, `sampled` the report's 256
  sampled ids: the student starts next to the teacher, and the exact gradient `q - p` is
  smaller there than 256 draws resolve (BENCHMARKS.md measures both). Under LoRA the teacher
  is the same modules with the adapter and fake quantization off, in the step (no second
  copy); under full SFT a second copy of the checkpoint (full) or its targets cached before
  the student loads (sampled): the trained weights' own unquantized copy would drift with
  them (`teacher_recipe`).
- In bf16 (GPU) the quantized weight is cast to bf16 for the matmul: Q4_0 values need up to 15
  significant bits, so only fp32 training forwards exactly the shipped weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.quants import fake_quantize, ste

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _FakeQuantLinear(torch.autograd.Function):
    """`x fq(W)^T` with the straight-through gradient for W, saving W instead of fq(W): the
    quantized copy is recomputed in backward. Saved, it kept one extra copy of every decoder
    weight alive from forward to backward (0.4 GB for the 270M in fp32). x: [..., in];
    W: [out, in]; no bias (Gemma 3's linears have none)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, fmt: str) -> Tensor:
        ctx.fmt = fmt
        ctx.save_for_backward(x, w)
        return F.linear(x, fake_quantize(w, fmt).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = grad @ fake_quantize(w, ctx.fmt).to(grad.dtype)
        if ctx.needs_input_grad[1]:  # straight through: the gradient of fq(W) is W's
            gw = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(w.dtype)
        return gx, gw, None


class _LoRABaseQuantLinear(torch.autograd.Function):
    """LoRA's base layer under QAT: `x Q^T` with Q = fq(W + dW) - dW. Under the
    straight-through estimator Q is a constant for autograd: the gradient it passes to dW is
    +G - G = 0, and LoRA's own branch `x dW^T` carries all of dW's gradient. So Q is computed
    without a graph (no `[out, in]` weight-gradient matmul per layer, as full fine-tuning would
    pay) and recomputed in backward rather than kept (no copy of W from forward to backward).
    `module`: the QATLinear (W frozen, its LoRA layer unchanged between the passes)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: QATLinear) -> Tensor:
        ctx.module = module
        return F.linear(x, module.constant_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.module.constant_weight().to(grad.dtype), None


class QATLinear(nn.Linear):
    """A decoder linear whose forward weight is fake-quantized (same parameters and state-dict
    keys as the nn.Linear it replaces, so checkpoints and peft see no difference)."""

    fmt: str
    enabled: bool

    @classmethod
    def wrap(cls, linear: nn.Linear, fmt: str) -> QATLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q.fmt, q.enabled = fmt, True
        q.__dict__["lora"] = None  # the peft layer around it, not a submodule (attach_lora)
        return q

    def quantized_weight(self) -> Tensor:
        """The forward weight: fq(W), or fq(W + dW) - dW under LoRA (see the module docstring)."""
        delta = self._delta()
        if delta is None:
            return ste(self.weight, self.fmt)
        return ste(self.weight + delta.to(self.weight.dtype), self.fmt) - delta

    @torch.no_grad()
    def constant_weight(self) -> Tensor:
        """quantized_weight's value, without a graph (`ste`'s forward value is fq's)."""
        return self.quantized_weight()

    def _delta(self) -> Tensor | None:
        layer = self.__dict__.get("lora")
        if layer is None or layer.disable_adapters or layer.merged:
            return None
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        return layer.get_delta_weight(active[0]) if active else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None and self.__dict__["lora"] is None:  # full QAT: no LoRA around it
            return _FakeQuantLinear.apply(x, self.weight, self.fmt)
        if self.bias is None and not self.weight.requires_grad:  # LoRA: W frozen
            return _LoRABaseQuantLinear.apply(x, self)
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)


def _decoder_linears(model) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every decoder projection of our model."""
    for layer in model.text_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in DECODER_LINEARS:
                if hasattr(parent, name):
                    yield parent, name, getattr(parent, name)


def embedding_format(qat) -> str:
    return qat.format if qat.embeddings == "same" else qat.embeddings


def quantize_embedding(w: Tensor, fmt: str) -> Tensor:
    """The tied embedding as the GGUF stores it: a ggml block format, or f16."""
    if fmt == "f16":
        return w.half().to(w.dtype)
    return fake_quantize(w, fmt)


def apply(model, qat, trains_embedding: bool) -> None:
    """Before the method (peft) wraps the model: decoder linears become QATLinear, and the
    tied embedding is quantized: straight-through when trained; when frozen, once (in place,
    or, when the model is its own teacher, as a second copy the teacher does not use)."""
    from ..model.quants import check_width

    for parent, name, lin in _decoder_linears(model):
        check_width(lin.in_features, qat.format, f"{name} ({lin.in_features} inputs)")
        setattr(parent, name, QATLinear.wrap(lin, qat.format))
    emb = model.text_model.embed_tokens
    fmt = embedding_format(qat)
    if fmt != "f16":
        check_width(emb.weight.shape[1], fmt, "the embedding")
    if trains_embedding:
        model.text_model.embedding_transform = lambda w: (
            w.detach().half().to(w.dtype) + (w - w.detach()) if fmt == "f16" else ste(w, fmt)
        )
    elif qat.target == "teacher":
        with torch.no_grad():
            frozen = quantize_embedding(emb.weight, fmt)
        model.text_model.embedding_transform = lambda w: frozen
    else:
        with torch.no_grad():
            emb.weight.copy_(quantize_embedding(emb.weight, fmt))


def attach_lora(model) -> int:
    """After peft: each QATLinear learns which LoRA layer wraps it (to quantize W + dW)."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), QATLinear):
            module.get_base_layer().__dict__["lora"] = module
            n += 1
    return n


@contextlib.contextmanager
def disabled(model) -> Iterator[None]:
    """The model without fake quantization (W + dW in full precision): QAT's own teacher."""
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    texts = [m for m in model.modules() if hasattr(m, "embedding_transform")]
    transforms = [t.embedding_transform for t in texts]
    for m in layers:
        m.enabled = False
    for t in texts:
        t.embedding_transform = None
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True
        for t, f in zip(texts, transforms, strict=True):
            t.embedding_transform = f


def teacher_recipe(recipe):
    """`target: teacher` under full SFT: the teacher is the checkpoint the run starts from
    (`model.path`), fixed: a second model in the step (full distribution), or run once before
    the student loads (sampled, distill.cache); the weights being
    trained are no teacher, since their unquantized copy drifts with them (measured: the labels'
    CE rose from 1.0 to 2.0 while the loss to such a teacher fell). Under LoRA the teacher is
    the model with its adapter and fake quantization off (SelfTeacher): the same checkpoint,
    without a second copy. The recipe for the data and teacher phase, or None."""
    from .recipe import DistillSection

    q = recipe.qat
    if q is None or q.target != "teacher" or recipe.method != "full":
        return None
    full = q.distribution == "full"  # not cacheable: the checkpoint is a second model in the step
    d = DistillSection(teacher=recipe.model.path, mode=q.distribution, cache=not full)
    return recipe.model_copy(update={"distill": d})


class SelfTeacher:
    """The checkpoint under a LoRA student: the model with its adapter disabled (peft's
    `disable_adapter`) and fake quantization off, as objectives/distill.py's teacher (it calls
    `teacher(**inputs, hidden_only=True)` and `teacher.get_output_embeddings()`)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def __call__(self, **inputs):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter(), disabled(self.model):
                return self.model(**inputs)
        finally:
            self.model.train(was_training)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()
