#!/usr/bin/env python
"""FSDP+QLoRA on one GPU: the course's FSDP2 path (`qlora_course.fsdp`, world size 1) beside the Hugging Face FSDP1 recipe
(`hf_fsdp_qlora.py` from ../shared/peer) on the same random Llama-3-8B-shaped checkpoint, in one call; and QLoRA of a
Llama-2-70B-shaped model on one GPU with CPU offload.

    python tools/bench_fsdp.py all [--peer .peer/hf_fsdp_qlora.py]       # 8B checkpoint, ours, the recipe: JSON lines, then a table
    python tools/bench_fsdp.py ours --model /tmp/llama-8b-random [--offload] [--runs '[[1, 2048], [4, 2048]]']
    python tools/bench_fsdp.py ours --model random:llama-2-70b --offload --runs '[[1, 2048]]'
    python tools/bench_fsdp.py all --gpus 2 --runs '[[1, 2048]]' --train_type qlora,qdora   # two GPUs (one process each)
    python tools/bench_fsdp.py ours --model random:llama-2-70b --gpus 2 --runs '[[2, 2048]]' [--offload] [--cap_gib 15]

Every run: NF4 + double quantization, LoRA r=16 alpha 32 on q,k,v,o,gate,up,down, gradient checkpointing, torch AdamW lr 1e-4,
no clipping, labels = inputs, 3 warm-up then 5 timed steps; tokens/s over the timed steps; peak GPU memory =
max_memory_allocated over the steps; CPU memory = the process's peak RSS (after loading, and at the end). With several
processes, peak GPU memory and CPU RSS are the largest over the ranks (per GPU, per process). Ours builds the
model layer by layer from the safetensors files (or from seeded random weights for `random:` shapes), sharding each layer as
it is built. The recipe's checkpoint (/tmp/llama-8b-random) is written by the peer's own hf_qlora_baseline.py.
"""
import argparse, json, os, subprocess, sys, time
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
CKPT = '/tmp/llama-8b-random'

def ours(model, runs, offload, train_type='qlora', warm=3, steps=5, cap_gib=None):
    "One process under torchrun: build the sharded QLoRA model and time `train_steps` on random tokens (within `cap_gib` of GPU memory)"
    import torch
    from qlora_course.core import train_steps, reset_peak_rss, peak_rss, set_seed
    from qlora_course.ddp import setup
    from qlora_course.fsdp import build_sharded, shard_fn, make_mesh
    rank, world, device = setup()
    if cap_gib:   # the caching allocator may reserve no more than this: as on a GPU of that size, less the CUDA context
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory, device)
    set_seed(0)
    shard = shard_fn(make_mesh('full_shard', world, device.type), 'full_shard', torch.bfloat16, offload)
    reset_peak_rss(); t = time.time()
    m = build_sharded(model, train_type, shard, device, torch.bfloat16, 16, 32, 0.0, TARGETS, use_gradient_checkpointing=True)
    m.compute_device = device
    load_s, load_rss = time.time() - t, peak_rss()
    vocab = m.config.vocab_size
    for bs, seq in runs:
        x = torch.randint(4, vocab, (bs, seq), device=device)
        stamps = []
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        losses = train_steps(m, lambda i: {'input_ids': x, 'labels': x}, warm + steps, lr=1e-4, grad_clip=0, progress=False,
                             on_step=lambda loop: stamps.append(time.perf_counter()))
        dt = stamps[-1] - stamps[warm - 1]
        mine = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), load_rss, peak_rss()]
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        peak, reserved, load_rss_max, rss = (max(e[i] for e in every) for i in range(4))
        if rank == 0: emit(dict(path=f'course FSDP2 {train_type}' + (' + CPU offload' if offload else '') + (f', capped at {cap_gib} GiB' if cap_gib else ''), model=model, world=world, bs=bs, seq=seq,
                              tokens_per_s=round(world * bs * seq * steps / dt), step_s=round(dt / steps, 2),
                              peak_gib=round(peak / 2**30, 2), reserved_gib=round(reserved / 2**30, 2),
                              load_s=round(load_s), load_rss_gib=round(load_rss_max / 2**30, 1), rss_gib=round(rss / 2**30, 1),
                              loss=round(losses[-1], 3)))

def emit(row):
    "Print a result row as a JSON line, and log it"
    print(json.dumps(row), flush=True)
    log(row)

def log(row):
    "With BENCH_LOG set, append the row there too, so that it is kept if a later run fails"
    if os.environ.get('BENCH_LOG'):
        with open(os.environ['BENCH_LOG'], 'a') as f: f.write(json.dumps(row) + '\n')

def torchrun(args, env=None, nproc=1):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode: sys.exit(f'{" ".join(args)} failed (exit status {out.returncode}):\n{out.stderr[-4000:]}')
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]

