#!/usr/bin/env python
"""Where NF4 on the CPU differs from bitsandbytes (0.50.x), kernel by kernel: runs bitsandbytes' CPU quantize_4bit /
dequantize_4bit and qlora_course.nf4 on the CPU cases of nbs/04c_bnb_exact.ipynb (fp32/fp16/bf16, block sizes 32/64/128,
double quantization on/off, the same tensors) plus a few more, and prints per case whether the packed codes, absmax
(or its 8-bit codes), absmax2, offset and the dequantized tensor are bit-identical: a grid with one symbol per case,
then the details (counts of differing elements, examples) of the cases where anything differs: the first 8 on
stdout, all of them in $OUT/diag_quant_cpu.txt when OUT is set.

bitsandbytes 0.50.2 dequantizes on the CPU with a PyTorch fallback (odd last dimension; block size >= 2048 where
PyTorch reports AVX-512), an AVX-512 C++ kernel (cpuid AVX-512F, last dimension a multiple of 16, block size >= 16) or
a scalar C++ kernel. For each case this prints which one runs and compares bitsandbytes' result with: ours; its own
dequantization of the same bytes as one row (shape (numel,)); `bnb_avx512_dequantize` (a hypothesis for the AVX-512
kernel's row-wise scale indexing, defined here; on the 2026-11-23 host it did not reproduce bitsandbytes); and its PyTorch fallback. Then a 1-thread rerun (OMP_NUM_THREADS=1, subprocess),
a repeat of each bitsandbytes call, the 8-bit CPU table, and Linear4bit vs NF4Linear (train, eval/no-grad).

Needs only torch, numpy, bitsandbytes and the repo on PYTHONPATH. Always exits 0; the last line reads
`cpu quant: N identical, M differ` (a case is identical when compare_with_bnb finds every piece identical, i.e. the
notebook's check passes). Usage, from the repo root:  python tools/diag_quant_cpu.py
"""
import logging, os, subprocess, sys, time, traceback
import torch
logging.getLogger('torch._dynamo').setLevel(logging.ERROR)        # bitsandbytes' compiled fallback recompiles per shape
import bitsandbytes as bnb, bitsandbytes.functional as BF
from qlora_course.quant import NF4_CODE, DYNAMIC_CODE, same_bits, unpack_4bit
from qlora_course.bnb_rounding import lut_code, cpu_flags, bnb_cpu_kernel, bnb_flushes_subnormals, _cast
from qlora_course.nf4 import FLOAT_DTYPES, quantize_nf4, dequantize_nf4, _pairs
from qlora_course.bnb_exact import compare_with_bnb, bnb_misindexes

