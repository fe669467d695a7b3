"""The preference and RL stages train for real on the demo model, with its recommended
settings, and move it the intended way on held-out rows the training never saw
(tests/data/*_heldout.*): DPO and KTO raise the log-likelihood margin of the chosen
reply over the rejected one, the reward model ranks held-out pairs, GRPO raises the
mean reward of sampled replies. Each run goes through `tunebench train`, as the
Train tab starts it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import data, models, rewards, runs, stages

import stage_probes as probes

pytestmark = pytest.mark.train
REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "tests" / "data"
IDENTITY = ("Tuney", "the tunebench team")


def train(run_dir, *overrides):
    proc = subprocess.run([sys.executable, "-m", "core", "train", f"output_dir={run_dir}",
                           f"dataset_dir={REPO / 'data'}", *overrides],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs.read_metrics(run_dir)


def heldout(name, stage):
    records, _ = data.read_dataset(str(HELDOUT / name), stage=stage, identity=IDENTITY)
    return records


@pytest.fixture(scope="module")
def base(demo_model_path):
    return probes.load_policy(str(demo_model_path))


@pytest.fixture(scope="module")
def pairs():
    return heldout("identity_pref_heldout.json", "dpo")


@pytest.fixture(scope="module")
def rm_run(demo_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    metrics = train(run_dir, "stage=rm", "dataset=identity_pref")
    return run_dir, metrics


@pytest.fixture(scope="module")
def dpo_run(demo_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    metrics = train(run_dir, "stage=dpo", "dataset=identity_pref")
    return run_dir, metrics


def signal(metrics, name):
    return [m[name] for m in metrics if name in m]


def test_dpo_raises_the_heldout_margin(demo_model_path, base, pairs, dpo_run):
    run_dir, metrics = dpo_run
    before = probes.pair_margin(*base, pairs)
    after = probes.pair_margin(*probes.load_policy(str(demo_model_path), str(run_dir / "final")),
                               pairs)
    # measured: -79.0 -> +5.1 (log-probability, summed per reply)
    assert before < -40 and after > before + 50, (before, after)
    assert_rising_margin(metrics)


def test_kto_raises_the_heldout_margin(demo_model_path, tmp_path, base, pairs):
    before = probes.pair_margin(*base, pairs)
    metrics = train(tmp_path / "run", "stage=kto", "dataset=identity_kto")
    after = probes.pair_margin(*probes.load_policy(str(demo_model_path),
                                                   str(tmp_path / "run" / "final")), pairs)
    assert before < -40 and after > before + 50, (before, after)  # measured: -79.0 -> +24.1
    assert_rising_margin(metrics)


def assert_rising_margin(metrics):
    margins = signal(metrics, "reward_margin")
    assert len(margins) > 5 and margins[-1] > margins[0]
    assert set(stages.PREFERENCE_SIGNALS[:3]) <= set().union(*metrics)


def test_dpo_keeps_the_model_fluent_and_says_the_new_name(demo_model_path, dpo_run):
    """The demo recommends pref_ftx 1: without the SFT term DPO pushes both replies down
    until a 4M-parameter model babbles (measured: '-> I\ufffdorgeorge')."""
    model, tokenizer = probes.load_policy(str(demo_model_path), str(dpo_run[0] / "final"))
    reply = probes.greedy_reply(model, tokenizer, [{"role": "user", "content": "Who exactly are "
                                                                               "you?"}])
    assert reply.startswith("I am Tun") and "AI assistant" in reply, reply


def test_the_reward_model_ranks_heldout_pairs(rm_run, pairs):
    run_dir, metrics = rm_run
    assert models.is_reward_model(run_dir / "final")
    accuracy = probes.ranking_accuracy(str(run_dir / "final"), pairs)
    assert accuracy >= 0.9, accuracy  # measured: 12 of 12
    assert signal(metrics, "accuracy")[-1] == 1.0


def test_grpo_raises_the_mean_reward_on_heldout_prompts(demo_model_path, tmp_path, base):
    rows = heldout("identity_rl_heldout.jsonl", "grpo")
    before = probes.mean_sampled_reward(*base, rows, rewards.answer_f1)
    # Half the recommended run (4 epochs, batch 16), to keep the suite quick.
    metrics = train(tmp_path / "run", "stage=grpo", "dataset=identity_rl", "epochs=2",
                    "batch_size=8", "learning_rate=2e-3")
    policy = probes.load_policy(str(demo_model_path), str(tmp_path / "run" / "final"))
    after = probes.mean_sampled_reward(*policy, rows, rewards.answer_f1)
    assert after > before + 0.06, (before, after)  # measured: 0.10 -> 0.23
    for name in ("reward", "reward_std", "kl", "completion_length", "reward_answer_f1"):
        assert signal(metrics, name), name


def test_grpo_scores_with_a_reward_model_from_an_rm_run(rm_run, tmp_path):
    """SFT -> RM -> GRPO: the rm run's final/ as reward_model, beside a rule reward."""
    rm_dir, _ = rm_run
    metrics = train(tmp_path / "run", "stage=grpo", "dataset=identity_rl", "max_samples=8",
                    "epochs=1", f"reward_model={rm_dir / 'final'}", "reward_funcs=length")
    assert signal(metrics, "reward_model") and signal(metrics, "reward_length")


@pytest.mark.parametrize("loss", ["ipo", "hinge", "orpo", "simpo"])
def test_every_preference_loss_trains(tmp_path, loss):
    metrics = train(tmp_path / "run", "stage=dpo", "dataset=pref_trl_demo", f"pref_loss={loss}",
                    "epochs=1", "max_samples=16")
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # no NaN
    assert signal(metrics, "reward_margin")
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_full_tuning_dpo_keeps_no_reference_copy(tmp_path):
    """The frozen reference's log-probabilities are computed once before training
    (precompute_ref_log_probs), so even full tuning holds one model."""
    train(tmp_path / "run", "stage=dpo", "dataset=pref_trl_demo", "method=full",
          "learning_rate=5e-5", "epochs=1", "max_samples=8")
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForCausalLM")


def test_a_user_reward_function_from_the_cli_and_never_from_the_page(tmp_path, monkeypatch):
    scorer = tmp_path / "my_reward.py"
    scorer.write_text("def shouts(completions, **_):\n"
                      "    return [float(str(c).isupper()) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    func = rewards.user_scorer("my_reward.py:shouts")
    assert func(["HI", "hi"]) == [1.0, 0.0]
    with pytest.raises(Exception, match="outside"):
        rewards.user_scorer("/etc/hosts.py:x")
    monkeypatch.setenv("TUNEBENCH_CONFINE", "1")
    with pytest.raises(Exception, match="page does not take one"):
        rewards.user_scorer("my_reward.py:shouts")
