"""Every Python code block of the README and every script of examples/ runs."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Scripts with a test of their own elsewhere: examples/ddp.py needs torchrun
# (tests/distributed/test_example.py).
_TESTED_ELSEWHERE = {"ddp.py"}
_NEEDS = {"lightning_recipe.py": "lightning"}


def _readme_blocks() -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        line = text[: match.start()].count("\n") + 1
        blocks.append((line, match.group(1)))
    return blocks


def _scripts() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").glob("*.py") if p.name not in _TESTED_ELSEWHERE)


def test_the_readme_has_python_examples():
    assert len(_readme_blocks()) >= 8


@pytest.mark.parametrize(
    "line, code", _readme_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    if "lightning" in code:
        pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    torch.manual_seed(0)
    if "torch.compile" in code:
        import torch._functorch.config as functorch_config

        torch._dynamo.reset()
        with functorch_config.patch(donated_buffer=functorch_config.donated_buffer):  # restored
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        torch._dynamo.reset()
        return
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_example_script_runs(script, tmp_path, monkeypatch, capsys):
    if script.name in _NEEDS:
        pytest.importorskip(_NEEDS[script.name])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out.strip()  # each script reports what it did
