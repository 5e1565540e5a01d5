"""Turning samples into the report: medians, ratios, tables, the JSON file and RESULTS.md.

Every figure is the median of its rounds. Ratios are speed ratios (above 1: cachefs is faster):
figure / figure for rates, the inverse for durations. "vs best peer" compares with the better of
s3fs and rclone.
"""

import json
import logging
import statistics
from collections import defaultdict

from .scenarios import COLD_ROWS, OBJECT_ROWS, ROWS

log = logging.getLogger(__name__)

MiB = 1 << 20
PEERS = ('s3fs', 'rclone')


def aggregate(samples):
    """{row: {system: {median, values, cpu_s (median), peak_rss (max), extra (medians)}}}."""
    grouped = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        grouped[sample.row][sample.system].append(sample)
    result = {}
    for row, by_system in grouped.items():
        result[row] = {}
        for system, group in by_system.items():
            cpus = [s.cpu_s for s in group if s.cpu_s is not None]
            rss = [s.peak_rss for s in group if s.peak_rss is not None]
            extra_keys = {k for s in group for k, v in s.extra.items()
                          if isinstance(v, (int, float))}
            result[row][system] = {
                'median': statistics.median(s.value for s in group),
                'values': [s.value for s in group],
                'cpu_s': statistics.median(cpus) if cpus else None,
                'peak_rss_bytes': max(rss) if rss else None,
                'extra': {k: statistics.median(s.extra[k] for s in group if k in s.extra)
                          for k in sorted(extra_keys)},
            }
    return result


def _stopped(figure):
    return bool(figure and figure.get('extra', {}).get('stopped'))


def speed_ratio(row, mine, other):
    if mine is None or other is None or mine <= 0 or other <= 0:
        return None
    return mine / other if row.higher_is_better else other / mine


def ratios(row, figures):
    """cachefs vs local, vs boto3 (cold rows only), vs the best peer that has the figure."""
    value = lambda name: (figures.get(name) or {}).get('median')  # noqa: E731
    mine = value('cachefs')
    peers = [value(p) for p in PEERS if value(p)]
    best = (max(peers) if row.higher_is_better else min(peers)) if peers else None
    # a peer stopped at --peer-timeout: the ratio to it is a lower bound (shown as "> ...")
    done = [value(p) for p in PEERS if value(p) and not _stopped(figures.get(p))]
    best_done = (max(done) if row.higher_is_better else min(done)) if done else None
    return {
        'vs_best_peer_bound': best is not None and best != best_done,
        'vs_local': speed_ratio(row, mine, value('local')),
        'vs_boto3': speed_ratio(row, mine, value('boto3')) if row.key in COLD_ROWS else None,
        'vs_best_peer': speed_ratio(row, mine, best),
    }


# -- formatting --

def number(value, unit=''):
    if value is None:
        return '-'
    if unit == 's':
        # round() first: 9.996 is written 10.0, as 10.0 itself is (a parsed table writes back alike)
        return f'{value:.2f}' if round(value, 2) < 10 else f'{value:.1f}'
    if value >= 100:
        return f'{value:,.0f}'
    return f'{value:.3g}'


def figure_text(figure, unit):
    """A figure's median; one that ran past --peer-timeout is "> T (stopped)"."""
    if not figure:
        return '-'
    if _stopped(figure):
        return f"> {number(figure['median'], unit)} (stopped)"
    return number(figure['median'], unit)


def ratio_text(value):
    return '-' if value is None else f'{value:.2f}x'


