"""Data preparation throughput: MB of document text per second from each format into token shards, with the byte
tokenizer and a BPE-4096 tokenizer.json, 1 vs 2 workers, beside HF tokenizers' own batch encoding of the same text
in memory (the peer: tokenizing alone); and OCR: images per second and words recovered, beside tesseract.

    python -m fasttrain.benchmarks.bench_data [--quick] [--mb 16] [--pdf-mb 1] [--images 16]

The same documents (the stdlib's .py files, up to --mb MB of UTF-8 text) are written as .txt files, HTML pages,
notebooks (one code cell each), and in 8 parts as JSONL files (plain, gzip, zstd), CSV files, Parquet files and a
`datasets` folder of 8 shards; PDFs (one page per document, ASCII) hold the first --pdf-mb MB, since pypdf reads
~0.25 MB/s. Each timed call is a
whole cold `prepare` (discover, read, tokenize, dedup, write shards, hash, manifest) into a fresh cache folder.
The 2-worker rows force the pool (which `prepare` skips for a corpus too small to repay it); its spawn workers
re-import this module, which imports nothing heavy at the top, as `fasttrain train` and `fasttrain data` do not.
OCR rows render --images images of text (four fonts, 12-28 px, every fourth rotated 2 degrees) and time `prepare`
with OCR's cache cleared, and each engine alone on the same images in this process, single-threaded.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import html
import json
import os
import random
import re
import sysconfig
import tempfile
import time
from pathlib import Path

BPE_VOCAB = 4096
PARTS = 8
FONTS = (("DejaVuSans.ttf", 14), ("DejaVuSerif.ttf", 18), ("STIXGeneral.ttf", 24), ("DejaVuSansMono.ttf", 12))
WORDS = (
    "training model token layer attention gradient shard corpus kernel python memory window batch vocabulary "
    "language reader paper image scanner quick brown fox jumps over lazy river mountain garden yellow silver "
    "market number letter summer winter morning evening question answer history science planet ocean forest"
)


def stdlib_documents(mb: float) -> list[str]:
    """The stdlib's .py files in sorted order, UTF-8 and non-empty, distinct, up to `mb` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, seen, total = [], set(), 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or text in seen or "\0" in text:
            continue
        seen.add(text)
        docs.append(text)
        total += len(text.encode())
        if total >= mb * 1e6:
            break
    return docs


def write_pdf(path: Path, text: str) -> None:
    """One page drawing each line of `text` (ASCII; others become '?') in Helvetica, with a correct xref table."""
    lines = text.encode("ascii", "replace").decode().splitlines()
    shown = " ".join("(" + re.sub(r"([\\()])", r"\\\1", line) + ") '" for line in lines)
    content = f"BT /F1 9 Tf 11 TL 36 800 Td {shown} ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def write_formats(root: Path, docs: list[str], pdf_docs: list[str]) -> dict[str, Path]:
    """The documents in each format; format -> the path to give DataConfig.paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths = {name: root / name for name in ("text", "html", "notebook", "pdf")}
    for folder in paths.values():
        folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (paths["text"] / f"{i:05d}.txt").write_text(doc, encoding="utf-8")
        page = f"<!doctype html><html><body><pre>{html.escape(doc)}</pre></body></html>"
        (paths["html"] / f"{i:05d}.html").write_text(page, encoding="utf-8")
        cell = {"cell_type": "code", "metadata": {}, "source": doc, "outputs": []}
        nb = {"nbformat": 4, "metadata": {"kernelspec": {"language": "python"}}, "cells": [cell]}
        (paths["notebook"] / f"{i:05d}.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    for i, doc in enumerate(pdf_docs):
        write_pdf(paths["pdf"] / f"{i:05d}.pdf", doc)
    # The tables come in PARTS files (a `datasets` folder in PARTS shards), so that two workers can share them.
    parts = [docs[i::PARTS] for i in range(PARTS)]
    for name in ("jsonl", "jsonl.gz", "jsonl.zst", "csv", "parquet", "hf-dataset"):
        paths[name] = root / name
        paths[name].mkdir()
    for i, part in enumerate(parts):
        records = "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
        (paths["jsonl"] / f"{i}.jsonl").write_bytes(records)
        (paths["jsonl.gz"] / f"{i}.jsonl.gz").write_bytes(gzip.compress(records, compresslevel=6))
        (paths["jsonl.zst"] / f"{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(records))
        with open(paths["csv"] / f"{i}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "text"])
            writer.writerows(enumerate(part))
        table = pa.table({"text": part})
        pq.write_table(table, paths["parquet"] / f"{i}.parquet")
        with pa.OSFile(str(paths["hf-dataset"] / f"data-{i:05d}-of-{PARTS:05d}.arrow"), "wb") as sink:
            stream = pa.ipc.new_stream(sink, table.schema)
            stream.write_table(table)
            stream.close()
    state = {"_data_files": [{"filename": f"data-{i:05d}-of-{PARTS:05d}.arrow"} for i in range(PARTS)]}
    (paths["hf-dataset"] / "state.json").write_text(json.dumps(state))
    (paths["hf-dataset"] / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return paths


def render_images(folder: Path, n: int) -> list[list[str]]:
    """n images of 3 lines of words each; the words of each, in file order."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    rng, vocab, expected = random.Random(0), WORDS.split(), []
    for i in range(n):
        font_file, size = FONTS[i % len(FONTS)]
        font = ImageFont.truetype(str(fonts / font_file), size)
        lines = [[rng.choice(vocab) for _ in range(7)] for _ in range(3)]
        image = Image.new("L", (int(size * 28), int(size * 1.7 * 3) + 30), 255)
        draw = ImageDraw.Draw(image)
        for row, line in enumerate(lines):
            draw.text((15, 15 + row * size * 1.7), " ".join(line), font=font, fill=0)
        if i % 4 == 3:
            image = image.rotate(2.0, expand=True, fillcolor=255, resample=Image.BICUBIC)
        image.save(folder / f"{i:04d}.png")
        expected.append([w for line in lines for w in line])
    return expected


