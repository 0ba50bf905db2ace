#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb, so the two never drift (CI fails if they differ).

nbdev's own `nbdev_readme` needs Quarto; this does the same job for our index without it: markdown cells
are copied, code cells become ```python blocks followed by their text output, and cells marked
`#| hide` are left out.
Usage: python tools/make_readme.py [--check]
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb):
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide') or '\n#| hide' in src.split('\n\n')[0]: continue
        if c['cell_type'] == 'markdown': parts.append(src)
        elif c['cell_type'] == 'code':
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
            parts.append(f'```python\n{code}\n```')
            for o in c.get('outputs', []):
                text = ''.join(o.get('text', '') or o.get('data', {}).get('text/plain', ''))
                if text.strip(): parts.append('    ' + text.strip().replace('\n', '\n    '))
    return '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(parts) + '\n'

def main():
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    text, readme = render(nb), root/'README.md'
    if '--check' in sys.argv:
        ok = readme.exists() and readme.read_text() == text
        print('README.md is up to date' if ok else 'README.md differs from nbs/index.ipynb: run tools/make_readme.py')
        sys.exit(0 if ok else 1)
    readme.write_text(text)

if __name__ == '__main__': main()
