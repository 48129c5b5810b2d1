"""The README's Python example runs as written (on tiny models standing in for the real pair)."""

import re
from pathlib import Path

import pandas as pd

from piggyback_interp.testing import save_tiny_model

README = Path(__file__).parents[1] / "README.md"


def test_ten_line_example_runs(tmp_path):
    text = README.read_text()
    section = text[text.index("## Ten lines") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    base = save_tiny_model(tmp_path / "base", seed=0)
    finetuned = save_tiny_model(tmp_path / "ft", seed=1)
    code = code.replace('"smollm2-135m-instruct"', repr(str(base))).replace(
        '"runs/abstain-sft/model"', repr(str(finetuned))
    )
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    frame = scope["frame"]
    assert isinstance(frame, pd.DataFrame) and set(frame["segment"]) == {"prefix"}
    assert len(scope["gens"].texts) == 1
