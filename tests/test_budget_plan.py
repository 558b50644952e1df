"""`burrow plan --cluster`: budget -> law -> shape -> parallel plan -> wall clock. The numbers
chain is checked by recomputing each link, the emitted config and plan by loading them, the
rounds by forcing a cycle, and every bad input through the real CLI."""

import itertools
import json
import math

import pytest

from burrow import RunConfig
from burrow.cli import main
from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.flops import flops_per_token, matmul_params
from burrow.parallel.planner import CostInputs, Job, Plan, get_hardware, search
from burrow.parallel.planner.executable import apply_plan, executable_problem
from burrow.scaling import cluster as on_cluster
from burrow.scaling.laws import get_law
from burrow.scaling.plan import plan

H100 = get_hardware("h100")
# Today's keys of `burrow plan --json` (without --preset and --emit-config).
TODAY = {"flops", "law", "optimal", "model", "time", "laws", "budget"}
NEW = {"plan", "predicted_step_s", "days", "gpu_hours", "mfu"}


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def hours_result():
    """A GPU-hours budget on one node: about 1.5B parameters, planned in under a second."""
    cluster = on_cluster.parse_cluster("8xh100")
    return on_cluster.plan_on_cluster(cluster, gpu_hours=200.0)


def test_the_numbers_chain_from_gpu_hours_to_days(hours_result):
    result, gpus, peak = hours_result, 8, H100.peak_flops
    # The budget: GPU-hours x 3600 x peak x the plan's MFU (C = 6ND's count).
    assert result["flops"] == pytest.approx(200 * 3600 * peak * result["mfu"], rel=1e-12)
    assert result["budget"] == {"flops": result["flops"], "given_as": "gpu_hours",
                                "gpu_hours": 200.0}
    # The law at that budget, and the shape built for it.
    n_opt, d_opt = get_law("chinchilla").optimal(result["flops"])
    assert (result["optimal"]["params"], result["optimal"]["tokens"]) == pytest.approx(
        (n_opt, d_opt), rel=1e-12)
    model = result["model"]
    assert model["params"] == pytest.approx(n_opt, rel=0.03)  # the shape builder's tolerance
    tokens = result["flops"] / (6 * model["params"])
    assert model["tokens"] == pytest.approx(tokens, rel=1e-12)
    # The plan's speed: tokens a step over its predicted step time.
    step_tokens = result["cluster"]["global_batch_tokens"]
    assert step_tokens == 1024 * 2048 == Plan.from_dict(result["plan"]).global_batch * 2048
    assert result["predicted_step_s"] == result["plan"]["predicted_step_s"]
    tokens_per_second = step_tokens / result["predicted_step_s"]
    assert result["tokens_per_second"] == pytest.approx(tokens_per_second, rel=1e-12)
    assert result["mfu"] == pytest.approx(tokens_per_second * 6 * model["params"] / (gpus * peak),
                                          rel=1e-12)
    cfg = ModelConfig(**model["config"])
    assert result["mfu_with_attention"] == pytest.approx(
        tokens_per_second * flops_per_token(cfg, 2048) / (gpus * peak), rel=1e-12)
    # The wall clock: D / tokens per second, and the GPU-hours it takes are the ones given.
    assert result["days"] == pytest.approx(tokens / tokens_per_second / 86400, rel=1e-12)
    assert result["gpu_hours"] == pytest.approx(result["days"] * 24 * gpus, rel=1e-12)
    assert result["gpu_hours"] == pytest.approx(200.0, rel=1e-9)
    assert result["time"]["wall_seconds"] == pytest.approx(result["days"] * 86400, rel=1e-9)


def test_the_plan_is_the_planners_for_that_model(hours_result):
    cfg = ModelConfig(**hours_result["model"]["config"])
    best = search(Job(cfg, 8, 1024, 2048), CostInputs.from_hardware(H100)).best
    assert best.to_dict() == hours_result["plan"]


