"""GPU checks of qlora_course.fast (12_fast's `#| cuda` cell runs this); each check has a negative control that must fail.

    python tools/perf/test_fast_gpu.py            # on a CUDA machine with triton
    TRITON_INTERPRET=1 python tools/perf/test_fast_gpu.py --kernel-only --device cpu   # the kernel in Triton's interpreter

1. The Triton kernel is bit-identical to 04's `dequantize_nf4` (bf16, fp16, fp32; with and without double quantization;
   sizes that are not multiples of the block or of the bytes per program), and each of three broken kernels is caught:
   swapped nibbles, one fused multiply-add in the block scale, a truncating fp32 -> bf16 cast.
2. `speed_up` on a tiny Llama in bf16, compiled, with and without offloaded checkpoints (with CUDA graphs where not
   offloaded): loss and adapter gradients equal the plain path's within bf16 rounding (the compiled kernels round
   differently), and the same holds on a second pass.
3. Decoding a range of rows (`block0`) is bit-identical to the same rows of the whole weight; speed_up with
   `decode_max` (decoding in row ranges) matches the plain path too.
4. CUDA graphs (`CUDAGraphStep`): replayed steps give the eager fast path's loss and gradients on new batches; two replays
   without zeroing accumulate; a graph that does not copy the new batch in, and a .grad replaced behind its back, are caught.
"""
import argparse, copy, sys
import torch
import qlora_course.fast as qf
from qlora_course.core import set_seed
from qlora_course.quant import same_bits
from qlora_course.nf4 import quantize_nf4, dequantize_nf4
from qlora_course.lora import LoRALinear
from qlora_course.train import prepare_model

results = []
def check(name, ok, detail=''):
    results.append(bool(ok)); print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

def kernel_checks(dev):
    set_seed(0)
    cases = [((4096, 1024), True, torch.bfloat16), ((14336, 64), True, torch.bfloat16), ((33, 70), True, torch.float16),
             ((128, 257), False, torch.float32), ((3, 5), True, torch.bfloat16), ((1000, 333), True, torch.float32)]
    for shape, dq, dt in cases:
        w = torch.randn(shape, device=dev) * 0.02
        w.view(-1)[:3] = torch.tensor([0.0, 1e-30, -3.0])                  # a zero, a tiny value and an outlier
        packed, st = quantize_nf4(w, double_quant=dq)
        ref = dequantize_nf4(packed, st, shape, dt).reshape(-1)
        args = (packed, st.absmax, st.absmax2, st.offset, st.blocksize, w.numel(), dt)
        ours = qf.nf4_dequant_triton(*args)
        check(f'kernel bit-identical to dequantize_nf4 {shape} dq={dq} {dt}', same_bits(ours, ref))
        for fault, what in ((1, 'swapped nibbles'), (2, 'truncating cast'), (3, 'fused multiply-add')):
            if fault == 2 and dt != torch.bfloat16 or fault == 3 and not dq: continue
            bad = qf.nf4_dequant_triton(*args, _fault=fault)
            check(f'  negative control caught: {what}', not same_bits(bad, ref))

