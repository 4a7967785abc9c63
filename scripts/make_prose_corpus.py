"""Held-out English technical prose for measuring what 4-bit quantization costs a model.

QAT's benchmark (docs/qat-and-gguf.md) needs general text that no one here wrote and nothing
here trains on: the pages of vLLM 0.34.0's documentation (released 2026-11-16, long after Gemma
3's training data ends in August 2024), from the `docs/design/`, `docs/training/` and
`docs/features/` folders of its source distribution on PyPI (pinned by sha256), reduced to
prose: front matter, code blocks, tables, images, HTML and admonition markers removed, links
kept as their text. The first 40 pages (path order) with at least 2,500 characters of prose,
each cut at the last paragraph end within 2,000 characters (about 430 tokens), as raw text rows
`{"text"}` in data/prose/heldout.jsonl, and their paths in data/prose/SOURCES.txt.

    python scripts/make_prose_corpus.py            # downloads 51 MB once, into data/prose/
    python scripts/make_prose_corpus.py --validation   # 20 pages of other folders, to tune on

`--validation` writes validation.jsonl from `docs/configuration/`, `docs/deployment/`,
`docs/getting_started/` and `docs/models/` (no page of the held-out set), for choosing
settings without looking at the held-out pages.
    gemma3-tune eval MODEL --data data/prose/heldout.jsonl --metric loss [--backend llama.cpp]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

VERSION = "0.34.0"
SHA256 = "fcad848b246a9d8652b47e6425af92334dc02492f9802720f54e27b823cf0113"
FOLDERS = ("docs/design/", "docs/training/", "docs/features/")
VALIDATION = ("docs/configuration/", "docs/deployment/", "docs/getting_started/", "docs/models/")
DOCS, MIN_CHARS, MAX_CHARS = 40, 2500, 2000


def download(dest: Path) -> Path:
    """vLLM's sdist from the package index (once), checked against its pinned sha256."""
    path = dest / f"vllm-{VERSION}.tar.gz"
    if not path.is_file():
        index = f"https://pypi.org/pypi/vllm/{VERSION}/json"
        try:
            meta = json.load(urllib.request.urlopen(index, timeout=60))
        except Exception:  # some mirrors serve only the package's latest page
            index = "https://pypi.org/pypi/vllm/json"
            meta = json.load(urllib.request.urlopen(index, timeout=60))
        files = meta["releases"][VERSION] if "releases" in meta else meta["urls"]
        (url,) = [urljoin(index, f["url"]) for f in files if f["filename"] == path.name]
        print(f"downloading {url}", file=sys.stderr)
        data = urllib.request.urlopen(url, timeout=600).read()
        if hashlib.sha256(data).hexdigest() != SHA256:
            sys.exit(f"{url}: sha256 differs from the pinned {SHA256}")
        dest.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def prose(markdown: str) -> str:
    """The page's prose: paragraphs of text, headings as plain lines."""
    text = re.sub(r"\A---\n.*?\n---\n", "", markdown, flags=re.S)  # front matter
    text = re.sub(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", "", text, flags=re.S | re.M)  # code
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("|", "![", "<", "--8<--", "[TOC]")) or re.match(r"^[-=*_]{3,}$", s):
            continue
        s = re.sub(r"^(!!!|\?\?\?\+?)\s*\w+.*$", "", s)  # admonition markers
        s = re.sub(r"^#+\s*", "", s)
        s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", s)  # links and images: their text
        s = re.sub(r"\{[#.][^}]*\}", "", s)  # attribute lists
        out.append(s)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def cut(text: str) -> str:
    """At most MAX_CHARS, ending at a paragraph end."""
    if len(text) <= MAX_CHARS:
        return text
    end = text.rfind("\n\n", 0, MAX_CHARS)
    return text[: end if end > 0 else MAX_CHARS].strip()


def pages(
    sdist: Path, folders: tuple[str, ...] = FOLDERS, docs: int = DOCS
) -> list[tuple[str, str]]:
    root = f"vllm-{VERSION}/"
    found = []
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name.removeprefix(root)
            if m.isfile() and rel.endswith(".md") and rel.startswith(folders):
                if rel.endswith("README.md"):
                    continue
                body = prose(io.TextIOWrapper(tar.extractfile(m), encoding="utf-8").read())
                if len(body) >= MIN_CHARS:
                    found.append((rel, cut(body)))
    return sorted(found)[:docs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/prose", help="folder for heldout.jsonl")
    ap.add_argument("--validation", action="store_true", help="validation.jsonl instead")
    args = ap.parse_args()
    out = Path(args.out)
    folders, docs, name = (VALIDATION, 20, "validation") if args.validation else (FOLDERS, DOCS, "")
    chosen = pages(download(out), folders, docs)
    if len(chosen) < docs:
        sys.exit(f"only {len(chosen)} pages with {MIN_CHARS}+ characters of prose")
    with open(out / f"{name or 'heldout'}.jsonl", "w", encoding="utf-8") as f:
        for _, text in chosen:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    (out / f"{name.upper() + '_' if name else ''}SOURCES.txt").write_text(
        f"vLLM {VERSION} sdist, sha256 {SHA256}\n" + "".join(f"{rel}\n" for rel, _ in chosen)
    )
    chars = sum(len(t) for _, t in chosen)
    print(f"{out / (name or 'heldout')}.jsonl: {len(chosen)} pages, {chars:,} characters of prose")


if __name__ == "__main__":
    main()
