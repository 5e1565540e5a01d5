"""Plots of a benchmark run (matplotlib, PNG), written to bench/plots/ next to RESULTS.md.

Drawn from the structure that report.py writes its tables from (`result`: `figures`,
`systems_run`, `oversubscription`, `block_size_sweep`, `meta`), so a plot shows the figures of
the table beside it:

- `headline.png`: cachefs, s3fs and rclone as a share of local-disk speed, on the rows that have
  a local-disk figure (README.md shows it);
- `scenarios-<unit>.png`: one grouped bar chart per unit of the main table (MiB/s, samples/s,
  files/s, seconds), every system that ran;
- `oversubscription.png`: per eviction policy and epoch, MiB/s and the SSD hit ratio;
- `block-size-sweep.png`: cold and warm MiB/s per block size, with the store requests.

`bench/run.py --write-results` draws the plots of its section from the run's own data and links
them from that section. `python bench/plots.py --from-results-md` rebuilds the structure from
the tables report.py wrote into RESULTS.md (machine-written, so parsing them is well defined; the
figures are the medians as the tables round them) and draws and links the plots of every section
found there: for a run whose JSON is gone. Parsing needs no matplotlib; drawing imports it, with
the headless Agg backend, on first use.

Known limits: only the tables are parsed, so plots drawn that way have no per-round values, and
ratios are recomputed from the rounded medians (they can differ from the table's in the last
digit); the CPU / peak RSS table is not plotted.
"""

import argparse
import logging
import re
import sys
import textwrap
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from bench import report  # noqa: E402
from bench.scenarios import ROW_BY_KEY, ROWS  # noqa: E402

log = logging.getLogger(__name__)

MiB = 1 << 20
RESULTS_MD = BENCH_DIR / 'RESULTS.md'
PLOTS_DIR = BENCH_DIR / 'plots'
DPI = 100

#: One colour per system, the same in every plot; cachefs the strongest.
COLOURS = {'local': '#9e9e9e', 'boto3': '#505050', 'cachefs': '#1f5fbf', 's3fs': '#f28e2b',
           'rclone': '#59a14f'}
#: Units of the main table, in the order of their charts, and the file each one goes to.
UNIT_FILES = {'MiB/s': 'scenarios-mib-s.png', 'samples/s': 'scenarios-samples-s.png',
              'files/s': 'scenarios-files-s.png', 's': 'scenarios-seconds.png'}
#: The headline's systems; boto3 has a figure only in the cold rows, and is in the unit charts.
HEADLINE_SYSTEMS = ('cachefs', 's3fs', 'rclone')
#: Pixel sizes (width, height) of each plot: figsize x DPI, fixed so that the README's layout
#: does not move from run to run.
SIZES = {'headline': (1000, 620), 'scenarios': (1100, 560), 'oversubscription': (1100, 460),
         'block-size-sweep': (1000, 440)}
#: Which files each RESULTS.md section owns (a redraw removes those it no longer draws).
SECTION_FILES = {'scenarios': ['headline.png', *UNIT_FILES.values(), 'oversubscription.png'],
                 'block-size-sweep': ['block-size-sweep.png']}

FROM_RUN = ('Plots drawn by `bench/run.py --write-results` (`bench/plots.py`) from the data of '
            'this run; the tables below hold the same figures.')
FROM_TABLES = ('Plots drawn from the tables of this section by `python bench/plots.py '
               '--from-results-md` (the raw JSON of this run was not kept, so they show the '
               'medians as the tables round them, and a ratio worked out from those can differ '
               'from the table\'s in the last digit); `bench/run.py --write-results` draws them '
               'from its own run\'s data.')


# -- reading RESULTS.md back --

def parse_number(text):
    """A cell as report.number, report.ratio_text or a percentage wrote it; '-' is None."""
    text = text.strip()
    if text == '-':
        return None
    if text.endswith('%'):
        return float(text[:-1]) / 100
    return float(text.rstrip('x').replace(',', ''))


