"""Data-parallel training under torchrun (gloo on CPU, 2 processes): the same weights as one process at the
same global batch, a killed rank named and the job restarted from its checkpoint, and a resume with
another number of processes."""

import shutil
import signal
import time

import pytest
import torch

from mtc.checkpoint import load
from mtc.cli import main

from conftest import train_args
from test_layer_parallel import JOB_TIMEOUT, finish, rank_processes, torchrun

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 sums over the batch, taken in another order


def run_args(model_dir, out, *extra, steps=30):
    return train_args(model_dir, out, "--prefix-sizes", "16", "64", "--k-aux", "16", *extra, steps=steps)


def final_weights(run_dir):
    return load(run_dir / "final").state_dict()


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def single(tiny_dirs, tmp_path_factory):
    """One process: a Matryoshka run and a plain BatchTopK run of 30 steps."""
    out = tmp_path_factory.mktemp("single")
    assert main(run_args(tiny_dirs["gemma2"], out)) == 0
    assert main(run_args(tiny_dirs["gemma2"], out, "--prefix-sizes", "64", "--run-name", "plain")) == 0
    return {"matryoshka": final_weights(out / "r"), "plain": final_weights(out / "plain")}


@pytest.fixture(scope="module")
def two_ranks(tiny_dirs, tmp_path_factory):
    """The same two runs, each by 2 processes: {kind: run dir}."""
    out = tmp_path_factory.mktemp("two")
    for extra in ((), ("--prefix-sizes", "64", "--run-name", "plain")):
        code, printed = finish(torchrun(run_args(tiny_dirs["gemma2"], out, *extra)))
        assert code == 0, printed[-3000:]
    return {"matryoshka": out / "r", "plain": out / "plain"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["matryoshka", "plain"])
def test_two_ranks_give_the_weights_of_one_process(single, two_ranks, kind):
    assert_close_weights(single[kind], final_weights(two_ranks[kind]))
    lines = (two_ranks[kind] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone logs (steps 10, 20, 30)


@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_restart_resumes(two_ranks, tiny_dirs, tmp_path):
    checkpoint = tmp_path / "r" / "checkpoints" / "step_10"
    job = torchrun(run_args(tiny_dirs["gemma2"], tmp_path), "--max-restarts", "1")
    deadline = time.monotonic() + JOB_TIMEOUT
    while not checkpoint.is_dir():
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.02)
    rank_processes(job)[1].send_signal(signal.SIGKILL)
    code, out = finish(job)
    assert code == 0, out[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in out
    assert out.count("resumed from step") == 2  # both ranks, from rank 0's checkpoint
    resumed, uninterrupted = final_weights(tmp_path / "r"), final_weights(two_ranks["matryoshka"])
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)  # same world size: exact


@pytest.mark.slow
def test_another_number_of_processes_resumes_with_a_note(single, tiny_dirs, tmp_path):
    assert main(run_args(tiny_dirs["gemma2"], tmp_path, "--keep-checkpoints", "3")) == 0  # one process
    for later in ("checkpoints/step_20", "checkpoints/step_30", "final"):  # as if stopped after step 10
        shutil.rmtree(tmp_path / "r" / later)
    code, out = finish(torchrun(run_args(tiny_dirs["gemma2"], tmp_path, "--keep-checkpoints", "3")))  # two
    assert code == 0, out[-3000:]
    assert "written by 1 process(es), this run has 2" in out
    assert_close_weights(single["matryoshka"], final_weights(tmp_path / "r"))
