"""Why a worker failed a scale decision, as a short bounded label (for metrics and status): the
loader's ack carries the free text per worker (`ScaleAck.failed`); the scaler's back-off and the
gateway's `scale_failures_total` both label it with `reason_kind`."""

from __future__ import annotations


def reason_kind(reason: str) -> str:
    """A short, bounded label for a failure text (Prometheus labels must not take free text)."""
    r = reason.lower()
    for needle, kind in (
        ("model-source network", "no_model_store"),
        ("no config.json", "no_model_files"),
        ("load_failed", "load_failed"),
        ("refused", "refused"),
        ("did not answer", "no_answer"),
        ("stopped heart-beating", "worker_lost"),
        ("not serving", "timeout"),
        ("gave up loading", "gave_up"),
        ("transfer", "transfer_failed"),
        ("checksum", "transfer_failed"),
    ):
        if needle in r:
            return kind
    return "other"