def markdown_tables(text):
    """Every table in text: [(header cells, [row cells, ...]), ...] (the |---| line dropped)."""
    tables, block = [], []
    for line in text.split('\n') + ['']:
        if line.startswith('|'):
            block.append([cell.strip() for cell in line.strip().strip('|').split('|')])
        elif block:
            tables.append((block[0], block[2:]))
            block = []
    return tables


def main_figures(header, rows):
    """The main table -> (systems, {row key: {system: {'median': value}}})."""
    systems = header[2:header.index('cachefs vs local')]
    by_label = {row.label: row for row in ROWS}
    figures = {}
    for cells in rows:
        row = by_label[cells[0]]
        figures[row.key] = {system: {'median': parse_number(cell)}
                            for system, cell in zip(systems, cells[2:]) if cell != '-'}
    return systems, figures


#: Columns of the oversubscription and sweep tables: header -> (key, how to read the cell).
_TEXT, _INT, _NUMBER, _MIB = str, int, parse_number, lambda t: _scaled(t, MiB)
OVERSUB_COLUMNS = {
    'eviction': ('policy', _TEXT), 'epoch': ('epoch', _INT), 'MiB/s': ('mib_s', _NUMBER),
    'SSD hit ratio': ('ssd_hit_ratio', _NUMBER), 'bytes not from store':
    ('bytes_from_cache', _NUMBER), 'store MiB': ('store_bytes', _MIB),
    'SSD writes MiB': ('disk_write_bytes', _MIB), 'evictions': ('evictions', _NUMBER),
    'memory MiB': ('memory_used_bytes', _MIB), 'SSD used MiB': ('disk_used_bytes', _MIB),
    'daemon CPU s': ('cpu_s', _NUMBER)}
SWEEP_COLUMNS = {
    'block size': ('block_size', _TEXT), 'cold MiB/s': ('cold_mib_s', _NUMBER),
    'cold store requests': ('cold_store_requests', _NUMBER), 'cold CPU s': ('cold_cpu_s', _NUMBER),
    'warm MiB/s (page cache dropped)': ('warm_mib_s', _NUMBER),
    'warm CPU s': ('warm_cpu_s', _NUMBER), 'peak RSS MiB': ('peak_rss', _MIB)}


def _scaled(text, factor):
    value = parse_number(text)
    return None if value is None else value * factor


def entries(header, rows, columns):
    """A table of one of the COLUMNS kinds -> one entry per line (the median it shows)."""
    keys = [columns[name] for name in header]
    return [{key: read(cell) for (key, read), cell in zip(keys, cells)} for cells in rows]


def parse_section(text):
    """One section of RESULTS.md -> the parts of a `result` that its tables and bullets hold."""
    result = {'meta': {}, 'systems_run': [], 'figures': {}, 'oversubscription': [],
              'block_size_sweep': []}
    for key, pattern in (('command', r'^- command: `(.*)`$'), ('date', r'^- date: (\S+)'),
                         ('rounds', r'^- rounds: (\d+)')):
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            result['meta'][key] = int(match[1]) if key == 'rounds' else match[1]
    for header, rows in markdown_tables(text):
        if header[:2] == ['scenario', 'unit']:
            result['systems_run'], result['figures'] = main_figures(header, rows)
        elif header[0] == 'eviction':
            result['oversubscription'] = entries(header, rows, OVERSUB_COLUMNS)
        elif header[0] == 'block size':
            result['block_size_sweep'] = entries(header, rows, SWEEP_COLUMNS)
    return result


def sections_of(text):
    """RESULTS.md -> {section name: its text between the markers} for the sections present."""
    found = {}
    for name in report.SECTIONS:
        begin, end = f'<!-- {name}:begin -->', f'<!-- {name}:end -->'
        if begin in text and end in text:
            found[name] = text.split(begin, 1)[1].split(end, 1)[0].strip('\n')
    return found


def parse_results_md(text):
    """{section: result} for the sections whose tables can be plotted."""
    return {name: parse_section(body) for name, body in sections_of(text).items()
            if name in SECTION_FILES}


# -- drawing --

