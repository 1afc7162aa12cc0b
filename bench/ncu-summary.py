"""Summarises an Nsight Compute CSV (`ncu --csv ... > FILE`): one line per kernel launch in launch
order (its metrics), then per kernel name the launches, total and mean of gpu__time_duration.

    python3 bench/ncu-summary.py FILE [--json OUT] [--min-us X] [--last N] [--beyond FILE0]
    python3 bench/ncu-summary.py FILE --source [--top N]

--min-us: print only launches at least X microseconds long (the totals count every launch);
--all: every metric of each launch, a line each; --last N: only the last N launches (the totals too); --beyond FILE0: only the launches past as many
as FILE0 has (a run of 2 iterations beyond one of 1: the second iteration's launches). --json writes {kernels: [...], byName: [...]}.
--source: FILE is ncu's source page (`--page source --print-source sass --csv`, SourceCounters):
its SASS lines by warp-state samples, the top N (25). gpu-run.sh's NCU=1 step runs it on the grouped GEMM's and the layer's profiles (issue 19).
"""
import csv
import io
import json
import sys


def short(name):
    """A kernel's name without its parameter list (ncu prints C++ signatures for templates)."""
    return name.split('(')[0].strip()


def parse(path):
    text = open(path, encoding='utf-8', errors='replace').read()
    # ncu prints its own "==PROF==" lines and the program's output around the CSV
    lines = [l for l in text.splitlines() if l.startswith('"')]
    launches = {}
    for row in csv.DictReader(io.StringIO('\n'.join(lines))):
        if 'ID' not in row or row.get('Metric Name') is None:
            continue
        k = launches.setdefault(int(row['ID']), {'id': int(row['ID']), 'name': short(row['Kernel Name']), 'grid': row.get('Grid Size'),
                                                  'block': row.get('Block Size'), 'metrics': {}})
        v = row['Metric Value'].replace(',', '')
        try:
            v = float(v)
        except ValueError:
            pass
        unit = row.get('Metric Unit', '')
        if row['Metric Name'] in ('gpu__time_duration.sum', 'Duration') and isinstance(v, float):
            v = v * {'ns': 1e-3, 'nsecond': 1e-3, 'us': 1.0, 'usecond': 1.0, 'ms': 1e3, 'msecond': 1e3, 's': 1e6, 'second': 1e6}[unit]
            k['us'] = v
        k['metrics'][row['Metric Name']] = v
    return [launches[i] for i in sorted(launches)]


def source_lines(path, top):
    """ncu's source page: the SASS lines with the most warp-state samples, as shares of all, each
    with its two largest stall reasons; and the stall reasons over the whole kernel."""
    lines = [l for l in open(path, encoding='utf-8', errors='replace') if l.startswith('"')]
    # ncu prints a "Kernel Name" line before the table's header
    start = next((i for i, l in enumerate(lines) if l.startswith('"Address"')), None)
    if start is None:
        print(f'ncu-summary: no source table (a header starting with "Address") in {path}')
        return 1
    rows = list(csv.DictReader(io.StringIO(''.join(lines[start:]))))
    if not rows:
        print(f'ncu-summary: no source rows in {path}')
        return 1
    col = next((c for c in rows[0] if c and 'Stall Sampling (All' in c), None)
    if col is None:
        print(f'ncu-summary: no sampling column in {path}: {list(rows[0])}')
        return 1
    num = lambda v: float((v or '0').replace(',', '')) if (v or '0').replace(',', '').replace('.', '', 1).isdigit() else 0.0
    stalls = [c for c in rows[0] if c and c.startswith('stall_') and 'Not Issued' not in c]
    total = sum(num(r[col]) for r in rows) or 1
    reasons = sorted(((sum(num(r[s]) for r in rows), s) for s in stalls), reverse=True)
    print(f'  {len(rows)} SASS lines, {total:.0f} samples; by reason: ' + ', '.join(f'{s[6:]} {100 * v / total:.1f}%' for v, s in reasons[:6]))
    print(f'  the {top} lines with the most samples (index, share, instruction, its two largest reasons):')
    for i, r in sorted(enumerate(rows), key=lambda ir: -num(ir[1][col]))[:top]:
        two = sorted(((num(r[s]), s[6:]) for s in stalls), reverse=True)[:2]
        why = ', '.join(f'{s} {100 * v / total:.1f}%' for v, s in two if v > 0)
        print(f"    {i:5d} {100 * num(r[col]) / total:5.1f}%  {r.get('Source', '').strip()[:60]:60s} {why}")
    return 0


def main(argv):
    path = argv[0]
    opt = lambda name, d=None: argv[argv.index(name) + 1] if name in argv else d
    if '--source' in argv:
        return source_lines(path, int(opt('--top', '25')))
    min_us = float(opt('--min-us', '0'))
    last = int(opt('--last', '0'))
    ks = parse(path)
    if not ks:
        print(f'ncu-summary: no kernels in {path}')
        return 1
    if opt('--beyond'):
        last = len(ks) - len(parse(opt('--beyond')))
        if last <= 0:
            print(f'ncu-summary: {path} has no launches beyond those of {opt("--beyond")}')
            return 1
    if last:
        ks = ks[-last:]
    for k in ks:
        if k.get('us', 0) < min_us:
            continue
        if '--all' in argv:
            print(f"  #{k['id']:<5} {k.get('us', 0):9.1f} us  {k['name'][:90]} grid {k['grid']} block {k['block']}")
            for m, v in k['metrics'].items():
                print(f'      {m:<70} {v}')
            continue
        extra = ' '.join(f'{m.split(".")[0].replace("__", ":")}={v:.1f}' if isinstance(v, float) else f'{m}={v}'
                         for m, v in k['metrics'].items() if m != 'gpu__time_duration.sum')
        print(f"  #{k['id']:<5} {k.get('us', 0):9.1f} us  {k['name'][:70]:<70} grid {k['grid']} block {k['block']} {extra}")
    by = {}
    for k in ks:
        b = by.setdefault(k['name'], {'name': k['name'], 'launches': 0, 'us': 0.0})
        b['launches'] += 1
        b['us'] += k.get('us', 0.0)
    total = sum(b['us'] for b in by.values())
    print(f'  by kernel ({len(ks)} launches, {total:.1f} us in all):')
    for b in sorted(by.values(), key=lambda b: -b['us']):
        print(f"    {b['us']:10.1f} us {100 * b['us'] / total if total else 0:5.1f}%  {b['launches']:5d} x  {b['name'][:90]}")
    out = opt('--json')
    if out:
        json.dump({'source': path, 'kernels': ks, 'byName': sorted(by.values(), key=lambda b: -b['us']), 'totalUs': total}, open(out, 'w'), indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
