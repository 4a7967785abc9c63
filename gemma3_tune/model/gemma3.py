"""Gemma 3: the text decoder and the multimodal wrapper, readable top to bottom.

Module names mirror transformers' in-memory layout (`model.layers.*` for Gemma3ForCausalLM,
`model.language_model.*` / `model.vision_tower.*` / `model.multi_modal_projector.*` for
Gemma3ForConditionalGeneration), so checkpoints map one to one and a peft adapter trained on
this model loads onto transformers' as well. The attention layer and its backends are in
attention.py, the KV cache in kv_cache.py, the loss heads in loss.py and logprobs.py.

Shapes: B batch, T new tokens, S keys (cached + new), D width, H heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, FlexMask, flex_options
from .config import GLOBAL, Gemma3Config
from .context_parallel import ContextGroup, RowShard, sequence_logprobs_sharded, shard_rows
from .image_blocks import check_image_batch
from .kv_cache import KVCache
from .layers import GeGLU, RMSNorm, activation_dtype, residual_dtype, rope_cos_sin, rope_inv_freq
from .logprobs import chunked_logprobs, sequence_logprobs
from .loss import IGNORE_INDEX, SoftTargets, TeacherDistribution, batch_loss
from .masks import TokenInfo, flex_block_mask, token_info, visible
from .siglip import MultiModalProjector, VisionTower, pool_patches


class Output(dict):
    """A dict (as HF's Trainer expects) with attribute access. Fields, by call: `loss` (with
    labels; `kd_loss`, `ce_loss` when distilling), `logits` (without), `hidden` (hidden_only),
    `logps` and `tokens` (sequence_logps: per document, the summed log-probability of its
    labelled targets `[S]` fp32 and their count `[S]` int64), `logps` (token_logps: `[K]`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


# ---------------------------------------------------------------------------------------------
# Compiled FlexAttention (attention.py): how many graphs a run makes


def flex_graph_budget(lengths: int, layer_types: int, grad_modes: int = 2) -> int:
    """Graphs compiled FlexAttention (and its compiled block-mask builder) make over a run
    whose batches have `lengths` distinct lengths and a fixed number of rows (the collator pads
    the last batch up to it): one per length, layer type (the window is a constant of the
    mask), and grad mode (training steps and evaluation). Generation never uses it (the KV
    cache runs SDPA)."""
    return lengths * layer_types * grad_modes


def bound_recompiles(graphs: int) -> None:
    """Let every expected graph compile (torch's limit is 8 per function), and turn going past
    that into an error instead of torch's silent fall-back to unfused code."""
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, graphs)
    dynamo.fail_on_recompile_limit_hit = True


# ---------------------------------------------------------------------------------------------
# Decoder


class DecoderLayer(nn.Module):
    def __init__(self, c: Gemma3Config, layer_idx: int):
        super().__init__()
        self.layer_type = c.layer_types[layer_idx]
        self.self_attn = Attention(c, layer_idx)
        self.mlp = GeGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache: KVCache | None) -> Tensor:
        """x: the residual stream `[B, T, D]` (residual_dtype); cos/sin are in the compute dtype."""
        dt = cos.dtype
        h = self.self_attn(self.input_layernorm(x, dt), cos, sin, mask, cache)
        x = x + self.post_attention_layernorm(h, x.dtype)
        h = self.mlp(self.pre_feedforward_layernorm(x, dt))
        return x + self.post_feedforward_layernorm(h, x.dtype)


