"""Writes cachefs-prometheusrule.yaml from cachefs-rules.yaml, the one source of the rules.

    python3 deploy/prometheus/prometheusrule.py           # rewrite the PrometheusRule
    python3 deploy/prometheus/prometheusrule.py --check   # exit 1 if it is out of date

The rule groups are copied as text, indented under `spec:`, so that the comments that explain
each threshold stay in both files. Needs nothing but Python 3.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / 'cachefs-rules.yaml'
PROMETHEUS_RULE = HERE / 'cachefs-prometheusrule.yaml'

HEADER = """\
# GENERATED from cachefs-rules.yaml by prometheusrule.py: edit that file, then run
#   python3 deploy/prometheus/prometheusrule.py
# The cachefs alert rules as a PrometheusRule for the Prometheus Operator (README.md beside this
# file). Prometheus loads it when its ruleSelector matches these labels: kube-prometheus-stack
# selects `release: <its Helm release name>`; change the label to yours.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: cachefs
  namespace: cachefs
  labels:
    app.kubernetes.io/name: cachefs
    release: kube-prometheus-stack
spec:
"""


def render(rules_text):
    """The PrometheusRule's text: HEADER, then everything from `groups:` on, indented by 2."""
    lines = rules_text.splitlines()
    start = lines.index('groups:')
    body = ''.join(f'  {line}\n' if line.strip() else '\n' for line in lines[start:])
    return HEADER + body


def main(argv):
    text = render(RULES.read_text())
    if argv[1:] == ['--check']:
        if PROMETHEUS_RULE.read_text() != text:
            print(f'{PROMETHEUS_RULE.name} is out of date: run {sys.argv[0]}', file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    PROMETHEUS_RULE.write_text(text)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
