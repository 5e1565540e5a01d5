"""bench/plots.py: the plots read the figures that report.py writes its tables from, and
`--from-results-md` gets those figures back from the tables in RESULTS.md.

Round trip: a run's data -> report.py's table -> parsed -> the medians the table shows (within
its rounding), and the parsed figures write the same table again. Drawing needs matplotlib
(a test extra), and its tests check that each PNG is a valid image of the size plots.py sets.
"""

import random
import shutil
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import plots, report  # noqa: E402
from bench.scenarios import COLD_ROWS, ROWS, Sample  # noqa: E402

MiB = 1 << 20
SYSTEMS = ['local', 'boto3', 'cachefs', 's3fs', 'rclone']


def a_run(rounds=3, seed=16):
    """A `result` shaped as bench/run.py builds it, with figures of every format the tables use
    (rates from 0.5 to 20,000, durations from 0.01 s to 40 s)."""
    rng = random.Random(seed)
    samples = []
    for row in ROWS:
        for system in SYSTEMS:
            if system == 'local' and row.key in ('mount', 'remount'):
                continue
            if system == 'boto3' and row.key not in COLD_ROWS:
                continue
            for rnd in range(rounds):
                value = (10 ** rng.uniform(-2, 1.6) if row.unit == 's'
                         else 10 ** rng.uniform(-0.3, 4.3))
                samples.append(Sample(row.key, system, rnd, value, cpu_s=rng.uniform(0, 80),
                                      peak_rss=rng.randrange(10 * MiB, 2000 * MiB)))
    oversub = [dict(policy=policy, round=rnd, epoch=epoch, mib_s=rng.uniform(150, 500),
                    ssd_hit_ratio=0.0 if epoch == 1 else rng.random(),
                    bytes_from_cache=0.0 if epoch == 1 else rng.random(),
                    store_bytes=rng.randrange(500 * MiB, 1600 * MiB),
                    disk_write_bytes=rng.randrange(0, 1300 * MiB), evictions=rng.randrange(200),
                    memory_used_bytes=rng.randrange(60 * MiB, 64 * MiB),
                    disk_used_bytes=rng.randrange(900 * MiB, 1024 * MiB),
                    cpu_s=rng.uniform(2, 5), peak_rss=rng.randrange(100 * MiB, 200 * MiB),
                    cache_size=1023 * MiB)
               for policy in ('lru', 'none') for rnd in range(rounds) for epoch in (1, 2, 3)]
    sweep = [dict(block_size=size, round=rnd, cold_mib_s=rng.uniform(200, 330),
                  cold_cpu_s=rng.uniform(3, 5), cold_store_requests=1536 // (1 << i),
                  warm_mib_s=rng.uniform(1600, 2000), warm_cpu_s=rng.uniform(0.6, 0.9),
                  peak_rss=rng.randrange(1500 * MiB, 1600 * MiB))
             for rnd in range(rounds) for i, size in enumerate(['1M', '2M', '4M', '8M', '16M'])]
    meta = dict(command='python bench/run.py --write-results', date='2026-11-30T10:00:00+00:00',
                rounds=rounds, readers=4, threads=8, oversub_memory=64 * MiB, seed=0,
                datasets={'shards': '24 files, 1,535 MiB', 'small': '20,000 files, 2,149 MiB'},
                versions={'cachefs': 'cachefs 0.1.0'}, duration_s=2500.0, cpus=2,
                memory_gib=24.0, kernel='6.1', python='3.11.7', hostname='h',
                load_average=dict(start=(1.0, 1.0, 1.0), end=(2.0, 2.0, 2.0)), reduced='')
    return dict(meta=meta, systems_run=list(SYSTEMS), skipped={},
                figures=report.aggregate(samples), oversubscription=oversub,
                block_size_sweep=sweep, verification_raw={}, notes=[],
                commands={'cachefs': ['python -m cachefs mount s3://b/p WORKDIR/run/mnt/cachefs']})


