"""FISTAPruner (issue 3): the solver on one Linear, error correction, bad input, layer parallelism, end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from hf_prune import AutoPrunedModelForCausalLM, FISTAConfig, PruningConfig
from hf_prune.engine.capture import capture_layer_inputs
from hf_prune.engine.layer_pass import run_layer
from hf_prune.engine.statistics import InputStatistics, StatKind
from hf_prune.errors import LambdaSearchError
from hf_prune.methods.fista.method import FISTAPruner
from hf_prune.methods.fista.solver import QuadraticProblem, SolverSettings, fista, solve
from hf_prune.methods.patterns import parse_pattern, satisfies_nm
from hf_prune.walker.layout import DecoderLayout

TESTS = Path(__file__).resolve().parent
CPU = torch.device("cpu")


# -- helpers ------------------------------------------------------------------------------------


def _correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Tokens x width activations with correlated channels of very different norms."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / width**0.5
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=gen)]
    common = 0.3 * torch.randn(tokens, 1, generator=gen)
    return (torch.randn(tokens, width, generator=gen) @ mixing + common) * scales


def _weight(out: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed))


def _objective(pruned: torch.Tensor, dense: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor | None = None) -> float:
    """½‖ŴX̂ − WX‖²_F computed from the raw activations (tokens x in), in float64."""
    x_hat = x if x_hat is None else x_hat
    residual = x_hat.double() @ pruned.double().t() - x.double() @ dense.double().t()
    return 0.5 * float(residual.square().sum())


def _gram_stats(x: torch.Tensor) -> InputStatistics:
    stats = InputStatistics(x.shape[1], StatKind.GRAM, CPU)
    stats.update(x)
    return stats


def _assert_exact(weight: torch.Tensor, pattern_text: str, sparsity: float) -> None:
    """Exactly ``floor(sparsity * in)`` zeros per row; for N:M, exactly N non-zeros in every group of M."""
    rows, cols = weight.shape
    assert torch.isfinite(weight).all()
    pattern = parse_pattern(pattern_text)
    if pattern.is_nm:
        nonzero = (weight.reshape(rows, cols // pattern.m, pattern.m) != 0).sum(dim=2)
        assert torch.all(nonzero == pattern.n), f"non-zeros per group: {nonzero.unique().tolist()}"
    else:
        zeros = (weight == 0).sum(dim=1)
        assert torch.all(zeros == int(sparsity * cols)), f"zeros per row: {zeros.unique().tolist()}"


def _config(pattern: str, **kwargs) -> FISTAConfig:
    sparsity = 0.5 if pattern == "unstructured" else None
    return FISTAConfig(sparsity=sparsity, pattern=pattern, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def linear_problem():
    """One 48 x 64 Linear and 2048 tokens of correlated inputs."""
    return _weight(48, 64), _correlated_inputs(2048, 64, seed=3)


# -- 1. one Linear ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("warm_start", ["wanda", "sparsegpt"])
def test_fista_beats_its_warm_start_with_exact_sparsity(linear_problem, pattern, warm_start):
    weight, x = linear_problem
    config = _config(pattern, warm_start=warm_start)
    pruner = config.make_pruner()
    assert isinstance(pruner, FISTAPruner)
    stats = _gram_stats(x)
    warm = pruner.warm_start(weight, stats.gram, None, config.sparsity, "probe")
    _assert_exact(warm, pattern, config.sparsity)

    pruned = pruner.prune_weight(weight.clone(), stats, config.sparsity)
    _assert_exact(pruned, pattern, config.sparsity)
    before, after = _objective(warm, weight, x), _objective(pruned, weight, x)
    # FISTA must improve clearly on the warm start (here by about 2x), not just tie with it
    assert after < 0.9 * before, (before, after)

    # the solver's own bookkeeping (from Gram statistics only) agrees with the raw objective
    warm_error, final_error, half_norm, unreachable = pruner.diagnostics["operator"]
    assert final_error == pytest.approx(after, rel=1e-3)
    assert warm_error == pytest.approx(before, rel=1e-3)
    assert half_norm == pytest.approx(_objective(torch.zeros_like(weight), weight, x), rel=1e-4)
    assert unreachable == 0


def test_fista_objective_decreases_monotonically_and_reaches_the_lasso_optimum(linear_problem):
    """The solver is monotone FISTA (MFISTA): F never rises, checked both from its history and from raw X."""
    weight, x = linear_problem
    gram = x.t() @ x
    target = weight @ gram
    const = (target * weight).sum(dim=1, dtype=torch.float64)
    problem = QuadraticProblem(gram, target, const, SolverSettings(), dense=weight)
    lam = 0.05 * problem.lambda_max()
    start = problem.to_scaled(weight)

    history: list[float] = []
    v, _, iterations = fista(problem, start, lam, 300, 1e-9, history=history)
    assert iterations > 50
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:])), "F rose in the solver's history"

    def raw_objective(w: torch.Tensor) -> float:
        residual = x.double() @ (w.double() - weight.double()).t()
        return float((0.5 * residual.square().sum(dim=0) + lam * w.double().abs().sum(dim=1)).sum())

    values = [raw_objective(weight)]
    for k in (1, 2, 3, 5, 10, 20, 50, 100):
        iterate, _, _ = fista(problem, start, lam, k, 0.0)
        values.append(raw_objective(problem.from_scaled(iterate)))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(history[99], rel=1e-5)
    assert values[-1] < 0.5 * values[0]

    # optimality (KKT) of the LASSO solution: ∇f = -λ sign(w) on the support, |∇f| <= λ off it
    w = problem.from_scaled(v).double()
    grad = w @ gram.double() - target.double()
    lam_col = lam.unsqueeze(1)
    support = w != 0
    assert 0.05 < float(support.double().mean()) < 0.95
    assert float((grad + lam_col * w.sign())[support].abs().max()) < 1e-2 * float(lam.min())
    assert float((grad.abs() - lam_col)[~support].max()) < 1e-2 * float(lam.min())

    # the λ = 0 re-fit on a fixed support is monotone too and never leaves the support
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    refit_history: list[float] = []
    refit, _, _ = fista(problem, start, None, 50, 0.0, keep=keep, history=refit_history)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(refit_history, refit_history[1:]))
    assert torch.all(refit[~keep] == 0)


def test_error_correction_on_one_operator():
    """Solving against X̂ (the input after earlier pruning) beats ignoring the shift from X to X̂."""
    weight = _weight(32, 64, seed=4)
    x = _correlated_inputs(1024, 64, seed=5)
    x_hat = x + 0.3 * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    pruner = _config("unstructured").make_pruner()
    gram, cross = x_hat.t() @ x_hat, x.t() @ x_hat
    const = (x @ weight.t()).square().sum(dim=0, dtype=torch.float64)
    corrected = pruner.solve_operator("corrected", weight, gram, cross, const, 0.5)
    naive = pruner.prune_weight(weight, _gram_stats(x_hat), 0.5)  # fits ŴX̂ ≈ WX̂
    from_dense = pruner.prune_weight(weight, _gram_stats(x), 0.5)  # fits ŴX ≈ WX
    for pruned in (corrected, naive, from_dense):
        _assert_exact(pruned, "unstructured", 0.5)
    error = _objective(corrected, weight, x, x_hat)
    assert error < 0.95 * _objective(naive, weight, x, x_hat)
    assert error < 0.95 * _objective(from_dense, weight, x, x_hat)
    assert pruner.diagnostics["corrected"][1] == pytest.approx(error, rel=1e-3)


# -- 2. error correction in a decoder layer -----------------------------------------------------


_ERRORS: dict[tuple, list[float]] = {}


def _layer_output_errors(family: str, config: FISTAConfig, token_ids: torch.Tensor) -> list[float]:
    """Per decoder layer: ‖layer_pruned(h) − layer_dense(h)‖² / ‖layer_dense(h) − h‖² on the dense inputs h."""
    key = (family, config.to_json_string(), token_ids.numpy().tobytes())
    if key not in _ERRORS:
        _ERRORS[key] = _measure_layer_output_errors(family, config, token_ids)
    return _ERRORS[key]


def _measure_layer_output_errors(family: str, config: FISTAConfig, token_ids: torch.Tensor) -> list[float]:
    dense = tiny_model(family)
    layout = DecoderLayout(dense)
    hidden, calls = capture_layer_inputs(layout, token_ids)
    inputs, outputs = [], []
    for index, layer in enumerate(layout.layers):
        inputs.append(hidden)
        hidden = run_layer(layer, hidden, calls[index], hidden.shape[0])
        outputs.append(hidden)
    pruned = tiny_model(family)
    pruned.prune(config, calibration_data=token_ids)
    errors = []
    for index, layer in enumerate(DecoderLayout(pruned).layers):
        out = run_layer(layer, inputs[index], calls[index], inputs[index].shape[0])
        change = (outputs[index] - inputs[index]).square().sum()
        errors.append(float((out - outputs[index]).square().sum() / change))
    return errors


@pytest.mark.parametrize(("family", "pattern", "batch_size"),
                         [("llama", "unstructured", None), ("llama", "2:4", 3), ("gpt2", "unstructured", None)])
def test_error_correction_lowers_decoder_layer_error(family, pattern, batch_size, token_ids):
    """batch_size=3 < 8 samples exercises the batched collection path (partial passes per group)."""
    on = _layer_output_errors(family, _config(pattern, error_correction=True, batch_size=batch_size), token_ids)
    off = _layer_output_errors(family, _config(pattern, error_correction=False, batch_size=batch_size), token_ids)
    assert all(0 < a < b for a, b in zip(on, off)), (on, off)
    assert sum(on) < 0.7 * sum(off), (on, off)


def test_one_batch_and_batched_collection_agree(token_ids):
    """The one-pass collection (all samples at once) and the per-batch partial passes solve the same problems."""
    one = _layer_output_errors("llama", _config("2:4", error_correction=True), token_ids)
    batched = _layer_output_errors("llama", _config("2:4", error_correction=True, batch_size=3), token_ids)
    assert batched == pytest.approx(one, rel=0.05)


# -- 3. bad input ---------------------------------------------------------------------------------


def _problem(weight: torch.Tensor, x: torch.Tensor, settings: SolverSettings) -> QuadraticProblem:
    gram = x.t() @ x
    target = weight @ gram
    return QuadraticProblem(gram, target, (target * weight).sum(dim=1, dtype=torch.float64), settings, dense=weight)


def test_unreachable_error_share_raises_when_strict_and_falls_back_otherwise(linear_problem):
    """ξ = 0.999: even the smallest λ tried leaves rounding under 99.9% of the error, so no row brackets ξ."""
    weight, x = linear_problem
    pattern = parse_pattern("unstructured")
    warm = weight.masked_fill(weight.abs() < weight.abs().median(dim=1, keepdim=True).values, 0.0)
    strict = SolverSettings(error_share=0.999, strict=True)
    with pytest.raises(LambdaSearchError, match="error_share=0.999"):
        solve(_problem(weight, x, strict), warm, pattern, 0.5, strict)

    lenient = SolverSettings(error_share=0.999)
    result = solve(_problem(weight, x, lenient), warm, pattern, 0.5, lenient)
    assert result.unreachable == weight.shape[0]
    _assert_exact(result.weight, "unstructured", 0.5)
    assert torch.all(result.error <= result.warm_error * (1 + 1e-9))  # documented: best candidate, never worse
    assert _objective(result.weight, weight, x) < _objective(warm, weight, x)


def test_unreachable_error_share_through_the_model(token_ids):
    model = tiny_model("llama")
    with pytest.raises(LambdaSearchError, match="strict_lambda=False"):
        model.prune(_config("unstructured", error_share=0.999, strict_lambda=True), calibration_data=token_ids)
    model = tiny_model("llama")
    model.prune(_config("unstructured", error_share=0.999), calibration_data=token_ids)
    for index in range(2):
        for op in DecoderLayout(model).operators(index):
            _assert_exact(op.read_weight(), "unstructured", 0.5)


@pytest.mark.parametrize("warm_start", ["sparsegpt", "wanda", "magnitude", None])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_singular_gram_gives_finite_exact_weights(warm_start, pattern):
    width = 32
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(7))  # rank 8 < 32: singular X̂X̂ᵀ
    x[:, 5] = 0.0  # a dead input channel
    x_hat = 0.9 * x
    weight = _weight(16, width, seed=8)
    pruner = _config(pattern, warm_start=warm_start).make_pruner()
    sparsity = 0.5
    plain = pruner.prune_weight(weight, _gram_stats(x), sparsity)
    corrected = pruner.solve_operator("op", weight, x_hat.t() @ x_hat, x.t() @ x_hat,
                                      (x @ weight.t()).square().sum(dim=0, dtype=torch.float64), sparsity)
    for pruned in (plain, corrected):
        # documented: a kept weight on a dead channel (or where the fit is already exact) may end at 0, so rows
        # can be sparser than asked, never denser (SparseGPT zeroes dead channels the same way)
        assert torch.isfinite(pruned).all()
        assert torch.all((pruned == 0).sum(dim=1) >= width // 2)
        assert torch.all(pruned[:, 5] == 0)
        if pattern == "2:4":
            assert satisfies_nm(pruned, 2, 4)
    warm = pruner.warm_start(weight, x.t() @ x, None, sparsity, "op")
    assert _objective(plain, weight, x) <= _objective(warm, weight, x) * (1 + 1e-4)
    warm_error, final_error, half_norm, _ = pruner.diagnostics["op"]
    assert final_error <= warm_error * (1 + 1e-6)
    # the Gram form ½ŵGŵᵀ − ŵ·b + ½c cancels down from ‖WX‖²/2 to a near-exact fit: compare on that scale
    assert final_error == pytest.approx(_objective(corrected, weight, x, x_hat), abs=1e-5 * half_norm)


def test_all_zero_inputs_keep_the_warm_start():
    """Documented fallback: an operator that never sees a non-zero input keeps its (exactly sparse) warm start."""
    weight = _weight(16, 32, seed=9)
    pruner = _config("2:4", warm_start="magnitude").make_pruner()
    pruned = pruner.prune_weight(weight, _gram_stats(torch.zeros(10, 32)), 0.5)
    _assert_exact(pruned, "2:4", 0.5)
    assert torch.equal(pruned, pruner.warm_start(weight, torch.zeros(32, 32), None, 0.5, "op"))


def test_non_finite_statistics_raise_instead_of_returning_nan():
    weight = _weight(16, 32, seed=10)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(11))
    x[3, 4] = float("nan")
    pruner = _config("unstructured").make_pruner()
    with pytest.raises(ValueError, match="NaN/Inf"):
        pruner.prune_weight(weight, _gram_stats(x), 0.5)


# -- 4. layer parallelism: threads over devices, torch.distributed ranks -----------------------


def _three_layer_llama():
    """A 3-layer tiny llama, so two ranks get unequal shares (layers [0, 1] and [2])."""
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return AutoPrunedModelForCausalLM.from_config(config).eval()


def _parallel_config() -> FISTAConfig:
    return FISTAConfig(sparsity=0.5, device="cpu", max_iters=10, lambda_steps=4, refine_iters=10)


def _parallel_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(12))


def _targeted_weights(model) -> dict[str, torch.Tensor]:
    """Every operator's weight as (out, in), read from the offload store for offloaded layers."""
    from hf_prune.engine.offload import read_parameter

    layout = DecoderLayout(model)
    weights = {}
    for op in (op for i in range(len(layout)) for op in layout.operators(i)):
        weight = read_parameter(op.module)
        weights[op.name] = (weight.t() if op.transposed else weight).clone()
    return weights


