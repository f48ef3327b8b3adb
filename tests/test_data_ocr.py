"""OCR of images and scanned PDF pages: words recovered from images this file renders (several fonts and sizes, one
rotated), an image-only PDF page, a blank image, OCR in the worker processes, its cache, and what happens without
the [ocr] extra or with DataConfig.ocr off."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import fasttrain.data.parallel as parallel
import fasttrain.data.scans as scans
from fasttrain.data import DataConfig, prepare

# matplotlib (a dependency) ships these fonts, so every machine that runs the tests has them.
FONTS = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
_WORDS = (
    "training model token layer attention gradient shard corpus kernel python memory window batch vocabulary "
    "language reader paper image scanner quick brown fox jumps over lazy river mountain garden yellow silver "
    "market number letter summer winter morning evening question answer history science planet ocean forest "
    "castle bridge engine rocket violet orange purple coffee bottle pencil"
)
WORDS = _WORDS.split()


def words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(n)]


def render(lines: list[tuple[list[str], str, int]], width: int = 520, angle: float = 0.0) -> Image.Image:
    """Black text on white, one (words, font file, pixel size) per line, optionally rotated by `angle` degrees."""
    height = sum(int(size * 1.7) for _, _, size in lines) + 30
    image = Image.new("L", (width, height), 255)
    draw, y = ImageDraw.Draw(image), 15
    for line, font, size in lines:
        draw.text((15, y), " ".join(line), font=ImageFont.truetype(str(FONTS / font), size), fill=0)
        y += int(size * 1.7)
    return image.rotate(angle, expand=True, fillcolor=255, resample=Image.BICUBIC) if angle else image


def recovered(expected: list[str], text: str) -> float:
    """The share of `expected` (with repeats) found among the words of `text`."""
    pool = re.findall(r"[a-z]+", text.lower())
    hits = 0
    for w in expected:
        if w in pool:
            pool.remove(w)
            hits += 1
    return hits / len(expected)


@pytest.fixture(scope="module")
def scans_dir(tmp_path_factory):
    """mixed.png: four lines in four fonts and sizes, on a transparent background; tilted.jpg: two lines rotated 2
    degrees; scan.pdf: one page that is only an image; blank.webp: no text."""
    root = tmp_path_factory.mktemp("scans")
    expected = {}
    lines = [
        (words(1, 6), "DejaVuSans.ttf", 14),
        (words(2, 5), "DejaVuSerif.ttf", 19),
        (words(3, 4), "STIXGeneral.ttf", 26),
        (words(4, 5), "DejaVuSansMono.ttf", 16),
    ]
    ink = render(lines)
    transparent = Image.new("LA", ink.size, 0)
    transparent.putalpha(ink.point(lambda v: 255 - v))  # black text on a transparent background
    transparent.save(root / "mixed.png")
    expected["mixed.png"] = [w for line, _, _ in lines for w in line]
    lines = [(words(5, 6), "DejaVuSerif.ttf", 18), (words(6, 6), "DejaVuSans.ttf", 18)]
    render(lines, angle=2.0).convert("RGB").save(root / "tilted.jpg", quality=90)
    expected["tilted.jpg"] = [w for line, _, _ in lines for w in line]
    lines = [(words(7, 5), "DejaVuSans-Bold.ttf", 22), (words(8, 6), "STIXGeneral.ttf", 20)]
    render(lines).convert("RGB").save(root / "scan.pdf", resolution=100)  # a page with one image and no text
    expected["scan.pdf"] = [w for line, _, _ in lines for w in line]
    Image.new("RGB", (240, 90), (255, 255, 255)).save(root / "blank.webp")
    return root, expected


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A cache folder the tests of this file share: its ocr/ results save OCR of the same images again."""
    return tmp_path_factory.mktemp("cache")


def config(cache, paths, **kw) -> DataConfig:
    kw.setdefault("num_workers", 1)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(paths=[str(p) for p in paths], cache_dir=str(cache), **kw)


