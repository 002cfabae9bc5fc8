"""Build the bundled sample corpus: the Python standard library's own docstrings, in RedPajama's jsonl schema.

The smoke run must train on real English text with no network, so the corpus is made from material every
Python installation carries: each stdlib module becomes one document (its module docstring, then the
docstrings of its public classes, functions and methods, in source order). Docstrings are read with `ast`, never
by importing the modules (some stdlib imports have side effects). The output is deterministic for a given
Python version (sorted modules, gzip mtime 0), so rebuilding on the same version reproduces the file byte
for byte. Text is under the PSF licence; see train/samples/README.md.

    .venv/bin/python scripts/make_stdlib_corpus.py [--out train/samples/python_stdlib_docs.jsonl.gz]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import platform
import sysconfig
from pathlib import Path

SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}
MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self==value." style boilerplate
MIN_DOCUMENT_CHARS = 400
MAX_COMPRESSED_BYTES = 1_000_000


def module_name(stdlib: Path, file: Path) -> str:
    parts = list(file.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    names = [arg.arg for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return ", ".join(name for name in names if name not in ("self", "cls"))


def module_document(name: str, source: str) -> str:
    """One document: the module's docstring, then its public classes', functions' and methods' docstrings."""
    tree = ast.parse(source)
    sections = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        sections.append(f"{name}\n\n{module_doc}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                sections.append(f"{name}.{node.name}({_signature(node)})\n\n{doc}")
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                sections.append(f"class {name}.{node.name}\n\n{doc}")
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(member.name):
                    member_doc = ast.get_docstring(member)
                    if member_doc and len(member_doc) >= MIN_DOCSTRING_CHARS:
                        signature = _signature(member)
                        sections.append(f"{name}.{node.name}.{member.name}({signature})\n\n{member_doc}")
    return "\n\n".join(sections)


def build_records(stdlib: Path) -> list[dict]:
    version = platform.python_version()
    records = []
    for file in sorted(stdlib.rglob("*.py")):
        if SKIP_PARTS.intersection(file.relative_to(stdlib).parts):
            continue
        try:
            source = file.read_text(encoding="utf-8")
            text = module_document(module_name(stdlib, file), source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a handful of stdlib files are deliberately invalid or not UTF-8
        if len(text) < MIN_DOCUMENT_CHARS:
            continue
        records.append({
            "text": text,
            "meta": {
                "redpajama_set_name": "PythonStdlibDocstrings",
                "source": f"CPython {version} Lib/{file.relative_to(stdlib).as_posix()}",
                "license": "PSF-2.0",
            },
        })
    return records


def write_jsonl_gz(records: list[dict], out: Path) -> int:
    """Write deterministically (gzip mtime 0, no file name in the header); returns the compressed size."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("train/samples/python_stdlib_docs.jsonl.gz"))
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = build_records(stdlib)
    # Keep the bundled file small: drop the longest documents first until it fits (they are few and huge).
    records.sort(key=lambda record: record["meta"]["source"])
    size = write_jsonl_gz(records, args.out)
    while size > MAX_COMPRESSED_BYTES:
        longest = max(range(len(records)), key=lambda i: len(records[i]["text"]))
        records.pop(longest)
        size = write_jsonl_gz(records, args.out)
    chars = sum(len(record["text"]) for record in records)
    print(f"{args.out}: {len(records)} documents, {chars / 1e6:.2f} M characters, {size / 1e3:.0f} KB compressed")


if __name__ == "__main__":
    main()
