#!/usr/bin/env python
"""Execute notebooks in place so that their committed outputs are fresh, small and honest.

Cells carrying one of settings.ini's test flags (`notest cuda multigpu slow`) are skipped and keep the
outputs they already have, unless the flag is named in --flags: on a GPU machine,
`python tools/run_nb.py nbs/04_quant.ipynb --flags "cuda"` refreshes the GPU cells' outputs too.
Progress bars are turned off (TQDM_DISABLE=1) so no bar ends up in a notebook. Each written notebook is
then cleaned with nbdev_clean. Stops at the first failing cell and leaves that notebook unchanged.

Usage: python tools/run_nb.py NOTEBOOK [NOTEBOOK ...] [--flags "cuda multigpu"]
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

def run_notebook(path, force=()):
    skip = set(get_config().tst_flags.split()) - set(force)
    nb = read_nb(path)
    def preproc(cell):
        if cell.cell_type != 'code': return True
        if cell_flags(cell.source) & skip: return True
        cell.outputs = []
        return False
    shell = CaptureShell(path)
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
    a = p.parse_args()
    for fn in a.notebooks:
        print(f'running {fn}', flush=True)
        run_notebook(Path(fn).resolve(), a.flags.split())
    print('done')

if __name__ == '__main__': main()
