#!/usr/bin/env python
"""Loss curves of the fast path against the plain path (issue 13): "on the GPU, 50 steps of the fast path and of the plain
path (our layers, no fused kernels) on the tiny base and on an 8B-shaped model give loss curves within bf16 noise".

    python tools/perf/loss_curves.py all [--shapes tiny_base,llama-3-8b] [--budget 540] [--plot curves.png] [--out res.json]
    python tools/perf/loss_curves.py run --shape tiny_base                  # one shape, in this process
    python tools/perf/loss_curves.py all --device cpu --shapes tiny_base,tiny --steps 6    # CPU dry run

For one model source, all paths start from one prepared model (`prepare_model(src, 'qlora', 'course', r=16, alpha=32, the 7
projections, gradient checkpointing)` in bf16, loaded and quantized once, then deep-copied per path), so every path has the
same NF4 codes, the same adapter initialisation (seed), the same batches and the same schedule:

  plain   the copy as prepared: NF4Linear + LoRALinear + transformers' checkpointing + `core.hf_loss`, bf16 compute
  fast    the copy + `qlora_course.fast.speed_up(model, **--speed-up-kw)`, trained with the loss function it returns
  fp32    the noise reference: the same copy with the compute in fp32 (every NF4Linear decodes to fp32, the embeddings, norms
          and output layer cast to fp32; the adapters are fp32 already). Its weights are the bf16 model's weights exactly,
          so |plain - fp32| is what bf16 arithmetic alone does to the curve. (prepare_model(precision='fp32') would instead
          quantize the fp32 checkpoint of the tiny base afresh, and its difference would mix weight rounding into the noise.)
  frozen  no training: the prepared model's loss on each step's batch (forward only, no_grad), to see what the training
          itself does to the curve (cheap: about a third of a step each)
  plain_rerun  (optional, --paths) the plain path again: the GPU's run-to-run nondeterminism of the very same computation

Criterion (printed with the result): fast is within bf16 noise when max_t |fast_t - plain_t| <= 2 x max_t |plain_t - fp32_t|
over the steps all three completed (`ratio` = the left side over max_t |plain_t - fp32_t|; `mean_ratio`, the same with means,
is the steadier number; `fast_err_over_plain_err` = max_t |fast_t - fp32_t| / max_t |plain_t - fp32_t|: is fast as close
to fp32 as plain bf16 is?). Why 2: two bf16 computations of the same function with different rounding (different
fusion and summation order, a bf16 LoRA branch, a chunked loss) each differ from the exact result by about the rounding
noise of one, so they differ from each other by about sqrt(2) x |bf16 - exact|; fp32 stands in for exact. Also reported:
the mean differences, the step-0 difference (forward only, before any update), and how much the training moved the curve:
max_t |plain_t - frozen_t| against the noise (`effect_over_noise`). The batches differ from step to step, so the curve's
own ups and downs say little; what matters is that the adapters changed the losses by much more than the noise, so that a
wrong gradient in the fast path would show as a difference of the size of that effect.

Data: the course's generated corpus, offline (`models.pretrain_batches(course_tokenizer(), bs, seq, seed)`): real text,
token ids < 1024, which the 8B shape's 128,256-entry vocabulary takes as well; labels = inputs. Loop: `core.train_steps`,
torch AdamW (weight decay 0; --fused-adamw: fused AdamW for the fast path only, as bench_fast's `fast`), cosine schedule
from `--lr` to 0 over the steps, no warm-up, gradient clipping at --grad-clip.

Sources (--shape / --shapes): tiny_base = the course's pretrained tiny Llama (`models.tiny_base_dir()`); llama-3-8b (or any
qlora_course.shapes name) = the random bf16 checkpoint in BENCH_CKPT that bench_fast.py's `make` writes; tiny = tiny:llama
(random, CPU dry runs); anything else = a local model folder. On the CPU, bf16 compute is forced (prepare_model refuses it
there) as bench_fast.py's dry run does.

Output: JSON lines as it goes (progress every --every steps, one line per path with all its losses), then one summary line
per shape ({"summary": ...}); `all` ends with a markdown table and one JSON line {"result": ...} (also written to --out).
--plot writes a PNG: the curves and the absolute differences per step.
"""
import argparse, copy, gc, json, math, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import stream, versions                      # what the perf tools share
TARGETS = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
PATHS = ('frozen', 'plain', 'fast', 'fp32', 'plain_rerun')
# Per-shape defaults: (batch size, sequence length, learning rate)
DEFAULTS = {'tiny_base': (8, 128, 1e-3), 'tiny': (4, 64, 1e-3)}
BIG = (2, 512, 1e-3)                     # the 8B shape: 1024 tokens per step; 1e-3 so the random model's curve moves
FACTOR = 2.0

