"""anomaly-sweep: Ray-distributed sweeps for unsupervised visual anomaly detection.

The flow is one-way: study (``sweep.run.study``) -> runner (``sweep.run.runner``, Ray Tune) ->
trainable (``sweep.run.trainable``) -> results (``sweep.results``, Parquet) -> analysis
(``sweep.read.analysis``, ``sweep.read.plots``) and the ``sweep`` CLI (``sweep.cli``).
"""

__version__ = "0.1.0"
