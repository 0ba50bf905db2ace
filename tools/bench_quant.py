#!/usr/bin/env python
"""GPU check and benchmark of qlora_course.nf4: NF4 bit-exactness against bitsandbytes' CUDA kernels, then
forward+backward of NF4Linear (qlora_course.nf4_linear; eager and compiled) vs bitsandbytes Linear4bit vs bf16 nn.Linear at Llama-3-8B
layer shapes with 2048 tokens (`benchmark_nf4`). Needs one CUDA GPU; the notebook's `#| cuda` cells run the same.

Usage, from the repo root on a GPU machine:  python tools/bench_quant.py [--out bench.md]
"""
import argparse, traceback
import torch
from qlora_course.core import env_markdown
from qlora_course.nf4 import FLOAT_DTYPES
from qlora_course.bnb_exact import compare_with_bnb, benchmark_nf4, benchmark_markdown

def exactness():
    "compare_with_bnb over dtypes, block sizes and shapes on the GPU; (number of cases, failures)"
    torch.manual_seed(0)
    zero = torch.randn(5, 128); zero[2, :64] = 0
    cases = [torch.randn(64, 64), torch.randn(33, 17), torch.randn(300, 129), torch.randn(4099), torch.randn(4096, 4096) * 0.02,
             torch.randn(96, 256) ** 3, zero]
    n, bad = 0, []
    for dt in FLOAT_DTYPES:
        for x in cases:
            for bs in (64, 128):
                for dq in (True, False):
                    n += 1
                    r = compare_with_bnb(x.to('cuda', dt), bs, dq)
                    if not all(r.values()): bad.append((str(dt), tuple(x.shape), bs, dq, r))
    return n, bad

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', help='also write the results as markdown to this file')
    a = p.parse_args()
    lines = [env_markdown(), '']
    try:
        n, bad = exactness()
        lines.append(f'bit-exact with bitsandbytes CUDA kernels: {n - len(bad)}/{n} cases')
        lines += [f'- differs: {b}' for b in bad]
    except Exception: lines.append('exactness check failed:\n```\n' + traceback.format_exc() + '```')
    print('\n'.join(lines), flush=True)
    try:
        rows = benchmark_nf4()
        lines += ['', f'{torch.cuda.get_device_name()}, torch {torch.__version__}, 2048 tokens, bf16, `python tools/bench_quant.py`', '',
                  benchmark_markdown(rows)]
        print('\n'.join(lines[-3:]), flush=True)
    except Exception: lines.append('benchmark failed:\n```\n' + traceback.format_exc() + '```'); print(lines[-1])
    if a.out: open(a.out, 'w').write('\n'.join(lines) + '\n')

if __name__ == '__main__': main()
