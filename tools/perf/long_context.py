#!/usr/bin/env python
"""Long context (issue 13): "the longest sequence that trains at batch 1 within 24 GiB (a consumer GPU), ours and Unsloth's,
measured". Our own harness: nothing in it comes from Unsloth or another project; Unsloth is only called, as anchors.py does.

    python tools/perf/long_context.py all [--sides ours,unsloth_gc,ours_offload,unsloth] [--budget 540]
    python tools/perf/long_context.py side --side ours [--budget 240]          # one side, in this process, JSON lines
    python tools/perf/long_context.py all --device cpu --shape tiny --sides ours,ours_offload,unsloth_gc --start 64 --step 16 \\
        --max-len 512 --emulate-oom-above 200 --warmup-lens 16,32 --loss-chunk 16       # CPU dry run of the search
    python tools/perf/long_context.py selftest                                  # the search alone, on made-up memory curves

Sides, each in its own process, on the random Llama-3-8B-shaped checkpoint (load once per side):
  ours          prepare_model(BENCH_CKPT, 'qlora', 'course', r=16, alpha=32, q,k,v,o,gate,up,down, checkpointing) +
                qlora_course.fast.speed_up(model, **--speed-up-kw), trained with the loss function speed_up returns (its
                chunk set to --loss-chunk rows, so that it compiles once for all lengths)
  ours_offload  the same with speed_up(offload=True): the layer checkpoints in pinned CPU memory
  unsloth_gc    anchors.py's recipe (FastLanguageModel.from_pretrained(CKPT, max_seq_length=--max-len, load_in_4bit=True,
                dtype=bf16, local_files_only=True), get_peft_model(r=16, alpha=32, dropout 0, bias 'none', anchors.TARGETS,
                use_gradient_checkpointing=True)), loss = model(input_ids, labels).loss; unsloth imported before transformers
  unsloth       the same with use_gradient_checkpointing='unsloth' (its checkpoints offloaded to CPU memory)
anchors.py is found at $PEER_ANCHORS, else .peer/anchors.py, else ../shared/peer/anchors.py; it reads the checkpoint
folder from $CKPT. Set CKPT and BENCH_CKPT to the same folder so that both sides train the same weights (checked, printed).

One trial = one full training step at batch 1 and length L: random tokens in [4, vocab), labels = inputs (as anchors.py),
forward, backward, AdamW step (torch AdamW lr 1e-4, one optimizer for the whole sweep, so its states exist as in training),
zero_grad. Memory: the CUDA caching allocator is capped at --cap-gib (default 24 GiB) with
torch.cuda.set_per_process_memory_fraction(cap / total) before the model loads, so the load has to fit too. A trial that
raises torch.OutOfMemoryError (or a CUDA 'out of memory' RuntimeError) fails; everything is freed (gradients, leftovers of
our offloader, empty_cache) and the sweep goes on; any other error ends the sweep. Recorded per trial: length, ok/oom/error,
peak max_memory_allocated and max_memory_reserved (reset and cache emptied before each trial), seconds, loss, and what was
still allocated after the clean-up beyond the level before (resid_gib: should be ~0).

Not measured: memory outside the caching allocator (the CUDA context, about 0.5 GiB on a real card, cuBLAS/Triton modules);
a real 24 GB card has that much less. The alloc conf is the same for every side (--alloc-conf, printed with what each
process ended up with).

Search (to a --step granularity, 1024 by default): warm-up steps at --warmup-lens first (not trials: compile and optimizer
states), then lengths doubling from --start (8192) up to --max-len, then between the longest success and the first failure.
A linear model of the peak reserved memory in the length (through the two longest successes; attention is flash/SDPA, so
activations grow linearly) predicts where the cap is reached: the doubling jumps to that length when it lies before the next
doubling, and up to 3 probes in the bracket are placed there (the next probe after a predicted success is one step above
it); the others bisect. --search bisect turns the model off; --lengths L1,L2,... tries exactly those lengths, no search.
Before each trial its time is estimated from the successes so far (t = a L + b L^2 through the two longest); a trial that
would end after --budget is not started, and the result is then a lower bound. `exact` in the summary: the longest success
and the first failure lie one step apart.

Time: `all` shares --budget out among the sides and kills a side 40 s after the whole budget at the latest, so keep
--budget <= 550 in one 600 s device call. A step at 64k tokens takes tens of seconds (attention grows with L^2).

Output: JSON lines (one per trial, then {"summary": ...}); `all` adds a markdown table (side, longest ok length, its peak
GiB, first failing length, seconds) and a device/versions line, then {"result": [...]}.
"""
import argparse, functools, gc, inspect, json, math, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import stream, versions, peer_script         # what the perf tools share
TARGETS = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
SIDES = ('ours', 'ours_offload', 'unsloth_gc', 'unsloth')
GiB = 2**30

