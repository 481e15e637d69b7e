"""Layer-parallel sets under torchrun (gloo on CPU, 2 processes): the same set as one process, bit for bit;
a killed rank takes the job down and a restart resumes it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from mtc.cli import main
from mtc.sets import agree_on_checkpoints, load_set

from test_sets import assert_same_weights, set_args

JOB_TIMEOUT = 240  # seconds: a hang fails the test instead of stalling CI


def torchrun(args: list[str], *extra: str, timeout: float = JOB_TIMEOUT) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTC_DIST_TIMEOUT_S": "60"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra,
                             "-m", "mtc", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = job.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the torchrun job hung for more than {JOB_TIMEOUT} s")
    return job.returncode, out


def weights(set_dir):
    return {layer: model.state_dict() for layer, model in load_set(set_dir).items()}


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    """The 3-layer set of a 40-step run, trained in one process."""
    out = tmp_path_factory.mktemp("single")
    assert main(set_args(tiny_dirs["gemma2"], out, steps=40)) == 0
    return weights(out / "s")


@pytest.mark.slow
def test_two_ranks_train_the_same_set_as_one_process(reference, tiny_dirs, tmp_path):
    code, out = finish(torchrun(set_args(tiny_dirs["gemma2"], tmp_path, steps=40)))
    assert code == 0, out[-3000:]
    assert "2 ranks: 0,1 | 2" in out  # rank 0 trains layers 0-1, rank 1 layer 2
    assert_same_weights(reference, weights(tmp_path / "s"))


def rank_processes(job: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "mtc" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_a_restart_resumes_it(reference, tiny_dirs, tmp_path):
    first_checkpoint = tmp_path / "s" / "layer_2" / "checkpoints" / "step_8"
    job = torchrun(set_args(tiny_dirs["gemma2"], tmp_path, steps=40), "--max-restarts", "1")
    deadline = time.monotonic() + JOB_TIMEOUT
    while not first_checkpoint.is_dir():
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.02)
    victim = rank_processes(job)[1]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code, out = finish(job)
    assert code == 0, out[-3000:]  # torchrun restarted both ranks once and --resume auto finished the set
    assert "failed (exitcode: -9) local_rank: 1" in out  # torchrun names the rank that died
    assert out.count("resumed from step 8") == 2  # both ranks, from the same step
    assert time.monotonic() - killed_at < 120
    assert_same_weights(reference, weights(tmp_path / "s"))


def test_ranks_continue_from_a_step_every_rank_holds(tmp_path):
    """A rank killed while writing leaves a newer step on the other ranks; it is set aside, not deleted."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        dirs = [tmp_path / "layer_0", tmp_path / "layer_1"]
        for folder, steps in zip(dirs, ([4, 8], [4])):
            for step in steps:
                (folder / "checkpoints" / f"step_{step}").mkdir(parents=True)
                (folder / "checkpoints" / f"step_{step}" / "meta.json").write_text("{}")
        agree_on_checkpoints(dirs, [None, None])
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in (dirs[0] / "checkpoints").iterdir()) == [".unmatched-step_8", "step_4"]
    assert sorted(p.name for p in (dirs[1] / "checkpoints").iterdir()) == ["step_4"]
