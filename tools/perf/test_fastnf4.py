"""CPU tests of fastnf4: run as
    OMP_NUM_THREADS=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/tools/perf python tools/perf/test_fastnf4.py   (needs pip install triton)
"""
import math, os, sys, time
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastnf4 as fx
from qlora_course.quant import quantize_nf4, dequantize_nf4, same_bits, rel_error, bnb_flushes_subnormals
from qlora_course.nf4_linear import NF4Linear
from qlora_course.lora import LoRALinear

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
    interp = os.environ.get('TRITON_INTERPRET') == '1' and fx.triton is not None
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
        for fault, what, odt in ((1, 'nibbles swapped', torch.bfloat16), (2, 'truncating bf16 cast', torch.bfloat16),
                                 (3, 'scale by one fused multiply-add, fp32 output', torch.float32)):
            res = [case(s, impl='triton', fault=fault, out_dtype=odt) for s in ((301, 257), (512, 1024))]
            report(f'(a) negative control, {what}: detected', all(not ok for ok, _, _ in res), f'differing elements: {[nd for _, _, nd in res]}')
        # the same FMA fault seen through bf16 outputs: a one-ulp fp32 scale change rarely moves a bf16 rounding
        res = [case(s, impl='triton', fault=3, kind=k) for s in ((301, 257), (512, 1024)) for k in ('normal', 'heavy')]
        print(f'      (info) FMA fault with bf16 output: differing elements {[nd for _, _, nd in res]} of 77,357 / 524,288 per shape')
        # The layer path: _NF4Matmul with the patched dequantization equals the plain one bit for bit, forward and backward
        lin = nn.Linear(257, 301, bias=True, dtype=torch.bfloat16)
        q = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
        x = torch.randn(5, 257, dtype=torch.bfloat16, requires_grad=True)
        y0 = q(x); y0.sum().backward(); g0 = x.grad.clone(); x.grad = None
        calls, real = [], fx.fast_dequantize
        fx.fast_dequantize = lambda *a: calls.append(1) or real(*a)      # count: the patched path must really be taken
        undo = fx.patch_nf4linear()
        try:
            y1 = q(x); y1.sum().backward(); g1 = x.grad.clone()
            d1, d2 = q.dequantize(), q.dequantize()                          # the public dequantize: new tensors, not the buffer
            fresh = d1.data_ptr() != d2.data_ptr()
        finally: undo(); fx.fast_dequantize = real
        report('(a) NF4Linear patched forward/backward = unpatched, bit for bit', same_bits(y0, y1) and same_bits(g0, g1))
        report('(a) the patch dequantizes through the shared buffer in forward and backward only', len(calls) == 2 and fresh,
               f'{len(calls)} calls, dequantize() fresh: {fresh}')
        report('(a) undo restores NF4Linear', NF4Linear._dequantize is not fx._fast_dequantize)
    else:
        print('NOTE: Triton interpreter not used (set TRITON_INTERPRET=1 with triton installed): only the reference was tested')

# ----------------------------------------------------------------------------------------------------------------------
# (b) chunked loss
# ----------------------------------------------------------------------------------------------------------------------
class Broken(fx.ChunkedLMLoss):
    "Negative control: backward forgets the one-hot target (softmax only)"
    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, lse, n_valid = ctx.saved_tensors
        p = (hidden @ weight.t()).to(lse.dtype).sub_(lse[:, None]).exp_() * (g / n_valid)
        p = p * (labels != ctx.ignore_index)[:, None]
        return (p.to(hidden.dtype) @ weight), None, None, None, None

class Shapes(TorchDispatchMode):
    "The largest number of elements of any tensor an op produces"
    def __init__(self): super().__init__(); self.biggest = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor): self.biggest = max(self.biggest, t.numel())
        return out

def plain_loss(h, w, labels):
    return F.cross_entropy((h @ w.t()).to(torch.promote_types(h.dtype, torch.float32)), labels, ignore_index=-100)

def grads(fn, h, w, labels, **kw):
    h = h.detach().clone().requires_grad_(True); w = w.detach().clone().requires_grad_(True)
    loss = fn(h, w, labels, **kw); loss.backward()
    return loss.detach(), h.grad, w.grad

