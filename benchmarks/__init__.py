"""Benchmarks of llm-pipeline against the usual ways of calling an LLM API from Python.

``python -m benchmarks`` runs the suite (:mod:`benchmarks.run`); ``python -m benchmarks.caller``
checks the LLM caller's own performance targets; ``python benchmarks/runtime.py`` measures the
runtime alone.
"""
