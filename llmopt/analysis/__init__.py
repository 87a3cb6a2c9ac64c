"""Reading finished runs: one run reader (runs.py), the figures (plots.py) and the papers' published tables with
the protocols they were measured under (published.py). llmopt.report and scripts/plot_runs.py are built on it."""
