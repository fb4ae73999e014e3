"""Evaluation and benchmarking: cases, method runners (ours and the peers elastix, ANTs, demons), scoring with one
set of metrics, tables and plots, and the ``evaluate`` / ``benchmark`` commands."""
