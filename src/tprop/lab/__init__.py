"""The lab: sweeps of training runs from TOML specs, reports of their results, and the
experiment specs of the paper's findings (``tprop sweep``, ``tprop report``,
``tprop reproduce``). The core never imports it."""