def bnb_avx512_dequantize(packed, stats, shape, dtype=torch.float32, code=None):
    "Hypothesis: the AVX-512 kernel scales element (r, c) of the (rows, n) view by absmax[r*(n // blocksize) + c // blocksize]"
    shape, bs = tuple(shape), stats.blocksize
    n = shape[-1]
    code = NF4_CODE if code is None else code
    vals = _pairs(tuple(code.tolist()), packed.device)[packed.reshape(-1).view(torch.uint8).int()].view(-1, n)
    r, c = torch.arange(vals.shape[0], device=vals.device)[:, None], torch.arange(n, device=vals.device)
    flush = dtype == torch.bfloat16 and 'avx512_bf16' in cpu_flags()
    return _cast(vals * stats.absmax_fp32()[r * (n // bs) + c // bs], dtype, flush).view(shape)

def hx(t):
    "Bit pattern of a float tensor element as hex"
    bits = {4: torch.int32, 2: torch.int16}[t.element_size()]
    return f'{t.detach().reshape(1).view(bits).item() & (2 ** (8 * t.element_size()) - 1):0{2 * t.element_size()}x}'

def diff(a, b, n=4, shape=None):
    "(count of differing elements, a few examples) of two tensors of the same number of elements, compared bit for bit"
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if a.numel() != b.numel(): return -1, f'sizes {a.numel()} vs {b.numel()}'
    if a.dtype != b.dtype: return -1, f'dtypes {a.dtype} vs {b.dtype}'
    if a.is_floating_point():
        bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
        ne = a.view(bits) != b.view(bits)
    else: ne = a != b
    idx = ne.nonzero().view(-1)
    ex = []
    for i in idx[:n].tolist():
        pos = i if shape is None else divmod(i, shape[-1])          # (row, column) of the (rows, shape[-1]) view
        if a.is_floating_point():
            ratio = (b[i].double() / a[i].double()).item() if a[i] != 0 else float('nan')
            ex.append(f'{pos}: {a[i].item():.7g} ({hx(a[i])}) vs {b[i].item():.7g} ({hx(b[i])}), ratio {ratio:.6g}')
        else: ex.append(f'{pos}: {a[i].item()} vs {b[i].item()}')
    return int(idx.numel()), '; '.join(ex)

def header():
    flags = cpu_flags()
    lib = bnb.cextension.lib
    def call(name):
        try: return bool(getattr(lib, name)())
        except Exception as e: return f'n/a ({type(e).__name__})'
    model = ''
    try:
        with open('/proc/cpuinfo') as f: model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), '')
    except OSError: pass
    print(f'python {sys.version.split()[0]}, torch {torch.__version__}, bitsandbytes {bnb.__version__}, numpy {__import__("numpy").__version__}')
    print(f'CPU: {model or "?"}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}')
    print(f'torch cpu capability: {torch.backends.cpu.get_cpu_capability()}; ATEN_CPU_CAPABILITY={os.environ.get("ATEN_CPU_CAPABILITY")}')
    print(f'bitsandbytes lib: has_avx512f_cpu={call("has_avx512f_cpu")}, has_avx512bf16_cpu={call("has_avx512bf16_cpu")}, '
          f'functional.has_avx512bf16()={BF.has_avx512bf16()}')
    print('/proc/cpuinfo avx/amx/f16c/fma flags:', ' '.join(sorted(f for f in flags if f.startswith(('avx', 'amx', 'f16c', 'fma')))) or '(none)')
    print(f'kernel for (64, 64), bs 64: {bnb_cpu_kernel((64, 64), 64)}; bf16 subnormal flush there: {bnb_flushes_subnormals((64, 64), 64, torch.bfloat16)}')

def notebook_cases():
    "The tensors of the notebook's CPU check, made in the same order from the same seed, plus extra ones"
    torch.manual_seed(0)
    with_zero_block = torch.randn(5, 128); with_zero_block[2, :64] = 0
    zero_tail = torch.randn(4099); zero_tail[-3:] = 0
    mids32 = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    am = torch.tensor(1.4925131797790527)
    straddles = lambda v: bool(torch.bucketize(v / am, mids32) != torch.bucketize(v * (1 / am), mids32))
    near = [[v for v in (m * am, torch.nextafter(m * am, am), torch.nextafter(m * am, -am)) if straddles(v)][:1] for m in mids32]
    ties = torch.cat([torch.randn(128).clamp(-1, 1), torch.stack(sum(near, [])), am[None]])
    cases = [torch.randn(64, 64), torch.randn(33, 17), torch.randn(300, 129), torch.randn(3, 5, 7), torch.randn(4099),
             torch.randn(96, 256) ** 3, with_zero_block, torch.randn(8, 48), torch.randn(4, 64) * 1e-38, zero_tail, ties]
    g = torch.Generator().manual_seed(1)
    extra = [torch.randn(256, 4096, generator=g) * 0.02, torch.randn(16, 48, generator=g), torch.randn(2, 3, 64, generator=g),
             torch.randn(64, generator=g), torch.randn(4096, generator=g), torch.randn(32, 128, generator=g) * 3e-38]
    return cases, extra

def one_case(x, bs, dq):
    "Compare everything for one case: (symbol for the grid, notebook check passes, line of findings)"
    shape, dt = tuple(x.shape), x.dtype
    kernel, misidx, flush = bnb_cpu_kernel(shape, bs), bnb_misindexes(shape, bs), bnb_flushes_subnormals(shape, bs, dt)
    p, qs = BF.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type='nf4')
    mp, ms = quantize_nf4(x, bs, dq)
    out, same = [], {}
    def add(name, a, b, shape=None):
        n, ex = diff(a, b, shape=shape)
        out.append(f'{name} ' + ('=' if n == 0 else f'DIFFER {n}/{a.numel()} [{ex}]'))
        same[name] = n == 0
    add('codes', unpack_4bit(mp, x.numel()), unpack_4bit(p.view(-1), x.numel()))
    add('absmax' + ('(8-bit codes)' if dq else ''), ms.absmax, qs.absmax)
    if dq: add('absmax2', ms.absmax2, qs.state2.absmax); add('offset', ms.offset.reshape(1), qs.offset.reshape(1))
    ours = dequantize_nf4(mp, ms, shape, dt)
    theirs, again = BF.dequantize_4bit(p, qs), BF.dequantize_4bit(p, qs)
    add('deq ours/bnb', ours, theirs, shape)
    if not same_bits(theirs, again): out.append('bnb dequant NOT REPEATABLE: ' + diff(theirs, again)[1])
    if not same['deq ours/bnb']:
        import copy
        one = copy.copy(qs); one.shape = torch.Size([x.numel()])
        add('ours/bnb-one-row', ours, BF.dequantize_4bit(p, one))
        if shape[-1] % 16 == 0: add('bnb/model-avx512', theirs, bnb_avx512_dequantize(mp, ms, shape, dt), shape)
        try:
            from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
            from bitsandbytes.backends.utils import _get_4bit_code
            absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if dq else qs.absmax
            ref = _dequantize_4bit_compute(p.view(-1).view(torch.uint8), absmax.float(), _get_4bit_code('nf4', x.device), bs, shape, dt)
            add('ours/bnb-torch-fallback', ours, ref)
        except Exception as e: out.append(f'torch fallback n/a ({type(e).__name__}: {e})')
        sub = ((ours.float().abs() < torch.finfo(torch.float32).tiny) & (ours != 0)).sum().item()
        if sub: out.append(f'{sub} subnormal outputs in ours')
    try:
        r = compare_with_bnb(x, bs, dq)
        ok = all(r.values())
    except Exception as e:
        r, ok = f'compare_with_bnb raised {type(e).__name__}: {e}', False
    sym = 'X' if not ok else '=' if all(same.values()) else 'm' if same.get('bnb/model-avx512') else '?'
    line = (f'{"ok  " if ok else "FAIL"} {str(dt)[6:]:8s} {str(shape):12s} bs {bs:4d} dq {int(dq)} kernel {kernel:6s}'
            f'{" misindexed-predicted" if misidx else ""}{" bf16-flush" if flush else ""} | ' + '; '.join(out))
    if not ok: line += f' | compare_with_bnb: {r}'
    return sym, ok, line

