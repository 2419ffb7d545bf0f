"""runs/<run>/report.md and runs/<run>/plots/*.png, from what the run directory holds: the eval
figures and cost of each stage (with the worked-vs-bare breakdown), the RL training curves, pass@k
curves, and sample completions before and after RL. A control run beside it (`controls`: an RL
stage from this run's checkpoint with shuffled rewards, as `make demo` runs one) gets its row in the
table and its curves in the RL stage's panel. A piece that is missing (a stage not run, no eval yet)
is noted, not fatal."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from data.template import USER_PREFIX  # noqa: E402
from r1pipeline import host, rundir  # noqa: E402

STAGES = ("base", "sft", "grpo", "rejection", "align", "distill")  # the pipeline's order (DESIGN.md)
RL_STAGES = ("grpo", "align")
BEFORE_RL, AFTER_RL = ("sft",), ("grpo", "align")
# metrics.jsonl keys (TRL's GRPOTrainer names) drawn as curves, in this order, when logged.
CURVES = ("reward", r"rewards/[^/]+/mean", "accuracy", "completions/mean_length", "kl", "entropy",
          "clip_ratio/region_mean", "frac_reward_zero_std", "sampling/sampling_logp_difference/mean",
          "sampling/kl_k3", "routing/router_mismatch_free", "routing/router_mismatch")
# The rollout (transformers generate or vLLM, FP8 or not) against the trainer, on the sampled tokens
# (stages/rollouts.py), averaged over the logged steps.
MISMATCH = {"sampling/kl_k3": "k3 KL", "sampling/abs_dlogp_mean": "mean |Δlogp|",
            "sampling/sampling_logp_difference/max": "max |Δlogp|", "sampling/frac_dlogp_gt_ln2": "tokens with |Δlogp| > ln 2",
            "sampling/is_clip_frac": "IS clipped", "routing/router_mismatch": "routers differing (trained)",
            "routing/router_mismatch_free": "routers differing (free choice)"}
SMOOTHING_FRACTION = 10  # the moving average spans a tenth of a curve's points
SAMPLES_PER_STAGE = 2
SAMPLE_CHARS = 1500


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed run
            continue
    return rows


def _fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _save(fig, plots: Path, name: str) -> str:
    fig.savefig(plots / name, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"![{name}](plots/{name})"


def parameters(checkpoint: Path) -> int | None:
    """Weights in a checkpoint's safetensors (FP8 scales not counted), read from the file headers."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if not name.endswith("_scale_inv"):
                    shape = f.get_slice(name).get_shape()
                    total += math.prod(shape)
    return total


def controls(run_dir: Path) -> dict[str, Path]:
    """{stage: run directory} of the control runs beside this one (same runs directory): a run whose RL
    stage trained with `shuffle_rewards` from the checkpoint this run's same stage started from (`make
    demo` runs one for GRPO from this run's SFT, `make zero` one from the base). Found by the content
    hash the manifests record for their input; where this run's stage records none (it is not run),
    any of this run's checkpoints."""
    found = {}

    @functools.cache
    def every_final() -> frozenset[str]:
        """Every checkpoint of this run, hashed once, and only when a control asks: hashing a real
        model's checkpoints reads gigabytes."""
        return frozenset(rundir.content_hash(run_dir / start / "final") for start in STAGES
                         if rundir.read_manifest(run_dir / start))

    @functools.cache
    def started_from(stage: str) -> frozenset[str]:
        """The content hashes this run's `stage` may have started from (its manifest read once, not
        once for every other run)."""
        own = (rundir.read_manifest(run_dir / stage) or {}).get("input") or {}
        return frozenset({own["hash"]}) if own.get("hash") else every_final()

    for other in sorted(run_dir.parent.iterdir()) if run_dir.parent.is_dir() else []:
        for stage in RL_STAGES:
            manifest = rundir.read_manifest(other / stage) if other != run_dir else None
            if not manifest or not (manifest.get("config", {}).get(stage) or {}).get("shuffle_rewards"):
                continue
            if (manifest.get("input") or {}).get("hash") in started_from(stage):
                found.setdefault(stage, other)
    return found


def _style(result: dict, style: str, field: str) -> str:
    value = ((result.get("styles") or {}).get(style) or {}).get(field)
    return _fmt(value)


