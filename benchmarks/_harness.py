"""Shared measuring code for axpo's benchmark scripts (all op families).

A family script describes *cases* (one input configuration: op, dtype, shape, how to build the
inputs) and *impls* (callables ``fn(inputs) -> tuple of outputs``, one of them the reference), and
hands them to :func:`run_case`, which for every (impl, mode) pair

1. skips (and records why) impls that are unavailable, or whose estimated memory exceeds
   ``mem_fraction`` of the free memory, or whose estimated time per call exceeds ``max_call_s``;
2. runs the impl once and compares its outputs (and, in ``fwd+bwd`` mode, the gradients of the
   inputs) with the reference's on the same input -- a mismatch is printed loudly and the row is
   flagged ``status="MISMATCH"``;
3. times it: median / p10 / p90 over ``repeats`` calls after ``warmup`` calls (CUDA events around
   each call with an L2 flush before it; ``time.perf_counter`` on CPU);
4. measures the peak memory of one call above what was allocated before it (inputs excluded):
   on CPU during the last timed call, on CUDA in one more call.

Modes: ``"fwd"`` runs the forward with inputs requiring grad (as in training, so saved tensors
count) and no backward; ``"fwd+bwd"`` also back-propagates ``sum_i sum(out_i * g_i)`` with fixed
random upstream gradients ``g_i``, so every output receives a gradient.

Writers produce ``<family>_<device-kind>.json|md|png`` under an output directory.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

MODES = ("fwd", "fwd+bwd")
DEFAULT_MEM_FRACTION = 0.6
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_kind(device: torch.device) -> str:
    """'cpu', or a slug of the GPU name without its memory-size suffix ('nvidia-h100', 'nvidia-h200')."""
    if device.type != "cuda":
        return device.type
    parts = _slug(torch.cuda.get_device_name(device)).split("-")
    kept = []
    for p in parts:
        if re.fullmatch(r"\d+gb", p):
            break
        kept.append(p)
    return "-".join(kept) or "cuda"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _meminfo_kib(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def free_memory_bytes(device: torch.device) -> int:
    """CPU: MemAvailable; CUDA: free device memory plus what torch's caching allocator holds unused."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    kib = _meminfo_kib("MemAvailable")
    if kib is None:  # not Linux: assume plenty, estimates only guard against swapping
        return 1 << 62
    return kib * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# environment record
# --------------------------------------------------------------------------------------------
def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return {"git_commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}


def collect_env(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_kind": device_kind(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
    }
    try:
        import triton  # noqa: PLC0415
        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not available ({type(e).__name__})"
    try:
        import axpo  # noqa: PLC0415
        env["axpo"] = getattr(axpo, "__version__", None)
    except Exception as e:  # noqa: BLE001
        env["axpo"] = f"import failed ({type(e).__name__}: {e})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "gpu_total_memory_bytes": props.total_memory,
            "gpu_capability": f"{props.major}.{props.minor}",
        })
    else:
        env["device_name"] = f"{env['cpu_model']} ({env['cpu_count']} cores, torch threads={env['torch_num_threads']})"
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["mkldnn_enabled"] = torch.backends.mkldnn.enabled
        try:
            from axpo.ops._dtypes import gemm_dtype  # noqa: PLC0415
            env["bf16_gemm_dtype"] = str(gemm_dtype(torch.bfloat16, device)).replace("torch.", "")
        except ImportError as e:  # axpo's import failure is already in env["axpo"]
            env["bf16_gemm_dtype"] = f"unknown ({type(e).__name__})"
    env.update(_git_commit())
    return env


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    times_ms: list[float]
    peak_extra_bytes: int | None = None  # CPU: measured during the last timed call, if asked

    @property
    def median_ms(self) -> float:
        return _percentile(self.times_ms, 0.5)

    @property
    def p10_ms(self) -> float:
        return _percentile(self.times_ms, 0.1)

    @property
    def p90_ms(self) -> float:
        return _percentile(self.times_ms, 0.9)


