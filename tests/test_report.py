"""write_report on fabricated run directories: a complete one (manifests, metrics.jsonl, eval files)
and ones with pieces missing, which must still give a report."""

import json

from r1pipeline import rundir
from r1pipeline.report import MISMATCH, write_report

GRPO_KEYS = ("reward", "rewards/accuracy/mean", "rewards/format/mean", "completions/mean_length", "kl", "entropy",
             "clip_ratio/region_mean", "frac_reward_zero_std")


HOST = {"cpu": "AMD EPYC", "isa": ["avx2", "avx"], "cores": 2}


def write_stage(run_dir, stage, steps, keys=(), wall_time_s=12.5, host=None):
    (run_dir / stage).mkdir(parents=True)
    manifest = {"stage": stage, "wall_time_s": wall_time_s, **({"host": host} if host else {})}
    rundir.atomic_write_json(run_dir / stage / "manifest.json", manifest)
    rows = [{"step": step, "loss": 1.0 / step, **{key: step / 10 for key in keys}} for step in range(1, steps + 1)]
    (run_dir / stage / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 9, "rew')


def write_eval(run_dir, stage, pass1, cons=None):
    record = {"k": 4, "pass@1": pass1, "pass@k": {"1": pass1, "2": pass1 + 0.1, "4": pass1 + 0.2},
              "samples": [{"id": "0", "prompt": "System.\nUser: 5 + 7?\nAssistant:", "correct": pass1 > 0.5,
                           "completion": f"<think>{stage} thinks</think><answer>12</answer>"}]}
    if cons is not None:
        record["cons@k"] = cons
    (run_dir / "eval").mkdir(exist_ok=True)
    rundir.atomic_write_json(run_dir / "eval" / f"{stage}.json", record)


def test_full_run(tmp_path):
    run_dir = tmp_path / "run"
    write_stage(run_dir, "sft", 6, wall_time_s=30.0, host=HOST)
    write_stage(run_dir, "grpo", 5, GRPO_KEYS, host={**HOST, "gpu": "NVIDIA H100 80GB HBM3"})
    write_eval(run_dir, "sft", 0.25, cons=0.3)
    write_eval(run_dir, "grpo", 0.625, cons=0.7)
    report = write_report(run_dir)
    text = report.read_text()
    assert report == run_dir / "report.md"
    assert "| sft | – | 6 | 30 | 4 | 0.250 | 0.300 | 0.450 |" in text
    assert "| grpo | – | 5 | 12 | 4 | 0.625 | 0.700 | 0.825 |" in text
    assert "- rejection: not run" in text and "- align: not run" in text
    assert "- wall times measured on AMD EPYC (avx2, 2 cores) and NVIDIA H100 80GB HBM3" in text
    pngs = {path.name for path in (run_dir / "plots").glob("*.png")}
    expected = {"reward.png", "rewards_accuracy_mean.png", "rewards_format_mean.png", "completions_mean_length.png",
                "kl.png", "entropy.png", "clip_ratio_region_mean.png", "frac_reward_zero_std.png", "pass_at_k.png"}
    assert pngs == expected, "one figure per logged quantity, no figure for the loss"
    assert all((run_dir / "plots" / name).read_bytes().startswith(b"\x89PNG") for name in pngs)
    assert all(f"](plots/{name})" in text for name in pngs)
    assert "kl: not logged" not in text
    assert "### sft (before RL)" in text and "### grpo (after RL)" in text
    assert "    User: 5 + 7?\n    Assistant:<think>grpo thinks</think>" in text


def test_missing_pieces(tmp_path):
    run_dir = tmp_path / "run"
    write_stage(run_dir, "sft", 3)
    text = write_report(run_dir).read_text()
    assert "| sft | – | 3 | 12 | – | – | – | – |" in text and "- sft: not evaluated yet" in text
    assert "no metrics.jsonl in grpo or align" in text and "after RL: no evaluated grpo or align" in text
    assert list((run_dir / "plots").glob("*.png")) == []
    assert "wall times measured on" not in text  # a manifest of an older version names no host

    write_eval(run_dir, "grpo", 0.5)  # a code eval (no cons@k), its stage directory since set aside
    text = write_report(run_dir).read_text()
    assert "| grpo | – | – | – | 4 | 0.500 | – | 0.700 |" in text
    assert (run_dir / "plots" / "pass_at_k.png").is_file()

    write_stage(run_dir, "align", 2, [key for key in GRPO_KEYS if key != "kl"])  # beta = 0: TRL logs no kl
    with open(run_dir / "align" / "metrics.jsonl", "a") as f:  # a curve's key logged without a number: no figure
        f.write('\n{"step": 3, "sampling/kl_k3": null}\n')
    text = write_report(run_dir).read_text()
    assert "- kl: not logged, so not drawn (TRL computes it only with beta > 0)" in text

    assert "not run" in write_report(tmp_path / "empty").read_text()


def test_rl_runs_report_the_rollout_trainer_mismatch(tmp_path):
    run_dir = tmp_path / "run"
    write_stage(run_dir, "grpo", 4, (*GRPO_KEYS, *MISMATCH))  # steps 1-4 log 0.1 ... 0.4
    write_stage(run_dir, "align", 2, GRPO_KEYS)               # mismatch_metrics: false, nothing logged
    text = write_report(run_dir).read_text()
    assert "## Rollout vs trainer" in text
    # k3, mean |Δlogp|, max |Δlogp| (the largest logged), > ln 2, IS clipped, routers (trained, free)
    assert "| grpo | 4 | 0.25 | 0.25 | 0.4 | 0.25 | 0.25 | 0.25 | 0.25 |" in text
    assert "| mean \\|Δlogp\\| |" in text, "a | inside a cell is escaped, or the table breaks"
    assert "| align |" not in text.split("## Rollout vs trainer")[1]
    assert {"sampling_kl_k3.png", "routing_router_mismatch_free.png", "routing_router_mismatch.png"} <= {
        path.name for path in (run_dir / "plots").glob("*.png")}
    assert "Rollout vs trainer" not in write_report(tmp_path / "empty").read_text()


def test_a_control_run_is_found_and_shown_beside_the_run(tmp_path):
    run_dir, control = tmp_path / "demo", tmp_path / "demo-control"
    write_stage(run_dir, "sft", 6)
    (run_dir / "sft" / "final").mkdir()
    (run_dir / "sft" / "final" / "config.json").write_text("{}")  # what its content hash covers
    write_stage(run_dir, "grpo", 20, GRPO_KEYS)
    write_eval(run_dir, "sft", 0.25)
    write_eval(run_dir, "grpo", 0.625)
    record = rundir.read_json(run_dir / "eval" / "grpo.json")
    record.update(styles={"worked": {"share": 0.999, "pass@1": 0.7}, "bare": {"share": 0.001, "pass@1": None}},
                  mean_completion_length=41.25)
    rundir.atomic_write_json(run_dir / "eval" / "grpo.json", record)
    # Another run's GRPO from another checkpoint, with shuffled rewards: not this run's control.
    write_stage(tmp_path / "other", "grpo", 3, GRPO_KEYS)
    rundir.atomic_write_json(tmp_path / "other" / "grpo" / "manifest.json", {
        "stage": "grpo", "input": {"hash": "elsewhere"}, "config": {"grpo": {"shuffle_rewards": True}}})
    assert write_report(run_dir).read_text().count("control") == 0

    write_stage(control, "grpo", 20, GRPO_KEYS)
    rundir.atomic_write_json(control / "grpo" / "manifest.json", {
        "stage": "grpo", "wall_time_s": 40.0, "config": {"grpo": {"shuffle_rewards": True}},
        "input": {"kind": "checkpoint", "path": "elsewhere/sft/final",
                  "hash": rundir.content_hash(run_dir / "sft" / "final")}})
    text = write_report(run_dir).read_text()
    assert "| grpo | – | 20 | 12 | 4 | 0.625 | – | 0.825 | 0.999 | 0.700 | – | 41.2 |" in text
    assert "| grpo, control: rewards shuffled (`demo-control`) | – | 20 | 40 | – |" in text
    assert "- grpo control (demo-control): not evaluated yet" in text
    write_eval(control, "grpo", 0.3)
    text = write_report(run_dir).read_text()
    assert "| grpo, control: rewards shuffled (`demo-control`) | – | 20 | 40 | 4 | 0.300 |" in text
    # no problems recorded in these evaluations: the plain differences, without a paired error
    assert "| sft → grpo | +37.5 | – |" in text and "| sft → grpo, control | +5.0 | – |" in text
    assert "Dashed: the control" in text and "grpo: `demo-control`" in text


def test_a_control_belongs_to_the_run_whose_stage_started_where_it_did(tmp_path):
    """`make zero`'s control (GRPO from this run's base) is the R1-Zero run's control, not the control of
    this run's GRPO, which started from its SFT: both checkpoints are this run's."""
    from r1pipeline.report import controls

    run_dir = tmp_path / "demo"
    hashes = {}
    for stage in ("base", "sft"):
        write_stage(run_dir, stage, 2)
        (run_dir / stage / "final").mkdir()
        (run_dir / stage / "final" / "config.json").write_text(stage)
        hashes[stage] = rundir.content_hash(run_dir / stage / "final")

    def rl_run(name, start, shuffled):
        write_stage(tmp_path / name, "grpo", 3, GRPO_KEYS)
        rundir.atomic_write_json(tmp_path / name / "grpo" / "manifest.json", {
            "stage": "grpo", "config": {"grpo": {"shuffle_rewards": shuffled}}, "input": {"hash": hashes[start]}})
        return tmp_path / name

    write_stage(run_dir, "grpo", 3, GRPO_KEYS)
    rundir.atomic_write_json(run_dir / "grpo" / "manifest.json", {"stage": "grpo", "input": {"hash": hashes["sft"]}})
    zero, zero_control = rl_run("demo-zero", "base", False), rl_run("demo-zero-control", "base", True)
    assert controls(run_dir) == {}
    assert controls(zero) == {"grpo": zero_control}
    control = rl_run("demo-control", "sft", True)
    assert controls(run_dir) == {"grpo": control} and controls(zero) == {"grpo": zero_control}


def test_moving_average():
    from r1pipeline.report import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0], 5) == [2.0]