def available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _figure(plt, kind, ncols=1):
    width, height = SIZES[kind]
    return plt.subplots(1, ncols, figsize=(width / DPI, height / DPI), dpi=DPI)


def _source(result, fig):
    """A footer: which run the figures come from."""
    meta = result.get('meta', {})
    parts = [f"run of {meta['date'][:10]}" if meta.get('date') else 'run',
             f"`{meta['command']}`" if meta.get('command') else '',
             f"medians of {meta['rounds']} round(s)" if meta.get('rounds') else '']
    fig.text(0.01, 0.01, 'bench/RESULTS.md, ' + ', '.join(p for p in parts if p),
             fontsize=7, color='#555555', ha='left', va='bottom')


def _save(plt, fig, path):
    fig.savefig(path, dpi=DPI, metadata={'Software': None})
    plt.close(fig)


def _median(figures, key, system):
    return ((figures.get(key) or {}).get(system) or {}).get('median')


def per_group(entries_, *keys):
    """One entry per value of keys (first seen first), with the median over its rounds of every
    number, as the tables show them; an entry parsed back from a table stays as it is."""
    groups = {}
    for entry in entries_:
        groups.setdefault(tuple(entry[k] for k in keys), []).append(entry)
    out = []
    for group in groups.values():
        names = {k for e in group for k, v in e.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        merged = dict(group[0])
        merged.update({k: report._median_of(group, k) for k in names})
        out.append(merged)
    return out


def _wrap(label, width=22):
    return '\n'.join(textwrap.wrap(label.replace('`', ''), width))


def draw_headline(result, path):
    """Horizontal bars: speed as a share of local disk (log scale), per row that has one."""
    plt = _pyplot()
    from matplotlib import ticker
    figures = result['figures']
    rows = [row for row in ROWS if _median(figures, row.key, 'local')]
    systems = [s for s in HEADLINE_SYSTEMS if s in result['systems_run']]
    fig, ax = _figure(plt, 'headline')
    height = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        ys, xs = [], []
        for y, row in enumerate(rows):
            ratio = report.speed_ratio(row, _median(figures, row.key, system),
                                       _median(figures, row.key, 'local'))
            if ratio is not None:
                ys.append(y - 0.4 + height * (i + 0.5))
                xs.append(ratio)
        bars = ax.barh(ys, xs, height=height, color=COLOURS[system], label=system)
        ax.bar_label(bars, labels=[f'{x:.2f}x' for x in xs], padding=2, fontsize=7)
    ax.axvline(1, color=COLOURS['local'], linestyle='--', linewidth=1)
    ax.text(1.05, len(rows) - 0.5, 'local disk = 1', fontsize=8, color='#555555',
            rotation=90, va='bottom')
    ax.set_xscale('log')
    ax.set_xlim(right=max(4.0, ax.get_xlim()[1] * 2))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f'{x:g}'))
    ax.set_yticks(range(len(rows)), [_wrap(row.label + _unit_note(row), 40) for row in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlabel('speed as a share of local disk (log scale; higher is better; '
                  'durations inverted)')
    ax.set_title('cachefs against s3fs and rclone, relative to the local disk', fontsize=11)
    ax.legend(loc='upper right', fontsize=8)
    ax.grid(axis='x', which='both', alpha=0.25)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _source(result, fig)
    _save(plt, fig, path)


def _unit_note(row):
    return f' ({row.unit}' + (')' if row.higher_is_better else ', lower is better)')


def draw_unit(result, unit, path):
    """Grouped bars for the rows of one unit, one bar per system that ran."""
    plt = _pyplot()
    figures = result['figures']
    rows = [row for row in ROWS if row.unit == unit and row.key in figures]
    systems = list(result['systems_run'])
    fig, ax = _figure(plt, 'scenarios')
    width = 0.8 / max(1, len(systems))
    values = [v for row in rows for s in systems
              if (v := _median(figures, row.key, s)) is not None and v > 0]
    log_scale = bool(values) and max(values) / min(values) > 100
    for i, system in enumerate(systems):
        xs, ys = [], []
        for x, row in enumerate(rows):
            value = _median(figures, row.key, system)
            if value is not None and value > 0:
                xs.append(x - 0.4 + width * (i + 0.5))
                ys.append(value)
        bars = ax.bar(xs, ys, width=width, color=COLOURS.get(system), label=system)
        ax.bar_label(bars, labels=[report.number(y, unit) for y in ys], padding=1, fontsize=6.5,
                     rotation=90)
    higher = rows[0].higher_is_better if rows else True
    name = 'seconds' if unit == 's' else unit
    ax.set_ylabel(f'{name}, ' + ('higher is better' if higher else 'lower is better')
                  + (' (log scale)' if log_scale else ''))
    if log_scale:
        from matplotlib import ticker
        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f'{y:g}'))
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 4)
    else:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_xticks(range(len(rows)), [_wrap(row.label) for row in rows], fontsize=8)
    ax.set_title(f'Scenarios in {name}: local disk, raw boto3, cachefs and the peers '
                 '(no bar: not measured)', fontsize=10)
    ax.legend(fontsize=8, ncols=len(systems), loc='upper left')
    ax.grid(axis='y', which='major', alpha=0.25)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _source(result, fig)
    _save(plt, fig, path)


