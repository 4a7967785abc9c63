"""Quantization-aware training (train/qat.py): the forward pass sees, bitwise, the weights the
gguf package's quantizer writes; gradients are straight-through; a QAT run's GGUF export holds
exactly its fake-quantized weights; bad combinations are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.model.checkpoint import load_model
from gemma3_tune.train import qat
from gemma3_tune.train.recipe import QatSection

LINEARS = qat.DECODER_LINEARS


def gguf_roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The independent reference: the gguf package's own quantize -> dequantize."""
    import gguf

    t = getattr(gguf.GGMLQuantizationType, fmt.upper())
    x = w.detach().float().numpy()
    return torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(x, t), t)))


def reference_model(folder, fmt: str, emb_fmt: str, deltas: dict | None = None):
    """Our model with every decoder linear replaced by gguf's round trip of W (+ dW) and the
    embedding by its `emb_fmt` round trip: what llama.cpp would load."""
    ref = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(tuple(f"{n}.weight" for n in LINEARS)):
                w = p + deltas[name] if deltas else p
                p.copy_(gguf_roundtrip(w, fmt))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(gguf_roundtrip(p, emb_fmt) if emb_fmt != "f16" else p.half().float())
    return ref


def _batch(v: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, v, (2, 24), generator=g)
    return ids, ids.clone()


