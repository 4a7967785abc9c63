"""Raw text and prompt-completion rows (issue 40): a raw text document becomes windows that
cover every token exactly once (with or without overlap), each its own document in a packed
row; prompt-completion rows give TRL's SFTTrainer's tokens and completion mask; bad rows are
refused in one line naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainutil import chat_set, refused_in_one_line, write_recipe

from gemma3_tune.data.documents import prompt_completion, text_windows
from gemma3_tune.data.records import Record
from gemma3_tune.data.template import IGNORE
from gemma3_tune.data.tokenizer import Tokenizer

TEXT = (
    "Continued pretraining adapts a model to the text of a domain. The windows of a long"
    " document follow each other; none of its tokens is lost and none is trained twice. "
) * 6


@pytest.mark.parametrize("overlap", [0, 1, 7])
def test_windows_cover_every_token_once(tiny_dir, overlap):
    tok = Tokenizer(tiny_dir)
    doc = tok.encode(TEXT) + [tok.eos_id]  # what follows <bos>
    windows = text_windows(Record("t.jsonl:1", {"text": TEXT}), tok, 40, overlap)
    assert len(windows) > 3 and [w.window for w in windows] == list(range(1, len(windows) + 1))
    targets = []
    for k, w in enumerate(windows):
        assert len(w) <= 40 and w.input_ids[0] == tok.bos_id and w.labels[0] == IGNORE
        start = k * (39 - overlap)  # where the window's text starts in the document
        assert w.input_ids[1:] == doc[start : start + 39]
        context = overlap if k else 0  # the repeated tokens are context only
        assert w.labels[1 : 1 + context] == [IGNORE] * context
        targets += [t for t in w.labels if t != IGNORE]
    assert targets == doc  # every token a target, once, in order


def _prepared(tmp_path: Path, tiny_dir: Path, **over):
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.run_data import load_data

    data = tmp_path / "text.jsonl"
    rows = [{"text": TEXT}, {"text": "A short note."}, {"text": TEXT[:300]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
                          data__max_seq_len=64, **over)  # fmt: skip
    return load_data(load_recipe(recipe))


def test_packed_windows_are_documents_apart(tmp_path, tiny_dir):
    """In the packed rows each window restarts its positions, and the model's logits on a
    packed row equal each window's logits computed alone: windows and documents never see
    each other."""
    from gemma3_tune.data.collate import concat_row
    from gemma3_tune.model.checkpoint import load_model

    tok, _, data = _prepared(tmp_path, tiny_dir, data__text_overlap=4)
    r = data.report
    assert r.text_documents == 3 and r.text_windows == r.samples > 3
    model = load_model(tiny_dir).eval()
    packed = [row for row in data.train_rows if len(row) > 1]
    assert packed
    for row in packed[:3]:
        whole = concat_row(row)
        ids, pos = torch.tensor([whole["input_ids"]]), torch.tensor([whole["position_ids"]])
        with torch.no_grad():
            logits = model(ids, position_ids=pos).logits[0]
        at = 0
        for sample in row:
            n = len(sample)
            assert whole["position_ids"][at : at + n] == list(range(n))
            with torch.no_grad():
                alone = model(torch.tensor([sample.input_ids])).logits[0]
            torch.testing.assert_close(logits[at : at + n], alone, atol=1e-5, rtol=0)
            at += n


def test_data_check_shows_windows_and_each_sources_share(tmp_path, tiny_dir, capsys):
    from gemma3_tune.cli import main

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": TEXT}) + "\n")
    chats = chat_set(tmp_path / "chat.jsonl", n=4)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, text, tmp_path / "run",
                          data__max_seq_len=64)  # fmt: skip
    over = f"data.train=[{{path: {text}}}, {{path: {chats}, weight: 2}}]"
    capsys.readouterr()
    assert main(["data", "check", str(recipe), over, "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    n = len(text_windows(Record("x", {"text": TEXT}), Tokenizer(tiny_dir), 64, 0))
    assert summary["text_documents"] == 1 and summary["text_windows"] == n
    shares = summary["sources"]
    assert [s["samples"] for s in shares] == [n, 8]  # the chats twice (weight 2)
    assert sum(s["trainable_tokens"] for s in shares) == summary["trainable_tokens"]
    assert abs(sum(s["share"] for s in shares) - 1) < 1e-3
    assert f"1 documents in {n} windows" in out and "share of trained tokens" in out


ROWS = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "Translate to French: cat ->", "completion": " chat"},
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "completion": [{"role": "assistant", "content": "Blue."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "completion": [{"role": "assistant", "content": "Hello! How can I help?"}]},
]  # fmt: skip


def test_prompt_completion_equals_trls_sft_tokenization(real_270m, tiny_dir, tmp_path):
    """TRL 1.16's SFTTrainer (completion_only_loss, its default) on the same rows with the real
    Gemma 3 tokenizer: the same input_ids and the same labelled positions; and a raw text row
    as TRL's language-modelling row."""
    import datasets
    import transformers
    import trl

    hf_dir = real_270m[1]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_length=None,
                         report_to=[])  # fmt: skip
    tok = Tokenizer(hf_dir)
    for row in ROWS:  # one dataset per row: TRL reads a dataset as all strings or all messages
        trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf_tok,
                                 train_dataset=datasets.Dataset.from_list([row]))  # fmt: skip
        want = trainer.train_dataset[0]
        ours = prompt_completion(Record("pc.jsonl:1", row), tok, None, {})
        assert ours.input_ids == want["input_ids"], row
        assert ours.labels == want["labels"], row
    # TRL's language-modelling rows: the same tokens, every one a target (TRL labels position 0
    # too, which no position predicts: the model's shift drops it on both sides)
    row = {"text": "Raw text for continued pretraining, trained on every token."}
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf_tok,
                             train_dataset=datasets.Dataset.from_list([row]))  # fmt: skip
    want = trainer.train_dataset[0]
    (ours,) = text_windows(Record("t.jsonl:1", row), tok, 2048, 0)
    assert ours.input_ids == want["input_ids"]
    assert ours.labels[1:] == want.get("labels", want["input_ids"])[1:]