def test_general_prompts_get_their_table_when_evaluated(tmp_path):
    run_dir = tmp_path / "run"
    for stage, helpful in (("rejection", 1.5), ("align", 2.25)):
        write_stage(run_dir, stage, 3)
        write_eval(run_dir, stage, 0.5)
        record = rundir.read_json(run_dir / "eval" / f"{stage}.json")
        record["general"] = {"num_prompts": 100, "k": 8, "reward_model": "runs/run/align/reward_model",
                             "helpfulness": helpful, "harmlessness": 3.0, "correct": 0.9, "refused_harmful": 1.0}
        rundir.atomic_write_json(run_dir / "eval" / f"{stage}.json", record)
    text = write_report(run_dir).read_text()
    assert "100 held-out general prompts, 8 samples each" in text
    assert "| rejection | 1.500 | 3.000 | 0.900 | 1.000 |" in text
    assert "| align | 2.250 | 3.000 | 0.900 | 1.000 |" in text
    write_eval(run_dir, "align", 0.5)
    write_eval(run_dir, "rejection", 0.5)
    assert "## General prompts" not in write_report(run_dir).read_text()


def test_the_changes_between_stages_carry_their_paired_standard_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shares = {"sft": [0, 0.5, 0.5, 1], "grpo": [0.5, 1, 0.5, 1], "rejection": [1, 1, 1, 1]}
    for stage, row in shares.items():
        write_eval(run_dir, stage, sum(row) / 4)
        record = rundir.read_json(run_dir / "eval" / f"{stage}.json")
        record["problems"] = [{"id": str(i), "correct": [True] * int(2 * s) + [False] * (2 - int(2 * s))}
                              for i, s in enumerate(row)]
        record["problems_hash"] = "other problems" if stage == "rejection" else "h"
        record["styles"] = {"worked": {"share": 0.5, "pass@1": sum(row) / 4}}
        rundir.atomic_write_json(run_dir / "eval" / f"{stage}.json", record)
    text = write_report(run_dir).read_text()
    # differences 0.5, 0.5, 0, 0: mean 0.25, sample variance 1/12, standard error sqrt(1/48) = 0.144
    assert "| sft → grpo | +25.0 | 14.4 | +25.0 | +0.0 |" in text
    # another set of problems: the plain difference of pass@1, no pairing
    assert "| grpo → rejection | +25.0 | – | +25.0 | +0.0 |" in text