def model_checks(dev, offload, **kw):
    set_seed(0)
    base, _ = prepare_model('tiny:llama', 'qlora', 'course', lora_rank=8, lora_alpha=16, use_gradient_checkpointing=True, precision='bf16', device=dev)
    for m in base.modules():
        if isinstance(m, LoRALinear): torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    fast = copy.deepcopy(base)
    loss_fn = qf.speed_up(fast, offload=offload, **kw)
    what = f"offload={offload}, {'CUDA graphs' if isinstance(loss_fn, qf.CUDAGraphStep) else 'no graphs'}{', ' + str(kw) if kw else ''}"
    x = torch.randint(4, base.config.vocab_size, (2, 64), device=dev)
    def step(m, fn):
        m.train(); m.zero_grad(set_to_none=True)
        loss = fn(m, {'input_ids': x, 'labels': x})
        if not getattr(fn, 'includes_backward', False): loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}
    l0, g0 = step(base, lambda m, b: m(**b).loss)
    for k in range(2):
        l1, g1 = step(fast, loss_fn)
        worst = max(((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0)
        check(f'speed_up (compiled, {what}) pass {k + 1}: loss and adapter gradients equal the plain path in bf16',
              abs(l1 - l0) <= 1e-2 * l0 and worst <= 3e-2, f'loss {l0:.5f} vs {l1:.5f}; worst gradient rel. difference {worst:.1e} (tolerance 3e-2)')
    # negative control: adapters of the first layer frozen out of the fast model's gradients must be seen
    g1['model.layers.0.self_attn.q_proj.lora_A.weight'] = torch.zeros_like(g0['model.layers.0.self_attn.q_proj.lora_A.weight'])
    worst = max(((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0)
    check('  negative control: a missing gradient is seen', worst > 3e-2)

def block0_checks(dev):
    set_seed(0)
    for shape, dq, bs in (((96, 320), True, 64), ((40, 256), False, 128)):
        w = torch.randn(shape, device=dev) * 0.02
        packed, st = quantize_nf4(w, blocksize=bs, double_quant=dq)
        whole = dequantize_nf4(packed, st, shape, torch.bfloat16).reshape(-1)
        r0, r1 = 24, 72 if shape[0] > 72 else 40
        part = packed.reshape(-1)[r0 * shape[1] // 2:r1 * shape[1] // 2]
        ours = qf.nf4_dequant_triton(part, st.absmax, st.absmax2, st.offset, bs, (r1 - r0) * shape[1], torch.bfloat16, block0=r0 * shape[1] // bs)
        check(f'rows {r0}:{r1} of {shape} (block0, dq={dq}) bit-identical to the whole weight\'s', same_bits(ours, whole[r0 * shape[1]:r1 * shape[1]]))
        bad = qf.nf4_dequant_triton(part, st.absmax, st.absmax2, st.offset, bs, (r1 - r0) * shape[1], torch.bfloat16, block0=0)
        check('  negative control caught: block0 ignored', not same_bits(bad, whole[r0 * shape[1]:r1 * shape[1]]))

def graph_checks(dev):
    set_seed(0)
    m, _ = prepare_model('tiny:llama', 'qlora', 'course', lora_rank=8, lora_alpha=16, use_gradient_checkpointing=True, precision='bf16', device=dev)
    for mod in m.modules():
        if isinstance(mod, LoRALinear): torch.nn.init.normal_(mod.lora_B.weight, std=0.02)
    eager_fn = qf.speed_up(m, graphs=False)
    graph_fn = qf.CUDAGraphStep(eager_fn)
    m.train()
    xs = [torch.randint(4, m.config.vocab_size, (2, 64), device=dev) for _ in range(3)]
    def grads(): return {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}
    def eager(x):
        m.zero_grad(set_to_none=True); l = eager_fn(m, {'input_ids': x, 'labels': x}); l.backward(); return l.item(), grads()
    def graphed(x, fn=graph_fn):
        m.zero_grad(set_to_none=True); l = fn(m, {'input_ids': x, 'labels': x}); return l.item(), grads()
    def diff(a, b): return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)
    graphed(xs[0])                                            # capture
    for i, x in enumerate(xs):
        (le, ge), (lg, gg) = eager(x), graphed(x)
        check(f'CUDA graph replay {i + 1} (a new batch) equals the eager step', abs(le - lg) <= 1e-3 * le and diff(gg, ge) <= 1e-2,
              f'loss {le:.5f} vs {lg:.5f}; worst gradient rel. difference {diff(gg, ge):.1e} (tolerance 1e-2)')
    _, g1 = graphed(xs[0])
    graph_fn(m, {'input_ids': xs[0], 'labels': xs[0]})         # no zeroing: adds to the same gradients
    g2 = grads()
    acc = diff(g2, {n: 2 * v for n, v in g1.items()})    # not exact: attention's backward adds with atomics, in bf16
    check('two replays without zeroing accumulate (= 2x one replay)', acc <= 1e-2, f'worst rel. difference {acc:.1e} (tolerance 1e-2; overwriting instead would give 0.5)')
    # negative controls: a graph that never copies the new batch in replays the old one; a replaced .grad is refused
    stale = qf.CUDAGraphStep(eager_fn); graphed(xs[0], stale)
    for key, g in stale.graphs.items():
        if g is not None: stale.graphs[key] = ({}, ) + g[1:]
    (le, _), (ls, _) = eager(xs[1]), graphed(xs[1], stale)
    check('  negative control caught: a graph that ignores the new batch', abs(le - ls) > 1e-3 * le, f'loss {le:.5f} vs stale {ls:.5f}')
    p = next(p for p in m.parameters() if p.requires_grad)
    p.grad = p.grad.clone()
    try: graph_fn(m, {'input_ids': xs[0], 'labels': xs[0]}); caught = False
    except RuntimeError: caught = True
    check('  negative control caught: a .grad replaced behind the graph', caught)

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--device', default='cuda')
    p.add_argument('--kernel-only', action='store_true')
    a = p.parse_args()
    if a.device == 'cuda':
        import transformers
        print(f'{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__} | triton {qf.triton.__version__}')
    def guarded(name, fn, *args, **kw):                # a check that raises is one FAIL line; the other checks still run
        try: fn(*args, **kw)
        except Exception as e:
            import traceback; traceback.print_exc()
            check(f'{name} ran to the end', False, f'{type(e).__name__}: {str(e)[:300]}')
    if a.kernel_only: guarded('kernel checks', kernel_checks, a.device)
    if a.kernel_only or a.device == 'cuda': guarded('block0 checks', block0_checks, a.device)
    if not a.kernel_only:
        guarded('speed_up (default)', model_checks, a.device, False)
        guarded('speed_up (row ranges, no graphs)', model_checks, a.device, False, graphs=False, decode_max=2**12)
        guarded('speed_up (offload)', model_checks, a.device, True)
        guarded('CUDA graph checks', graph_checks, a.device)
    print(f'{sum(results)}/{len(results)} passed')
    sys.exit(0 if all(results) else 1)

if __name__ == '__main__': main()