_l2_buffers: dict[str, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    key = str(device)
    buf = _l2_buffers.get(key)
    if buf is None:
        buf = _l2_buffers[key] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()


def time_fn(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int,
            setup: Callable[[], None] | None = None, flush_l2: bool = True,
            cpu_memory_on_last: bool = False) -> Timing:
    """Median-style timing of ``fn``; ``setup`` runs before every call, untimed.

    CUDA: one pair of CUDA events per call (do_bench style), optional L2 flush before each call,
    one synchronize at the end. CPU: ``time.perf_counter`` around each call; with
    ``cpu_memory_on_last`` the last call also gives the peak extra memory (the VmHWM reset and
    read happen outside the timed region), saving a separate call of slow CPU impls.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        out = fn()
        del out
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            if setup is not None:
                setup()
            if flush_l2:
                _flush_l2(device)
            starts[i].record()
            out = fn()
            ends[i].record()
            del out
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        peak_extra = None
        for i in range(repeats):
            if setup is not None:
                setup()
            mem = cpu_memory_on_last and i == repeats - 1
            if mem:
                base = _reset_cpu_peak()
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            if mem:
                peak_extra = max(_proc_status_bytes("VmHWM")["VmHWM"] - base, 0)
            del out
            times.append((t1 - t0) * 1e3)
        return Timing(times, peak_extra)
    return Timing(times)


# --------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------
CPU_MEM_METHOD = ("VmHWM - VmRSS after writing 5 to /proc/self/clear_refs (+ gc.collect and "
                  "malloc_trim(0) before); page granularity, about +-2 MiB of interpreter/allocator "
                  "noise in practice")


def measure_copy_bandwidth(device: torch.device, mib: int, repeats: int) -> dict:
    """The memory ceiling: a device copy of `mib` MiB, counting bytes read plus bytes written."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, repeats=max(repeats, 5), warmup=2, flush_l2=False)
    bw = 2 * n / (timing.median_ms * 1e-3)
    del src, dst
    return {"bytes": n, "median_ms": timing.median_ms, "bandwidth_GBps": bw / 1e9,
            "method": f"dst.copy_(src) of {mib} MiB uint8, (read + write) / median time"}


def measure_matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> dict:
    """The arithmetic ceiling: an [n, n] x [n, n] matrix product on random data (never zeros)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_fn(lambda: a @ b, device, repeats=max(repeats, 5), warmup=3, flush_l2=False)
    flops = 2 * n**3
    del a, b
    return {"flops": flops, "median_ms": timing.median_ms, "tflops": flops / (timing.median_ms * 1e-3) / 1e12,
            "method": f"[{n}, {n}] x [{n}, {n}] {dtype} matmul on random data, 2 n^3 / median time"}


def _proc_status_bytes(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> int:
    """gc + malloc_trim, reset VmHWM to the current RSS; returns that RSS (bytes)."""
    gc.collect()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS")["VmRSS"]


def cpu_clear_refs_usable() -> tuple[bool, str | None]:
    """Whether the in-process CPU peak-RSS method works here (Linux with writable clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmRSS", "VmHWM")["VmHWM"]
        return True, None
    except (OSError, KeyError) as e:
        return False, f"/proc/self/clear_refs unusable ({type(e).__name__}: {e})"


def measure_peak_extra(fn: Callable[[], Any], device: torch.device,
                       setup: Callable[[], None] | None = None) -> int:
    """Peak memory of one call of ``fn`` above what was allocated just before it, in bytes.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated``
    before. CPU: the process's peak RSS after resetting it (clear_refs "5" resets VmHWM) minus
    VmRSS before; large torch CPU tensors are mmap'd and returned to the OS when freed, and
    ``malloc_trim`` returns cached heap, so this tracks live memory.
    """
    if setup is not None:
        setup()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return int(peak - base)
    base = _reset_cpu_peak()
    out = fn()
    peak = _proc_status_bytes("VmHWM")["VmHWM"]
    del out
    return int(max(peak - base, 0))


def self_check_cpu_memory(nbytes: int = 256 * 1024 * 1024) -> dict[str, Any]:
    """Allocate-and-touch ``nbytes`` inside a measured call; returns measured vs expected."""
    n = nbytes // 4
    measured = measure_peak_extra(lambda: torch.ones(n), torch.device("cpu"))
    return {"allocated_bytes": nbytes, "measured_bytes": measured,
            "ratio": measured / nbytes if nbytes else math.nan}


# --------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------
def _nan_abs_max(t: torch.Tensor, chunk_elems: int = 1 << 22) -> float:
    """max |t| ignoring NaN, in chunks."""
    flat, m = t.detach().reshape(-1), 0.0
    for i in range(0, flat.numel(), chunk_elems):
        c = flat[i:i + chunk_elems].float().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
        if c.numel():
            m = max(m, float(c.max()))
    return m


def compare_tensors(actual: torch.Tensor, expected: torch.Tensor, atol: float,
                    rtol: float, chunk_elems: int = 1 << 22) -> tuple[bool, float, str]:
    """allclose in float64, evaluated in chunks (bounded memory); NaN in ``expected`` marks
    unchecked positions; non-finite ``actual`` where ``expected`` is finite fails.
    Returns (ok, max_abs_err, message)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return False, math.inf, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a_all = actual.detach().reshape(-1)
    e_all = expected.detach().reshape(-1)
    err, ok = 0.0, True
    for i in range(0, a_all.numel(), chunk_elems):
        a = a_all[i:i + chunk_elems].to(torch.float64)
        e = e_all[i:i + chunk_elems].to(torch.float64)
        checked = torch.isfinite(e)  # NaN expected: position not evaluated by the oracle
        if bool((checked & ~torch.isfinite(a)).any()):
            return False, math.inf, "non-finite values where the reference is finite"
        e = torch.where(checked, e, torch.zeros_like(e))
        diff = torch.where(checked, (a - e).abs(), torch.zeros_like(e))
        err = max(err, float(diff.max()))
        ok = ok and bool((diff <= atol + rtol * e.abs()).all())
        del a, e, diff, checked
    return ok, err, "" if ok else f"max abs err {err:.3g} > atol {atol:g} + rtol {rtol:g}*|ref|"


# --------------------------------------------------------------------------------------------
# cases and impls
# --------------------------------------------------------------------------------------------
@dataclass
class Impl:
    """One implementation to measure. ``fn(inputs) -> tuple`` of outputs (tensor or None)."""
    name: str
    fn: Callable[[dict[str, torch.Tensor]], tuple] | None
    backend: str | None = None
    reference: bool = False
    unavailable: str | None = None           # reason it cannot run (recorded as skipped)
    note: str = ""                           # what it does not compute, caveats
    compare_outputs: tuple[bool, ...] | None = None  # per output; None: compare all
    check_grads: bool = True                 # compare input gradients in fwd+bwd mode
    modes: tuple[str, ...] = MODES
    est_bytes: Callable[[str], float] | None = None     # mode -> extra bytes estimate
    est_seconds: Callable[[str], float] | None = None   # mode -> seconds per call estimate


@dataclass
class Case:
    op: str
    dtype: str
    shape: dict[str, int]
    make_inputs: Callable[[], dict[str, torch.Tensor]]   # differentiable inputs require grad
    make_upstream: Callable[[dict[str, torch.Tensor]], tuple]  # one fp32 tensor per output
    output_names: tuple[str, ...]
    atol: float
    rtol: float
    grad_tol: float
    input_bytes: int = 0
    # (inputs, upstream) -> (outputs, {input name: grad}); a memory-bounded reference used when the
    # reference itself cannot run on this case.
    oracle: Callable[[dict, tuple], tuple[tuple, dict[str, torch.Tensor]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the rows


@dataclass
class RunConfig:
    device: torch.device
    repeats: int
    warmup: int
    flush_l2: bool = True
    mem_fraction: float = DEFAULT_MEM_FRACTION
    max_call_s: float | None = None   # skip (impl, mode) whose estimate exceeds this; None: never
    measure_memory: bool = True
    # CPU fallback when clear_refs is unusable: (case, impl, mode) -> bytes, measured in a fresh
    # subprocess. None: memory not measured there.
    mem_probe: Callable[[Case, Impl, str], int | None] | None = None
    _cpu_inproc: bool | None = None

    def cpu_mem_method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated - memory_allocated (after reset_peak_memory_stats)"
        if self._cpu_inproc is None:
            self._cpu_inproc, _ = cpu_clear_refs_usable()
        if self._cpu_inproc:
            return CPU_MEM_METHOD
        return ("fresh subprocess per measurement (/proc/self/clear_refs unusable): VmHWM - "
                "VmRSS after a tiny warm-up call and building the inputs; includes transient peaks "
                "of input construction and first-call costs (~tens of MiB), coarser than in-process"
                if self.mem_probe else "not measured (/proc/self/clear_refs unusable)")


def forward_backward(fn: Callable[[], tuple], upstream: tuple, mode: str) -> tuple:
    outs = fn()
    if mode == "fwd":
        return outs
    loss = None
    for o, g in zip(outs, upstream):
        if o is None or g is None:
            continue
        term = (o.float() * g).sum()
        loss = term if loss is None else loss + term
    if loss is None or not loss.requires_grad:
        raise RuntimeError("no output requires grad: cannot run fwd+bwd")
    loss.backward()
    return outs


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def run_case(case: Case, impls: Sequence[Impl], modes: Sequence[str], cfg: RunConfig) -> list[dict]:
    """Measure every (impl, mode) on one case; returns one row per pair (reference impl first)."""
    device = cfg.device
    base = {"op": case.op, "dtype": case.dtype, **case.shape, **case.extra,
            "shape": " ".join(f"{k}={v}" for k, v in case.shape.items())}
    rows: list[dict] = []

    def row_for(impl: Impl, mode: str, **kw) -> dict:
        r = {**base, "impl": impl.name, "backend": impl.backend, "mode": mode,
             "is_reference": impl.reference, "note": impl.note, "status": "ok",
             "median_ms": None, "p10_ms": None, "p90_ms": None, "repeats": 0,
             "peak_extra_bytes": None, "max_abs_err": None, "errors": {}, "correct": None,
             "reason": None}
        r.update(kw)
        return r

    ordered = sorted(impls, key=lambda i: not i.reference)
    free = free_memory_bytes(device)
    if case.input_bytes > cfg.mem_fraction * free:
        reason = (f"inputs need {_fmt_bytes(case.input_bytes)} > {cfg.mem_fraction:.0%} of free "
                  f"{_fmt_bytes(free)}")
        log(f"  skip {case.op} {case.dtype} {base['shape']}: {reason}")
        return [row_for(i, m, status="skipped", reason=reason) for i in ordered for m in modes]

    gc.collect()
    inputs = case.make_inputs()
    upstream = case.make_upstream(inputs)
    grad_names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    expected: dict[str, Any] = {"outputs": None, "grads": None, "source": None}

    def setup() -> None:
        for k in grad_names:
            inputs[k].grad = None

    def get_expected(need_grads: bool) -> bool:
        if expected["outputs"] is not None and (expected["grads"] is not None or not need_grads):
            return True
        if case.oracle is None:
            return False
        log("    computing expected values with the memory-bounded oracle")
        with torch.enable_grad():
            outs, grads = case.oracle(inputs, upstream)
        expected.update(outputs=tuple(None if o is None else o.detach() for o in outs),
                        grads=grads, source="oracle")
        return True

    for impl in ordered:
        for mode in modes:
            tag = f"  {case.op} {case.dtype} {base['shape']} {mode:8s} {impl.name:16s}"
            if impl.unavailable is not None or impl.fn is None:
                rows.append(row_for(impl, mode, status="skipped", reason=impl.unavailable))
                log(f"{tag} skipped: {impl.unavailable}")
                continue
            if mode not in impl.modes:
                reason = f"mode {mode} not supported by this impl"
                rows.append(row_for(impl, mode, status="skipped", reason=reason))
                continue
            free = free_memory_bytes(device)
            est = impl.est_bytes(mode) if impl.est_bytes else None
            if est is not None and est > cfg.mem_fraction * free:
                reason = (f"estimated {_fmt_bytes(est)} > {cfg.mem_fraction:.0%} of free "
                          f"{_fmt_bytes(free)}")
                rows.append(row_for(impl, mode, status="skipped", reason=reason))
                log(f"{tag} skipped: {reason}")
                continue
            est_s = impl.est_seconds(mode) if impl.est_seconds else None
            if cfg.max_call_s is not None and est_s is not None and est_s > cfg.max_call_s:
                reason = (f"estimated {est_s:.0f} s per call > --max-call-s {cfg.max_call_s:g} "
                          f"on {device.type}")
                rows.append(row_for(impl, mode, status="skipped", reason=reason))
                log(f"{tag} skipped: {reason}")
                continue

            step = (lambda impl=impl, mode=mode:
                    forward_backward(lambda: impl.fn(inputs), upstream, mode))
            row = row_for(impl, mode)
            try:
                # 1) one call: correctness guard (it also serves as the first warm-up call)
                setup()
                t0 = time.perf_counter()
                outs = step()
                synchronize(device)
                first_s = time.perf_counter() - t0
                outs = tuple(None if o is None else o.detach() for o in outs)
                grads = ({k: inputs[k].grad for k in grad_names} if mode == "fwd+bwd" else None)
                setup()
                if impl.reference and expected["outputs"] is None:
                    expected.update(outputs=outs, source="reference")
                if impl.reference and grads is not None and expected["grads"] is None:
                    expected["grads"] = grads
                need_grads = mode == "fwd+bwd" and impl.check_grads
                if impl.reference and expected["source"] == "reference":
                    row.update(correct=True, max_abs_err=0.0)
                elif not get_expected(need_grads):
                    row.update(correct=None, status="unchecked",
                               reason="no reference output to compare with")
                else:
                    errors, msgs = {}, []
                    mask = impl.compare_outputs or (True,) * len(case.output_names)
                    for name, keep, a, e in zip(case.output_names, mask, outs, expected["outputs"]):
                        if not keep or e is None:
                            continue
                        if a is None:
                            msgs.append(f"{name}: missing")
                            errors[name] = math.inf
                            continue
                        ok, err, msg = compare_tensors(a, e, case.atol, case.rtol)
                        errors[name] = err
                        if not ok:
                            msgs.append(f"{name}: {msg}")
                    if need_grads and expected["grads"] is not None:
                        for k in grad_names:
                            a, e = grads.get(k), expected["grads"].get(k)
                            if e is None:
                                continue
                            if a is None:
                                msgs.append(f"grad {k}: missing")
                                errors[f"grad_{k}"] = math.inf
                                continue
                            scale = _nan_abs_max(e)
                            ok, err, msg = compare_tensors(a, e, case.grad_tol * max(scale, 1e-30),
                                                           case.grad_tol)
                            errors[f"grad_{k}"] = err
                            if not ok:
                                msgs.append(f"grad {k}: {msg} (atol = {case.grad_tol:g}*max|ref|)")
                    row["errors"] = errors
                    row["max_abs_err"] = max(errors.values()) if errors else None
                    row["correct"] = not msgs
                    if msgs:
                        row["status"] = "MISMATCH"
                        row["reason"] = "; ".join(msgs)
                        log(f"{tag} !!! MISMATCH vs {expected['source']}: {row['reason']}")
                del outs, grads

                # 2) timing
                repeats, warmup = cfg.repeats, max(cfg.warmup - 1, 0)
                if cfg.max_call_s is not None and first_s > cfg.max_call_s:
                    repeats, warmup = 1, 0
                    row["reason"] = ((row["reason"] + "; ") if row["reason"] else "") + (
                        f"first call took {first_s:.1f} s: 1 repeat only")
                cpu_inproc = (device.type != "cuda" and cfg.measure_memory
                              and cfg.cpu_mem_method() == CPU_MEM_METHOD)
                timing = time_fn(step, device, repeats=repeats, warmup=warmup, setup=setup,
                                 flush_l2=cfg.flush_l2, cpu_memory_on_last=cpu_inproc)
                row.update(median_ms=timing.median_ms, p10_ms=timing.p10_ms,
                           p90_ms=timing.p90_ms, repeats=repeats, times_ms=timing.times_ms)

                # 3) peak memory: CPU in-process during the last timed call; else one more call
                if cpu_inproc:
                    row["peak_extra_bytes"] = timing.peak_extra_bytes
                elif cfg.measure_memory:
                    if device.type == "cuda":
                        row["peak_extra_bytes"] = measure_peak_extra(step, device, setup)
                    elif cfg.mem_probe is not None:
                        row["peak_extra_bytes"] = cfg.mem_probe(case, impl, mode)
                    setup()
                mem = row["peak_extra_bytes"]
                mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else "   n/a"
                log(f"{tag} {row['median_ms']:10.3f} ms  peak+ {mem_s}"
                    + ("" if row["correct"] is not False else "  [MISMATCH]"))
            except Exception as e:  # noqa: BLE001 -- record and go on with the next impl
                setup()
                status = "oom" if _is_oom(e) else "error"
                row.update(status=status, reason=f"{type(e).__name__}: {str(e)[:400]}")
                log(f"{tag} {status.upper()}: {row['reason']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            gc.collect()
    del inputs, upstream, expected
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict], key_fields: Sequence[str]) -> None:
    """speedup = ref median / impl median; mem_ratio = impl peak / ref peak, per matching key."""
    def key(r):
        return tuple(r.get(k) for k in key_fields)
    refs = {key(r): r for r in rows if r.get("is_reference") and r.get("median_ms")}
    for r in rows:
        ref = refs.get(key(r))
        r["speedup_vs_ref"] = None
        r["mem_ratio_vs_ref"] = None
        if ref is None or not r.get("median_ms"):
            continue
        r["speedup_vs_ref"] = ref["median_ms"] / r["median_ms"]
        if r.get("peak_extra_bytes") is not None and ref.get("peak_extra_bytes"):
            r["mem_ratio_vs_ref"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def format_markdown_table(rows: Sequence[dict], include_skipped: bool = False) -> str:
    """Measured rows as a table, then skipped (impl, reason) groups and impl notes as lists."""
    head = ("| op | dtype | shape | mode | impl | median ms | p10-p90 ms | peak extra MiB | "
            "speedup vs ref | mem vs ref | max abs err | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    skipped: dict[tuple[str, str], list[str]] = {}
    notes: dict[str, str] = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["impl"], r["note"])
        if r["status"] == "skipped" and not include_skipped:
            skipped.setdefault((r["impl"], r.get("reason") or ""), []).append(
                f"{r['op']} {r['dtype']} {r['shape']} {r['mode']}")
            continue
        status = "**MISMATCH**" if r["status"] == "MISMATCH" else r["status"]
        if r.get("reason"):
            status = f"{status}: {r['reason']}"
        mem = r.get("peak_extra_bytes")
        p = (f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}" if r.get("p10_ms") is not None else "-")
        sp = r.get("speedup_vs_ref")
        lines.append("| " + " | ".join([
            r["op"], r["dtype"], r["shape"], r["mode"], r["impl"],
            _fmt(r.get("median_ms"), ".3f"), p,
            _fmt(None if mem is None else mem / 2**20, ".1f"),
            (f"{sp:.2f}x" if sp is not None else "-"),
            _fmt(r.get("mem_ratio_vs_ref"), ".3f"),
            _fmt(r.get("max_abs_err"), ".2e"),
            status.replace("|", "/"),
        ]) + " |")
    if skipped:
        lines += ["", "Skipped:"]
        for (impl, reason), where in skipped.items():
            shown = "; ".join(where[:4]) + (f"; ... ({len(where)} in all)" if len(where) > 4 else "")
            lines.append(f"- {impl}: {reason} [{shown}]")
    if notes:
        lines += ["", "Notes:"]
        lines += [f"- {impl}: {note}" for impl, note in notes.items()]
    return "\n".join(lines)


def _env_lines(env: dict) -> list[str]:
    keys = ["device_name", "device_kind", "torch", "triton", "python", "axpo", "cuda",
            "torch_num_threads", "cpu_capability", "mkldnn_enabled", "bf16_gemm_dtype", "git_commit",
            "date", "memory_method"]
    return [f"- {k}: {env[k]}" for k in keys if k in env]


def output_paths(out_dir: str | os.PathLike, family: str, device: torch.device) -> dict[str, Path]:
    out = Path(out_dir)
    stem = f"{family}_{device_kind(device)}"
    return {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        return str(o)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(payload), indent=1, default=default) + "\n")


def write_markdown(path: Path, title: str, env: dict, rows: Sequence[dict],
                   preamble: Sequence[str] = (), epilogue: Sequence[str] = ()) -> str:
    text = "\n".join([f"# {title}", "", *_env_lines(env), "", *preamble,
                      "" if preamble else "", format_markdown_table(rows), "", *epilogue, ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_plot(path: Path, title: str, rows: Sequence[dict], modes: Sequence[str] = MODES) -> bool:
    """Median time per shape for each impl; one row of panels per (op, dtype), one column per mode."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        log(f"plot skipped: matplotlib unavailable ({e})")
        return False
    groups: list[tuple[str, str]] = []
    for r in rows:
        g = (r["op"], r["dtype"])
        if g not in groups:
            groups.append(g)
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(6.5 * len(modes), 3.6 * len(groups)),
                             squeeze=False)
    for gi, (op, dtype) in enumerate(groups):
        for mi, mode in enumerate(modes):
            ax = axes[gi][mi]
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype and r["mode"] == mode]
            shapes: list[str] = []
            for r in sel:
                if r["shape"] not in shapes:
                    shapes.append(r["shape"])
            impls: list[str] = []
            for r in sel:
                if r["impl"] not in impls:
                    impls.append(r["impl"])
            plotted = False
            for name in impls:
                ys = []
                for s in shapes:
                    m = [r for r in sel if r["impl"] == name and r["shape"] == s and r.get("median_ms")]
                    ys.append(m[0]["median_ms"] if m else math.nan)
                if all(math.isnan(y) for y in ys):
                    continue
                bad = any(r.get("status") == "MISMATCH" for r in sel if r["impl"] == name)
                ax.plot(range(len(shapes)), ys, marker="o", label=name + (" (MISMATCH)" if bad else ""))
                plotted = True
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=7)
            if plotted:
                ax.set_yscale("log")
                ax.legend(fontsize=7)
            ax.set_ylabel("median ms (log)")
            ax.set_title(f"{op} {dtype} {mode}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def publish(args, family: str, device: torch.device, env: dict, rows: list[dict], payload: dict,
            preamble: Sequence[str], epilogue: Sequence[str], modes: Sequence[str] = MODES,
            elapsed: float = 0.0) -> int:
    """Writes <family>_<device>.json|md|png under args.out and prints the table and summary.

    `payload` holds the family's extra JSON fields; family, env, args, elapsed_s and rows are
    added here. Rows whose status is MISMATCH are called out in the markdown and on stderr.
    """
    bad = [r for r in rows if r["status"] == "MISMATCH"]
    epilogue = list(epilogue)
    if bad:
        epilogue += ["", f"**{len(bad)} row(s) did NOT match the reference** (status MISMATCH)."]
    paths = output_paths(args.out, family, device)
    write_json(paths["json"], {"family": family, "env": env, "args": vars(args), "elapsed_s": elapsed,
                               **payload, "rows": rows})
    title = f"{family} on {env['device_name']}"
    write_markdown(paths["md"], title, env, rows, preamble, epilogue)
    if not args.no_plot:
        write_plot(paths["png"], title, rows, modes)
    print(format_markdown_table(rows))
    print()
    for line in epilogue:
        print(line)
    if bad:
        print(f"WARNING: {len(bad)} row(s) did not match the reference: see status MISMATCH", file=sys.stderr)
    print(f"wrote {paths['json']}, {paths['md']}" + ("" if args.no_plot else f", {paths['png']}")
          + f" ({elapsed:.0f} s)")
    return 0
