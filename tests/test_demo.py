"""`make demo`'s stages: a stage that fails is one line naming the stage, its log and the log's error."""
import os

import pytest

from singularity_ds.demo import last_error_line, launch
from singularity_ds.errors import SingularityError

# what the deepspeed launcher leaves in a stage's log when a rank dies in an import (the shape of the
# transformers 5.25 / top-level kernels/ failure): the ranks' traceback, then the launcher's own report
LAUNCHER_LOG = """\
[2026-12-06 21:20:01,100] [INFO] [runner.py:630:main] cmd = /v/bin/python -u -m deepspeed.launcher ...
[rank1]: Traceback (most recent call last):
[rank1]:   File "/v/lib/python3.11/site-packages/transformers/integrations/hub_kernels.py", line 104
[rank1]:     from kernels import (
[rank1]: ImportError: cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)
[2026-12-06 21:20:09,310] [INFO] [launch.py:319:sigkill_handler] Killing subprocess 4242
[2026-12-06 21:20:09,311] [ERROR] [launch.py:325:sigkill_handler] ['/v/bin/python', ...] exits with code = 1
Traceback (most recent call last):
  File "/v/lib/python3.11/site-packages/deepspeed/launcher/launch.py", line 325, in sigkill_handler
subprocess.CalledProcessError: Command '['/v/bin/python', '-u']' returned non-zero exit status 1.
"""


def test_last_error_line_finds_the_ranks_error(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text(LAUNCHER_LOG)
    assert last_error_line(str(log)) == ("ImportError: cannot import name 'CUDAProperties' from 'kernels' "
                                         "(/repo/kernels/__init__.py)")
    # a rank's one-line error wins over any traceback line before it
    log.write_text(LAUNCHER_LOG + "[rank0]: singularity-ds: error: config key 'seed' must be >= 0, got -1\n")
    assert last_error_line(str(log)) == "singularity-ds: error: config key 'seed' must be >= 0, got -1"
    log.write_text("just one line\n\n")
    assert last_error_line(str(log)) == "just one line"
    log.write_text("")
    assert last_error_line(str(log)) == "its log is empty"
    missing = tmp_path / "none.log"
    assert last_error_line(str(missing)) == f"its log cannot be read (No such file or directory: {missing})"
    # the launcher's log and each rank's: the line most ranks printed
    (tmp_path / "rank0.log").write_text("Traceback (most recent call last):\nValueError: x\n")
    (tmp_path / "rank1.log").write_text("Traceback (most recent call last):\nValueError: x\n")
    log.write_text(LAUNCHER_LOG)
    ranks = [str(tmp_path / "rank0.log"), str(tmp_path / "rank1.log")]
    assert last_error_line(str(log), *ranks) == "ValueError: x"


@pytest.mark.multiproc
def test_a_failing_stage_is_one_line(tmp_path, monkeypatch):
    """A real 2-rank stage whose ranks die on import: an installed module shadowed on the ranks' path (as the
    repo's kernels/ shadowed Hugging Face's), injected through PYTHONPATH."""
    shadow = tmp_path / "shadow" / "omegaconf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('omegaconf is shadowed here (injected)')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SingularityError) as e:
        launch("pretrain_1f", ["pretrain", "tiny"], str(run))
    assert str(e.value) == ("demo stage pretrain_1f failed (exit 1): ImportError: omegaconf is shadowed "
                            f"here (injected) (logs: {run}/pretrain_1f.log and {run}/pretrain_1f.ranks/)")
    rank_logs = sorted((run / "pretrain_1f.ranks").glob("*_rank*.log"))
    assert [p.name.rsplit("_", 1)[1] for p in rank_logs] == ["rank0.log", "rank1.log"]
    for p in rank_logs:  # each rank's log keeps its whole story, whole lines
        text = p.read_text()
        assert "Traceback" in text and text.count("ImportError: omegaconf is shadowed here (injected)\n") == 1
