#!/usr/bin/env python
"""Single-GPU QLoRA speed-ups (issue 13), one at a time: the course's path (`prepare_model(backend='course')`) as it is, then
with each piece of fastnf4.py added alone, then all together; each variant in its own process, on one random checkpoint.

    python bench_fast.py all --shape llama-3-8b [--runs '[[1, 2048], [4, 2048]]'] [--variants baseline,triton,...]
    python bench_fast.py all --device cpu --shape tiny           # CPU dry run: tiny:llama, 1 warm-up + 1 timed step
    python bench_fast.py run --variant triton ...                # one variant, JSON lines
    python bench_fast.py rate                                    # the bf16 matmul rate (8192^3), JSON

Variants: baseline (NF4Linear + LoRALinear as they are); triton (NF4 dequantized by fastnf4's Triton kernel into one
reused buffer, forward and backward); bf16lora (LoRA branch in bf16, fp32 master weights); chunked (loss = fastnf4's
chunked cross-entropy over the decoder's last hidden states and lm_head.weight: no full logits); all (the three together).

Every run as tools/bench_train.py: LoRA r=16 alpha 32 on q,k,v,o,gate,up,down, dropout 0, torch AdamW lr 1e-4 (no clipping),
gradient checkpointing (non-reentrant), random tokens, labels = inputs, `core.train_steps`, 3 warm-up then 8 timed steps,
peak = torch.cuda.max_memory_allocated over the loop.

MFU = tokens/s x FLOPs per token / (bf16 matmul rate measured in this run, 8192x8192x8192). FLOPs per token (one
frozen-base LoRA step with the decoder layers recomputed; the same count for every variant):
    6 N_dec                       decoder linears: forward 2N + recompute 2N + input gradients 2N (no weight gradients)
  + 4 N_head                      lm_head: forward + input gradient (not inside a checkpointed layer)
  + 8 r sum(in + out)             adapters: forward, recompute, input and weight gradients (2 r (in+out) each)
  + 16 L (H hd) (S+1)/2           attention scores and values, causal: forward 4, recompute 4, backward 8 x (H hd) per
                                  attended position; the average token attends to (S+1)/2 positions
(embedding lookups, norms, activations and softmax not counted; flash-attention's own recomputation in backward not
counted). `mfu_peer` uses the peers' count instead (shared/peer/README.md: 6 x all parameters, embeddings included).
"""
import argparse, json, os, statistics, subprocess, sys, time, traceback
HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
VARIANTS = {'baseline': (), 'all': ('triton', 'bf16lora', 'chunked'), 'triton': ('triton',), 'bf16lora': ('bf16lora',),
            'chunked': ('chunked',)}                      # this order by default: baseline and all first, should time run short
# Measured by shared/peer/anchors.py on one H200 (shared/peer/README.md), NOT in this run: for the table's last rows
PEERS = {('unsloth_gc', 1): (5686, 6.81), ('unsloth_gc', 4): (11018, 9.70)}

def folder(shape): return os.environ.get('BENCH_CKPT', f'/tmp/random-{shape}')

def source(shape): return 'tiny:llama' if shape == 'tiny' else folder(shape)

def make(shape):
    "The random bf16 checkpoint tools/bench_train.py writes (the same folder: made once for both)"
    if shape == 'tiny': return source(shape)
    path = folder(shape)
    if os.path.exists(f'{path}/config.json'): return path
    try:
        sys.path.insert(0, os.path.join(os.getcwd(), 'tools'))
        from bench_train import make as bt_make                  # the repo's own writer, when run from the repo root
        return bt_make(shape)
    except ImportError: pass
    import torch
    from transformers import AutoModelForCausalLM
    from qlora_course.vram import get_config
    from qlora_course.models import course_tokenizer
    with torch.device('cuda'): m = AutoModelForCausalLM.from_config(get_config(shape), dtype=torch.bfloat16)
    m.save_pretrained(path, max_shard_size='5GB'); del m; torch.cuda.empty_cache()
    course_tokenizer().save_pretrained(path)
    return path

