"""What the perf tools share: the child-process runner, the versions line, where the peers' anchors.py is."""
import json, os, platform, subprocess, time
HERE = os.path.dirname(os.path.abspath(__file__))

def stream(cmd, timeout, env=None):
    "Run cmd, echo its stdout lines as they come, return (its JSON lines, error or None); killed after `timeout` s"
    import queue, threading
    lines, err = [], None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    q = queue.Queue()
    def reader():
        for line in proc.stdout: q.put(line)
        q.put(None)
    threading.Thread(target=reader, daemon=True).start()
    deadline, t = time.time() + timeout, time.time()
    def take(line):
        print(line, end='', flush=True)
        if line.startswith('{'):
            try: lines.append(json.loads(line))
            except json.JSONDecodeError: pass
    while True:
        try: line = q.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            proc.kill(); err = f'timeout after {time.time() - t:.0f} s'
            proc.wait()
            while True:                                  # what it printed before it was killed
                try: line = q.get(timeout=2)
                except queue.Empty: break
                if line is None: break
                take(line)
            break
        if line is None: break
        take(line)
    rc = proc.wait()
    if rc and not err: err = f'exit {rc}'
    return lines, err

def versions(device):
    "Device, versions and commit of a run, for its report"
    import importlib.metadata as md, torch
    def v(p):
        try: return md.version(p)
        except md.PackageNotFoundError: return None
    d = dict(torch=torch.__version__, **{p: v(p) for p in ('transformers', 'triton', 'peft', 'bitsandbytes', 'unsloth', 'unsloth_zoo')},
             python=platform.python_version())
    if device == 'cuda' and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, gpu_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else: d.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try: d['commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception: d['commit'] = None
    return {k: x for k, x in d.items() if x is not None}

def peer_script():
    for p in (os.environ.get('PEER_ANCHORS'), os.path.join(os.getcwd(), '.peer', 'anchors.py'), os.path.join(os.getcwd(), '..', 'shared', 'peer', 'anchors.py')):
        if p and os.path.exists(p): return p
    return None
