"""Collect bench/bench_*.py as test modules (pytest.ini's python_files only names test_*.py), so that
``python -m pytest bench/`` runs the benchmarks. Files the configured patterns already
match, and files named on the command line (pytest collects those itself), are left to pytest."""

from fnmatch import fnmatch

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        patterns = parent.config.getini("python_files")
        if not any(fnmatch(file_path.name, p) for p in patterns):
            return pytest.Module.from_parent(parent, path=file_path)
    return None
