"""A child process whose JSON lines are echoed as they come and collected, killed after a timeout (the perf tools' runner)."""
import json, subprocess, time

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