def emit(d): print(json.dumps(d), flush=True)

def source(shape):
    "The model folder or name `prepare_model` gets for `shape`"
    if shape == 'tiny_base':
        from qlora_course.models import tiny_base_dir
        return str(tiny_base_dir())
    if shape == 'tiny': return 'tiny:llama'
    if os.path.isdir(shape): return shape
    sys.path.insert(0, HERE)
    from bench_fast import make                          # the random checkpoint (BENCH_CKPT), written if missing
    return make(shape)

def to_fp32(model):
    "Compute in fp32 on the same weights: NF4Linear decodes to fp32; every other floating tensor (not the packed NF4 storage) cast up"
    import torch
    from qlora_course.nf4_linear import NF4Linear
    n = 0
    for m in model.modules():
        if isinstance(m, NF4Linear): m.compute_dtype = torch.float32; n += 1
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is None or not t.is_floating_point() or t.dtype == torch.float32: continue
            if isinstance(m, NF4Linear) and name.startswith('quant_'): continue
            t.data = t.data.float()                      # tied weights are one Parameter: cast once, still tied
    if hasattr(model.config, 'dtype'): model.config.dtype = torch.float32
    return n

class _Stop(Exception): pass

def run_shape(a):
    "All paths for one shape in this process; prints progress, per-path results and the summary line"
    import torch
    import qlora_course.train as qt
    from qlora_course.core import set_seed, train_steps, hf_loss
    from qlora_course.models import course_tokenizer
    from qlora_course.world import pretrain_batches
    t_start = time.time()
    cuda = a.device == 'cuda'
    if not cuda:                                         # prepare_model refuses bf16 on the CPU; the dry run wants the GPU's dtypes
        _cd = qt.compute_dtype
        qt.compute_dtype = lambda precision='auto', device=None: torch.bfloat16 if precision in ('auto', 'bf16') else _cd(precision, 'cpu')
    else:
        torch.backends.cuda.matmul.allow_tf32 = False    # the fp32 reference really in fp32
        torch.backends.cudnn.allow_tf32 = False
    bs, seq, lr = DEFAULTS.get(a.shape, BIG)
    bs, seq, lr = a.bs or bs, a.seq or seq, a.lr or lr
    kw = json.loads(a.speed_up_kw) if a.speed_up_kw else {}
    paths = [p.strip() for p in a.paths.split(',') if p.strip()]
    for p in paths:
        if p not in PATHS: raise SystemExit(f'unknown path {p!r}: choose from {", ".join(PATHS)}')
    src = source(a.shape)
    set_seed(a.seed)
    t = time.time()
    base, _ = qt.prepare_model(src, 'qlora', 'course', lora_rank=16, lora_alpha=32, lora_target_modules=TARGETS.split(','),
                               use_gradient_checkpointing=True, precision='bf16', device=a.device)
    load_s = time.time() - t
    tok = course_tokenizer()
    make_batch = pretrain_batches(tok, bs, seq, seed=a.seed)
    batches = [make_batch(i) for i in range(a.steps)]
    vocab = base.config.get_text_config().vocab_size
    assert max(int(b['input_ids'].max()) for b in batches) < vocab
    head = dict(shape=a.shape, source=str(src), bs=bs, seq=seq, lr=lr, steps=a.steps, grad_clip=a.grad_clip, seed=a.seed,
                speed_up_kw=kw, fused_adamw_fast=a.fused_adamw, load_s=round(load_s, 1), device=a.device)
    emit(dict(start=True, **head))
    res, info = {}, {}
    target = a.steps                                     # after a path stopped early at k steps, the later ones stop at k too
    train_left = sum(p != 'frozen' for p in paths)
    for i, path in enumerate(paths):
        left = a.budget - (time.time() - t_start)
        if left < 5:
            info[path] = dict(skipped=f'{left:.0f} s of the {a.budget} s budget left'); emit(dict(shape=a.shape, path=path, **info[path])); continue
        if path != 'frozen':                             # each training path gets an equal share of what is left
            deadline = time.time() + left / train_left; train_left -= 1
        if path == 'frozen':                             # the untrained model on each batch: no copy needed
            stamps, losses = [time.time()], []
            base.eval()
            with torch.no_grad():
                for b in batches: losses.append(float(hf_loss(base, {k: v.to(a.device) for k, v in b.items()}))); stamps.append(time.time())
            res[path] = losses
            info[path] = dict(steps_done=len(losses), seconds=round(stamps[-1] - stamps[0], 1))
            emit(dict(shape=a.shape, path=path, **info[path], losses=[round(x, 6) for x in losses]))
            continue
        last = i == len(paths) - 1
        model = base if last else copy.deepcopy(base)    # the last path trains the prepared model itself
        extra, loss_fn, opt, losses = {}, hf_loss, 'adamw', []
        try:
            if path == 'fp32': extra['fp32_nf4_layers'] = to_fp32(model)
            if path == 'fast':
                import qlora_course.fast as qf
                loss_fn = qf.speed_up(model, **kw)
                if a.fused_adamw: opt = lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, fused=True)
            losses, stamps = [], [time.time()]
            def on_step(loop, path=path):
                losses.append(float(loop.losses[-1])); stamps.append(time.time())
                k = len(losses)
                if k % a.every == 0 or k == a.steps: emit(dict(shape=a.shape, path=path, step=k, loss=round(losses[-1], 5), s=round(stamps[-1] - stamps[0], 1)))
                step_s = stamps[-1] - stamps[-2]
                if k < a.steps and (k >= target or time.time() + 1.5 * step_s > deadline): raise _Stop()
            if cuda: torch.cuda.reset_peak_memory_stats()
            set_seed(a.seed)
            try: train_steps(model, batches, a.steps, lr=lr, grad_clip=a.grad_clip, loss_fn=loss_fn, optimizer=opt, progress=False, on_step=on_step)
            except _Stop:
                extra['stopped'] = f'{len(losses)} of {a.steps} steps (' + ('as an earlier path' if len(losses) >= target else "this path's share of the budget") + ')'
                target = min(target, len(losses))
            res[path] = losses
            dts = [y - x for x, y in zip(stamps, stamps[1:])]
            info[path] = dict(steps_done=len(losses), seconds=round(stamps[-1] - stamps[0], 1), first_step_s=round(dts[0], 2) if dts else None,
                              later_step_s=round(sum(dts[1:]) / len(dts[1:]), 3) if len(dts) > 1 else None,
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, **extra)
        except Exception as e:
            import traceback; traceback.print_exc(file=sys.stderr)
            info[path] = dict(error=f'{type(e).__name__}: {str(e)[:300]}', **extra)
            if losses: res[path] = losses
        emit(dict(shape=a.shape, path=path, **info[path], losses=[round(x, 6) for x in res.get(path, [])]))
        del model; gc.collect()
        if cuda: torch.cuda.empty_cache()
    summary = dict(head, **compare(res), paths=info, losses=res, total_s=round(time.time() - t_start, 1), versions=versions(a.device))
    emit(dict(summary=summary))
    return summary

