"""Issue 12: a step that skipped more than 10% of its drawn samples warns with the reasons; totals per reason."""

from __future__ import annotations

import json
from collections import Counter

from dpcap.train.metrics import MetricWriter, skipped_totals
from dpcap.train.reduce import LocalReducer
from dpcap.train.step import SKIPPED_WARN_FRACTION, StepStats, skipped_warning


def stats(used: int, **skipped: int) -> StepStats:
    return StepStats(batch_size=used, skipped=Counter(skipped))


def test_no_warning_up_to_ten_percent() -> None:
    assert SKIPPED_WARN_FRACTION == 0.10
    assert skipped_warning(stats(0)) is None  # an empty draw: nothing to warn about
    assert skipped_warning(stats(50)) is None
    assert skipped_warning(stats(90, corrupt_image=10)) is None  # exactly 10%


def test_warning_above_ten_percent_names_the_reasons() -> None:
    message = skipped_warning(stats(89, corrupt_image=8, too_many_pixels=3), step=17)
    assert message is not None and message.startswith("step 17: 11 of the 100 drawn samples (11%) were skipped")
    assert "(corrupt_image: 8, too_many_pixels: 3)" in message
    assert "step" not in skipped_warning(stats(0, bad_caption=2)).split(":")[0]  # no step given
    assert skipped_warning(stats(10, bad_meta=2), threshold=0.5) is None


def test_reduce_keeps_the_reasons_and_summary_reports_them() -> None:
    s = stats(7, corrupt_image=2, bad_caption=1, mystery=1)
    s.loss_sum = 7.0
    s.reduce(LocalReducer())
    assert s.skipped == {"corrupt_image": 2, "bad_caption": 1, "other": 1} and s.drawn == 11
    summary = s.summary()
    assert summary["skipped"] == 4 and summary["skipped_reasons"] == {"bad_caption": 1, "corrupt_image": 2, "other": 1}
    assert "skipped_reasons" not in stats(3).summary()


def test_skipped_totals_sum_the_logged_steps(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "skipped": 3, "skipped_reasons": {"corrupt_image": 2, "too_many_pixels": 1}},
        {"step": 2, "skipped": 0},
        {"step": 3, "skipped": 1, "skipped_reasons": {"corrupt_image": 1}},
        {"step": 4, "skipped": 2},  # logged before reasons were: counted as unknown
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert skipped_totals(path) == {"corrupt_image": 3, "too_many_pixels": 1, "unknown": 2}
    assert skipped_totals(tmp_path / "none.jsonl") == {}


def test_metric_writer_warns_on_stderr(tmp_path, capsys) -> None:
    for progress in (False, True):
        writer = MetricWriter(tmp_path, total_steps=3, wandb_mode="disabled", progress=progress)
        writer.warn("step 2: most samples were skipped")
        writer.close()
        assert "warning: step 2: most samples were skipped" in capsys.readouterr().err
    silent = MetricWriter(tmp_path, total_steps=3, wandb_mode="disabled", enabled=False)
    silent.warn("not rank 0")
    assert capsys.readouterr().err == ""
