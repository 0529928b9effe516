"""MkDocs hooks: the pages that are generated from the code, so they cannot drift from it.

- ``<!-- env-keywords -->`` becomes the env's keyword table, built from :class:`dialogue_gym.config.EnvConfig`
  (its fields, types, defaults and the docstring's descriptions).
- ``<!-- docstring PATH -->`` becomes the module docstring of the file ``PATH`` (relative to the repository
  root; read with :mod:`ast`, nothing is imported), e.g. an agent's run commands, references and deviations.
- The measurement pages under ``benchmarks/results/`` (Markdown and their plots) join the site as ``results/``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files: Files, config: Any) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File(f"results/{path.name}", str(RESULTS.parent), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if "<!-- env-keywords -->" in markdown:
        markdown = markdown.replace("<!-- env-keywords -->", env_keyword_table())
    return re.sub(r"<!-- docstring (\S+) -->", lambda m: module_docstring(m.group(1)), markdown)


def env_keyword_table() -> str:
    """The keyword table of ``gym.make("MultiTurnDialogue-v0", ...)`` as Markdown."""
    from dialogue_gym.config import field_table

    lines = ["| keyword | type | default | meaning |", "|---|---|---|---|"]
    for row in field_table():
        doc = row.doc.replace("|", "\\|")
        lines.append(f"| `{row.name}` | `{row.type}` | `{row.default}` | {doc} |")
    return "\n".join(lines)


def module_docstring(relpath: str) -> str:
    """The docstring of a module file, as a text block (its layout is kept)."""
    path = ROOT / relpath
    if not path.is_file():
        raise FileNotFoundError(f"docs: <!-- docstring {relpath} --> names no file")
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        raise ValueError(f"docs: {relpath} has no module docstring")
    return f"From `{relpath}`:\n\n```text\n{doc}\n```"
