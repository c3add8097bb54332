"""Every bench starts as the README runs it (`python bench/NAME.py`, which puts bench/ first on sys.path): a bench
module named like a standard-library one (bench/tokenize.py once was) shadows it and crashes the import."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bench", sorted(path.name for path in (REPO / "bench").glob("*.py")))
def test_each_bench_imports_as_its_command_runs_it(bench):
    code = (f"import runpy, sys; sys.path[0] = {str(REPO / 'bench')!r}; "
            f"runpy.run_path({str(REPO / 'bench' / bench)!r}, run_name='bench_import_check')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
