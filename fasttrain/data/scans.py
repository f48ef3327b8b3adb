"""PDFs and images: a PDF's text layer through pypdf (`pip install fasttrain[pdf]`); images (PNG, JPEG, TIFF, WebP,
BMP) and PDF pages without a text layer (scans) through OCR (`pip install fasttrain[ocr]`).

OCR is RapidOCR (PP-OCRv6 detection and recognition, ONNX models shipped inside its wheel) on onnxruntime: it
installs from PyPI alone and runs offline. docs/data.md gives the measurements that chose it over tesseract. Each
process loads the engine once, single-threaded (the worker processes are the parallelism, and so the text never
depends on their number). Results are cached by the image's content hash in DataConfig.cache_dir's ocr/ folder,
so a rebuild with another tokenizer or split does not OCR again.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

from fasttrain._files import atomic_write_text
from fasttrain.data.formats import Skip
from fasttrain.data.sources import Documents, ReadOptions, SourceFile, captured, count, package_version

PYPDF_MISSING = "pdf (pypdf not installed: pip install fasttrain[pdf])"
OCR_MISSING = "ocr not installed (pip install fasttrain[ocr])"
OCR_OFF = "image or scanned page (DataConfig.ocr is false)"
ENGINE_NAME = "RapidOCR (PP-OCRv6 small, onnxruntime)"
_PACKAGES = ("rapidocr", "onnxruntime")
# Detection runs on the image scaled down to at most 1280 px a side and never up (RapidOCR's default scales the
# short side up to 736 px: 10x the work on a text strip); no 180-degree classifier (a model pass per line, for
# scans upside down); one thread (see the module's docstring).
ENGINE_PARAMS = {
    "Global.log_level": "error",
    "Global.use_cls": False,
    "Det.limit_type": "max",
    "Det.limit_side_len": 1280,
    "EngineConfig.onnxruntime.intra_op_num_threads": 1,
    "EngineConfig.onnxruntime.inter_op_num_threads": 1,
}
_engine = None


def ocr_version() -> str | None:
    """What decides OCR's text (the engine's packages and settings), or None when it is not installed."""
    versions = [package_version(p) for p in _PACKAGES]
    if None in versions:
        return None
    return ", ".join([f"{p} {v}" for p, v in zip(_PACKAGES, versions)] + [str(sorted(ENGINE_PARAMS.items()))])


def _load_engine():
    global _engine
    if _engine is None:
        with captured(set()):  # what importing and loading the models says is not about any file
            try:
                import onnxruntime
                from rapidocr import RapidOCR
            except ImportError:
                raise Skip(OCR_MISSING) from None
            onnxruntime.set_default_logger_severity(3)  # errors only: its C++ warnings would reach the console
            try:
                _engine = RapidOCR(params=ENGINE_PARAMS)
            except Exception as exc:  # e.g. its model files removed: it would try to download them
                raise Skip(f"ocr engine failed to load ({type(exc).__name__})") from exc
        # Its console handler goes: what it still says (errors) is counted per file, as other parsers' warnings are;
        # an image without text ("detection result is empty", a warning) is no problem of the file.
        log = logging.getLogger("RapidOCR")
        log.handlers.clear()
        log.setLevel(logging.ERROR)
    return _engine


def ocr_image(image) -> str:
    """The text of a PIL image, lines top to bottom, boxes on one line joined by a space; "" when it has none."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # on white, as a viewer shows it
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    engine = _load_engine()
    try:
        result = engine(image)
    except Exception as exc:  # the engine's own failure on odd input (a 1-pixel image): this file's, not the run's
        raise Skip(f"ocr failed ({type(exc).__name__})") from exc
    if not result.txts:
        return ""
    out, previous = [], None
    for box, text in zip(result.boxes, result.txts):
        top, bottom = float(box[:, 1].min()), float(box[:, 1].max())
        if previous is not None:
            out.append(" " if previous[0] <= (top + bottom) / 2 <= previous[1] else "\n")
        out.append(text)
        previous = (top, bottom)
    return "".join(out)


def _cached(data: bytes, compute, opts: ReadOptions) -> str:
    """compute() of an image's bytes, through the OCR cache."""
    if opts.ocr_cache is None:
        return compute()
    key = hashlib.sha256(f"{ocr_version()}\n".encode() + data).hexdigest()
    path = Path(opts.ocr_cache) / key[:2] / f"{key}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    text = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError:  # a read-only or full cache costs the recomputation next time, not this file
        pass
    return text


def _ocr_bytes(data: bytes) -> str:
    """OCR of an encoded image (every frame of a multi-page TIFF); Skip for one PIL cannot decode."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            frames = [frame.copy() for frame in ImageSequence.Iterator(image)]
    except Image.DecompressionBombError as exc:
        raise Skip("image too large (over PIL's decompression-bomb limit)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Skip("unreadable image") from exc
    return "\n\n".join(t for t in (ocr_image(frame) for frame in frames) if t)


def _can_ocr(opts: ReadOptions) -> str | None:
    """None when OCR can run, else the reason it cannot."""
    if not opts.ocr:
        return OCR_OFF
    return None if ocr_version() is not None else OCR_MISSING


def read_image(f: SourceFile, opts: ReadOptions) -> Documents:
    why = _can_ocr(opts)
    if why is not None:
        return Documents([], {why: 1})
    try:
        data = Path(f.path).read_bytes()
    except OSError:
        return Documents([], {"unreadable": 1})
    try:
        text = _cached(data, lambda: _ocr_bytes(data), opts)
    except Skip as exc:
        return Documents([], {str(exc): 1})
    return Documents([text]) if text.strip() else Documents([], {"image without text": 1})


def read_pdf(f: SourceFile, opts: ReadOptions) -> Documents:
    """The text layer of every page; a page without one is read by OCR from its images."""
    try:
        import pypdf
    except ImportError:
        return Documents([], {PYPDF_MISSING: 1})
    notes: dict[str, int] = {}
    try:
        reader = pypdf.PdfReader(f.path)
        pages = [page.extract_text() or "" for page in reader.pages]
        scans = [i for i, text in enumerate(pages) if not text.strip() and _has_images(reader.pages[i])]
        why = _can_ocr(opts) if scans else None
        for i in scans if why is None else []:
            texts = [_cached(im.data, lambda im=im: ocr_image(im.image), opts) for im in reader.pages[i].images]
            pages[i] = "\n\n".join(t for t in texts if t)
        text = "\n".join(pages)
    except Skip as exc:
        return Documents([], {str(exc): 1})
    except OSError:
        return Documents([], {"unreadable": 1})
    except Exception:  # pypdf raises many types (PdfReadError, ValueError, KeyError...) for a corrupt file
        return Documents([], {"corrupt pdf": 1})
    if not text.strip():
        return Documents([], {why or "pdf without text": 1})
    if why is not None:  # some pages had text; the scanned ones are noted
        count(notes, f"fasttrain: pdf pages without a text layer not read: {why}", 1)
    return Documents([text], warnings=notes)


def _has_images(page) -> bool:
    try:
        return len(page.images) > 0
    except Exception:  # an image pypdf cannot list is one OCR could not read either
        return False