class TextModel(nn.Module):
    """Embeddings (scaled by sqrt(D)), the decoder layers, the final norm."""

    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # fp32 on the CPU, copied once to each device it runs on. Not buffers: `model.to(bf16)`
        # would round them (RoPE at base 1M needs fp32 frequencies).
        self.inv_freq = {
            GLOBAL: rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor),
            "sliding_attention": rope_inv_freq(c.head_dim, c.rope_local_base_freq),
        }
        self._inv_freq_on: dict[torch.device, dict[str, Tensor]] = {}
        self.gradient_checkpointing = False
        # QAT (train/qat.py): the tied embedding as the GGUF will store it, in input and head
        self.embedding_transform: Callable[[Tensor], Tensor] | None = None

    def inv_freq_on(self, device: torch.device) -> dict[str, Tensor]:
        """`inv_freq` on `device`, copied there once (not at every forward)."""
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = {t: f.to(device) for t, f in self.inv_freq.items()}
        return self._inv_freq_on[device]

    def embedding_weight(self) -> Tensor:
        """The tied embedding `[V, D]` the model computes with (input and LM head)."""
        w = self.embed_tokens.weight
        return w if self.embedding_transform is None else self.embedding_transform(w)

    def embed(self, input_ids: Tensor, weight: Tensor | None = None) -> Tensor:
        """`weight`: embedding_weight(), when the caller already computed it (the head uses it
        too: QAT's fake quantization then runs once per forward, not twice)."""
        w = self.embed_tokens.weight
        dtype = residual_dtype(activation_dtype(w))
        if self.embedding_transform is None:
            rows = self.embed_tokens(input_ids)
        else:
            weight = self.embedding_weight() if weight is None else weight
            rows = F.embedding(input_ids, weight, self.embed_tokens.padding_idx)
        # sqrt(D) is cast to the activation dtype first, as the reference does (it rounds in bf16).
        # [B, T, D] in the residual stream's dtype
        return rows.to(dtype) * torch.tensor(math.sqrt(self.config.hidden_size), dtype=dtype)

    def forward(
        self,
        x: Tensor,  # [B, T, D] input embeddings
        info: TokenInfo,  # positions, documents and image blocks of the new tokens
        backend: str,
        cache: KVCache | None = None,
        shard: RowShard | None = None,  # context parallelism: the whole rows, this rank's part
    ) -> Tensor:
        freqs = self.inv_freq_on(x.device)
        compute = activation_dtype(self.embed_tokens.weight)
        rope = {t: rope_cos_sin(f, info.pos, compute) for t, f in freqs.items()}
        types = set(self.config.layer_types)
        if shard is not None:
            masks = {t: shard.mask(t) for t in types}
        else:
            masks = {t: self._mask(t, info, backend, cache) for t in types}
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            mask = masks[layer.layer_type]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x, compute)  # [B, T, D]

    def _mask(self, layer_type: str, info: TokenInfo, backend: str, cache: KVCache | None):
        window = None if layer_type == GLOBAL else self.config.sliding_window
        keys = info
        if cache is not None:
            past = cache.info.get(layer_type)
            keys = info if past is None else past.cat(info)
            keep = keys.pos.shape[1] if window is None else min(keys.pos.shape[1], window - 1)
            cache.info[layer_type] = keys.last(keep)
        if backend == "flex" and cache is None:
            options = flex_options(info.pos.device, self.config.head_dim, self.embed_tokens.weight)
            images = self.config.is_multimodal  # else token_info left every block at 0
            return FlexMask(flex_block_mask(info, window, images), options)
        return visible(info, keys, window)[:, None]  # [B, 1, T, S]


class MultimodalModel(nn.Module):
    """Gemma3ForConditionalGeneration's `model`: language model + frozen SigLIP + projector."""

    def __init__(self, c: Gemma3Config):
        super().__init__()
        assert c.vision is not None
        self.language_model = TextModel(c)
        self.vision_tower = VisionTower(c.vision)
        self.multi_modal_projector = MultiModalProjector(c)


# ---------------------------------------------------------------------------------------------
# The model users hold