def shown(value, unit=''):
    """A figure as its table shows it, read back."""
    return plots.parse_number(report.number(value, unit))


def close_to_table(parsed, value, unit=''):
    """parsed is what the table wrote for value: within half a unit of its last digit."""
    text = report.number(value, unit)
    digits = len(text.split('.')[1]) if '.' in text else 0
    return parsed == shown(value, unit) and abs(parsed - value) <= 0.5 * 10 ** -digits + 1e-9


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR', f'{path} is no PNG'
    return struct.unpack('>II', data[16:24])


def test_main_table_parses_back_to_the_medians_it_shows():
    result = a_run()
    table = report.main_table(result['figures'], SYSTEMS)
    [(header, rows)] = plots.markdown_tables(table)
    systems, figures = plots.main_figures(header, rows)
    assert systems == SYSTEMS
    assert set(figures) == set(result['figures'])
    for row in ROWS:
        for system, fig in result['figures'][row.key].items():
            assert close_to_table(figures[row.key][system]['median'], fig['median'], row.unit)
        assert set(figures[row.key]) == set(result['figures'][row.key])
    again = plots.markdown_tables(report.main_table(figures, systems))[0][1]
    figure_columns = slice(0, 2 + len(SYSTEMS))       # the ratio columns are recomputed
    assert [r[figure_columns] for r in again] == [r[figure_columns] for r in rows]


def test_oversubscription_table_parses_back_to_the_medians_it_shows():
    result = a_run()
    table = report.oversubscription_table(result['oversubscription'])
    parsed = plots.entries(*plots.markdown_tables(table)[0], plots.OVERSUB_COLUMNS)
    assert [(e['policy'], e['epoch']) for e in parsed] == [
        (p, e) for p in ('lru', 'none') for e in (1, 2, 3)]
    medians = plots.per_group(result['oversubscription'], 'policy', 'epoch')
    for mine, theirs in zip(parsed, medians):
        assert close_to_table(mine['mib_s'], theirs['mib_s'])
        assert mine['ssd_hit_ratio'] == pytest.approx(theirs['ssd_hit_ratio'], abs=0.0005)
        assert close_to_table(mine['store_bytes'] / MiB, theirs['store_bytes'] / MiB)
    assert report.oversubscription_table(parsed) == table


def test_sweep_table_parses_back_to_the_medians_it_shows():
    result = a_run()
    table = report.sweep_table(result['block_size_sweep'])
    parsed = plots.entries(*plots.markdown_tables(table)[0], plots.SWEEP_COLUMNS)
    assert [e['block_size'] for e in parsed] == ['1M', '2M', '4M', '8M', '16M']
    medians = plots.per_group(result['block_size_sweep'], 'block_size')
    for mine, theirs in zip(parsed, medians):
        assert close_to_table(mine['cold_mib_s'], theirs['cold_mib_s'])
        assert close_to_table(mine['warm_cpu_s'], theirs['warm_cpu_s'], 's')
        assert mine['cold_store_requests'] == theirs['cold_store_requests']
    assert report.sweep_table(parsed) == table


@given(st.floats(min_value=0, max_value=1e7, allow_nan=False), st.sampled_from(['', 's']))
def test_a_number_cell_reads_back_to_the_same_cell(value, unit):
    text = report.number(value, unit)
    assert report.number(plots.parse_number(text), unit) == text


def test_a_written_results_md_parses_back_to_the_run(tmp_path):
    result = dict(a_run(), block_size_sweep=[])
    path = tmp_path / 'RESULTS.md'
    block = report.plots_block([('headline', 'headline.png')], plots.FROM_RUN)
    report.write_results(path, 'scenarios',
                         report.results_section(result, report.render(result), block))
    sweep = dict(a_run(), figures={}, oversubscription=[])
    report.write_results(path, 'block-size-sweep',
                         report.results_section(sweep, report.render(sweep)))
    parsed = plots.parse_results_md(path.read_text())
    assert set(parsed) == {'scenarios', 'block-size-sweep'}
    scenarios = parsed['scenarios']
    assert scenarios['meta'] == {'command': result['meta']['command'], 'date':
                                 result['meta']['date'], 'rounds': 3}
    assert scenarios['systems_run'] == SYSTEMS
    for row in ROWS:
        for system, fig in result['figures'][row.key].items():
            assert scenarios['figures'][row.key][system]['median'] == shown(fig['median'],
                                                                            row.unit)
    assert len(scenarios['oversubscription']) == 6 and not scenarios['block_size_sweep']
    assert len(parsed['block-size-sweep']['block_size_sweep']) == 5


