"""Tool calling: FunctionGemma's format (Google's documented example as the reference), the
chat template we ship rendering the same text as training, the loss on calls and replies only,
bad tool data in one line, and generation stopping after a call."""

from __future__ import annotations

import copy
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from gemma3_tune.cli import main
from gemma3_tune.data.records import Record, SampleError
from gemma3_tune.data.sources import to_turns
from gemma3_tune.data.template import CHAT_TEMPLATE, IGNORE, render
from gemma3_tune.data.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Gets the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": 'The city and state, e.g. "San Francisco, CA" or "Tokyo, JP"',
                },
                "unit": {
                    "type": "string",
                    "description": "The unit to return the temperature in.",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        },
    },
}
DEV = "You are a model that can do function calling with the following functions"
QUESTION = "Hey, what's the weather in Tokyo right now?"
ANSWER = "The current weather in Tokyo is sunny with a temperature of 15 degrees Celsius."
CHAT = {
    "messages": [
        {"role": "developer", "content": DEV},
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_current_weather",
                        "arguments": json.dumps({"location": "Tokyo, Japan"}),
                    },
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": {"temperature": 15, "weather": "sunny"},
        },
        {"role": "assistant", "content": ANSWER},
    ],
    "tools": [WEATHER],
}
# Google's FunctionGemma documentation ("formatting and best practices"), its weather example's
# turns joined as one conversation, written out by hand here.
DECLARATION = (
    "<start_function_declaration>declaration:get_current_weather{description:<escape>Gets the"
    " current weather in a given location.<escape>,parameters:{properties:{location:{description:"
    '<escape>The city and state, e.g. "San Francisco, CA" or "Tokyo, JP"<escape>,type:<escape>'
    "STRING<escape>},unit:{description:<escape>The unit to return the temperature in.<escape>,"
    "enum:[<escape>celsius<escape>,<escape>fahrenheit<escape>],type:<escape>STRING<escape>}},"
    "required:[<escape>location<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration>"
)
CALL = "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}<end_function_call>"
RESPONSE = "response:get_current_weather{temperature:15,weather:<escape>sunny<escape>}<end_function_response>"
DOCUMENTED = (
    f"<bos><start_of_turn>developer\n{DEV}{DECLARATION}<end_of_turn>\n"
    f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n"
    f"<start_of_turn>model\n{CALL}<start_function_response>{RESPONSE}{ANSWER}<end_of_turn>\n"
)


def _turns(sample: dict):
    return to_turns(Record("d.jsonl:1", copy.deepcopy(sample)))


def _trained_text(tok: Tokenizer, s) -> str:
    return tok.decode([lab for lab in s.labels if lab != IGNORE], skip_special=False)


@pytest.fixture(scope="module")
def function_tokens_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny tokenizer with FunctionGemma's seven control tokens added (tokenizer.json only)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HF

    d = tmp_path_factory.mktemp("fg") / "model"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer.model").unlink()
    tk = HF.from_file(str(d / "tokenizer.json"))
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in Tokenizer.FUNCTION_TOKENS]
    )
    tk.save(str(d / "tokenizer.json"))
    return d


def test_documented_example_text_form_and_loss(tiny_dir):
    """The tiny tokenizer has no control tokens: the same strings as text. The ids are those of
    tokenizing Google's documented text whole; the loss covers the call, the
    `<start_function_response>` that ends it, the reply and its `<end_of_turn>`: nothing of the
    declarations, the question or the tool's result."""
    tok = Tokenizer(tiny_dir)
    assert "<start_function_call>" not in tok.ids
    s = render(_turns(CHAT), tok, None)
    assert s.input_ids == tok.encode(DOCUMENTED)
    assert _trained_text(tok, s) == f"{CALL}<start_function_response>{ANSWER}<end_of_turn>"


def test_documented_example_with_control_tokens(function_tokens_dir):
    """FunctionGemma's vocabulary: each control token is one id, where the text form is many."""
    tok = Tokenizer(function_tokens_dir)
    s = render(_turns(CHAT), tok, None)
    assert s.input_ids == tok.encode(DOCUMENTED)
    for name in Tokenizer.FUNCTION_TOKENS:
        assert s.input_ids.count(tok.ids[name]) == DOCUMENTED.count(name), name
    trained = [lab for lab in s.labels if lab != IGNORE]
    assert trained.count(tok.ids["<start_function_call>"]) == 1
    assert trained.count(tok.ids["<start_function_response>"]) == 1  # the stop, learned
    assert tok.ids["<end_function_response>"] not in trained  # the tool's, not learned
    assert tok.stop_ids() == {tok.end_of_turn, tok.eos_id, tok.ids["<start_function_response>"]}