def draw_oversubscription(result, path):
    """Per eviction policy and epoch: MiB/s, and the SSD hit ratio with the bytes not read
    from the store."""
    plt = _pyplot()
    entries_ = per_group(result['oversubscription'], 'policy', 'epoch')
    policies = list(dict.fromkeys(e['policy'] for e in entries_))
    epochs = sorted({e['epoch'] for e in entries_})
    by = {(e['policy'], e['epoch']): e for e in entries_}
    shades = ['#1f5fbf', '#f28e2b', '#59a14f', '#b07aa1']
    fig, (left, right) = _figure(plt, 'oversubscription', ncols=2)
    width = 0.8 / max(1, len(policies))
    for i, policy in enumerate(policies):
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(epochs))]
        rates = [by.get((policy, epoch), {}).get('mib_s') or 0 for epoch in epochs]
        bars = left.bar(xs, rates, width=width, color=shades[i % 4], label=f'--eviction {policy}')
        left.bar_label(bars, labels=[report.number(r) for r in rates], padding=1, fontsize=7)
        sub = width / 2
        hits = [100 * (by.get((policy, e), {}).get('ssd_hit_ratio') or 0) for e in epochs]
        saved = [100 * (by.get((policy, e), {}).get('bytes_from_cache') or 0) for e in epochs]
        bars = right.bar([x - sub / 2 for x in xs], hits, width=sub, color=shades[i % 4],
                         label=f'{policy}: SSD hit ratio')
        right.bar_label(bars, labels=[f'{h:.0f}%' for h in hits], padding=1, fontsize=7)
        bars = right.bar([x + sub / 2 for x in xs], saved, width=sub, color=shades[i % 4],
                         alpha=0.45, hatch='//', label=f'{policy}: bytes not from store')
        right.bar_label(bars, labels=[f'{s:.0f}%' for s in saved], padding=1, fontsize=7)
    for ax in (left, right):
        ax.set_xticks(range(len(epochs)), [f'epoch {e}' for e in epochs])
        ax.grid(axis='y', alpha=0.25)
    left.set_ylabel('MiB/s, higher is better')
    left.set_ylim(0, left.get_ylim()[1] * 1.2)
    left.set_title('Oversubscribed (data 1.5x SSD tier): read rate', fontsize=10)
    left.legend(fontsize=8, loc='upper left')
    right.set_ylabel('% (higher is better)')
    right.set_ylim(0, 115)
    right.set_title('SSD hit ratio and bytes not read from the store', fontsize=10)
    right.legend(fontsize=7, loc='upper left', ncols=2)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _source(result, fig)
    _save(plt, fig, path)


