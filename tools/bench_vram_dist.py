#!/usr/bin/env python
"""Check `qlora_course.peak.estimate` per GPU under DDP and FSDP2 (full shard, shard-grad-op, CPU offload).

    torchrun --nproc_per_node 2 tools/bench_vram_dist.py            # GPUs (NCCL)
    torchrun --nproc_per_node 2 tools/bench_vram_dist.py --cpu      # smoke test of the script only (gloo): CPU peaks
                                                                    # say nothing here (MemoryTracker cannot see into FSDP's
                                                                    # DTensors, CPU offload needs a GPU)

Each rank builds the same randomly initialised model of a real shape, wraps it (DDP, or FSDP2's `fully_shard` on
every decoder layer and then on the root), trains a few steps with the loop of `memory.measure` (no gradient
clipping) and records its peak of `torch.cuda.max_memory_allocated()`. Rank 0 writes vram_bench_dist.json and
.md into --out (default $OUT, else the current folder) with the largest peak over the ranks; the run shown
in nbs/03a_peak.ipynb is tools/vram_results/2xh200_dist.json.
"""
import argparse, gc, json, os, sys, time, warnings
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import torch, torch.distributed as dist
from qlora_course import memory
from qlora_course.peak import estimate
from qlora_course.core import env_report
warnings.filterwarnings('ignore')

# (model, method, sharding, batch, seq, gradient checkpointing, cpu offload)
GRID = [
    ('llama-3.2-1b', 'full', 'ddp', 2, 2048, True, False),
    ('llama-3.2-1b', 'lora', 'ddp', 4, 2048, False, False),
    ('llama-3.2-1b', 'full', 'fsdp', 2, 2048, True, False),
    ('llama-3.2-1b', 'full', 'fsdp', 4, 2048, False, False),
    ('llama-3.2-1b', 'full', 'fsdp_grad_op', 2, 2048, True, False),
    ('llama-3.2-1b', 'full', 'fsdp', 2, 2048, True, True),
    ('llama-3.2-3b', 'full', 'fsdp', 1, 2048, True, False),
    ('tinyllama-1.1b', 'full', 'ddp', 1, 512, True, False),
    ('tinyllama-1.1b', 'full', 'fsdp', 1, 512, True, False),
    ('tinyllama-1.1b', 'full', 'fsdp_grad_op', 1, 512, True, False),
    ('tinyllama-1.1b', 'full', 'fsdp', 1, 512, True, True),
]
TINY = [(dict(model_type='llama', hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1500, tie_word_embeddings=True), m, s, 2, 256, g, o) for m, s, g, o in
        [('full', 'ddp', True, False), ('lora', 'ddp', False, False), ('full', 'fsdp', True, False),
         ('full', 'fsdp', False, False), ('full', 'fsdp_grad_op', True, False), ('full', 'fsdp', True, True)]]

def wrap(model, sharding, offload, device):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.fsdp import fully_shard, CPUOffloadPolicy, OffloadPolicy
    if sharding == 'ddp': return DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)
    kw = dict(reshard_after_forward=sharding == 'fsdp', offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    for layer in model.model.layers: fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cpu', action='store_true'); p.add_argument('--steps', type=int, default=3)
    p.add_argument('--out', default=os.environ.get('OUT', '.'))
    p.add_argument('--rows', default=None, help='comma-separated indices of the grid rows to run (default: all)')
    a = p.parse_args()
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if a.cpu: device = torch.device('cpu'); dist.init_process_group('gloo')
    else: device = torch.device('cuda', int(os.environ['LOCAL_RANK'])); torch.cuda.set_device(device); dist.init_process_group('nccl')
    rows, t0 = [], time.time()
    grid = TINY if a.cpu else GRID
    if a.rows: grid = [grid[int(i)] for i in a.rows.split(',')]
    for model, method, sharding, batch, seq, ckpt, offload in grid:
        name = model if isinstance(model, str) else 'tiny-llama'
        est = estimate(model, method, batch, seq, ckpt, n_gpus=world, sharding=sharding, cpu_offload=offload,
                       device=device.type)
        try:
            m = memory.prepare_run(model, method, ckpt, device=device, seed=0)
            m = wrap(m, sharding, offload, device)
            r = memory.measure(m, batch, seq, steps=a.steps, clip=False, device=device)
            peak = torch.tensor([float(r['peak'])], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            row = dict(model=name, method=method, sharding=sharding, cpu_offload=offload, batch=batch, seq=seq,
                       grad_ckpt=ckpt, gpus=world, measured=peak.item(), predicted=est.peak, error=est.peak / peak.item() - 1,
                       predicted_phase=est.phase, predicted_terms=dict(est.terms), measured_phases=r['phases'],
                       static=r['static'], losses=r['losses'])
        except Exception as e:
            row = dict(model=name, method=method, sharding=sharding, cpu_offload=offload, failed=repr(e)[:400])
        del m; gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        rows.append(row)
        if rank == 0: print(json.dumps({k: v for k, v in row.items() if k != 'measured_phases'}, default=str), flush=True)
    if rank == 0:
        env = env_report(); env['command'] = 'torchrun --nproc_per_node %d tools/bench_vram_dist.py %s' % (world, ' '.join(sys.argv[1:]))
        json.dump(dict(env=env, rows=rows), open(os.path.join(a.out, 'vram_bench_dist.json'), 'w'), indent=1, default=str)
        lines = ['| model | method | sharding | batch x seq | ckpt | predicted GiB | measured GiB | error | predicted peak at |',
                 '|---|---|---|---|---|---|---|---|---|']
        for r in rows:
            if 'failed' in r: lines.append(f"| {r['model']} | {r['method']} | {r['sharding']} | failed: {r['failed'][:80]} |"); continue
            sh = r['sharding'] + (' + CPU offload' if r['cpu_offload'] else '')
            lines.append(f"| {r['model']} | {r['method']} | {sh} over {r['gpus']} | {r['batch']} x {r['seq']} | "
                         f"{'on' if r['grad_ckpt'] else 'off'} | {r['predicted'] / 2**30:.2f} | {r['measured'] / 2**30:.2f} | "
                         f"{100 * r['error']:+.1f}% | {r['predicted_phase']} |")
        md = '\n'.join(lines); open(os.path.join(a.out, 'vram_bench_dist.md'), 'w').write(md + '\n'); print(md)
        print(f'{time.time() - t0:.0f} s')
    dist.destroy_process_group()

if __name__ == '__main__':
    main()
