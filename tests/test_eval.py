"""`gemma3-tune eval`: metrics by hand, the loss metric against transformers, a q8_0 GGUF
scored by the de-quantizing backend against the merged model it came from, outputs, and bad
input (one line each, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainutil import chat_set, colour_set, refused_in_one_line, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.eval.metrics import contains, exact, json_equal


def test_metrics_by_hand():
    assert exact("  the answer is 4 4\n", "the answer is 4 4")
    assert not exact("the answer is 4", "the answer is 4 4")
    assert json_equal('{"a": 1, "b": [2, 3]}', '{"b": [2, 3],  "a": 1}')  # order and spacing
    assert not json_equal('{"a": 1}', '{"a": 2}')
    assert not json_equal("not json", "not json")  # both must parse
    assert not json_equal('{"a": 1', '{"a": 1}')
    assert contains("Sure! the answer is 4 4.", " the answer is 4 4 ")
    assert not contains("the answer is 4", "the answer is 4 4")


def _chats(path, rows):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def test_loss_metric_equals_transformers(tmp_path, tiny_dir, capsys):
    """Mean token cross-entropy over the assistant turns (training's loss mask), every token of
    the set weighted alike: equal to transformers' Gemma3ForCausalLM on the same token ids."""
    import transformers

    from gemma3_tune.data.sources import read_records, to_turns
    from gemma3_tune.data.template import render
    from gemma3_tune.data.tokenizer import Tokenizer

    data = chat_set(tmp_path / "held.jsonl", n=6, seed=3)
    argv = ["eval", str(tiny_dir), "--data", str(data), "--metric", "loss", "--json"]
    argv += ["--dtype", "float32"]  # the reference's (auto is bf16 on native-bf16 CPUs)
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["metric"] == "loss" and got["n"] == 6

    tok = Tokenizer(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    total, count = 0.0, 0
    for record in read_records(data):
        s = render(to_turns(record), tok, None)
        ids, labels = torch.tensor([s.input_ids]), torch.tensor([s.labels])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(hf(input_ids=ids, labels=labels, use_cache=False).loss) * n
        count += n
    want = total / count
    assert abs(got["scores"][str(tiny_dir)] - want) <= 1e-5, (got, want)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_dir):
    """A tiny LoRA run that learned chat_set's task, and its q8_0 GGUF export."""
    d = tmp_path_factory.mktemp("eval")
    data = chat_set(d / "train.jsonl", n=48)
    r = write_recipe(d / "r.yaml", tiny_dir, data, d / "run", training__max_steps=30)
    assert main(["train", str(r)]) == 0
    gguf = d / "run-q8_0.gguf"
    argv = ["export", str(d / "run"), "--format", "gguf", "--quantize", "q8_0", "--out", str(gguf)]
    assert main(argv) == 0
    return d


def test_run_vs_its_q8_0_gguf_and_the_base(tuned, tiny_dir, tmp_path, capsys):
    """The q8_0 GGUF, de-quantized into our model, replies as the run it was exported from on
    held-out chats; the base does not. Outputs: the table, predictions.jsonl (a row per sample
    with every target's reply and scores), summary.json, and one final JSON line."""
    held = chat_set(tmp_path / "held.jsonl", n=12, seed=7)
    run, gguf = str(tuned / "run"), str(tuned / "run-q8_0.gguf")
    out = tmp_path / "eval"
    argv = ["eval", str(tiny_dir), run, gguf, "--data", str(held), "--metric", "exact",
            "--metric", "contains", "--max-new-tokens", "12", "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["n"] == 12 and list(last["scores"]) == [str(tiny_dir), run, gguf]
    assert last["scores"][run] == last["scores"][gguf]
    assert last["scores"][run]["exact"] > last["scores"][str(tiny_dir)]["exact"]
    assert f"| {run} |" in stdout and "| target | exact | contains |" in stdout
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        t = row["targets"]
        assert t[run]["reply"] == t[gguf]["reply"]
        assert t[run]["exact"] == float(t[run]["reply"].strip() == row["reference"].strip())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"][run]["exact"] == last["scores"][run]["exact"]


def test_bad_input_is_one_line_and_writes_nothing(tuned, tiny_dir, tmp_path, capsys):
    import gguf as gguf_pkg

    held = chat_set(tmp_path / "held.jsonl", n=2, seed=1)
    out = tmp_path / "out"

    def refused(argv, *needles):
        refused_in_one_line(capsys, argv, *needles)
        assert not out.exists() or (out / "keep").is_file()

    base = ["--data", str(held), "--out", str(out)]
    refused(["eval", str(tmp_path / "nope"), *base], "nope: not found")
    llama = tmp_path / "llama.gguf"
    w = gguf_pkg.GGUFWriter(str(llama), "llama")
    w.add_tensor("x", torch.zeros(4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(["eval", str(llama), *base], "general.architecture is 'llama'")
    no_reply = _chats(tmp_path / "q.jsonl", [[{"role": "user", "content": "hi"}]])
    refused(["eval", str(tiny_dir), "--data", str(no_reply)], "q.jsonl:1", "assistant")
    images = colour_set(tmp_path / "img", 1, seed=2)
    refused(["eval", str(tiny_dir), "--data", str(images)], "text-only")
    out.mkdir()
    (out / "keep").write_text("mine")
    refused(["eval", str(tiny_dir), *base], "--out", "--force")
    assert (out / "keep").read_text() == "mine"
    refused(["eval", str(tiny_dir), "--data", str(held), "--metric", "bleu"], "bleu")
    llama = ["--data", str(held), "--backend", "llama.cpp"]
    refused(["eval", str(tiny_dir), *llama], "scores .gguf files")
    gguf = str(tuned / "run-q8_0.gguf")
    refused(["eval", gguf, *llama, "--metric", "preference"], "drop --backend llama.cpp")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # (the consumer tests run the backend where it is installed)
        refused(["eval", gguf, *llama], "pip install llama-cpp-python")


def test_recipe_eval_metric_scores_the_held_out_split(tmp_path, tiny_dir, capsys):
    """eval.metric in the recipe: the run's eval_split chats are scored at the end, into
    eval.json and the model card; the score equals `gemma3-tune eval` on the same chats."""
    data = chat_set(tmp_path / "chat.jsonl", n=20)
    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, run, data__eval_split=0.25,
        eval__metric=["exact", "loss"], eval__max_new_tokens=12, training__max_steps=6,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    got = json.loads((run / "eval.json").read_text())
    assert got["n"] == 5 and set(got["scores"]) == {"exact", "loss"}
    assert "Held-out evaluation" in (run / "README.md").read_text()
    assert "Held-out evaluation" in (run / "adapter" / "README.md").read_text()
    held = tmp_path / "held.jsonl"  # the same 5 chats, in a file of their own
    lines = data.read_text().splitlines()
    from gemma3_tune.eval.after_training import held_out_samples
    from gemma3_tune.train.recipe import load_recipe

    origins = [s.origin for s in held_out_samples(load_recipe(r))]
    held.write_text("".join(lines[int(o.rsplit(":", 1)[1]) - 1] + "\n" for o in origins))
    capsys.readouterr()
    argv = ["eval", str(run), "--data", str(held), "--metric", "exact", "--metric", "loss",
            "--max-new-tokens", "12", "--json"]  # fmt: skip
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["scores"][str(run)]["exact"] == got["scores"]["exact"]
    assert abs(again["scores"][str(run)]["loss"] - got["scores"]["loss"]) <= 1e-6


def test_eval_dtype_is_one_for_all_targets(tmp_path, monkeypatch):
    """eval --dtype auto: the dtype the first run directory trained in (its recipe.yaml), for
    every target; with no run among them, the machine's auto; an explicit --dtype wins."""
    import torch
    import yaml

    from gemma3_tune.eval.targets import Target, eval_dtype
    from gemma3_tune.model import dtypes

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2\n")  # no native bf16: the machine's auto is fp32
    monkeypatch.setattr(dtypes, "CPUINFO", info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"path": "m", "dtype": "bfloat16"}}))
    base, tuned = Target("gguf:gemma3-270m", "embedded", Path("x")), Target(str(run), "run", run)
    assert eval_dtype([base, tuned], "auto") == torch.bfloat16
    assert eval_dtype([base], "auto") == torch.float32
    assert eval_dtype([base, tuned], "float32") == torch.float32


def test_merged_export_stops_at_end_of_turn_in_transformers(tuned, tmp_path):
    """Every model folder we write stops where the template ends a turn: transformers'
    `generate` with no stop argument ends a fine-tune's reply at `<end_of_turn>` (the folder's
    generation_config.json and config.json carry [<eos>, <end_of_turn>], as Google's do), and
    the reply is our decoder's."""
    import transformers

    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.eval.runner import load_samples, prompt_ids

    out = tmp_path / "merged"
    assert main(["export", str(tuned / "run"), "--out", str(out), "--dtype", "float32"]) == 0
    tok = Tokenizer(out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, tok.end_of_turn]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    stopped = 0
    for sample in load_samples(chat_set(tmp_path / "held.jsonl", n=4, seed=5), None):
        ids, _ = prompt_ids(tok, sample, None)
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[
                0, len(ids) :
            ]
        stopped += int(new[-1]) == tok.end_of_turn and len(new) < 30
    assert stopped == 4


def test_a_base_model_stops_near_the_references_length(tmp_path, tiny_dir):
    """A base model never ends its turn: without --max-new-tokens its replies stop at twice the
    longest reference reply in tokens, at least 32 (they ran to 128), or at <end_of_turn> or
    <eos> before that: the eval's replies are our decoder's with that budget."""
    from gemma3_tune.data.template import stop_at_call
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.eval.runner import load_samples, prompt_ids, reply_budget
    from gemma3_tune.model import load_model
    from gemma3_tune.model.generate import generate_batch

    held = chat_set(tmp_path / "held.jsonl", n=6, seed=11)
    tok = Tokenizer(tiny_dir)
    samples = load_samples(held, None)
    budget = reply_budget(tok, samples, None)
    longest = max(len(tok.encode(s.reference)) for s in samples)
    assert budget == max(32, 2 * longest) and reply_budget(tok, samples, 7) == 7
    out = tmp_path / "eval"
    argv = ["eval", str(tiny_dir), "--data", str(held), "--out", str(out), "--dtype", "float32"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    model = load_model(tiny_dir, dtype=torch.float32).eval()
    prompts = [prompt_ids(tok, s, None)[0] for s in samples]
    with torch.no_grad():
        ids = generate_batch(model, prompts, max_new_tokens=budget, stop_ids=tok.stop_ids())
    assert max(len(x) for x in ids) == budget  # the random model runs to the budget
    for row, new in zip(rows, ids, strict=True):
        assert row["targets"][str(tiny_dir)]["reply"] == stop_at_call(tok.decode(new))
