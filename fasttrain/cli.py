"""`fasttrain train | data | eval | generate | check | export | bench | info`.

A mistake the user can fix (a bad key, a missing file, a value out of range, a damaged checkpoint, a diverged run)
ends with one line `fasttrain: error: ...` and exit code 2; a file-system failure (permission, read-only, no space)
ends with one line naming the path and exit code 1. --debug (or FASTTRAIN_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from fasttrain.info import report

    print(report())
    return 0


def _out_dir(preset, files: list[dict], overrides: dict) -> str:
    """train.out_dir as the overrides, else the last config file naming it, else the preset gives it: read, not
    built, since the run's own config.json (not the preset) is what the other settings are checked against."""
    for update in (overrides, *reversed(files)):
        section = update.get("train")
        if isinstance(section, dict) and section.get("out_dir") is not None:
            return section["out_dir"]
    return preset.train.out_dir


def _train(args: argparse.Namespace) -> int:
    from fasttrain.config import ConfigError, from_dict, load_file, parse_overrides
    from fasttrain.train import RunConfig, train
    from fasttrain.train.config import build
    from fasttrain.train.presets import PRESETS

    overrides = parse_overrides(RunConfig, args.extra)
    files = [load_file(f) for f in args.config]
    if args.resume is not None:
        run = Path(args.resume or _out_dir(PRESETS[args.preset](), files, overrides))
        if not (run / "config.json").is_file():
            raise ConfigError(f"--resume: {str(run)!r} is not a run directory (no config.json)")
        base = from_dict(RunConfig, load_file(run / "config.json"))
        cfg = build(base, *files, overrides, {"train": {"out_dir": str(run)}})
    else:
        cfg = build(PRESETS[args.preset](), *files, overrides)
    result = train(cfg, resume=args.resume is not None)
    m = result.metrics
    if m.train_loss:
        print(f"train loss {m.train_loss[0]:.4f} (step {m.steps[0]}) -> {m.train_loss[-1]:.4f} (step {m.steps[-1]})")
    if m.val_loss:
        best = "none finite" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
        print(
            f"val loss {m.val_loss[-1]:.4f}, perplexity {m.val_perplexity[-1]:.2f}, "
            f"accuracy {m.val_accuracy[-1]:.3f}; best val loss {best}"
        )
    print(f"run directory: {result.run_dir}")
    if result.sample is not None:
        print(f"--- sample ---\n{result.sample}\n--------------")
    # Under torchrun every rank ends a stop it was asked for with 0: torchrun counts any other code as the job failing
    # (and --max-restarts would start it again).
    return 130 if result.stopped == "interrupted" and "TORCHELASTIC_RUN_ID" not in os.environ else 0


def _data(args: argparse.Namespace) -> int:
    from fasttrain.config import load_file, parse_overrides
    from fasttrain.data import prepare
    from fasttrain.train import RunConfig
    from fasttrain.train.config import build
    from fasttrain.train.presets import PRESETS

    # The config `fasttrain train` would build from the same arguments, so its shards are the ones training reuses.
    paths = {"data": {"paths": args.paths}} if args.paths else {}
    cfg = build(
        PRESETS[args.preset](), *(load_file(f) for f in args.config), parse_overrides(RunConfig, args.extra), paths
    )
    if cfg.data.format == "prompt_completion":
        from fasttrain.data.examples import prepare_examples

        examples = prepare_examples(cfg.data)
        examples.fit(cfg.train.seq_len)  # the cut and dropped examples that training would count
        examples.report()
        return 0
    prepare(cfg.data).report()
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    import numpy as np

    from fasttrain.data import Batches, prepare
    from fasttrain.train.build import load_for_inference
    from fasttrain.train.device import resolve_device

    device = resolve_device(args.device)
    model, tokenizer, cfg = load_for_inference(args.checkpoint, args.which, device)
    seq_len = args.seq_len or cfg.train.seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = "byte"
        if hasattr(tokenizer, "save"):  # the run's own tokenizer, so the data is tokenized exactly as in training
            spec = str(Path(tmp) / "tokenizer.json")
            tokenizer.save(spec)
        data_cfg = dataclasses.replace(
            cfg.data, paths=[args.data], include=[], exclude=[], tokenizer=spec, val_fraction=0.0, max_bytes=None
        )
        if cfg.data.format == "prompt_completion":  # the run's kind of data: the completions' loss only
            return _eval_examples(args, model, data_cfg, seq_len, cfg, device)
        corpus = prepare(data_cfg)
    tokens = np.concatenate([corpus.train, corpus.val]) if len(corpus.val) else corpus.train
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"--data {args.data!r} has {len(tokens)} tokens; evaluating at seq_len {seq_len} needs "
            f"at least {seq_len + 1}"
        )
    windows = (len(tokens) - 1) // seq_len
    batch_size, n_batches = _batch_plan(args, windows)
    batches = Batches(tokens, batch_size, seq_len, mode="sequential")
    return _report_eval(model, batches, n_batches, cfg, device, f"{n_batches * batch_size * seq_len:,} tokens")


