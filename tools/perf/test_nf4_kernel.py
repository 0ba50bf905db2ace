"""The Triton NF4 kernel of qlora_course.fast, bit for bit against 04's dequantize_nf4, with three negative controls.
On a GPU: python tools/perf/test_nf4_kernel.py
On the CPU, in Triton's interpreter: OMP_NUM_THREADS=1 TRITON_INTERPRET=1 python tools/perf/test_nf4_kernel.py  (needs pip install triton)
Without Triton only the PyTorch reference is checked.
"""
import os, sys, time
import torch

import qlora_course.fast as fx
from qlora_course.quant import same_bits
from qlora_course.nf4 import quantize_nf4, dequantize_nf4

torch.manual_seed(0)
RESULTS = []
def report(name, ok, detail=''):
    RESULTS.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)

# ----------------------------------------------------------------------------------------------------------------------
# (a) dequantization: bit-identical to dequantize_nf4
# ----------------------------------------------------------------------------------------------------------------------
def weights(shape, dtype, kind):
    w = torch.randn(shape) * 0.02
    if kind == 'heavy': w = w * torch.exp(torch.randn(shape) * 1.5)             # scales that vary over decades
    if kind == 'zeros' and w.numel() >= 128: w.view(-1)[64:128] = 0                 # an all-zero block
    return w.to(dtype)

def case(shape, dtype=torch.bfloat16, blocksize=64, double_quant=True, kind='normal', out_dtype=torch.bfloat16, impl='triton', fault=0):
    w = weights(shape, dtype, kind)
    packed, stats = quantize_nf4(w, blocksize, double_quant)
    n = w.numel()
    ref = dequantize_nf4(packed, stats, shape, out_dtype).reshape(-1)
    ref32 = dequantize_nf4(packed, stats, shape, torch.float32)
    subnormal = int(((ref32.abs() < torch.finfo(torch.float32).tiny) & (ref32 != 0)).sum())   # where the CPU reference may flush
    buf = torch.full((n + 7,), float('nan'), dtype=out_dtype)                                  # a reused, larger, dirty buffer
    args = (packed, stats.absmax, stats.absmax2, stats.offset, blocksize, n, out_dtype)
    if impl == 'triton': got = fx.nf4_dequant_triton(*args, out=buf, _fault=fault, _bytes_per_program=256)
    else: got = fx.nf4_dequant_reference(*args, out=buf)
    ok = same_bits(got, ref) and got.data_ptr() == buf.data_ptr() and bool(buf[n:].isnan().all())
    return ok, subnormal, int((got.view(-1).view(torch.int16 if out_dtype != torch.float32 else torch.int32) !=
                               ref.view(torch.int16 if out_dtype != torch.float32 else torch.int32)).sum()) if got.shape == ref.shape else -1

SHAPES = [(1, 1), (3, 5), (7, 33), (64, 64), (130, 77), (301, 257), (512, 1024)]

def test_dequant():
    interp = fx.triton is not None and (os.environ.get('TRITON_INTERPRET') == '1' or torch.cuda.is_available())
    print(f'triton: {getattr(fx.triton, "__version__", None)}, TRITON_INTERPRET={os.environ.get("TRITON_INTERPRET")}')
    impls = (['triton'] if interp else []) + ['reference']
    for impl in impls:
        t = time.time(); bad = []; sub = 0; k = 0
        for shape in SHAPES:
            for kind in ('normal', 'heavy', 'zeros'):
                for wdt in (torch.bfloat16, torch.float32):
                    ok, s, nd = case(shape, wdt, kind=kind, impl=impl); k += 1; sub += s
                    if not ok: bad.append((shape, kind, wdt, nd))
        for bs in (32, 128, 256, 4096):
            for shape in ((301, 257), (33, 65)):
                ok, s, nd = case(shape, blocksize=bs, impl=impl); k += 1; sub += s
                if not ok: bad.append((shape, 'bs', bs, nd))
        for shape in ((301, 257), (7, 33)):
            for dq in (False,):
                ok, s, nd = case(shape, double_quant=dq, impl=impl); k += 1; sub += s
                if not ok: bad.append((shape, 'no-dq', nd))
            for odt in (torch.float16, torch.float32):
                ok, s, nd = case(shape, out_dtype=odt, impl=impl); k += 1; sub += s
                if not ok: bad.append((shape, odt, nd))
        report(f'(a) {impl}: bit-identical to dequantize_nf4', not bad,
               f'{k} cases (shapes {SHAPES}, bf16/fp32 source weights, normal/heavy-tailed/zero blocks, blocksizes 32-4096, '
               f'no double quant, fp16/fp32 outputs), {sub} subnormal reference values, {time.time() - t:.1f} s; failures: {bad[:4]}')
    if interp:
        faults = ((1, 'nibbles swapped', torch.bfloat16), (2, 'truncating bf16 cast', torch.bfloat16))
        if torch.cuda.is_available():   # Triton's interpreter computes tl.fma with two roundings: the fault exists on the GPU only
            faults += ((3, 'scale by one fused multiply-add, fp32 output', torch.float32),)
        for fault, what, odt in faults:
            res = [case(s, impl='triton', fault=fault, out_dtype=odt) for s in ((301, 257), (512, 1024))]
            report(f'(a) negative control, {what}: detected', all(not ok for ok, _, _ in res), f'differing elements: {[nd for _, _, nd in res]}')
        # the same FMA fault seen through bf16 outputs: a one-ulp fp32 scale change rarely moves a bf16 rounding
        res = [case(s, impl='triton', fault=3, kind=k) for s in ((301, 257), (512, 1024)) for k in ('normal', 'heavy')]
        if torch.cuda.is_available(): print(f'      (info) FMA fault with bf16 output: differing elements {[nd for _, _, nd in res]} of 77,357 / 524,288 per shape')

def main():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev == 'cuda':
        import transformers
        print(f'{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__} | triton {fx.triton.__version__}')
    torch.set_default_device(dev)
    test_dequant()
    bad = [n for n, ok in RESULTS if not ok]
    print(f'{len(RESULTS) - len(bad)}/{len(RESULTS)} passed')
    sys.exit(1 if bad else 0)

if __name__ == '__main__': main()
