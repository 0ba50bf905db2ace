"""Which configurations of speed_up capture as a CUDA graph (a debugging aid for CUDAGraphStep): each in its own process.
    python tools/perf/debug_graphs.py            # all, a line each
    python tools/perf/debug_graphs.py one MODE COMPILE SKIP"""
import subprocess, sys, traceback
def one(mode, compile_, skip, compiled_layers='0'):
    import torch
    import qlora_course.fast as qf
    from qlora_course.core import set_seed
    from qlora_course.train import prepare_model
    set_seed(0)
    m, _ = prepare_model('tiny:llama', 'qlora', 'course', lora_rank=8, lora_alpha=16, use_gradient_checkpointing=True, precision='bf16', device='cuda')
    fn = qf.speed_up(m, graphs=False, compile=compile_ == '1', skip_unused=skip == '1')
    g = qf.CUDAGraphStep(fn, capture_error_mode=mode, compiled_layers=compiled_layers == '1')
    x = torch.randint(4, m.config.vocab_size, (2, 64), device='cuda')
    m.train()
    try:
        for _ in range(3): l = g(m, {'input_ids': x, 'labels': x}); m.zero_grad(set_to_none=True)
        print('OK', mode, compile_, skip, float(l))
    except Exception:
        print('FAIL', mode, compile_, skip); traceback.print_exc()
if __name__ == '__main__':
    if sys.argv[1:2] == ['one']: one(*sys.argv[2:6])
    else:
        import os
        for args, logs in ((('thread_local', '1', '1', '1'), 'recompiles'), (('thread_local', '1', '1', '0'), ''), (('thread_local', '0', '1', '0'), '')):
            r = subprocess.run([sys.executable, __file__, 'one', *args], capture_output=True, text=True, timeout=150, env=dict(os.environ, **({'TORCH_LOGS': logs} if logs else {})))
            if logs: print('\n'.join(l[:300] for l in (r.stdout + r.stderr).splitlines() if 'ecompil' in l or 'guard' in l)[:4000])
            out = r.stdout + r.stderr
            print(' '.join(args), '->', 'OK' if 'OK ' in r.stdout else 'FAIL')
            if 'OK ' not in r.stdout:
                lines = [l for l in out.splitlines() if 'Warning' not in l and 'warn(' not in l]
                print('\n'.join(lines[-40:]))