def make_checkpoint(peer_dir):
    "The recipe's random Llama-3-8B-shaped checkpoint, written by the peer's own script (skipped when it exists)"
    if os.path.exists(f'{CKPT}/config.json'): return
    subprocess.run([sys.executable, os.path.join(peer_dir, 'hf_qlora_baseline.py')], env={**os.environ, 'SIZE': '8b', 'RUNS': '[]'},
                   check=True, capture_output=True)

def table(rows):
    "Markdown table, with tokens/s and memory as ratios of the recipe's at the same batch"
    hf = {r['bs']: r for r in rows if r['path'].startswith('Hugging Face')}
    out = ['| path | batch x seq | tokens/s | peak GPU GiB | CPU RSS GiB (after load / peak) | load s | tokens/s vs recipe | peak vs recipe |',
           '|---|---|---|---|---|---|---|---|']
    for r in rows:
        h = hf.get(r['bs'])
        ratio = f"{r['tokens_per_s'] / h['tokens_per_s']:.2f}x | {r['peak_gib'] / h['peak_gib']:.2f}x" if h and h is not r else '- | -'
        out.append(f"| {r['path']} | {r['bs']} x {r['seq']} | {r['tokens_per_s']:,} | {r['peak_gib']:.2f} | "
                   f"{r.get('load_rss_gib', '-')} / {r['rss_gib']} | {r['load_s']} | {ratio} |")
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('what', choices=('all', 'ours'))
    p.add_argument('--model', default=CKPT, help='a checkpoint folder or random:<catalog shape>')
    p.add_argument('--runs', default='[[1, 2048], [4, 2048]]', help='JSON list of [batch, seq]')
    p.add_argument('--offload', action='store_true', help='CPU offload of the sharded weights and optimizer')
    p.add_argument('--cap_gib', type=float, help='our path only: let the allocator reserve at most this much GPU memory per GPU, as on a smaller card')
    p.add_argument('--gpus', type=int, default=1, help='processes, one per GPU (batch sizes are per process); not --nproc, which torchrun would take for its own')
    p.add_argument('--train_type', default='qlora', help='qlora, qdora, or both as qlora,qdora (our path only; the recipe is QLoRA)')
    p.add_argument('--peer', default='.peer/hf_fsdp_qlora.py', help="the Hugging Face FSDP1 recipe (a copy of ../shared/peer/hf_fsdp_qlora.py)")
    a = p.parse_args()
    runs = json.loads(a.runs)
    if a.what == 'all' and not os.path.exists(a.peer):
        p.error(f"{a.peer} is not here: the recipe comes from the team's peers (mkdir -p .peer && cp ../shared/peer/*.py .peer/), "
                "or pass --peer PATH")
    if set(a.train_type.split(',')) - {'qlora', 'qdora'}: p.error(f'--train_type: qlora, qdora or qlora,qdora, not {a.train_type}')
    if a.what == 'ours':
        if 'RANK' not in os.environ:   # start ourselves under torchrun: --gpus processes, NCCL
            for r in torchrun([__file__, *sys.argv[1:]], nproc=a.gpus): print(json.dumps(r), flush=True)
        else:
            for t in a.train_type.split(','): ours(a.model, runs, a.offload, t, cap_gib=a.cap_gib)
        return
    make_checkpoint(os.path.dirname(a.peer))
    rows = []
    for t in a.train_type.split(','):
        rows += torchrun([__file__, 'ours', '--model', CKPT, '--runs', a.runs, '--train_type', t], nproc=a.gpus)
    for bs, seq in runs:
        assert seq == 2048, 'the recipe runs sequences of 2048'
        ranks = torchrun([a.peer], env=dict(ACCELERATE_USE_FSDP='1', FSDP_CPU_RAM_EFFICIENT_LOADING='1', OFFLOAD='0', BS=str(bs)), nproc=a.gpus)
        if not ranks: continue
        r = next((r for r in ranks if not r.get('rank', 0)), ranks[0])      # one row per run: rank 0's, with the largest
        rows.append(dict(path='Hugging Face FSDP1 recipe', model=CKPT, world=r['world'], bs=r['bs'], seq=r['seq'],   # memory of any rank
                         tokens_per_s=r['tokens_per_s_total'], peak_gib=max(x['peak_gib'] for x in ranks),
                         reserved_gib=max(x['reserved_gib'] for x in ranks), load_s=r['load_s'],
                         rss_gib=max(x['cpu_maxrss_gib'] for x in ranks), loss=r['loss']))
        log(rows[-1])
    for r in rows: print(json.dumps(r), flush=True)
    print(table(rows))

if __name__ == '__main__': main()