def test_the_rounds_end_at_a_fixed_point(hours_result):
    rounds = hours_result["rounds"]
    assert hours_result["converged"] and 1 <= len(rounds) <= on_cluster.MAX_ROUNDS
    assert rounds[0]["mfu_assumed"] == 0.4  # --mfu: the first round's guess
    assert rounds[0]["flops"] == pytest.approx(200 * 3600 * H100.peak_flops * 0.4)
    for before, after in itertools.pairwise(rounds):  # each round takes the last one's MFU
        assert after["mfu_assumed"] == before["mfu"]
        assert after["flops"] == before["flops_implied"]
    last, model = rounds[-1], hours_result["model"]
    assert (last["n_layers"], last["d_model"]) == (model["n_layers"], model["d_model"])
    assert last["flops_implied"] == hours_result["flops"]
    # A fixed point: the law's N_opt at the C the plan implies builds the shape planned.
    again = on_cluster.shape_for(hours_result["flops"], get_law("chinchilla"), arch="llama",
                                 vocab_size=32_000)
    assert again == ModelConfig(**model["config"])


def test_a_cycle_keeps_the_shape_with_the_lowest_predicted_loss(monkeypatch):
    """Shapes below a size plan fast and above it slowly, so the rounds go back and forth."""
    law, cluster = get_law("chinchilla"), on_cluster.parse_cluster("8xh100")
    first = on_cluster.shape_for(200 * 3600 * H100.peak_flops * 0.4, law, arch="llama",
                                 vocab_size=32_000)
    threshold = matmul_params(first) * 1.001

    def fake_speed(cfg, _cluster):
        utilisation = 0.6 if matmul_params(cfg) < threshold else 0.3
        return on_cluster.Speed(None, 1.0, utilisation, utilisation)

    monkeypatch.setattr(on_cluster, "plan_speed", fake_speed)
    flops, cfg, speed, rounds, converged = on_cluster.converge(
        200.0, cluster, law, arch="llama", vocab_size=32_000, first_mfu=0.4)
    assert not converged and 2 <= len(rounds) < on_cluster.MAX_ROUNDS
    assert flops == pytest.approx(200 * 3600 * H100.peak_flops * speed.mfu)

    def loss(row):
        return law.loss(row["params"], row["flops_implied"] / (6 * row["params"]))

    best = min(rounds, key=loss)
    assert (cfg.n_layers, cfg.d_model, flops) == (best["n_layers"], best["d_model"],
                                                  best["flops_implied"])


def test_a_flops_budget_is_planned_once(capsys):
    result = plan_json(capsys, "--flops", "1e19", "--cluster", "8xh100")
    assert result["flops"] == 1e19 and len(result["rounds"]) == 1 and result["converged"]
    assert result["rounds"][0]["mfu_assumed"] is None
    tokens_per_second = 1024 * 2048 / result["predicted_step_s"]
    assert result["days"] == pytest.approx(result["model"]["tokens"] / tokens_per_second / 86400)
    assert result["gpu_hours"] == pytest.approx(result["days"] * 24 * 8)
    assert result["time"]["device_hours"] == pytest.approx(result["gpu_hours"])


def test_json_keys_beside_todays_and_none_without_a_cluster(capsys):
    result = plan_json(capsys, "--flops", "1e19", "--cluster", "8xh100", "--memory", "40GB",
                       "--global-batch", str(512 * 2048))
    assert set(result) >= TODAY | NEW
    assert result["cluster"]["memory_bytes"] == 40e9
    assert result["cluster"]["global_batch_sequences"] == 512
    assert Plan.from_dict(result["plan"]).global_batch == 512
    assert set(plan_json(capsys, "--flops", "1e19")) == TODAY