def recall(expected: list[list[str]], texts: list[str]) -> float:
    """Share of the expected words (with repeats) found in the text of their image."""
    hits = total = 0
    for words, text in zip(expected, texts):
        pool = re.findall(r"[a-z]+", text.lower())
        for w in words:
            total += 1
            if w in pool:
                pool.remove(w)
                hits += 1
    return hits / total


def main() -> None:
    import fasttrain.data.parallel as parallel
    from fasttrain.benchmarks.common import parse_args, print_table, time_ms, write_results
    from fasttrain.data import DataConfig, prepare

    def extra(p):
        p.add_argument("--mb", type=float, default=16.0, help="MB of text per format")
        p.add_argument("--pdf-mb", type=float, default=1.0, help="MB of text in the PDFs")
        p.add_argument("--images", type=int, default=16, help="images for the OCR rows")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    mb, pdf_mb, n_images = (1.0, 0.1, 4) if args.quick else (args.mb, args.pdf_mb, args.images)
    parallel._MIN_WORK_S_PER_WORKER = 1e-9
    # Tasks of about 1/16 of the text (1 MiB at the default 16 MB), so two workers have tasks to share.
    parallel._CHUNK_BYTES = min(parallel._CHUNK_BYTES, int(mb * 1e6 / 16))
    device = "cpu"  # data preparation runs on the host whatever the accelerator: results are filed under the CPU
    min_run_time = 0.5 if args.quick else 4.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs, pdf_docs = stdlib_documents(mb), stdlib_documents(pdf_mb)
        text_mb, pdf_text_mb = (sum(len(d.encode()) for d in ds) / 1e6 for ds in (docs, pdf_docs))
        paths = write_formats(root / "src", docs, pdf_docs)
        runs = iter(range(1_000_000))
        base = DataConfig(val_fraction=0.05, cache_dir=None)

        def cfg(path: Path, **kw) -> DataConfig:
            return dataclasses.replace(base, paths=[str(path)], cache_dir=f"{root}/cache/{next(runs)}", **kw)

        bpe = prepare(cfg(paths["text"], tokenizer="bpe", vocab_size=BPE_VOCAB, num_workers=1))
        tokenizers = {"byte": "byte", f"bpe-{BPE_VOCAB}": str(bpe.tokenizer_file)}

        # The peer: HF tokenizers' batch encoding of the documents already in memory.
        hf = bpe.tokenizer._tok
        encode = getattr(hf, "encode_batch_fast", hf.encode_batch)
        peer_ms = time_ms(lambda: encode(docs, add_special_tokens=False), device, warmup=1, min_run_time=1.0)
        peer_mb_s = text_mb / (peer_ms * 1e-3)
        rows.append(
            {
                "format": "(in memory)",
                "tokenizer": f"bpe-{BPE_VOCAB}",
                "impl": "HF encode_batch",
                "workers": None,
                "MB": text_mb,
                "ms": peer_ms,
                "MB/s": peer_mb_s,
            }
        )
        for fmt, path in paths.items():
            fmt_mb = pdf_text_mb if fmt == "pdf" else text_mb
            for tok_name, tokenizer in tokenizers.items():
                one = None
                for workers in (1, 2):
                    knobs = {"tokenizer": tokenizer, "num_workers": workers}
                    corpus = prepare(cfg(path, **knobs))  # checked before it is timed: all read, the same shards
                    assert corpus.manifest["build"]["workers"] == workers
                    n_docs = len(pdf_docs) if fmt == "pdf" else len(docs)
                    if corpus.manifest["split"]["documents"] != n_docs:
                        raise SystemExit(f"{fmt}: {corpus.manifest['split']['documents']} documents, not {n_docs}")
                    one = one or corpus
                    if not (len(corpus.train) == len(one.train) and (corpus.train == one.train).all()):
                        raise SystemExit(f"{fmt} {tok_name}: {workers} workers built other shards than 1")
                    ms = time_ms(lambda p=path, k=knobs: prepare(cfg(p, **k)), device, 0, min_run_time)
                    rows.append(
                        {
                            "format": fmt,
                            "tokenizer": tok_name,
                            "impl": "fasttrain prepare",
                            "workers": workers,
                            "MB": fmt_mb,
                            "ms": ms,
                            "MB/s": fmt_mb / (ms * 1e-3),
                            "x 1 worker": rows[-1]["ms"] / ms if workers == 2 else 1.0,
                            "x peer": fmt_mb / (ms * 1e-3) / peer_mb_s if tok_name != "byte" else None,
                            "tokens": len(corpus.train) + len(corpus.val),
                        }
                    )
                    print(f"{fmt:12s} {tok_name:9s} {workers}: {rows[-1]['MB/s']:.2f} MB/s", flush=True)
        rows += ocr_rows(root, n_images, cfg, prepare)
    print_table(rows, ["format", "tokenizer", "impl", "workers", "MB", "MB/s", "x 1 worker", "x peer", "recall"])
    path = write_results("data", device, rows, ceilings={}, out=args.out, quick=args.quick)
    print(f"wrote {path}")


