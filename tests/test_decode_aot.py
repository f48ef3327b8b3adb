"""flash_attn_with_kvcache's aot column: kernels/decode.py's append, decode and combine compiled ahead of time
(tools/aot.py --shipped) and launched from C++ (csrc/decode_aot.cpp), tested without a GPU.

The shipped set lists what the column takes; a sample of it compiles for sm_90 and registers with the C++ launcher;
the C++ op, run on CPU tensors with the launch recorder on (no output is computed here), hands the launcher what
Triton's JIT launcher is given for the same call with its autotuner held to the tile the op launches
(tests/aot_jit_capture.py), launch by launch; the column's reason sends everything else to the JIT; torch.compile
traces the public function on the column. GPU tests (`pytest -m gpu`) hold the column to the triton column and the
reference: outputs, lse and the caches after the append.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fasttrain
import fasttrain._C as C
from fasttrain import _backend
from fasttrain.ops import decode as ops
from fasttrain.ops.attention_reference import UNBOUNDED
from fasttrain.ops.decode import flash_attn_with_kvcache

from helpers import aot_compile, aot_jit_launches, aot_recording, assert_aot_launch_is_the_jit_launch

SM = 132  # the recorder's SM count (an H100's), which the split heuristic follows
# The sample: head dim 64, fp16 (bf16 and the other head dims share every line of the launch path): the append, the
# decode kernel at BLOCK_M 16 and 32 with SPLIT and LEFTPAD on and off, the combine for 3-4 and 5-8 splits; and the
# class's second tile (BLOCK_N 128) for one split, BLOCK_M 16, no left padding, for the tuning tests.
SAMPLE = "^d64 (w1|m(16|32) BLOCK_N=64 |s4 |s8 |m16 BLOCK_N=128 w4 s3$)"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    rows = aot_compile(out, "decode", ["fp16"], SAMPLE)
    assert len(rows) == 1 + 8 + 2 + 1 and all("error" not in r and r["local"] == 0 for r in rows)
    return out, rows


@pytest.fixture
def registry(sample):
    """The sample registered with the C++ launcher and the launches recorded, nothing tuned; undone after the test."""
    with aot_recording([sample[0]], len(sample[1]), SM):
        yield


def test_shipped_set_is_the_columns_scope():
    from fasttrain.kernels import decode

    assert decode.aot_kernels(90, "fp32", shipped=True) == []
    assert (decode.MAX_SPLITS, decode.SHIPPED_HEAD_DIMS) == (ops._AOT_MAX_SPLITS, ops._AOT_HEAD_DIMS)
    for arch in (80, 90):
        append, plain, split, combine = decode.aot_kernels(arch, "bf16", shipped=True)
        assert [c["constexprs"]["HEAD_DIM"] for c in append["cases"]] == [64, 128, 256]
        assert all(not c["constexprs"]["ROTARY"] and not c["constexprs"]["HAS_BATCH_IDX"] for c in append["cases"])
        assert plain["types"].get("Out") is None and split["types"]["Out"] == "*fp32"
        for entry in (append, plain, split):  # the placeholder block table's row stride is 1
            assert "stride_bt" not in entry["divisible"] and "stride_kct" in entry["divisible"]
        for entry, on in ((plain, False), (split, True)):
            tiles = {cls: decode.shipped_tiles(arch, cls) for cls in ("d64", "d128", "d256")}
            assert len(entry["cases"]) == 2 * 3 * sum(map(len, tiles.values()))
            for c in entry["cases"]:
                k = c["constexprs"]
                assert k["SPLIT"] == on and k["BLOCK_M"] in (16, 32, 64) and not (k["SOFTCAP"] or k["ALIBI"])
                assert not k["HAS_BATCH_IDX"] and k["PAGE"] == 0
            for cls, ts in tiles.items():
                configs = decode.DECODE_CONFIGS[arch][cls]
                # the first config of each BLOCK_N, in the class's order
                assert [t.kwargs["BLOCK_N"] for t in ts] == list(dict.fromkeys(c.kwargs["BLOCK_N"] for c in configs))
                assert all(t is next(c for c in configs if c.kwargs == t.kwargs) for t in ts) and ts[0] is configs[0]
        assert [c["constexprs"]["BLOCK_S"] for c in combine["cases"][:7]] == [2, 4, 8, 16, 32, 64, 128]
        # csrc/decode_aot.cpp block_n_of: the class's first config, the same on both archs
        first = {cls: decode.DECODE_CONFIGS[arch][cls][0].kwargs["BLOCK_N"] for cls in ("d64", "d128", "d256")}
        assert first == {"d64": 64, "d128": 64, "d256": 32}


# (B, Tq, H, Hkv, D, Tmax, lengths, leftpad, t_new, window, num_splits): batch 1 and 2, Tq 1, 4 and 8, GQA 32/8 and
# MHA, the split heuristic's 1, 4 and 8 splits and forced 1 and 3, left padding, k/v appended or not.
W = UNBOUNDED
CASES = [
    (1, 1, 32, 8, 64, 1024, [700], None, 1, (W, 0), 0),  # the decode step: 8 splits by the heuristic
    (1, 4, 4, 4, 64, 256, [100], None, 4, (W, 0), 1),  # MHA, a 4-token step, one split forced
    (2, 4, 32, 8, 64, 256, [50, 200], [3, 0], 0, (W, W), 3),  # nothing appended, left padding, 3 splits
    (2, 1, 32, 8, 64, 100, [10, 90], [0, 5], 1, (W, 0), 0),  # a short cache: one split by the heuristic
    (1, 8, 32, 8, 64, 512, [300], None, 8, (64, 0), 0),  # 32 rows per K/V head, a window: 4 splits
]
FIELDS = ("B", "Tq", "H", "Hkv", "D", "Tmax", "lengths", "leftpad", "t_new", "window", "num_splits")


@pytest.fixture(scope="module")
def captured(sample):
    return aot_jit_launches(sample[0], [dict(zip(FIELDS, c), op="decode", dtype="fp16") for c in CASES])


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"case{i}")
def test_recorded_launches_are_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    B, Tq, H, Hkv, D, Tmax, lengths, leftpad, t_new, window, splits = CASES[i]
    kernels = ["_decode_append_kernel"] * bool(t_new) + ["_decode_kernel"]
    assert [launch["kernel"] for launch in jit] == [launch["kernel"] for launch in aot]
    assert [launch["kernel"] for launch in aot][: len(kernels)] == kernels
    for j, a in zip(jit, aot):
        assert_aot_launch_is_the_jit_launch(j, a)
    assert ("split" in aot[len(kernels) - 1]["case"]) == (len(aot) == len(kernels) + 1)  # the combine after splits
    assert ("leftpad" in aot[len(kernels) - 1]["case"]) == (leftpad is not None)


def _block_ns(records):
    return [r["constexprs"][6] for r in records if r["kernel"] == "_decode_kernel"]  # BLOCK_N


def test_tuning_times_each_shipped_tile_once_per_shape_class_and_keeps_the_fastest(registry):
    def call(Tmax):
        q, kc, vc, _, _, lengths = _tensors(Tmax=Tmax, t_new=0)  # 4 rows per K/V head: BLOCK_M 16
        torch.ops.fasttrain.decode_aot(q, kc, vc, None, None, lengths, None, 0.125, UNBOUNDED, 0, 1)
        launches = _block_ns(C.aot_records())
        C.aot_record(True, SM)  # clears
        return launches

    C.aot_tune_reset([3.0, 1.0, 1.0, 2.0])  # ms: the recorded trials' times, in order
    assert call(256) == [64, 128, 128]  # a trial of each tile (the first config's first), then the faster
    assert call(256) == [128]  # the class's choice, cached
    assert call(512) == [64, 128, 64]  # another t_cache_bucket: its own trials
    assert call(200) == [128]  # the same bucket (256) as the first
    assert call(1024) == [64] and call(1024) == [64]  # no times left: the first tile, untimed, uncached
    C.aot_tune_reset([1.0, 2.0])
    assert call(256) == [64, 128, 64]  # reset: tuned afresh


def test_tuning_leaves_a_class_with_one_shipped_tile_untimed(registry):
    C.aot_tune_reset([1.0, 2.0])
    q, kc, vc, k, v, lengths = _tensors(t_new=1)
    torch.ops.fasttrain.decode_aot(q, kc, vc, k, v, lengths, lengths, 0.125, UNBOUNDED, 0, 1)  # left padding
    assert _block_ns(C.aot_records()) == [64]
    C.aot_record(True, SM)  # clears
    torch.ops.fasttrain.decode_aot(q, kc, vc, k, v, lengths, None, 0.125, UNBOUNDED, 0, 1)  # two tiles: both times
    assert _block_ns(C.aot_records()) == [64, 128, 64]


# ---- persisted tuning (fasttrain/_aot.py): the recorder's trial times stand in for the GPU's -------------------------

IDENTITY = {"device": "Test GPU 80GB", "capability": "9.0", "index": "0123abcd", "fasttrain": "0.1.0", "torch": "2"}


@pytest.fixture
def tune_cache(registry, tmp_path, monkeypatch):
    """The tuner's choices persisted under tmp_path for IDENTITY; detached after the test."""
    from fasttrain import _aot

    monkeypatch.setenv("FASTTRAIN_AOT_TUNE_DIR", str(tmp_path / "aot_tune"))
    monkeypatch.delenv("FASTTRAIN_AOT_TUNE_CACHE", raising=False)
    _aot.detach_tune_cache()
    yield _aot
    _aot.detach_tune_cache()


