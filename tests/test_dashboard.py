"""The Grafana dashboard (deploy/grafana/cachefs-dashboard.json): it imports into Grafana 10+
(schema, data source variable, panel ids), and every metric its queries use is one that a live
mount serves on --metrics-addr, read from that mount, not from a list kept here."""

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import drop_page_cache, free_port, live_metrics
from support.memcached_server import dead_address, memcached_server

DASHBOARD = Path(__file__).resolve().parent.parent / 'deploy' / 'grafana' / \
    'cachefs-dashboard.json'
DATASOURCE_UID = '${datasource}'
METRIC = re.compile(r'\b(cachefs_[A-Za-z0-9_]+)\s*(\{[^}]*\})?')
EQUALS = re.compile(r'(\w+)\s*=\s*"([^"$]*)"')      # label="literal" (not =~, not $variables)


def load():
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard):
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard['panels']:
        yield panel
        yield from panel.get('panels', ())


def queries(dashboard):
    """(where, PromQL) of every panel target and every query variable."""
    for panel in all_panels(dashboard):
        for target in panel.get('targets', ()):
            yield f'panel {panel["id"]} ({panel["title"]})', target['expr']
    for variable in dashboard['templating']['list']:
        if variable['type'] == 'query':
            query = variable['query']
            yield f'variable {variable["name"]}', query['query'] if isinstance(query, dict) \
                else query


def test_dashboard_is_grafana_10_json_with_a_prometheus_data_source_variable():
    dashboard = load()
    assert dashboard['schemaVersion'] in (38, 39)
    assert dashboard['uid'] and dashboard['title']
    variables = {variable['name']: variable for variable in dashboard['templating']['list']}
    assert variables['datasource']['type'] == 'datasource'
    assert variables['datasource']['query'] == 'prometheus'
    instance = variables['instance']
    assert instance['type'] == 'query' and instance['multi'] and instance['includeAll']


def test_every_panel_queries_through_the_data_source_variable():
    for panel in all_panels(load()):
        if panel['type'] == 'row':
            continue
        assert panel['datasource'] == {'type': 'prometheus', 'uid': DATASOURCE_UID}, \
            panel['title']
        assert panel['targets'], panel['title']
        for target in panel['targets']:
            assert target['datasource']['uid'] == DATASOURCE_UID, panel['title']
            assert METRIC.search(target['expr']), (panel['title'], target['expr'])


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    panels = list(all_panels(load()))
    ids = [panel['id'] for panel in panels]
    assert len(ids) == len(set(ids))
    taken = set()
    for panel in panels:
        grid = panel['gridPos']
        assert 0 <= grid['x'] and grid['x'] + grid['w'] <= 24, panel['title']
        cells = {(x, y) for x in range(grid['x'], grid['x'] + grid['w'])
                 for y in range(grid['y'], grid['y'] + grid['h'])}
        assert not cells & taken, panel['title']
        taken |= cells


def test_every_query_selects_the_chosen_mounts():
    for where, expr in queries(load()):
        if where.startswith('variable'):
            continue
        for match in METRIC.finditer(expr):
            assert 'instance=~"$instance"' in (match.group(2) or ''), (where, expr)



def served_samples(port):
    """{sample name: [label dicts]} that the mount serves now."""
    served = {}
    for family in text_string_to_metric_families(live_metrics(port)):
        for sample in family.samples:
            served.setdefault(sample.name, []).append(sample.labels)
    return served


@pytest.mark.fuse
def test_every_metric_the_dashboard_uses_is_served_by_a_live_mount(local_source, mounter):
    """Names as Prometheus stores them (counters' _total, histograms' _bucket/_sum/_count), and
    each label value a query matches exactly (tier="disk", op="read") on at least one sample.
    The second mount has the cluster tier on (one memcached, one peer that refuses
    connections), so that the cluster panels' metrics are served too."""
    first = mounter.mount(local_source)
    (first.path / 'five_and_a_half_blocks.bin').read_bytes()
    mounter.umount(first)                   # its blocks go to the SSD tier
    drop_page_cache()
    port = free_port()
    with memcached_server() as peer:
        mounted = mounter.mount(local_source, '--metrics-addr', f'127.0.0.1:{port}',
                                '--cluster', f'memcached://{peer},{dead_address()}')
        (mounted.path / 'five_and_a_half_blocks.bin').read_bytes()       # from the SSD
        (mounted.path / 'one_block_plus_one.bin').read_bytes()           # from the store
        drop_page_cache()
        (mounted.path / 'one_block_plus_one.bin').read_bytes()           # from memory
        served = served_samples(port)
    read_bytes = {labels['tier'] for labels in served['cachefs_read_bytes_total']}
    assert read_bytes == {'memory', 'disk', 'store'}
    used = set()
    for where, expr in queries(load()):
        for match in METRIC.finditer(expr):
            name, matchers = match.group(1), match.group(2) or ''
            used.add(name)
            assert name in served, f'{where}: {name} is not served by the mount'
            for label, value in EQUALS.findall(matchers):
                assert any(labels.get(label) == value for labels in served[name]), \
                    f'{where}: no {name} sample has {label}="{value}"'
    assert {'cachefs_read_bytes_total', 'cachefs_disk_offline',
            'cachefs_fuse_op_latency_seconds_bucket', 'cachefs_cluster_hits_total',
            'cachefs_cluster_peer_up'} <= used
