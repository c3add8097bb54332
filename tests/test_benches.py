"""Every bench starts as a user runs it (`python bench/NAME.py`, which puts bench/ first on sys.path): a bench
module named like a standard-library one (bench/tokenize.py once was) shadows it and crashes the import.

bench/llamafactory_setup.py runs in LLaMA-Factory's own environment (`make llamafactory`), checked where it exists."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCHES = sorted(path.name for path in (REPO / "bench").glob("*.py"))


def test_no_bench_module_is_named_like_a_standard_library_one():
    assert BENCHES and not {name.removesuffix(".py") for name in BENCHES} & sys.stdlib_module_names


def import_as_run(python, benches: list[str]) -> subprocess.CompletedProcess:
    """Each bench's module code (not its main), in one process, with bench/ first on sys.path as `python bench/X.py`
    puts it (each bench then replaces it with the repository's root, so it is set again for each)."""
    code = "import runpy, sys\n" + "".join(
        f"sys.path[0] = {str(REPO / 'bench')!r}; runpy.run_path({str(REPO / 'bench' / bench)!r}, "
        f"run_name='bench_import_check')\n" for bench in benches)
    return subprocess.run([str(python), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_each_bench_imports_as_its_command_runs_it():
    result = import_as_run(sys.executable, [bench for bench in BENCHES if bench != "llamafactory_setup.py"])
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_the_llamafactory_setup_imports_in_llamafactorys_environment():
    python = REPO / ".venv-llamafactory" / "bin" / "python"
    if not python.exists():
        pytest.skip("LLaMA-Factory's environment is not installed (make llamafactory)")
    result = import_as_run(python, ["llamafactory_setup.py"])
    assert result.returncode == 0, result.stderr[-2000:]