def compare(res):
    "The differences per step and the criterion"
    out = dict(criterion=f'fast within bf16 noise: max_t |fast - plain| <= {FACTOR:g} x max_t |plain - fp32| over the steps all three completed')
    p, f, q = res.get('plain'), res.get('fast'), res.get('fp32')
    def diffs(x, y):
        n = min(len(x), len(y))
        return [abs(u - v) for u, v in zip(x[:n], y[:n])]
    if p and f: out['fast_vs_plain'] = stats(diffs(f, p))
    if p and q: out['plain_vs_fp32'] = stats(diffs(p, q))
    if f and q: out['fast_vs_fp32'] = stats(diffs(f, q))
    if p and res.get('plain_rerun'): out['plain_vs_rerun'] = stats(diffs(res['plain_rerun'], p))
    if p and f and q:
        n = min(len(p), len(f), len(q))
        fd, nd = max(diffs(f[:n], p[:n])), max(diffs(p[:n], q[:n]))
        fm, nm = sum(diffs(f[:n], p[:n])) / n, sum(diffs(p[:n], q[:n])) / n
        out.update(compared_steps=n, max_fast_diff=fd, max_noise=nd, ratio=(fd / nd if nd else math.inf if fd else 0.0),
                   mean_ratio=(fm / nm if nm else math.inf if fm else 0.0), within_noise=fd <= FACTOR * nd)
        fe = max(diffs(f[:n], q[:n]))                    # secondary: is fast as close to fp32 as plain bf16 is?
        out['fast_err_over_plain_err'] = fe / nd if nd else (math.inf if fe else 0.0)
    else: out.update(within_noise=None, missing=[k for k, v in (('plain', p), ('fast', f), ('fp32', q)) if not v])
    if p and res.get('frozen'):
        out['training_effect'] = stats(diffs(p, res['frozen']))
        if out.get('max_noise'): out['effect_over_noise'] = out['training_effect']['max'] / out['max_noise']
    return out

