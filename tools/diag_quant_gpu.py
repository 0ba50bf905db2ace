#!/usr/bin/env python
"""Where NF4 quantization on CUDA differs from bitsandbytes' kernels in the last bit, and which re-implementation
removes it: runs bitsandbytes (0.50.x) and candidate computations on fp32 tensors and counts the codes that differ.

Candidates for 1/absmax: correctly rounded (`1.0 / absmax`), true division `x / absmax`, and through Triton's inline
PTX `rcp.approx.ftz.f32` (what the kernels' MUFU.RCP is), `rcp.approx.f32` and `div.full.f32` (PyTorch's jiterator
with `rcp.approx.ftz.f32` as a cross-check). Thresholds for the NF4 codes: float32 midpoints of the NF4 values, or
the kernel's literal constants (`nf4_cuda_bounds`). Rounding of the nested 8-bit codes: nearest with ties to the
lower index, to the even index, or a transcription of the kernel's binary search. Then `compare_with_bnb` over many
cases checks the implementation in qlora_course.nf4 as a whole, and both quantizers are timed.

Usage, from the repo root on a GPU machine:  python tools/diag_quant_gpu.py [--out diag.md]
"""
import argparse, struct, time
import torch, triton, triton.language as tl
import bitsandbytes as bnb, bitsandbytes.functional as BF
from qlora_course.core import set_seed
from qlora_course.quant import NF4_CODE, DYNAMIC_CODE, blocks_of, unpack_4bit, nearest_code
from qlora_course.bnb_rounding import nf4_cuda_bounds, cuda_reciprocal
from qlora_course.nf4 import FLOAT_DTYPES, quantize_nf4
from qlora_course.bnb_exact import compare_with_bnb