def _batch_plan(args, items: int) -> tuple[int, int]:
    """(batch_size, n_batches) for `fasttrain eval`: every window or row at most once, at most batch_size - 1 left
    over, at most --max-batches batches."""
    batch_size = min(args.batch_size, items)
    n_batches = items // batch_size
    if args.max_batches is not None:
        n_batches = min(n_batches, args.max_batches)
    return batch_size, n_batches


def _report_eval(model, batches, n_batches: int, cfg, device, what: str) -> int:
    """Evaluate n_batches of batches in the run's precision and print the loss, perplexity and accuracy over what."""
    from fasttrain.train.callbacks import evaluate
    from fasttrain.train.device import autocast_for, resolve_precision

    autocast = autocast_for(resolve_precision(cfg.train.precision, device), device)
    result = evaluate(model, batches, n_batches, device, autocast)
    print(
        f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  accuracy {result['accuracy']:.4f}  ({what})"
    )
    return 0


def _eval_examples(args, model, data_cfg, seq_len: int, cfg, device) -> int:
    """`fasttrain eval` of a run trained on prompt/completion JSONL: every example of --data once, in order, packed
    or padded as in training; the loss, perplexity and accuracy of the completion tokens."""
    from fasttrain.data.examples import ExampleBatches, prepare_examples

    examples = prepare_examples(data_cfg)
    examples.fit(seq_len)
    if not examples.train:
        raise ValueError(f"--data {args.data!r} has no example with a completion token within seq_len {seq_len}")
    mode = "pack" if cfg.data.packing else "pad"
    rows = len(ExampleBatches(examples.train, 1, seq_len, mode).rows)
    batch_size, n_batches = _batch_plan(args, rows)
    batches = ExampleBatches(examples.train, batch_size, seq_len, mode, examples.tokenizer.eot_id, shuffle=False)
    what = f"{n_batches * batch_size} rows of {seq_len} tokens; completion tokens only"
    return _report_eval(model, batches, n_batches, cfg, device, what)


DEFAULT_NEW_TOKENS = 200  # --max-new-tokens when not given, capped by the room the prompt leaves


def _generate(args: argparse.Namespace) -> int:
    from fasttrain.generate import generate
    from fasttrain.train.build import load_for_inference
    from fasttrain.train.device import autocast_for, resolve_device, resolve_precision

    device = resolve_device(args.device)
    model, tokenizer, cfg = load_for_inference(args.checkpoint, args.which, device)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt must encode to at least one token, got an empty prompt")
    # The last new token is never fed back: prompt + n new tokens take len(prompt) + n - 1 positions.
    room = model.config.max_seq_len + 1 - len(prompt)
    if room < 1:
        raise ValueError(
            f"--prompt is {len(prompt)} tokens, more than the model's max_seq_len {model.config.max_seq_len}"
        )
    max_new_tokens = min(DEFAULT_NEW_TOKENS, room) if args.max_new_tokens is None else args.max_new_tokens
    if max_new_tokens > room:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} after the prompt's {len(prompt)} tokens exceeds the "
            f"model's max_seq_len {model.config.max_seq_len}; use at most {room}"
        )
    new: list[int] = []
    shown = None  # the text printed after the prompt; None until generate() has taken its arguments

    def stream(_: int, token: int) -> None:
        # Decode everything so far and print the new suffix: a byte or BPE token may end mid-character.
        nonlocal shown
        if shown is None:
            print(args.prompt, end="", flush=True)
            shown = ""
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):
            print(text[len(shown) :], end="", flush=True)
            shown = text

    with autocast_for(resolve_precision(cfg.train.precision, device), device)():
        result = generate(
            model,
            [prompt],
            max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=[tokenizer.eot_id],
            seed=args.seed,
            on_token=stream,
            compile=args.compile,
            cuda_graph=args.cuda_graph,
            vocab_size=tokenizer.vocab_size,
        )
    if shown is None:  # the first token was a stop token
        print(args.prompt, end="")
        shown = ""
    print(tokenizer.decode(new)[len(shown) :], flush=True)
    decode_tps = max(result.new_tokens - 1, 0) / result.decode_s if result.decode_s > 0 else float("nan")
    print(
        f"[{result.new_tokens} tokens; prefill {result.prompt_tokens} tokens in {result.prefill_s * 1e3:.1f} ms; "
        f"decode {decode_tps:.1f} tokens/s on {device}]",
        file=sys.stderr,
    )
    return 0


