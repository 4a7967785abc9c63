"""Gemma 3's chat template, rendered straight to token ids with a loss mask.

    <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n

- the system message is folded into the first user turn (Gemma has no system role);
- message text is stripped of surrounding whitespace, as in Gemma's own template;
- an image becomes `\n\n<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>\n\n`
  (N = mm_tokens_per_image); with Pan & Scan, the image with its crops becomes
  `Here is the original image {block} and here are some crops to help you see better {block} {block}`;
- a conversation with tools opens with a `developer` turn holding the system text and the
  declarations, and a model turn holds its calls and their results, in FunctionGemma's format
  (`data/tools.py`);
- the loss covers each assistant reply and its `<end_of_turn>` (train_on="assistant"), only the
  last reply ("last"), or every text token ("all"); never image tokens, tool results or `<bos>`.

Text is tokenized in runs between special tokens, and a run is split where the loss mask
changes after `model\n`. Because replies are stripped, this gives exactly the tokens of
tokenizing the whole rendered string. Inside a model turn with tools the mask also changes
mid-text (call, result, reply); there the text is tokenized as one piece and each token takes
the label of the text it starts in, so the tokens are still those of the whole string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import tools as fc
from .tokenizer import Tokenizer

IGNORE = -100
TrainOn = Literal["assistant", "last", "all"]


@dataclass
class Turn:
    role: Literal["system", "user", "assistant"]
    # text, an image; a system turn may hold Tools; an assistant turn ToolCalls and ToolResults
    parts: list[str | ImageRef | Tools | ToolCall | ToolResult]


@dataclass
class ImageRef:
    path: str  # resolved path
    views: int = 1  # 1 + Pan & Scan crops


@dataclass
class Tools:
    """The functions a conversation may call: OpenAI-style schemas (`data/tools.py`)."""

    declarations: list[dict]


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ToolResult:
    name: str  # the function that produced it
    result: object  # JSON value, or a string (a string holding a JSON object renders as one)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no loss
    images: list[ImageRef] = field(default_factory=list)
    origin: str = ""  # "file:line", for error messages and reports
    split: int = 0  # a preference pair: where its second document (prompt + rejected) starts
    window: int = 0  # a raw text document's window, from 1 (documents.py); 0: not raw text

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class VisionTokens:
    """What the template needs to know about the model's image tokens."""

    image_token_id: int
    boi_id: int
    eoi_id: int
    tokens_per_image: int


PAN_SCAN_INTRO = "Here is the original image "
PAN_SCAN_MIDDLE = " and here are some crops to help you see better "


def has_images(turns: list[Turn]) -> bool:
    return any(isinstance(p, ImageRef) for t in turns for p in t.parts)


class _Writer:
    """Token ids and labels as a conversation is rendered. Text waits in `pending`, as groups of
    (text, trained) pieces, each group tokenized as one text when a special token comes."""

    def __init__(self, tok: Tokenizer, vision: VisionTokens | None):
        self.tok, self.vision = tok, vision
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.images: list[ImageRef] = []
        self.pending: list[list[tuple[str, bool]]] = []

    def flush(self) -> None:
        for group in self.pending:
            _tokenize_group(group, self.tok, self.ids, self.labels)
        self.pending.clear()

    def special(self, token_id: int, trained: bool) -> None:
        self.flush()
        self.ids.append(token_id)
        self.labels.append(token_id if trained else IGNORE)

    def text(self, s: str, trained: bool, joined: bool = False) -> None:
        """Append text; `joined`: tokenize it together with the text before it."""
        pending = self.pending
        if pending and pending[-1][-1][1] == trained:
            pending[-1][-1] = (pending[-1][-1][0] + s, trained)
        elif pending and joined:
            pending[-1].append((s, trained))
        else:
            pending.append([(s, trained)])

    def image_block(self, trained: bool) -> None:
        vision = self.vision
        assert vision is not None
        self.text("\n\n", trained)
        self.special(vision.boi_id, trained)
        self.flush()
        self.ids.extend([vision.image_token_id] * vision.tokens_per_image)
        self.labels.extend([IGNORE] * vision.tokens_per_image)
        self.special(vision.eoi_id, trained)
        self.text("\n\n", trained)

    def image(self, part: ImageRef, trained: bool) -> None:
        """One image block, or with Pan & Scan the original and its crops, introduced."""
        if self.vision is None:
            raise ValueError("an image was given to a text-only model")
        self.images.append(part)
        if part.views == 1:
            self.image_block(trained)
            return
        self.text(PAN_SCAN_INTRO, trained)
        self.image_block(trained)
        self.text(PAN_SCAN_MIDDLE, trained)
        for k in range(part.views - 1):
            if k:
                self.text(" ", trained)
            self.image_block(trained)


