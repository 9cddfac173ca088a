"""Clean output (issue 25): plain progress lines when output is redirected, one row per run in the search report."""
import io
import json

import pytest

from oms_lightning import progress as progress_module
from oms_lightning.progress import PlainProgress, progress


def test_redirected_progress_is_plain_periodic_lines(monkeypatch, capsys):
    clock = iter(range(0, 1000, 7))   # every call to the clock advances 7 s
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    with PlainProgress(total=20, desc="schedule→FID", unit="schedule", every=30.0) as bar:
        for i in range(20):
            bar.update()
            bar.set_postfix(fid=f"{i:.1f}")
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) < 20 and all("\r" not in line for line in lines)
    assert lines[-1].startswith("schedule→FID: 20/20 (100 %)") and lines[-1].endswith("fid=19.0")


def test_a_quiet_bar_prints_nothing_and_iteration_counts(capsys):
    assert list(PlainProgress(range(3), desc="x", leave=False)) == [0, 1, 2]
    assert list(PlainProgress(range(3), desc="x", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    items = PlainProgress(range(4), desc="sampling", every=1e9)
    assert list(items) == [0, 1, 2, 3] and items.n == 4
    assert capsys.readouterr().err.startswith("sampling: 4/4 (100 %), ")


def test_progress_picks_a_live_bar_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(total=3, file=io.StringIO()), PlainProgress)
    bar = progress(total=3, file=Tty())
    assert not isinstance(bar, PlainProgress)
    bar.close()


def _summary(budget, fid):
    return {"budget": budget, "fid_ci": [fid - 1, fid + 1], "fid_mean": fid, "baseline_fid_mean": fid + 1,
            "baseline_fid_ci": [fid, fid + 2], "verdict": "tie", "schedule": "s", "cost": budget,
            "baseline_schedule": "b", "baseline_sampler": {}, "baseline_cost": budget, "diff": -1.0,
            "diff_ci": [-2.0, 0.5], "baseline_cost_at_equal_fid": None, "wall_seconds": {"searched": 0.1,
                                                                                          "baseline": 0.1}}


def test_the_report_lists_a_run_once_whichever_copies_exist(tmp_path, capsys):
    from oms_lightning.jobs.report import collect, main

    run = tmp_path / "outputs" / "search" / "run1"
    copy = tmp_path / "outputs" / "wandb" / "wandb" / "offline-run-1" / "files"
    other = tmp_path / "outputs" / "search" / "run2"
    for folder, rows in ((run, [_summary(300, 5.0), _summary(600, 4.0)]), (copy, [_summary(300, 5.0),
                                                                                 _summary(600, 4.0)]),
                         (other, _summary(300, 6.0))):
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(rows))
    rows = collect([tmp_path / "outputs" / "search", tmp_path / "outputs" / "wandb"])
    assert len(rows) == 3
    assert sorted((r["budget"], r["fid_mean"]) for r in rows) == [(300, 5.0), (300, 6.0), (600, 4.0)]
    first = next(r for r in rows if r["fid_mean"] == 5.0)
    assert first["source"].startswith(str(run)) and first["copies"] == [str(copy / "summary.json")]
    main([str(tmp_path / "outputs"), "--out", str(tmp_path / "frontier.png")])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300") or
             line.startswith("| 600")]
    assert len(table) == 3