# ------------------------------------------------------------------------------------------------------------------
def flops_per_token(cfg, seq, r=16, targets=TARGETS.split(',')):
    "(our count, the peers' 6 x parameters) of FLOPs per trained token: see the module docstring"
    d, ff, L, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv = getattr(cfg, 'num_key_value_heads', None) or H
    hd = getattr(cfg, 'head_dim', None) or d // H
    V = cfg.vocab_size
    shapes = {'q_proj': (d, H * hd), 'k_proj': (d, kv * hd), 'v_proj': (d, kv * hd), 'o_proj': (H * hd, d),
              'gate_proj': (d, ff), 'up_proj': (d, ff), 'down_proj': (ff, d)}
    n_dec = L * sum(i * o for i, o in shapes.values())
    n_head = V * d
    adapters = 8 * r * L * sum(i + o for t, (i, o) in shapes.items() if t in targets)
    attn = 16 * L * H * hd * (seq + 1) / 2
    total_params = n_dec + n_head + (0 if getattr(cfg, 'tie_word_embeddings', False) else V * d) + L * 2 * d + d
    return dict(flops_per_token=6 * n_dec + 4 * n_head + adapters + attn, peer_flops_per_token=6 * total_params,
                n_dec=n_dec, n_head=n_head, adapter_flops=adapters, attn_flops=attn)

def matmul_rate(device, n=None, iters=20):
    "Measured dense matmul rate (FLOP/s): bf16 n x n x n on CUDA (n=8192), fp32 on CPU (n=256, a smoke test only)"
    import torch
    cuda = device == 'cuda'
    n = n or (8192 if cuda else 256)
    dt = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    for _ in range(5): a @ b
    times = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); a @ b; e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
    return dict(n=n, dtype=str(dt), median_s=statistics.median(times), flops_per_s=2 * n**3 / statistics.median(times))

# ------------------------------------------------------------------------------------------------------------------
def _dequant_check(model, device):
    "On the first NF4 layer of the largest shape: the fast dequantization bit-identical to NF4Linear.dequantize? and ms of both"
    import torch
    import fastnf4 as fx
    from qlora_course.quant import same_bits
    from qlora_course.nf4_linear import NF4Linear
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    layer = max(layers, key=lambda m: m.in_features * m.out_features)
    dt = layer.compute_dtype
    ref = layer.dequantize(dt)
    fast = fx.fast_dequantize(layer, layer._storage(), dt).clone()
    res = dict(dequant_bit_identical=same_bits(ref, fast), dequant_impl=fx.dequant_impl() if device == 'cuda' else
               ('triton-interpreter' if fx.triton is not None and os.environ.get('TRITON_INTERPRET') == '1' else 'torch-reference'),
               dequant_shape=f'{layer.out_features}x{layer.in_features}')
    if device == 'cuda':
        def t(fn, k=20):
            for _ in range(3): fn()
            torch.cuda.synchronize(); s = time.perf_counter()
            for _ in range(k): fn()
            torch.cuda.synchronize(); return (time.perf_counter() - s) / k * 1e3
        res['dequant_ms_old'] = round(t(lambda: layer.dequantize(dt)), 3)
        res['dequant_ms_new'] = round(t(lambda: fx.fast_dequantize(layer, layer._storage(), dt)), 3)
    del ref, fast
    return res