def render(
    turns: list[Turn], tok: Tokenizer, vision: VisionTokens | None, train_on: TrainOn = "assistant"
) -> Sample:
    """Turns (already validated: optional system first, then user/assistant alternating)."""
    out = _Writer(tok, vision)
    out.special(tok.bos_id, False)
    system, declarations = "", None
    body = turns
    if turns and turns[0].role == "system":
        system = "".join(p for p in turns[0].parts if isinstance(p, str)).strip()
        declarations = next((p for p in turns[0].parts if isinstance(p, Tools)), None)
        body = turns[1:]
    everything = train_on == "all"
    if declarations is not None:  # FunctionGemma: system text and tools in a developer turn
        _developer_turn(out, system, declarations, everything)
        system = ""
    last_reply = max((i for i, t in enumerate(body) if t.role == "assistant"), default=-1)
    for i, turn in enumerate(body):
        is_reply = turn.role == "assistant"
        trained = everything or (is_reply and (train_on == "assistant" or i == last_reply))
        out.special(tok.start_of_turn, False)
        out.text(("model" if is_reply else "user") + "\n", everything)
        if i == 0 and system:
            out.text(system + "\n\n", everything)
        _turn_parts(out, turn.parts, trained, everything)
    out.flush()
    return Sample(out.ids, out.labels, out.images)


def _developer_turn(out: _Writer, system: str, declarations: Tools, everything: bool) -> None:
    """FunctionGemma's opening turn: the system text, then each tool's declaration."""
    out.special(out.tok.start_of_turn, False)
    out.text("developer\n" + system, everything)
    for tool in declarations.declarations:
        out.text(fc.declaration(tool), everything)
    out.special(out.tok.end_of_turn, everything)
    out.text("\n", everything)


def _turn_parts(out: _Writer, parts: list, trained: bool, everything: bool) -> None:
    """A turn's text, images, calls and results, then its end: `<end_of_turn>`, or nothing
    when it hands over to a tool (a call awaiting its result) or ends on a result."""
    prev = None
    for part in parts:
        if isinstance(part, str):
            out.text(part.strip(), trained, joined=prev is not None)
        elif isinstance(part, ToolCall):
            out.text(fc.call_text(part.name, part.arguments), trained, joined=True)
        elif isinstance(part, ToolResult):
            # The model ends its calls with <start_function_response>; the rest is the tool's.
            out.text(fc.START_RESP, trained if isinstance(prev, ToolCall) else everything, True)
            out.text(fc.response_body(part.name, part.result), everything, joined=True)
        else:
            out.image(part, trained)
        prev = part if not isinstance(part, str) or part.strip() else prev
    if isinstance(prev, ToolCall):  # the conversation ends waiting for the tool
        out.text(fc.START_RESP, trained, joined=True)
    elif not isinstance(prev, ToolResult):
        out.special(out.tok.end_of_turn, trained)
        out.text("\n", everything)


def _tokenize_group(
    group: list[tuple[str, bool]], tok: Tokenizer, ids: list[int], labels: list[int]
) -> None:
    """Tokenize (text, trained) pieces that must be tokenized as one text: each token is
    trained when the text it starts in is. A lone piece is simply tokenized."""
    if len(group) == 1:
        piece = tok.encode(group[0][0])
        ids.extend(piece)
        labels.extend(piece if group[0][1] else [IGNORE] * len(piece))
        return
    whole = "".join(t for t, _ in group)
    spans = tok.encode_spans(whole)
    if spans is None:  # a tokenizer whose pieces do not spell the text: piece by piece
        for t, trained in group:
            _tokenize_group([(t, trained)], tok, ids, labels)
        return
    starts, at = [], 0  # byte offset where each piece starts
    for t, _ in group:
        starts.append(at)
        at += len(t.encode("utf-8"))
    begin, k = 0, 0
    for i, end in zip(*spans, strict=True):
        while k + 1 < len(group) and begin >= starts[k + 1]:
            k += 1
        ids.append(i)
        labels.append(i if group[k][1] else IGNORE)
        begin = end