def test_ocr_recovers_the_words_of_images_and_a_scanned_pdf_page(shared_cache, scans_dir):
    root, expected = scans_dir
    corpus = prepare(config(shared_cache, [root]))
    row = corpus.manifest["sources"][str(root)]
    # Sorted files: blank.webp (no document), mixed.png, scan.pdf, tilted.jpg.
    docs = _documents(corpus)
    assert len(docs) == 3
    for doc, name in zip(docs, ["mixed.png", "scan.pdf", "tilted.jpg"]):
        assert recovered(expected[name], doc) >= 0.9, (name, doc)
    assert row["formats"]["image"]["files"] == 3 and row["formats"]["image"]["documents"] == 2
    assert row["formats"]["pdf"]["documents"] == 1
    assert row["skipped"] == {"image without text": 1} and not row["warnings"]
    assert "image without text" in corpus.summary()


def _documents(corpus) -> list[str]:
    ids = corpus.train.tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == corpus.tokenizer.eot_id:
            docs.append(corpus.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


def test_a_blank_image_is_an_empty_document_and_an_unreadable_one_a_counted_skip(tmp_path):
    assert scans.ocr_image(Image.new("L", (200, 60), 255)) == ""
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    (tmp_path / "blank.tif").write_bytes(_tiff(Image.new("L", (120, 40), 255)))
    (tmp_path / "note.txt").write_text("the text beside them\n")
    corpus = prepare(config(tmp_path, [tmp_path / "cut.png", tmp_path / "blank.tif", tmp_path / "note.txt"]))
    skipped = {s: r["skipped"] for s, r in corpus.manifest["sources"].items()}
    assert skipped[str(tmp_path / "cut.png")] == {"unreadable image": 1}
    assert skipped[str(tmp_path / "blank.tif")] == {"image without text": 1}


def _tiff(image: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, "TIFF")
    return out.getvalue()


def test_ocr_runs_in_the_workers_and_its_results_are_cached(tmp_path, shared_cache, scans_dir, monkeypatch):
    root, _ = scans_dir
    (tmp_path / "note.md").write_text("a text file: the other worker's task\n")
    paths = [root / "mixed.png", tmp_path / "note.md"]
    one = prepare(config(shared_cache, paths))
    monkeypatch.setattr(parallel, "_MIN_WORK_S_PER_WORKER", 1e-9)  # a pool of two, one file each
    two = prepare(config(tmp_path, paths, num_workers=2))  # a fresh cache folder: OCR runs in the workers
    assert two.manifest["build"]["workers"] == 2 and not two.reused
    assert np.array_equal(one.train, two.train) and one.manifest["sources"] == two.manifest["sources"]

    def no_ocr(image):
        raise AssertionError("OCR ran again instead of reading its cache")

    monkeypatch.setattr(scans, "ocr_image", no_ocr)
    bpe = prepare(config(tmp_path, paths, tokenizer="bpe", vocab_size=300))  # new shards, OCR from the cache
    assert not bpe.reused and _documents(bpe) == _documents(one)


def test_without_the_ocr_extra_images_and_scans_are_skipped_with_the_reason(tmp_path, scans_dir, monkeypatch):
    root, _ = scans_dir
    (tmp_path / "words.md").write_text("some text so that the corpus is not empty\n")
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # `import rapidocr` now raises ImportError
    monkeypatch.setattr(scans, "_engine", None)
    corpus = prepare(config(tmp_path, [root, tmp_path / "words.md"]))
    row = corpus.manifest["sources"][str(root)]
    assert row["skipped"] == {"ocr not installed (pip install fasttrain[ocr])": 4}
    assert row["documents"] == 0 and "ocr not installed" in corpus.summary()
    off = prepare(config(tmp_path, [root, tmp_path / "words.md"], ocr=False))
    assert off.manifest["sources"][str(root)]["skipped"] == {scans.OCR_OFF: 4}
    with pytest.raises(ValueError, match=r"the corpus is empty: 4 files gave no document .*4 ocr not installed"):
        prepare(config(tmp_path, [root]))
