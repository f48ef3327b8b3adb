"""The docs: tools/bench_tables.py's formatting and vocabulary, README's headline and docs/benchmarks.md equal to what
the committed results give, links that resolve, and README's test set-up equal to CI's."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "tools" / "bench_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_tables = _tool()


def _result(bench, rows, **meta):
    return {
        "benchmark": bench,
        "device": "NVIDIA H200",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "cuda": "13.0",
        "git_commit": "0123456789abcdef0123+dirty",
        "date": "2026-12-04T18:03:47+00:00",
        "rows": rows,
        **meta,
    }


def test_numbers_format_as_counts_dimensions_and_measurements():
    fmt = bench_tables._fmt
    assert [
        fmt(1_068_863_488, "params"),
        fmt(1_062_016, "params"),
        fmt(139_686_912, "params"),
        fmt(128_256, "V"),
        fmt(50_257, "V"),
        fmt(2.5e-3, "ms"),
        fmt(4243.9, "GB/s"),
        fmt(0.0493, "%copy"),
        fmt(None, "note"),
        fmt(True, "causal"),
    ] == ["1,069M", "1.06M", "140M", "128,256", "50257", "0.0025", "4,244", "0.0493", "", "True"]


def test_rows_are_renamed_into_one_vocabulary():
    row = {"impl": "sdpa_static", "GBs": 2.5, "pct_copy": 80.0, "x_sdpa": 1.0, "params_M": 123.587328, "peak_MB": 9.0}
    assert bench_tables.normalize(row) == {
        "impl": "SDPA, static cache",
        "GB/s": 2.5,
        "%copy": 80.0,
        "x SDPA": 1.0,
        "params": 123587328,
        "peak MiB": 9.0,
    }
    assert bench_tables.normalize({"variant": "eager-sdpa", "step_ms": 3.0}) == {
        "impl": "torch eager + SDPA",
        "ms": 3.0,
    }
    for spec in bench_tables.TABLES:  # every column a vocabulary name or a dimension, none a raw JSON key
        outside = [c for c in spec.columns if c not in bench_tables.VOCABULARY and c not in bench_tables.LABELS]
        assert not outside and not set(spec.columns) & set(bench_tables.KEYS), (spec.bench, outside)


def test_a_table_says_where_and_when_and_adds_x_compile_per_shape():
    rows = [
        {"N": 8, "impl": "torch eager", "ms": 4.0, "GB/s": 1.0},
        {"N": 8, "impl": "fasttrain", "ms": 1.0, "GB/s": 4.0},
        {"N": 8, "impl": "torch.compile", "ms": 2.0, "GB/s": 2.0},
        {"N": 16, "impl": "fasttrain", "ms": 3.0, "GB/s": 4.0},  # no compiled row at this shape
    ]
    spec = bench_tables.Table("norms", "Norms", ["N", "impl", "ms", "GB/s", "x compile", "peak GiB"])
    lines = bench_tables.table(_result("norms", rows), spec)
    assert lines[0] == (
        "**Norms**: NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0, commit 0123456789ab+dirty, 2026-12-04"
    )
    assert lines[2] == "| N | impl | ms | GB/s | x compile |"  # peak GiB: no row has it
    assert lines[4:8] == [
        "| 8 | torch eager | 4 | 1 | 0.5 |",
        "| 8 | fasttrain | 1 | 4 | 2 |",
        "| 8 | torch.compile | 2 | 2 | 1 |",
        "| 16 | fasttrain | 3 | 4 |  |",
    ]


def test_headline_compares_with_the_fastest_stock_baseline_and_marks_each_miss():
    rows = [
        {"op": "layer_norm", "impl": "torch eager", "ms": 0.2},
        {"op": "layer_norm", "impl": "torch.compile", "ms": 0.5},
        {"op": "layer_norm", "impl": "fasttrain", "ms": 0.4},
        {"op": "rms_norm", "impl": "torch eager", "ms": 0.9},
        {"op": "rms_norm", "impl": "torch.compile", "ms": 0.6},
        {"op": "rms_norm", "impl": "fasttrain", "ms": 0.3},
    ]
    results = {"norms": _result("norms", rows)}
    heads = [
        bench_tables.Headline("LayerNorm", "norms", {"op": "layer_norm"}, "s"),
        bench_tables.Headline("RMSNorm", "norms", {"op": "rms_norm"}, "s"),
        bench_tables.Headline("RMSNorm, eager", "norms", {"op": "rms_norm"}, "s", stock=("torch eager",)),
    ]
    old = bench_tables.HEADLINE
    try:
        bench_tables.HEADLINE = heads
        got = bench_tables.headline_rows(results)
    finally:
        bench_tables.HEADLINE = old
    assert got == [
        ["LayerNorm", "s", "0.4", "torch eager", "0.2", "0.500 (miss)"],
        ["RMSNorm", "s", "0.3", "torch.compile", "0.6", "2.00"],
        ["RMSNorm, eager", "s", "0.3", "torch eager", "0.9", "3.00"],
    ]


def test_headline_refuses_a_row_the_results_do_not_have():
    results = {"norms": _result("norms", [{"op": "layer_norm", "impl": "torch eager", "ms": 0.2}])}
    old = bench_tables.HEADLINE
    try:
        bench_tables.HEADLINE = [bench_tables.Headline("LayerNorm", "norms", {"op": "layer_norm"}, "s")]
        with pytest.raises(ValueError, match="LayerNorm.*0 fasttrain rows"):
            bench_tables.headline_rows(results)
    finally:
        bench_tables.HEADLINE = old


def test_replace_block_keeps_the_text_around_the_markers():
    markers = ("<!-- a -->", "<!-- b -->")
    assert bench_tables.replace_block("x\n<!-- a -->\nold\n<!-- b -->\ny", markers, "new") == (
        "x\n<!-- a -->\nnew\n<!-- b -->\ny"
    )
    with pytest.raises(ValueError, match="expected one"):
        bench_tables.replace_block("no markers", markers, "new")


@pytest.mark.parametrize("target", bench_tables.TARGETS, ids=lambda t: t[0].name)
def test_generated_blocks_equal_what_the_committed_results_give(target):
    path, markers, make = target
    text = path.read_text()
    assert bench_tables.replace_block(text, markers, make()) == text, (
        f"{path.relative_to(ROOT)} is out of date with benchmarks/results: run python tools/bench_tables.py"
    )


def test_the_headline_leads_with_the_step_against_eager_sdpa_then_torch_compile():
    rows = bench_tables.headline_rows(bench_tables.load(bench_tables.RESULTS / bench_tables.HEADLINE_DEVICE))
    assert [r[3] for r in rows[:2]] == ["torch eager + SDPA", "torch.compile"]
    assert all(r[5].endswith("(miss)") == (float(r[5].split()[0]) < 1) for r in rows)


def _docs():
    return [ROOT / "README.md", ROOT / "benchmarks" / "NOTES.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = re.sub(r"`[^`\n]*`", "", doc.read_text())  # code spans: `kernel[grid](...)` is no link
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link and not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_test_command_installs_exactly_as_ci_does():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install = ci[ci.index(next(line for line in ci if line.startswith("# --- README: set-up for the tests"))) + 1]
    commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert any(install in c and c.endswith("&& pytest") for c in commands), install
    assert any(c.endswith("&& fasttrain train") for c in commands)