def draw_sweep(result, path):
    """Per block size: cold MiB/s (with the store requests) and warm MiB/s."""
    plt = _pyplot()
    entries_ = per_group(result['block_size_sweep'], 'block_size')
    sizes = list(dict.fromkeys(e['block_size'] for e in entries_))
    by = {e['block_size']: e for e in entries_}
    fig, (cold, warm) = _figure(plt, 'block-size-sweep', ncols=2)
    for ax, phase, colour in ((cold, 'cold', COLOURS['cachefs']), (warm, 'warm', '#7aa6e0')):
        rates = [by[size].get(f'{phase}_mib_s') or 0 for size in sizes]
        bars = ax.bar(range(len(sizes)), rates, color=colour, width=0.6)
        labels = [report.number(r) for r in rates]
        if phase == 'cold':
            labels = [f'{label}\n{report.number(by[s].get("cold_store_requests"))} GETs'
                      for label, s in zip(labels, sizes)]
        ax.bar_label(bars, labels=labels, padding=1, fontsize=7)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel('cachefs --block-size')
        ax.set_ylabel('MiB/s, higher is better')
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.grid(axis='y', alpha=0.25)
    cold.set_title('Cold epoch (store requests on the bars)', fontsize=10)
    warm.set_title('Warm epoch, page cache dropped', fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _source(result, fig)
    _save(plt, fig, path)


def draw(result, section, outdir):
    """Draw the plots of one RESULTS.md section into outdir; [(title, file name), ...].

    Files of that section that this result has no data for are removed, so that no stale plot
    of an earlier run stays next to the new tables."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    images = []
    if section == 'scenarios' and result.get('figures'):
        if any(_median(result['figures'], row.key, 'local') for row in ROWS):
            draw_headline(result, outdir / 'headline.png')
            images.append(('cachefs, s3fs and rclone relative to local disk', 'headline.png'))
        units = list(dict.fromkeys(ROW_BY_KEY[key].unit for key in result['figures']))
        for unit in sorted(units, key=list(UNIT_FILES).index):
            draw_unit(result, unit, outdir / UNIT_FILES[unit])
            images.append((f'scenarios in {"seconds" if unit == "s" else unit}',
                           UNIT_FILES[unit]))
    if section == 'scenarios' and result.get('oversubscription'):
        draw_oversubscription(result, outdir / 'oversubscription.png')
        images.append(('oversubscription: MiB/s and SSD hit ratio per epoch',
                       'oversubscription.png'))
    if section == 'block-size-sweep' and result.get('block_size_sweep'):
        draw_sweep(result, outdir / 'block-size-sweep.png')
        images.append(('block-size sweep: cold and warm MiB/s', 'block-size-sweep.png'))
    drawn = {name for _, name in images}
    for name in SECTION_FILES.get(section, []):
        if name not in drawn and (outdir / name).exists():
            (outdir / name).unlink()
    return images


def redraw_results_md(path=RESULTS_MD):
    """`--from-results-md`: parse every plottable section, draw its plots into plots/ beside
    the file, link them in."""
    outdir = Path(path).parent / 'plots'
    text = Path(path).read_text()
    done = {}
    for section, result in parse_results_md(text).items():
        images = draw(result, section, outdir)
        if images:
            body = report.with_plots(sections_of(text)[section],
                                     report.plots_block(images, FROM_TABLES))
            report.write_results(Path(path), section, body)
            text = Path(path).read_text()
        done[section] = [name for _, name in images]
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='bench/plots.py', description='Draw the plots of bench/RESULTS.md.')
    parser.add_argument('--from-results-md', action='store_true', required=True,
                        help='rebuild the figures from the tables in RESULTS.md (for a run whose '
                        'JSON is gone), draw the plots and link them from their sections')
    parser.add_argument('--results-md', default=str(RESULTS_MD),
                        help=f'default {RESULTS_MD}; the plots go to plots/ beside it')
    options = parser.parse_args(argv)
    if not available():
        print("bench/plots.py: error: matplotlib is missing: pip install -e '.[bench]'",
              file=sys.stderr)
        return 2
    for section, names in redraw_results_md(options.results_md).items():
        print(f'{section}: {", ".join(names) or "nothing to plot"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