def test_chunked():
    N, d, V = 37, 16, 101
    h = torch.randn(N, d, dtype=torch.float64); w = torch.randn(V, d, dtype=torch.float64)
    labels = torch.randint(0, V, (N,)); labels[[0, 5, 6, 7, 8, 9, 10, 11, 36]] = -100        # chunk 8..15 partly, all of row 36
    labels[8:16] = -100                                                                        # one chunk (of 8) fully ignored
    ref = grads(plain_loss, h, w, labels)
    worst = 0.0
    for chunk in (1, 8, 13, 37, 64):
        got = grads(fx.chunked_lm_loss, h, w, labels, chunk=chunk)
        errs = [abs(got[0] - ref[0]).item() / abs(ref[0]).item(), rel_error(got[1], ref[1]), rel_error(got[2], ref[2])]
        worst = max(worst, *errs)
    report('(b) float64: loss, grad hidden, grad weight = F.cross_entropy (chunks 1, 8, 13, 37, 64)', worst < 1e-12, f'worst relative error {worst:.2e} (tolerance 1e-12)')
    # negative control
    hb = h.detach().clone().requires_grad_(True)
    Broken.apply(hb, w, labels, 8, -100).backward()
    e = rel_error(hb.grad, ref[1])
    report('(b) negative control (backward without the one-hot target): detected', e > 1e-3, f'relative error of grad hidden {e:.2e}')
    # bf16 inputs, as in training: against the same HF-style computation ((h @ W.T) in bf16, then fp32 cross-entropy)
    N, d, V = 300, 64, 1000
    h = (torch.randn(N, d) ).to(torch.bfloat16); w = (torch.randn(V, d) * 0.1).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,)); labels[::7] = -100
    ref = grads(plain_loss, h, w, labels)
    ref64 = grads(plain_loss, h.double(), w.double(), labels)
    got = grads(fx.chunked_lm_loss, h, w, labels, chunk=64)
    le = abs(got[0].double() - ref[0].double()).item() / ref[0].item()
    ge = rel_error(got[1], ref[1]); gw = rel_error(got[2], ref[2])
    ge64, ge64_ref = rel_error(got[1], ref64[1]), rel_error(ref[1], ref64[1])
    report('(b) bf16: chunked vs plain bf16 computation', le < 1e-6 and ge < 1e-2 and gw < 1e-2,
           f'loss rel {le:.1e} (tol 1e-6), grad hidden rel {ge:.1e}, grad weight rel {gw:.1e} (tol 1e-2); vs float64: chunked {ge64:.1e}, plain {ge64_ref:.1e}')
    # no (N, V) tensor: the largest tensor any op makes in forward + backward is one chunk's logits
    h = h.detach().requires_grad_(True)
    with Shapes() as s:
        fx.chunked_lm_loss(h, w, labels, chunk=64).backward()
    with Shapes() as s_plain:
        plain_loss(h, w, labels).backward()
    report('(b) largest tensor made = one chunk of logits (64 x 1000), never N x V', s.biggest <= 64 * V,
           f'largest {s.biggest:,} elements (plain: {s_plain.biggest:,} = N x V)')

# ----------------------------------------------------------------------------------------------------------------------
# (c) LoRA branch in bf16
# ----------------------------------------------------------------------------------------------------------------------
def lora_grads(layer, x):
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters(): p.grad = None
    y = layer(x)
    torch.manual_seed(1); g = torch.randn(y.shape)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad

def make_pair(base_dtype, quantized):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=True, dtype=torch.float32)
    base = NF4Linear.from_linear(lin.to(base_dtype), compute_dtype=base_dtype) if quantized else lin.to(base_dtype)
    a = LoRALinear(base, r=8, lora_alpha=16)
    for p in a.parameters():
        if p.requires_grad: p.data = p.data.float()
    with torch.no_grad(): a.lora_B.weight.normal_(0, 0.05)          # a trained-looking B (B=0 would hide errors)
    import copy
    b = copy.deepcopy(a); fx.use_bf16_lora(b)
    return a, b

def test_lora():
    x = torch.randn(4, 10, 96)
    # fp32 everything: the bf16 variant is the same computation (addmm with alpha): equal to rounding
    a, b = make_pair(torch.float32, quantized=False)
    ra, rb = lora_grads(a, x), lora_grads(b, x)
    e = max(rel_error(u, v) for u, v in zip(ra, rb))
    report('(c) fp32 base: LoRALinearBF16 = LoRALinear', e < 1e-6, f'worst rel error {e:.1e} (tol 1e-6)')
    # bf16 base (NF4 dequantized to bf16): fp32 branch (current path) vs bf16 branch, both vs a float64 reference
    for quantized in (False, True):
        a, b = make_pair(torch.bfloat16, quantized)
        xb = x.to(torch.bfloat16)
        ra, rb = lora_grads(a, xb), lora_grads(b, xb)
        ref = make_pair(torch.bfloat16, quantized)[0]
        w0 = ref.base_layer.dequantize(torch.float64) if quantized else ref.base_layer.weight.double()
        bias = ref.base_layer.bias.double()
        dense = nn.Linear(96, 80, dtype=torch.float64); dense.weight.data, dense.bias.data = w0.clone(), bias.clone()
        ref.base_layer = dense.requires_grad_(False); ref = ref.double()
        rr = lora_grads(ref, xb.double())
        names = ('y', 'grad x', 'grad A', 'grad B')
        ea = [rel_error(u, v) for u, v in zip(ra, rr)]; eb = [rel_error(u, v) for u, v in zip(rb, rr)]
        dt_ok = b.lora_A.weight.dtype == torch.float32 and rb[2].dtype == torch.float32 and rb[3].dtype == torch.float32
        ok = dt_ok and all(v < 2e-2 for v in eb) and all(v < 3 * u + 1e-3 for u, v in zip(ea, eb))
        report(f"(c) bf16 {'NF4' if quantized else 'dense'} base: bf16 branch vs float64 within bf16 tolerance, fp32 grads on fp32 params", ok,
               'rel errors vs float64, bf16 branch / fp32 branch: ' + ', '.join(f'{n} {v:.1e}/{u:.1e}' for n, u, v in zip(names, ea, eb))
               + ' (tol: < 2e-2 and < 3x the fp32 branch + 1e-3)')
    # negative control: a branch that forgets the scaling
    a, b = make_pair(torch.bfloat16, False)
    b.scaling = 1.0
    ra, rb = lora_grads(a, x.to(torch.bfloat16)), lora_grads(b, x.to(torch.bfloat16))
    e = rel_error(rb[3], ra[3])
    report('(c) negative control (scaling 1 instead of alpha/r): detected', e > 2e-2, f'grad B rel error {e:.2f}')

