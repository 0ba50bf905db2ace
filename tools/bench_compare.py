#!/usr/bin/env python
"""Peak memory and time per step of each fine-tuning method of the course on one GPU, beside the VRAM calculator's prediction.

    python tools/bench_compare.py --shape gemma-3-1b                       # every method, each in a process of its own
    python tools/bench_compare.py --shape llama-3-8b --galore_svd randomized
    python tools/bench_compare.py --shape tiny --device cpu                # debug run on a CPU (peaks from memory.MemoryTracker)
    python tools/bench_compare.py run --shape gemma-3-1b --method galore   # one method in this process: one JSON line

A randomly initialised model of the catalog shape (`qlora_course.shapes.CATALOG`; nothing is downloaded) is written once, in
bf16, to $BENCH_CKPT_DIR/random-SHAPE (default /tmp, the folder tools/bench_train.py uses too). Each method is then prepared
from it by `train.prepare_model` and trained by `core.train_steps`: batch x seq random tokens, labels = inputs (the loss on
every token), gradient checkpointing (non-reentrant), lr 1e-5, clipping at 1.0, --warm steps and then --steps timed ones.
The peak is `torch.cuda.max_memory_allocated()` over all of them (the optimizer's first step, which creates its states and
GaLore's first projectors, included); the time per step is the median of the timed steps.

- full: every weight trains in bf16 (weights, gradients and AdamW's moments in bf16; torch's AdamW), the pure-bf16 recipe
  the calculator's 'full' models. `prepare_model` keeps fp32 weights for full fine-tuning (fp32 weights, gradients and
  moments: 16 bytes a parameter, 120 GiB for Llama-3-8B before any activation); the bench casts them to bf16 instead.
- galore: the same bf16 model with GaLore-AdamW (`qlora_course.galore`) on every decoder linear at --galore_rank, scale
  0.25, AdamW on the embeddings and norms. Its projector is refreshed every --galore_gap steps; here one refresh falls in
  the middle of the timed steps, and its extra time is reported (refresh_s) apart from the time of an ordinary step.
- lora, dora, qlora, qdora: the Hugging Face recipe by default (--backend hf: bitsandbytes NF4 with double quantization,
  prepare_model_for_kbit_training, PEFT), which is what the calculator models; --backend course uses the course's
  layers. LoRA r=16, alpha 32, on every linear layer but the output layer.

Prints one JSON line per method, then a markdown table with the calculator's `estimate` for each row.
"""
import argparse, json, os, statistics, subprocess, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
METHODS = ('full', 'lora', 'dora', 'qlora', 'qdora', 'galore')
TINY = dict(model_type='llama', hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=1500)   # --shape tiny: a CPU debug shape

def shape_spec(shape): return TINY if shape == 'tiny' else shape

def checkpoint(shape, device):
    "Folder of a randomly initialised bf16 model of `shape` with the course tokenizer (written once)"
    import torch
    from transformers import AutoModelForCausalLM
    from qlora_course.shapes import get_config
    from qlora_course.models import course_tokenizer
    path = os.path.join(os.environ.get('BENCH_CKPT_DIR', '/tmp'), f'random-{shape}')
    if os.path.exists(os.path.join(path, 'config.json')): return path
    t, tmp = time.time(), f'{path}.tmp{os.getpid()}'
    torch.manual_seed(0)
    with torch.device(device): m = AutoModelForCausalLM.from_config(get_config(shape_spec(shape)), dtype=torch.bfloat16)
    m.save_pretrained(tmp, max_shard_size='5GB'); del m
    course_tokenizer().save_pretrained(tmp)   # the token ids are random; prepare_model only needs a tokenizer to load
    os.replace(tmp, path)
    print(f'random {shape} checkpoint written in {time.time() - t:.0f} s', file=sys.stderr, flush=True)
    return path

def prediction(a, gpu):
    "The calculator's peak for this run (GiB) and the phase it puts it in"
    from qlora_course.peak import estimate
    galore = a.method == 'galore'
    e = estimate(shape_spec(a.shape), 'full' if galore else a.method, a.batch, a.seq, True, r=a.galore_rank if galore else 16,
                 optimizer='galore' if galore else 'adamw', dtype='bf16' if gpu else 'fp32', device='cuda' if gpu else 'cpu')
    return e.peak / 2**30, e.phase