@pytest.mark.parametrize("fmt,emb", [("q4_0", "q8_0"), ("q5_0", "same"), ("q8_0", "f16")])
def test_full_forward_and_gradient_equal_the_gguf_weights(tiny_dir, fmt, emb):
    """Full SFT: logits equal, bitwise, those of the model holding gguf's quantized weights,
    and every weight's gradient is that model's gradient (straight-through)."""
    model = load_model(tiny_dir, dtype=torch.float32)
    qat.apply(model, QatSection(format=fmt, embeddings=emb), trains_embedding=True)
    ref = reference_model(tiny_dir, fmt, fmt if emb == "same" else emb)
    ids, labels = _batch(model.config.vocab_size)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    model(ids, labels=labels).loss.backward()
    ref(ids, labels=labels).loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-7, rtol=1e-5), name
    with qat.disabled(model):  # the teacher: no fake quantization anywhere
        plain = load_model(tiny_dir, dtype=torch.float32)
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_lora_quantizes_the_merged_weight(tiny_dir):
    """LoRA: the forward uses fq(W + s B A) (peft's merge), and A, B get the straight-through
    gradient s B^T G, s G A^T of the reference model's weight gradient G."""
    import peft

    from gemma3_tune.train.adapters import target_regex

    model = load_model(tiny_dir, dtype=torch.float32)
    qat.apply(model, QatSection(format="q4_0"), trains_embedding=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_regex("all-linear"))
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, cfg)
    for n, p in pm.named_parameters():  # peft starts B at zero: make dW non-trivial
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    assert qat.attach_lora(pm) == 6 * len(LINEARS)
    deltas, layers = {}, {}
    for name, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = m.get_delta_weight("default").detach()
            layers[key] = m
    ref = reference_model(tiny_dir, "q4_0", "q8_0", deltas)
    ids, labels = _batch(model.config.vocab_size)
    got, want = pm(ids).logits, ref(ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    pm(ids, labels=labels).loss.backward()
    ref(ids, labels=labels).loss.backward()
    refp = dict(ref.named_parameters())
    for key, m in layers.items():
        g = refp[key].grad  # [out, in]
        a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        assert torch.allclose(a.grad, s * b.detach().T @ g, atol=1e-6, rtol=1e-4), key
        assert torch.allclose(b.grad, s * g @ a.detach().T, atol=1e-6, rtol=1e-4), key


def test_lora_qat_forms_no_weight_gradient(tiny_dir):
    """QAT with LoRA costs LoRA's FLOPs: the base layer's fq(W + dW) - dW is a constant for
    autograd, so backward runs no matmul giving a decoder weight's `[out, in]` gradient (the
    LoRA factors' small ones only); logits and LoRA gradients are those of the graph that
    computes the straight-through weight in autograd (fp32, 1e-6)."""
    import peft
    from torch.utils._python_dispatch import TorchDispatchMode

    from gemma3_tune.train.adapters import target_regex

    def lora_model():
        model = load_model(tiny_dir, dtype=torch.float32)
        qat.apply(model, QatSection(format="q4_0"), trains_embedding=False)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_regex("all-linear"))
        torch.manual_seed(1)
        pm = peft.get_peft_model(model, cfg)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.3)
        qat.attach_lora(pm)
        return pm

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[tuple[int, ...]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                a = args[0] if func.overloadpacket is torch.ops.aten.mm else args[1]
                self.seen.add((*out.shape, a.shape[-1]))  # (rows, cols, summed over)
            return out

    ids, labels = _batch(load_model(tiny_dir).config.vocab_size)
    fast, graph = lora_model(), lora_model()
    for m in graph.modules():  # the graph path: W trainable in name only (it gets no step)
        if isinstance(m, qat.QATLinear):
            m.weight.requires_grad_(True)
    tokens = ids.numel()  # a weight gradient sums over the tokens: G^T x
    weights = {(*m.weight.shape, tokens) for m in fast.modules() if isinstance(m, qat.QATLinear)}
    loss = fast(ids, labels=labels).loss
    with Shapes() as shapes:  # (B A, recomputed in backward, sums over the rank only)
        loss.backward()
    assert not weights & shapes.seen, weights & shapes.seen
    want = graph(ids, labels=labels)
    want.loss.backward()
    assert abs(loss.item() - want.loss.item()) <= 1e-6
    ref = dict(graph.named_parameters())
    lora = [(n, p) for n, p in fast.named_parameters() if "lora_" in n]
    assert lora
    for n, p in lora:
        torch.testing.assert_close(p.grad, ref[n].grad, atol=1e-6, rtol=0, msg=n)


def test_qat_lora_run_exports_its_fake_quantized_weights(tmp_path, tiny_dir):
    """A QAT LoRA run (q4_0, embeddings q8_0), exported with --quantize q4_0: each decoder
    linear in the file dequantizes, bitwise, to gguf's round trip of the merged weight of the
    final adapter (what its forward pass computes), the embedding to its q8_0 round trip."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from gemma3_tune.export.gguf_export import hf_to_gguf_name
    from gemma3_tune.export.hf_export import merged_model

    data = chat_set(tmp_path / "chat.jsonl")
    over = {"qat": {"format": "q4_0"}, "training__max_steps": 3, "training__save_steps": 100}
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over)
    assert main(["train", str(r)]) == 0
    out = tmp_path / "m.q4_0.gguf"
    argv = ["export", str(tmp_path / "run"), "--format", "gguf", "--quantize", "q4_0"]
    assert main([*argv, "--out", str(out)]) == 0
    merged, *_ = merged_model(tmp_path / "run")
    want = {hf_to_gguf_name("model." + k)[0]: v for k, v in merged.text_model.state_dict().items()}
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    kinds = set()
    for name, t in tensors.items():
        got = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(
            want[name].shape
        )
        kinds.add((t.tensor_type.name, name.split(".")[-2] if name.startswith("blk") else name))
        if t.tensor_type.name == "Q4_0":
            assert torch.equal(got, gguf_roundtrip(want[name], "q4_0")), name
        elif name == "token_embd.weight":
            assert t.tensor_type.name == "Q8_0"
            assert torch.equal(got, gguf_roundtrip(want[name], "q8_0"))
    linears = {k for k in kinds if k[0] == "Q4_0"}
    assert len(linears) == len(LINEARS)  # every decoder linear is Q4_0


@pytest.mark.parametrize("distribution", ["full", "sampled"])
def test_target_teacher_is_the_starting_checkpoint(tmp_path, tiny_dir, distribution):
    """target: teacher is the checkpoint the run starts from, unquantized: under LoRA the model
    with its adapter and fake quantization off (in the step), under full SFT the checkpoint's
    second copy in the step (full distribution) or cached targets (sampled). At step 1 both
    students are fq(W) (LoRA's B starts at 0) and both teachers W, with the same per-row draws:
    the first kd_loss agrees."""
    import json

    data = chat_set(tmp_path / "chat.jsonl")
    first = {}
    for method in ("lora", "full"):
        over = {
            "method": method,
            "qat": {"format": "q4_0", "target": "teacher", "distribution": distribution},
            "data__cache_dir": str(tmp_path / "cache"),
            "training__max_steps": 3,
            "training__save_steps": 100,
        }
        out = tmp_path / method
        r = write_recipe(tmp_path / f"{method}.yaml", tiny_dir, data, out, **over)
        assert main(["train", str(r)]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        kd = [x["kd_loss"] for x in rows if "kd_loss" in x]
        assert len(kd) == 3 and all(x > 0 for x in kd)
        first[method] = kd[0]
        card = (out / "README.md").read_text()
        assert "quantization-aware training for q4_0 GGUF" in card
        assert "distilled from the unquantized checkpoint" in card
    assert abs(first["lora"] - first["full"]) <= 1e-5 * first["full"], first
    cached = (tmp_path / "cache" / "teacher").is_dir()  # full SFT, sampled: targets cached
    assert cached == (distribution == "sampled")


@pytest.mark.parametrize(
    "over,words",
    [
        ({"method": "qlora"}, "method qlora"),
        ({"lora__use_dora": True}, "DoRA"),
        ({"qat": {"format": "q4_0", "target": "teacher"}, "distill": {"teacher": "x"}}, "distil"),
    ],
)
def test_bad_combinations_are_one_line(tmp_path, tiny_dir, capsys, over, words):
    data = chat_set(tmp_path / "chat.jsonl", n=4)
    over = {"qat": {"format": "q4_0"}, **over}
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over)
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_modelfile_follows_ollamas_syntax(tmp_path, tiny_dir):
    """--ollama: FROM the GGUF beside it, Gemma 3's TEMPLATE (balanced Go actions, the turn
    markers our chat template renders), stop at <end_of_turn>; only Modelfile instructions."""
    import re

    out = tmp_path / "m.gguf"
    argv = ["export", str(tiny_dir), "--format", "gguf", "--quantize", "q8_0", "--ollama"]
    assert main([*argv, "--out", str(out)]) == 0
    text = (tmp_path / "Modelfile").read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    rest = [x for x in text.replace(f'TEMPLATE """{template}"""', "").splitlines() if x.strip()]
    assert rest[0] == "FROM ./m.gguf" and (tmp_path / rest[0][7:]).is_file()
    assert 'PARAMETER stop "<end_of_turn>"' in rest
    for line in rest:  # ollama's docs/modelfile.md instructions
        assert line.split()[0] in {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER"}, line
    assert template.count("{{") == template.count("}}")
    opens = len(re.findall(r"{{-? ?(if|range)", template))
    assert opens == len(re.findall(r"{{-? ?end ?}}", template))
    assert "<start_of_turn>user\n{{ .Content }}<end_of_turn>" in template
    assert "<start_of_turn>model\n" in template
