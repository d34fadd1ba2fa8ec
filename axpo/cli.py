"""The `axpo` command line: info | bench."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

BENCH_FAMILIES = ("logprob_entropy", "group_advantages", "policy_loss", "fork_kv")


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return f"not installed ({e.__class__.__name__})"
    return getattr(mod, "__version__", "unknown")


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
        for op in _backend.DEFAULT_BACKEND:
            print(f"  default for {op}: {_backend.resolve(op, torch.device(device), None)}")
    forced = __import__("os").environ.get(_backend.ENV_BACKEND)
    if forced:
        print(f"\n{_backend.ENV_BACKEND}={forced} forces that backend for every op")
    return 0


def cmd_bench(args, rest: list[str]) -> int:
    family = args.family
    if family not in BENCH_FAMILIES:
        print(f"axpo bench: unknown family {family!r}; choose from {', '.join(BENCH_FAMILIES)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"axpo.benchmarks.bench_{family}")
    return mod.main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="axpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends are available here (and why not)")
    bench = sub.add_parser(
        "bench", help="benchmark an op family against the PyTorch reference",
        description="Extra arguments go to the family's script (axpo bench logprob_entropy --help).",
    )
    bench.add_argument("family", nargs="?", default="logprob_entropy", choices=BENCH_FAMILIES)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_info(args)
    return cmd_bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
