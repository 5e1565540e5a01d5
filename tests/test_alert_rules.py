"""The Prometheus alert rules in deploy/prometheus/: valid for promtool, tested by promtool's
unit tests (cachefs-rules.test.yaml: each alert fires when it should and stays quiet when healthy),
the PrometheusRule equal to the plain rules file, and every metric the rules read served by a
live mount's `--metrics-addr` (names read from the mount, not from a list kept here).

promtool comes with Debian's `prometheus` package, which `scripts/dev.sh test` installs; the
promtool tests skip only where it is absent.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, live_metrics
from support.memcached_server import dead_address, memcached_server

ROOT = Path(__file__).parent.parent
PROMETHEUS = ROOT / 'deploy' / 'prometheus'
RULES = PROMETHEUS / 'cachefs-rules.yaml'
PROMETHEUS_RULE = PROMETHEUS / 'cachefs-prometheusrule.yaml'
UNIT_TESTS = PROMETHEUS / 'cachefs-rules.test.yaml'
GENERATOR = PROMETHEUS / 'prometheusrule.py'

# Series the rules read that a cachefs mount does not serve: Prometheus makes `up` for every
# target, and node_exporter's filesystem collector serves the device error of a mount point.
NOT_FROM_CACHEFS = {'up', 'node_filesystem_device_error'}
PROMQL_KEYWORDS = {'and', 'or', 'unless', 'offset', 'bool', 'by', 'without', 'on', 'ignoring',
                   'group_left', 'group_right'}
SEVERITIES = {'critical', 'warning'}

needs_promtool = pytest.mark.skipif(shutil.which('promtool') is None,
                                    reason="promtool is absent (Debian's prometheus package)")


def load_yaml(path):
    yaml = pytest.importorskip('yaml', reason='PyYAML comes with kubernetes-validate (test extra)')
    return yaml.safe_load(path.read_text())


def rules_of(groups):
    return [rule for group in groups for rule in group['rules']]


def alerts():
    return [rule for rule in rules_of(load_yaml(RULES)['groups']) if 'alert' in rule]


def series_names(expr):
    """The metric names a PromQL expression reads: strings, label matchers, ranges and grouping
    clauses removed, then every identifier that is neither a function call nor a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r'\{[^}]*\}', ' ', expr)
    expr = re.sub(r'\[[^\]]*\]', ' ', expr)
    expr = re.sub(r'\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', ' ', expr)
    names = set()
    for match in re.finditer(r'(?<![\w.])[A-Za-z_:][\w:]*', expr):
        rest = expr[match.end():].lstrip()
        if match.group() not in PROMQL_KEYWORDS and not rest.startswith('('):
            names.add(match.group())
    return names


def test_series_names_skips_functions_labels_ranges_and_grouping():
    expr = ('sum by (job, instance) (rate(cachefs_cache_hits_total{tier="memory"}[30m] offset 1h))'
            ' / on (job) group_left (source) cachefs_info > 1e3 * 2h_not_a_name unless up == 0')
    assert series_names(expr) == {'cachefs_cache_hits_total', 'cachefs_info', 'up'}


def test_every_alert_has_a_severity_a_summary_and_a_description():
    for rule in alerts():
        assert rule['labels']['severity'] in SEVERITIES, rule['alert']
        assert set(rule['annotations']) >= {'summary', 'description'}, rule['alert']
        assert rule['alert'].startswith('Cachefs'), rule['alert']


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_stays_quiet():
    cases = [case for test in load_yaml(UNIT_TESTS)['tests']
             for case in test.get('alert_rule_test', ())]
    for rule in alerts():
        mine = [case for case in cases if case['alertname'] == rule['alert']]
        assert any(case['exp_alerts'] for case in mine), f'{rule["alert"]} never fires'
        assert any(not case['exp_alerts'] for case in mine), f'{rule["alert"]} never stays quiet'