def distributed_worker(out_dir: str, offloaded: bool = False) -> None:
    """Body of one torchrun-like rank (run by ``test_distributed_ranks_equal_single_process``).

    ``offloaded``: the model is loaded from ``out_dir/source`` with every layer offloaded to
    disk, in one offload folder that all ranks share (as when every rank runs the same script).
    """
    from hf_prune.engine.distributed import distributed_state, is_main_process
    from hf_prune.engine.offload import materialized_bytes

    torch.set_num_threads(1)
    if offloaded:
        model = AutoPrunedModelForCausalLM.from_pretrained(Path(out_dir) / "source", device_map={"": "disk"},
                                                           offload_folder=str(Path(out_dir) / "offload"))
    else:
        model = _three_layer_llama()
    model.prune(_parallel_config(), calibration_data=_parallel_ids())
    world_size, rank = distributed_state()
    torch.save(_targeted_weights(model), Path(out_dir) / f"rank{rank}.pt")
    model.save_pretrained(Path(out_dir) / f"saved-by-rank{rank}")
    info = {"world_size": world_size, "rank": rank, "main": is_main_process(),
            "layers_in_memory": offloaded and materialized_bytes(model.model.layers) > 0}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(info))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def offloaded_distributed_worker(out_dir: str) -> None:
    distributed_worker(out_dir, offloaded=True)