def _tuned_call(Tmax=256):
    """The BLOCK_N of each decode launch of one call of a two-tile shape class (the trials, then the choice)."""
    q, kc, vc, _, _, lengths = _tensors(Tmax=Tmax, t_new=0)
    torch.ops.fasttrain.decode_aot(q, kc, vc, None, None, lengths, None, 0.125, UNBOUNDED, 0, 1)
    launches = _block_ns(C.aot_records())
    C.aot_record(True, SM)  # clears
    return launches


def test_a_tuned_choice_is_saved_and_read_back_without_trials(tune_cache, tmp_path):
    path = tune_cache.attach_tune_cache(IDENTITY)
    assert path.parent == tmp_path / "aot_tune" and path.name.startswith("Test_GPU_80GB-sm90-") and not path.exists()
    C.aot_tune_reset([3.0, 1.0])
    assert _tuned_call() == [64, 128, 128]  # trials, then the faster tile: saved at once
    data = json.loads(path.read_text())
    assert data["identity"] == IDENTITY and [c[0] for c in data["choices"]] == ["_decode_kernel"]
    assert data["choices"][0][2] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    # a new process: nothing tuned, no trial times; the file's choice launches without trials
    tune_cache.detach_tune_cache()
    C.aot_tune_reset()
    assert tune_cache.attach_tune_cache(IDENTITY) == path
    assert _tuned_call() == [128]
    assert _tuned_call(512) == [64]  # another class: not in the file, no times left: untimed, unsaved
    assert len(json.loads(path.read_text())["choices"]) == 1


