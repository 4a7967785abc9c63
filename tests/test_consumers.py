"""Real consumers of our exports (`pytest -m consumers`, run by scripts/test_consumers.sh):
vLLM (CPU build), llama.cpp (llama-cpp-python) and transformers greedy-decode the quickstart's
fine-tuned Gemma 3 270M to exactly the tokens our own KV-cache decoder gives, on held-out
prompts. vLLM and llama.cpp live in venvs of their own (their torch and numpy pins differ from
ours); the script points $GEMMA3_TUNE_VLLM_PYTHON and $GEMMA3_TUNE_LLAMACPP_PYTHON at them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS, NEW_TOKENS = 8, 40
pytestmark = [
    pytest.mark.consumers,
    pytest.mark.skipif(
        not any(
            os.environ.get(v) for v in ("GEMMA3_TUNE_VLLM_PYTHON", "GEMMA3_TUNE_LLAMACPP_PYTHON")
        ),
        reason="real consumers run through scripts/test_consumers.sh",
    ),
]


def _python(var: str) -> str:
    exe = os.environ.get(var)
    if not exe:
        pytest.skip(f"${var} is not set (scripts/test_consumers.sh sets it)")
    return exe


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The quickstart's LoRA run on the real 270M (24 steps, ~3 min), its merged fp32 folder,
    its vLLM adapter, f16/bf16 GGUFs, the held-out prompts' ids and our greedy replies."""
    from gemma3_tune.cli import main
    from gemma3_tune.convert.embedded import embedded_model_dir
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.export.inference import chat_ids
    from gemma3_tune.model import load_model
    from gemma3_tune.model.generate import generate_batch

    d = tmp_path_factory.mktemp("consumers")
    base = embedded_model_dir("gemma3-270m")
    run = d / "run"
    assert main(["train", str(ROOT / "recipes/quickstart.yaml"), f"training.output_dir={run}"]) == 0
    assert main(["export", str(run), "--out", str(d / "merged"), "--dtype", "float32"]) == 0
    assert (
        main(["export", str(run), "--adapter-only", "--for", "vllm", "--out", str(d / "lora")]) == 0
    )
    for dt in ("f16", "bf16"):
        out = d / f"model-{dt}.gguf"
        assert (
            main(["export", str(run), "--format", "gguf", "--gguf-dtype", dt, "--out", str(out)])
            == 0
        )
    rows = (ROOT / "data/quickstart/eval.jsonl").read_text().splitlines()[:N_PROMPTS]
    prompts = [json.loads(r)["messages"][0]["content"] for r in rows]
    tok = Tokenizer(base)
    model = load_model(d / "merged").eval()
    ids = [chat_ids(tok, model, p)[0][0].tolist() for p in prompts]
    stop = {tok.end_of_turn, tok.eos_id}
    with torch.no_grad():
        ours = generate_batch(
            model, ids, max_new_tokens=NEW_TOKENS, stop_ids=stop, pad_id=tok.pad_id
        )
    assert sum(len(o) > 5 for o in ours) == N_PROMPTS  # real replies, not empty ones
    return {
        "dir": d,
        "base": base,
        "prompts": prompts,
        "ids": ids,
        "ours": ours,
        "stop": sorted(stop),
    }


def _consumer(python: str, script: str, job: dict, timeout: int = 1200) -> list[list[int]]:
    """Run `script` in another venv with the job as JSON on stdin; it prints one JSON line of
    replies (token ids, cut at the first stop token)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: no spawn
    done = subprocess.run(
        [python, "-c", script], input=json.dumps(job), capture_output=True, text=True,
        timeout=timeout, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cut(tokens: list[int], stop: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


VLLM = """
import json, sys
from vllm import LLM, SamplingParams
job = json.load(sys.stdin)
kw = {"enable_lora": True, "max_lora_rank": 16} if job.get("lora") else {}
llm = LLM(model=job["model"], dtype="float32", max_model_len=512, enforce_eager=True, **kw)
sp = SamplingParams(temperature=0, max_tokens=job["n"])  # stops: the folder's own config
req = None
if job.get("lora"):
    from vllm.lora.request import LoRARequest
    req = LoRARequest("tuned", 1, job["lora"])