def table_row(label: str, manifest, steps, size, result: dict) -> str:
    k = result.get("k")
    wall = _fmt(manifest.get("wall_time_s"), 0) if manifest else "–"
    return (f"| {label} | {f'{size / 1e6:.2f}M' if size else '–'} | {steps[-1] if steps else '–'} | {wall} | {k or '–'} | "
            f"{_fmt(result.get('pass@1'))} | {_fmt(result.get('cons@k'))} | {_fmt(result.get('pass@k', {}).get(str(k)))} | "
            f"{_style(result, 'worked', 'share')} | {_style(result, 'worked', 'pass@1')} | "
            f"{_style(result, 'bare', 'pass@1')} | {_fmt(result.get('mean_completion_length'), 1)} |")


def table(run_dir: Path, evals: dict, control_runs: dict | None = None,
          control_evals: dict | None = None) -> list[str]:
    lines = ["## Stages", "",
             "Worked: the share of completions that work the answer out (two or more lines of reasoning) and "
             "their pass@1; bare: the pass@1 of the others (one line stating the result). Length: mean "
             "completion tokens.", "",
             "| stage | parameters | steps | wall time (s) | k | pass@1 | cons@k | pass@k | worked | worked pass@1 | "
             "bare pass@1 | length |", "|---" * 12 + "|"]
    notes, hosts = [], []
    for stage in STAGES:
        manifest = rundir.read_manifest(run_dir / stage)
        machine = host.name(manifest["host"]) if manifest and manifest.get("host") else None
        if machine and machine not in hosts:
            hosts.append(machine)
        if manifest is None and stage not in evals:
            if stage != "base":  # stage 0 belongs to the embedded default; a pretrained model is its own base
                notes.append(f"- {stage}: not run")
            continue
        steps = [row["step"] for row in read_metrics(run_dir / stage / "metrics.jsonl") if "step" in row]
        result = evals.get(stage)
        if result is None:
            notes.append(f"- {stage}: not evaluated yet (`make eval`)")
            result = {}
        lines.append(table_row(stage, manifest, steps, parameters(run_dir / stage / "final"), result))
        control = (control_runs or {}).get(stage)
        if control is not None:
            result = (control_evals or {}).get(stage) or {}
            if not result:
                notes.append(f"- {stage} control ({control.name}): not evaluated yet")
            steps = [row["step"] for row in read_metrics(control / stage / "metrics.jsonl") if "step" in row]
            lines.append(table_row(f"{stage}, control: rewards shuffled (`{control.name}`)",
                                   rundir.read_manifest(control / stage), steps, None, result))
    if hosts:
        notes.append(f"- wall times measured on {' and '.join(hosts)}")
    return lines + [""] + notes + ([""] if notes else [])


def paired_change(before: dict, after: dict) -> tuple[float, float] | None:
    """(after's pass@1 minus before's, its standard error paired by problem): each held-out problem's
    share of right samples, differenced, so problems both stages find hard or easy cancel out. None
    where the two evaluations did not score the same problems."""
    if not before.get("problems_hash") or before.get("problems_hash") != after.get("problems_hash"):
        return None
    shares = [{row["id"]: sum(row["correct"]) / len(row["correct"]) for row in result.get("problems", []) if row["correct"]}
              for result in (before, after)]
    if len(shares[0]) < 2 or shares[0].keys() != shares[1].keys():
        return None
    return mean_and_se([shares[1][i] - shares[0][i] for i in shares[0]])


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean of two or more values and its standard error (sample standard deviation / sqrt(n))."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def _points(value) -> str:
    return f"{100 * value:+.1f}" if isinstance(value, (int, float)) else "–"


def changes_table(evals: dict, control_evals: dict | None = None) -> list[str]:
    """What each evaluated stage changed from the one before it in the pipeline (a control from the
    stage its RL started from), in points of held-out pass@1 with the paired standard error, and in the
    worked-out completions' share and accuracy: the figures the demo's claims are read from."""
    order = [stage for stage in STAGES if stage in evals]
    pairs = [(before, after, evals[after]) for before, after in zip(order, order[1:])]
    starts = dict(zip(order[1:], order))
    pairs += [(starts[stage], f"{stage}, control", result) for stage, result in (control_evals or {}).items()
              if stage in starts]
    rows = []
    for before, label, second in pairs:
        first = evals[before]
        change = paired_change(first, second)
        worked = [((result.get("styles") or {}).get("worked") or {}) for result in (first, second)]
        delta = {field: (worked[1][field] - worked[0][field]
                         if all(isinstance(w.get(field), (int, float)) for w in worked) else None)
                 for field in ("pass@1", "share")}
        if change is None and all(isinstance(result.get("pass@1"), (int, float)) for result in (first, second)):
            change = (second["pass@1"] - first["pass@1"], None)  # not the same problems: no pairing
        gain, error = change or (None, None)
        rows.append(f"| {before} → {label} | {_points(gain)} | {_fmt(error and 100 * error, 1)} | "
                    f"{_points(delta['pass@1'])} | {_points(delta['share'])} |")
    if not rows:
        return []
    return ["## Changes between stages", "",
            "Points of held-out pass@1 each stage gained over the one before it"
            + (" (a control: over the checkpoint its RL started from)" if control_evals else "")
            + ", with the standard error of that difference paired by problem (the same problems scored before and "
            "after); worked: the change in the worked-out completions' pass@1 and share.", "",
            "| change | pass@1 (points) | paired SE | worked pass@1 (points) | worked share (points) |", "|---" * 5 + "|",
            *rows, ""]