@pytest.mark.slow
def test_real_tokenizer_equals_whole_string(real_270m):
    """Gemma 3 270M's vocabulary (no control tokens): the mask changes mid-text (call, result,
    reply) and the ids are still exactly those of tokenizing the whole text."""
    from tokenizers import Tokenizer as HF

    tok = Tokenizer(real_270m[1])
    hf = HF.from_file(str(real_270m[1] / "tokenizer.json"))
    s = render(_turns(CHAT), tok, None)
    assert s.input_ids == hf.encode(DOCUMENTED, add_special_tokens=False).ids
    assert _trained_text(tok, s) == f"{CALL}<start_function_response>{ANSWER}<end_of_turn>"


NESTED = {
    "name": "book",
    "description": "Book a table.",
    "parameters": {
        "type": "object",
        "properties": {
            "Zone": {"type": "string", "nullable": True},
            "guests": {"type": "integer", "description": "How many."},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "when": {
                "type": "object",
                "properties": {"day": {"type": "string"}, "hour": {"type": "number"}},
                "required": ["day"],
            },
        },
        "required": ["guests", "when"],
    },
}
TEMPLATE_CASES = {
    "weather": CHAT,
    "parallel_calls_string_results": {
        "messages": [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Weather in Oslo and book for 2 tomorrow?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "a",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": {"location": "Oslo"},
                        },
                    },
                    {
                        "id": "b",
                        "function": {
                            "name": "book",
                            "arguments": {
                                "guests": 2,
                                "when": {"day": "tomorrow", "hour": 19.5},
                                "tags": ["a"],
                                "Zone": None,
                                "ok": True,
                            },
                        },
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "b", "content": "booked, ref 7"},
            {"role": "tool", "tool_call_id": "a", "content": {"temp": -3.5, "sky": "snow"}},
            {"role": "assistant", "content": "Snow, -3.5. Booked (ref 7)."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "tools": [WEATHER, NESTED],
    },
    "ends_with_a_call": {
        "messages": [
            {"role": "user", "content": "Book for 4"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "function": {
                            "name": "book",
                            "arguments": {"guests": 4, "when": {"day": "mon"}},
                        }
                    }
                ],
            },
        ],
        "tools": [NESTED],
    },
    "no_tools_system_folded": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_shipped_chat_template_renders_what_training_renders(case, tiny_dir):
    """transformers' apply_chat_template with the template every export carries gives the text
    training tokenizes (arguments as objects, as vLLM passes them)."""
    from transformers import AutoTokenizer

    sample = TEMPLATE_CASES[case]
    tok = Tokenizer(tiny_dir)
    hf = AutoTokenizer.from_pretrained(str(tiny_dir))
    messages = copy.deepcopy(sample["messages"])
    for m in messages:  # vLLM hands the template OpenAI's JSON-string arguments as objects
        for c in m.get("tool_calls") or []:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    text = hf.apply_chat_template(
        messages, tools=sample.get("tools"), tokenize=False, chat_template=CHAT_TEMPLATE
    )
    assert render(_turns(sample), tok, None).input_ids == tok.encode(text), text
    if case == "ends_with_a_call":
        assert text.endswith("}<end_function_call><start_function_response>")
        again = hf.apply_chat_template(
            messages, tools=sample["tools"], tokenize=False, chat_template=CHAT_TEMPLATE,
            add_generation_prompt=True,
        )  # fmt: skip
        assert again == text  # waiting for the tool: no new model turn
    if case == "parallel_calls_string_results":
        assert "response:book{value:<escape>booked, ref 7<escape>}" in text
        assert "response:get_current_weather{sky:<escape>snow<escape>,temp:-3.5}" in text
        assert "call:book{Zone:null,guests:2,ok:true,tags:[<escape>a<escape>]," in text
        assert "Zone:{nullable:true,type:<escape>STRING<escape>}" in text


def test_only_the_first_response_token_is_learned(tiny_dir):
    """Parallel results: the model ends its calls with one <start_function_response>; the
    second one is the engine's, like the results themselves."""
    tok = Tokenizer(tiny_dir)
    s = render(_turns(TEMPLATE_CASES["parallel_calls_string_results"]), tok, None)
    trained = _trained_text(tok, s)
    assert trained.count("<start_function_response>") == 1
    assert "response:" not in trained and "Checking.<start_function_call>" in trained


