"""Pruning models larger than the memory budget: accelerate disk/CPU offload, activation offload."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_prune import (
    AutoPrunedModelForCausalLM,
    FISTAConfig,
    LLMRankConfig,
    MagnitudeConfig,
    MutualInfoConfig,
    SparseGPTConfig,
    WandaConfig,
)
from hf_prune.engine.activations import activation_bytes, plan_activations
from hf_prune.engine.loop import prune_model
from hf_prune.engine.offload import (
    PRUNED_SUBFOLDER,
    is_offloaded,
    layer_on_device,
    materialized_bytes,
    read_parameter,
)
from hf_prune.walker.layout import DecoderLayout

BUDGET = 6 * 2**20  # bytes of weights allowed on the (CPU) device; the model holds ~14 MiB


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 6-layer llama (hidden 256, ~14 MiB of fp32 weights) saved as safetensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    directory = tmp_path_factory.mktemp("source")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))


def _digest(directory) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def _weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, _ in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        out[name] = read_parameter(model.get_submodule(owner), attr).detach().clone()
    return out


def _layer_bytes(model) -> int:
    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in DecoderLayout(model).layers)


def test_disk_offloaded_wanda_equals_in_memory_under_budget(source, ids, tmp_path):
    config = WandaConfig(sparsity=0.5)
    before = _digest(source)
    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32, pruning_config=config,
                                                           calibration_data=ids)
    model_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert model_bytes > 2 * BUDGET

    offload_dir = tmp_path / "offload"
    model = AutoPrunedModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map="auto", max_memory={"cpu": BUDGET}, offload_folder=str(offload_dir),
    )
    disk_layers = [name for name, where in model.hf_device_map.items() if where == "disk" and ".layers." in name]
    assert len(disk_layers) >= 3, model.hf_device_map
    assert is_offloaded(model)
    resident = materialized_bytes(model)
    assert resident <= BUDGET

    run = prune_model(model, config, _calibration(ids))
    # (b) memory: at most one offloaded layer was materialized at a time, on top of what the budget placed
    layer_bytes = _layer_bytes(model)
    assert len(run.offload.layer_bytes) == 6
    assert max(run.offload.layer_bytes) <= layer_bytes
    assert run.offload.peak_materialized_bytes <= resident + layer_bytes <= BUDGET + layer_bytes
    assert run.offload.peak_materialized_bytes < model_bytes / 2
    assert materialized_bytes(model) == resident  # every offloaded layer went back to meta
    loader = model.model.layers[-1].mlp.down_proj._hf_hook.weights_map.dataset
    assert loader.state_dict == {}  # nothing of the model is cached in RAM by the store
    assert run.offload.layers_written == len(disk_layers)
    assert sorted(p.name for p in (offload_dir / PRUNED_SUBFOLDER).iterdir()) == sorted(
        f"{name}.safetensors" for name in disk_layers)
    assert _digest(source) == before  # the source checkpoint the index pointed at was never written

    # (a) same weights as pruning fully in memory, and the same forward
    expected, got = _weights(reference), _weights(model)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:2]).logits, reference(ids[:2]).logits, rtol=0, atol=1e-6)
    assert model.pruning_report().overall == pytest.approx(0.5)

    # (c) save, then plain transformers reload gives the pruned weights
    out = tmp_path / "saved"
    model.save_pretrained(out, model_card=False)
    assert len(list(out.glob("model*.safetensors"))) > 1  # saved a layer's worth at a time
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def _calibration(ids):
    from hf_prune.data.calibration import build_calibration

    return build_calibration(ids, None, "c4-sample", ids.shape[0], ids.shape[1], 0)


def test_from_pretrained_prunes_offloaded_model_without_offload_folder_argument(source, ids, tmp_path):
    """``pruning_config`` through ``from_pretrained`` on a disk-offloaded model; magnitude needs no data."""
    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                           pruning_config=MagnitudeConfig(sparsity=0.5))
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" for i in range(6)})
    model = AutoPrunedModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "off"),
        pruning_config=MagnitudeConfig(sparsity=0.5),
    )
    for name, tensor in _weights(reference).items():
        assert torch.equal(tensor, read_parameter(model.get_submodule(name.rpartition(".")[0]),
                                                  name.rpartition(".")[2])), name
    assert model.config.pruning_config["method"] == "magnitude"


def test_cpu_offloaded_state_dict_store(source, ids):
    """accelerate.cpu_offload keeps weights in a CPU dict: the pruned layer replaces its entries."""
    from accelerate import cpu_offload

    config = WandaConfig(sparsity=0.5)
    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32, pruning_config=config,
                                                           calibration_data=ids)
    model = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert materialized_bytes(model) == 0
    model.prune(config, calibration_data=ids)
    assert materialized_bytes(model) == 0
    got = _weights(model)
    for name, tensor in _weights(reference).items():
        assert torch.equal(tensor, got[name]), name


def test_failed_layer_writes_nothing_and_restores_hooks(source, tmp_path):
    model = AutoPrunedModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(tmp_path / "off"))
    layer = model.model.layers[2]
    hook = layer.mlp.up_proj._hf_hook
    loader = hook.weights_map.dataset
    entry = dict(loader.index["model.layers.2.mlp.up_proj.weight"])
    with pytest.raises(RuntimeError, match="boom"):
        with layer_on_device(model, layer, "model.layers.2", torch.device("cpu")):
            assert layer.mlp.up_proj.weight.device.type == "cpu" and not hook.offload
            layer.mlp.up_proj.weight.data.zero_()
            raise RuntimeError("boom")
    assert hook.offload and layer.mlp.up_proj.weight.device.type == "meta"
    assert loader.index["model.layers.2.mlp.up_proj.weight"] == entry
    assert not (tmp_path / "off" / PRUNED_SUBFOLDER).exists()


def _disk_offloaded(source, tmp_path, name="off"):
    model = AutoPrunedModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(tmp_path / name))
    assert materialized_bytes(model) == 0
    return model


@pytest.mark.parametrize(
    "config",
    [WandaConfig(sparsity=0.5, owl=True),
     FISTAConfig(sparsity=0.5, device="cpu", max_iters=5, lambda_steps=3, refine_iters=5),
     FISTAConfig(sparsity=0.5, pattern="2:4", device="cpu", max_iters=5, lambda_steps=3, refine_iters=5,
                 devices=["cpu", "cpu"])],
    ids=["owl", "fista-dense-inputs", "fista-two-worker-threads"],
)
def test_dense_pass_methods_on_disk_offload_equal_in_memory(source, ids, tmp_path, config):
    """OWL's outlier scan and FISTA's dense inputs run a dense pass first: offloaded layers are read
    for it without being written, then pruned one at a time like the sequential methods."""
    before = _digest(source)
    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference.prune(config, calibration_data=ids)
    model = _disk_offloaded(source, tmp_path)
    run = prune_model(model, config, _calibration(ids))
    assert materialized_bytes(model) == 0
    devices = len(getattr(config, "devices", None) or ())
    workers = devices if devices > 1 else 0
    # one layer at a time; with worker threads, one per worker beside the dense pass's
    assert run.offload.peak_materialized_bytes <= (1 + workers) * _layer_bytes(model)
    assert run.offload.layers_written == 6  # the dense pass wrote nothing
    assert _digest(source) == before
    if config.owl is not None:
        assert run.layer_sparsity == pytest.approx(reference.config.pruning_config["layer_sparsity"])
        assert len(set(run.layer_sparsity)) > 1
    got = _weights(model)
    for name, tensor in _weights(reference).items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize(
    "config", [LLMRankConfig(amount=0.3, heads=True), MutualInfoConfig(amount=0.25, compensate=True)],
    ids=["llm-rank-heads", "mutual-info-compensated"],
)
def test_structured_on_disk_offload_shrinks_each_layer_in_its_store(source, ids, tmp_path, config, monkeypatch):
    """Neurons and heads leave an offloaded layer: its store holds the smaller weights, the forward,
    save and reload match pruning in memory, and no more than a layer was held at a time."""
    import hf_prune.modeling

    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference.prune(config, calibration_data=ids)
    model = _disk_offloaded(source, tmp_path)
    runs = []
    monkeypatch.setattr(hf_prune.modeling, "prune_model", lambda *args: runs.append(prune_model(*args)) or runs[-1])
    model.prune(config, calibration_data=ids)  # records the kept neurons and heads for the reload
    (run,) = runs
    assert materialized_bytes(model) == 0
    assert run.offload.peak_materialized_bytes <= _layer_bytes(_disk_offloaded(source, tmp_path, "full"))
    down = model.model.layers[0].mlp.down_proj
    kept = reference.model.layers[0].mlp.down_proj.in_features
    assert kept < 512 and down.in_features == kept and down.weight.shape == (256, kept)  # meta, new shape
    assert read_parameter(down).shape == (256, kept)
    got = _weights(model)
    for name, tensor in _weights(reference).items():
        assert torch.equal(got[name], tensor), name
    with torch.no_grad():
        expected_logits = reference(ids[:2]).logits
        torch.testing.assert_close(model(ids[:2]).logits, expected_logits, rtol=0, atol=1e-6)
    out = tmp_path / "saved"
    model.save_pretrained(out, model_card=False)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.model.layers[0].mlp.down_proj.weight.shape == (256, kept)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids[:2]).logits, expected_logits, rtol=0, atol=1e-6)


def test_activation_plan():
    gpu = torch.device("cuda")
    nbytes = activation_bytes(64, 512, 4096, torch.bfloat16)
    assert nbytes == 64 * 512 * 4096 * 2
    # plenty of room: activations stay on the device, batch not limited
    assert plan_activations(nbytes, 64, gpu, free_bytes=80 * 2**30) == (gpu, None)
    # too little room: kept on the CPU, batches sized to the room left
    where, batch = plan_activations(nbytes, 64, gpu, free_bytes=2**30)
    assert where == torch.device("cpu") and 1 <= batch < 64
    assert 4 * batch * (nbytes // 64) <= 0.25 * 2**30
    assert plan_activations(nbytes, 64, gpu, free_bytes=1)[1] == 1
    # CPU pruning or unknown free memory: nothing to offload to
    assert plan_activations(nbytes, 64, torch.device("cpu"), free_bytes=1) == (torch.device("cpu"), None)
    assert plan_activations(nbytes, 64, gpu, free_bytes=None) == (gpu, None)


@pytest.mark.parametrize(
    "config", [WandaConfig(sparsity=0.5, batch_size=4), SparseGPTConfig(sparsity=0.5, pattern="2:4")],
    ids=["wanda-batched", "sparsegpt-2:4"],
)
def test_other_paths_on_disk_offload_equal_in_memory(source, ids, tmp_path, config):
    reference = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32, pruning_config=config,
                                                           calibration_data=ids)
    model = AutoPrunedModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(tmp_path / "off"),
        pruning_config=config, calibration_data=ids)
    got = _weights(model)
    for name, tensor in _weights(reference).items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_writers_of_the_same_layer_never_share_a_staging_file(tmp_path, monkeypatch):
    """torchrun ranks sharing an offload folder write a received layer at the same time: a second
    writer finishing while the first is between staging and renaming must not take its file."""
    from types import SimpleNamespace

    import hf_prune.engine.offload as offload

    loader = SimpleNamespace(save_folder=str(tmp_path), index={})
    real_save = offload.save_file
    calls = []

    def save_then_let_another_writer_finish(tensors, path):
        real_save(tensors, path)
        calls.append(path)
        if len(calls) == 1:  # the other rank writes the same layer now
            offload._Store(nn.Module()).write("model.layers.0", [(loader, "w", torch.ones(2))])

    monkeypatch.setattr(offload, "save_file", save_then_let_another_writer_finish)
    offload._Store(nn.Module()).write("model.layers.0", [(loader, "w", torch.zeros(2))])
    assert len(set(calls)) == 2
    written = tmp_path / PRUNED_SUBFOLDER / "model.layers.0.safetensors"
    assert loader.index["w"]["safetensors_file"] == str(written)
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no staging file left


@pytest.mark.parametrize("store", ["disk", "cpu-dict"])
def test_read_only_onload_leaves_the_store_unchanged(source, tmp_path, store):
    """``write_back=False`` (the dense passes): whatever the body does to the onloaded weights, the
    store keeps its values, also for a CPU-dict store onloaded to the CPU (no shared memory)."""
    from accelerate import cpu_offload

    if store == "disk":
        model = _disk_offloaded(source, tmp_path)
    else:
        model = AutoPrunedModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        cpu_offload(model, execution_device=torch.device("cpu"))
    layer = model.model.layers[1]
    before = read_parameter(layer.mlp.up_proj).clone()
    with layer_on_device(model, layer, "model.layers.1", torch.device("cpu"), write_back=False):
        layer.mlp.up_proj.weight.data.zero_()
    assert layer.mlp.up_proj.weight.device.type == "meta"
    assert torch.equal(read_parameter(layer.mlp.up_proj), before)
    assert not (tmp_path / "off" / PRUNED_SUBFOLDER).exists()
