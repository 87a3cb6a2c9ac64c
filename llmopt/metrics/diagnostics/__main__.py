"""`python -m llmopt.metrics.diagnostics ...`: the overhead benchmark (core.benchmark)."""

from llmopt.metrics.diagnostics.core import main

main()