def markdown_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'

    return '\n'.join([line(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
                     + [line(r) for r in rows])


def main_table(figures, systems, rows_shown=ROWS):
    header = ['scenario', 'unit'] + list(systems) + ['cachefs vs local', 'vs boto3',
                                                     'vs best peer']
    rows = []
    for row in rows_shown:
        if row.key not in figures:
            continue
        cells = [row.label, row.unit + ('' if row.higher_is_better else ' (lower is better)')]
        cells += [figure_text(figures[row.key].get(s), row.unit) for s in systems]
        r = ratios(row, figures[row.key])
        best = ratio_text(r['vs_best_peer'])
        cells += [ratio_text(r['vs_local']), ratio_text(r['vs_boto3']),
                  '> ' + best if r['vs_best_peer_bound'] and best != '-' else best]
        rows.append(cells)
    return markdown_table(header, rows)


def usage_table(figures, systems, rows_shown=ROWS):
    """CPU seconds of the serving process per figure, and its peak RSS (MiB) so far."""
    shown = [s for s in systems if s not in ('local',)]
    rows = []
    for row in rows_shown:
        if row.key not in figures:
            continue
        cells = [row.label]
        for system in shown:
            fig = figures[row.key].get(system)
            if not fig or (fig['cpu_s'] is None and fig['peak_rss_bytes'] is None):
                cells.append('-')
                continue
            cpu = '-' if fig['cpu_s'] is None else f"{fig['cpu_s']:.2f} s"
            rss = ('-' if fig['peak_rss_bytes'] is None
                   else f"{fig['peak_rss_bytes'] / MiB:,.0f} MiB")
            cells.append(f'{cpu} / {rss}')
        rows.append(cells)
    return markdown_table(['scenario'] + [f'{s} CPU / peak RSS' for s in shown], rows)


def _median_of(entries, key):
    values = [e[key] for e in entries if e.get(key) is not None]
    return statistics.median(values) if values else None


def oversubscription_table(entries):
    groups = defaultdict(list)
    for e in entries:
        groups[(e['policy'], e['epoch'])].append(e)
    rows = []
    for (policy, epoch), group in sorted(groups.items()):
        hit = _median_of(group, 'ssd_hit_ratio')
        cached = _median_of(group, 'bytes_from_cache')
        rows.append([policy, epoch, number(_median_of(group, 'mib_s')),
                     '-' if hit is None else f'{hit:.1%}',
                     '-' if cached is None else f'{cached:.1%}',
                     number(_mib(_median_of(group, 'store_bytes'))),
                     number(_mib(_median_of(group, 'disk_write_bytes'))),
                     number(_median_of(group, 'evictions')),
                     number(_mib(_median_of(group, 'memory_used_bytes'))),
                     number(_mib(_median_of(group, 'disk_used_bytes'))),
                     number(_median_of(group, 'cpu_s'), 's')])
    return markdown_table(['eviction', 'epoch', 'MiB/s', 'SSD hit ratio', 'bytes not from store',
                           'store MiB',
                           'SSD writes MiB', 'evictions', 'memory MiB', 'SSD used MiB',
                           'daemon CPU s'], rows)


def _mib(value):
    return None if value is None else value / MiB


def sweep_table(entries):
    groups = defaultdict(list)
    for e in entries:
        groups[e['block_size']].append(e)
    rows = []
    for size, group in groups.items():
        rows.append([size, number(_median_of(group, 'cold_mib_s')),
                     number(_median_of(group, 'cold_store_requests')),
                     number(_median_of(group, 'cold_cpu_s'), 's'),
                     number(_median_of(group, 'warm_mib_s')),
                     number(_median_of(group, 'warm_cpu_s'), 's'),
                     number(max(e['peak_rss'] or 0 for e in group) / MiB)])
    return markdown_table(['block size', 'cold MiB/s', 'cold store requests', 'cold CPU s',
                           'warm MiB/s (page cache dropped)', 'warm CPU s', 'peak RSS MiB'], rows)


def verification_lines(verified):
    lines = []
    for (system, kind), problems in sorted(verified.items()):
        status = 'all files match' if not problems else f'{len(problems)} PROBLEMS: {problems[:3]}'
        lines.append(f'- {system}, {kind}: {status}')
    return lines


def render(result):
    """The text report: tables and notes (printed, and the body of RESULTS.md)."""
    out = []
    systems = result['systems_run']
    for rows, title in ((ROWS, None), (OBJECT_ROWS, 'Metadata at N objects')):
        if not any(row.key in result['figures'] for row in rows):
            continue
        if title:
            out += ['%s: N = %s empty objects in 1,000 folders, named like ImageNet\'s '
                    '(n{class}/n{class}_{i}.JPEG).'
                    % (title, f"{result['meta'].get('metadata_objects', 0):,}"), '']
        out += [main_table(result['figures'], systems, rows), '',
                'Medians of %d round(s). Ratios are speed ratios: above 1x cachefs is faster.'
                % result['meta']['rounds'], '',
                'Serving process (cachefs daemon, s3fs, rclone; boto3: this client process): CPU '
                'seconds during the figure / peak RSS since its mount.', '',
                usage_table(result['figures'], systems, rows), '']
    if result['oversubscription']:
        m = result['meta']
        out += ['Oversubscription, cachefs: shards %s, SSD cache %s MiB (2/3 of the data), '
                'memory tier %s MiB, prefetch off; page cache dropped before every '
                'epoch. SSD hit ratio = disk_hits / (hits + misses) from the daemon\'s counters, '
                'which count a hit per read request but a miss per block fetched (reads waiting '
                'for that fetch count as neither), so it reads higher than the share of bytes '
                'served from the cache; bytes not from store = 1 - store bytes / dataset bytes.'
                % (m['datasets'].get('shards'),
                   number(result['oversubscription'][0]['cache_size'] / MiB),
                   number(m['oversub_memory'] / MiB)), '',
                oversubscription_table(result['oversubscription']), '']
    if result['block_size_sweep']:
        out += ['Block-size sweep, cachefs, shards %s, 4 reader processes:'
                % result['meta']['datasets'].get('shards'), '',
                sweep_table(result['block_size_sweep']), '']
    out += ['Content verification (sha256 of every file, separate untimed pass):']
    out += verification_lines(result['verification_raw']) or ['- none ran']
    if result['skipped']:
        out += ['', 'Skipped:'] + [f'- {name}: {why}' for name, why in result['skipped'].items()]
    if result['notes']:
        out += ['', 'Notes:'] + [f'- {note}' for note in result['notes']]
    return '\n'.join(out)


def to_json(result):
    data = dict(result)
    data['verification'] = {f'{system} / {kind}': (problems or 'ok')
                            for (system, kind), problems in result['verification_raw'].items()}
    del data['verification_raw']
    data['rows'] = [
        {'key': row.key, 'label': row.label, 'unit': row.unit,
         'higher_is_better': row.higher_is_better, 'systems': result['figures'][row.key],
         'ratios': ratios(row, result['figures'][row.key])}
        for row in ROWS + OBJECT_ROWS if row.key in result['figures']]
    del data['figures']
    return json.dumps(data, indent=2, default=str)


SECTIONS = ('scenarios', 'block-size-sweep', 'get-cost', 'analysis', 'namespace',
            'metadata-objects', 'oss', 'cold-epoch', 'cluster')
_TITLE = {'scenarios': 'Scenarios', 'block-size-sweep': 'Block-size sweep',
          'get-cost': 'Cost of one store GET', 'analysis': 'Where the time goes (profiles)',
          'namespace': 'Namespace at ImageNet scale (in-process)',
          'metadata-objects': 'Metadata at ImageNet scale: 1.28 million objects against s3fs '
                              'and rclone',
          'oss': 'OSS reads: oss2 against the lean path',
          'cold-epoch': 'Cold epoch against boto3, and peak RSS beside the memory formula',
          'cluster': 'Cluster tier: three nodes pooling their caches'}


PLOTS_BEGIN, PLOTS_END = '<!-- plots:begin -->', '<!-- plots:end -->'


def plots_block(images, source):
    """Markdown image links to bench/plots/ (paths relative to RESULTS.md), with where they
    come from; between markers, so that `bench/plots.py --from-results-md` can replace it."""
    lines = [PLOTS_BEGIN, source]
    for title, name in images:
        lines += ['', f'![{title}](plots/{name})']
    return '\n'.join(lines + [PLOTS_END])


def with_plots(section, block):
    """A section's text with its plots block replaced, or put after its leading bullet list
    (how the run was made), before the tables."""
    if PLOTS_BEGIN in section and PLOTS_END in section:
        before, rest = section.split(PLOTS_BEGIN, 1)
        return before + block + rest.split(PLOTS_END, 1)[1]
    lines = section.split('\n')
    at = 0
    while at < len(lines) and lines[at].startswith('- '):
        at += 1
    return '\n'.join(lines[:at] + ['', block] + lines[at:])


def results_section(result, text, plots=''):
    """The RESULTS.md section for this run: how it was run, its plots (a plots_block), then
    its tables."""
    m = result['meta']
    lines = [
        f"- command: `{m['command']}`",
        f"- date: {m['date']}",
        f"- machine: {m['cpus']} cores, {m['memory_gib']:.0f} GiB RAM, Linux `{m['kernel']}`, "
        f"Python {m['python']}; the store is SeaweedFS on loopback, on the same disk; the "
        f"machine is shared with other engineers' test runs (1-minute load average "
        f"{m['load_average']['start'][0]:.1f} at the start, {m['load_average']['end'][0]:.1f} "
        f"at the end)",
        '- datasets: ' + '; '.join(f'{k}: {v}' for k, v in m['datasets'].items()),
        f"- rounds: {m['rounds']} (figures are medians); the run took "
        f"{m['duration_s'] / 60:.1f} min",
    ]
    if m.get('reduced'):
        lines.append(f"- **reduced run** (the full default run takes about an hour here): "
                     f"{m['reduced']}")
    lines.append('- versions: ' + '; '.join(f'{k}: {v}' for k, v in m['versions'].items()))
    if plots:
        lines += ['', plots]
    lines += ['', text, '', 'Command lines of the systems (WORKDIR is the folder given as '
              '`--workdir`; `python` the interpreter of the run):', '']
    for name, commands in result['commands'].items():
        # One line per system is enough: later mounts differ only in the prefix and options.
        lines.append(f'- {name}: `{commands[0]}`')
    return '\n'.join(lines)


def write_results(path, section, body):
    """Replace one section of RESULTS.md (creating the file), keeping the other one."""
    sections = {name: '_Not run yet: see bench/README.md for the command._' for name in SECTIONS}
    if path.exists():
        old = path.read_text()
        for name in SECTIONS:
            begin, end = f'<!-- {name}:begin -->', f'<!-- {name}:end -->'
            if begin in old and end in old:
                sections[name] = old.split(begin, 1)[1].split(end, 1)[0].strip('\n')
    sections[section] = body
    out = [
        '# cachefs benchmark results', '',
        'Written by `bench/run.py --write-results` (each run replaces its own section); see '
        '`bench/README.md` for what each figure means and how it is measured.', '',
        'Each section is a snapshot of the code at the date it shows. Figures on this shared '
        '2-core machine are noisy (+-30%).', '']
    for name in SECTIONS:
        out += [f'## {_TITLE[name]}', '', f'<!-- {name}:begin -->', sections[name],
                f'<!-- {name}:end -->', '']
    path.write_text('\n'.join(out))
