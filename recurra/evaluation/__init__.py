"""Train-and-test evaluation of layers on synthetic tasks (``recurra eval``).

- :mod:`recurra.evaluation.specs`: what one cell is (task spec x model spec) and the budgets;
- :mod:`recurra.evaluation.suites`: the named experiments (state tracking, JRT, ...);
- :mod:`recurra.evaluation.training`: the supervised train loop and the per-length evaluation;
- :mod:`recurra.evaluation.metrics`: masked token / sequence / last-position accuracy;
- :mod:`recurra.evaluation.runner`: runs cells, resumable, one failure never loses the others;
- :mod:`recurra.evaluation.report`: JSON, markdown tables and PNG plots.
"""
