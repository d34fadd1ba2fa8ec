"""fork_kv / fork_cache: every backend against the reference (exact equality: it is a copy),
edge cases, argument errors, and the end-to-end check that a forked transformers cache
continues exactly like recomputing prefix + new tokens from scratch (tiny Qwen3 / Qwen3-VL)."""
from __future__ import annotations

import os

import pytest
import torch

from axpo.ops import reference_fork_kv as reference
from axpo.ops.fork_kv import _fork, continuation_inputs, fork_cache, fork_kv
from tests._bench import bench_module

ALL = ["cpu", "triton", "torch"] + (["cuda"] if torch.cuda.is_available() else [])


def _pairs():
    from tests.conftest import ALL_BACKENDS
    return ALL_BACKENDS


PAIRS = _pairs()
IDS = [f"{b}-{d}" for b, d in PAIRS]


def make_cache(b=3, t=9, heads=(2, 2, 1, 3), dims=(8, 8, 16, 4), dtypes=None, device="cpu"):
    dtypes = dtypes or [torch.float32] * len(heads)
    return [torch.randn(b, h, t, d).to(dt).to(device) for h, d, dt in zip(heads, dims, dtypes)]


def random_spans(m, b, t):
    rows = torch.randint(0, b, (m,))
    start = torch.randint(0, t + 1, (m,))
    length = (torch.rand(m) * (t - start + 1)).long().clamp(max=t - start)
    return rows, start, length


def assert_same(outs, expected):
    assert len(outs) == len(expected)
    for o, e in zip(outs, expected):
        assert o.shape == e.shape and o.dtype == e.dtype
        assert o.is_contiguous()
        assert torch.equal(o.cpu(), e.cpu()), (o - e).abs().max()


def run(backend, device, tensors, rows, start, length, out_len=None):
    tensors = [t.to(device) for t in tensors]
    return fork_kv(tensors, rows, start, length, out_len=out_len, backend=backend)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
@pytest.mark.parametrize("m", [1, 7, 16])
def test_matches_reference_random(backend, device, m):
    tensors = make_cache(b=4, t=11)
    rows, start, length = random_spans(m, 4, 11)
    assert_same(run(backend, device, tensors, rows, start, length),
                reference.fork_kv(tensors, rows, start, length))


