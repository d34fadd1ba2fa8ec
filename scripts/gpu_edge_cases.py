"""Every CUDA kernel of axpo on the inputs that break kernels, forward and backward, for
`compute-sanitizer --tool memcheck` (scripts/gpu_check.sh runs it under the sanitizer).

Each case is also compared with the torch reference (float64 where the op computes in fp32), so
a run that the sanitizer passes but that computes garbage still fails. Exit status 1 on any
mismatch. Usage: python scripts/gpu_edge_cases.py [--backend cuda|triton] [--device cuda]
(`--backend cpu --device cpu` checks the script itself on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import sys

import torch

from axpo import ops

FAILURES: list[str] = []


def close(name: str, got, want, atol: float, rtol: float) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
        err = (got - want).abs().nan_to_num(0).max().item() if got.shape == want.shape else float("nan")
        FAILURES.append(f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}, max |err| {err:.3g}")
        print(f"FAIL {name}", flush=True)
    else:
        print(f"ok   {name}", flush=True)


def logprob_entropy_cases(backend: str, dev: str) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    for n, v, dtype, kind in [(7, 151936, torch.float32, "random"), (5, 129920, torch.bfloat16, "random"),
                              (1, 1000, torch.float32, "single"), (0, 1000, torch.float32, "empty"),
                              (6, 4099, torch.float32, "peaked"), (6, 4099, torch.float32, "neg_inf"),
                              (8, 3001, torch.float32, "noncontig")]:
        logits = (torch.randn(n, v * (2 if kind == "noncontig" else 1), generator=g) * 2)
        if kind == "noncontig":
            logits = logits[:, ::2]
        if kind == "peaked":
            logits[:, 3] = 80.0
        if kind == "neg_inf":
            logits[:, ::3] = float("-inf")
        labels = torch.randint(0, v, (n,), generator=g)
        if n > 2:
            labels[1] = -100
        if kind == "neg_inf" and n:
            labels[0] = 1  # a finite column
        x = logits.to(dev, dtype).clone().requires_grad_(True)
        lp, ent = ops.token_logprob_entropy(x, labels.to(dev), backend=backend)
        (lp.sum() + 0.5 * ent.nan_to_num(0).sum()).backward() if n else None
        xr = logits.double().to(dtype).double().requires_grad_(True)
        rlp, rent = ops.reference.token_logprob_entropy(xr, labels)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        close(f"token_logprob_entropy {kind} N{n} V{v} {dtype}", lp, rlp, tol, tol)
        close(f"token_logprob_entropy entropy {kind} N{n} V{v}", ent, rent, tol, tol)
        if n:
            (rlp.sum() + 0.5 * rent.nan_to_num(0).sum()).backward()
            close(f"token_logprob_entropy grad {kind} N{n} V{v}", x.grad, xr.grad, tol, tol)
    for n, h, v, dtype in [(9, 64, 151936, torch.bfloat16), (1, 32, 1001, torch.float32), (0, 32, 1001, torch.float32)]:
        hidden = torch.randn(n, h, generator=g)
        weight = torch.randn(v, h, generator=g) * 0.1
        labels = torch.randint(0, v, (n,), generator=g)
        hd, wd = hidden.to(dev, dtype).clone().requires_grad_(True), weight.to(dev, dtype).clone().requires_grad_(True)
        lp, ent = ops.linear_logprob_entropy(hd, wd, labels.to(dev), backend=backend)
        if n:
            (lp.sum() + ent.sum()).backward()
        rlp, rent = ops.reference.linear_logprob_entropy(hidden.to(dtype).double(), weight.to(dtype).double(), labels)
        tol = 3e-2 if dtype == torch.bfloat16 else 2e-4
        close(f"linear_logprob_entropy N{n} H{h} V{v} {dtype}", lp, rlp, tol, tol)


def policy_loss_cases(backend: str, dev: str) -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    for b, t, dtype, adv_dim, kl in [(3, 4097, torch.float32, 2, "k3"), (2, 1, torch.bfloat16, 1, "k3_ratio"),
                                     (0, 5, torch.float32, 1, "k1"), (4, 0, torch.float32, 2, "k2"),
                                     (5, 300, torch.float16, 1, "k3")]:
        lp = -torch.rand(b, t, generator=g) * 3
        old = lp + torch.randn(b, t, generator=g) * 0.3
        if b and t:
            old[0, 0] = lp[0, 0] + 25.0  # past the log-ratio clamp
        ref = lp + torch.randn(b, t, generator=g) * 0.2
        adv = torch.randn(b, generator=g) if adv_dim == 1 else torch.randn(b, t, generator=g)
        mask = torch.rand(b, t, generator=g) > 0.2
        kw = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, ref_logprobs=None, kl_coef=0.1, kl_estimator=kl)
        x = lp.to(dev, dtype).clone().requires_grad_(True)
        if b == 0 or t == 0:  # the op refuses empty batches with a clear error, before any kernel
            try:
                ops.policy_loss(x, old.to(dev), adv.to(dev), mask.to(dev), backend=backend,
                                **{**kw, "ref_logprobs": ref.to(dev)})
                FAILURES.append(f"policy_loss B{b} T{t}: an empty batch was not refused")
            except ValueError as e:
                ok = "non-empty" in str(e)
                print(f"{'ok  ' if ok else 'FAIL'} policy_loss B{b} T{t} refused: {e}", flush=True)
                if not ok:
                    FAILURES.append(f"policy_loss B{b} T{t}: {e}")
            continue
        loss, _ = ops.policy_loss(x, old.to(dev), adv.to(dev), mask.to(dev), backend=backend,
                                  **{**kw, "ref_logprobs": ref.to(dev)})
        loss.backward()
        xr = lp.to(dtype).double().requires_grad_(True)
        rloss, _ = ops.reference.policy_loss(xr, old.double(), adv.double(), mask,
                                                          **{**kw, "ref_logprobs": ref.double()})
        rloss.backward()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        close(f"policy_loss B{b} T{t} {dtype} adv{adv_dim}d {kl}", loss, rloss, tol, tol)
        close(f"policy_loss grad B{b} T{t} {dtype}", x.grad, xr.grad, tol, tol)


def group_advantages_cases(backend: str, dev: str) -> None:
    g = torch.Generator(device="cpu").manual_seed(2)
    for r, groups in [(1, 1), (0, 1), (100003, 7919), (64, 64)]:
        rewards = torch.randint(0, 2, (r,), generator=g).float()
        ids = torch.randint(-(2**62), 2**62, (groups,), generator=g)[torch.randint(0, groups, (r,), generator=g)]
        if r > 2:
            ids[0], ids[1] = -1, torch.iinfo(torch.int64).min
        out = ops.group_advantages(rewards.to(dev), ids.to(dev), backend=backend)
        want = ops.reference.group_advantages(rewards.double(), ids)
        close(f"group_advantages R{r} groups{groups}", out, want, 1e-5, 1e-5)


def fork_kv_cases(backend: str, dev: str) -> None:
    g = torch.Generator(device="cpu").manual_seed(3)
    tensors = [torch.randn(3, 2, 17, 8, generator=g).to(dev, torch.bfloat16),
               torch.randn(3, 4, 17, 16, generator=g).to(dev)[:, :, :, ::2]]  # non-contiguous, other H / D
    rows = torch.tensor([0, 0, 2, 1])
    start = torch.tensor([0, 3, 16, 5])
    length = torch.tensor([17, 4, 1, 0])
    outs = ops.fork_kv(tensors, rows, start, length, 20, backend=backend)
    want = ops.reference.fork_kv([t.cpu() for t in tensors], rows, start, length, 20)
    for i, (o, w) in enumerate(zip(outs, want)):
        close(f"fork_kv tensor {i}", o.float(), w.float(), 0, 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda", choices=["cuda", "triton", "cpu", "torch"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    for cases in (logprob_entropy_cases, policy_loss_cases, group_advantages_cases, fork_kv_cases):
        try:
            cases(args.backend, args.device)
        except Exception as e:  # noqa: BLE001  (report and go on: the sanitizer log says the rest)
            FAILURES.append(f"{cases.__name__}: {type(e).__name__}: {e}")
            print(f"FAIL {cases.__name__}: {type(e).__name__}: {e}", flush=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
    print(f"{len(FAILURES)} failure(s)")
    for f in FAILURES:
        print("  " + f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