def stats(d):
    return dict(max=max(d), mean=sum(d) / len(d), step0=d[0], argmax=d.index(max(d)), n=len(d)) if d else None

# ------------------------------------------------------------------------------------------------------------------
def table(summaries):
    rows = ['| shape | bs x seq, lr | steps compared | plain first -> last compared | max abs fast-plain (mean) | max abs plain-fp32 (mean) | ratio max (mean) | '
            'within noise (max ratio <= 2) | fast-fp32 / plain-fp32 | training effect / noise |',
            '|---|---|---|---|---|---|---|---|---|---|']
    g = lambda d, k: f"{d[k]:.2e}" if d and d.get(k) is not None else '-'
    for s in summaries:
        if 'losses' not in s: rows.append(f"| {s['shape']} | | | | | | | failed: {s.get('error', '?')[:150]} | | |"); continue
        p = s['losses'].get('plain')
        first_last = f"{p[0]:.4f} -> {p[(s.get('compared_steps') or len(p)) - 1]:.4f}" if p else '-'
        fv, nv = s.get('fast_vs_plain'), s.get('plain_vs_fp32')
        if s.get('within_noise') is None: verdict = f"missing {','.join(s.get('missing', []))}"
        else: verdict = 'yes' if s['within_noise'] else 'NO'
        ratio = f"{s['ratio']:.2f} ({s['mean_ratio']:.2f})" if s.get('ratio') is not None else '-'
        fe = f"{s['fast_err_over_plain_err']:.2f}" if s.get('fast_err_over_plain_err') is not None else '-'
        fall = f"{s['effect_over_noise']:.1f}x" if s.get('effect_over_noise') is not None else '-'
        note = f" ({s['error'][:80]})" if s.get('error') else ''
        rows.append(f"| {s['shape']} | {s.get('bs')} x {s.get('seq')}, {s.get('lr')} | {s.get('compared_steps', '-')} | {first_last} | "
                    f"{g(fv, 'max')} ({g(fv, 'mean')}) | {g(nv, 'max')} ({g(nv, 'mean')}) | {ratio} | {verdict}{note} | {fe} | {fall} |")
    return '\n'.join(rows)

