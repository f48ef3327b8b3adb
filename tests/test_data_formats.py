"""The formats corpora come in (HTML, notebooks, CSV/TSV, Parquet, a `datasets` folder, gzip/zstd), exact-duplicate
removal, the summary (`fasttrain data`, the run directory), parser warnings, symlink loops, and bad input: each a
counted skip with its reason, never a crash."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_data import docs_of

from fasttrain.cli import main
from fasttrain.data import DataConfig, prepare, summary
from fasttrain.data.formats import ZSTD_MISSING
from fasttrain.data.tables import PYARROW_MISSING

HTML = """<!doctype html><html><head><title>Page title</title><style>body { color: red }</style>
<script>var hidden = "script text";</script></head>
<body><h1>Heading</h1><p>First &amp; <b>bold</b>
   paragraph.</p><!-- a comment --><pre>  keep
    indentation</pre><ul><li>one</li><li>two</li></ul><noscript>no script</noscript></body></html>"""
HTML_TEXT = "Page title\nHeading\nFirst & bold paragraph.\n  keep\n    indentation\none\ntwo"
NOTEBOOK = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {"kernelspec": {"name": "python3", "language": "python"}},
    "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Title\n", "Some *prose*."]},
        {"cell_type": "code", "metadata": {}, "source": "x = 1\nprint(x)", "outputs": [{"text": "1"}]},
        {"cell_type": "raw", "metadata": {}, "source": "raw cell, dropped"},
    ],
}
NOTEBOOK_TEXT = "# Title\nSome *prose*.\n\n```python\nx = 1\nprint(x)\n```\n"
ROWS = ["row one, with a comma", 'row "two"\nover two lines', "row three"]


def write_dataset(folder, column_values: dict) -> None:
    """A folder as `datasets.Dataset.save_to_disk` (datasets 5.2) writes it: the table as an Arrow IPC stream,
    state.json naming it, dataset_info.json with the features."""
    folder.mkdir(parents=True)
    table = pa.table(column_values)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    features = {name: {"dtype": "string", "_type": "Value"} for name in column_values}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))


@pytest.fixture
def formats_dir(tmp_path):
    root = tmp_path / "formats"
    root.mkdir()
    (root / "page.html").write_text(HTML)
    (root / "nb.ipynb").write_text(json.dumps(NOTEBOOK))
    with open(root / "table.csv", "w", newline="") as fh:
        fh.write('id,text\n1,"row one, with a comma"\n2,"row ""two""\nover two lines"\n3,\n')
    (root / "table.tsv").write_text("text\tid\nrow three\t3\n")
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"], "n": [1, 2, 3]}), root / "t.parquet")
    write_dataset(root / "saved" / "train", {"text": ["dataset row", "another dataset row"], "label": ["a", "b"]})
    (root / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (root / "plain.txt.gz").write_bytes(gzip.compress(b"gzip text\n"))
    records = b'{"text": "zstd record one"}\n{"text": "zstd record two"}\n'
    (root / "records.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(records))
    (root / "archive.tar.gz").write_bytes(gzip.compress(b"not a text format"))  # ignored: .tar is no format
    return root


def config(tmp_path, paths, **kw) -> DataConfig:
    kw.setdefault("num_workers", 1)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


def documents(corpus) -> list[str]:
    return docs_of(corpus, corpus.train)


def test_every_format_is_read_and_counted_per_format(tmp_path, formats_dir):
    corpus = prepare(config(tmp_path, [formats_dir]))
    # Sorted paths: nb.ipynb, page.html, plain.txt.gz, records.jsonl.zst, saved/train, t.parquet, table.csv/.tsv.
    assert documents(corpus) == [
        NOTEBOOK_TEXT,
        HTML_TEXT,
        "gzip text\n",
        "zstd record one",
        "zstd record two",
        "dataset row",
        "another dataset row",
        "parquet one",
        "parquet two",
        ROWS[0],
        ROWS[1],
        ROWS[2],
    ]
    row = corpus.manifest["sources"][str(formats_dir)]
    assert {f: (c["files"], c["documents"]) for f, c in row["formats"].items()} == {
        "notebook": (1, 1),
        "html": (1, 1),
        "text+gzip": (1, 1),
        "jsonl+zstd": (1, 2),
        "hf-dataset": (1, 2),
        "parquet": (1, 2),
        "csv": (2, 3),
    }
    assert row["ignored"] == 2 and row["skipped"] == {}  # archive.tar.gz, saved/dataset_dict.json
    table = corpus.summary()
    for fmt in row["formats"]:
        assert f"  {fmt} " in table
    assert "2 ignored" in table and "0 exact duplicates removed" in table


def test_the_text_column_is_configurable(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a", "b"], "text": ["x", "y"]}), path)
    write_dataset(tmp_path / "ds", {"content": ["c"]})
    corpus = prepare(config(tmp_path, [path, tmp_path / "ds"], text_column="content"))
    assert documents(corpus) == ["a", "b", "c"]


@pytest.mark.parametrize("dedup", [True, False])
def test_exact_duplicates_are_removed_and_counted(tmp_path, dedup):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.md").write_text("same text\n")
    (root / "b.txt").write_text("same text\n")  # another file, the same document
    (root / "c.txt").write_text("same text \n")  # differs by a space: kept
    (root / "r.jsonl").write_text('{"text": "rec"}\n{"text": "rec"}\n{"text": "same text\\n"}\n')
    for tokenizer in ("byte", "bpe"):  # BPE learns from the deduplicated documents too
        corpus = prepare(config(tmp_path, [root], dedup=dedup, tokenizer=tokenizer, vocab_size=270))
        row = corpus.manifest["sources"][str(root)]
        if dedup:
            assert documents(corpus) == ["same text\n", "same text \n", "rec"]
            assert row["duplicates"] == 3 and row["formats"]["jsonl"]["duplicates"] == 2
            assert "3 exact duplicates removed" in corpus.summary()
        else:
            assert len(documents(corpus)) == 6 and row["duplicates"] == 0
            assert "duplicates kept" in corpus.summary()


def test_bad_input_is_a_counted_skip_never_a_crash(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bomb.txt.gz").write_bytes(gzip.compress(b"\0" * 3_000_000))  # 3 MB from ~3 KB
    (bad / "bomb.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b" " * 3_000_000))
    numbers = gzip.compress(" ".join(str(i) for i in range(5000)).encode())
    (bad / "cut.txt.gz").write_bytes(numbers[: len(numbers) // 2])  # a download cut short
    pq.write_table(pa.table({"body": ["no text column here"]}), bad / "nocolumn.parquet")
    (bad / "broken.parquet").write_bytes(b"PAR1 not really")
    (bad / "notjson.ipynb").write_text("{ this is not json")
    (bad / "nocells.ipynb").write_text('{"metadata": {}}')
    (bad / "nocolumn.csv").write_text("a,b\n1,2\n")
    (bad / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    write_dataset(bad / "ds", {"body": ["x"]})
    write_dataset(bad / "ds_badstate", {"text": ["x"]})
    (bad / "ds_badstate" / "state.json").write_text("{not json")
    write_dataset(bad / "ds_noshard", {"text": ["x"]})
    (bad / "ds_noshard" / "data-00000-of-00001.arrow").unlink()
    cfg = config(tmp_path, [bad], max_decompressed_bytes=1_000_000)
    with pytest.raises(ValueError) as error:
        prepare(cfg)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith("DataConfig.paths: the corpus is empty: 11 files")
    reasons = {
        "1 corrupt gzip",
        "2 decompresses to over 1,000,000 bytes (DataConfig.max_decompressed_bytes)",
        "1 corrupt parquet",
        "3 table without the text column 'text' (DataConfig.text_column)",
        "1 notebook not JSON",
        "1 notebook without cells",
        "1 unreadable image",
        "1 corrupt datasets folder (state.json)",
        "1 datasets folder without a shard its state.json names",
    }
    for reason in reasons:
        assert reason in message, reason
    assert capsys.readouterr().err == ""

    (bad / "good.md").write_text("one good document\n")
    corpus = prepare(cfg)
    assert documents(corpus) == ["one good document\n"]
    assert sum(corpus.manifest["sources"][str(bad)]["skipped"].values()) == 12  # 11 files, 1 shard not there


def test_missing_optional_readers_are_skip_reasons(tmp_path, formats_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    corpus = prepare(config(tmp_path, [formats_dir]))
    skipped = corpus.manifest["sources"][str(formats_dir)]["skipped"]
    assert skipped == {PYARROW_MISSING: 2, ZSTD_MISSING: 1}


def test_symlink_loops_are_skipped_and_counted(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("inside\n")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a folder link back to the top
    (root / "x.txt").symlink_to(root / "y.txt")  # two file links pointing at each other
    (root / "y.txt").symlink_to(root / "x.txt")
    (root / "z.md").write_text("top\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.md").write_text("linked folder\n")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # followed
    corpus = prepare(config(tmp_path, [root]))
    assert documents(corpus) == ["linked folder\n", "inside\n", "top\n"]
    assert corpus.manifest["sources"][str(root)]["skipped"] == {"symlink loop": 3}
    assert "3 symlink loop" in corpus.summary()
    with pytest.raises(ValueError, match=r"DataConfig.paths: '.*x.txt' is a broken link or a symlink loop"):
        prepare(config(tmp_path, [root / "x.txt"]))


def test_fasttrain_data_prints_the_summary_and_names_why_a_corpus_is_empty(tmp_path, formats_dir, capsys):
    code = main(["data", str(formats_dir), "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    header = "source format files documents duplicates bytes tokens skipped (why)"
    assert out.splitlines()[0].split() == header.split()
    assert "hf-dataset" in out and "jsonl+zstd" in out and "built in" in out
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notjson.ipynb").write_text("nope")
    code = main(["data", str(tmp_path / "empty"), "--data.cache_dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "the corpus is empty" in err and "1 notebook not JSON" in err


def test_train_prints_the_summary_and_writes_it_to_the_run_directory(tmp_path, formats_dir, capsys):
    # A corpus shorter than one sequence: train stops right after preparing the data, with the summary that says
    # why already on screen and in the run directory (and no model built or trained).
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--train.out_dir", str(run), "--data.paths", str(formats_dir)]
    args += ["--model.max_seq_len", "512", "--train.seq_len", "512", "--data.val_fraction", "0"]
    assert main([*args, "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")]) == 2
    out, err = capsys.readouterr()
    assert "the training split has 283 tokens; train.seq_len 512" in err
    corpus = prepare(config(tmp_path, [formats_dir]))  # the shards train built
    built = summary.table(corpus.manifest, corpus.folder, reused=False)
    assert out.strip() == built and (run / "data_summary.txt").read_text().strip() == built
    saved = json.loads((run / "data_summary.json").read_text())
    assert saved["sources"] == corpus.manifest["sources"] and saved["folder"] == str(corpus.folder)
    assert sorted(os.listdir(run)) == [".lock", "data_summary.json", "data_summary.txt"]  # .lock: the run's lock