def _refused(tmp_path, tiny_dir, capsys, rows, *needles, **over):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over)
    refused_in_one_line(capsys, ["train", str(r)], f"{data}:", *needles)


def test_an_empty_text_is_refused(tmp_path, tiny_dir, capsys):
    _refused(tmp_path, tiny_dir, capsys, [{"text": "  "}], "'text' is empty")


def test_text_and_messages_in_one_row_are_refused(tmp_path, tiny_dir, capsys):
    rows = [{"text": "x", "messages": [{"role": "user", "content": "hi"}]}]
    _refused(tmp_path, tiny_dir, capsys, rows, "both 'text' and 'messages'")


def test_text_with_dpo_is_refused(tmp_path, tiny_dir, capsys):
    _refused(tmp_path, tiny_dir, capsys, [{"text": "x"}], "'text' row", "not a preference pair",
             objective="dpo")  # fmt: skip


def test_text_with_grpo_is_refused(tmp_path, tiny_dir, capsys):
    _refused(tmp_path, tiny_dir, capsys, [{"text": "x"}], "raw text", "only objective sft",
             objective="grpo", rl__rewards=["json_valid"], rl__max_completion_length=8)  # fmt: skip


def test_an_overlap_without_room_is_refused(tmp_path, tiny_dir, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
                     data__max_seq_len=32, data__text_overlap=31)  # fmt: skip
    refused_in_one_line(capsys, ["train", str(r)], "data.text_overlap 31", "at most 30")


def test_txt_files_and_folders_are_documents(tmp_path, tiny_dir):
    from gemma3_tune.data.sources import read_records

    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "b" / "c.txt").write_text("second document")
    (folder / "notes.md").write_text("not read")
    records = list(read_records(folder))
    assert [r.data for r in records] == [{"text": "first document"}, {"text": "second document"}]
    assert records[1].origin == str(folder / "b" / "c.txt")
    assert [r.data for r in read_records(folder / "a.txt")] == [{"text": "first document"}]


def test_eval_loss_scores_text_windows_and_completions(tmp_path, tiny_dir, capsys):
    """`eval --metric loss` on raw text and prompt-completion rows: the summed cross-entropy
    over every window's tokens and every completion's tokens, over their count, equals a
    log-softmax of the model's full logits (not the chunked loss eval uses)."""
    from gemma3_tune.cli import main
    from gemma3_tune.data.documents import record_documents
    from gemma3_tune.eval.loss import Windows
    from gemma3_tune.model.checkpoint import load_model

    rows = [{"text": TEXT}, ROWS[0], ROWS[2], {"text": "One more short document."}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    argv = ["eval", str(tiny_dir), "--data", str(data), "--metric", "loss", "--json",
            "--max-seq-len", "48", "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scores"][str(tiny_dir)]
    tok, model = Tokenizer(tiny_dir), load_model(tiny_dir).eval()
    total, n = 0.0, 0
    for i, row in enumerate(rows):
        for doc in record_documents(Record(f"x:{i}", row), tok, None, {}, Windows(48)):
            with torch.no_grad():
                logits = model(torch.tensor([doc.input_ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1)
            for t, label in enumerate(doc.labels[1:]):
                if label != IGNORE:
                    total, n = total - float(logp[t, label]), n + 1
    assert n > 100 and got == pytest.approx(total / n, rel=1e-5)


def test_the_eval_split_keeps_a_documents_windows_together(tmp_path, tiny_dir):
    tok, _, data = _prepared(tmp_path, tiny_dir, data__eval_split=0.3)
    train = {s.origin for row in data.train_rows for s in row}
    held = {s.origin for row in data.eval_rows for s in row}
    assert train and held and not train & held
