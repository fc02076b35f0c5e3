"""The examples of docs/howto/corpus.md run and print what the page shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

HOWTO = Path(__file__).resolve().parents[2] / "docs" / "howto" / "corpus.md"
DOC_FOLDER = "../shared/corpus/arxiv-sample"


def test_howto_examples_run_and_match_the_page(arxiv_sample: Path, mixtral_tokenizer) -> None:
    page = HOWTO.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    # from_hub needs the network: that one line is checked by the error tests instead.
    code = "\n".join(
        line for block in blocks for line in block.splitlines() if "from_hub(" not in line
    ).replace(repr(DOC_FOLDER).replace("'", '"'), repr(str(arxiv_sample)))
    # `value  # expected` lines: the comment is the value the page promises.
    checks = []
    lines = []
    for line in code.splitlines():
        m = re.match(r"^([\w.]+)\s+# (.*)$", line)
        if m and "=" not in line.split("#")[0]:
            checks.append((m.group(1), m.group(2)))
        lines.append(line)
    out = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        exec(compile("\n".join(lines), str(HOWTO), "exec"), namespace)
    for expr, expected in checks:
        assert repr(eval(expr, namespace)) == expected, expr
    shown = re.search(r"```text\n(corpus .*?)```", page, flags=re.S)
    assert shown is not None
    printed = out.getvalue().replace(str(arxiv_sample), DOC_FOLDER)
    assert printed.strip() == shown.group(1).strip()