def test_a_plots_block_is_put_before_the_tables_and_then_replaced():
    section = '- command: `x`\n- date: d\n\n| a | b |\n|---|---|\n| 1 | 2 |'
    first = report.with_plots(section, report.plots_block([('one', 'one.png')], 'old'))
    assert first.index('plots/one.png') < first.index('| a | b |')
    second = report.with_plots(first, report.plots_block([('two', 'two.png')], 'new'))
    assert 'one.png' not in second and 'old' not in second
    assert second.count(report.PLOTS_BEGIN) == 1
    assert second == report.with_plots(section, report.plots_block([('two', 'two.png')], 'new'))


def test_the_committed_results_md_links_a_plot_of_every_table():
    text = (ROOT / 'bench' / 'RESULTS.md').read_text()
    parsed = plots.parse_results_md(text)
    assert len(parsed['scenarios']['figures']) == len(ROWS)
    assert len(parsed['scenarios']['oversubscription']) == 6
    assert len(parsed['block-size-sweep']['block_size_sweep']) == 5
    linked = {line.split('](plots/')[1].rstrip(')') for line in text.splitlines()
              if '](plots/' in line}
    assert linked == {p.name for p in (ROOT / 'bench' / 'plots').glob('*.png')}
    assert linked == {name for names in plots.SECTION_FILES.values() for name in names}
    readme = (ROOT / 'README.md').read_text()
    assert '](bench/plots/headline.png)' in readme


def test_the_plots_of_a_run_are_pngs_of_their_set_size(tmp_path):
    pytest.importorskip('matplotlib')
    result = a_run()
    images = plots.draw(result, 'scenarios', tmp_path)
    images += plots.draw(result, 'block-size-sweep', tmp_path)
    names = [name for _, name in images]
    assert names == plots.SECTION_FILES['scenarios'] + plots.SECTION_FILES['block-size-sweep']
    for name in names:
        kind = next(k for k in plots.SIZES if name.startswith(k))
        assert png_size(tmp_path / name) == plots.SIZES[kind], name


def test_a_redraw_removes_the_plots_its_run_has_no_data_for(tmp_path):
    pytest.importorskip('matplotlib')
    plots.draw(a_run(), 'scenarios', tmp_path)
    only_cachefs = dict(a_run(rounds=1), systems_run=['cachefs'], oversubscription=[])
    only_cachefs['figures'] = {key: {'cachefs': by['cachefs']}
                               for key, by in only_cachefs['figures'].items()}
    images = plots.draw(only_cachefs, 'scenarios', tmp_path)
    # no local-disk figure: no headline; no oversubscription epochs: no plot of them
    assert 'headline.png' not in [name for _, name in images]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for _, name in images)


def test_from_results_md_redraws_the_committed_plots_and_links_them_alike(tmp_path):
    pytest.importorskip('matplotlib')
    shutil.copy(ROOT / 'bench' / 'RESULTS.md', tmp_path / 'RESULTS.md')
    assert plots.main(['--from-results-md', '--results-md', str(tmp_path / 'RESULTS.md')]) == 0
    assert (tmp_path / 'RESULTS.md').read_text() == (ROOT / 'bench' / 'RESULTS.md').read_text()
    for committed in (ROOT / 'bench' / 'plots').glob('*.png'):
        assert png_size(tmp_path / 'plots' / committed.name) == png_size(committed)
