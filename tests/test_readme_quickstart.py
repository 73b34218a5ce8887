"""The README's first command must work as written (shortened with --set so it takes seconds)."""

from __future__ import annotations

import json
import re
import shlex

from launch_utils import BIN, REPO, env, small_corpus, tb_scalars
import subprocess


def readme_commands() -> tuple[str, str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_opens_with_install_train_and_test_commands():
    install_and_train, tests = readme_commands()
    assert install_and_train.startswith('pip install torch==2.13.0 -e ".[dev]" && deepspeed --num_gpus 2 launch/train.py')
    assert tests == "python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install --quiet torch==2.13.0 -e ".[dev]"' in ci and "python -m pytest -q" in ci


def test_readme_quickstart_trains(tmp_path):
    train_cmd = readme_commands()[0].split("&&", 1)[1].strip()
    argv = shlex.split(train_cmd)
    assert argv[0] == "deepspeed"
    argv[0] = str(BIN / "deepspeed")
    # Same config and launcher; fewer steps, a private run dir and data cache.
    argv += ["--set", "train.max_steps=6", "train.log_every=2", "train.eval_every=6", "train.save_every=6",
             f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
             f"data.source={small_corpus(tmp_path / 'corpus')}"]
    proc = subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout
    assert "train.precision auto -> " in proc.stdout  # the config asks for auto; the log says what it chose here
    loss = tb_scalars(tmp_path / "run", "train/loss")
    assert sorted(loss) == [1, 2, 4, 6] and loss[6] < loss[1]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
