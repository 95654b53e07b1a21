"""Official-format glimpse modules: strict loading, clear failures, round trips, parameter counts."""
from __future__ import annotations

import json

import pytest
import torch

from workers.modeling.glimpse import CONFIG_NAME, WEIGHTS_NAME, GlimpseCheckpointError, GlimpseConfig, GlimpseModules
from workers.modeling.importance_predictor import ImportancePredictor, PredictorConfig

from engine_helpers import random_modules


def official_layout_state(modules: GlimpseModules) -> dict:
    """The nested dict the official `save_new_modules` writes, built by hand from the reference's key table."""
    fuser = modules.attn_fuser
    state = {
        "attn_in_proj.weight": fuser.attn_in_proj.weight, "attn_in_proj.bias": fuser.attn_in_proj.bias,
    }
    for i, block in enumerate(fuser.layers):
        state[f"cond_in_projs.{i}.weight"] = fuser.cond_in_projs[i].weight
        state[f"cond_in_projs.{i}.bias"] = fuser.cond_in_projs[i].bias
        state[f"layers.{i}.norm1.weight"] = block.norm1.weight
        state[f"layers.{i}.norm2.weight"] = block.norm2.weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"layers.{i}.attn.{proj}.weight"] = getattr(block.attn, proj).weight
        for proj in ("gate_proj", "up_proj", "down_proj"):
            state[f"layers.{i}.mlp.{proj}.weight"] = getattr(block.mlp, proj).weight
            state[f"layers.{i}.mlp.{proj}.bias"] = getattr(block.mlp, proj).bias
    last = len(fuser.layers) - 1
    state[f"attn_out_projs.{last}.weight"] = fuser.attn_out_projs[last].weight
    state[f"attn_out_projs.{last}.bias"] = fuser.attn_out_projs[last].bias
    clone = lambda t: t.detach().clone()  # noqa: E731
    return {
        "learnable_embeddings": clone(modules.learnable_embeddings),
        "le_proj": {"weight": clone(modules.le_proj.weight), "bias": clone(modules.le_proj.bias)},
        "le_norm": {"weight": clone(modules.le_norm.weight)},
        "attn_fuser": {k: clone(v) for k, v in state.items()},
    }


@pytest.fixture
def official_dir(tmp_path, tiny_model):
    modules = random_modules(tiny_model, seed=3)
    config = tiny_model.config.to_dict()
    config.update(modules.config.gp_fields(), model_type="qwen2_5_vl_gp")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    torch.save(official_layout_state(modules), tmp_path / WEIGHTS_NAME)
    return tmp_path, modules


def test_official_layout_loads_strictly(official_dir):
    path, original = official_dir
    loaded = GlimpseModules.from_directory(path)
    assert loaded.config.selected_layers == original.config.selected_layers
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_writes_the_official_layout_and_round_trips(tmp_path, tiny_model):
    modules = random_modules(tiny_model, seed=4)
    modules.save(tmp_path, base_config=tiny_model.config.to_dict())
    raw = torch.load(tmp_path / WEIGHTS_NAME, weights_only=True)
    expected = official_layout_state(modules)
    assert set(raw) == set(expected)
    assert set(raw["attn_fuser"]) == set(expected["attn_fuser"])
    assert "inv_freq" not in " ".join(raw["attn_fuser"])
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["model_type"] == "qwen2_5_vl_gp" and config["reduce_layer"] == 2
    again = GlimpseModules.from_directory(tmp_path)
    x = torch.randn(10, 4)  # one selected layer x 4 heads
    feats = [torch.randn(10, 32), torch.randn(10, 32)]
    torch.testing.assert_close(again.attn_fuser(x, feats, [(2, 5)]), modules.attn_fuser(x, feats, [(2, 5)]))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["attn_fuser"].pop("layers.1.mlp.up_proj.bias"), "missing tensor 'attn_fuser.layers.1.mlp.up_proj.bias'"),
        (lambda s: s["attn_fuser"].__setitem__("layers.0.extra.weight", torch.zeros(1)), "unexpected tensor 'attn_fuser.layers.0.extra.weight'"),
        (lambda s: s.__setitem__("learnable_embeddings", torch.zeros(3, 1, 64)), "tensor 'learnable_embeddings' has shape (3, 1, 64), expected (4, 1, 64)"),
        (lambda s: s.pop("le_norm"), "missing key 'le_norm'"),
        (lambda s: s.__setitem__("bogus", {}), "unexpected key 'bogus'"),
    ],
)
def test_corrupt_checkpoints_fail_naming_the_key(official_dir, corrupt, message):
    path, _ = official_dir
    state = torch.load(path / WEIGHTS_NAME, weights_only=True)
    corrupt(state)
    torch.save(state, path / WEIGHTS_NAME)
    with pytest.raises(GlimpseCheckpointError) as err:
        GlimpseModules.from_directory(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pickled_code_is_refused(official_dir):
    path, _ = official_dir

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"learnable_embeddings": Evil()}, path / WEIGHTS_NAME)
    with pytest.raises(GlimpseCheckpointError, match="cannot be read safely"):
        GlimpseModules.from_directory(path)


def test_unsupported_variants_fail_clearly(official_dir):
    path, _ = official_dir
    config = json.loads((path / CONFIG_NAME).read_text())
    config["attn_fuse_use_flash_attn"] = True
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(GlimpseCheckpointError, match="CondFA2Attention"):
        GlimpseModules.from_directory(path)


def test_missing_files(tmp_path):
    with pytest.raises(GlimpseCheckpointError, match="config.json: not found"):
        GlimpseModules.from_directory(tmp_path)


def released_config(heads, hidden, layers, k, vision_hidden=1280) -> GlimpseConfig:
    return GlimpseConfig(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, vision_hidden_size=vision_hidden,
        selected_layers=(k,), reduce_layer=k, selected_visual_layers=(31, 23, 15, 7), le_layers=tuple(range(layers)),
    )


@pytest.mark.parametrize(
    "heads, hidden, layers, k, vip, glimpse",
    [(28, 3584, 28, 18, 9_454_081, 12_952_576), (16, 2048, 36, 23, 9_451_009, 4_272_128)],
)
def test_parameter_counts_match_the_released_checkpoints(heads, hidden, layers, k, vip, glimpse):
    """Counts from the reference's table (section 3.2) for Qwen2.5-VL-7B and -3B."""
    cfg = released_config(heads, hidden, layers, k)
    predictor = ImportancePredictor(cfg.predictor_config())
    assert sum(p.numel() for p in predictor.parameters()) == vip
    assert sum(p.numel() for p in predictor.layers[0].parameters()) == 1_705_728
    embeds = layers * hidden
    proj = hidden * hidden + hidden
    assert embeds + proj + hidden == glimpse  # learnable_embeddings + le_proj + le_norm


def test_predictor_attention_stays_within_each_image():
    cfg = PredictorConfig(attn_in=4, vision_hidden=8, num_levels=2, fuse_size=8, cond_size=8, num_heads=2)
    predictor = ImportancePredictor(cfg).eval()
    torch.manual_seed(0)
    x, feats = torch.randn(6 + 4, 4), [torch.randn(10, 8), torch.randn(10, 8)]
    base = predictor(x, feats, [(2, 3), (2, 2)])
    x2 = x.clone()
    x2[6:] += 5.0  # change only the second image
    other = predictor(x2, feats, [(2, 3), (2, 2)])
    torch.testing.assert_close(base[:6], other[:6])
    assert not torch.allclose(base[6:], other[6:])
    alone = predictor(x[6:], [f[6:] for f in feats], [(2, 2)])
    torch.testing.assert_close(alone, base[6:])
