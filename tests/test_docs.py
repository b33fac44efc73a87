"""Docs against their sources: every timing the README and the CHANGELOG quote is in bench/RESULTS.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = (ROOT / "bench" / "RESULTS.md").read_text()

# "22 ms", "~180 ms", "13.8–15.8 ms", "165–205 ms": a number or an en-dash range before "ms".
_FIGURE = re.compile(r"(?<![\w.–-])(\d+(?:\.\d+)?(?:–\d+(?:\.\d+)?)?)\s?ms\b")
_DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def _in_results(figure: str) -> bool:
    """The figure, exactly as written, stands in RESULTS.md (not as part of a longer number):
    a range anywhere (tables give ranges with the unit once: "7.2–8.5 and 7.4–8.9 ms"), a
    single number as "N ms"."""
    unit = "" if "–" in figure else r"\s?ms\b"
    return re.search(r"(?<![\d.–])" + re.escape(figure) + r"(?![\d–]|\.\d)" + unit, RESULTS) is not None


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if _FIGURE.search(p)]


DOCS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.md")
              if p.name != "RESULTS.md" and not p.relative_to(ROOT).parts[0].startswith("."))


def test_the_docs_checked_quote_timings() -> None:
    quoting = [d for d in DOCS if _FIGURE.search((ROOT / d).read_text())]
    assert {"README.md", "CHANGELOG.md", "contrib/README.md"} <= set(quoting), quoting


@pytest.mark.parametrize("doc", DOCS)
def test_every_quoted_timing_is_a_figure_of_bench_results(doc: str) -> None:
    """Was: the README said a prolog takes ~22 ms and the Performance section 14–16 ms,
    neither of which RESULTS.md measured; the fallback "165–205 ms" against up to 222.3 ms."""
    figures = [m.group(1) for m in _FIGURE.finditer((ROOT / doc).read_text())]
    assert [f for f in figures if not _in_results(f)] == []


def test_readme_timings_name_their_source_date_and_machine() -> None:
    """A paragraph of the README that quotes a timing names bench/RESULTS.md, the date of a run
    recorded there, and the machine (a 2-vCPU VM)."""
    for para in _paragraphs((ROOT / "README.md").read_text()):
        dates = _DATE.findall(para)
        assert "bench/RESULTS.md" in para, para
        assert dates and all(d in RESULTS for d in dates), para
        assert "2-vCPU VM" in para, para
