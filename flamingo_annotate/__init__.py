"""The `flamingo-annotate` command and the tools behind its commands, above the libraries they drive.

  cli.py             the command group and the annotation commands: validate, run, submit, status, logs,
                     query, demo (pipeline/)
  model_commands.py  commands that make or measure a model: train, recipe, eval (training/), bench
  bench.py           the throughput benchmark behind `bench`
  reference.py       OpenFlamingo 2.0.1's own model around the same weights, the numerical reference of
                     the benchmark and of the parity tests

Libraries never import this package: `pipeline/`, `training/`, `media/` and `flamingo/` are usable
without it, and each command imports the heavy ones (Ray, torch, DuckDB) only when it runs.
"""