def test_a_device_whose_cubins_serve_attaches_its_tuning_file(tmp_path, monkeypatch):
    from fasttrain import _aot

    (tmp_path / "aot").mkdir()
    (tmp_path / "aot" / "index.json").write_text("[]")
    monkeypatch.setenv("FASTTRAIN_AOT_TUNE_DIR", str(tmp_path / "cache" / "aot_tune"))
    monkeypatch.delenv("FASTTRAIN_AOT_TUNE_CACHE", raising=False)
    monkeypatch.setattr(_aot, "AOT_DIR", tmp_path / "aot")
    monkeypatch.setattr(_aot, "_device_reason", {})
    monkeypatch.setattr(_aot, "_arch_reason", lambda arch: None)  # the cubins registered
    monkeypatch.setattr(_aot._extension, "built_with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    _aot.detach_tune_cache()
    try:
        assert _aot.reason(torch.device("cuda", 0)) is None
        identity = _aot._tune["identity"]
        assert identity["device"] == "NVIDIA H100 80GB HBM3" and identity["capability"] == "9.0"
        assert identity["fasttrain"] == fasttrain.__version__ and len(identity["index"]) == 16
        assert _aot._tune["path"].parent == tmp_path / "cache" / "aot_tune"
        assert _aot._tune["path"].name.startswith("NVIDIA_H100_80GB_HBM3-sm90-")
    finally:
        _aot.detach_tune_cache()


@pytest.mark.parametrize(
    "capability, arch", [((9, 0), 90), ((8, 0), 80), ((8, 9), 80), ((9, 1), None), ((10, 0), None)]
)
def test_a_device_is_served_by_the_cubins_of_its_arch(monkeypatch, capability, arch):
    from fasttrain import _backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert _backend.aot_arch(torch.device("cuda", 0)) == arch
    assert _backend.aot_arch(torch.device("cpu")) is None


@pytest.mark.parametrize("index, why", [("[]", "sm_80 (the build's FASTTRAIN_AOT_ARCHS left it out)"), (None, "=none")])
def test_a_build_without_cubins_for_the_device_names_the_build_switch(tmp_path, monkeypatch, index, why):
    from fasttrain import _aot

    (tmp_path / "aot").mkdir()
    if index is not None:  # a build of other archs; else FASTTRAIN_AOT_ARCHS=none (no index at all)
        (tmp_path / "aot" / "index.json").write_text(index)
    monkeypatch.setattr(_aot, "AOT_DIR", tmp_path / "aot")
    monkeypatch.setattr(_aot, "_device_reason", {})
    monkeypatch.setattr(_aot, "_loaded", {})
    monkeypatch.setattr(_aot._extension, "built_with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert why in _aot.reason(torch.device("cuda", 0))


_CHILD = """
import json, sys
import torch
import fasttrain._C as C
from fasttrain import _aot
from fasttrain.benchmarks import bench_overhead
from fasttrain.ops.attention_reference import UNBOUNDED

bench_overhead._register_described(torch.float16)  # launch-less entries of the shipped set: no cubin is read
C.aot_record(True, 132)
C.aot_tune_reset(json.loads(sys.argv[1]))
_aot.attach_tune_cache(json.loads(sys.argv[2]))
q = torch.randn(2, 1, 32, 64, dtype=torch.float16)
kc, vc = (torch.randn(2, 256, 8, 64, dtype=torch.float16) for _ in "kv")
lengths = torch.tensor([5, 100], dtype=torch.int32)
torch.ops.fasttrain.decode_aot(q, kc, vc, None, None, lengths, None, 0.125, UNBOUNDED, 0, 1)
print(json.dumps([r["constexprs"][6] for r in C.aot_records() if r["kernel"] == "_decode_kernel"]))
"""


@pytest.mark.slow  # two interpreters importing torch; the default run resets the tuner in-process instead
def test_a_new_process_launches_the_saved_choice_without_trials(tmp_path):
    def child(times):
        env = {**os.environ, "FASTTRAIN_AOT_TUNE_DIR": str(tmp_path / "aot_tune"), "PYTHONSAFEPATH": "1"}
        env.pop("FASTTRAIN_AOT_TUNE_CACHE", None)
        args = [sys.executable, "-c", _CHILD, json.dumps(times), json.dumps(IDENTITY)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]  # exits cleanly with the saver attached
        return json.loads(done.stdout.splitlines()[-1])

    assert child([3.0, 1.0]) == [64, 128, 128]  # trials, then the faster tile, saved
    assert child([]) == [128]  # no trial times: the saved choice, not the untimed first tile


def test_the_tuning_cache_is_off_with_its_switch(tune_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_AOT_TUNE_CACHE", "0")
    assert tune_cache.attach_tune_cache(IDENTITY) is None
    C.aot_tune_reset([3.0, 1.0])
    assert _tuned_call() == [64, 128, 128]
    assert not (tmp_path / "aot_tune").exists()


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "identity": {"device": "other"}, "choices": []}'])
def test_a_corrupt_or_foreign_tuning_file_is_ignored_with_one_warning(tune_cache, content):
    path = tune_cache.tune_cache_path(IDENTITY)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="aot tuning") as caught:
        tune_cache.attach_tune_cache(IDENTITY)
    assert len(caught) == 1
    C.aot_tune_reset([1.0, 2.0])
    assert _tuned_call() == [64, 128, 64]  # tuned afresh, and the file rewritten as this device's
    assert json.loads(path.read_text())["identity"] == IDENTITY


def test_the_tuning_file_is_replaced_whole_or_left_as_it_was(tune_cache, monkeypatch):
    path = tune_cache.attach_tune_cache(IDENTITY)
    C.aot_tune_reset([3.0, 1.0, 1.0, 2.0])
    assert _tuned_call() == [64, 128, 128]
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tune_cache.os, "replace", fail)
    with pytest.warns(UserWarning, match="cannot write the aot tuning cache"):
        assert _tuned_call(512) == [64, 128, 64]  # the op goes on
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_tuning_file_that_cannot_be_written_never_fails_the_op_under_warnings_as_errors(tune_cache, monkeypatch):
    path = tune_cache.attach_tune_cache(IDENTITY)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tune_cache.os, "replace", fail)
    C.aot_tune_reset([3.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tuned_call() == [64, 128, 128]  # the warning is dropped, not raised from inside the op
    assert not path.exists()


def _tensors(B=2, Tq=1, H=32, Hkv=8, D=64, Tmax=256, t_new=1, dtype=torch.float16):
    torch.manual_seed(0)
    q = torch.randn(B, Tq, H, D, dtype=dtype)
    kc, vc = (torch.randn(B, Tmax, Hkv, D, dtype=dtype) for _ in "kv")
    k, v = (torch.randn(B, t_new, Hkv, D, dtype=dtype) for _ in "kv") if t_new else (None, None)
    return q, kc, vc, k, v, torch.tensor([5, 100][:B], dtype=torch.int32)


def test_inputs_the_cubins_cannot_take_are_copied_the_caches_refused(registry):
    q, kc, vc, k, v, lengths = _tensors()
    odd_q = torch.randn(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes past an aligned address
    wide = lengths.long()  # int64 lengths: narrowed to the int32 the cubins read
    torch.ops.fasttrain.decode_aot(odd_q, kc, vc, k, v, wide, None, 0.125, UNBOUNDED, 0, 1)
    append, dec = C.aot_records()
    assert append["args"][0] == dec["args"][0] != odd_q.data_ptr() and dec["args"][0] % 16 == 0
    assert dec["args"][3] != wide.data_ptr()
    odd_cache = torch.randn(2, 256, 8, 65, dtype=q.dtype)[..., :64]  # rows of 65: strides not multiples of 16
    with pytest.raises(RuntimeError, match="strides that are multiples of 16"):
        torch.ops.fasttrain.decode_aot(q, odd_cache, vc, k, v, lengths, None, 0.125, UNBOUNDED, 0, 1)
    with pytest.raises(RuntimeError, match="num_splits must lie in"):
        torch.ops.fasttrain.decode_aot(q, kc, vc, k, v, lengths, None, 0.125, UNBOUNDED, 0, 129)
    C.aot_record(False, 0)
    with pytest.raises(RuntimeError, match="only while launches are recorded"):
        torch.ops.fasttrain.decode_aot(q, kc, vc, k, v, lengths, None, 0.125, UNBOUNDED, 0, 1)


def test_meta_gives_the_shapes():
    q, kc, vc, k, v, lengths = (None if t is None else t.to("meta") for t in _tensors(Tq=3, H=4, Hkv=4))
    out, lse = torch.ops.fasttrain.decode_aot(q, kc, vc, k, v, lengths, None, 0.125, UNBOUNDED, 0, 0)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32


def _reason(q, kc, vc, rotary_cos=None, batch_idx=None, block_table=None, softcap=0.0, alibi=None, splits=0):
    return ops._aot_reason(q, kc, vc, rotary_cos, batch_idx, block_table, softcap, alibi, splits)


def test_the_column_takes_its_scope_and_says_why_not_otherwise(monkeypatch):
    q, kc, vc, *_ = _tensors()
    assert _reason(q, kc, vc) is not None  # CPU tensors: the aot backend serves CUDA
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    assert _reason(q, kc, vc) is None and _reason(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), splits=128) is None
    for D in (128, 256):
        assert _reason(*(t[..., :1].expand(*t.shape[:-1], D).contiguous() for t in (q, kc, vc))) is None
    lengths = torch.tensor([1, 2])
    refused = {
        "fp16 or bf16": _reason(q.float(), kc.float(), vc.float()),
        "head_dim 64, 128 or 256": _reason(q[..., :32], kc[..., :32].contiguous(), vc[..., :32].contiguous()),
        "rotary": _reason(q, kc, vc, rotary_cos=torch.ones(8, 32)),
        "cache_batch_idx": _reason(q, kc, vc, batch_idx=lengths),
        "block_table": _reason(q, kc, vc, block_table=lengths[:, None]),
        "softcap": _reason(q, kc, vc, softcap=30.0),
        "alibi": _reason(q, kc, vc, alibi=torch.ones(32)),
        "at most 128 splits": _reason(q, kc, vc, splits=129),
        "16-byte aligned": _reason(q, torch.randn(2, 256, 8, 72, dtype=q.dtype)[..., :64], vc),
        "16-byte aligned rows": _reason(q, kc, torch.randn(vc.numel() + 1, dtype=q.dtype)[1:].view(vc.shape)),
    }
    for words, why in refused.items():
        assert why is not None and words in why, (words, why)


def test_the_public_function_takes_the_column_and_torch_compile_traces_it(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    q, kc, vc, k, v, lengths = _tensors(B=1, Tq=1, Tmax=512)  # 4 splits by the heuristic
    scale = 0.125

    def step(q, kc, vc, k, v, lengths):
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, causal=True, check_lengths=False)

    step(q, kc, vc, k, v, lengths)
    eager = C.aot_records()
    C.aot_record(True, SM)
    torch.ops.fasttrain.decode_aot(q, kc, vc, k, v, lengths, None, scale, UNBOUNDED, 0, 0)
    direct = C.aot_records()
    assert [r["kernel"] for r in eager] == ["_decode_append_kernel", "_decode_kernel", "_decode_combine_kernel"]
    # the same launches; outputs and partials are fresh allocations per call
    strip = [
        [{**r, "args": [bool(a) if t == "ptr" else a for t, a in zip(r["types"], r["args"])]} for r in rs]
        for rs in (eager, direct)
    ]
    assert strip[0] == strip[1]
    C.aot_record(True, SM)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, k, v, lengths)
    assert out.shape == q.shape and [r["kernel"] for r in C.aot_records()] == [r["kernel"] for r in eager]


def _launches(records):
    """The recorded launches with each address reduced to whether it is null (fresh allocations per call)."""
    return [{**r, "args": [bool(a) if t == "ptr" else a for t, a in zip(r["types"], r["args"])]} for r in records]


SHORT_CALLS = {  # the generation loops' calls: fasttrain.generate's, then the Hugging Face integration's
    "generate": lambda q, kc, vc, k, v, lengths: flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lengths, causal=True, window_size=(-1, -1), check_lengths=False
    ),
    "hf, left padded": lambda q, kc, vc, k, v, lengths: flash_attn_with_kvcache(
        q,
        kc,
        vc,
        cache_seqlens=lengths + 1,
        cache_leftpad=torch.tensor([3, 0][: q.shape[0]], dtype=torch.int64),
        softmax_scale=0.1,
        causal=True,
        window_size=(7, -1),
        softcap=0.0,
        check_lengths=False,
    ),
}