def emit(d): print(json.dumps(d), flush=True)
def gib(x): return None if x is None else round(x / GiB, 2)

def load_anchors():
    "anchors.py as a module (it imports only os, sys, json, time at the top: unsloth still comes before transformers)"
    import importlib.util
    path = peer_script()
    if path is None: raise FileNotFoundError('no anchors.py: set PEER_ANCHORS, or copy ../shared/peer/anchors.py to .peer/')
    spec = importlib.util.spec_from_file_location('peer_anchors', path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod, path

# ------------------------------------------------------------------------------------------------------------------
class Search:
    "Which length to try next, from the successes (with their peak bytes) and failures so far"
    def __init__(self, start, step, max_len, cap=None, mode='predict', model_probes=3):
        self.start, self.step, self.max_len, self.cap, self.mode = start, step, max_len, cap, mode
        self.ok, self.fail, self.left, self.kind = {}, set(), model_probes, None

    @property
    def lo(self): return max(self.ok, default=0)
    @property
    def hi(self): return min(self.fail, default=None)

    def record(self, L, ok, peak=None):
        if ok: self.ok[L] = peak
        else: self.fail.add(L)

    def grid(self, x): return max(self.step, int(x) // self.step * self.step)

    def predict(self):
        "The length at which the linear model of the peak reaches the cap (on the grid), or None"
        pts = sorted((L, p) for L, p in self.ok.items() if p is not None and (self.hi is None or L < self.hi))
        if self.cap is None or len(pts) < 2: return None
        (L1, p1), (L2, p2) = pts[-2], pts[-1]
        slope = (p2 - p1) / (L2 - L1)
        if slope <= 0: return None
        return self.grid(L2 + (self.cap - p2) / slope)

    def next(self):
        "(length, why) of the next trial, or (None, why the search ends)"
        lo, hi, s = self.lo, self.hi, self.step
        if not self.ok and not self.fail: return self.grid(self.start), 'start'
        if hi is not None and hi - lo <= s:
            return None, ('exact' if lo else f'the first length, {hi}, failed and {hi} - 0 <= step')
        if hi is None:
            if lo >= self.max_len: return None, f'reached --max-len {self.max_len}'
            cand, why = min(2 * lo, self.max_len), 'double'
        else: cand, why = max(lo + s, min(hi - s, self.grid((lo + hi) // 2))), 'bisect'
        if self.mode == 'predict' and self.left > 0:
            p = self.predict()
            if p is not None:
                p = max(p, lo + s)                       # the model says lo is the longest: try one step above
                if hi is not None: p = min(p, hi - s)
                if (hi is None and p < cand) or (hi is not None and lo < p < hi and p != cand):
                    self.left -= 1
                    return p, 'model'
        return cand, why

def selftest():
    "The search against made-up linear memory curves with a cap: finds the true longest length to the step, in few trials"
    cases = [(5e9, 200e3, 24 * GiB), (5e9, 90e3, 24 * GiB), (6e9, 400e3, 24 * GiB), (23e9, 400e3, 24 * GiB), (1e9, 10e3, 24 * GiB)]
    bad = 0
    for a, b, cap in cases:
        for mode in ('predict', 'bisect'):
            true = int((cap - a) // b)                   # longest length whose peak fits
            s = Search(8192, 1024, 262144, cap, mode)
            n = 0
            while True:
                L, why = s.next()
                if L is None: break
                n += 1
                peak = a + b * L + 0.02e9 * math.sin(L)  # a little noise around the line
                s.record(L, peak <= cap, peak if peak <= cap else None)
            expect = min(true // 1024 * 1024, 262144)    # the noise may move the edge by a little: within one step of it
            ok = abs(s.lo - expect) <= 1024 and (s.hi is None or s.hi - s.lo <= 1024) and n <= (8 if mode == "predict" else 16)
            bad += not ok
            print(f"{'PASS' if ok else 'FAIL'} a={a / GiB:.1f} GiB b={b / 1e3:.0f} kB/token {mode}: found {s.lo}, true {true}, {n} trials, end: {why}")
    print(f'{len(cases) * 2 - bad}/{len(cases) * 2} passed')
    return bad == 0

# ------------------------------------------------------------------------------------------------------------------
def _clear_offload_leftovers(model, layers):
    "After a failed step: drop the GPU copies our offloader may have fetched back (found in the layers' forward closures)"
    n = 0
    for layer in layers:
        fn = getattr(layer, 'forward', None)
        for cell in getattr(fn, '__closure__', None) or ():
            try: obj = cell.cell_contents
            except ValueError: continue
            back = getattr(obj, 'back', None)
            if isinstance(back, dict) and hasattr(obj, 'bufs'): n += len(back); back.clear()
    return n

def _is_oom(e):
    import torch
    if isinstance(e, getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError)): return True
    m = str(e)
    return isinstance(e, RuntimeError) and ('out of memory' in m.lower() or 'CUBLAS_STATUS_ALLOC_FAILED' in m or 'CUDA_ERROR_OUT_OF_MEMORY' in m)

def setup_ours(a, cuda):
    import torch
    import qlora_course.train as qt
    from qlora_course.core import set_seed
    import qlora_course.fast as qf
    if not cuda:                                         # prepare_model refuses bf16 on the CPU; the dry run wants the GPU's dtypes
        qt.compute_dtype = lambda precision='auto', device=None: torch.bfloat16
    dyn = torch._dynamo.config                           # every new length recompiles the static-shape loss pieces: allow it
    for k in ('recompile_limit', 'cache_size_limit'):
        if hasattr(dyn, k): setattr(dyn, k, max(getattr(dyn, k), 256))
    for k in ('accumulated_recompile_limit', 'accumulated_cache_size_limit'):
        if hasattr(dyn, k): setattr(dyn, k, max(getattr(dyn, k), 2048))
    sys.path.insert(0, HERE)
    from bench_fast import make
    src = make(a.shape)
    set_seed(0)
    model, _ = qt.prepare_model(src, 'qlora', 'course', lora_rank=16, lora_alpha=32, lora_target_modules=TARGETS.split(','),
                                use_gradient_checkpointing=True, device=a.device)
    # graphs=False: CUDAGraphStep runs batches over its max_tokens (4096) eagerly anyway, and the plain loss function takes
    # the fixed loss chunk below
    kw = {'graphs': False, **(json.loads(a.speed_up_kw) if a.speed_up_kw else {}), 'offload': a.side == 'ours_offload'}
    loss_fn = qf.speed_up(model, **kw)
    chunk = None
    if a.loss_chunk and 'chunk' in inspect.signature(loss_fn).parameters:
        chunk = a.loss_chunk                             # every length a multiple of it: one compiled loss shape for all lengths
        loss_fn = functools.partial(loss_fn, chunk=chunk)
    return model, loss_fn, qf.decoder_layers(model), dict(source=str(src), speed_up_kw=kw, loss_chunk=chunk,
                                                             dynamo_recompile_limit=getattr(dyn, 'recompile_limit', getattr(dyn, 'cache_size_limit', None)))

def setup_unsloth(a, anchors, max_seq_length):
    import torch
    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(anchors.PATH, max_seq_length=max_seq_length, load_in_4bit=True,
                                                 dtype=torch.bfloat16, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias='none', target_modules=anchors.TARGETS,
                                             use_gradient_checkpointing=('unsloth' if a.side == 'unsloth' else True))
    FastLanguageModel.for_training(model)
    loss_fn = lambda m, b: m(input_ids=b['input_ids'], labels=b['labels']).loss
    return model, loss_fn, [], dict(source=anchors.PATH, max_seq_length=max_seq_length)

def run_side(a):
    t0 = time.time()
    cuda = a.device == 'cuda'
    uns = a.side.startswith('unsloth')
    lengths = [int(x) for x in a.lengths.split(',')] if a.lengths else None
    max_len = max(lengths) if lengths else a.max_len
    head = dict(side=a.side, device=a.device, cap_gib=a.cap_gib if cuda else None, step=a.step, start_len=a.start, max_len=max_len)
    try:
        if uns:                                              # before anything imports transformers
            anchors, apath = load_anchors()
            os.environ.setdefault('UNSLOTH_DISABLE_STATISTICS', '1')
            import unsloth
            head.update(anchors=apath, ckpt=anchors.PATH, unsloth=getattr(unsloth, '__version__', None))
            if os.environ.get('BENCH_CKPT') and os.path.realpath(os.environ['BENCH_CKPT']) != os.path.realpath(anchors.PATH):
                head['warning'] = f"CKPT ({anchors.PATH}) and BENCH_CKPT ({os.environ['BENCH_CKPT']}) differ: the sides train different checkpoints"
        import torch
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            cap = min(a.cap_gib * GiB, total)
            torch.cuda.set_per_process_memory_fraction(cap / total)
            head.update(cap_fraction=round(cap / total, 4), gpu_total_gib=gib(total))
        else: cap = a.cap_gib * GiB if a.emulate_oom_above else None   # the dry run's made-up peaks reach the cap at --emulate-oom-above
        t = time.time()
        if cuda: torch.cuda.reset_peak_memory_stats()
        model, loss_fn, layers, extra = setup_unsloth(a, anchors, max_len) if uns else setup_ours(a, cuda)
        head.update(extra, load_s=round(time.time() - t, 1), alloc_conf=os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))
        if cuda:
            gc.collect(); torch.cuda.empty_cache()
            head.update(load_peak_gib=gib(torch.cuda.max_memory_allocated()), model_gib=gib(torch.cuda.memory_allocated()))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        head['trainable'] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4)
        vocab = model.config.get_text_config().vocab_size if hasattr(model.config, 'get_text_config') else model.config.vocab_size
    except Exception as e:                               # no model: say why, in the summary
        import traceback; traceback.print_exc(file=sys.stderr)
        summary = dict(head, best_len=None, first_fail=None, exact=False, lower_bound=True, error=f'setup failed: {type(e).__name__}: {str(e)[:300]}',
                       stop='setup failed', trials=0, total_s=round(time.time() - t0, 1))
        try: summary['versions'] = versions(a.device)
        except Exception: pass
        emit(dict(summary=summary))
        return summary
    emit(dict(begin=True, **head))
    emulate = a.emulate_oom_above
    trials = []

    def trial(L, why):
        "One training step at length L; returns the trial's record"
        if cuda:
            gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else None
        rec = dict(side=a.side, len=L, why=why)
        ts = time.time()
        status, msg, loss_v = 'ok', None, None
        try:
            x = torch.randint(4, vocab, (1, L), device=a.device)
            loss = loss_fn(model, {'input_ids': x, 'labels': x})
            if emulate and L > emulate:                  # CPU dry run: an OOM with the forward's graph alive
                raise getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError)(f'emulated: {L} > --emulate-oom-above {emulate}')
            if not getattr(loss_fn, 'includes_backward', False): loss.backward()   # a CUDAGraphStep ran it already
            opt.step(); opt.zero_grad(set_to_none=True)
            loss_v = float(loss.detach())
            if cuda: torch.cuda.synchronize()
        except Exception as e:
            status, msg = ('oom' if _is_oom(e) else 'error'), f'{type(e).__name__}: {str(e)[:240]}'
            if status == 'error':
                import traceback; traceback.print_exc(file=sys.stderr)
        rec.update(status=status, s=round(time.time() - ts, 2))
        if cuda: rec.update(peak_gib=gib(torch.cuda.max_memory_allocated()), reserved_gib=gib(torch.cuda.max_memory_reserved()))
        elif emulate: rec.update(peak_gib=round(a.cap_gib * (0.3 + 0.7 * L / emulate), 3), emulated=True)   # a made-up line for the model
        if loss_v is not None: rec['loss'] = round(loss_v, 4)
        if msg: rec['msg'] = msg
        x = loss = None                                  # free the graph (the exception and its frames are gone by now)
        if status != 'ok':
            opt.zero_grad(set_to_none=True)
            n = _clear_offload_leftovers(model, layers)
            if n: rec['cleared_offload_copies'] = n
        gc.collect()
        if cuda:
            torch.cuda.synchronize(); torch.cuda.empty_cache()
            rec['resid_gib'] = gib(torch.cuda.memory_allocated() - before)
        emit(rec)
        return rec

    for L in [int(x) for x in a.warmup_lens.split(',') if x.strip()] if a.warmup_lens else []:
        r = trial(L, 'warmup'); r['warmup'] = True
        if r['status'] == 'error': break
    search = Search(a.start, a.step, max_len, cap, a.search)
    todo = list(lengths) if lengths else None
    stop = None
    while True:
        if todo is not None:
            if not todo: stop = 'the --lengths list is done'; break
            L, why = todo.pop(0), 'list'
        else:
            L, why = search.next()
            if L is None: stop = why; break
        est = estimate(trials, L)
        left = a.budget - (time.time() - t0)
        if est is not None and 1.2 * est + 5 > left:
            stop = f'budget: {left:.0f} s left, the next length {L} would take about {est:.0f} s (x 1.2 + 5 s margin)'; break
        r = trial(L, why)
        trials.append(r)
        if r['status'] == 'error': stop = f"error at {L}: {r['msg']}"; break
        # the search is fed the reserved peak: the cap binds what the allocator reserves, not what is allocated
        peak = (r.get('reserved_gib') or r.get('peak_gib'))
        search.record(L, r['status'] == 'ok', peak * GiB if peak is not None and r['status'] == 'ok' else None)
    oks = [r for r in trials if r['status'] == 'ok']
    best = max(oks, key=lambda r: r['len'], default=None)
    fails = [r['len'] for r in trials if r['status'] != 'ok' and (best is None or r['len'] > best['len'])]
    first_fail = min(fails, default=None)
    exact = best is not None and first_fail is not None and first_fail - best['len'] <= a.step and todo is None
    summary = dict(head, best_len=best['len'] if best else None, best_peak_gib=best.get('peak_gib') if best else None,
                   best_reserved_gib=best.get('reserved_gib') if best else None, best_step_s=best['s'] if best else None,
                   first_fail=first_fail, exact=exact, lower_bound=not exact, stop=stop, trials=len(trials),
                   total_s=round(time.time() - t0, 1), versions=versions(a.device))
    emit(dict(summary=summary))
    return summary

def estimate(trials, L):
    "Seconds a step at L should take, from the successes so far: t = a L + b L^2 through the two longest; None if none yet"
    pts = sorted((r['len'], r['s']) for r in trials if r['status'] == 'ok')
    if not pts: return None
    L2, t2 = pts[-1]
    if L <= L2: return t2
    if len(pts) >= 2:
        L1, t1 = pts[-2]
        if L1 != L2:
            b = (t2 / L2 - t1 / L1) / (L2 - L1)
            a = t1 / L1 - b * L1
            if a >= 0 and b >= 0: return a * L + b * L * L
    return t2 * (L / L2) ** 2

# ------------------------------------------------------------------------------------------------------------------
def table(rows):
    out = ['| side | longest ok length | its peak GiB (reserved) | first failing length | step s at longest | exact? | side s | stop |',
           '|---|---|---|---|---|---|---|---|']
    for s in rows:
        if s.get('best_len') is None and s.get('first_fail') is None:
            out.append(f"| {s['side']} | - | - | - | - | - | {s.get('total_s', '-')} | {str(s.get('error') or s.get('stop') or '')[:200]} |"); continue
        bl = f"{s['best_len']:,}" if s.get('best_len') else 'none'
        pk = (f"{s['best_peak_gib']}" + (f" ({s['best_reserved_gib']})" if s.get('best_reserved_gib') is not None else '')) if s.get('best_peak_gib') is not None else '-'
        ff = f"{s['first_fail']:,}" if s.get('first_fail') else '-'
        ex = 'yes' if s.get('exact') else 'lower bound'
        out.append(f"| {s['side']} | {bl} | {pk} | {ff} | {s.get('best_step_s', '-')} | {ex} | {s.get('total_s', '-')} | {str(s.get('stop') or s.get('error', ''))[:160]} |")
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=('all', 'side', 'selftest'), help='all: each of --sides in its own process, then the table; side: one --side here; '
                   'selftest: the search logic alone (no model)')
    p.add_argument('--side', default='ours', choices=SIDES, help='side: which one (default ours)')
    p.add_argument('--sides', default='ours,unsloth_gc,ours_offload,unsloth', help='all: comma-separated, run in this order (default ours,unsloth_gc,ours_offload,unsloth)')
    p.add_argument('--shape', default='llama-3-8b', help="ours: a qlora_course.shapes name (the random checkpoint in BENCH_CKPT, written by "
                   "bench_fast.py's make if missing) or 'tiny' (tiny:llama, CPU dry runs); Unsloth always loads anchors.py's CKPT")
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'), help='cpu: a dry run (no memory cap; bf16 forced; use tiny lengths)')
    p.add_argument('--cap-gib', type=float, default=24.0, help='GiB the CUDA caching allocator may hold (default 24)')
    p.add_argument('--start', type=int, default=8192, help='first length tried; the sweep doubles from it (default 8192)')
    p.add_argument('--step', type=int, default=1024, help='granularity of the answer; lengths are multiples of it (default 1024)')
    p.add_argument('--max-len', type=int, default=196608, help="longest length tried, and Unsloth's max_seq_length (default 196608)")
    p.add_argument('--lengths', default=None, help='comma-separated lengths to try, in order, instead of the search (e.g. 8192,32768,65536)')
    p.add_argument('--search', default='predict', choices=('predict', 'bisect'), help='predict: the memory model places the doubling jump '
                   'and up to 3 bracket probes (default); bisect: plain doubling then bisection')
    p.add_argument('--warmup-lens', default='1024,2048', help='comma-separated warm-up steps before the sweep, not trials: the compiled '
                   "layers see two lengths (the second compiles the dynamic-length graph) and the optimizer states exist (default 1024,2048; '' for none)")
    p.add_argument('--loss-chunk', type=int, default=512, help='ours: rows per chunk of the fused loss, passed to the loss function speed_up '
                   'returns when it takes `chunk` (default 512: every length here is a multiple of it, so the loss compiles once for all '
                   "lengths instead of once per length; speed_up's own default is 2**26 // vocab = 523 rows for Llama-3; 0: speed_up's default)")
    p.add_argument('--speed-up-kw', default=None, help='ours: JSON object of extra keyword arguments for speed_up, e.g. \'{"graphs": true}\' '
                   '(offload is set by the side)')
    p.add_argument('--alloc-conf', default='expandable_segments:True', help='all: PYTORCH_CUDA_ALLOC_CONF for every side, where the '
                   "environment sets none (default expandable_segments:True; '' leaves it unset)")
    p.add_argument('--emulate-oom-above', type=int, default=None, help='testing: a length above this raises OutOfMemoryError after the '
                   'forward, and the peak is made up (a line reaching the cap there), so the search runs on the CPU')
    p.add_argument('--budget', type=float, default=540, help='seconds for everything (all: shared out among the sides, each getting the '
                   'time left over the sides left) or for this side; no trial starts that would end after it (default 540)')
    p.add_argument('--out', default=None, help='write the summaries as JSON here')
    a = p.parse_args()
    if a.speed_up_kw: json.loads(a.speed_up_kw)
    if a.step < 1 or a.start < a.step: p.error('--step must be >= 1 and --start >= --step')
    if a.what == 'selftest': sys.exit(0 if selftest() else 1)
    if a.what == 'side':
        s = run_side(a)
        if a.out:
            with open(a.out, 'w') as f: json.dump(dict(result=[s]), f)
        return
    t0 = time.time()
    sides = [s.strip() for s in a.sides.split(',') if s.strip()]
    for s in sides:
        if s not in SIDES: p.error(f'unknown side {s!r}: choose from {", ".join(SIDES)}')
    env = dict(os.environ)
    if a.alloc_conf and not env.get('PYTORCH_CUDA_ALLOC_CONF'): env['PYTORCH_CUDA_ALLOC_CONF'] = a.alloc_conf
    fwd = ['--shape', a.shape, '--device', a.device, '--cap-gib', str(a.cap_gib), '--start', str(a.start), '--step', str(a.step),
           '--max-len', str(a.max_len), '--search', a.search, '--warmup-lens', a.warmup_lens]
    fwd += ['--loss-chunk', str(a.loss_chunk)]
    for k in ('lengths', 'speed_up_kw', 'emulate_oom_above'):
        if getattr(a, k) is not None: fwd += ['--' + k.replace('_', '-'), str(getattr(a, k))]
    rows = []
    for i, side in enumerate(sides):
        left = a.budget - (time.time() - t0)
        share = left / (len(sides) - i)
        if share < 30:
            s = dict(side=side, error=f'skipped: {left:.0f} s of the {a.budget:g} s budget left'); emit(dict(summary=s)); rows.append(s); continue
        t = time.time()
        # a trial may run past its estimate: some grace, but never more than 40 s past the whole budget (keep --budget <= 550 in a 600 s call)
        timeout = min(share + 90, a.budget - (time.time() - t0) + 40)
        lines, err = stream([sys.executable, os.path.abspath(__file__), 'side', '--side', side, '--budget', f'{share:.0f}'] + fwd, timeout, env)
        print(f'[{side}] {time.time() - t:.0f} s' + (f', {err}' if err else ''), file=sys.stderr, flush=True)
        s = next((l['summary'] for l in lines if 'summary' in l), None)
        if s is None:                                    # what the child printed before it died
            tr = [l for l in lines if 'status' in l and not l.get('warmup') and l.get('why') != 'warmup']
            oks = [l for l in tr if l['status'] == 'ok']
            best = max(oks, key=lambda r: r['len'], default=None)
            fails = [l['len'] for l in tr if l['status'] != 'ok' and (best is None or l['len'] > best['len'])]
            s = dict(side=side, best_len=best and best['len'], best_peak_gib=best and best.get('peak_gib'), best_reserved_gib=best and best.get('reserved_gib'),
                     best_step_s=best and best['s'], first_fail=min(fails, default=None), exact=False, lower_bound=True,
                     stop=f'child ended without a summary: {err}', error=err, total_s=round(time.time() - t, 1))
        rows.append(s)
    print()
    print(table(rows))
    ver = {}
    for s in rows: ver.update(s.get('versions') or {})
    cap = f'cap {a.cap_gib:g} GiB (torch.cuda.set_per_process_memory_fraction), ' if a.device == 'cuda' else 'CPU dry run, no cap, '
    conf = next((s.get('alloc_conf') for s in rows if 'alloc_conf' in s), None)
    print(f"\n{cap}alloc conf {conf}, step {a.step}, batch 1, random tokens, labels = inputs | " + ' | '.join(f'{k} {v}' for k, v in ver.items()))
    print(f'total {time.time() - t0:.0f} s', flush=True)
    if a.out:
        with open(a.out, 'w') as f: json.dump(dict(result=rows, versions=ver), f)
    emit(dict(result=[{k: v for k, v in s.items() if k != 'versions'} for s in rows]))

if __name__ == '__main__': main()
