"""Time fastnf4's Triton NF4 dequantization of one 4096x14336 weight (Llama-3-8B's MLP) for several launch shapes:
bytes per program x warps; GB/s counts the packed bytes read plus the bf16 weights written. Bit-identity checked each time."""
import itertools, torch, triton
import qlora_course.fast as fx
from qlora_course.quant import same_bits
from qlora_course.nf4 import quantize_nf4, dequantize_nf4
w = torch.randn(14336, 4096, device='cuda', dtype=torch.bfloat16)
packed, st = quantize_nf4(w)
ref = dequantize_nf4(packed, st, w.shape, torch.bfloat16)
n = w.numel(); out = torch.empty(n, dtype=torch.bfloat16, device='cuda')
args = (packed, st.absmax, st.absmax2, st.offset.reshape(1))
for nbytes, warps in itertools.product((512, 1024, 2048, 4096, 8192), (2, 4, 8, 16)):
    orig = fx._nf4_dequant_kernel.run
    def launch():
        nb = packed.numel()
        nf4, dyn = fx._code_tables(packed.device)
        fx._nf4_dequant_kernel[(triton.cdiv(nb, nbytes),)](packed.view(-1), st.absmax.view(-1), st.absmax2.view(-1), st.offset.reshape(1), nf4, dyn, out, n, nb,
            BLOCKSIZE=64, BLOCKSIZE2=256, DOUBLE_QUANT=True, OUT_KIND=0, BYTES=nbytes, FAULT=0, enable_fp_fusion=False, num_warps=warps)
    try:
        launch(); torch.cuda.synchronize()
        ok = same_bits(out.view(w.shape), ref)
        ms = triton.testing.do_bench(launch, warmup=20, rep=200)
        print(f'bytes/program {nbytes:5d} warps {warps:2d}: {ms*1e3:7.1f} us  {(packed.numel() + 2 * n) / ms / 1e6:7.0f} GB/s  bit-identical {ok}', flush=True)
    except Exception as e: print(nbytes, warps, 'failed', type(e).__name__, str(e)[:100])
