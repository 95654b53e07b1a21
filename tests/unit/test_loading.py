"""Loading from local dirs and fsspec URLs, GlimpsePrune+ LoRA merging, and the loaded engine."""
from __future__ import annotations

import copy
from pathlib import Path

import fsspec
import pytest
import torch

from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.glimpse import GlimpseModules
from workers.modeling.loading import ModelLoadError, load_engine, merge_lora, resolve_dir
from workers.modeling.tiny import TinySpec, build_tiny_model, load_processor, save_tiny_model_dir

from engine_helpers import patterned_image, random_modules


def upload_dir(local: Path, url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe(f"{root}/{path.relative_to(local)}", path.read_bytes())


def make_adapter(model, out_dir: Path, seed: int = 0) -> Path:
    """A random (non-zero) PEFT LoRA adapter on every decoder linear layer, saved by peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\..*_proj", init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(out_dir)
    return out_dir, peft_model.merge_and_unload()


def logits_of(model) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_local_and_memory_urls_resolve(tmp_path):
    local = tmp_path / "modules"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert resolve_dir(local) == local
    assert resolve_dir(f"file://{local}") == local
    upload_dir(local, "memory://bucket/mods")
    copied = resolve_dir("memory://bucket/mods", cache_dir=tmp_path / "cache")
    assert (copied / "config.json").read_text() == "{}"
    assert resolve_dir("memory://bucket/mods", cache_dir=tmp_path / "cache") == copied  # cached
    with pytest.raises(ModelLoadError, match="no files found|cannot list"):
        resolve_dir("memory://bucket/none", cache_dir=tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_dir(str(tmp_path / "missing"))


def test_hub_id_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct: cannot fetch"):
        resolve_dir("ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct")


def test_lora_merge_equals_peft(tmp_path, tiny_model):
    adapter_dir, peft_merged = make_adapter(tiny_model, tmp_path / "adapter")
    ours = copy.deepcopy(tiny_model)
    assert merge_lora(ours, adapter_dir) == 4 * 7  # 4 layers x (q, k, v, o, gate, up, down)
    assert not torch.allclose(logits_of(ours), logits_of(tiny_model))
    torch.testing.assert_close(logits_of(ours), logits_of(peft_merged), atol=1e-5, rtol=1e-5)


def test_lora_merge_accepts_the_official_451_layout(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    adapter_dir, peft_merged = make_adapter(tiny_model, tmp_path / "adapter")
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    renamed = {k.replace("model.language_model.layers.", "model.layers."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(adapter_dir / "adapter_model.safetensors"))
    ours = copy.deepcopy(tiny_model)
    merge_lora(ours, adapter_dir)
    torch.testing.assert_close(logits_of(ours), logits_of(peft_merged), atol=1e-5, rtol=1e-5)


def test_load_engine_from_urls_with_glimpse_plus_dir(tmp_path):
    spec = TinySpec()
    base_dir = save_tiny_model_dir(tmp_path / "base", spec, seed=0)
    model = build_tiny_model(spec, seed=0)
    modules = random_modules(model, seed=5)
    plus_dir = tmp_path / "plus"
    _, merged = make_adapter(model, plus_dir)  # adapter + modules in one directory, as GP+ ships them
    modules.save(plus_dir, base_config=model.config.to_dict())
    upload_dir(plus_dir, "memory://models/gp-plus")

    engine = load_engine(str(base_dir), "memory://models/gp-plus", dtype="float32", device="cpu")
    assert engine.prunes and engine.rule.threshold == 0.5
    expected_engine = GlimpseEngine(merged.eval(), load_processor(base_dir), GlimpseModules.from_directory(plus_dir))
    requests = [GenerationRequest(images=(patterned_image(84, 84, 9),), prompt="What color is the circle?")]
    sampling = SamplingParams(max_new_tokens=4)
    got = engine.generate(requests, sampling, return_masks=True)[0]
    want = expected_engine.generate(requests, sampling, return_masks=True)[0]
    assert got.token_ids == want.token_ids and torch.equal(got.keep_mask, want.keep_mask)


def test_modules_that_do_not_fit_the_model_fail(tmp_path, tiny_model, tiny_processor):
    modules = random_modules(tiny_model, seed=0, reduce_layer=7, selected_layers=(7,))
    with pytest.raises(ValueError, match="reduce_layer 7 >= 4 decoder layers"):
        GlimpseEngine(tiny_model, tiny_processor, modules)


def test_hub_style_directory_naming_the_stock_processor_loads(tmp_path):
    """Real Qwen2.5-VL repos name `Qwen2_5_VLProcessor` (with a video processor); we load image-only."""
    base = save_tiny_model_dir(tmp_path / "base")
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = base / name
        path.write_text(path.read_text().replace('"ImageOnlyQwen2_5_VLProcessor"', '"Qwen2_5_VLProcessor"'))
    assert "Qwen2_5_VLProcessor" in (base / "processor_config.json").read_text()
    engine = load_engine(str(base), dtype="float32", device="cpu")
    result = engine.generate([GenerationRequest(images=(patterned_image(56, 56, 1),), prompt="Is there a circle?")],
                             SamplingParams(max_new_tokens=2))[0]
    assert result.visual_tokens == 4 and result.output_tokens >= 1