def failing_distributed_worker(out_dir: str) -> None:
    """A rank whose share fails on rank 1 (run by ``test_distributed_rank_failure_stops_every_rank``)."""
    from hf_prune.engine import parallel
    from hf_prune.engine.distributed import distributed_state

    torch.set_num_threads(1)
    world_size, rank = distributed_state()
    real = parallel.prune_from_dense_inputs

    def prune_from_dense_inputs(pruner, layout, index, *args, **kwargs):
        if rank == 1:
            raise ValueError(f"injected failure in layer {index}")
        return real(pruner, layout, index, *args, **kwargs)

    parallel.prune_from_dense_inputs = prune_from_dense_inputs
    try:
        _three_layer_llama().prune(_parallel_config(), calibration_data=_parallel_ids())
        message = "no error"
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    (Path(out_dir) / f"rank{rank}.err").write_text(message)
    torch.distributed.destroy_process_group()


def _launch_ranks(function: str, out_dir: Path, world_size: int = 2) -> list[subprocess.Popen]:
    """``world_size`` processes with torchrun's environment, each running ``test_fista.<function>(out_dir)``."""
    port = _free_port()
    code = f"import sys, test_fista; test_fista.{function}(sys.argv[1])"  # cwd and tests/ are on sys.path
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                   RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(out_dir)], env=env, cwd=str(TESTS),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait_ranks(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    """Every rank's output; fails the test (killing the ranks) if any hangs or exits with an error."""
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a distributed rank hung")
    failed = [f"rank {rank}:\n{log[-2000:]}" for rank, (proc, log) in enumerate(zip(procs, logs)) if proc.returncode]
    assert not failed, "\n".join(failed)
    return logs


def test_distributed_rank_failure_stops_every_rank(tmp_path):
    """gloo, 2 processes: rank 1 raises while pruning; rank 0 raises too, naming rank 1, instead of waiting."""
    _wait_ranks(_launch_ranks("failing_distributed_worker", tmp_path), timeout=120)
    assert (tmp_path / "rank1.err").read_text() == "ValueError: injected failure in layer 2"
    rank0 = (tmp_path / "rank0.err").read_text()
    assert rank0.startswith("RuntimeError: torch.distributed rank(s) [1] failed"), rank0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("offloaded", [False, True], ids=["in-memory", "disk-offloaded"])
def test_distributed_ranks_equal_single_process(tmp_path, offloaded):
    """gloo, torchrun's environment: every rank ends with the single-process weights, exactly.

    In memory: 2 ranks. Disk-offloaded: 3 ranks sharing one offload folder; each reads its
    layer from the store, and the two it receives are written back, by two ranks at once.
    """
    world_size = 3 if offloaded else 2
    if offloaded:
        _three_layer_llama().save_pretrained(tmp_path / "source")
    procs = _launch_ranks("offloaded_distributed_worker" if offloaded else "distributed_worker", tmp_path,
                          world_size)

    # meanwhile, the single-process reference in this process, with the same thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _three_layer_llama()
        model.prune(_parallel_config(), calibration_data=_parallel_ids())
    finally:
        torch.set_num_threads(threads)
    expected = _targeted_weights(model)
    assert len(expected) == 3 * 7

    _wait_ranks(procs)
    for rank in range(world_size):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info == {"world_size": world_size, "rank": rank, "main": rank == 0, "layers_in_memory": False}
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, weight in expected.items():
            assert torch.equal(got[name], weight), f"rank {rank}, {name} differs from the single-process result"
        _assert_exact(got["model.layers.2.mlp.down_proj"], "unstructured", 0.5)
    # rank 0 saves, the others write nothing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("saved-by-rank") and p.name != "saved-by-rank0"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    if offloaded:
        assert not list((tmp_path / "offload").rglob("*.tmp")), "staging file left behind"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved-by-rank0").eval()
    probe = _parallel_ids()
    with torch.no_grad():
        assert torch.equal(plain(probe).logits, model(probe).logits)


def test_layers_spread_over_two_worker_threads_equal_one_device():
    """``devices=['cpu', 'cpu']``: one worker thread per device, layers round-robin; same weights."""
    reference = _three_layer_llama()
    reference.prune(_parallel_config(), calibration_data=_parallel_ids())
    spread = _three_layer_llama()
    config = PruningConfig.from_dict({**_parallel_config().to_dict(), "devices": ["cpu", "cpu"]})
    spread.prune(config, calibration_data=_parallel_ids())
    expected, got = _targeted_weights(reference), _targeted_weights(spread)
    for name, weight in expected.items():
        assert torch.equal(got[name], weight), name


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_gpu_solver_matches_cpu_sparsity(linear_problem):
    weight, x = linear_problem
    pruner = _config("2:4").make_pruner()
    stats = InputStatistics(x.shape[1], StatKind.GRAM, torch.device("cuda"))
    stats.update(x.cuda())
    pruned = pruner.prune_weight(weight.cuda(), stats, 0.5).cpu()
    _assert_exact(pruned, "2:4", 0.5)
    cpu = pruner.prune_weight(weight, _gram_stats(x), 0.5)
    assert _objective(pruned, weight, x) == pytest.approx(_objective(cpu, weight, x), rel=0.05)


# -- 5. configuration -----------------------------------------------------------------------------


def test_config_round_trip():
    config = FISTAConfig(sparsity=0.6, warm_start="wanda", error_correction=False, max_iters=7, tol=1e-3,
                         error_share=0.2, lambda_steps=3, refine_iters=5, strict_lambda=True,
                         solver_dtype="float64", dampening=0.05, ridge=0.1, devices="cpu", device="cpu")
    assert config.devices == ["cpu"]
    data = config.to_dict()
    assert data["method"] == "fista"
    assert PruningConfig.from_dict(data) == config
    assert FISTAConfig.from_dict(json.loads(config.to_json_string())) == config
    rebuilt = PruningConfig.from_json_string(config.to_json_string())
    assert type(rebuilt) is FISTAConfig and rebuilt == config
    assert rebuilt.solver_settings().dtype == torch.float64
    default = FISTAConfig()
    assert (default.error_share, default.warm_start, default.error_correction) == (0.3, "sparsegpt", True)
    assert PruningConfig.from_dict({"method": "fista", "pattern": "2:4", "sparsity": None}).sparsity == 0.5
    assert FISTAConfig(warm_start=None).to_dict()["warm_start"] is None


@pytest.mark.parametrize(("field", "value", "match"), [
    ("warm_start", "random", "warm_start"),
    ("error_correction", "yes", "error_correction"),
    ("strict_lambda", 1, "strict_lambda"),
    ("max_iters", 0, "max_iters"),
    ("max_iters", 2.5, "max_iters"),
    ("lambda_steps", -1, "lambda_steps"),
    ("refine_iters", True, "refine_iters"),
    ("tol", 0.0, "tol"),
    ("tol", "small", "tol"),
    ("error_share", 0.0, "error_share"),
    ("error_share", 1.0, "error_share"),
    ("error_share", float("nan"), "error_share"),
    ("solver_dtype", "float16", "solver_dtype"),
    ("dampening", 0.0, "dampening"),
    ("ridge", -0.1, "ridge"),
    ("layer_inputs", "sparse", "layer_inputs"),
    ("devices", [], "devices"),
    ("devices", [0], "devices"),
])
def test_config_rejects_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        FISTAConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        PruningConfig.from_dict({"method": "fista", field: value})


def test_config_rejects_other_mistakes():
    with pytest.raises(ValueError, match="layer_inputs='dense'"):
        FISTAConfig(devices=["cpu"], layer_inputs="pruned")
    with pytest.raises(ValueError, match="unknown field"):
        PruningConfig.from_dict({"method": "fista", "lambda": 0.1})
    with pytest.raises(ValueError, match="contradicts"):
        FISTAConfig(sparsity=0.7, pattern="2:4")


# -- 6. end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_save_reload(family, pattern, token_ids, tmp_path):
    model = tiny_model(family)
    config = _config(pattern)
    report = model.prune(config, calibration_data=token_ids)
    assert report.overall == pytest.approx(0.5)
    layout = DecoderLayout(model)
    checked = 0
    for index in range(len(layout)):
        for op in layout.operators(index):
            _assert_exact(op.read_weight(), pattern, 0.5)
            checked += 1
    assert checked >= 8

    probe = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(probe).logits
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]
    assert record["method"] == "fista" and record["pattern"] == pattern
    assert record["measured_sparsity"]["overall"] == pytest.approx(0.5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(plain(probe).logits, expected)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.pruning_config == config
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, expected)


def test_sequential_pruned_inputs_variant(token_ids):
    """``layer_inputs='pruned'`` runs in the sequential engine: still exact, and different from the dense-input run."""
    dense_inputs = tiny_model("qwen2")
    dense_inputs.prune(_config("unstructured"), calibration_data=token_ids)
    sequential = tiny_model("qwen2")
    sequential.prune(_config("unstructured", layer_inputs="pruned"), calibration_data=token_ids)
    first, second = _targeted_weights(dense_inputs), _targeted_weights(sequential)
    for name, weight in second.items():
        _assert_exact(weight, "unstructured", 0.5)
        if ".layers.0." in name:  # layer 0 sees the same (embedding) inputs either way
            assert torch.equal(weight, first[name]), name
    assert any(not torch.equal(second[n], first[n]) for n in second if ".layers.1." in n)
