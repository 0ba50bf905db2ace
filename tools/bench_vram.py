#!/usr/bin/env python
"""Check `qlora_course.peak.estimate` against measured GPU memory.

For each configuration (model shape x method x batch x sequence length x gradient checkpointing) this builds a
randomly initialised model of the real shape (no download: 4-bit models are written to a local folder and
loaded back through transformers' BitsAndBytesConfig), prepares it with the PEFT recipe the calculator models
(`memory.prepare_run`), trains a few steps with the loop of `core.train_steps` (`memory.measure`), and compares
the peak of `torch.cuda.max_memory_allocated()` with the prediction.

    python tools/bench_vram.py                       # the main grid (one H100 80GB: about 6 minutes)
    python tools/bench_vram.py --grid holdout        # configurations not looked at while building the model
    python tools/bench_vram.py --grid tiny --device cpu   # smoke test on CPU (peaks from memory.MemoryTracker)

Writes vram_bench.json (everything, written after each configuration) and vram_bench.md (the table) into
--out (default: $OUT, else the current folder). The runs shown in nbs/03b_memory.ipynb are kept in
tools/vram_results/ (h100_main.json, h100_holdout.json), which the notebook re-checks on every test run. Where a prediction misses by more than --diag percent, one
more step runs under `memory.MemoryTracker` and the largest tensors alive at its peak are saved too.
"""
import argparse, gc, json, os, shutil, sys, tempfile, time, warnings
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import torch
from qlora_course import memory
from qlora_course.peak import estimate
from qlora_course.core import env_report

warnings.filterwarnings('ignore')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# (model, method, batch, seq, gradient checkpointing, extra estimate/measure options)
GRIDS = {
    'main': [
        ('llama-3-8b', 'lora', 1, 2048, False, {}),
        ('llama-3-8b', 'lora', 4, 2048, True, {}),
        ('llama-3-8b', 'qlora', 1, 2048, True, {}),
        ('llama-3-8b', 'qlora', 4, 4096, True, {}),
        ('qwen2.5-0.5b', 'full', 4, 1024, False, {}),
        ('qwen2.5-0.5b', 'full', 8, 2048, True, {}),
        ('qwen2.5-0.5b', 'lora', 4, 2048, False, {}),
        ('qwen2.5-0.5b', 'dora', 4, 1024, False, {}),
        ('qwen2.5-0.5b', 'qlora', 8, 1024, True, {}),
        ('qwen2.5-0.5b', 'full', 4, 1024, True, {'optimizer': 'adamw8bit'}),
        ('llama-3.2-1b', 'full', 2, 2048, True, {}),
        ('llama-3.2-1b', 'lora', 4, 2048, False, {}),
        ('llama-3.2-1b', 'lora', 8, 4096, True, {}),
        ('llama-3.2-1b', 'dora', 2, 2048, True, {}),
        ('llama-3.2-1b', 'qlora', 4, 2048, True, {}),
        ('llama-3.2-1b', 'qlora', 2, 1024, False, {}),
        ('llama-3.2-1b', 'qdora', 2, 1024, True, {}),
        ('tinyllama-1.1b', 'full', 4, 1024, False, {}),
        ('tinyllama-1.1b', 'lora', 8, 2048, False, {}),
        ('tinyllama-1.1b', 'qlora', 2, 2048, False, {}),
    ],
    'holdout': [
        ('tinyllama-1.1b', 'full', 2, 2048, True, {}),
        ('qwen2.5-0.5b', 'qdora', 2, 2048, False, {}),
        ('gemma-3-1b', 'lora', 2, 2048, False, {}),
        ('gemma-3-1b', 'qlora', 4, 2048, True, {}),
        ('llama-3.2-3b', 'dora', 1, 2048, True, {}),
        ('llama-3.2-3b', 'full', 1, 2048, True, {}),
        ('llama-3.2-1b', 'full', 4, 1024, False, {'optimizer': 'adamw8bit'}),
        ('mistral-7b', 'qlora', 2, 2048, True, {}),
        ('qwen2.5-7b', 'lora', 2, 2048, True, {}),
        ('qwen2.5-7b', 'qlora', 2, 1024, False, {}),
        ('llama-3-8b', 'qlora', 4, 2048, True, {}),
        ('llama-3-8b', 'qlora', 4, 2048, True, {'keep_logits': True}),
        ('llama-3-8b', 'lora', 1, 2048, True, {'keep_logits': True}),
    ],
    'tiny': [  # CPU smoke test: real recipe, tiny shapes
        (dict(model_type='llama', hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1500), m, 2, 256, g, {})
        for m in ('full', 'lora', 'qlora', 'dora') for g in (False, True)],
}

