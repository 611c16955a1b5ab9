"""`negmargin plot`: a run's logs across sittings joined into curves and a figure."""

import json

import pytest

from negmargin import cli
from negmargin.curves import read_logs
from negmargin.errors import DataError


def _write(path, entries, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + tail)


def _train(epoch, it, loss):
    return {
        "mode": "train",
        "epoch": epoch,
        "iter": it,
        "lr": 0.1,
        "loss": loss,
        "accuracy": 10.0,
        "time": 0.5,
    }


def _val(epoch, acc):
    return {"mode": "val", "epoch": epoch, "accuracy_mean": acc, "accuracy_ci95": 2.0}


def test_sittings_are_joined_in_time_order_and_a_cut_last_line_is_ignored(tmp_path):
    # sitting 1 was killed in epoch 3 mid-line; sitting 2 resumed and logged epoch 3 again
    _write(tmp_path / "20261206_070037.log.json",
           [_train(1, 4, 3.0), _val(1, 40.0), _train(2, 2, 2.8), _train(2, 4, 2.5), _val(2, 50.0), _train(3, 2, 9.9)],
           tail='{"mode": "tra')  # fmt: skip
    _write(tmp_path / "20261206_091308.log.json", [_train(3, 2, 2.2), _train(3, 4, 2.0), _val(3, 50.0)])
    c = read_logs([tmp_path])
    assert c.epoch_pos == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert c.loss == [3.0, 2.8, 2.5, 2.2, 2.0]  # the resumed sitting's epoch-3 entry replaces the first's
    assert c.val_epoch == [1, 2, 3] and c.val_mean == [40.0, 50.0, 50.0]
    assert c.best == (2, 50.0)  # the first of equals, as training keeps it
    assert len(c.sources) == 2


def test_a_damaged_line_inside_a_log_is_named(tmp_path):
    (tmp_path / "a.log.json").write_text(
        json.dumps(_val(1, 40.0)) + "\nnot json\n" + json.dumps(_val(2, 41.0)) + "\n"
    )
    with pytest.raises(DataError, match=r"a\.log\.json' line 2 is not JSON"):
        read_logs([tmp_path])


def test_plot_command_on_a_trained_run(model_and_images, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tmp, checkpoint, _ = model_and_images
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(checkpoint.parent), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "1 log(s), up to epoch 2.00; best val" in line and str(out) in line
    assert out.stat().st_size > 20_000
    # a folder without logs, a path that does not exist: exit 2 and one line naming it
    assert cli.main(["plot", str(tmp_path), "--out", str(out)]) == 2
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "holds no training log" in err and "nope' does not exist" in err
