"""Evaluation and benchmarking, one harness for ``deepabdominalreg evaluate``, ``evaluate-model`` and ``benchmark``.

* :mod:`.cases`: image pairs with their labels, landmarks and true fields (a pairs CSV or generated pairs);
* :mod:`.methods`: what a method is, our pipeline's variants under one naming scheme (``ours-<variant>``), ``none``;
* :mod:`.peers`: elastix, ANTs SyN and SimpleITK demons as methods;
* :mod:`.scoring`: the metrics every method's field is scored with;
* :mod:`.runners`: every method on every case, in fresh processes, written to CSV, Markdown and plots;
* :mod:`.tables`: result rows as CSV, summaries, Markdown tables and plots;
* :mod:`.environment`: what a result was measured on;
* :mod:`.benchmark` and :mod:`.cli`: the ``benchmark`` and ``evaluate`` commands.
"""