def test_emitted_config_and_plan_load_and_agree(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    result = plan_json(capsys, "--gpu-hours", "200", "--cluster", "8xh100", "--emit-config",
                       str(path))
    cfg = RunConfig.load(path)
    assert matmul_params(cfg.model) == result["model"]["params"]
    assert matmul_params(cfg.model) == pytest.approx(result["optimal"]["params"], rel=0.03)
    planned = Plan.from_json((tmp_path / "run.plan.json").read_text())
    assert result["emitted_plan"] == str(tmp_path / "run.plan.json")
    assert planned.to_dict() == result["plan"] and planned.world_size == 8
    planned.check(cfg.model, 8, cfg.train.seq_len)  # made for this model on these GPUs
    # the launch line's `train --plan` runs it: one tensor-parallel degree for every layer
    assert executable_problem(planned) is None and result["cluster"]["executable"]
    assert apply_plan(cfg, planned, 8).train.batch_tokens == cfg.train.batch_tokens
    assert cfg.train.batch_tokens == planned.global_batch * cfg.train.seq_len
    assert cfg.train.max_steps * cfg.train.batch_tokens == pytest.approx(
        result["model"]["tokens"], rel=0.01)
    assert result["launch"] == (f"torchrun --nnodes 1 --nproc_per_node 8 --standalone -m burrow "
                                f"train --config {path} --plan {tmp_path / 'run.plan.json'}")


def test_many_nodes_get_a_rendezvous(capsys, tmp_path):
    result = plan_json(capsys, "--flops", "1e19", "--cluster", "16xH100",
                       "--emit-config", str(tmp_path / "run.yaml"))
    assert result["cluster"]["nodes"] == 2 and result["plan"]["world_size"] == 16
    assert result["launch"].startswith("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend "
                                       "c10d --rdzv_endpoint HOST:29500 -m burrow train")


def test_the_text_report(capsys):
    assert main(["plan", "--gpu-hours", "200", "--cluster", "8xh100"]) == 0
    text = capsys.readouterr().out
    for words in ("N_opt", "D_opt", "loss", "cluster   8 x H100 SXM", "plan      pp ",
                  "stage 0:", "a step", "tokens/s", "MFU", "days on 8 GPUs = 200 GPU-hours",
                  "fixed point after"):
        assert words in text, words


def test_cluster_strings():
    parsed = on_cluster.parse_cluster(" 16 X a100-40GB ")
    assert (parsed.gpus, parsed.hardware.name, parsed.memory_bytes) == (16, "A100 SXM 40GB",
                                                                       40e9)
    assert parsed.nodes == 2 and parsed.global_batch == 1024 and parsed.seq_len == 2048
    assert on_cluster.parse_cluster("4xh200").nodes == 1
    with pytest.raises(UserError, match="not COUNTxGPU"):
        on_cluster.parse_cluster("h100x8")


def test_gpu_hours_from_the_plan_match_the_budget_for_a_fitted_law(capsys, tmp_path):
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"name": "mine", "source": "test", "E": 1.8, "A": 480.0,
                               "B": 2000.0, "alpha": 0.35, "beta": 0.37}))
    result = plan_json(capsys, "--gpu-hours", "100", "--cluster", "8xh100", "--law", str(law))
    assert result["law"]["name"] == "mine"
    assert result["gpu_hours"] == pytest.approx(100.0, rel=1e-9)
    assert result["optimal"]["params"] == pytest.approx(plan(result["flops"], law=str(law))[
        "optimal"]["params"], rel=1e-12)
    assert math.isfinite(result["optimal"]["loss"])


@pytest.mark.parametrize("args, words", [
    (["--gpu-hours", "100", "--cluster", "64h100"], ["COUNTxGPU", "64xh100"]),
    (["--gpu-hours", "100", "--cluster", "8xtpu"], ["unknown hardware", "h100, h200"]),
    (["--gpu-hours", "100", "--cluster", "0xh100"], ["at least 1"]),
    (["--gpu-hours", "100", "--cluster", "12xh100"], ["whole nodes", "8 or 16"]),
    (["--flops", "1e9", "--cluster", "8xh100"], ["below the smallest sensible model"]),
    (["--gpu-hours", "1e-6", "--cluster", "8xh100"], ["below the smallest", "raise the budget"]),
    (["--flops", "3e14", "--cluster", "8xh100", "--global-batch", str(2**25)],
     ["less than one step", "--global-batch"]),
    (["--gpu-hours", "100", "--cluster", "8xh100", "--device", "h100"],
     ["--cluster", "leave out --device"]),
    (["--gpu-hours", "100", "--cluster", "8xh100", "--num-devices", "8"],
     ["--num-devices"]),
    (["--flops", "1e21", "--memory", "40GB"], ["--cluster"]),
    (["--flops", "1e21", "--global-batch", "2048"], ["--cluster"]),
    (["--gpu-hours", "100", "--cluster", "8xh100", "--precision", "fp16"], ["bf16 or fp32"]),
    (["--gpu-hours", "100", "--cluster", "8xh100", "--global-batch", "1000"],
     ["whole number"]),
    (["--gpu-hours", "100", "--cluster", "8xh100", "--memory", "lots"], ["--memory"]),
    (["--gpu-hours", "100", "--cluster", "8xh100", "--memory", "3GB"],
     ["no plan fits", "more GPUs in --cluster"]),
    (["--flops", "1e21", "--gpu-hours", "5", "--cluster", "8xh100"], ["one way"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, words):
    try:
        status = main(["plan", *args])
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("burrow: error: "), error
    for word in words:
        assert word in error[0], error[0]