def test_prepared_data_and_data_check(tmp_path, tiny_dir, capsys):
    """`data check` accepts OpenAI tool data (`tool` role, `content: null`) and shows the call
    among the trained tokens."""
    (tmp_path / "d.jsonl").write_text(json.dumps(CHAT) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {tiny_dir}\ndata:\n  train: {tmp_path / 'd.jsonl'}\n")
    assert main(["data", "check", str(recipe), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["samples"] == 1
    assert "[[<start_function_call>call:get_current_weather{location:<escape>Tokyo" in out


BAD = {
    "tool_without_call": (
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}],
        "a tool result must follow the assistant's tool_calls",
    ),
    "call_without_result": (
        [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "get_current_weather", "arguments": {}}}],
            },
            {"role": "user", "content": "b"},
        ],
        "need their results first",
    ),
    "undeclared": (
        [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "get_wether", "arguments": {}}}],
            },
        ],
        "calls 'get_wether', which 'tools' does not declare (get_current_weather)",
    ),
    "bad_arguments": (
        [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "get_current_weather", "arguments": "{loc"}}],
            },
        ],
        "message 1 tool call 0 (get_current_weather): arguments are not valid JSON",
    ),
    "unnamed_result": (
        [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"function": {"name": "get_current_weather", "arguments": {}}},
                    {"function": {"name": "get_current_weather", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "x"},
        ],
        "say which call it answers ('name' or 'tool_call_id')",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_data_one_line(case, tmp_path, tiny_dir, capsys):
    messages, reason = BAD[case]
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": messages, "tools": [WEATHER]}
    (tmp_path / "d.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {tiny_dir}\ndata:\n  train: {tmp_path / 'd.jsonl'}\n")
    assert main(["data", "check", str(recipe)]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert "d.jsonl:2: " in first and reason in first and "Traceback" not in first, first


def test_llama_factory_sharegpt_tools_equal_openai_form(tiny_dir):
    """LLaMA-Factory's function_call / observation turns and `tools` as a JSON string render
    exactly as the OpenAI form of the same conversation."""
    sharegpt = {
        "conversations": [
            {"from": "system", "value": DEV},
            {"from": "human", "value": QUESTION},
            {"from": "function_call", "value": json.dumps({"name": "get_current_weather", "arguments": {"location": "Tokyo, Japan"}})},
            {"from": "observation", "value": json.dumps({"temperature": 15, "weather": "sunny"})},
            {"from": "gpt", "value": ANSWER},
        ],
        "tools": json.dumps([WEATHER["function"]]),
    }  # fmt: skip
    openai = copy.deepcopy(CHAT)
    openai["messages"][3]["content"] = json.dumps({"temperature": 15, "weather": "sunny"})
    tok = Tokenizer(tiny_dir)
    assert (
        render(_turns(sharegpt), tok, None).input_ids == render(_turns(openai), tok, None).input_ids
    )


def test_generate_stops_after_a_call(tiny_dir, monkeypatch):
    """`generate` prints the call and stops at `<start_function_response>` (text form: the
    string, spread over several tokens, is held back and never printed); the decoder is not
    asked for more tokens."""
    from gemma3_tune.export import generate_cli

    tok = Tokenizer(tiny_dir)
    stream = tok.encode(CALL + "<start_function_response>response:hallucinated")
    asked = []

    def fake_reply(model, tok_, prompt, images, max_new_tokens, **kw):
        for t in stream:
            asked.append(t)
            yield t

    monkeypatch.setattr(generate_cli, "reply", fake_reply)
    args = SimpleNamespace(
        max_new_tokens=99, system=None, tools=[WEATHER], temperature=0.0, top_p=1.0, seed=None,
        no_cache=False,
    )  # fmt: skip
    out = io.StringIO()
    with redirect_stdout(out):
        shown = generate_cli._stream(None, tok, "q", [], args)
    assert shown == CALL and out.getvalue() == CALL + "\n"
    assert len(asked) < len(stream)  # stopped at the marker, not at the limit


def test_generate_prompt_and_eval_reference(tmp_path, tiny_dir):
    """The generation prompt carries the declarations as training renders them; eval scores a
    call turn against the call's text (what the model writes before handing over)."""
    from gemma3_tune.eval.runner import load_samples, prompt_ids
    from gemma3_tune.export.inference import chat_ids

    tok = Tokenizer(tiny_dir)
    model = SimpleNamespace(config=SimpleNamespace(is_multimodal=False))
    ids, _ = chat_ids(tok, model, QUESTION, system=DEV, tools=[WEATHER])
    prompt = DOCUMENTED.split("<start_of_turn>model\n")[0] + "<start_of_turn>model\n"
    assert ids[0].tolist() == tok.encode(prompt)

    call_only = copy.deepcopy(CHAT)
    call_only["messages"] = call_only["messages"][:3]
    (tmp_path / "e.jsonl").write_text(json.dumps(call_only) + "\n")
    [sample] = load_samples(tmp_path / "e.jsonl", None)
    assert sample.reference == CALL
    assert prompt_ids(tok, sample, None)[0] == tok.encode(prompt)


def test_tool_sample_errors_name_the_line():
    with pytest.raises(SampleError, match=r"^d.jsonl:1: tools: each tool must be"):
        _turns({"messages": CHAT["messages"], "tools": [{"type": "function"}]})
