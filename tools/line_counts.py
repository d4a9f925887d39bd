"""Count code, docstring and comment lines of lorafast/ (the library with its kernels, not tests).

    python tools/line_counts.py [folder ...]

A line belongs to a docstring when it lies inside a string literal that stands alone as a statement
(module, class or function docstrings and bare strings); comments are lines whose first token is ``#``;
blank lines are not counted.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDERS = ("lorafast",)


def count_file(path: Path) -> dict[str, int]:
    """``{"code": n, "docstring": n, "comment": n}`` lines of one Python file."""
    source = path.read_text(encoding="utf-8")
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            doc_lines.update(range(node.lineno, node.end_lineno + 1))
    comment_lines: set[int] = set()
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comment_lines.add(token.start[0])
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    code_lines -= doc_lines
    return {
        "code": len(code_lines),
        "docstring": len(doc_lines),
        "comment": len(comment_lines - code_lines - doc_lines),
    }


def main(folders: list[str]) -> None:
    totals = {"code": 0, "docstring": 0, "comment": 0}
    print(f"{'file':<40} {'code':>6} {'docstring':>9} {'comment':>7}")
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            counts = count_file(path)
            for key, value in counts.items():
                totals[key] += value
            name = str(path.relative_to(ROOT))
            print(f"{name:<40} {counts['code']:>6} {counts['docstring']:>9} {counts['comment']:>7}")
    share = totals["docstring"] / max(1, sum(totals.values()))
    print(f"{'total':<40} {totals['code']:>6} {totals['docstring']:>9} {totals['comment']:>7}")
    print(f"docstrings: {share:.1%} of counted lines")


if __name__ == "__main__":
    main(sys.argv[1:] or list(DEFAULT_FOLDERS))