# ----------------------------------------------------------------------------------------------------------------------
# end to end on tiny:llama (the benchmark's patches on the course's own QLoRA model, checkpointing on)
# ----------------------------------------------------------------------------------------------------------------------
def tiny_run(feats, dtype, steps=0):
    "One forward/backward (loss, LoRA grads), or `steps` training steps (losses, LoRA params), with the benchmark's patches"
    import functools, qlora_course.train as qt
    from qlora_course.core import set_seed, train_steps, hf_loss
    set_seed(0)
    old = qt.compute_dtype
    qt.compute_dtype = lambda precision='auto', device=None: dtype
    try:
        model, _ = qt.prepare_model('tiny:llama', 'qlora', 'course', lora_rank=16, lora_alpha=32, use_gradient_checkpointing=True,
                                    lora_target_modules='q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'.split(','), device='cpu')
    finally: qt.compute_dtype = old
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.02)                     # B != 0: the adapters' gradients all matter
    undo = fx.patch_nf4linear() if 'triton' in feats else (lambda: None)
    if 'bf16lora' in feats: fx.use_bf16_lora(model)
    loss_fn = functools.partial(fx.causal_lm_chunked_loss, chunk=24) if 'chunked' in feats else hf_loss
    x = torch.randint(4, model.config.vocab_size, (2, 48)); batch = {'input_ids': x, 'labels': x}
    try:
        if steps:
            losses = train_steps(model, lambda i: batch, steps, lr=1e-3, grad_clip=0, progress=False, loss_fn=loss_fn)
            return torch.tensor(list(losses)), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.train(); loss = loss_fn(model, batch); loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally: undo()

def test_e2e():
    if fx.triton is not None and os.environ.get('TRITON_INTERPRET') == '1':
        l0, p0 = tiny_run((), torch.bfloat16, steps=3); l1, p1 = tiny_run(('triton',), torch.bfloat16, steps=3)
        report('(e2e) tiny:llama bf16, 3 AdamW steps: Triton dequant path = baseline, losses and LoRA params bit for bit',
               same_bits(l0, l1) and all(same_bits(p0[k], p1[k]) for k in p0), f'{len(p0)} tensors')
    l0, g0 = tiny_run((), torch.float32); l1, g1 = tiny_run(('chunked',), torch.float32)
    e = max(rel_error(g1[k], g0[k]) for k in g0)
    report('(e2e) tiny:llama fp32: chunked loss (chunk 24 of 96 rows) = model(...).loss, and its LoRA grads', abs(l1 - l0).item() < 1e-5 * l0.item() and e < 1e-5,
           f'loss {l0.item():.6f} vs {l1.item():.6f}, worst grad rel error {e:.1e} (tol 1e-5)')
    l0, g0 = tiny_run((), torch.bfloat16); l1, g1 = tiny_run(('bf16lora', 'chunked'), torch.bfloat16)
    e = max(rel_error(g1[k], g0[k]) for k in g0)
    report('(e2e) tiny:llama bf16: bf16 LoRA + chunked loss vs baseline, LoRA grads', abs(l1 - l0).item() < 1e-3 * l0.item() and e < 3e-2,
           f'loss {l0.item():.6f} vs {l1.item():.6f}, worst grad rel error {e:.1e} (tol 3e-2)')

if __name__ == '__main__':
    test_dequant(); test_chunked(); test_lora(); test_e2e()
    bad = [n for n, ok in RESULTS if not ok]
    print(f'\n{len(RESULTS) - len(bad)}/{len(RESULTS)} passed' + (f'; FAILED: {bad}' if bad else ''))
    sys.exit(1 if bad else 0)
