#!/usr/bin/env python
"""DeepSpeed ZeRO-3 (through accelerate) beside FSDP2 (`fsdp.shard_model` + `core.train_steps`) on the same randomly
initialised model, one GPU, world size 1. Each side: fp32 master weights and AdamW states, bf16 compute, gradient
clipping 1.0, 4 steps on the same random batch; prints a markdown table of losses and peak memory.

    torchrun --nproc_per_node 1 tools/ds_zero3.py [--shape qwen2.5-0.5b] [--seq 1024]

ZeRO-3 runs in accelerate's loop (`accelerator.backward`, the engine's step): it is the peer here, not the course's code.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import torch

def build(shape):
    from transformers import AutoModelForCausalLM
    from qlora_course.core import set_seed
    from qlora_course.shapes import get_config
    set_seed(0)
    with torch.device('cuda'): return AutoModelForCausalLM.from_config(get_config(shape), dtype=torch.float32)

def zero3(shape, x, steps):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    cfg = {'train_micro_batch_size_per_gpu': x.shape[0], 'gradient_accumulation_steps': 1, 'gradient_clipping': 1.0,
           'zero_optimization': {'stage': 3}, 'bf16': {'enabled': True}, 'zero_allow_untested_optimizer': True}
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model = build(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, opt = acc.prepare(model, opt)
    model.train(); losses = []
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t0 = time.time()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss); opt.step(); opt.zero_grad(); losses.append(loss.item())
    torch.cuda.synchronize()
    return dict(path='DeepSpeed ZeRO-3 (accelerate)', losses=losses, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                s_per_step=(time.time() - t0) / steps)

def fsdp2(shape, x, steps):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from qlora_course.core import train_steps
    from qlora_course.ddp import setup
    from qlora_course.fsdp import shard_model
    setup('nccl')
    model = shard_model(build(shape), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t0 = time.time()
    losses = train_steps(model, [{'input_ids': x, 'labels': x}], steps, lr=1e-5, schedule='constant', progress=False)
    torch.cuda.synchronize()
    return dict(path='FSDP2 (fsdp.shard_model + train_steps)', losses=list(losses), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                s_per_step=(time.time() - t0) / steps)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', default='qwen2.5-0.5b'); p.add_argument('--seq', type=int, default=1024)
    p.add_argument('--steps', type=int, default=4); p.add_argument('--which', default='both', choices=('both', 'zero3', 'fsdp2'))
    a = p.parse_args()
    torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    from qlora_course.shapes import get_config
    vocab = get_config(a.shape).get_text_config().vocab_size
    x = torch.randint(4, vocab, (1, a.seq), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []
    if a.which in ('both', 'fsdp2'): rows.append(fsdp2(a.shape, x, a.steps)); torch.cuda.empty_cache()
    if a.which in ('both', 'zero3'): rows.append(zero3(a.shape, x, a.steps))
    print(f'{a.shape}, batch 1 x {a.seq}, world size 1\n')
    print('| path | losses | peak GiB | s/step |\n|---|---|---|---|')
    for r in rows: print(f"| {r['path']} | {', '.join(f'{l:.4f}' for l in r['losses'])} | {r['peak_gib']:.2f} | {r['s_per_step']:.3f} |")
    print('\n' + json.dumps(rows))

if __name__ == '__main__': main()