class Gemma3(nn.Module):
    """Gemma 3 with a tied LM head. Text-only when `config.vision` is None.

    `forward(input_ids, pixel_values=None, position_ids=None, labels=None)` derives every mask
    from `input_ids` and `position_ids` (see masks.py). With labels it returns `.loss` (mean over
    labels != -100, next-token shifted inside, computed in chunks) and no logits; without labels
    it returns `.logits` `[B, T, V]`. Given `num_items_in_batch` (HF Trainer passes the number
    of labelled tokens across a gradient-accumulation step), the loss is this micro-batch's sum
    divided by it, so accumulated steps weigh every token equally. With labels and
    `sequence_logps=True` it returns `.logps` and `.tokens` per document instead (preference
    tuning: see logprobs.sequence_logprobs). `scored` (the training collator's, optional) names the
    labelled positions so the loss needs no host sync to find them.
    """

    def __init__(self, config: Gemma3Config, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend  # "sdpa", "flex", or "auto" (flex on CUDA)
        # Set by train/ under data parallelism (train/distributed.py: images_needed): what
        # every rank must run of the vision path this step, given what this rank's batch runs
        # (2 tower and projector, 1 projector on cached features, 0 neither). None: one process.
        self.images_needed: Callable[[int, torch.device], int] | None = None
        # Set by train/ under context parallelism (context_parallel.py): each rank holds a shard
        # of every row; the masks and keys are the whole row's. None: whole rows.
        self.context: ContextGroup | None = None
        self.model: TextModel | MultimodalModel = (
            MultimodalModel(config) if config.is_multimodal else TextModel(config)
        )

    # -- parts ---------------------------------------------------------------------------------
    @property
    def text_model(self) -> TextModel:
        return self.model.language_model if isinstance(self.model, MultimodalModel) else self.model

    @property
    def vision_tower(self) -> VisionTower | None:
        return self.model.vision_tower if isinstance(self.model, MultimodalModel) else None

    @property
    def projector(self) -> MultiModalProjector | None:
        return self.model.multi_modal_projector if isinstance(self.model, MultimodalModel) else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    def get_output_embeddings(self) -> nn.Embedding:
        """The LM head is tied: it is the input embedding matrix."""
        return self.text_model.embed_tokens

    def add_model_tags(self, tags: list[str] | str) -> None:
        """TRL tags the models it trains; we keep the tags (they only matter for Hub uploads)."""
        self.model_tags = [tags] if isinstance(tags, str) else list(tags)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None
    ) -> None:
        self.text_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.text_model.gradient_checkpointing = False

    def _backend(self, device: torch.device) -> str:
        """auto: FlexAttention on CUDA when its kernels fit the card's shared memory (at
        head_dim 256 on ~100 KB cards only with smaller tiles; flex_kernels.py), else SDPA."""
        if self.attn_backend != "auto":
            return self.attn_backend
        if device.type != "cuda":
            return "sdpa"
        from .flex_kernels import USE_SDPA, options_for_device

        options, _ = options_for_device(device, self.config.head_dim)
        return "sdpa" if options == USE_SDPA else "flex"

    # -- forward -------------------------------------------------------------------------------
    def _stand_in(
        self, x: Tensor, pixel_values: Tensor | None, vision_features: Tensor | None
    ) -> Tensor | None:
        """A zero-weighted term that keeps data-parallel ranks in step when only some of them
        hold images. A single process never needs it (None).

        Under DDP and ZeRO-2 a trained projector must get a gradient on every rank at every
        step, or the gradient reduction fails (DDP) or pairs the wrong buckets (ZeRO-2). A rank
        without images runs the projector on one block of zero features; the frozen tower is
        not run, so it costs nothing.

        Under ZeRO-3 every module's weights are gathered collectively when it runs, so the
        tower must run on every rank or on none. The ranks agree whether any of them runs it
        this step; if so, a rank without pixels runs it on one zero image. Steps
        where no rank holds an image skip the tower everywhere. The projector still runs on
        every rank at every step: a trained parameter that gets no gradient in a step keeps
        its previous step's gradient under ZeRO-3 (measured: the grad norm of an image-less
        step included the last image step's projector gradient).

        The result is added to the embeddings with weight 0: zero gradients, same values.
        The ranks' agreement (a collective) is train/'s, passed in as `images_needed`."""
        if self.images_needed is None:
            return None
        mine = 2 if pixel_values is not None else 1 if vision_features is not None else 0
        need = self.images_needed(mine, x.device)
        if mine >= need:
            return None
        v = self.config.vision
        if need == 2:
            features = self.vision_features(
                x.new_zeros((1, v.num_channels, v.image_size, v.image_size))
            )
        else:
            features = x.new_zeros((1, self.config.mm_tokens_per_image, v.hidden_size))
        return self.model.multi_modal_projector(features).sum().to(x.dtype) * 0

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """`[N, 3, S, S]` pixels -> `[N, mm_tokens, Dv]` pooled SigLIP features: the frozen part
        of the image path, so it can be cached (gemma3_tune.data.feature_cache)."""
        assert self.vision_tower is not None
        return pool_patches(self.vision_tower(pixel_values), self.config)

    def embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        vision_features: Tensor | None,
        weight: Tensor | None = None,  # the tied embedding, if already computed (QAT)
    ) -> Tensor:
        """Token embeddings with each image block replaced by its image's soft tokens."""
        c = self.config
        is_img = input_ids == c.image_token_id if c.is_multimodal else None
        ids = input_ids.masked_fill(is_img, c.pad_token_id) if is_img is not None else input_ids
        x = self.text_model.embed(ids, weight)  # [B, T, D]
        image_features = None
        if c.is_multimodal:
            stand_in = self._stand_in(x, pixel_values, vision_features)
            if stand_in is not None:  # in the graph with weight 0
                x = x + stand_in
        if vision_features is None and pixel_values is not None:
            if not c.is_multimodal:
                raise ValueError("pixel_values given to a text-only Gemma 3 model")
            vision_features = self.vision_features(pixel_values)
        if vision_features is not None:
            assert isinstance(self.model, MultimodalModel)
            image_features = self.model.multi_modal_projector(vision_features)  # [N, mm_tokens, D]
        n_features = (
            0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        )
        if is_img is not None and not (self.training and input_ids.is_cuda):
            # Host syncs: skipped in GPU training steps, whose collator ran the same check on
            # the CPU before the batch moved (check_image_batch).
            check_image_batch(is_img, n_features, c.mm_tokens_per_image)
        if image_features is None:
            return x
        return x.masked_scatter(is_img[..., None], image_features.to(x.dtype))

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        pixel_values: Tensor | None = None,  # [N, 3, S, S], in order of their image blocks
        position_ids: Tensor | None = None,  # [B, T]; restarts at 0 for each packed document
        labels: Tensor | None = None,  # [B, T]; -100 where no loss
        vision_features: Tensor | None = None,  # [N, mm_tokens, Dv]: cached pooled SigLIP output
        cache: KVCache | None = None,
        num_items_in_batch: int | Tensor | None = None,  # HF Trainer: labelled tokens in the step
        last_logits_only: bool = False,  # generation: project only the final position
        soft_targets: SoftTargets | TeacherDistribution | None = None,  # a teacher's (loss.py)
        hidden_only: bool = False,  # the final hidden states [B, T, D], unprojected (a teacher)
        sequence_logps: bool = False,  # preference tuning: per-document log p(labels), no loss
        token_logps: bool = False,  # RL: log p(label) per labelled target `[K]`, row-major
        temperature: float = 1.0,  # token_logps: the sampling temperature (logits / it)
        scored: Tensor | None = None,  # [K] the collator's scored positions (see loss.batch_loss)
        **_: object,
    ) -> Output:
        b, t = input_ids.shape
        if position_ids is None:
            start = cache.length(GLOBAL) if cache is not None else 0
            position_ids = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        image_id = self.config.image_token_id if self.config.is_multimodal else None
        shard = None
        if self.context is not None and cache is None:
            window = self.config.sliding_window
            shard = shard_rows(self.context, input_ids, position_ids, image_id, window)
            info = shard.local
        else:
            info = token_info(input_ids, position_ids, image_id)
        if cache is not None and cache.length(GLOBAL):
            # Generation: new tokens continue each row's last cached document.
            info.doc.copy_(cache.info[GLOBAL].doc[:, -1:].expand_as(info.doc))
        weight = self.text_model.embedding_weight()  # tied: input embedding and LM head [V, D]
        x = self.embed(input_ids, pixel_values, vision_features, weight)
        backend = "sdpa" if shard is not None else self._backend(input_ids.device)
        h = self.text_model(x, info, backend, cache, shard)  # [B, T, D]
        if hidden_only:
            return Output(hidden=h)
        if labels is None:
            if sequence_logps:
                raise ValueError("sequence_logps=True needs labels (the tokens to score)")
            if last_logits_only:
                h = h[:, -1:]
            # One [B*T, D] x [D, V] matmul: given the non-contiguous h[:, -1:] and a head that
            # needs no grad, a 3-D matmul falls back to a bmm over B copies of the [V, D] head
            # (5 GB copied per prefill at batch 16: measured 13 s of a 14 s eval batch)
            return Output(logits=(h.reshape(-1, h.shape[-1]) @ weight.T).view(*h.shape[:2], -1))
        if shard is not None:  # shifted on the whole row (the last token predicts the next shard's)
            targets = labels
        else:
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]  # position t predicts label t+1
        if token_logps:  # inside forward, so ZeRO-3 has the tied head gathered
            keep = (targets.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]
            flat = h.reshape(-1, h.shape[-1])[keep] / temperature
            return Output(logps=chunked_logprobs(flat, weight, targets.reshape(-1)[keep]))
        if sequence_logps and shard is not None:  # the whole rows' documents, summed in the group
            logps, tokens = sequence_logprobs_sharded(shard, h, weight, targets)
            return Output(logps=logps, tokens=tokens)
        if sequence_logps:  # masks document boundaries too: finds its own rows (no `scored`)
            logps, tokens = sequence_logprobs(h, weight, targets, info.doc)
            return Output(logps=logps, tokens=tokens)
        loss, logs = batch_loss(h, weight, targets, soft_targets, num_items_in_batch, scored)
        return Output(loss=loss, **logs)

    def compile_layers(self) -> None:
        """Regional compilation: each decoder and SigLIP layer is compiled in place (its
        parameter names do not change), so RMSNorm, GeGLU, RoPE and the residual adds fuse.
        Layers of one kind share their compiled code, so a model compiles one graph per kind
        (plus one with a dynamic length when the batch length first changes), not per layer.
        Works on a peft-wrapped model too: LoRA modules are traced inside the layer."""
        for layer in self.text_model.layers:
            layer.compile()
        if self.vision_tower is not None:
            for layer in self.vision_tower.encoder.layers:
                layer.compile()

    def new_cache(self) -> KVCache:
        n = self.config.num_hidden_layers
        return KVCache(keys=[None] * n, values=[None] * n)