def plot(summaries, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ok = [s for s in summaries if 'losses' in s]
    if not ok: return None
    fig, axes = plt.subplots(len(ok), 2, figsize=(12, 3.6 * len(ok)), squeeze=False)
    for (ax, ax2), s in zip(axes, ok):
        L = s['losses']
        for k, style in (('frozen', '-'), ('plain', '-'), ('fast', '--'), ('fp32', ':'), ('plain_rerun', '-.')):
            if L.get(k): ax.plot(range(1, len(L[k]) + 1), L[k], style, label=k)
        ax.set(title=f"{s['shape']}: loss ({s['bs']} x {s['seq']}, lr {s['lr']:g})", xlabel='step', ylabel='loss'); ax.legend()
        def d(x, y):
            n = min(len(x), len(y)); return [max(abs(u - v), 1e-9) for u, v in zip(x[:n], y[:n])]
        if L.get('plain') and L.get('fast'): ax2.semilogy(range(1, len(d(L['fast'], L['plain'])) + 1), d(L['fast'], L['plain']), label='|fast - plain|')
        if L.get('plain') and L.get('fp32'): ax2.semilogy(range(1, len(d(L['plain'], L['fp32'])) + 1), d(L['plain'], L['fp32']), label='|plain - fp32| (bf16 noise)')
        if L.get('plain') and L.get('frozen'): ax2.semilogy(range(1, len(d(L['plain'], L['frozen'])) + 1), d(L['plain'], L['frozen']), ':', label='|plain - frozen| (training effect)')
        if L.get('plain') and L.get('plain_rerun'): ax2.semilogy(range(1, len(d(L['plain'], L['plain_rerun'])) + 1), d(L['plain'], L['plain_rerun']), label='|plain - rerun|')
        ax2.set(title=f"{s['shape']}: absolute loss difference" + (f" (within noise: {s['within_noise']})" if s.get('within_noise') is not None else ''), xlabel='step'); ax2.legend()
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)
    return path

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=('all', 'run'), help='all: every --shapes in its own process, then the table; run: one --shape in this process')
    p.add_argument('--shape', default='tiny_base', help='run: tiny_base | llama-3-8b (or another qlora_course.shapes name: BENCH_CKPT) | tiny (tiny:llama) | a model folder')
    p.add_argument('--shapes', default='tiny_base,llama-3-8b', help='all: comma-separated shapes, run in this order (default tiny_base,llama-3-8b)')
    p.add_argument('--paths', default='frozen,plain,fast,fp32', help=f'comma-separated, trained in this order; from {", ".join(PATHS)} (default frozen,plain,fast,fp32)')
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'), help='cpu: a dry run (bf16 forced on the CPU; slow, use small --steps)')
    p.add_argument('--steps', type=int, default=50, help='optimizer steps per path (default 50)')
    p.add_argument('--bs', type=int, default=None, help='batch size (default: tiny_base 8, tiny 4, other shapes 2)')
    p.add_argument('--seq', type=int, default=None, help='sequence length (default: tiny_base 128, tiny 64, other shapes 512)')
    p.add_argument('--lr', type=float, default=None, help='peak learning rate, cosine to 0 over --steps (default 1e-3)')
    p.add_argument('--grad-clip', type=float, default=1.0, help='gradient-norm clipping, 0 for none (default 1.0)')
    p.add_argument('--seed', type=int, default=0, help='seed of the adapters\' initialisation and of the data order (default 0)')
    p.add_argument('--speed-up-kw', default=None, help='JSON object of extra keyword arguments for speed_up, e.g. \'{"graphs": true}\' or \'{"compile": false}\'')
    p.add_argument('--fused-adamw', action='store_true', help='the fast path trains with fused AdamW (as bench_fast.py\'s fast); default: torch AdamW for all paths')
    p.add_argument('--every', type=int, default=10, help='print a progress line every this many steps (default 10)')
    p.add_argument('--budget', type=float, default=540, help='seconds for everything (all: shared out among the shapes, each getting the '
                   'time left over the shapes left) or for this shape (run: each training path gets an equal share of what is left, and '
                   'stops before a step that would not end in it; later paths stop where an earlier one stopped; the summary still '
                   'prints, over the steps all paths completed). Keep it <= 550 in a 600 s device call (default 540)')
    p.add_argument('--plot', default=None, help='write a PNG of the curves and their differences here')
    p.add_argument('--out', default=None, help='write the result JSON (every shape\'s summary) here')
    a = p.parse_args()
    if a.speed_up_kw: json.loads(a.speed_up_kw)           # fail early on bad JSON
    if a.what == 'run':
        s = run_shape(a)
        if a.plot: plot([s], a.plot)
        if a.out:
            with open(a.out, 'w') as f: json.dump(dict(result=[s]), f)
        return
    t0 = time.time()
    shapes = [s.strip() for s in a.shapes.split(',') if s.strip()]
    summaries = []
    fwd = ['--paths', a.paths, '--device', a.device, '--steps', str(a.steps), '--grad-clip', str(a.grad_clip), '--seed', str(a.seed), '--every', str(a.every)]
    for k in ('bs', 'seq', 'lr'):
        if getattr(a, k) is not None: fwd += [f'--{k}', str(getattr(a, k))]
    if a.speed_up_kw: fwd += ['--speed-up-kw', a.speed_up_kw]
    if a.fused_adamw: fwd += ['--fused-adamw']
    for i, shape in enumerate(shapes):
        left = a.budget - (time.time() - t0)
        share = left / (len(shapes) - i)
        if share < 20:
            s = dict(shape=shape, error=f'skipped: {left:.0f} s of the {a.budget:g} s budget left'); emit(dict(summary=s)); summaries.append(s); continue
        cmd = [sys.executable, os.path.abspath(__file__), 'run', '--shape', shape, '--budget', f'{share:.0f}'] + fwd
        t = time.time()
        # a step already started may run past the child's own budget: some grace, never more than 40 s past the whole budget
        lines, err = stream(cmd, min(share + 90, a.budget - (time.time() - t0) + 40))
        print(f'[{shape}] {time.time() - t:.0f} s' + (f', {err}' if err else ''), file=sys.stderr, flush=True)
        s = next((l['summary'] for l in lines if 'summary' in l), None)
        if s is None:                                    # rebuild what the child printed before it died
            res = {l['path']: l['losses'] for l in lines if 'losses' in l and l.get('losses')}
            start = next((l for l in lines if l.get('start')), {})
            s = dict({k: v for k, v in start.items() if k != 'start'}, shape=shape, **compare(res), losses=res, error=err or 'no summary') if res else dict(shape=shape, error=err or 'no summary')
        summaries.append(s)
    print()
    print(table(summaries))
    crit = next((s['criterion'] for s in summaries if 'criterion' in s), None)
    if crit: print(f'\ncriterion: {crit}')
    ver = next((s['versions'] for s in summaries if 'versions' in s), None) or versions(a.device)
    print('versions: ' + ' | '.join(f'{k} {v}' for k, v in ver.items() if v is not None))
    result = dict(result=summaries, criterion=crit, versions=ver, total_s=round(time.time() - t0, 1))
    if a.plot:
        try: print(f'plot: {plot(summaries, a.plot)}')
        except Exception as e: print(f'plot failed: {type(e).__name__}: {e}', file=sys.stderr)
    if a.out:
        with open(a.out, 'w') as f: json.dump(result, f)
    emit(dict(result=[{k: v for k, v in s.items() if k not in ('losses', 'paths', 'versions')} for s in summaries], total_s=result['total_s']))

if __name__ == '__main__': main()