@triton.jit
def _rcp_ftz(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=1.0)
    tl.store(y_ptr + i, tl.inline_asm_elementwise('rcp.approx.ftz.f32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1), mask=i < n)

@triton.jit
def _rcp_noftz(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=1.0)
    tl.store(y_ptr + i, tl.inline_asm_elementwise('rcp.approx.f32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1), mask=i < n)

@triton.jit
def _div_full(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=1.0)
    tl.store(y_ptr + i, tl.inline_asm_elementwise('div.full.f32 $0, 0f3F800000, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1), mask=i < n)

def _launch(kernel):
    def f(t):
        t = t.float().contiguous(); out = torch.empty_like(t)
        kernel[(triton.cdiv(t.numel(), 1024),)](t, out, t.numel(), BLOCK=1024)
        return out
    return f

def _jiterator_rcp():
    code = 'template <typename T> T rcp_ftz(T x) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }'
    return torch.cuda.jiterator._create_jit_fn(code)

RECIPS = {'1/absmax (IEEE)': lambda a: 1.0 / a, 'rcp.approx.ftz': _launch(_rcp_ftz), 'rcp.approx': _launch(_rcp_noftz),
          'div.full 1/a': _launch(_div_full), 'cuda_reciprocal': cuda_reciprocal}

def hx(v): return f'{struct.unpack("<I", struct.pack("<f", float(v)))[0]:08x}'

def binary_search_code(x, code):
    "The kernel's 8-bit code search (7 halving steps from 127, then the nearer of the last pivot and its neighbour)"
    kw = dict(device=x.device)
    pivot, lo, hi = torch.full(x.shape, 127, **kw), torch.zeros(x.shape, dtype=torch.long, **kw), torch.full(x.shape, 255, **kw)
    lower, upper = torch.full(x.shape, -1.0, **kw), torch.full(x.shape, 1.0, **kw)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lo, lower = torch.where(gt, pivot, lo), torch.where(gt, val, lower)
        hi, upper = torch.where(gt, hi, pivot), torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper, lower = torch.where(hi == 255, code[255], upper), torch.where(lo == 0, code[0], lower)
    return torch.where(x > val, torch.where(x > (upper + val) * 0.5, hi, pivot), torch.where(x < (lower + val) * 0.5, lo, pivot))

def tensors():
    "The notebook's 4096 x 4096 fp32 case (same seed and draw order) and three more"
    set_seed(0)
    cases = [torch.randn(64, 64), torch.randn(33, 17), torch.randn(300, 129), torch.randn(4099), torch.randn(4096, 4096) * 0.02]
    out = {'notebook 4096x4096*0.02': cases[-1]}
    for s in (1, 2, 3):
        torch.manual_seed(s); out[f'seed {s} 4096x4096*0.02'] = torch.randn(4096, 4096) * 0.02
    return {k: v.cuda() for k, v in out.items()}

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', help='also write the report (markdown) to this file')
    a = p.parse_args()
    L = []
    def say(*s):
        line = ' '.join(map(str, s)); print(line, flush=True); L.append(line)
    say(f'# diag_quant_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}, triton {triton.__version__}\n')
    dev = torch.device('cuda')
    T = tensors()
    code8 = DYNAMIC_CODE.to(dev)
    say('dynamic code identical to bitsandbytes create_dynamic_map:', torch.equal(code8.view(torch.int32), BF.create_dynamic_map().to(dev).view(torch.int32)))
    # 1. the reciprocals themselves
    torch.manual_seed(0)
    t = torch.exp(torch.empty(1_000_000, device=dev).uniform_(-8, 5))
    ieee = 1.0 / t
    try:
        jit = _jiterator_rcp()(t)
        say('jiterator rcp.approx.ftz == Triton rcp.approx.ftz (bits):', torch.equal(jit.view(torch.int32), RECIPS['rcp.approx.ftz'](t).view(torch.int32)))
    except Exception as e: say('jiterator failed:', repr(e)[:300])
    for name, f in RECIPS.items():
        r = f(t)
        ulps = (r.view(torch.int32).long() - ieee.view(torch.int32).long()).abs()
        say(f'- {name}: differs from IEEE 1/t on {(ulps > 0).float().mean().item():.4f} of 1e6 values, max {ulps.max().item()} ulp')
    bounds = {'fp32 midpoints': ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(dev), 'kernel constants': nf4_cuda_bounds(dev)}
    # 2. NF4 codes
    say('\n## NF4 codes: number differing from bitsandbytes (of 16,777,216 per tensor)\n')
    say('| tensor | block | 1/absmax | thresholds | differ |'); say('|---|---|---|---|---|')
    examples = []
    for tname, x in T.items():
        for bs in (32, 64, 128, 256, 1024, 4096):
            packed, am = torch.ops.bitsandbytes.quantize_4bit(x, bs, 'nf4', torch.uint8)
            ref = unpack_4bit(packed.view(-1), x.numel()).long()
            b = blocks_of(x, bs)
            assert torch.equal(b.abs().amax(1).view(torch.int32), am.view(torch.int32)), 'absmax differs'
            scaled = {name: b * f(am)[:, None] for name, f in RECIPS.items()}
            scaled['x / absmax'] = b / am[:, None]
            for rname, sc in scaled.items():
                for bname, bd in bounds.items():
                    q = torch.bucketize(sc, bd).view(-1)
                    n = int((q != ref).sum())
                    say(f'| {tname} | {bs} | {rname} | {bname} | {n} |')
                    if n and len(examples) < 12 and rname in ('1/absmax (IEEE)', 'rcp.approx.ftz'):
                        for i in (q != ref).nonzero().view(-1)[:3].tolist():
                            blk = i // bs
                            examples.append(f'{tname} bs {bs} [{rname}, {bname}] i={i}: x={hx(x.view(-1)[i])} absmax={hx(am[blk])} '
                                            f'1/a ieee={hx(1.0 / am[blk])} rcp={hx(RECIPS["rcp.approx.ftz"](am[blk:blk + 1])[0])} '
                                            f'scaled={hx(sc.view(-1)[i])} ({sc.view(-1)[i].item():.9f}) bnb={ref[i].item()} ours={q[i].item()}')
    say('\nexamples:'); [say('-', e) for e in examples]
    # 3. nested 8-bit codes of the absmax, and plain 8-bit blockwise quantization
    say('\n## 8-bit dynamic-map codes: number differing from bitsandbytes\n')
    say('| input | 1/absmax2 | rounding | differ | of |'); say('|---|---|---|---|---|')
    ex8 = []
    inputs = {}
    for tname, x in list(T.items())[:2]:
        for bs in (64, 128):
            _, am = torch.ops.bitsandbytes.quantize_4bit(x, bs, 'nf4', torch.uint8)
            inputs[f'nested: {tname}, bs {bs}'] = (am - am.mean(), 256)
    torch.manual_seed(5)
    inputs['randn(8M), block 256'] = (torch.randn(8 * 2 ** 20, device=dev), 256)
    inputs['randn(8M)**3, block 4096'] = (torch.randn(8 * 2 ** 20, device=dev) ** 3, 4096)
    for iname, (v, bs) in inputs.items():
        q_ref, st = BF.quantize_blockwise(v, blocksize=bs)
        b = blocks_of(v, bs)
        assert torch.equal(b.abs().amax(1).view(torch.int32), st.absmax.view(torch.int32)), 'absmax2 differs'
        for rname in ('1/absmax (IEEE)', 'rcp.approx.ftz', 'rcp.approx'):
            sc = b * RECIPS[rname](st.absmax)[:, None]
            for rnd in ('ties lower', 'ties even', 'binary search'):
                q = binary_search_code(sc, code8) if rnd == 'binary search' else nearest_code(sc, code8, rnd.split()[1])
                q = q.view(-1)[:v.numel()]
                n = int((q != q_ref.long()).sum())
                say(f'| {iname} | {rname} | {rnd} | {n} | {v.numel()} |')
                if n and len(ex8) < 8:
                    for i in (q != q_ref.long()).nonzero().view(-1)[:2].tolist():
                        ex8.append(f'{iname} [{rname}, {rnd}] i={i}: v={hx(v[i])} absmax2={hx(st.absmax[i // bs])} scaled={hx(sc.view(-1)[i])} '
                                   f'bnb={q_ref[i].item()} ours={q[i].item()}')
    say('\nexamples:'); [say('-', e) for e in ex8]
    # 4. the implementation as a whole
    say('\n## qlora_course.bnb_exact.compare_with_bnb\n')
    set_seed(0)
    zero = torch.randn(5, 128); zero[2, :64] = 0
    sub = torch.randn(6, 64); sub[1] *= 1e-39; sub[3, :32] *= 1e-39
    big = T
    cases = [torch.randn(64, 64), torch.randn(33, 17), torch.randn(300, 129), torch.randn(4099), torch.randn(96, 256) ** 3, zero, sub,
             torch.randn(3, 5, 7), torch.randn(1)]
    cases = [c.cuda() for c in cases] + list(big.values())[:2]
    n, bad = 0, []
    for dt in FLOAT_DTYPES:
        for x in cases:
            for bs in ((32, 64, 128, 256, 1024, 4096) if x.numel() > 10 ** 6 else (32, 64, 128)):
                for dq in (True, False):
                    n += 1
                    r = compare_with_bnb(x.to(dt), bs, dq)
                    if not all(r.values()): bad.append((str(dt), tuple(x.shape), bs, dq, r))
    say(f'bit-identical: {n - len(bad)}/{n} cases')
    for b_ in bad: say('- differs:', b_)
    # 5. cost
    x = list(big.values())[0].to(torch.bfloat16)
    def bench(f):
        for _ in range(3): f()
        ts = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
        return sorted(ts)[5]
    say(f'\nquantize 4096x4096 bf16, bs 64, DQ: quantize_nf4 {bench(lambda: quantize_nf4(x)):.2f} ms, '
        f'bitsandbytes {bench(lambda: BF.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")):.2f} ms (median of 10)')
    if a.out: open(a.out, 'w').write('\n'.join(L) + '\n')
    print('DIAG_OK' if not bad else 'DIAG_BAD')

if __name__ == '__main__': main()
