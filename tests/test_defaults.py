"""docs/defaults.md: every documented default is the code's default (Network/fit, the CLI, the estimators)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "defaults.md"


def _rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| setting") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_table_covers_the_settings():
    rows = _rows()
    assert len(rows) >= 15 and all(len(r) == 5 for r in rows)
    differ = [r for r in rows if r[1] and r[2] and r[3] and not r[4]]
    assert [r[0] for r in differ] == ["dropout"]  # every other row states why the three differ


def test_network_and_fit_defaults():
    from fastmlp import Network, training

    params = {**inspect.signature(Network.__init__).parameters, **inspect.signature(training.fit).parameters}
    checked = 0
    for row in _rows():
        for span in _spans(row[1]):
            if "=" in span:
                key, value = span.split("=", 1)
                assert params[key].default == ast.literal_eval(value), (row[0], span)
                checked += 1
    assert checked >= 12


def test_cli_defaults():
    from fastmlp.cli import build_parser

    args = build_parser().parse_args(["train"])
    checked = 0
    for row in _rows():
        for span in _spans(row[2]):
            opt, value = span.split(" ", 1)
            got = getattr(args, opt.lstrip("-").replace("-", "_"))
            got = " ".join(map(str, got)) if isinstance(got, list) else str(got)
            assert got == value, (row[0], span, got)
            checked += 1
    assert checked >= 11


def test_estimator_defaults():
    sk = pytest.importorskip("fastmlp.sklearn")
    params = sk.MLPClassifier().get_params()
    checked = 0
    for row in _rows():
        for span in _spans(row[3]):
            key, value = span.split("=", 1)
            assert params[key] == ast.literal_eval(value), (row[0], span, params[key])
            checked += 1
    assert checked >= 9
