#!/usr/bin/env python
"""Execute notebooks in place so that their committed outputs are fresh, small and honest.

Cells carrying one of settings.ini's test flags (`notest cuda multigpu slow`) are skipped and keep the
outputs they already have, unless the flag is named in --flags: on a GPU machine,
`python tools/run_nb.py nbs/04c_bnb_exact.ipynb --flags "cuda"` refreshes the GPU cells' outputs too.
Progress bars are turned off (TQDM_DISABLE=1) so no bar ends up in a notebook. Each written notebook is
then cleaned with nbdev_clean. Stops at the first failing cell and leaves that notebook unchanged.

To bring back GPU outputs from a copy executed on a GPU machine (`tools/gpu_test.sh --execute`), pass
`--outputs-from DIR`: the flagged cells of each notebook take their outputs from DIR/<same name>.ipynb
(matched by cell id) before the rest is executed here. GPU cells should print the device they ran on.

Usage: python tools/run_nb.py NOTEBOOK [NOTEBOOK ...] [--flags "cuda multigpu"] [--outputs-from DIR] [--only ID,ID,...]
"""
import argparse, os, re, sys
from pathlib import Path

os.environ.setdefault('TQDM_DISABLE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'module://matplotlib_inline.backend_inline')

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config
from nbdev.clean import clean_nb

def cell_flags(source):
    "The `#| word` directives at the top of a cell's source"
    flags = set()
    for line in source.splitlines():
        m = re.match(r'\s*#\|\s*(.*)', line)
        if not m: break
        flags.update(m.group(1).split())
    return flags

def copy_flagged_outputs(nb, other):
    "Give `nb`'s flagged cells the outputs of the cells with the same id in notebook `other`"
    flagged = set(get_config().tst_flags.split())
    by_id = {c.get('id'): c for c in read_nb(other).cells}
    n = 0
    for c in nb.cells:
        if c.cell_type == 'code' and cell_flags(c.source) & flagged and c.get('id') in by_id:
            c.outputs = by_id[c['id']].get('outputs', []); n += 1
    return n

class Shell(CaptureShell):
    "execnb's shell, except that a cell ending in `;` keeps its printed output, as it does in Jupyter"
    def _run(self, raw_cell, *args, **kwargs):
        # execnb drops the stdout of a cell whose source ends with ';' (Jupyter drops only the last value's display).
        # With a `pass` after it, the last line's value is still not displayed, and what the cell printed stays.
        if raw_cell.rstrip().endswith(';'): raw_cell = raw_cell + '\npass'
        return super()._run(raw_cell, *args, **kwargs)

def run_notebook(path, force=(), outputs_from=None, only=None):
    skip = set(get_config().tst_flags.split()) - set(force)
    nb = read_nb(path)
    if outputs_from:
        other = Path(outputs_from) / Path(path).name
        if not other.exists(): sys.exit(f'--outputs-from: {other} does not exist')
        print(f'  {copy_flagged_outputs(nb, other)} flagged cells take their outputs from {other}')
    def preproc(cell):
        if cell.cell_type != 'code' or (only and cell.get('id') not in only): return True
        flags = cell_flags(cell.source)
        if flags & skip or {'eval:', 'false'} <= flags: return True   # `#| eval: false`: never run here (nbdev_test skips it too)
        cell.outputs = []
        return False
    shell = Shell(path)
    old = os.getcwd()
    try:
        os.chdir(Path(path).parent)
        shell.run_all(nb, exc_stop=True, preproc=preproc)
    finally: os.chdir(old)
    clean_nb(nb)
    write_nb(nb, path)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('notebooks', nargs='+', help='notebooks to execute in place')
    p.add_argument('--flags', default='', help='space-separated test flags whose cells should run too, e.g. "cuda multigpu"')
    p.add_argument('--outputs-from', default=None, help='folder of GPU-executed copies whose flagged-cell outputs to keep')
    p.add_argument('--only', default=None, help='comma-separated cell ids: run only these cells (the others keep their outputs), e.g. the '
                   'setup cells a notebook\'s GPU cells need, and the GPU cells')
    a = p.parse_args()
    for fn in a.notebooks:
        print(f'running {fn}', flush=True)
        run_notebook(Path(fn).resolve(), a.flags.split(), a.outputs_from, a.only and set(a.only.split(',')))
    print('done')

if __name__ == '__main__': main()