BENCHMARKS = (
    "adamw",
    "adamw_fsdp",
    "attention",
    "attention_masks",
    "cross_entropy",
    "linear_cross_entropy",
    "decode",
    "norms",
    "rotary",
    "activation",
    "swiglu",
    "step",
    "first_step",
    "hf_step",
    "overhead",
    "data",
    "lora",
)


def _check(args: argparse.Namespace) -> int:
    from fasttrain.config import load_file, parse_overrides
    from fasttrain.train import RunConfig
    from fasttrain.train.check import run_checks
    from fasttrain.train.config import build
    from fasttrain.train.presets import PRESETS

    cfg = build(PRESETS[args.preset](), *(load_file(f) for f in args.config), parse_overrides(RunConfig, args.extra))
    checks = run_checks(cfg, steps=args.steps, lr=args.lr)
    for check in checks:
        print(check.line(), flush=True)
    return 0 if all(c.passed is not False for c in checks) else 1


def _export(args: argparse.Namespace) -> int:
    from fasttrain.train.export import export_run

    out = export_run(args.checkpoint, args.to, which=args.which, force=args.force, adapters_only=args.adapters_only)
    what = "PEFT LoRA adapters" if args.adapters_only else "a transformers checkpoint"
    print(f"exported {args.checkpoint} ({args.which}) as {what}: {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    # PYTHONSAFEPATH: `-m` would put the working directory first on the path, where a source checkout's fasttrain/
    # (no _C, no kernels) would shadow the installed package.
    env = dict(os.environ, PYTHONSAFEPATH="1")
    failed = []
    for name in args.names or BENCHMARKS:
        cmd = [sys.executable, "-m", f"fasttrain.benchmarks.bench_{name}"]
        cmd += ["--device", args.device] if args.device else []
        cmd += ["--quick"] if args.quick else []
        cmd += ["--out", args.out] if args.out else []
        print(f"== {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(name)
    if failed:
        print(f"fasttrain: error: benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttrain", description=__doc__.splitlines()[0])
    debug_help = "show the traceback of an error instead of its one line (as FASTTRAIN_DEBUG=1 does)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add_command(*a, **kw):  # --debug after the command too, without masking one given before it
        p = add_parser(*a, **kw)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        return p

    sub.add_parser = add_command

    p = sub.add_parser("info", help="versions, device, and the live backends of each op")
    p.set_defaults(run=_info)

    from fasttrain.train.presets import PRESETS

    p = sub.add_parser(
        "train",
        help="train a GPT (no arguments: a small model on the Python standard library's source)",
        epilog="Overrides: --SECTION.FIELD VALUE for any field of the sections model, optim, train, data, init, "
        "finetune "
        "(e.g. --model.n_layer 4 --optim.lr 1e-3 --data.paths docs/,notes.md). Applied after the preset "
        "and the --config files, in that order. --init.from DIR starts from a Hugging Face checkpoint folder "
        "(GPT-2, Llama, Mistral, Qwen2): its model config, weights and tokenizer.json.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="starting config (default: gpu-default on a CUDA machine, tiny otherwise)",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="TOML (or a run's config.json) with [model], [optim], [train], [data] tables; repeatable",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN",
        help="continue the run in RUN (default: train.out_dir) from its latest checkpoint",
    )
    p.set_defaults(run=_train, accepts_extra=True)

    p = sub.add_parser(
        "data",
        help="prepare a corpus (read, tokenize, shard) and print its summary, without training",
        epilog="Takes train's --preset, --config and --data.FIELD VALUE overrides: the shards it builds are the "
        "ones `fasttrain train` with the same arguments reuses.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files and folders (default: the config's data.paths)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="starting config, as for train")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="TOML config, as for train")
    p.set_defaults(run=_data, accepts_extra=True)

    p = sub.add_parser("eval", help="loss, perplexity and next-token accuracy of a trained model on some data")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory (or checkpoint file)")
    p.add_argument("--data", required=True, metavar="PATH", help="file or directory to evaluate on")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint of the run (default best)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's train.seq_len")
    p.add_argument("--max-batches", type=int, default=None, help="default: every window of the data once")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(run=_eval)

    p = sub.add_parser("generate", help="continue a prompt with a trained model (KV cache), streaming the text")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory (or checkpoint file)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default: {DEFAULT_NEW_TOKENS}, or fewer where the model's max_seq_len leaves less room",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint of the run (default best)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the decode step in a CUDA graph (default: on a CUDA device)",
    )
    p.set_defaults(run=_generate)

    p = sub.add_parser(
        "check",
        help="debugging aids: initial loss vs ln(vocab), overfit one batch, float64 gradcheck, kernel gradients",
        epilog="Takes train's --preset, --config and --SECTION.FIELD overrides (--init.from DIR included). Exit code "
        "0 when every judged check passes, 1 otherwise.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model config (default tiny)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="TOML config, as for train")
    p.add_argument("--steps", type=int, default=200, help="most steps to overfit one batch (default 200)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the overfitting (default 3e-3)")
    p.set_defaults(run=_check, accepts_extra=True)

    p = sub.add_parser("export", help="write a trained run as a transformers checkpoint folder")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory (or checkpoint file)")
    p.add_argument("--to", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint of the run (default best)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    p.add_argument(
        "--adapters-only",
        action="store_true",
        help="write the LoRA adapters alone (PEFT's format) instead of the merged model",
    )
    p.set_defaults(run=_export)

    p = sub.add_parser("bench", help="run the benchmarks and write their JSON results")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"which to run (default all): {', '.join(BENCHMARKS)}")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="a few small shapes only (smoke test)")
    p.add_argument("--out", default=None, help="results folder (default ./benchmarks/results/<device>)")
    p.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: output still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`fasttrain info | head -1`): no traceback. Python's signal docs' recipe: stdout goes to
        # devnull, so that the interpreter's own flush at exit fails no more, and the exit status is 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for name in ("batch_size", "max_batches", "seq_len", "max_new_tokens", "steps"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        return args.run(args)
    except (ValueError, TypeError, FloatingPointError) as e:
        # Our contract: user mistakes raise ValueError/TypeError with a one-line message naming what to fix; a
        # diverged run raises FloatingPointError saying which setting to change.
        if args.debug or os.environ.get("FASTTRAIN_DEBUG") == "1":
            raise
        print(f"fasttrain: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:
        if isinstance(e, BrokenPipeError) or args.debug or os.environ.get("FASTTRAIN_DEBUG") == "1":
            raise  # a closed stdout is main's to end quietly
        print(f"fasttrain: error: {os_error_line(e)}", file=sys.stderr)
        return 1


_OS_ADVICE = {
    errno.EACCES: "check its permissions, or pick another folder",
    errno.EPERM: "check its permissions, or pick another folder",
    errno.EROFS: "it is on a read-only file system: pick a folder on a writable one",
    errno.ENOSPC: "the disk is full: free space on it, or pick a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free space, or pick a folder on another disk",
}


def os_error_line(e: OSError) -> str:
    """An OSError as one line: what failed, on which path, and what to do (whatever was saved before is intact,
    since every file of a run is replaced atomically)."""
    parts = [e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)]
    if e.filename is not None:
        parts[0] += f": {e.filename}"
    if e.errno in _OS_ADVICE:
        parts.append(_OS_ADVICE[e.errno])
    return "; ".join([*parts, "the files saved before are intact"])


if __name__ == "__main__":
    sys.exit(main())
