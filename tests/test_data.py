"""fasttrain.data sources and shards: every source type, skipping, the default corpus, BPE and tokenizer.json,
shard reuse and invalidation, the split, 1 vs 2 workers, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest

import fasttrain.data.parallel as parallel
import fasttrain.data.shards as shards
from fasttrain.benchmarks.bench_data import write_pdf
from fasttrain.data import DataConfig, prepare, tokenizer_from_config
from fasttrain.data.sources import SourceFile

TEXTS = {
    "notes.md": "# Notes\n\nMarkdown *is* text: ünïcødé ✓.\n",
    "readme.txt": "Plain text, read as one document.\n",
    "src/model.py": "def f(x):\n    return x * 2  # code keeps its indentation\n",
    "src/lib.rs": 'fn main() { println!("rust"); }\n',
}
JSONL_RECORDS = ["first jsonl record", 'second one, with "quotes"']
PDF_TEXT = "Hello from a generated PDF"


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_RECORDS)]
    (root / "records.jsonl").write_text("\n".join(lines[:1] + ["{not json"] + lines[1:]) + "\n")
    write_pdf(root / "paper.pdf", PDF_TEXT)
    # a header and 300 bytes of noise with no "%": random noise may hold part of an EOF marker, which changes pypdf's
    # warning ("seems truncated" for "not found")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\n" + bytes((i * 89 + 7) % 256 for i in range(300)).replace(b"%", b"."))
    (root / "blob.txt").write_bytes(b"\x00\x01\x02binary\xff\xfe" * 50)
    (root / "image.png").write_bytes(b"\x89PNG\r\n")
    (root / "dangling.md").symlink_to(root / "no-such-file")
    return root


def docs_of(corpus, tokens) -> list[str]:
    """The documents packed in `tokens`, each followed by end-of-text."""
    ids = np.asarray(tokens).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == corpus.tokenizer.eot_id:
            docs.append(corpus.tokenizer.decode(ids[start:i]))
            start = i + 1
    assert start == len(ids), "the stream must end with end-of-text"
    return docs


def config(tmp_path, paths, **kw) -> DataConfig:
    kw.setdefault("num_workers", 1)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


def test_every_source_type_is_read_and_bad_files_are_counted(tmp_path, corpus_dir):
    corpus = prepare(config(tmp_path, [corpus_dir]))
    docs = docs_of(corpus, corpus.train)
    # Sorted relative paths: notes.md, paper.pdf, readme.txt, records.jsonl, src/lib.rs, src/model.py.
    assert docs[0] == TEXTS["notes.md"]
    assert docs[1].strip() == PDF_TEXT
    assert docs[2:] == [TEXTS["readme.txt"], *JSONL_RECORDS, TEXTS["src/lib.rs"], TEXTS["src/model.py"]]
    row = corpus.manifest["sources"][str(corpus_dir)]
    assert row["skipped"] == {
        "corrupt pdf": 1,
        "binary or not UTF-8": 1,
        "jsonl line not JSON": 1,
        "unreadable image": 1,  # image.png: a PNG signature and nothing else
    }
    assert row["ignored"] == 1  # dangling.md
    assert row["warnings"] == {"pypdf: EOF marker not found": 1}  # counted, not printed
    assert row["formats"]["pdf"] == {
        "files": 2,
        "documents": 1,
        "duplicates": 0,
        "bytes": len(docs[1].encode()),
        "tokens": len(docs[1].encode()) + 1,
        "skipped": {"corrupt pdf": 1},
    }
    assert row["documents"] == 7 and row["tokens"] == len(corpus.train)
    assert row["bytes"] == sum(len(d.encode()) for d in docs)
    summary = corpus.summary()
    assert "1 corrupt pdf" in summary and "1 binary or not UTF-8" in summary and f"{row['tokens']:,}" in summary
    assert corpus.train.dtype == np.uint16 and corpus.tokenizer.vocab_size == 257


def test_pdfs_are_skipped_and_counted_with_one_note_when_pypdf_is_missing(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # `import pypdf` now raises ImportError
    monkeypatch.setattr(shards, "_noted_pypdf", False)
    with pytest.warns(UserWarning, match=r"2 PDF files skipped: pypdf is not installed"):
        corpus = prepare(config(tmp_path, [corpus_dir]))
    assert (
        corpus.manifest["sources"][str(corpus_dir)]["skipped"]["pdf (pypdf not installed: pip install fasttrain[pdf])"]
        == 2
    )
    assert PDF_TEXT not in corpus.tokenizer.decode(corpus.train.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note is given once per process
        prepare(config(tmp_path / "again", [corpus_dir]))


def test_default_corpus_is_the_stdlib_capped_by_max_bytes(tmp_path):
    corpus = prepare(DataConfig(max_bytes=150_000, cache_dir=str(tmp_path), num_workers=1, val_fraction=0.1))
    row = corpus.manifest["sources"]["stdlib"]
    assert row["bytes"] <= 150_000 and row["bytes"] > 140_000  # the last file is cut at a character boundary
    assert all(f["path"].endswith(".py") and "site-packages" not in f["path"] for f in corpus.manifest["files"])
    text = corpus.tokenizer.decode(corpus.train[:50_000].tolist())
    assert "def " in text and "import " in text
    assert len(corpus.val) > 0


def test_include_and_exclude_globs(tmp_path, corpus_dir):
    corpus = prepare(config(tmp_path, [corpus_dir], include=["*.md", "src/*"], exclude=["**/*.rs"]))
    assert docs_of(corpus, corpus.train) == [TEXTS["notes.md"], TEXTS["src/model.py"]]
    code_only = prepare(config(tmp_path, [corpus_dir], include=["src/**"], code_extensions=[".rs"]))
    assert docs_of(code_only, code_only.train) == [TEXTS["src/lib.rs"]]
    assert code_only.manifest["sources"][str(corpus_dir)]["ignored"] == 1  # model.py is not code any more


def test_jsonl_field_is_configurable_and_a_wrong_one_is_an_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"message {i}", "n": i}) for i in range(3)) + "\n")
    corpus = prepare(config(tmp_path, [path], jsonl_field="content"))
    assert docs_of(corpus, corpus.train) == ["message 0", "message 1", "message 2"]
    with pytest.raises(ValueError, match=r"jsonl_field 'text' is in no record .*'content', 'n'"):
        prepare(config(tmp_path, [path]))


def test_bpe_is_trained_saved_and_round_trips(tmp_path, corpus_dir):
    for i in range(20):
        (corpus_dir / f"more/{i:02d}.py").parent.mkdir(exist_ok=True)
        (corpus_dir / f"more/{i:02d}.py").write_text(f"def function_{i}(value):\n    return value + {i}\n" * 5)
    corpus = prepare(config(tmp_path, [corpus_dir], tokenizer="bpe", vocab_size=320, val_fraction=0.2))
    tok = corpus.tokenizer
    assert corpus.tokenizer_file is not None and corpus.tokenizer_file.parent == corpus.folder
    assert tok.vocab_size == 320 and tok.name == "bpe-320"
    sample = "def function_7(value):\n\treturn value + 7  # ünïcødé ✓ 🚀\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    code = "def function_7(value):\n    return value + 7\n"
    assert len(tok.encode(code)) < len(code) / 3  # merges learned from the repeated code
    assert max(corpus.train) < tok.vocab_size and (corpus.train == tok.eot_id).sum() > 0
    rebuilt = tokenizer_from_config(json.loads(json.dumps(tok.to_config())))  # as a checkpoint stores it
    assert rebuilt.encode(sample) == ids and rebuilt.eot_id == tok.eot_id and rebuilt.vocab_size == tok.vocab_size
    as_bytes = prepare(config(tmp_path, [corpus_dir]))  # every document decodes back to its source text
    assert sorted(docs_of(corpus, corpus.train) + docs_of(corpus, corpus.val)) == sorted(
        docs_of(as_bytes, as_bytes.train)
    )


def test_a_local_tokenizer_json_gets_end_of_text_and_can_need_uint32(tmp_path, corpus_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["plain", "text", "read", "as", "one", "document"] + [f"w{i}" for i in range(70_000)]
    hf = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    corpus = prepare(config(tmp_path, [corpus_dir / "readme.txt"], tokenizer=str(path)))
    tok = corpus.tokenizer
    assert tok.eot_id == len(words) + 1 and tok.vocab_size == len(words) + 2  # <|endoftext|> added after the words
    assert corpus.train.dtype == np.uint32
    assert corpus.train.tolist() == tok.encode("Plain text, read as one document.") + [tok.eot_id]
    assert tokenizer_from_config(tok.to_config()).encode("as one w69999") == [4, 5, 70_006]
    copy = tmp_path / "elsewhere" / "tokenizer.json"  # the same tokenizer under another path: same shards
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert prepare(config(tmp_path, [corpus_dir / "readme.txt"], tokenizer=str(copy))).reused


def test_shards_are_reused_and_rebuilt_when_corpus_or_tokenizer_change(tmp_path, corpus_dir):
    cfg = config(tmp_path, [corpus_dir])
    first = prepare(cfg)
    again = prepare(cfg)
    assert not first.reused and again.reused and again.folder == first.folder
    assert np.array_equal(again.train, first.train)

    (corpus_dir / "readme.txt").write_text("Changed text of another length.\n")
    changed = prepare(cfg)
    assert not changed.reused and changed.folder != first.folder
    assert "Changed text of another length.\n" in docs_of(changed, changed.train)

    same_size = "Changed text of ANOTHER length.\n"  # same size: the mtime tells
    (corpus_dir / "readme.txt").write_text(same_size)
    os.utime(corpus_dir / "readme.txt", ns=(1, 1))
    assert same_size in docs_of(prepare(cfg), prepare(cfg).train)

    bpe = prepare(config(tmp_path, [corpus_dir], tokenizer="bpe", vocab_size=280))
    assert not bpe.reused and bpe.folder != changed.folder

    # A killed build (no manifest, a stale temp file) or a shard cut short is never trusted.
    current = prepare(cfg)
    (current.folder / "manifest.json").unlink()
    (current.folder / "train.bin.tmp999").write_bytes(b"half")
    rebuilt = prepare(cfg)
    assert not rebuilt.reused and rebuilt.folder == current.folder and np.array_equal(rebuilt.train, current.train)
    assert not list(current.folder.glob("*.tmp*"))
    with open(current.folder / "train.bin", "r+b") as fh:
        fh.truncate(10)
    rebuilt = prepare(cfg)
    assert not rebuilt.reused and np.array_equal(rebuilt.train, current.train)


def test_split_is_by_document_disjoint_and_seeded(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(200):
        (root / f"{i:03d}.txt").write_text(f"document number {i}\n")
    cfg = config(tmp_path, [root], val_fraction=0.25, seed=3)
    corpus = prepare(cfg)
    train, val = docs_of(corpus, corpus.train), docs_of(corpus, corpus.val)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 200
    assert sorted(train + val) == sorted(f"document number {i}\n" for i in range(200))
    assert 30 <= len(val) <= 70 and train == sorted(train, key=lambda d: int(d.split()[-1]))  # about 25%, in order
    other = prepare(config(tmp_path, [root], val_fraction=0.25, seed=4))
    assert set(docs_of(other, other.val)) != set(val)

    one = tmp_path / "one.txt"
    one.write_text("x" * 1000)
    single = prepare(config(tmp_path, [one], val_fraction=0.1))  # one document: its tail is validation
    assert len(single.train) == 901 and len(single.val) == 100
    two = prepare(config(tmp_path, [root / "000.txt", root / "001.txt"], val_fraction=0.01))
    assert len(docs_of(two, two.train)) == 1 and len(docs_of(two, two.val)) == 1


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_two_workers_give_the_same_shards_as_one(tmp_path, corpus_dir, monkeypatch, tokenizer):
    monkeypatch.setattr(parallel, "_MIN_WORK_S_PER_WORKER", 1e-9)  # a pool even for this small corpus,
    monkeypatch.setattr(parallel, "_CHUNK_BYTES", 64)  # with many tasks to share out
    for i in range(30):
        (corpus_dir / f"gen/{i:02d}.md").parent.mkdir(exist_ok=True)
        (corpus_dir / f"gen/{i:02d}.md").write_text(f"file {i} " * (i + 1))
    kw = dict(val_fraction=0.2, tokenizer=tokenizer, vocab_size=300)
    one = prepare(config(tmp_path / "a", [corpus_dir], num_workers=1, **kw))
    two = prepare(config(tmp_path / "b", [corpus_dir], num_workers=2, **kw))
    assert not two.reused and two.folder != one.folder
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)

    def contents(m):  # a shard's entry less its mtime
        return {split: {k: v for k, v in e.items() if k != "mtime_ns"} for split, e in m["shards"].items()}

    assert contents(one.manifest) == contents(two.manifest) and one.manifest["sources"] == two.manifest["sources"]
    assert one.manifest["build"]["workers"] == 1 and two.manifest["build"]["workers"] == 2


def test_a_pool_is_started_only_for_enough_python_bound_work():
    def files(kind, mb, n=4):
        return [SourceFile(f"/x/{i}.{kind}", "x", kind, int(mb * 1e6 / n), 0, None) for i in range(n)]

    assert parallel.workers_for(files("pdf", 6.0), num_workers=2) == 2  # ~24 s of pypdf
    assert parallel.workers_for(files("pdf", 6.0), num_workers=8) == 2
    assert parallel.workers_for(files("pdf", 1.0), num_workers=2) == 1
    assert parallel.workers_for(files("text", 500.0), num_workers=2) == 1  # ~5 s: less than a pool costs
    assert parallel.workers_for(files("text", 5000.0), num_workers=4) == 4
    assert parallel.workers_for(files("pdf", 40.0), num_workers=0) == 1
    assert parallel.workers_for(files("image", 0.1, n=9), num_workers=2) == 1  # ~18 s of OCR
    assert parallel.workers_for(files("image", 0.1, n=10), num_workers=2) == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(paths=["/no/such/dir"]), r"DataConfig.paths: '/no/such/dir' does not exist"),
        (dict(val_fraction=1.0), r"DataConfig.val_fraction must be in \[0, 1\)"),
        (dict(val_fraction=-0.1), r"DataConfig.val_fraction"),
        (dict(tokenizer="bpe", vocab_size=100), r"DataConfig.vocab_size must be an int >= 257"),
        (dict(num_workers=-1), r"DataConfig.num_workers"),
        (dict(max_bytes=0), r"DataConfig.max_bytes"),
        (dict(paths="docs/"), r"DataConfig.paths must be a list"),
        (dict(seed=-1), r"DataConfig.seed must be an int >= 0"),
        (dict(cache_dir=123), r"DataConfig.cache_dir must be a path or None, got 123"),
        (dict(text_column=""), r"DataConfig.text_column must be a non-empty string"),
        (dict(dedup="yes"), r"DataConfig.dedup must be true or false, got 'yes'"),
        (dict(ocr=1), r"DataConfig.ocr must be true or false"),
        (dict(max_decompressed_bytes=0), r"DataConfig.max_decompressed_bytes must be a positive int"),
    ],
)
def test_bad_settings_raise_one_clear_line(kw, match):
    with pytest.raises(ValueError, match=match):
        prepare(DataConfig(**kw))


def test_missing_tokenizer_file_and_empty_corpus_raise(tmp_path, corpus_dir):
    with pytest.raises(ValueError, match=r"DataConfig.tokenizer .*'nope.json' is not a file"):
        prepare(config(tmp_path, [corpus_dir], tokenizer="nope.json"))
    with pytest.raises(ValueError, match=r"DataConfig.paths: no readable files"):
        prepare(config(tmp_path, [corpus_dir], include=["*.gif"]))
    with pytest.raises(ValueError, match=r"the corpus is empty: 2 files gave no document"):
        prepare(config(tmp_path, [corpus_dir], include=["blob.txt", "broken.pdf"]))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer .*bad.json' is not a valid tokenizer.json"):
        prepare(config(tmp_path, [corpus_dir], tokenizer=str(bad)))


def test_jsonl_records_split_on_newline_only_and_a_bad_record_costs_only_itself(tmp_path):
    texts = ["line\u2028separator", "paragraph\u2029separator", "next\u0085line", "plain"]
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]
    lines.insert(2, b'{"text": "caf\xe9 in latin-1"}')  # one bad byte: that record, not the file
    lines.insert(3, b'{"text": "cut emoji \\ud83d"}')  # a lone surrogate no tokenizer can encode
    (tmp_path / "r.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    for tokenizer in ("byte", "bpe"):
        corpus = prepare(config(tmp_path / tokenizer, [tmp_path / "r.jsonl"], tokenizer=tokenizer, vocab_size=300))
        assert docs_of(corpus, corpus.train) == texts
        assert corpus.manifest["sources"][str(tmp_path / "r.jsonl")]["skipped"] == {
            "jsonl line not UTF-8": 1,
            "jsonl record with a lone surrogate (\\ud800-\\udfff escape)": 1,
        }


@pytest.mark.parametrize("tokenizer", ["bpe", "file"])
def test_text_that_spells_a_special_token_stays_text(tmp_path, corpus_dir, tokenizer):
    (corpus_dir / "llm.py").write_text('EOT = "<|endoftext|>"  # GPT-2\'s end-of-text\n')
    if tokenizer == "file":
        trained = prepare(config(tmp_path / "t", [corpus_dir], tokenizer="bpe", vocab_size=300))
        tokenizer = str(trained.tokenizer_file)
    corpus = prepare(config(tmp_path, [corpus_dir], tokenizer=tokenizer, vocab_size=300))
    docs = docs_of(corpus, corpus.train)  # one end-of-text per document: none from the text
    assert 'EOT = "<|endoftext|>"  # GPT-2\'s end-of-text\n' in docs and len(docs) == 8


@pytest.mark.parametrize("val_fraction", [0.0, 0.02, 0.3, 0.97])
def test_bpe_learns_from_exactly_the_training_side_of_the_split(val_fraction):
    # Every seed and corpus size where _split's at-least-one-each-side fix moves a document, and where it does not.
    for n in range(1, 7):
        texts = [f"document {i} " * 3 for i in range(n)]
        for seed in range(60):
            seen = list(shards._train_side(iter(texts), seed, val_fraction))
            if n == 1 and val_fraction > 0:  # its head: the share of characters _write_splits gives training
                assert seen == [texts[0][: round(len(texts[0]) * (1 - val_fraction))]]
                continue
            is_val = shards._split(n, val_fraction, seed)  # a held-back document comes later: BPE counts words
            assert sorted(seen) == [t for t, v in zip(texts, is_val) if not v], (n, seed)


def test_a_file_found_twice_is_read_once(tmp_path, corpus_dir):
    (corpus_dir / "again.md").symlink_to(corpus_dir / "notes.md")
    corpus = prepare(config(tmp_path, [corpus_dir, corpus_dir / "readme.txt"]))
    docs = docs_of(corpus, corpus.train)
    assert docs.count(TEXTS["notes.md"]) == 1 and docs.count(TEXTS["readme.txt"]) == 1
    assert corpus.manifest["sources"][str(corpus_dir / "readme.txt")]["ignored"] == 1


def test_a_worker_that_dies_is_an_error_not_a_hang():
    # os._exit(1) as the task function: each worker process ends without a word, as one the OOM killer takes does.
    with pytest.raises(RuntimeError, match=r"a data worker process died .*DataConfig.num_workers=0"):
        list(parallel.map_in_order(os._exit, [1, 1, 1], workers=2, tok_config=None))


def test_a_shard_written_over_in_place_is_rebuilt(tmp_path, corpus_dir):
    first = prepare(config(tmp_path, [corpus_dir]))
    expected = np.array(first.train)
    path = first.folder / "train.bin"
    with open(path, "r+b") as fh:
        fh.write(b"\xff" * 64)  # ids far above the vocabulary, same size
    os.utime(path, ns=(1, 1))  # the write moved the mtime; pinned so a coarse file-system clock cannot hide it
    again = prepare(config(tmp_path, [corpus_dir]))
    assert not again.reused and int(again.train.max()) < again.tokenizer.vocab_size
    assert np.array_equal(again.train, expected)


def test_a_cache_dir_that_is_a_file_is_a_clear_error_and_a_failed_build_leaves_no_temporaries(
    tmp_path, corpus_dir, monkeypatch
):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"DataConfig.cache_dir \(or \$FASTTRAIN_CACHE\): cannot make"):
        prepare(DataConfig(paths=[str(corpus_dir)], cache_dir=str(tmp_path / "file")))

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(shards, "_write_splits", fail)  # after the whole token stream is on disk
    with pytest.raises(OSError, match="disk full"):
        prepare(config(tmp_path, [corpus_dir]))
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_parser_warnings_are_counted_not_printed(tmp_path, capsys):
    root = tmp_path / "pdfs"
    root.mkdir()
    write_pdf(root / "ok.pdf", "A fine PDF")
    data = (root / "ok.pdf").read_bytes()
    at = data.rindex(b"startxref\n") + len(b"startxref\n")
    (root / "badxref.pdf").write_bytes(data[:at] + b"1" + data[at:])  # a wrong xref offset: read, with warnings
    (root / "junk.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)))
    corpus = prepare(config(tmp_path, [root]))
    row = corpus.manifest["sources"][str(root)]
    assert [d.strip() for d in docs_of(corpus, corpus.train)] == ["A fine PDF"]  # badxref.pdf's text: a duplicate
    assert row["duplicates"] == 1 and row["skipped"] == {"corrupt pdf": 1}
    assert row["warnings"] == {  # files that raised each; numbers as N, so one kind counts under one key
        "pypdf: EOF marker not found": 1,
        "pypdf: incorrect startxref pointer(N)": 1,
        "pypdf: parsing for Object Streams": 1,
    }
    assert "parser warnings" in corpus.summary() and "EOF marker not found" in corpus.summary()
    assert "EOF" not in capsys.readouterr().err