def test_reference_is_the_definition():
    # the oracle itself against a literal, element-by-element reading of the spec
    t = torch.randn(3, 2, 6, 4)
    rows, start, length = torch.tensor([2, 0, 2]), torch.tensor([1, 0, 6]), torch.tensor([3, 6, 0])
    (out,) = reference.fork_kv([t], rows, start, length, out_len=7)
    for i in range(3):
        for p in range(7):
            pad = 7 - int(length[i])
            want = t[rows[i], :, start[i] + p - pad] if p >= pad else torch.zeros(2, 4)
            assert torch.equal(out[i, :, p], want)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_edge_cases(backend, device):
    b, t = 3, 8
    tensors = make_cache(b=b, t=t)
    rows = torch.tensor([0, 1, 2, 2, 2, 0, 1])
    start = torch.tensor([0, 8, 0, 3, 7, 2, 5])   # src_start at the end (8 = T) with length 0
    length = torch.tensor([8, 0, 8, 5, 1, 0, 3])  # full-length spans, length-0 rows, repeated rows
    exp = reference.fork_kv(tensors, rows, start, length)
    assert exp[0].shape[2] == 8
    assert_same(run(backend, device, tensors, rows, start, length), exp)
    # out_len larger than max(length): more left padding
    assert_same(run(backend, device, tensors, rows, start, length, out_len=13),
                reference.fork_kv(tensors, rows, start, length, out_len=13))
    # every row empty -> out_len 0
    z = torch.zeros(3, dtype=torch.long)
    outs = run(backend, device, tensors, torch.tensor([0, 1, 2]), z, z)
    assert all(o.shape[2] == 0 for o in outs)
    # ... and all zeros when out_len is given
    assert_same(run(backend, device, tensors, torch.tensor([0, 1, 2]), z, z, out_len=4),
                [torch.zeros(3, x.shape[1], 4, x.shape[3]) for x in tensors])


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_m_zero(backend, device):
    tensors = make_cache()
    e = torch.zeros(0, dtype=torch.long)
    outs = run(backend, device, tensors, e, e, e)
    assert [tuple(o.shape) for o in outs] == [(0, x.shape[1], 0, x.shape[3]) for x in tensors]
    outs = run(backend, device, tensors, e, e, e, out_len=5)
    assert [tuple(o.shape) for o in outs] == [(0, x.shape[1], 5, x.shape[3]) for x in tensors]


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_non_contiguous(backend, device):
    base = torch.randn(4, 3, 2, 12, 8)
    tensors = [
        base[:, 0].transpose(0, 0)[:, :, 2:11],          # a cache slice along T: token stride D
        base[:, 1].permute(0, 1, 2, 3)[::1, :, 1:10],    # another slice
        torch.randn(4, 9, 2, 8).transpose(1, 2),         # [B, T, H, D] storage: head stride D
        torch.randn(4, 2, 8, 9).transpose(2, 3),         # last dim not unit stride
        torch.randn(8, 2, 9, 8)[::2],                    # batch stride doubled
    ]
    assert not any(t.is_contiguous() for t in tensors)
    rows, start, length = random_spans(9, 4, 9)
    rows[:3] = 2  # repeated source row
    assert_same(run(backend, device, tensors, rows, start, length),
                reference.fork_kv(tensors, rows, start, length))


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_mixed_dtypes_and_bf16(backend, device):
    dts = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    tensors = make_cache(b=3, t=10, heads=(2, 1, 2, 4), dims=(8, 6, 5, 16), dtypes=dts)
    tensors[0][0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])  # bits survive
    rows, start, length = random_spans(6, 3, 10)
    rows[0], start[0], length[0] = 0, 0, 10
    outs = run(backend, device, tensors, rows, start, length)
    exp = reference.fork_kv(tensors, rows, start, length)
    for o, e in zip(outs, exp):
        assert o.dtype == e.dtype
        assert torch.equal(o.cpu().view(torch.int8), e.view(torch.int8))  # bitwise, NaN included


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_integer_and_fp64(backend, device):
    tensors = [torch.randn(2, 2, 5, 3, dtype=torch.float64), torch.randint(-100, 100, (2, 1, 5, 7), dtype=torch.int8)]
    rows, start, length = torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([3, 4])
    assert_same(run(backend, device, tensors, rows, start, length),
                reference.fork_kv(tensors, rows, start, length))


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
@pytest.mark.parametrize("bad,arg", [
    (dict(rows=[0, 3]), r"src_rows.*\[0, 3\).*src_rows\[1\] = 3"),
    (dict(rows=[-1, 0]), r"src_rows.*src_rows\[0\] = -1"),
    (dict(start=[0, -2]), r"src_start must be >= 0; src_start\[1\] = -2"),
    (dict(length=[-1, 2]), r"length must be >= 0; length\[0\] = -1"),
    (dict(start=[7, 0], length=[2, 1]), r"src_start \+ length must be <= T = 8.*row 0"),
    (dict(out_len=2), r"length must be <= out_len = 2; length\[1\] = 3"),
])
def test_range_errors(backend, device, bad, arg):
    tensors = [t.to(device) for t in make_cache(b=3, t=8)]
    rows = torch.tensor(bad.get("rows", [0, 2]))
    start = torch.tensor(bad.get("start", [0, 1]))
    length = torch.tensor(bad.get("length", [2, 3]))
    with pytest.raises(ValueError, match=arg):
        fork_kv(tensors, rows, start, length, out_len=bad.get("out_len"), backend=backend)