def reward_model_trends(run_dir: Path, evals: dict) -> list[str]:
    """Each reward model's score over stage 4's training (its first against its last quarter of steps,
    from the manifest) and on the held-out general prompts (stage 3 against stage 4)."""
    metrics = (rundir.read_manifest(run_dir / "align") or {}).get("metrics") or {}
    before, after = ((evals.get(stage) or {}).get("general") or {} for stage in ("rejection", "align"))
    lines = []
    for name in ("helpfulness", "harmlessness"):
        first, last = (metrics.get(f"rewards/{name}/mean_{end}_quarter") for end in ("first", "last"))
        if isinstance(first, (int, float)) and isinstance(last, (int, float)):
            held = (f"; held out, rejection → align: {_fmt(before.get(name))} → {_fmt(after.get(name))}"
                    if name in before and name in after else "")
            lines.append(f"- {name}: align's training, first → last quarter: {_fmt(first)} → {_fmt(last)}{held}")
    return lines + [""] if lines else []


def general_table(evals: dict) -> list[str]:
    """Held-out general prompts scored by stage 4's reward model, per evaluated stage (evaluate.py)."""
    scored = [(stage, evals[stage]["general"]) for stage in STAGES if (evals.get(stage) or {}).get("general")]
    if not scored:
        return []
    first = scored[0][1]
    lines = ["## General prompts", "",
             f"{first['num_prompts']} held-out general prompts, {first['k']} samples each, scored by stage 4's "
             f"reward model (`{first['reward_model']}`): helpfulness on the answer, harmlessness on the whole "
             "response; right: the answer is the expected reply (a refusal for a harmful request).", "",
             "| stage | helpfulness | harmlessness | right | harmful refused |", "|---" * 5 + "|"]
    lines += [f"| {stage} | {_fmt(g['helpfulness'])} | {_fmt(g['harmlessness'])} | {_fmt(g['correct'])} | "
              f"{_fmt(g.get('refused_harmful'))} |" for stage, g in scored]
    return lines + [""]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _draw(ax, rows: list[dict], key: str, label: str, color: str, style: str = "-") -> None:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    if not points:
        return
    steps, values = zip(*points)
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    window = max(1, len(values) // SMOOTHING_FRACTION)
    ax.plot(steps, moving_average(list(values), window), color=color, linestyle=style,
            label=f"{label} (mean of {window})" if window > 1 else label)


def training_curves(run_dir: Path, plots: Path, control_runs: dict | None = None) -> list[str]:
    """One figure per logged quantity, one panel per RL stage (their reward mixtures differ): raw values
    faded, a moving average on top, and a control run's stage overlaid (dashed) where there is one."""
    series = {stage: rows for stage in RL_STAGES if (rows := read_metrics(run_dir / stage / "metrics.jsonl"))}
    if not series:
        return ["## RL training curves", "", f"- no metrics.jsonl in {' or '.join(RL_STAGES)} yet", ""]
    control_series = {stage: rows for stage, control in (control_runs or {}).items()
                      if stage in series and (rows := read_metrics(control / stage / "metrics.jsonl"))}
    logged = sorted({key for rows in series.values() for row in rows for key in row})
    keys = [key for pattern in CURVES for key in logged if re.fullmatch(pattern, key)]
    lines = ["## RL training curves", ""]
    if control_series:
        lines += ["Dashed: the control, the same stage from the same checkpoint with each group's rewards shuffled "
                  f"({', '.join(f'{stage}: `{control_runs[stage].name}`' for stage in control_series)}).", ""]
    for key in keys:
        stages = [stage for stage, rows in series.items() if any(isinstance(row.get(key), (int, float)) for row in rows)]
        if not stages:  # logged without a number (e.g. None on every row)
            continue
        fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.2), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            _draw(ax, series[stage], key, stage, "C0")
            if stage in control_series:
                _draw(ax, control_series[stage], key, "control", "C3", "--")
            ax.set(xlabel="step", title=f"{stage}: {key}")
            ax.legend(fontsize="small")
        lines.append(_save(fig, plots, re.sub(r"\W+", "_", key) + ".png"))
    if "kl" not in logged:
        lines += ["", "- kl: not logged, so not drawn (TRL computes it only with beta > 0)"]
    return lines + [""] + mismatch_table(series)