def run_all(verbose=True):
    "Every case; prints a grid (one symbol per block size and dq) and the details of the cases where anything differs"
    cases, extra = notebook_cases()
    sets = [(cases, (64, 128, 32)), (extra, (32, 64, 128, 2048))]
    n_ok, bad, details, t0 = 0, [], [], time.time()
    if verbose: print("grid: '=' all identical; 'm' bitsandbytes misindexed exactly as modelled, the rest identical; "
                      "'?' a difference the notebook check allows; 'X' the notebook check fails")
    for xs, sizes in sets:
        if verbose: print(f'{"dtype":8s} {"shape":13s} kernel  ' + '  '.join(f'bs{bs:<4d}dq1,0' for bs in sizes))
        for dt in FLOAT_DTYPES:
            for x in xs:
                syms = []
                for bs in sizes:
                    for dq in (True, False):
                        try: sym, ok, line = one_case(x.to(dt), bs, dq)
                        except Exception:
                            sym, ok, line = 'X', False, f'FAIL {dt} {tuple(x.shape)} bs {bs} dq {dq}: raised ' + traceback.format_exc()
                        syms.append(sym); n_ok += ok
                        if not ok: bad.append(line)
                        if sym != '=': details.append(line)
                if verbose:
                    cells = '  '.join(f'     {a} {b}' for a, b in zip(syms[::2], syms[1::2]))
                    print(f'{str(dt)[6:]:8s} {str(tuple(x.shape)):13s} {bnb_cpu_kernel(x.shape, 64):7s} {cells}')
    return n_ok, bad, details, time.time() - t0

