"""The import shape of src/cachefs: no import cycles, and the CLI's control commands (umount,
stats, refresh, warmup) never load pyfuse3 or trio.

The graph is read from the source with `ast`, so it holds every import, also those inside a
function (a lazy import still runs on some path, and two modules that reach each other that way
are one module in two files). An edge goes from a module to each cachefs module it names,
relative imports resolved; `from pkg import name` points at `pkg.name` when that is a module and
at `pkg` otherwise. Two kinds of import are left out on purpose: the implicit import of a
module's parent packages (Python runs those first, so they cannot form a cycle that matters),
and imports under `if TYPE_CHECKING:`, which never run.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env

SRC = Path(__file__).resolve().parent.parent / 'src'
HEAVY = ('pyfuse3', 'trio')                     # what the control commands must not load
CONTROL_SIDE = ('cachefs.control', 'cachefs.warmup', 'cachefs.metrics')


def module_files(src):
    """{dotted module name: (path, is_package)} of every .py file under src/cachefs."""
    found = {}
    for path in sorted((src / 'cachefs').rglob('*.py')):
        parts = list(path.relative_to(src).with_suffix('').parts)
        is_package = parts[-1] == '__init__'
        if is_package:
            parts.pop()
        found['.'.join(parts)] = (path, is_package)
    return found


def _is_type_checking(test):
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING' or
            isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _imports(tree):
    """(node, at module level) for every import statement that can run."""
    def walk(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for branch in child.orelse:
                    yield from walk_one(branch, top)
                continue
            yield from walk_one(child, top)

    def walk_one(node, top):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(node, inner)

    yield from walk(tree, True)


def import_graph(src=SRC):
    """{module: {imported: at_module_level}}: cachefs modules by dotted name, other imports by
    their top-level package name (`pyfuse3`, `trio`, ...)."""
    modules = module_files(src)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition('.')[0]
        edges = graph[name] = {}

        def add(target, top):
            edges[target] = edges.get(target, False) or top

        for node, top in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name if alias.name in modules else alias.name.split('.')[0], top)
                continue
            if node.level:
                base = package.split('.')[:len(package.split('.')) - (node.level - 1)]
                origin = '.'.join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            if origin not in modules and not origin.startswith('cachefs.'):
                add(origin.split('.')[0], top)
                continue
            for alias in node.names:
                target = f'{origin}.{alias.name}'
                add(target if target in modules else origin, top)
    return graph


def find_cycles(graph):
    """One cycle (a list of modules, first == last) per back edge found by a depth-first
    search over the cachefs modules; [] when the graph is acyclic."""
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = 'open'
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 'open':
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def heavy_paths(graph, start):
    """Import chains from `start` to pyfuse3 or trio. `start` and the control-side modules are
    followed through every import; other modules only through their module-level imports (a
    lazy import inside, say, the mount command is not on a control command's path)."""
    found, seen, queue = [], {start}, [[start]]
    while queue:
        chain = queue.pop(0)
        for target, top in sorted(graph.get(chain[-1], {}).items()):
            if not (top or chain[-1] in CONTROL_SIDE):
                continue
            if target in HEAVY:
                found.append(chain + [target])
            elif target in graph and target not in seen:
                seen.add(target)
                queue.append(chain + [target])
    return found


def test_the_import_graph_of_cachefs_has_no_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(cycle) for cycle in cycles)


@pytest.mark.parametrize('module', CONTROL_SIDE)
def test_no_import_of_a_control_side_module_leads_to_pyfuse3_or_trio(module):
    paths = heavy_paths(import_graph(), module)
    assert not paths, 'imports that load the FUSE stack:\n' + '\n'.join(
        ' -> '.join(path) for path in paths)


def test_importing_the_cli_and_the_control_modules_loads_neither_pyfuse3_nor_trio():
    code = ('import sys, cachefs.cli, cachefs.control, cachefs.warmup, cachefs.metrics\n'
            f'print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == '[]'


# Runs the CLI with pyfuse3 and trio made unimportable: a command that reaches either fails.
WITHOUT_FUSE_STACK = ('import sys\n'
                      f'sys.modules.update(dict.fromkeys({HEAVY!r}))\n'
                      'from cachefs.cli import main\n'
                      'sys.exit(main(sys.argv[1:]))')


@pytest.mark.fuse
def test_the_control_commands_run_on_a_mount_without_pyfuse3_or_trio(local_source, mounter):
    mounted = mounter.mount(local_source)
    first = next(path for path, (size, _) in sorted(local_source.manifest.items()) if size)
    (mounted.path / first).read_bytes()          # a latency histogram for `stats` to format
    for args in (['stats', mounted.path], ['stats', '--json', mounted.path],
                 ['refresh', mounted.path], ['warmup', mounted.path / first],
                 ['warmup', '--check', mounted.path], ['umount', mounted.path]):
        result = subprocess.run([sys.executable, '-c', WITHOUT_FUSE_STACK, *map(str, args)],
                                env=local_source.env or clean_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, (args, result.stderr)
        if args[:1] == ['stats']:
            assert 'latency' in result.stdout


def test_the_cycle_check_sees_a_cycle_through_a_lazy_relative_import(tmp_path):
    package = tmp_path / 'cachefs'
    (package / 'sub').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'sub' / '__init__.py').write_text('')
    (package / 'a.py').write_text('from .sub import b\n')
    (package / 'sub' / 'b.py').write_text('def f():\n    from ..a import x\n')
    (package / 'c.py').write_text('from typing import TYPE_CHECKING\n'
                                  'if TYPE_CHECKING:\n    from . import a\n')
    graph = import_graph(tmp_path)
    assert find_cycles(graph) == [['cachefs.a', 'cachefs.sub.b', 'cachefs.a']]
    assert graph['cachefs.sub.b'] == {'cachefs.a': False}
    assert 'cachefs.a' not in graph['cachefs.c']       # annotations only: never runs


def test_the_heavy_import_check_follows_lazy_imports_of_control_side_modules(tmp_path):
    package = tmp_path / 'cachefs'
    (package / 'fuse').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'fuse' / '__init__.py').write_text('')
    (package / 'fuse' / 'operations.py').write_text('import pyfuse3\nLATENCY_BUCKETS = ()\n')
    (package / 'metrics.py').write_text('def serve():\n    from .fuse.operations import X\n')
    assert heavy_paths(import_graph(tmp_path), 'cachefs.metrics') == [
        ['cachefs.metrics', 'cachefs.fuse.operations', 'pyfuse3']]