def generation_prompt(
    turns: list[Turn], tok: Tokenizer, vision: VisionTokens | None
) -> tuple[list[int], list[ImageRef]]:
    """The prompt ids for a reply to `turns` (ending in a user turn): as training renders the
    conversation, then `<start_of_turn>model\\n`."""
    s = render(turns, tok, vision)
    return s.input_ids + [tok.start_of_turn] + tok.encode("model\n"), s.images


def reference_text(turn: Turn) -> str:
    """What a model generates for an assistant turn before it stops: its text and calls, up to
    the first tool result (where FunctionGemma's format hands over to the tool)."""
    out = []
    for part in turn.parts:
        if isinstance(part, ToolResult):
            break
        if isinstance(part, str):
            out.append(part.strip())
        elif isinstance(part, ToolCall):
            out.append(fc.call_text(part.name, part.arguments))
    return "".join(out)


def stop_at_call(text: str) -> str:
    """A generated reply cut where it hands over to a tool (`<start_function_response>`)."""
    return text.split(fc.START_RESP, 1)[0]


# Gemma 3's chat template (what the -it checkpoints ship), for folders that lack one, with
# FunctionGemma's tool format added: `tools`, assistant `tool_calls` (arguments as objects, as
# vLLM passes them) and `tool` messages render as `render` renders them (tests check it).
CHAT_TEMPLATE = """\
{%- macro fc_value(v) -%}
{%- if v is string -%}<escape>{{ v }}<escape>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is none -%}null
{%- elif v is mapping -%}{ {%- for k, x in v | dictsort(true) -%}{{ ',' if not loop.first }}{{ k }}:{{ fc_value(x) }}{%- endfor -%} }
{%- elif v is iterable -%}[ {%- for x in v -%}{{ ',' if not loop.first }}{{ fc_value(x) }}{%- endfor -%} ]
{%- else -%}{{ v | tojson }}
{%- endif -%}
{%- endmacro -%}
{%- macro fc_schema(p) -%}
{%- set kind = (p['type'] | default('') | string | upper) -%}
{%- set f = namespace(s='') -%}
{%- if p['description'] -%}{%- set f.s = f.s + ',description:<escape>' + p['description'] + '<escape>' -%}{%- endif -%}
{%- if kind == 'STRING' and p['enum'] -%}{%- set f.s = f.s + ',enum:' + fc_value(p['enum']) -%}{%- endif -%}
{%- if kind == 'ARRAY' and p['items'] is mapping and p['items'] -%}{%- set f.s = f.s + ',items:{' + fc_schema(p['items']) + '}' -%}{%- endif -%}
{%- if p['nullable'] -%}{%- set f.s = f.s + ',nullable:true' -%}{%- endif -%}
{%- if kind == 'OBJECT' and p['properties'] is mapping -%}
{%- set f.s = f.s + ',properties:{' + fc_properties(p['properties']) + '}' -%}
{%- if p['required'] -%}{%- set f.s = f.s + ',required:' + fc_value(p['required']) -%}{%- endif -%}
{%- endif -%}
{%- if kind -%}{%- set f.s = f.s + ',type:<escape>' + kind + '<escape>' -%}{%- endif -%}
{{ f.s[1:] }}
{%- endmacro -%}
{%- macro fc_properties(props) -%}
{%- for k, x in props | dictsort(true) -%}{{ ',' if not loop.first }}{{ k }}:{ {{- fc_schema(x if x is mapping else {}) -}} }{%- endfor -%}
{%- endmacro -%}
{%- macro fc_declaration(tool) -%}
{%- set fn = tool['function'] if tool['function'] is defined else tool -%}
{%- set params = fn['parameters'] -%}
<start_function_declaration>declaration:{{ fn['name'] }}{description:<escape>{{ fn['description'] | default('', true) }}<escape>
{%- if params -%}
{%- set p = namespace(s='') -%}
{%- if params['properties'] is mapping and params['properties'] -%}{%- set p.s = p.s + ',properties:{' + fc_properties(params['properties']) + '}' -%}{%- endif -%}
{%- if params['required'] -%}{%- set p.s = p.s + ',required:' + fc_value(params['required']) -%}{%- endif -%}
{%- if params['type'] -%}{%- set p.s = p.s + ',type:<escape>' + (params['type'] | string | upper) + '<escape>' -%}{%- endif -%}
,parameters:{ {{- p.s[1:] -}} }
{%- endif -%}
}<end_function_declaration>
{%- endmacro -%}
{%- macro content_text(c) -%}
{%- if c is string -%}{{ c | trim }}
{%- elif c is iterable -%}
{%- for item in c -%}
{%- if item['type'] == 'image' -%}<start_of_image>
{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(prefix='', prev=none, calls=[]) -%}
{%- set loop_messages = messages -%}
{%- set system = '' -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- set system = content_text(messages[0]['content']) -%}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
{{- '<start_of_turn>developer\\n' + system -}}
{%- for tool in tools -%}{{- fc_declaration(tool) -}}{%- endfor -%}
{{- '<end_of_turn>\\n' -}}
{%- elif system -%}
{%- set ns.prefix = system + '\\n\\n' -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] == 'tool' -%}
{%- set ns_name = namespace(name=message['name'] | default('', true)) -%}
{%- if not ns_name.name -%}
{%- for c in ns.calls -%}
{%- if (c['id'] | default(none)) == (message['tool_call_id'] | default(none)) or ns.calls | length == 1 -%}
{%- set ns_name.name = (c['function'] if c['function'] is defined else c)['name'] -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- set result = message['content'] -%}
{{- '<start_function_response>response:' + ns_name.name + '{' -}}
{%- if result is mapping -%}
{%- for k, x in result | dictsort(true) -%}{{ ',' if not loop.first }}{{ k }}:{{ fc_value(x) }}{%- endfor -%}
{%- else -%}value:{{ fc_value(result) }}
{%- endif -%}
{{- '}<end_function_response>' -}}
{%- set ns.prev = 'result' -%}
{%- else -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- if not (role == 'model' and ns.prev == 'result') -%}
{{- '<start_of_turn>' + role + '\\n' + (ns.prefix if loop.first else '') -}}
{%- endif -%}
{{- content_text(message['content']) -}}
{%- if message['tool_calls'] -%}
{%- set ns.calls = message['tool_calls'] -%}
{%- for call in message['tool_calls'] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{{- '<start_function_call>call:' + fn['name'] + '{' -}}
{%- if fn['arguments'] is mapping -%}
{%- for k, x in fn['arguments'] | dictsort(true) -%}{{ ',' if not loop.first }}{{ k }}:{{ fc_value(x) }}{%- endfor -%}
{%- endif -%}
{{- '}<end_function_call>' -}}
{%- endfor -%}
{%- if loop.last -%}{{- '<start_function_response>' -}}{%- endif -%}
{%- set ns.prev = 'call' -%}
{%- else -%}
{{- '<end_of_turn>\\n' -}}
{%- set ns.prev = 'text' -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.prev not in ['call', 'result'] -%}
{{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""


def ensure_chat_template(folder: Path) -> None:
    """Give a model folder Gemma 3's chat template the way published checkpoints carry it:
    `chat_template.jinja` (transformers 5, vLLM) and `chat_template` in tokenizer_config.json
    (older readers). A template the folder already has is kept, and written to both places."""
    cfg_file, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    template = cfg.get("chat_template") or (jinja.read_text() if jinja.is_file() else CHAT_TEMPLATE)
    if not jinja.is_file():
        jinja.write_text(template)
    if cfg_file.is_file() and not cfg.get("chat_template"):
        cfg["chat_template"] = template
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if (folder / "config.json").is_file():
        ensure_stop_tokens(folder)


def ensure_stop_tokens(folder: Path) -> None:
    """A model folder stops where the template ends a turn, as Google's checkpoints do: the
    EOS ids of generation_config.json (what vLLM and transformers' `generate` stop on) and of
    config.json are [<eos>, <end_of_turn>] (1 and 106 in Gemma's vocabulary). With `<eos>`
    alone, a fine-tune served by vLLM ran on past its reply to max_tokens."""
    tok = Tokenizer(folder)
    stops = [tok.eos_id, tok.end_of_turn]
    gen_file, cfg_file = folder / "generation_config.json", folder / "config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen.update(bos_token_id=tok.bos_id, eos_token_id=stops, pad_token_id=tok.pad_id)
    gen_file.write_text(json.dumps(gen, indent=2) + "\n")
    cfg = json.loads(cfg_file.read_text())
    for section in (cfg, cfg.get("text_config")):
        if isinstance(section, dict) and "eos_token_id" in section:
            section["eos_token_id"] = stops
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