def extras():
    "8-bit CPU table, and Linear4bit vs NF4Linear; informational"
    from qlora_course.nf4_linear import NF4Linear
    torch.manual_seed(0)
    v = torch.rand(1_000_000) * 2 - 1
    q, _ = torch.ops.bitsandbytes.quantize_blockwise(torch.cat([v, torch.ones(1)]), BF.create_dynamic_map(), 1_000_001)
    print(f'8-bit CPU table: {int((lut_code(v) != q[:-1].long()).sum())} of 1,000,000 codes differ from bitsandbytes')
    for (fin, fout), bs, cdt in (((256, 96), 64, torch.float32), ((128, 64), 128, torch.float32), ((256, 96), 64, torch.bfloat16), ((48, 32), 32, torch.bfloat16)):
        try:
            lin = torch.nn.Linear(fin, fout).to(cdt)
            ours = NF4Linear.from_linear(lin, blocksize=bs, compute_dtype=cdt)
            b = ours.to_bnb()
            x = torch.randn(5, fin, dtype=cdt)
            res = []
            for mode in ('train, grad', 'eval, no grad'):
                if mode.startswith('eval'): b.eval(); ours.eval()
                xx = x.clone().requires_grad_(mode.startswith('train'))
                with torch.set_grad_enabled(mode.startswith('train')):
                    y1, y2 = ours(xx), b(xx)
                n, ex = diff(y1, y2)
                res.append(f'{mode}: ' + ('=' if n == 0 else f'{n}/{y1.numel()} differ, max abs {(y1.float() - y2.float()).abs().max().item():.3g}'))
            packed = getattr(b.weight.quant_state, 'packing_format_for_cpu', False)
            print(f'Linear4bit vs NF4Linear {fin}->{fout} bs {bs} {str(cdt)[6:]}: ' + '; '.join(res) + f' (bnb repacked for CPU: {packed})')
        except Exception as e: print(f'Linear4bit vs NF4Linear {fin}->{fout}: raised {type(e).__name__}: {e}')

def main():
    if '--child' in sys.argv:                                    # the 1-thread rerun: only the counts
        n_ok, bad, details, dt = run_all(verbose=False)
        print(f'CHILD {n_ok} {len(bad)}'); return
    header()
    print('\n== cases ==')
    n_ok, bad, details, dt = run_all()
    print(f'\n{n_ok + len(bad)} cases in {dt:.1f} s; {len(details)} with a difference, {len(bad)} fail the notebook check')
    shown = sorted(details, key=lambda l: not l.startswith("FAIL"))[:8]
    for line in shown: print(line[:700])
    if len(details) > len(shown): print(f'... {len(details) - len(shown)} more')
    if os.environ.get('OUT'):
        path = os.path.join(os.environ['OUT'], 'diag_quant_cpu.txt')
        with open(path, 'w') as f: f.write('\n'.join(details) + '\n')
        print(f'all {len(details)} lines with a difference written to {path}')
    print('\n== rerun with OMP_NUM_THREADS=1 in a subprocess ==')
    try:
        env = dict(os.environ, OMP_NUM_THREADS='1')
        r = subprocess.run([sys.executable, os.path.abspath(__file__), '--child'], env=env, capture_output=True, text=True, timeout=400)
        last = [l for l in r.stdout.splitlines() if l.startswith('CHILD')]
        print(f'1 thread: {last[0].split()[1]} identical, {last[0].split()[2]} differ' if last else f'no result (rc {r.returncode}): {r.stderr[-800:]}')
    except Exception as e: print(f'1-thread rerun failed: {type(e).__name__}: {e}')
    print('\n== extras ==')
    try: extras()
    except Exception: traceback.print_exc(file=sys.stdout)
    print(f'cpu quant: {n_ok} identical, {len(bad)} differ')

if __name__ == '__main__':
    try: main()
    except Exception:
        traceback.print_exc(file=sys.stdout)
        print('cpu quant: 0 identical, 0 differ (the diagnostic itself failed, see above)')
    sys.exit(0)
