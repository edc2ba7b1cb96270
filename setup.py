"""Thin shim for tooling that still calls `setup.py` (setuptools' documented pattern).

All metadata (name, version, dependencies, extras, entry points) lives in pyproject.toml; `pip install -e .`
reads it from there, and `python setup.py --version` reads the same file through setuptools.
"""
from setuptools import setup

setup()