outs = llm.generate([{"prompt_token_ids": p} for p in job["ids"]], sp, lora_request=req)
chat = llm.chat([{"role": "user", "content": job["chat"]}], sp, lora_request=req)
print(json.dumps([list(o.outputs[0].token_ids) for o in outs] + [list(chat[0].prompt_token_ids)]))
"""


@pytest.mark.parametrize("how", ["merged", "base+adapter"])
def test_vllm_greedy_tokens_equal_ours(how, tuned):
    python = _python("GEMMA3_TUNE_VLLM_PYTHON")
    d = tuned["dir"]
    job = {"ids": tuned["ids"], "n": NEW_TOKENS, "stop": tuned["stop"], "chat": tuned["prompts"][0]}
    if how == "merged":
        job["model"] = str(d / "merged")
    else:
        job["model"], job["lora"] = str(tuned["base"]), str(d / "lora")
    *got, chat_prompt = _consumer(python, VLLM, job)
    assert [_cut(g, tuned["stop"]) for g in got] == tuned["ours"]
    # given no stop tokens, it stopped where ours did (the folder's generation_config.json)
    assert all(len(g) <= len(o) + 1 for g, o in zip(got, tuned["ours"], strict=True))
    # llm.chat used the folder's own chat template: the same prompt ids as ours
    assert chat_prompt == tuned["ids"][0]


LLAMA_CPP = """
import json, sys
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=512, n_threads=2, verbose=False)
replies = []
for ids in job["ids"]:
    llm.reset()
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if t in job["stop"] or len(out) == job["n"]:
            break
        out.append(t)
    replies.append(out)
print(json.dumps(replies))
"""


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_llama_cpp_greedy_tokens_equal_ours(dtype, tuned):
    python = _python("GEMMA3_TUNE_LLAMACPP_PYTHON")
    job = {
        "model": str(tuned["dir"] / f"model-{dtype}.gguf"),
        "ids": tuned["ids"], "n": NEW_TOKENS, "stop": tuned["stop"],
    }  # fmt: skip
    got = _consumer(python, LLAMA_CPP, job)
    if dtype == "f16":
        assert got == tuned["ours"]
    else:  # bf16 weights round differently from our fp32: most replies, not all, agree
        assert sum(g == o for g, o in zip(got, tuned["ours"], strict=True)) >= N_PROMPTS // 2


@pytest.mark.parametrize("how", ["merged", "base+adapter"])
def test_transformers_greedy_tokens_equal_ours(how, tuned):
    import transformers

    d = tuned["dir"]
    if how == "merged":
        model = transformers.AutoModelForCausalLM.from_pretrained(d / "merged", dtype=torch.float32)
    else:
        import peft

        from gemma3_tune.cli import main

        assert main(["export", str(d / "run"), "--adapter-only", "--out", str(d / "peft")]) == 0
        base = transformers.AutoModelForCausalLM.from_pretrained(tuned["base"], dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, d / "peft")
    model.eval()
    got = []
    for ids in tuned["ids"]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )  # fmt: skip  (no eos_token_id: the folder's generation_config.json stops it)
        new = out[0, len(ids) :].tolist()
        assert len(new) <= len(_cut(new, tuned["stop"])) + 1  # stopped at its first stop token
        got.append(_cut(new, tuned["stop"]))
    assert got == tuned["ours"]


MTMD = """
import json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
job = json.load(sys.stdin)
handler = MTMDChatHandler(clip_model_path=job["mmproj"], verbose=False)
llm = Llama(model_path=job["model"], chat_handler=handler, n_ctx=512, verbose=False)
out = llm.create_chat_completion(messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "file://" + job["image"]}},
    {"type": "text", "text": "What colour is this?"}]}], max_tokens=5, temperature=0)
