"""The lab: sweeps of training runs from TOML specs, reports of their results, and the
experiment specs of the paper's findings (``tprop sweep``, ``tprop report``,
``tprop reproduce``). The core never imports it.

Sweeps: :mod:`~tprop.lab.spec` (the spec format), :mod:`~tprop.lab.corpora` (its ``[data]``
table), :mod:`~tprop.lab.expand` (its runs), :mod:`~tprop.lab.runner` (one run),
:mod:`~tprop.lab.pool` (worker processes), :mod:`~tprop.lab.sweep` (the whole sweep).
Reports: :mod:`~tprop.lab.runs` (reading run directories), :mod:`~tprop.lab.tables`,
:mod:`~tprop.lab.plots`, :mod:`~tprop.lab.long_range`, :mod:`~tprop.lab.report` (the
sections of ``report.md``). :mod:`~tprop.lab.experiments`: ``tprop reproduce``. Their
commands are parsed by ``tprop.cli``.
"""