def run(shape, variant, runs, device='cuda', warm=3, steps=8, ce_chunk=None, dtype='bf16'):
    import functools
    import torch
    sys.path.insert(0, HERE)
    import fastnf4 as fx
    import qlora_course.train as qt
    from qlora_course.core import set_seed, train_steps, hf_loss
    feats = VARIANTS[variant]
    if device == 'cpu' and dtype == 'bf16':          # prepare_model refuses bf16 on the CPU (slow); a dry run wants the GPU's dtypes
        qt.compute_dtype = lambda precision='auto', device=None: torch.bfloat16
    set_seed(0)
    t = time.time()
    model, _ = qt.prepare_model(make(shape), 'qlora', 'course', lora_rank=16, lora_alpha=32, lora_target_modules=TARGETS.split(','),
                                use_gradient_checkpointing=True, device=device)
    load = time.time() - t
    cfg = model.config.get_text_config()
    extra = dict(model_dtype=str(model.get_output_embeddings().weight.dtype).replace('torch.', ''))
    if 'triton' in feats:
        fx.patch_nf4linear()
        extra.update(_dequant_check(model, device))
    if 'bf16lora' in feats: extra['bf16_lora_layers'] = fx.use_bf16_lora(model)
    loss_fn = functools.partial(fx.causal_lm_chunked_loss, chunk=ce_chunk) if 'chunked' in feats else hf_loss
    if 'chunked' in feats: extra['ce_chunk'] = ce_chunk or fx.default_chunk(cfg.vocab_size)
    vocab = cfg.vocab_size
    cuda = device == 'cuda'
    for bs, seq in runs:
        row = dict(variant=variant, shape=shape, bs=bs, seq=seq, load_s=round(load), **extra)
        try:
            x = torch.randint(4, vocab, (bs, seq), device=device)
            stamps = []
            if cuda: torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            losses = train_steps(model, lambda i: {'input_ids': x, 'labels': x}, warm + steps, lr=1e-4, grad_clip=0, progress=False,
                                 loss_fn=loss_fn, on_step=lambda loop: stamps.append(time.perf_counter()))
            dt = stamps[-1] - stamps[warm - 1]
            f = flops_per_token(cfg, seq)
            tps = bs * seq * steps / dt
            row.update(tokens_per_s=round(tps) if cuda else round(tps, 1), step_s=round(dt / steps, 3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                       reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                       loss0=round(losses[0], 4), loss=round(losses[-1], 4), flops_per_token=f['flops_per_token'],
                       peer_flops_per_token=f['peer_flops_per_token'])
        except Exception as e:
            row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
            traceback.print_exc(file=sys.stderr)
            x = None
            if cuda: torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)

