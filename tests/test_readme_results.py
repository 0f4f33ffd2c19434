"""The README's result tables are the scripts' own output: each block between the results markers equals the
file in docs/results/ that the script wrote (refresh with ``python examples/results.py`` after a full run)."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import results  # noqa: E402


def test_every_results_file_is_in_the_readme_verbatim():
    blocks = results.readme_blocks()
    written = sorted(p.name for p in results.RESULTS_DIR.glob("*.md") if not p.name.endswith(".quick.md"))
    assert sorted(blocks) == written
    for name, body in blocks.items():
        assert body == (results.RESULTS_DIR / name).read_text().rstrip("\n") + "\n", name


def test_splice_fills_a_marked_block_and_leaves_the_rest(tmp_path):
    name = sorted(p.name for p in results.RESULTS_DIR.glob("*.md") if not p.name.endswith(".quick.md"))[0]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- results/{name} -->\nstale\n<!-- end results/{name} -->\nafter\n")
    assert results.splice_readme(readme) == [name]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "stale" not in text
    assert results.readme_blocks(readme)[name] == (results.RESULTS_DIR / name).read_text().rstrip("\n") + "\n"
