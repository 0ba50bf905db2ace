#!/usr/bin/env python
"""Single-GPU fine-tuning throughput and peak memory: the course's QLoRA path (`prepare_model(backend='course')`) beside
the Hugging Face recipe (`backend='hf'`: bitsandbytes + prepare_model_for_kbit_training + PEFT), both through
`core.train_steps`, on a randomly initialised model of a catalog shape (no download), each backend in its own process.

    python tools/bench_train.py all [--shape llama-3-8b] [--runs '[[1, 2048], [4, 2048]]'] [--train_type qlora]
    python tools/bench_train.py make --shape llama-3-8b      # only write the random checkpoint
    python tools/bench_train.py run --backend course ...     # one backend, JSON lines

Every run: LoRA r=16 alpha 32 on q,k,v,o,gate,up,down, dropout 0, torch AdamW lr 1e-4, gradient checkpointing
(non-reentrant), labels = inputs (loss on every token), 3 warm-up then 8 timed steps; peak = max_memory_allocated.
"""
import argparse, json, os, subprocess, sys, time
TARGETS = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'

def folder(shape): return os.environ.get('BENCH_CKPT', f'/tmp/random-{shape}')

def make(shape):
    import torch
    from transformers import AutoModelForCausalLM
    from qlora_course.shapes import get_config
    from qlora_course.models import course_tokenizer
    path = folder(shape)
    if os.path.exists(f'{path}/config.json'): return path
    t = time.time()
    with torch.device('cuda'): m = AutoModelForCausalLM.from_config(get_config(shape), dtype=torch.bfloat16)
    m.save_pretrained(path, max_shard_size='5GB'); del m; torch.cuda.empty_cache()
    course_tokenizer().save_pretrained(path)   # the ids are random; prepare_model only needs a tokenizer to load
    print(f'random {shape} checkpoint written in {time.time() - t:.0f} s', file=sys.stderr, flush=True)
    return path

def run(shape, backend, runs, train_type='qlora', warm=3, steps=8):
    import torch
    from qlora_course.core import set_seed, train_steps
    from qlora_course.train import prepare_model
    set_seed(0)
    t = time.time()
    model, _ = prepare_model(make(shape), train_type, backend, lora_rank=16, lora_alpha=32, lora_target_modules=TARGETS.split(','),
                             use_gradient_checkpointing=True, device='cuda')
    load = time.time() - t
    vocab = model.config.get_text_config().vocab_size
    for bs, seq in runs:
        x = torch.randint(4, vocab, (bs, seq), device='cuda')
        stamps = []
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        losses = train_steps(model, lambda i: {'input_ids': x, 'labels': x}, warm + steps, lr=1e-4, grad_clip=0, progress=False,
                             on_step=lambda loop: stamps.append(time.perf_counter()))
        dt = stamps[-1] - stamps[warm - 1]
        print(json.dumps(dict(backend=backend, train_type=train_type, shape=shape, bs=bs, seq=seq, load_s=round(load),
                              tokens_per_s=round(bs * seq * steps / dt), step_s=round(dt / steps, 3),
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                              reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2), loss=round(losses[-1], 3))), flush=True)

def table(rows):
    "Markdown table of the runs, with the course's rate and memory as ratios of the Hugging Face recipe's"
    by = {(r['backend'], r['bs'], r['seq']): r for r in rows}
    out = ['| path | batch x seq | tokens/s | peak GiB | tokens/s vs hf | peak vs hf |', '|---|---|---|---|---|---|']
    for r in rows:
        hf = by.get(('hf', r['bs'], r['seq']))
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {r['peak_gib'] / hf['peak_gib']:.2f}x" if hf else '- | -'
        out.append(f"| {r['backend']} ({r['train_type']}) | {r['bs']} x {r['seq']} | {r['tokens_per_s']:,} | {r['peak_gib']:.2f} | {ratio} |")
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('all', 'make', 'run'))
    p.add_argument('--shape', default='llama-3-8b')
    p.add_argument('--backend', default='course', choices=('course', 'hf'))
    p.add_argument('--train_type', default='qlora')
    p.add_argument('--runs', default='[[1, 2048], [4, 2048]]', help='JSON list of [batch, seq]')
    a = p.parse_args()
    runs = json.loads(a.runs)
    if a.what == 'make': print(make(a.shape)); return
    if a.what == 'run': run(a.shape, a.backend, runs, a.train_type); return
    make(a.shape)
    rows = []
    for backend in ('hf', 'course'):
        cmd = [sys.executable, __file__, 'run', '--shape', a.shape, '--backend', backend, '--runs', a.runs, '--train_type', a.train_type]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode: print(out.stderr[-3000:], file=sys.stderr); continue
        rows += [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
    print(table(rows))
    return rows

if __name__ == '__main__': main()
