"""A save killed at any moment leaves a checkpoint that loads as all-old or all-new, never a mix.

Deterministic: a forked child saves with a step hook that SIGKILLs it after step N, for every N of every kind
of save (shards to shards, one file to one file, and the switches between them, with a changed config), then
the parent loads. Random: a real `kill -9` of a subprocess that saves in a loop.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import bamboo.models.checkpoint as checkpoint
from bamboo.models import BambooConfig, BambooForCausalLM

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
SHARDED, ONE_FILE = 700_000, "5GB"


def make_model(seed, rope_theta):
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, rope_theta=rope_theta)
    return BambooForCausalLM.from_config(config, seed=seed)


OLD, NEW = make_model(0, 10000.0), make_model(1, 5000.0)


def which_checkpoint(directory) -> str:
    """'old' or 'new' when every tensor and the config come from that save; anything else fails the test."""
    loaded = BambooForCausalLM.from_pretrained(directory)
    state = loaded.state_dict()
    for name, model in (("old", OLD), ("new", NEW)):
        if loaded.config.rope_theta == model.config.rope_theta:
            reference = model.state_dict()
            mixed = [k for k in reference if not torch.equal(reference[k], state[k])]
            assert not mixed, f"config of the {name} checkpoint with other weights for {mixed[:3]}"
            return name
    raise AssertionError(f"unknown config {loaded.config}")


def committed_files(directory) -> set:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {"config.json", index.name, *json.loads(index.read_text())["weight_map"].values()}
    return {"config.json", "model.safetensors"}


def save_steps(tmp_path, old_size, new_size) -> list[str]:
    directory = tmp_path / "count"
    OLD.save_pretrained(directory, max_shard_size=old_size)
    steps = []
    checkpoint._save_step_hook = steps.append
    try:
        NEW.save_pretrained(directory, max_shard_size=new_size)
    finally:
        checkpoint._save_step_hook = None
    return steps


def save_killed_after(directory, size, step: int) -> int:
    """Save NEW in a forked child that SIGKILLs itself right after completing `step` steps; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            done = []

            def hook(name):
                done.append(name)
                if len(done) == step:
                    os.kill(os.getpid(), signal.SIGKILL)

            checkpoint._save_step_hook = hook
            NEW.save_pretrained(directory, max_shard_size=size)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a child that hangs (a lock held at fork) fails the test, not the run
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the saving child hung before step {step}")


@pytest.mark.parametrize("old_size, new_size", [(SHARDED, SHARDED), (ONE_FILE, ONE_FILE), (SHARDED, ONE_FILE),
                                                (ONE_FILE, SHARDED)],
                         ids=["shards-to-shards", "file-to-file", "shards-to-file", "file-to-shards"])
def test_kill_after_every_step_loads_all_old_or_all_new(tmp_path, old_size, new_size):
    steps = save_steps(tmp_path, old_size, new_size)
    assert len(steps) >= 3
    base = tmp_path / "old"
    OLD.save_pretrained(base, max_shard_size=old_size)
    seen = []
    for n in range(1, len(steps) + 1):
        directory = tmp_path / f"killed-after-{n}"
        shutil.copytree(base, directory)
        status = save_killed_after(directory, new_size, n)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed after step {n}"
        seen.append(which_checkpoint(directory))
        # the next save tidies what the killed one left: no scratch files, no unreferenced weights
        OLD.save_pretrained(directory, max_shard_size=old_size)
        assert which_checkpoint(directory) == "old"
        assert {p.name for p in directory.iterdir()} == committed_files(directory)
    # before the commit the old checkpoint loads, after it the new one, and the switch happens once
    assert seen[0] == "old" and seen[-1] == "new" and seen == sorted(seen, key=["old", "new"].index), seen


SAVE_LOOP = textwrap.dedent("""
    import sys
    from bamboo.models import BambooConfig, BambooForCausalLM

    def make_model(seed, rope_theta):
        config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, rope_theta=rope_theta)
        return BambooForCausalLM.from_config(config, seed=seed)

    old, new = make_model(0, 10000.0), make_model(1, 5000.0)
    print("ready", flush=True)
    while True:
        for model, size in ((new, 700_000), (old, "5GB"), (new, "5GB"), (old, 700_000)):
            model.save_pretrained(sys.argv[1], max_shard_size=size)
""")


@pytest.mark.slow
def test_real_kill_9_at_a_random_moment(tmp_path):
    directory = tmp_path / "ckpt"
    OLD.save_pretrained(directory, max_shard_size=SHARDED)
    env = {**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).parents[2])}
    rng = random.Random()
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(directory)], stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        assert which_checkpoint(directory) in ("old", "new")