@pytest.mark.parametrize("call", list(SHORT_CALLS))
def test_short_path_takes_the_loops_call_and_launches_what_the_general_path_does(registry, monkeypatch, call):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    runs = []
    for short in (True, False):
        q, kc, vc, k, v, lengths = _tensors(B=1, Tmax=512)  # 4 splits by the heuristic: all three kernels
        if short:  # the short path never asks the table
            monkeypatch.setattr(ops.DECODE, "choose", lambda *a, **k: pytest.fail("the general path ran"))
        else:
            monkeypatch.undo()
            monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
            monkeypatch.setattr(ops, "_AOT_OP", None)
        out = SHORT_CALLS[call](q, kc, vc, k, v, lengths)
        assert out.shape == q.shape
        runs.append(_launches(C.aot_records()))
        C.aot_record(True, SM)  # clears
    assert runs[0] == runs[1] and len(runs[0]) >= 2


def test_short_path_leaves_every_other_call_to_the_general_path(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    chosen = []
    choose = ops.DECODE.choose
    monkeypatch.setattr(ops.DECODE, "choose", lambda *a, **k: chosen.append(1) or choose(*a, **k))
    q, kc, vc, k, v, lengths = _tensors(B=1, Tmax=512)  # 4 splits: the sample's combine
    kw = dict(cache_seqlens=lengths, causal=True)
    general = [
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, **kw),  # check_lengths (a host read of the lengths)
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, **kw, check_lengths=False, return_softmax_lse=True),
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, **kw, check_lengths=False, backend="aot"),
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, **kw, check_lengths=False, window_size=[-1, -1]),
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, **kw, check_lengths=False, softmax_scale=1),
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=5, causal=True, check_lengths=False),
        lambda: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, causal=1, check_lengths=False),
    ]
    for i, call in enumerate(general):
        call()
        assert len(chosen) == i + 1, i
    monkeypatch.setenv("FASTTRAIN_BACKEND", "aot")  # forced: the general path chooses
    flash_attn_with_kvcache(q, kc, vc, k, v, **kw, check_lengths=False)
    assert len(chosen) == len(general) + 1
    monkeypatch.delenv("FASTTRAIN_BACKEND")
    with pytest.raises(TypeError, match="window_size must be a pair of ints"):
        flash_attn_with_kvcache(q, kc, vc, k, v, **kw, check_lengths=False, window_size=(0.5, 0))
    # csrc/aot_short.cpp's own copy of the most splits the shipped combine takes (_AOT_MAX_SPLITS)
    args = (q, kc, vc, k, v, lengths, None, None, True, (-1, -1))
    assert C.decode_short(*args, ops._AOT_MAX_SPLITS + 1) is None
    assert C.decode_short(*args, 4).shape == q.shape  # 4: the sample's combine
    # a bad argument never reaches the op: the general path raises its error
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        flash_attn_with_kvcache(q, kc, vc[:, :7], k, v, **kw, check_lengths=False)


