"""The lab's lists are the configuration's metadata: sweep identity, report columns and
headers, the fields that do not apply to a method."""

from __future__ import annotations

from pathlib import Path

from tprop.config import META, NOT_IDENTITY, REPORTED, applies, label_of
from tprop.lab.runner import NOT_IDENTITY as SWEEP_NOT_IDENTITY
from tprop.lab.runs import Run
from tprop.lab.tables import HEADERS


def test_sweep_identity_is_the_metadatas() -> None:
    assert set(SWEEP_NOT_IDENTITY) == set(NOT_IDENTITY) | {"preset"}
    assert {"epochs", "out", "device", "threads", "tensorboard"} <= set(SWEEP_NOT_IDENTITY)
    assert "lr" not in SWEEP_NOT_IDENTITY and "recurrence" not in SWEEP_NOT_IDENTITY


def test_report_columns_and_headers_are_the_metadatas() -> None:
    for name in META:
        assert HEADERS[name] == label_of(name)
    assert "epochs" in REPORTED and "out" not in REPORTED and "threads" not in REPORTED
    assert "credit_blocks" in REPORTED and "rec_tol" in REPORTED


def test_a_field_a_method_does_not_read_shows_as_missing() -> None:
    cfg = {"method": "bptt", "h_steps": 3, "batch_size": 7, "recurrence": "jacobi",
           "credit_blocks": 2}
    run = Run(Path("x"), "x", cfg)
    for name, value in cfg.items():
        if name == "method":
            continue
        assert run.param(name) == (value if applies(name, "bptt") else None), name
    pm = Run(Path("y"), "y", {"method": "pm", "h_steps": 3, "batch_size": 7,
                             "credit_blocks": 2})
    assert pm.param("h_steps") == 3 and pm.param("batch_size") is None
    assert pm.param("credit_blocks") is None