def mismatch_table(series: dict) -> list[str]:
    """Per RL stage: the rollout's logprobs of its sampled tokens against the trainer's, and its MoE
    routing against the training forward's, averaged over the logged rows (max |Δlogp|: the largest
    logged; with logging_steps > 1 TRL logs each window's average)."""
    rows = []
    for stage, metrics in series.items():
        values = {key: [row[key] for row in metrics if isinstance(row.get(key), (int, float))] for key in MISMATCH}
        if values["sampling/kl_k3"]:
            cells = [f"{max(v) if key.endswith('/max') else sum(v) / len(v):.3g}" if v else "–"
                     for key, v in values.items()]
            rows.append(f"| {stage} | {len(values['sampling/kl_k3'])} | {' | '.join(cells)} |")
    if not rows:
        return []
    return ["## Rollout vs trainer", "",
            "The rollout's logprobs of the tokens it sampled against the trainer's recomputed ones (k3: r - 1 - log r, "
            "r = π_train / π_rollout, per token), the share the importance-sampling correction cut, and the share of "
            "(token, MoE layer) whose experts differ from the rollout's: in the trained forward (0 under routing "
            "replay) and as the trainer's router would choose freely.", "",
            "| stage | logged steps | " + " | ".join(name.replace("|", "\\|") for name in MISMATCH.values()) + " |",
            "|---" * (2 + len(MISMATCH)) + "|",
            *rows, ""]


def pass_at_k_curves(evals: dict, plots: Path) -> list[str]:
    if not evals:
        return []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for stage, result in evals.items():
        ks = sorted(int(k) for k in result["pass@k"])
        ax.plot(ks, [result["pass@k"][str(k)] for k in ks], marker="o", label=stage)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k", title="pass@k")
    ax.legend()
    return ["## pass@k", "", _save(fig, plots, "pass_at_k.png"), ""]


def samples(evals: dict) -> list[str]:
    lines = ["## Sample completions", ""]
    for when, stages in (("before RL", BEFORE_RL), ("after RL", AFTER_RL)):
        shown = [stage for stage in stages if evals.get(stage, {}).get("samples")]
        if not shown:
            lines += [f"- {when}: no evaluated {' or '.join(stages)} checkpoint", ""]
        for stage in shown:
            lines += [f"### {stage} ({when})", ""]
            for sample in evals[stage]["samples"][:SAMPLES_PER_STAGE]:
                verdict = "correct" if sample["correct"] else "wrong"
                prompt = sample["prompt"]  # shown from the question on: the system prompt is in every one
                if not isinstance(prompt, str):  # a conversation (data.prompt_format: chat): its user turn
                    prompt = USER_PREFIX + prompt[-1]["content"] + "\nAssistant:"
                text = prompt[max(prompt.find(USER_PREFIX), 0):] + sample["completion"][:SAMPLE_CHARS]
                # Indented, not fenced: code completions hold ``` fences of their own.
                lines += [f"Problem {sample['id']} ({verdict}):", ""]
                lines += ["    " + line for line in text.splitlines()] + [""]
    return lines


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    evals = {stage: rundir.read_json(path) for stage in STAGES
             if (path := run_dir / "eval" / f"{stage}.json").is_file()}
    control_runs = controls(run_dir)
    lines = [f"# Run `{run_dir.name}`", ""]
    control_evals = {stage: result for stage, control in control_runs.items()
                     if (path := control / "eval" / f"{stage}.json").is_file() and (result := rundir.read_json(path))}
    lines += (table(run_dir, evals, control_runs, control_evals) + changes_table(evals, control_evals)
              + general_table(evals) + reward_model_trends(run_dir, evals) + training_curves(run_dir, plots, control_runs)
              + pass_at_k_curves(evals, plots) + samples(evals))
    report = run_dir / "report.md"
    rundir.atomic_write_text(report, "\n".join(lines))
    return report
