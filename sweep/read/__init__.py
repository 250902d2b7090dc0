"""Reading a study's results: seed aggregation, the Pareto front and knees, the report and its
plots, queries and comparisons of outputs. Nothing here imports ``sweep.run``: the results
(``sweep.results``) are the only contract between running and reading."""
