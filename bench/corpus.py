"""An offline English corpus from what is installed here, written as pretraining shards.

    python bench/corpus.py --out /tmp/corpus          # ~40 MB of text, ~3 minutes on 2 busy cores

Sources, each document one file: the docstrings of every Python module of the running interpreter
(standard library and site-packages, read with `ast`, nothing imported), man pages (troff markup
stripped; not the Cloud SDK's generated ones) and the plain-text files under /usr/share/doc.
Identical texts are kept once, documents are shuffled with a fixed seed, and the shards come out as
phoenix (trainer/data.py) and nanochat (nanochat/dataset.py) both read them: `shard_NNNNN.parquet`,
one `text` column, row groups of 1,024 documents, the last shard the validation split. The same
machine gives the same shards. It exists so that a vocab-8192 tokenizer has real words to learn
(bench/vs_nanochat.py), which the generated demo shards have too few of.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MIN_CHARS = 400  # shorter documents are mostly signatures and one-liners, not prose
MAX_CHARS = 20_000  # one huge man page or changelog must not make up a shard on its own
ROW_GROUP_DOCS = 1024  # nanochat's loaders read a row group at a time, as on its real shards
MAN_SECTIONS = ("man1", "man3", "man5", "man7", "man8")


def python_docstrings(roots: list[Path]) -> Iterator[str]:
    """Per .py file under `roots`: its module, class and function docstrings, joined."""
    seen: set[Path] = set()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if path in seen:  # site-packages lies inside the standard library's folder
                continue
            seen.add(path)
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            docs = [ast.get_docstring(node) for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            yield "\n\n".join(doc for doc in docs if doc and len(doc) >= 80)


_TROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_TROFF_ESCAPE = re.compile(r"\\\\?(\(..|\[[^\]]*\]|[&|^%:{}]|s[-+]?\d+|n(\[[^\]]*\]|\(..|.)|\$\d)")
_TROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "TP", "IP", "Nm", "Nd", "Sh",
                      "It", "Ar", "Fl", "Pa", "Xr", "Em"}


def man_page_text(raw: str) -> str:
    """Plain text of a man page: comments and layout requests dropped, font escapes removed."""
    lines = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro not in _TROFF_TEXT_MACROS or not rest:
                continue
            line = rest.replace('"', "")
        line = _TROFF_FONT.sub("", line).replace("\\-", "-").replace("\\e", "\\")
        lines.append(_TROFF_ESCAPE.sub("", line))
    return "\n".join(lines)


def man_pages(man_dir: Path) -> Iterator[str]:
    for section in MAN_SECTIONS:
        for path in sorted((man_dir / section).glob("*")):
            # The Google Cloud SDK ships ~16,000 generated pages of near-identical boilerplate.
            if path.is_file() and not path.is_symlink() and not path.name.startswith("gcloud"):
                opener = gzip.open if path.suffix == ".gz" else open
                try:
                    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                        yield man_page_text(f.read())
                except (OSError, EOFError):
                    continue


def doc_files(doc_dir: Path) -> Iterator[str]:
    """README, copyright and other plain-text files of the installed Debian packages."""
    for path in sorted(doc_dir.rglob("*")):
        if not path.is_file() or path.is_symlink() or "changelog" in path.name.lower():
            continue  # changelogs are mostly version numbers and names
        if path.suffix == ".gz":
            opener = gzip.open
        elif path.suffix in ("", ".txt", ".md", ".rst") or path.name == "copyright":
            opener = open
        else:
            continue
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                yield f.read()
        except (OSError, EOFError, UnicodeDecodeError):
            continue


def documents() -> list[str]:
    """Every source's documents, long enough and each text once, in a fixed order."""
    python_roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    sources = [python_docstrings(python_roots), man_pages(Path("/usr/share/man")),
               doc_files(Path("/usr/share/doc"))]
    seen: set[bytes] = set()
    kept = []
    for source in sources:
        for text in source:
            text = text.strip()[:MAX_CHARS]
            digest = hashlib.sha256(text.encode()).digest()
            if len(text) >= MIN_CHARS and digest not in seen:
                seen.add(digest)
                kept.append(text)
    return kept


def write_shards(docs: list[str], out: Path, shard_chars: int, val_docs: int) -> list[Path]:
    """Train shards of about `shard_chars` each, then one validation shard of `val_docs` documents."""
    out.mkdir(parents=True, exist_ok=True)
    val, train = docs[:val_docs], docs[val_docs:]
    groups: list[list[str]] = [[]]
    size = 0
    for doc in train:
        if size >= shard_chars:
            groups.append([])
            size = 0
        groups[-1].append(doc)
        size += len(doc)
    paths = []
    for index, group in enumerate([*groups, val]):
        path = out / f"shard_{index:05d}.parquet"
        pq.write_table(pa.table({"text": group}), path, row_group_size=ROW_GROUP_DOCS)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for shard_NNNNN.parquet")
    parser.add_argument("--shard-chars", type=int, default=10_000_000)
    parser.add_argument("--val-docs", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = documents()
    random.Random(args.seed).shuffle(docs)  # mix the sources, so validation looks like training
    paths = write_shards(docs, args.out, args.shard_chars, args.val_docs)
    chars = sum(map(len, docs))
    print(f"documents={len(docs)} chars={chars} train_shards={len(paths) - 1} val_docs={args.val_docs} "
          f"out={args.out} python={sys.version.split()[0]}")


if __name__ == "__main__":
    main()