@needs_promtool
def test_promtool_accepts_the_rules_file():
    result = subprocess.run(['promtool', 'check', 'rules', str(RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass():
    result = subprocess.run(['promtool', 'test', 'rules', UNIT_TESTS.name], cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_holds_the_groups_of_the_rules_file():
    document = load_yaml(PROMETHEUS_RULE)
    assert (document['apiVersion'], document['kind']) == ('monitoring.coreos.com/v1',
                                                          'PrometheusRule')
    assert document['spec'] == {'groups': load_yaml(RULES)['groups']}


def test_prometheus_rule_is_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(GENERATOR), '--check'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The fields of the Prometheus Operator's PrometheusRule CRD (monitoring.coreos.com_prometheusrules
# .yaml, v1) that a rule group may use; closed, so that a misspelt field fails here and not when
# the operator ignores it.
DURATION = {'type': 'string',
            'pattern': r'^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?'
                       r'(([0-9]+)s)?(([0-9]+)ms)?)$'}
STRING_MAP = {'type': 'object', 'additionalProperties': {'type': 'string'}}
RULE = {'type': 'object', 'additionalProperties': False, 'required': ['expr'],
        'properties': {'alert': {'type': 'string'}, 'record': {'type': 'string'},
                       'expr': {'type': ['string', 'integer']}, 'for': DURATION,
                       'keep_firing_for': DURATION, 'labels': STRING_MAP,
                       'annotations': STRING_MAP},
        'oneOf': [{'required': ['alert']}, {'required': ['record']}]}
PROMETHEUS_RULE_SCHEMA = {
    'type': 'object', 'additionalProperties': False,
    'required': ['apiVersion', 'kind', 'metadata', 'spec'],
    'properties': {
        'apiVersion': {'const': 'monitoring.coreos.com/v1'},
        'kind': {'const': 'PrometheusRule'},
        'metadata': {'type': 'object', 'additionalProperties': False, 'required': ['name'],
                     'properties': {
                         'name': {'type': 'string',
                                  'pattern': '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'},
                         'namespace': {'type': 'string'}, 'labels': STRING_MAP,
                         'annotations': STRING_MAP}},
        'spec': {'type': 'object', 'additionalProperties': False, 'required': ['groups'],
                 'properties': {'groups': {'type': 'array', 'items': {
                     'type': 'object', 'additionalProperties': False, 'required': ['name'],
                     'properties': {'name': {'type': 'string', 'minLength': 1},
                                    'interval': DURATION, 'limit': {'type': 'integer'},
                                    'labels': STRING_MAP,
                                    'rules': {'type': 'array', 'items': RULE}}}}}}}}


def test_prometheus_rule_matches_the_operators_schema():
    import jsonschema
    validator = jsonschema.Draft202012Validator(PROMETHEUS_RULE_SCHEMA)
    errors = [f'{"/".join(map(str, error.absolute_path))}: {error.message}'
              for error in validator.iter_errors(load_yaml(PROMETHEUS_RULE))]
    assert errors == []


def test_schema_rejects_a_misspelt_rule_field():
    import jsonschema
    document = load_yaml(PROMETHEUS_RULE)
    document['spec']['groups'][1]['rules'][0]['annotation'] = {'summary': 'typo'}
    assert list(jsonschema.Draft202012Validator(PROMETHEUS_RULE_SCHEMA).iter_errors(document))



def scrape(port):
    return {sample.name for family in text_string_to_metric_families(live_metrics(port))
            for sample in family.samples}


def test_every_metric_the_rules_read_is_served_by_a_live_mount(local_source, mounter):
    """The cluster tier on (one memcached, one peer that refuses connections), so that its
    metrics are served too."""
    port = free_port()
    with memcached_server() as peer:
        mounted = mounter.mount(local_source, '--metrics-addr', f'127.0.0.1:{port}',
                                '--cluster', f'memcached://{peer},{dead_address()}')
        path = next(p for p in sorted(mounted.path.rglob('*')) if p.is_file())
        path.read_bytes()
        served = scrape(port)
    rules = rules_of(load_yaml(RULES)['groups'])
    recorded = {rule['record'] for rule in rules if 'record' in rule}
    missing = {}
    for rule in rules:
        for name in series_names(rule['expr']) - NOT_FROM_CACHEFS:
            if name not in (recorded if ':' in name else served):
                missing.setdefault(rule.get('alert') or rule['record'], set()).add(name)
    assert missing == {}
    assert 'process_resident_memory_bytes' in served
