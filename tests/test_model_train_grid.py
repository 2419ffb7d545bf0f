"""benchmarks/model_train.py's grid of shapes: the design holds what its docstring says, and every
point is a configuration both models accept and can route. The timings themselves are the benchmark's."""

import itertools
import subprocess
import sys

import pytest
from transformers import DeepseekV3Config

from benchmarks import model_train
from conftest import ROOT, pipeline_env
from r1pipeline.model import R1MoEConfig


def test_the_grid_puts_every_pair_of_factors_at_all_four_pairs_of_ends():
    points = model_train.grid_points()
    design, centre = points[:-1], points[-1]
    assert len(design) == 16 and centre == model_train.CENTRE
    factors = model_train.GRID
    for a, b in itertools.combinations(factors, 2):
        seen = {(p[a], p[b]) for p in design}
        assert seen == set(itertools.product(factors[a], factors[b])), (a, b)
    assert all(sum(p[f] == factors[f][1] for p in design) == 8 for f in factors)  # balanced


@pytest.mark.parametrize("point", model_train.grid_points(), ids=lambda p: "-".join(map(str, p.values())))
def test_every_grid_point_is_a_config_both_models_accept_and_route(point):
    config, batch, seq = model_train.grid_shape(**point)
    assert batch * seq == point["tokens"]
    ours, theirs = R1MoEConfig(**config), DeepseekV3Config(**config)
    assert (ours.n_routed_experts, ours.num_experts_per_tok) == (point["experts"], point["top_k"])
    assert theirs.hidden_size == point["hidden"]
    kept = config["topk_group"] * config["n_routed_experts"] // config["n_group"]  # experts left to choose from
    assert kept >= config["num_experts_per_tok"]
    assert (config["n_group"] > 1) == point["grouped"]
    if point["grouped"] and point["top_k"] < point["experts"]:
        assert kept < config["n_routed_experts"]  # the limit limits


def test_unknown_points_are_refused_before_any_work():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_train.py"), "--points", "grid,nope"],
                          env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--points 'grid,nope'" in done.stderr, done.stderr
