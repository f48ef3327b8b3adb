"""Run flash-attention's own test files against fasttrain.flash_attn: a seeded sample of each test function's cases.

The files are read from a flash-attention checkout or bare git directory (nothing of flash-attn's is kept in this
repository), rewritten as a client switching to fasttrain would (`flash_attn` -> `fasttrain.flash_attn` in the
imports) with the devices moved off CUDA (`"cuda"` -> the device asked for, the compute capability read as sm90's,
the GPU's memory as ample), and run by pytest in a temporary directory. A conftest written beside them keeps, per
test function, `--per-test` cases drawn with `--seed` among those whose sequence-length arguments are at most
`--max-seqlen` (a function with none says so). pytest's own summary lists the failures. Run it niced. On the CPU
fasttrain runs its C++ kernels; `--interpret` sets TRITON_INTERPRET=1 to run its Triton kernels instead, in Triton's
interpreter, which is hundreds of times slower (a dropout case of T 97 takes minutes).

    nice python tools/flash_attn_suite.py --flash-attn ~/src/flash-attention --per-test 3 --max-seqlen 256
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = ("tests/test_flash_attn.py", "tests/test_rotary.py", "tests/layers/test_rotary.py")

# The sampler pytest loads from the suite's directory: its options come in the environment.
CONFTEST = '''
import os
import random


def _small(item, cap):
    """Whether every sequence-length argument of the case (an int or a tuple of them) is at most cap."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for name, value in params.items():
        if "seqlen" not in name:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(x, int) and x > cap for x in values):
            return False
    return True


def pytest_collection_modifyitems(config, items):
    per_test = int(os.environ["FA_SUITE_PER_TEST"])
    cap = int(os.environ["FA_SUITE_MAX_SEQLEN"])
    seed = os.environ["FA_SUITE_SEED"]
    groups = {}
    for item in items:
        groups.setdefault((item.path.name, item.originalname), []).append(item)
    keep = set()
    for (path, name), cases in groups.items():
        small = [c for c in cases if _small(c, cap)]
        rng = random.Random(f"{seed}:{path}:{name}")
        keep.update(map(id, small if per_test <= 0 else rng.sample(small, min(per_test, len(small)))))
        if not small:
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            reporter.write_line(f"{path}::{name}: none of its {len(cases)} cases within --max-seqlen {cap}")
    config.hook.pytest_deselected(items=[i for i in items if id(i) not in keep])
    items[:] = [i for i in items if id(i) in keep]
'''


def transform(text: str, device: str = "cpu") -> str:
    """flash-attn's test source as a fasttrain client runs it: its imports from fasttrain.flash_attn, its tensors
    on `device`, the GPU queries answered as on an sm90 GPU with ample memory."""
    text = re.sub(r"^(\s*)from flash_attn([.\s])", r"\1from fasttrain.flash_attn\2", text, flags=re.M)
    text = re.sub(r"^(\s*)import flash_attn\b", r"\1import fasttrain.flash_attn as flash_attn", text, flags=re.M)
    text = re.sub(r"torch\.cuda\.get_device_capability\([^)]*\)", "(9, 0)", text)
    text = re.sub(r"torch\.cuda\.get_device_properties\([^)]*\)\.total_memory", "2**40", text)
    return re.sub(r"""(["'])cuda\1""", f'"{device}"', text)


def read_source(root: Path, path: str, rev: str) -> str:
    """The file `path` of a flash-attention checkout's work tree, else of revision `rev` of its git directory."""
    if (root / path).is_file():
        return (root / path).read_text()
    shown = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--flash-attn: cannot read {path} from {root} at {rev}: {shown.stderr.strip()}")
    return shown.stdout


def write_suite(root: Path, files, rev: str, out: Path, device: str = "cpu") -> list[Path]:
    """The transformed files (tests/layers/test_rotary.py -> tests_layers_test_rotary.py), the sampler conftest and
    an empty pytest.ini (no other project's settings) in out; returns the test files' paths."""
    written = []
    for path in files:
        target = out / path.replace("/", "_")
        target.write_text(transform(read_source(root, path, rev), device))
        written.append(target)
    (out / "conftest.py").write_text(CONFTEST)
    (out / "pytest.ini").write_text("[pytest]\n")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flash-attn", type=Path, required=True, help="a flash-attention checkout or git directory")
    parser.add_argument("--rev", default="HEAD", help="the revision read from a git directory (default HEAD)")
    parser.add_argument("--files", nargs="+", default=list(FILES), help="test files, relative to its root")
    parser.add_argument("--per-test", type=int, default=3, help="cases per test function (0: all under the cap)")
    parser.add_argument("--max-seqlen", type=int, default=256, help="largest sequence-length argument run")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--device", default="cpu", help="the device the tests' tensors go to (default cpu)")
    parser.add_argument(
        "--interpret", action="store_true", help="TRITON_INTERPRET=1: the Triton kernels on the CPU (slow)"
    )
    parser.add_argument("--keep", type=Path, help="keep the suite in this new or empty dir")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -k dropout -x")
    args = parser.parse_args(argv)
    if args.per_test < 0 or args.max_seqlen < 1:
        parser.error("--per-test must be >= 0 and --max-seqlen >= 1")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep must be a new or empty directory (its conftest.py would be replaced): {args.keep}")
    env = dict(os.environ, FA_SUITE_PER_TEST=str(args.per_test), FA_SUITE_MAX_SEQLEN=str(args.max_seqlen))
    env["FA_SUITE_SEED"] = str(args.seed)
    if args.interpret:
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory(prefix="flash_attn_suite_") as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        tests = write_suite(args.flash_attn, args.files, args.rev, out, args.device)
        command = [sys.executable, "-m", "pytest", "-rfE", "-p", "no:cacheprovider", "-c", str(out / "pytest.ini")]
        command += ["--rootdir", str(out), *map(str, tests), *args.pytest_args]
        return subprocess.run(command, cwd=out, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
