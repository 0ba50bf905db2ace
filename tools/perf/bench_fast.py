#!/usr/bin/env python
"""Single-GPU QLoRA speed (issue 13): the course's plain path (`prepare_model(backend='course')`), then qlora_course.fast's
pieces added one at a time, and the peers (../shared/peer/anchors.py: Unsloth, the HF recipe) on the same random checkpoint;
each variant in its own process, all in one call, with ratios to the plain path, to Unsloth and to the HF recipe.

    python bench_fast.py all --shape llama-3-8b [--runs '[[1, 2048], [4, 2048]]'] [--variants fast,unsloth_gc,...]
    python bench_fast.py all --device cpu --shape tiny           # CPU dry run: tiny:llama, 1 warm-up + 1 timed step
    python bench_fast.py run --variant fast ...                  # one variant, JSON lines
    python bench_fast.py rate                                    # the bf16 matmul rate (8192^3), JSON

Variants, each adding one piece to the one before: baseline (NF4Linear + LoRALinear + transformers' checkpointing + HF
loss, torch AdamW); nf4_op (NF4 through `fast.nf4_mm`: the Triton kernel into one shared buffer); bf16_lora (the LoRA branch
in bf16); compile (`checkpoint_layers` + `compile_layers`); fused_loss (`causal_lm_fused_loss`); fused_adamw (torch AdamW with
fused=True); skip_unused (the recomputation skips down_proj's matmul: `skip_unused_outputs`); graphs (forward and backward
replayed as one CUDA graph: `CUDAGraphStep`); offload (skip_unused with checkpoints in CPU memory). fast: `speed_up(model)`
itself (all of the above with its defaults); fast_offload: `speed_up(model, offload=True)`. Peers: unsloth_gc, unsloth (its CPU offload of
checkpoints), hf, liger. --decode_max and --ce_chunk set `speed_up`'s decode_max and ce_chunk for our variants. For the peers to train on the same checkpoint, set CKPT and BENCH_CKPT to the same folder.

Every run as tools/bench_train.py: LoRA r=16 alpha 32 on q,k,v,o,gate,up,down, dropout 0, torch AdamW lr 1e-4 (no clipping),
gradient checkpointing (non-reentrant), random tokens, labels = inputs, `core.train_steps`, 3 warm-up then 8 timed steps,
peak = torch.cuda.max_memory_allocated over the loop, warm-up included (as anchors.py measures the peers); steady peak:
over the timed steps only (after torch.compile's first calls).

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
sys.path.insert(0, HERE)
from common import peer_script                            # where ../shared/peer/anchors.py is
TARGETS = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
# Cumulative: each variant adds one piece of qlora_course.fast to the one before it (the plain path first)
STEPS = [('baseline', ()), ('nf4_op', ('op',)), ('bf16_lora', ('bf16lora',)), ('compile', ('ckpt', 'compile')),
         ('fused_loss', ('fused',)), ('fused_adamw', ('fusedadam',)), ('skip_unused', ('skip',)), ('graphs', ('graphs',))]
VARIANTS, _acc = {}, ()
for _name, _add in STEPS: _acc = _acc + _add; VARIANTS[_name] = _acc
VARIANTS['fast'] = ('speed_up', 'fusedadam')              # exactly what speed_up(model) gives, with fused AdamW
VARIANTS['fast_offload'] = ('speed_up', 'offload', 'fusedadam')   # speed_up(model, offload=True): no CUDA graphs
VARIANTS['offload'] = VARIANTS['skip_unused'] + ('offload',)
VARIANTS['graphs_nocompile'] = tuple(f for f in VARIANTS['graphs'] if f != 'compile')   # CUDA graphs over uncompiled layers
VARIANTS['graphs_compiled'] = VARIANTS['graphs'] + ('graphs_compiled',)   # CUDAGraphStep(compiled_layers=True, max_tokens=8192)
PEER_METHODS = ('unsloth_gc', 'unsloth', 'hf', 'liger')  # run by ../shared/peer/anchors.py (PEER_ANCHORS names another copy)

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
    from qlora_course.shapes import get_config
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
    "On the largest NF4 layer: qlora_course.fast's decoding bit-identical to NF4Linear.dequantize? and ms of both"
    import torch
    import qlora_course.fast as qf
    from qlora_course.quant import same_bits
    from qlora_course.nf4_linear import NF4Linear
    layer = max((m for m in model.modules() if isinstance(m, NF4Linear)), key=lambda m: m.in_features * m.out_features)
    dt, n = layer.compute_dtype, layer.in_features * layer.out_features
    packed, st = layer.quantized()
    fast = lambda: qf.nf4_dequant(packed, st.absmax, st.absmax2, st.offset, st.blocksize, n, dt)
    ref = NF4Linear.dequantize(layer, dt)
    res = dict(dequant_bit_identical=same_bits(ref.reshape(-1), fast()), dequant_shape=f'{layer.out_features}x{layer.in_features}')
    if device == 'cuda':
        def t(fn, k=20):
            for _ in range(3): fn()
            torch.cuda.synchronize(); s = time.perf_counter()
            for _ in range(k): fn()
            torch.cuda.synchronize(); return (time.perf_counter() - s) / k * 1e3
        res['dequant_ms_old'] = round(t(lambda: NF4Linear.dequantize(layer, dt)), 3)
        res['dequant_ms_new'] = round(t(fast), 3)
    return res

def run(shape, variant, runs, device='cuda', warm=3, steps=8, ce_chunk=None, dtype='bf16', decode_max=None):
    import functools
    import torch
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
    import qlora_course.fast as qf
    if 'speed_up' in feats:
        extra['speed_up'] = f"offload={'offload' in feats}"
        loss_fn = qf.speed_up(model, offload='offload' in feats, decode_max=decode_max, ce_chunk=ce_chunk)
        extra.update(_dequant_check(model, device))
    if 'op' in feats:
        extra['nf4_op_layers'] = qf.use_fast_nf4(model)
        extra.update(_dequant_check(model, device))
    if 'bf16lora' in feats: extra['bf16_lora_layers'] = qf.use_bf16_lora(model)
    if 'skip' in feats: extra['skip_unused_layers'] = qf.skip_unused_outputs(model)
    if decode_max: qf.DECODE_MAX = decode_max; extra['decode_max'] = decode_max
    if ce_chunk: extra['ce_chunk'] = ce_chunk
    if 'compile' in feats: extra['compiled_layers'] = qf.compile_layers(model)
    if 'ckpt' in feats: extra['own_checkpoint_layers'] = qf.checkpoint_layers(model, offload='offload' in feats)
    if 'speed_up' not in feats:
        loss_fn = functools.partial(qf.causal_lm_fused_loss, chunk=ce_chunk) if 'fused' in feats else hf_loss
        if 'graphs' in feats and device == 'cuda':
            loss_fn = qf.CUDAGraphStep(loss_fn, **(dict(compiled_layers=True, max_tokens=8192) if 'graphs_compiled' in feats else {}))
    vocab = cfg.vocab_size
    cuda = device == 'cuda'
    for bs, seq in runs:
        row = dict(variant=variant, shape=shape, bs=bs, seq=seq, load_s=round(load), **extra)
        try:
            x = torch.randint(4, vocab, (bs, seq), device=device)
            stamps = []
            if cuda: torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            opt = (lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)) if 'fusedadam' in feats else 'adamw'
            peaks = {}
            def on_step(loop):
                stamps.append(time.perf_counter())
                if cuda and loop.step == warm: peaks['warm'] = torch.cuda.max_memory_allocated(); torch.cuda.reset_peak_memory_stats()
            losses = train_steps(model, lambda i: {'input_ids': x, 'labels': x}, warm + steps, lr=1e-4, grad_clip=0, progress=False, optimizer=opt,
                                 loss_fn=loss_fn, on_step=on_step)
            dt = stamps[-1] - stamps[warm - 1]
            f = flops_per_token(cfg, seq)
            tps = bs * seq * steps / dt
            row.update(tokens_per_s=round(tps) if cuda else round(tps, 1), step_s=round(dt / steps, 3),
                       peak_gib=round(max(peaks['warm'], torch.cuda.max_memory_allocated()) / 2**30, 2) if cuda else None,
                       steady_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                       reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                       loss0=round(losses[0], 4), loss=round(losses[-1], 4), flops_per_token=f['flops_per_token'],
                       peer_flops_per_token=f['peer_flops_per_token'])
        except Exception as e:
            row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
            traceback.print_exc(file=sys.stderr)
            x = None
            if cuda: torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        prof = os.environ.get('BENCH_PROFILE')                # a folder: the top GPU kernels of 2 more steps, per run
        if prof and cuda and 'error' not in row:
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as pr:
                train_steps(model, lambda i: {'input_ids': x, 'labels': x}, 2, lr=1e-4, grad_clip=0, progress=False, loss_fn=loss_fn)
            os.makedirs(prof, exist_ok=True)
            with open(f'{prof}/profile_{variant}_bs{bs}.txt', 'w') as f:
                f.write(pr.key_averages().table(sort_by='cuda_time_total', row_limit=45, max_name_column_width=70))

# ------------------------------------------------------------------------------------------------------------------
def table(rows, rate):
    """Markdown: each row's rate, memory and MFU, with its ratios to the plain path, to Unsloth and to the HF recipe at the
    same batch. 'vs Unsloth' compares with Unsloth's plain checkpointing, offload rows with its offload mode."""
    ok = lambda r: 'error' not in r
    by = lambda name: {(r['bs'], r['seq']): r for r in rows if r['variant'] == name and ok(r)}
    base, uns_gc, uns_off, hf = by('baseline'), by('unsloth_gc'), by('unsloth'), by('hf')
    R = rate['flops_per_s'] if rate else None
    fpt = next((r['flops_per_token'] for r in rows if ok(r) and 'flops_per_token' in r), None)
    out = [f"matmul rate measured in this run: {R / 1e12:.1f} TFLOP/s ({rate['n']}^3 {rate['dtype']})" if R else 'matmul rate: not measured', '',
           '| variant | batch x seq | tokens/s | vs plain | vs Unsloth | vs HF | peak GiB | vs Unsloth | steady peak GiB | reserved GiB | MFU | notes |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
    def ratio(r, ref, key):
        b = ref.get((r['bs'], r['seq']))
        return f"{r[key] / b[key]:.2f}x" if b and r.get(key) and b.get(key) else '-'
    for r in rows:
        if not ok(r):
            what = 'skipped' if r['error'].startswith('skipped') else 'failed'
            out.append(f"| {r['variant']} | {r['bs']} x {r['seq']} | {what} | | | | | | | | | {r['error'][:160]} |"); continue
        uns = uns_off if 'offload' in r['variant'] or r['variant'] == 'unsloth' else uns_gc   # offload against Unsloth's offload mode
        f = r.get('flops_per_token', fpt)
        mfu = f"{r['tokens_per_s'] * f / R:.1%}" if R and f else '-'
        notes = ', '.join(f'{k}={r[k]}' for k in ('dequant_bit_identical', 'dequant_ms_old', 'dequant_ms_new', 'decode_max', 'ce_chunk') if k in r)
        steady = f"{r['steady_peak_gib']:.2f}" if r.get('steady_peak_gib') is not None else '-'
        out.append(f"| {r['variant']} | {r['bs']} x {r['seq']} | {r['tokens_per_s']:,} | {ratio(r, base, 'tokens_per_s')} | "
                   f"{ratio(r, uns, 'tokens_per_s')} | {ratio(r, hf, 'tokens_per_s')} | {r['peak_gib'] if r.get('peak_gib') is not None else '-'} | {ratio(r, uns, 'peak_gib')} | {steady} | {r.get('reserved_gib', '-')} | {mfu} | {notes} |")
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('all', 'make', 'run', 'rate'))
    p.add_argument('--shape', default='llama-3-8b', help="a qlora_course.shapes catalog name, or 'tiny' (tiny:llama)")
    p.add_argument('--variant', default='baseline', choices=list(VARIANTS))
    p.add_argument('--variants', default=','.join(list(VARIANTS)[:8]), help='for all: comma-separated, run in this order; '
                   f'ours: {", ".join(VARIANTS)}; peers (anchors.py, same checkpoint: set CKPT and BENCH_CKPT alike): {", ".join(PEER_METHODS)}')
    p.add_argument('--runs', default=None, help="JSON list of [batch, seq] (default [[1, 2048], [4, 2048]]; CPU: [[1, 64], [2, 64]])")
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    p.add_argument('--warm', type=int, default=None, help='warm-up steps (default 3; CPU 1)')
    p.add_argument('--steps', type=int, default=None, help='timed steps (default 8; CPU 1)')
    p.add_argument('--ce_chunk', type=int, default=None, help='rows per chunk of the fused loss (default: about 2**26 logits per chunk)')
    p.add_argument('--decode_max', type=int, default=None, help='most NF4 weights decoded at a time (fast.DECODE_MAX; default: a whole weight)')
    p.add_argument('--timeout', type=int, default=240, help='for all: seconds each of our runs (one process per batch x seq) or each peer (one process) may take')
    p.add_argument('--budget', type=int, default=540, help='for all: seconds for everything; variants that would start with '
                   'less than 60 s left are skipped, so that the table is printed before a 600 s limit')
    a = p.parse_args()
    cpu = a.device == 'cpu'
    runs = json.loads(a.runs) if a.runs else ([[1, 64], [2, 64]] if cpu else [[1, 2048], [4, 2048]])
    warm = a.warm if a.warm is not None else (1 if cpu else 3)
    steps = a.steps if a.steps is not None else (1 if cpu else 8)
    if a.what == 'make': print(make(a.shape)); return
    if a.what == 'rate': print(json.dumps(matmul_rate(a.device)), flush=True); return
    if a.what == 'run': run(a.shape, a.variant, runs, a.device, warm, steps, a.ce_chunk, decode_max=a.decode_max); return
    t0 = time.time()
    common = ['--shape', a.shape, '--device', a.device]
    def child(args, timeout, peer=False):
        t = time.time()
        cmd = [sys.executable] + (args if peer else [os.path.abspath(__file__)] + args + common)
        try: out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
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
        if v not in VARIANTS and v not in PEER_METHODS: print(f'unknown variant {v!r}', file=sys.stderr); continue
        left = a.budget - (time.time() - t0)
        if left < 60:
            lines, err = [], f'skipped: {left:.0f} s of the {a.budget} s budget left'
            print(f'[run --variant {v}] {err}', file=sys.stderr, flush=True)
        elif v in PEER_METHODS:
            script = peer_script()
            if script is None: lines, err = [], 'skipped: no anchors.py (set PEER_ANCHORS, or copy ../shared/peer/anchors.py to .peer/)'
            else:
                lines, _, err = child([script, v, json.dumps(runs)], int(min(a.timeout, left - 10)), peer=True)
                lines = [dict(l, variant=l.pop('method', v)) for l in lines if 'tokens_per_s' in l]
        else:                                                       # one process per run: nothing (a CUDA graph's pool) carries over
            lines, errs = [], []
            for run_ in runs:
                left = a.budget - (time.time() - t0)
                if left < 40: errs.append(f'skipped: {left:.0f} s of the {a.budget} s budget left'); continue
                got, _, e = child(['run', '--variant', v, '--runs', json.dumps([run_]), '--warm', str(warm), '--steps', str(steps)]
                                  + (['--ce_chunk', str(a.ce_chunk)] if a.ce_chunk else []) + (['--decode_max', str(a.decode_max)] if a.decode_max else []),
                                  int(min(a.timeout, left - 10)))
                lines += got
                if e: errs.append(e)
            err = '; '.join(errs) or None
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