def run(a):
    "Prepare, train and measure one method in this process; print its JSON line"
    import torch
    from qlora_course.core import set_seed, train_steps
    from qlora_course.train import prepare_model
    from qlora_course.galore import galore_optimizer
    from qlora_course.memory import MemoryTracker, model_bytes, cuda_kernel_choice
    dev = torch.device(a.device)
    gpu = dev.type == 'cuda'
    folder = checkpoint(a.shape, dev)
    set_seed(0)
    t = time.time()
    model, _ = prepare_model(folder, 'full' if a.method == 'galore' else a.method, a.backend, lora_rank=16, lora_alpha=32,
                             use_gradient_checkpointing=True, precision='bf16' if gpu else 'fp32', device=dev)
    if a.method in ('full', 'galore') and gpu:   # pure bf16, as the calculator's 'full' (buffers such as RoPE's stay as they are)
        for q in model.parameters(): q.data = q.data.to(torch.bfloat16)
    load_s = time.time() - t
    params = [p for p in model.parameters() if p.requires_grad]
    opt = 'adamw'
    refresh_at = a.warm + a.steps // 2   # a step count at which GaLore refreshes its projectors inside the timed steps
    if a.method == 'galore':
        opt = galore_optimizer(model, rank=a.galore_rank, update_proj_gap=refresh_at, scale=0.25, lr=a.lr, svd=a.galore_svd)
    vocab = model.config.get_text_config().vocab_size
    x = torch.randint(4, vocab, (a.batch, a.seq), device=dev)
    stamps, loop_opt = [], []
    if gpu: torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); static = torch.cuda.memory_allocated()
    else: static = model_bytes(model)
    tracker = MemoryTracker(ignore=list(model.parameters()) + list(model.buffers()) + [x])
    ctx = (cuda_kernel_choice(), tracker) if not gpu else ()
    for c in ctx: c.__enter__()
    try:
        t0 = time.perf_counter()
        losses = train_steps(model, lambda i: {'input_ids': x, 'labels': x}, a.warm + a.steps, lr=a.lr, grad_clip=1.0,
                             schedule='constant', optimizer=opt, progress=False,
                             on_step=lambda loop: (stamps.append(time.perf_counter()), loop_opt[:1] or loop_opt.append(loop.optimizer)))
    finally:
        for c in reversed(ctx): c.__exit__(None, None, None)
    peak = torch.cuda.max_memory_allocated() if gpu else static + tracker.max_peak
    times = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)]          # the duration of each step
    timed = {i: times[i] for i in range(a.warm, a.warm + a.steps)}
    if a.method == 'galore':   # the step whose optimizer state count is refresh_at (index refresh_at) ran the SVDs
        plain = [s for i, s in timed.items() if i != refresh_at]
        refresh_s = timed[refresh_at] - statistics.median(plain)
    else: plain, refresh_s = list(timed.values()), None
    step_s = statistics.median(plain)
    pred, phase = prediction(a, gpu)
    row = dict(shape=a.shape, method=a.method, backend=a.backend if a.method not in ('full', 'galore') else '-', batch=a.batch,
               seq=a.seq, device=torch.cuda.get_device_name() if gpu else 'cpu', trainable=sum(p.numel() for p in params),
               peak_gib=round(peak / 2**30, 4), predicted_gib=round(pred, 4), error_pct=round(100 * (pred / (peak / 2**30) - 1), 2),
               predicted_phase=phase, step_s=round(step_s, 4), tokens_per_s=round(a.batch * a.seq / step_s),
               load_s=round(load_s, 1), loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3))
    if gpu: row['reserved_gib'] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if a.method == 'galore':
        groups = loop_opt[0].param_groups
        row.update(projected=sum(loop_opt[0].projected(q, g) for g in groups for q in g['params']), galore_rank=a.galore_rank, galore_svd=a.galore_svd, refresh_s=round(refresh_s, 3),
                   step_s_amortized=round(step_s + refresh_s / a.galore_gap, 4), galore_gap=a.galore_gap)
    print(json.dumps(row), flush=True)
    return row

def table(rows):
    "Markdown table: measured peak beside the calculator's, and speed"
    out = ['| shape | method | trainable | peak GiB | calculator GiB | error | s/step | tokens/s | GaLore refresh s |',
           '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'error' in r:
            out.append(f"| {r['shape']} | {r['method']} | failed: {r['error'][:80]} | | | | | | |"); continue
        name = r['method'] + (f" ({r['backend']})" if r['backend'] != '-' else '') + \
               (f", r={r['galore_rank']}, {r['galore_svd']} SVD, {r['projected']} weights projected" if r['method'] == 'galore' else '')
        d = 2 if r['peak_gib'] >= 1 else 4   # the CPU debug shape is a few MiB
        out.append(f"| {r['shape']} | {name} | {r['trainable']:,} | {r['peak_gib']:.{d}f} | {r['predicted_gib']:.{d}f} | "
                   f"{r['error_pct']:+.1f}% | {r['step_s']:.3f} | {r['tokens_per_s']:,} | {r.get('refresh_s', '')} |")
    return '\n'.join(out)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', nargs='?', default='all', choices=('all', 'run'))
    p.add_argument('--shape', default='gemma-3-1b', help="a name in qlora_course.shapes.CATALOG, or 'tiny' (a CPU debug shape)")
    p.add_argument('--method', default='qlora', choices=METHODS, help='with `run`: the method to measure')
    p.add_argument('--methods', default=','.join(METHODS), help='with `all`: comma-separated methods')
    p.add_argument('--backend', default='hf', choices=('hf', 'course'))
    p.add_argument('--device', default='cuda')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--seq', type=int, default=512)
    p.add_argument('--warm', type=int, default=3)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--lr', type=float, default=1e-5)
    p.add_argument('--galore_rank', type=int, default=128)
    p.add_argument('--galore_gap', type=int, default=200, help='update_proj_gap for the amortized time per step')
    p.add_argument('--galore_svd', default='exact', choices=('exact', 'randomized'))
    p.add_argument('--timeout', type=int, default=420, help='seconds per method before it is given up')
    a = p.parse_args(argv)
    if a.what == 'run': return run(a)
    checkpoint(a.shape, a.device)
    rows = []
    for m in a.methods.split(','):
        args = [sys.executable, os.path.abspath(__file__), 'run', '--method', m] + [
            x for k, v in vars(a).items() if k not in ('what', 'method', 'methods', 'timeout') for x in (f'--{k}', str(v))]
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=a.timeout)
            line = [l for l in out.stdout.splitlines() if l.startswith('{')]
            if out.returncode or not line: rows.append(dict(shape=a.shape, method=m, error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f'exit {out.returncode}'))
            else: rows.append(json.loads(line[-1]))
        except subprocess.TimeoutExpired: rows.append(dict(shape=a.shape, method=m, error=f'timed out after {a.timeout} s'))
        print(json.dumps(rows[-1]), flush=True)
    print('\n' + table(rows))
    return rows

if __name__ == '__main__': main()