def run_one(spec, device, folders, steps, diag):
    model, method, batch, seq, ckpt, opts = spec
    name = model if isinstance(model, str) else 'tiny-' + model['model_type']
    est = estimate(model, method, batch, seq, ckpt, device=device.type, **opts)
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t = time.time()
    folder = folders.setdefault(name, tempfile.mkdtemp(prefix='vram_bench_')) if method in ('qlora', 'qdora') else None
    m = memory.prepare_run(model, method, ckpt, device=device, folder=folder)
    build_s = time.time() - t
    r = memory.measure(m, batch, seq, steps=steps, optimizer=opts.get('optimizer', 'adamw'),
                     keep_outputs=opts.get('keep_logits', False))
    err = est.peak / r['peak'] - 1
    row = dict(model=name, method=method, batch=batch, seq=seq, grad_ckpt=ckpt, options=opts,
               measured=r['peak'], predicted=est.peak, error=err, predicted_phase=est.phase,
               predicted_phases=est.phases, predicted_terms=dict(est.terms), measured_phases=r['phases'],
               static=r['static'], predicted_static=est.terms['weights'] + est.terms['adapters'],
               reserved=r.get('reserved'), losses=r['losses'], seconds_per_step=r['seconds_per_step'], build_s=build_s)
    if abs(err) > diag:   # one more measured step, watched tensor by tensor
        d = memory.measure(m, batch, seq, steps=2, optimizer=opts.get('optimizer', 'adamw'), track=True)
        row.update(diag_top=d['top'], diag_tracked_peak=d['tracked_peak'], diag_peak=d['peak'], diag_static=d['static'])
    del m; gc.collect()
    if device.type == 'cuda': torch.cuda.empty_cache()
    return row

def probe_kernels(device):
    "Which sdpa kernel runs for the cases the calculator distinguishes (names of the ops MemoryTracker saw)"
    F = torch.nn.functional
    out = {}
    for label, dt, kv, mask in [('bf16 GQA causal', torch.bfloat16, 2, False), ('fp32 GQA causal', torch.float32, 2, False),
                                ('fp32 MHA causal', torch.float32, 8, False), ('bf16 MHA masked', torch.bfloat16, 8, True)]:
        q = torch.randn(1, 8, 256, 64, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(1, kv, 256, 64, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(1, kv, 256, 64, device=device, dtype=dt, requires_grad=True)
        m = torch.ones(256, 256, dtype=torch.bool, device=device).tril() if mask else None
        with memory.MemoryTracker(snapshot=True) as tr:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=not mask, enable_gqa=kv != 8)
        out[label] = sorted({x[2] for x in tr.top(50)})
    return out

def table(rows):
    lines = ['| model | method | batch x seq | ckpt | predicted GiB | measured GiB | error | predicted peak at |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        opt = ''.join(f', {v}' for v in r['options'].values())
        lines.append(f"| {r['model']} | {r['method']}{opt} | {r['batch']} x {r['seq']} | {'on' if r['grad_ckpt'] else 'off'} | "
                     f"{r['predicted'] / 2**30:.2f} | {r['measured'] / 2**30:.2f} | {100 * r['error']:+.1f}% | {r['predicted_phase']} |")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--grid', default='main', help=f'one of {list(GRIDS)}, or several joined by commas')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--diag', type=float, default=3.0, help='percent error above which a tracked step is added')
    p.add_argument('--budget', type=float, default=1e9, help='seconds; configurations not started by then are skipped')
    p.add_argument('--only', default='', help='run only configurations whose model name contains this')
    p.add_argument('--out', default=os.environ.get('OUT', '.'))
    a = p.parse_args()
    device, t0 = torch.device(a.device), time.time()
    specs = [s for g in a.grid.split(',') for s in GRIDS[g] if a.only in str(s[0])]
    env = env_report()
    env['command'] = 'python tools/bench_vram.py ' + ' '.join(sys.argv[1:])
    env['kernels'] = probe_kernels(device)
    if device.type == 'cuda':   # what the driver holds beyond PyTorch's allocator: CUDA context, kernels, cuBLAS handles
        free, total = torch.cuda.mem_get_info()
        env['outside_allocator_MiB'] = round((total - free - torch.cuda.memory_reserved()) / 2**20)
    print(json.dumps(env, indent=1), flush=True)
    rows, folders = [], {}
    for spec in specs:
        if time.time() - t0 > a.budget:
            print('budget spent, skipping', spec[:5], flush=True); continue
        try:
            row = run_one(spec, device, folders, a.steps, a.diag / 100)
        except Exception as e:  # keep going: one failure must not lose the rest of the grid
            row = dict(model=str(spec[0]), method=spec[1], batch=spec[2], seq=spec[3], grad_ckpt=spec[4], failed=repr(e)[:400])
            if device.type == 'cuda': torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ('diag_top', 'predicted_phases', 'measured_phases')},
                         default=str), flush=True)
        json.dump(dict(env=env, rows=rows), open(os.path.join(a.out, 'vram_bench.json'), 'w'), indent=1, default=str)
    for f in folders.values(): shutil.rmtree(f, ignore_errors=True)
    ok = [r for r in rows if 'failed' not in r]
    md = table(ok)
    open(os.path.join(a.out, 'vram_bench.md'), 'w').write(md + '\n')
    print(md)
    if ok: print(f'\n{len(ok)} configurations, largest |error| {100 * max(abs(r["error"]) for r in ok):.1f}%, '
                 f'failed: {len(rows) - len(ok)}; {time.time() - t0:.0f} s')

if __name__ == '__main__':
    main()
