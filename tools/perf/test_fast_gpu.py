"""GPU checks of qlora_course.fast (12_fast's `#| cuda` cell runs this); each check has a negative control that must fail.

    python tools/perf/test_fast_gpu.py            # on a CUDA machine with triton
    TRITON_INTERPRET=1 python tools/perf/test_fast_gpu.py --kernel-only --device cpu   # the kernel in Triton's interpreter

1. The Triton kernel is bit-identical to 04's `dequantize_nf4` (bf16, fp16, fp32; with and without double quantization;
   sizes that are not multiples of the block or of the bytes per program), and each of three broken kernels is caught:
   swapped nibbles, one fused multiply-add in the block scale, a truncating fp32 -> bf16 cast.
2. `speed_up` on a tiny Llama in bf16, compiled, with and without offloaded checkpoints: loss and adapter gradients equal the
   plain path's within bf16 rounding (the compiled kernels round differently), and the same holds on a second pass.
"""
import argparse, copy, sys
import torch
import qlora_course.fast as qf
from qlora_course.core import set_seed
from qlora_course.quant import quantize_nf4, dequantize_nf4, same_bits
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

def model_checks(dev, offload):
    set_seed(0)
    base, _ = prepare_model('tiny:llama', 'qlora', 'course', lora_rank=8, lora_alpha=16, use_gradient_checkpointing=True, precision='bf16', device=dev)
    for m in base.modules():
        if isinstance(m, LoRALinear): torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    fast = copy.deepcopy(base)
    loss_fn = qf.speed_up(fast, offload=offload)
    x = torch.randint(4, base.config.vocab_size, (2, 64), device=dev)
    def step(m, fn):
        m.train(); m.zero_grad(set_to_none=True)
        loss = fn(m, {'input_ids': x, 'labels': x}); loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}
    l0, g0 = step(base, lambda m, b: m(**b).loss)
    for k in range(2):
        l1, g1 = step(fast, loss_fn)
        worst = max(((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0)
        check(f'speed_up (compiled, offload={offload}) pass {k + 1}: loss and adapter gradients equal the plain path in bf16',
              abs(l1 - l0) <= 1e-2 * l0 and worst <= 3e-2, f'loss {l0:.5f} vs {l1:.5f}; worst gradient rel. difference {worst:.1e} (tolerance 3e-2)')
    # negative control: adapters of the first layer frozen out of the fast model's gradients must be seen
    g1['model.layers.0.self_attn.q_proj.lora_A.weight'] = torch.zeros_like(g0['model.layers.0.self_attn.q_proj.lora_A.weight'])
    worst = max(((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0)
    check('  negative control: a missing gradient is seen', worst > 3e-2)

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--device', default='cuda')
    p.add_argument('--kernel-only', action='store_true')
    a = p.parse_args()
    if a.device == 'cuda':
        import transformers
        print(f'{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__} | triton {qf.triton.__version__}')
    if a.kernel_only: kernel_checks(a.device)
    if not a.kernel_only:
        model_checks(a.device, False)
        model_checks(a.device, True)
    print(f'{sum(results)}/{len(results)} passed')
    sys.exit(0 if all(results) else 1)

if __name__ == '__main__': main()
