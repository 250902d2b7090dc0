"""anomaly-sweep: Ray-distributed sweeps for unsupervised visual anomaly detection.

The flow is one-way: study (``sweep.study``) -> runner (``sweep.runner``, Ray Tune) ->
trainable (``sweep.trainable``) -> results (``sweep.results``, Parquet) -> analysis
(``sweep.analysis``, ``sweep.plots``) and the ``sweep`` CLI (``sweep.cli``).
"""

__version__ = "0.1.0"
