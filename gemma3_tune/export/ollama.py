"""An Ollama Modelfile beside a GGUF export (`export --format gguf --ollama`).

Ollama's Modelfile syntax (docs/modelfile.md in ollama/ollama): `FROM` names the weights (a
second `FROM` the vision projector, as Ollama's own LLaVA-style imports do), `TEMPLATE` a Go
template over `.Messages`, `PARAMETER stop` a stop string. The template is Ollama's own for
Gemma 3: a system message is folded into the user turn (Gemma has no system role), each turn is
`<start_of_turn>ROLE\n...<end_of_turn>\n`, and the prompt ends `<start_of_turn>model\n`, as
our chat template renders it; generation stops at `<end_of_turn>`. `ollama create NAME -f
Modelfile` imports it.
"""

from __future__ import annotations

from pathlib import Path

from ..outputs import write_atomic

MODELFILE = "Modelfile"

GEMMA3_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def modelfile_text(gguf: Path, mmproj: Path | None) -> str:
    """Paths are relative to the Modelfile (they sit beside it), as `ollama create` resolves."""
    lines = [f"FROM ./{gguf.name}"]
    if mmproj is not None:
        lines.append(f"FROM ./{mmproj.name}")
    lines += [
        f'TEMPLATE """{GEMMA3_TEMPLATE}"""',
        'PARAMETER stop "<end_of_turn>"',
        "PARAMETER temperature 0",  # greedy, as our generate and eval decode
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf: Path, mmproj: Path | None) -> None:
    write_atomic(path, modelfile_text(gguf, mmproj))