# ---- on a GPU: the column against the triton column and the reference ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,Tq,H,Hkv,D,Tmax,t_new,leftpad,window,splits",
    [
        (1, 1, 32, 8, 128, 4096, 1, False, (-1, -1), 0),
        (1, 4, 32, 8, 64, 1025, 4, True, (-1, -1), 0),
        (3, 1, 16, 16, 256, 97, 1, False, (-1, -1), 1),
        (2, 8, 32, 4, 128, 2048, 0, True, (100, 0), 5),
        (16, 1, 32, 8, 128, 1024, 1, False, (-1, -1), 0),
    ],
    ids=str,
)
def test_gpu_aot_matches_triton_and_the_reference(B, Tq, H, Hkv, D, Tmax, t_new, leftpad, window, splits, dtype):
    torch.manual_seed(0)
    q = torch.randn(B, Tq, H, D, device="cuda", dtype=dtype)
    kc, vc = (torch.randn(B, Tmax, Hkv, D, device="cuda", dtype=dtype) for _ in "kv")
    k, v = (torch.randn(B, t_new, Hkv, D, device="cuda", dtype=dtype) for _ in "kv") if t_new else (None, None)
    lengths = torch.randint(Tmax // 2, Tmax - t_new + 1, (B,), device="cuda", dtype=torch.int32)
    pad = torch.randint(0, Tmax // 4, (B,), device="cuda", dtype=torch.int32) if leftpad else None
    assert ops.DECODE.choose(q, kc, vc, None, None, None, 0.0, None, splits) == "aot"
    results = {}
    for backend in ("aot", "triton", "reference"):
        caches = kc.clone(), vc.clone()
        out, lse = flash_attn_with_kvcache(
            q, *caches, k, v, cache_seqlens=lengths, cache_leftpad=pad, causal=True, window_size=window,
            num_splits=splits, return_softmax_lse=True, backend=backend,
        )  # fmt: skip
        results[backend] = (out, lse, *caches)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for got, want, ref in zip(results["aot"], results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        # The same kernels, but the JIT's autotuner may pick another tile (another summation order): within a rounding
        torch.testing.assert_close(got.float(), want.float(), atol=ulp, rtol=ulp)
        torch.testing.assert_close(got.float(), ref.float(), atol=2 * ulp, rtol=2 * ulp)


@pytest.mark.gpu
def test_gpu_aot_is_chosen_and_off_switches_select_the_jit(monkeypatch):
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, 256, 8, 128, device="cuda", dtype=torch.bfloat16)
    assert ops.DECODE.choose(q, kc, kc, None, None, None, 0.0, None, 0) == "aot"
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert ops.DECODE.choose(q, kc, kc, None, None, None, 0.0, None, 0) == "triton"


@pytest.mark.gpu
def test_gpu_tuning_under_graph_capture_takes_the_first_tile_and_replays_as_eager():
    C.aot_tune_reset()
    torch.manual_seed(0)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    lengths = torch.tensor([1500], device="cuda", dtype=torch.int32)
    args = (q, kc, vc, None, None, lengths, None, 128**-0.5, UNBOUNDED, 0, 0)
    torch.ops.fasttrain.decode_aot(*args)  # eager: every tile's module loaded, the class tuned
    torch.cuda.synchronize()
    C.aot_tune_reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a fresh class under capture: nothing timed (no sync), the first tile
        out, lse = torch.ops.fasttrain.decode_aot(*args)
    graph.replay()
    want, want_lse = torch.ops.fasttrain.decode_aot(*args)  # eager: tuned now, maybe another tile
    torch.testing.assert_close(out.float(), want.float(), atol=2.0**-7, rtol=2.0**-7)
    torch.testing.assert_close(lse, want_lse)