print(json.dumps([out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]]))
"""


def test_llama_cpp_runs_our_vision_gguf_with_mmproj(tmp_path):
    """llama.cpp's multimodal path (mtmd) loads our text GGUF with its mmproj file (tiny-vision:
    16 soft tokens per image), encodes an image and decodes after it."""
    from PIL import Image

    from gemma3_tune.cli import main

    python = _python("GEMMA3_TUNE_LLAMACPP_PYTHON")
    assert main(["init-model", "--preset", "tiny-vision", "--out", str(tmp_path / "tv")]) == 0
    out = tmp_path / "tv.gguf"
    argv = [
        "export",
        str(tmp_path / "tv"),
        "--format",
        "gguf",
        "--gguf-dtype",
        "f32",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    job = {
        "model": str(out),
        "mmproj": str(tmp_path / "mmproj-tv.gguf"),
        "image": str(tmp_path / "red.png"),
    }
    prompt_tokens, completion_tokens = _consumer(python, MTMD, job)
    assert completion_tokens == 5 and prompt_tokens > 16  # the image's 16 soft tokens included


LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
rows = []
for path in job["models"]:
    llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(job["ids"])
    rows.append(np.asarray(llm.scores[len(job["ids"]) - 1]).tolist())
print(json.dumps(rows))
"""


def test_llama_cpp_reads_our_f32_and_q8_0_gguf(tmp_path):
    """llama.cpp reads our GGUFs back: with an f32 KV cache its logits for the f32 file equal
    ours (2e-3 of logits up to ~2.5), and those of the q8_0 file (--quantize q8_0) stay within Q8_0's rounding."""
    from gemma3_tune.cli import main
    from gemma3_tune.model import load_model

    python = _python("GEMMA3_TUNE_LLAMACPP_PYTHON")
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "t")]) == 0
    paths = [tmp_path / "t-f32.gguf", tmp_path / "t-q8.gguf"]
    base = ["export", str(tmp_path / "t"), "--format", "gguf"]
    assert main([*base, "--gguf-dtype", "f32", "--out", str(paths[0])]) == 0
    assert main([*base, "--quantize", "q8_0", "--out", str(paths[1])]) == 0
    ids = [2, 105, 30, 41, 77, 9, 200, 311, 106, 107, 105]
    f32, q8 = (
        torch.tensor(r)
        for r in _consumer(python, LOGITS, {"models": [str(p) for p in paths], "ids": ids})
    )
    with torch.no_grad():
        ours = load_model(tmp_path / "t").eval()(torch.tensor([ids])).logits[0, -1]
    assert (f32 - ours).abs().max().item() <= 2e-3  # measured 1.1e-3 (llama.cpp's kernels)
    spread = ours.abs().max().item()
    assert 0 < (q8 - ours).abs().max().item() <= 0.05 * spread


def test_llama_cpp_runs_every_quantized_format_we_write(tmp_path):
    """llama.cpp loads each --quantize format (q4_0, q5_0 from the gguf package; q4_k_m,
    q5_k_m, q6_k from its own quantizer) and its logits are those of the file's weights: for
    the block formats, closer to our model holding the fake-quantized weights (what QAT
    trains) than to the unquantized one; and an Ollama Modelfile is written beside it."""
    pytest.importorskip("llama_cpp", reason="K-quants need llama-cpp-python in this process")
    from gemma3_tune.cli import main
    from gemma3_tune.model import load_model
    from gemma3_tune.model.quants import fake_quantize
    from gemma3_tune.train.qat import DECODER_LINEARS

    python = _python("GEMMA3_TUNE_LLAMACPP_PYTHON")
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "t")]) == 0
    kinds = ["q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k"]
    paths = [tmp_path / f"t-{k}.gguf" for k in kinds]
    for k, path in zip(kinds, paths, strict=True):
        argv = ["export", str(tmp_path / "t"), "--format", "gguf", "--quantize", k]
        assert main([*argv, "--out", str(path), "--ollama", "--force"]) == 0
    assert (tmp_path / "Modelfile").read_text().startswith(f"FROM ./{paths[-1].name}\n")
    ids = [2, 105, 30, 41, 77, 9, 200, 311, 106, 107, 105]
    got = _consumer(python, LOGITS, {"models": [str(p) for p in paths], "ids": ids})
    plain = load_model(tmp_path / "t").eval()
    with torch.no_grad():
        ours = plain(torch.tensor([ids])).logits[0, -1]
    for k, logits in zip(kinds, got, strict=True):
        logits = torch.tensor(logits)
        assert torch.isfinite(logits).all() and (logits - ours).abs().max() < 0.5 * ours.abs().max()
        if k not in ("q4_0", "q5_0"):
            continue
        fq = load_model(tmp_path / "t").eval()
        with torch.no_grad():
            for name, p in fq.named_parameters():
                if name.endswith(tuple(f"{n}.weight" for n in DECODER_LINEARS)):
                    p.copy_(fake_quantize(p, k))
                elif name.endswith("embed_tokens.weight"):
                    p.copy_(fake_quantize(p, "q8_0"))
            want = fq(torch.tensor([ids])).logits[0, -1]
        assert (logits - want).abs().max() < (logits - ours).abs().max(), k