def ocr_rows(root: Path, n: int, cfg, prepare) -> list[dict]:
    """prepare over n rendered images with 1 and 2 workers (a fresh cache each: OCR runs), then each engine alone
    in this process on the same images: images per second and words recovered."""
    from PIL import Image

    import fasttrain.data.scans as scans

    if scans.ocr_version() is None:
        print("OCR rows skipped: pip install fasttrain[ocr]")
        return []
    folder = root / "images"
    folder.mkdir()
    expected = render_images(folder, n)
    images = [Image.open(p).copy() for p in sorted(folder.iterdir())]
    rows = []
    for workers in (1, 2):
        start = time.perf_counter()
        corpus = prepare(cfg(folder, num_workers=workers, val_fraction=0.0))
        seconds = time.perf_counter() - start
        texts = _documents(corpus)
        rows.append(_ocr_row(f"fasttrain prepare ({scans.ENGINE_NAME})", workers, n, seconds, expected, texts))
    engines = {scans.ENGINE_NAME: scans.ocr_image}
    try:
        import pytesseract

        pytesseract.get_tesseract_version()
        engines["tesseract (pytesseract, --psm 3)"] = pytesseract.image_to_string
    except Exception:
        print("tesseract rows skipped: apt-get install tesseract-ocr; pip install pytesseract")
    os.environ["OMP_THREAD_LIMIT"] = "1"  # tesseract single-threaded, as the OCR engine runs
    for name, fn in engines.items():
        fn(images[0])  # loads the models
        start = time.perf_counter()
        texts = [fn(image) for image in images]
        rows.append(_ocr_row(name, 1, n, time.perf_counter() - start, expected, texts))
    return rows


def _ocr_row(impl: str, workers: int, n: int, seconds: float, expected, texts) -> dict:
    print(f"{impl}, {workers} workers: {n / seconds:.2f} images/s, recall {recall(expected, texts):.3f}", flush=True)
    return {
        "format": "image (ocr)",
        "impl": impl,
        "workers": workers,
        "images": n,
        "ms": seconds * 1e3,
        "images/s": n / seconds,
        "recall": recall(expected, texts),
    }


def _documents(corpus) -> list[str]:
    ids, docs, start = corpus.train.tolist(), [], 0
    for i, t in enumerate(ids):
        if t == corpus.tokenizer.eot_id:
            docs.append(corpus.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


if __name__ == "__main__":
    main()