# ------------------------------------------------------------------------------------------------------------------
def table(rows, rate):
    "Markdown: each variant's rate, memory and MFU, and its ratios to the baseline at the same batch"
    base = {(r['bs'], r['seq']): r for r in rows if r['variant'] == 'baseline' and 'error' not in r}
    R = rate['flops_per_s'] if rate else None
    out = [f"matmul rate measured in this run: {R / 1e12:.1f} TFLOP/s ({rate['n']}^3 {rate['dtype']})" if R else 'matmul rate: not measured', '',
           '| variant | batch x seq | tokens/s | vs baseline | peak GiB | vs baseline | MFU | MFU (peers\' 6N) | loss step 1 | notes |',
           '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        b = base.get((r['bs'], r['seq']))
        if 'error' in r:
            what = 'skipped' if r['error'].startswith('skipped') else 'failed'
            out.append(f"| {r['variant']} | {r['bs']} x {r['seq']} | {what} | | | | | | | {r['error'][:160]} |"); continue
        sp = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else '-'
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b and r.get('peak_gib') and b.get('peak_gib') else '-'
        mfu = f"{r['tokens_per_s'] * r['flops_per_token'] / R:.1%}" if R else '-'
        mfu6 = f"{r['tokens_per_s'] * r['peer_flops_per_token'] / R:.1%}" if R else '-'
        notes = ', '.join(f'{k}={r[k]}' for k in ('dequant_bit_identical', 'dequant_ms_old', 'dequant_ms_new', 'ce_chunk') if k in r)
        peak = f"{r['peak_gib']:.2f}" if r.get('peak_gib') is not None else '-'
        out.append(f"| {r['variant']} | {r['bs']} x {r['seq']} | {r['tokens_per_s']:,} | {sp} | {peak} | {mem} | {mfu} | {mfu6} | {r['loss0']} | {notes} |")
    ok = [r for r in rows if 'error' not in r and r['shape'] != 'tiny']
    if R and ok:
        for (name, bs), (tps, gib) in PEERS.items():
            f = next((r for r in ok if r['bs'] == bs), None)
            if f is None: continue
            b = base.get((f['bs'], f['seq']))
            sp = f"{tps / b['tokens_per_s']:.2f}x" if b else '-'
            mem = f"{gib / b['peak_gib']:.2f}x" if b else '-'
            out.append(f"| {name} (peer README, not this run) | {bs} x 2048 | {tps:,} | {sp} | {gib:.2f} | {mem} | "
                       f"{tps * f['flops_per_token'] / R:.1%} | {tps * f['peer_flops_per_token'] / R:.1%} | | measured 2026-11-29 by anchors.py |")
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('all', 'make', 'run', 'rate'))
    p.add_argument('--shape', default='llama-3-8b', help="a qlora_course.vram catalog name, or 'tiny' (tiny:llama)")
    p.add_argument('--variant', default='baseline', choices=list(VARIANTS))
    p.add_argument('--variants', default=','.join(VARIANTS), help='for all: comma-separated, run in this order')
    p.add_argument('--runs', default=None, help="JSON list of [batch, seq] (default [[1, 2048], [4, 2048]]; CPU: [[1, 64], [2, 64]])")
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    p.add_argument('--warm', type=int, default=None, help='warm-up steps (default 3; CPU 1)')
    p.add_argument('--steps', type=int, default=None, help='timed steps (default 8; CPU 1)')
    p.add_argument('--ce_chunk', type=int, default=None, help='rows per chunk of the chunked loss (default: fastnf4.default_chunk)')
    p.add_argument('--timeout', type=int, default=240, help='for all: seconds each variant may take')
    p.add_argument('--budget', type=int, default=540, help='for all: seconds for everything; variants that would start with '
                   'less than 60 s left are skipped, so that the table is printed before a 600 s limit')
    a = p.parse_args()
    cpu = a.device == 'cpu'
    runs = json.loads(a.runs) if a.runs else ([[1, 64], [2, 64]] if cpu else [[1, 2048], [4, 2048]])
    warm = a.warm if a.warm is not None else (1 if cpu else 3)
    steps = a.steps if a.steps is not None else (1 if cpu else 8)
    if a.what == 'make': print(make(a.shape)); return
    if a.what == 'rate': print(json.dumps(matmul_rate(a.device)), flush=True); return
    if a.what == 'run': run(a.shape, a.variant, runs, a.device, warm, steps, a.ce_chunk); return
    t0 = time.time()
    common = ['--shape', a.shape, '--device', a.device]
    def child(args, timeout):
        t = time.time()
        try: out = subprocess.run([sys.executable, os.path.abspath(__file__)] + args + common, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            print(f'[{" ".join(args[:3])}] timed out after {timeout} s', file=sys.stderr, flush=True)
            partial = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
            return [json.loads(l) for l in partial.splitlines() if l.startswith('{')], partial, f'timeout after {timeout} s'
        print(f'[{" ".join(args[:3])}] {time.time() - t:.0f} s, exit {out.returncode}', file=sys.stderr, flush=True)
        if out.returncode: print(out.stderr[-3000:], file=sys.stderr, flush=True)
        elif out.stderr.strip(): print('  stderr tail: ' + out.stderr.strip()[-600:].replace('\n', '\n  '), file=sys.stderr, flush=True)
        lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
        return lines, out.stdout, None if out.returncode == 0 else f'exit {out.returncode}: {out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else ""}'
    if not cpu:
        lines, _, err = child(['make'], max(60, a.budget - 120))
        if err: print(f'could not write the checkpoint: {err}', file=sys.stderr)
    rl, _, err = child(['rate'], 120)
    rate = rl[0] if rl else None
    print(json.dumps(dict(matmul_rate=rate, error=err) if err else dict(matmul_rate=rate)), flush=True)
    rows = []
    for v in [s.strip() for s in a.variants.split(',') if s.strip()]:
        if v not in VARIANTS: print(f'unknown variant {v!r}', file=sys.stderr); continue
        left = a.budget - (time.time() - t0)
        if left < 60:
            lines, err = [], f'skipped: {left:.0f} s of the {a.budget} s budget left'
            print(f'[run --variant {v}] {err}', file=sys.stderr, flush=True)
        else:
            lines, _, err = child(['run', '--variant', v, '--runs', json.dumps(runs), '--warm', str(warm), '--steps', str(steps)]
                                  + (['--ce_chunk', str(a.ce_chunk)] if a.ce_chunk else []), int(min(a.timeout, left - 10)))
        done = {(l['bs'], l['seq']) for l in lines}
        for l in lines: print(json.dumps(l), flush=True)
        rows += lines
        for bs, seq in runs:                                        # what the child never reported
            if (bs, seq) not in done:
                row = dict(variant=v, shape=a.shape, bs=bs, seq=seq, error=err or 'no result')
                print(json.dumps(row), flush=True); rows.append(row)
    print()
    print(table(rows, rate))
    print(f'\ntotal {time.time() - t0:.0f} s', flush=True)
    return rows

if __name__ == '__main__': main()