def test_eval_llama_cpp_backend_equals_the_dequantized_one(tuned, tmp_path, capsys):
    """`gemma3-tune eval --backend llama.cpp` on the f16 GGUF gives the replies our
    de-quantizing backend gives on the held-out prompts (f16: exact, as the consumer test
    above measures), and the same json score."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python in this process")
    from gemma3_tune.cli import main

    rows = (ROOT / "data/quickstart/eval.jsonl").read_text().splitlines()[:N_PROMPTS]
    data = tmp_path / "held.jsonl"
    data.write_text("".join(r + "\n" for r in rows))
    gguf = str(tuned["dir"] / "model-f16.gguf")
    got = {}
    for backend in ("ours", "llama.cpp"):
        out = tmp_path / backend
        argv = ["eval", gguf, "--data", str(data), "--metric", "json", "--backend", backend,
                "--max-new-tokens", str(NEW_TOKENS), "--out", str(out), "--json"]  # fmt: skip
        assert main(argv) == 0
        last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        replies = [
            json.loads(x)["targets"][gguf]["reply"]
            for x in (out / "predictions.jsonl").read_text().splitlines()
        ]
        got[backend] = (last["scores"][gguf], replies)
    assert got["llama.cpp"] == got["ours"]


def test_eval_llama_cpp_loss_equals_the_dequantized_one(tuned, tmp_path, capsys):
    """`eval --metric loss --backend llama.cpp`: llama.cpp's log-probabilities of the same
    token ids (chats: their replies; raw text: every token) give the loss our fp32 model gives
    the f16 file's weights, to llama.cpp's f16 KV cache and its own kernels' rounding."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python in this process")
    from gemma3_tune.cli import main

    rows = (ROOT / "data/quickstart/eval.jsonl").read_text().splitlines()[:N_PROMPTS]
    text = {"text": (ROOT / "docs/qat-and-gguf.md").read_text()[:3000]}
    data = tmp_path / "held.jsonl"
    data.write_text("".join(r + "\n" for r in rows) + json.dumps(text) + "\n")
    gguf = str(tuned["dir"] / "model-f16.gguf")
    got = {}
    for backend in ("ours", "llama.cpp"):
        argv = ["eval", gguf, "--data", str(data), "--metric", "loss", "--backend", backend,
                "--dtype", "float32", "--json"]  # fmt: skip
        assert main(argv) == 0
        got[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scores"][gguf]
    assert 0.1 < got["ours"] < 5.0
    assert abs(got["llama.cpp"] - got["ours"]) <= 0.01 * got["ours"], got


def test_eval_q8_0_gguf_replies_as_the_merged_model(tuned, tmp_path, capsys):
    """The quickstart model's q8_0 GGUF export, scored by the de-quantizing backend, gives the
    merged model's replies on all 60 held-out chats (and its json score)."""
    from gemma3_tune.cli import main

    d = tuned["dir"]
    gguf = d / "model-q8_0.gguf"
    argv = ["export", str(d / "run"), "--format", "gguf", "--quantize", "q8_0", "--out", str(gguf)]
    assert main(argv) == 0
    out, merged = tmp_path / "eval", str(d / "merged")
    argv = ["eval", merged, str(gguf), "--data", str(ROOT / "data/quickstart/eval.jsonl"),
            "--metric", "json", "--max-new-tokens", str(NEW_TOKENS), "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == 60 and last["scores"][merged] == last["scores"][str(gguf)]
    rows = [json.loads(x)["targets"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(t[merged]["reply"] == t[str(gguf)]["reply"] for t in rows)