def test_argument_errors():
    t = make_cache(b=2, t=6)
    i = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="tensors must be a list"):
        fork_kv(t[0], i, i, i)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be 4-D"):
        fork_kv([t[0], t[1][0]], i, i, i)
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape .* sequence length T = 6"):
        fork_kv([t[0], torch.randn(2, 2, 5, 8)], i, i, i)
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape .* batch size B = 2"):
        fork_kv([t[0], torch.randn(3, 2, 6, 8)], i, i, i)
    with pytest.raises(TypeError, match="src_start must have dtype in \\(int64\\)"):
        fork_kv(t, i, i.int(), i)
    with pytest.raises(ValueError, match=r"length must have shape \(2,\)"):
        fork_kv(t, i, i, torch.tensor([1]))
    with pytest.raises(ValueError, match="src_rows must be 1-D"):
        fork_kv(t, i[None], i, i)
    with pytest.raises(ValueError, match="out_len must be None or an int >= 0"):
        fork_kv(t, i, i, i, out_len=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        fork_kv(t, i, i, i, backend="nope")
    with pytest.raises(TypeError, match=r"not differentiable and tensors\[0\] requires grad"):
        fork_kv([t[0].requires_grad_(True)], i, i, i)
    with torch.no_grad():  # fine under no_grad
        (o,) = fork_kv([t[0]], i, i, i)
    assert not o.requires_grad
    assert fork_kv([], i, i, i) == []
    # plain Python lists are accepted for the indices
    assert_same(fork_kv(t[1:], [1, 0], [0, 2], [3, 4]), reference.fork_kv(t[1:], i.flip(0), [0, 2], [3, 4]))


@pytest.mark.parametrize("backend", [b for b in ALL if b in ("cpu", "triton")])
def test_kernels_never_read_out_of_bounds(backend, monkeypatch):
    # With the host checks skipped, invalid rows come out as zeros (the kernel guards its reads).
    monkeypatch.setenv("AXPO_SKIP_VALUE_CHECKS", "1")
    tensors = make_cache(b=2, t=5)
    rows, start, length = torch.tensor([5, 0, 1, 0]), torch.tensor([0, -1, 3, 1]), torch.tensor([2, 2, 4, 2])
    if backend == "cpu":  # the C++ entry point checks on its own
        with pytest.raises(RuntimeError, match=r"src_rows\[0\] = 5 is outside \[0, 2\)"):
            fork_kv(tensors, rows, start, length, backend="cpu")
        return
    outs = fork_kv(tensors, rows, start, length, out_len=4, backend=backend)
    for o, t in zip(outs, tensors):
        assert torch.equal(o[:3], torch.zeros_like(o[:3]))
        assert torch.equal(o[3, :, 2:], t[0, :, 1:3])


@pytest.mark.parametrize("backend", [b for b in ALL if b in ("cpu", "triton", "cuda")])
def test_opcheck(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    tensors = [t.to(device) for t in make_cache(b=3, t=6)]
    rows, start, length = (x.to(device) for x in (torch.tensor([0, 2, 2]), torch.tensor([1, 0, 3]), torch.tensor([4, 6, 2])))
    torch.library.opcheck(_fork, (tensors, rows, start, length, 7, backend),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# fork_cache end to end: forked prefix + new tokens == recompute from scratch (fp32, <= 1e-5)
# ------------------------------------------------------------------------------------------------
def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return Qwen3ForCausalLM(cfg).eval()


def _tiny_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def _left_pad(seqs):
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, t - len(s):] = s
        mask[b, t - len(s):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("model_name", ["qwen3", "qwen3_vl"])
@pytest.mark.parametrize("backend", [b for b in ALL if b in ("cpu", "triton", "torch")])
def test_fork_cache_continues_like_recompute(model_name, backend):
    """FORK_CACHE LOGITS TEST: batched prompts of different lengths (left padded) -> cache;
    fork prefixes of some rows into M rows (several branches per source, extra out_len
    padding); one forward of 3 new tokens per row on the forked cache must give the logits of
    recomputing (prompt prefix + new tokens) from scratch, within 1e-5 in fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = _tiny_qwen3() if model_name == "qwen3" else _tiny_qwen3_vl()
    prompts = [torch.randint(3, 100, (n,)) for n in (7, 4, 6)]
    ids, mask, pos = _left_pad(prompts)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True).past_key_values
    t = ids.shape[1]
    src_rows = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    prefix = torch.tensor([5, 7, 4, 3, 6, 2, 1])
    src_start = (t - torch.tensor([7, 4, 6]))[src_rows]  # each prefix starts at its row's first real token
    before = [layer.keys.clone() for layer in cache.layers]
    forked = fork_cache(cache, src_rows, src_start, prefix, out_len=int(prefix.max()) + 2,
                        src_attention_mask=mask, backend=backend)
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers))  # source untouched
    assert forked.cache.get_seq_length() == 9 and forked.cache.layers[0].keys.shape[0] == 7
    assert torch.equal(forked.next_position_ids, prefix)
    assert torch.equal(forked.attention_mask.sum(1), prefix)

    new = torch.randint(3, 100, (7, 3))
    am, pids = continuation_inputs(forked, 3)
    with torch.no_grad():
        got = model(input_ids=new, attention_mask=am, position_ids=pids, past_key_values=forked.cache).logits
    ids2, mask2, pos2 = _left_pad([torch.cat([prompts[r][:n], new[i]])
                                   for i, (r, n) in enumerate(zip(src_rows.tolist(), prefix.tolist()))])
    with torch.no_grad():
        want = model(input_ids=ids2, attention_mask=mask2, position_ids=pos2).logits[:, -3:]
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err

    # negative control: positions continuing from the padded column index (ignoring the source's
    # left padding) must be detectably wrong, so the check above can fail
    bad = fork_cache(cache, src_rows, src_start, prefix, src_attention_mask=None, backend=backend)
    am_b, pids_b = continuation_inputs(bad, 3)
    with torch.no_grad():
        wrong = model(input_ids=new, attention_mask=am_b, position_ids=pids_b, past_key_values=bad.cache).logits
    assert (wrong - want).abs().max().item() > 1e-3


def test_fork_cache_generate_matches_recompute():
    """Greedy model.generate on a forked cache == greedy generate on prefix + new tokens."""
    model = _tiny_qwen3()
    prompts = [torch.randint(3, 100, (n,)) for n in (6, 3, 5)]
    ids, mask, pos = _left_pad(prompts)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True).past_key_values
    src_rows, prefix = torch.tensor([0, 1, 1, 2]), torch.tensor([4, 3, 2, 5])
    src_start = (ids.shape[1] - torch.tensor([6, 3, 5]))[src_rows]
    forked = fork_cache(cache, src_rows, src_start, prefix, src_attention_mask=mask)
    new = torch.randint(3, 100, (4, 2))
    am, _ = continuation_inputs(forked, 2)
    inp = torch.cat([torch.zeros(4, am.shape[1] - 2, dtype=torch.long), new], 1)  # cached part: ignored
    got = model.generate(input_ids=inp, attention_mask=am, past_key_values=forked.cache,
                         max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
    ids2, mask2, _ = _left_pad([torch.cat([prompts[r][:n], new[i]])
                                for i, (r, n) in enumerate(zip(src_rows.tolist(), prefix.tolist()))])
    want = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=4, do_sample=False,
                          pad_token_id=0)[:, -4:]
    assert torch.equal(got, want)


def test_fork_cache_masks_padding_inside_span_and_errors():
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    cache = DynamicCache(ddp_cache_data=[(k, v)])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    f = fork_cache(cache, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([4, 2]), src_attention_mask=mask)
    assert torch.equal(f.attention_mask, torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]))
    assert torch.equal(f.next_position_ids, torch.tensor([3, 2]))
    assert torch.equal(f.cache.layers[0].values, reference.fork_kv([v], [0, 1], [1, 0], [4, 2])[0])
    am, pos = continuation_inputs(f, 2)
    assert torch.equal(am[:, -2:], torch.ones(2, 2, dtype=am.dtype)) and torch.equal(pos, torch.tensor([[3, 4], [2, 3]]))
    with pytest.raises(TypeError, match="must be a transformers DynamicCache"):
        fork_cache([k, v], [0], [0], [1])
    with pytest.raises(ValueError, match=r"src_attention_mask must have shape \(2, 5\)"):
        fork_cache(cache, [0], [0], [1], src_attention_mask=mask[:, :4])
    with pytest.raises(ValueError, match=r"src_rows\[0\] = 2"):
        fork_cache(cache, [2], [0], [1])
    with pytest.raises(ValueError, match="cache has no layers"):
        fork_cache(DynamicCache(), [0], [0], [1])
    sw = DynamicCache(ddp_cache_data=[(k, v)])
    sw.layers[0] = DynamicSlidingWindowLayer(sliding_window=4)
    with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
        fork_cache(sw, [0], [0], [1])


# ------------------------------------------------------------------------------------------------
# benchmark smoke test
# ------------------------------------------------------------------------------------------------
def test_bench_smoke(tmp_path, capsys):
    bench = bench_module("bench_fork_kv")
    rc = bench.main(["--device", "cpu", "--layers", "2", "--heads", "2", "--head-dim", "16",
                     "--prefix", "32", "--sources", "3", "--branches", "2", "--repeats", "1",
                     "--warmup", "1", "--copy-mib", "8", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| op | dtype | shape | mode | impl |" in out and "MISMATCH" not in out
    assert (tmp_path / "fork_kv_cpu.json").is_file() and (tmp_path / "fork_kv_cpu.md").is_file()
