"""Prompting and decoding settings of a job: chat.system, chat.template / template_file, sampling.top_k,
repetition_penalty and stop, and a row's own decoding settings (input.columns.sampling)."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.images import ImageStageConfig, row_sampling_value
from pipeline.jobfile import JobFileError, load_job
from pipeline.stages import to_block
from workers.toyworld import generate_samples, load_world
from schemas.rows import KEY_COLUMN, READ_ERROR_COLUMN, ROW_COLUMN

REPO = Path(__file__).resolve().parents[2]
BASE, GLIMPSE = REPO / "models" / "small-qwen2_5_vl-v2", REPO / "models" / "small-qwen2_5_vl-v2-glimpse"
BARE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (BASE / "model.safetensors").exists(), reason="the v2 small model is not shipped")]


def _job(*extra):
    return load_job(REPO / "jobs" / "demo.yaml", [f"model.base={BASE}", f"model.glimpse_modules={GLIMPSE}",
                                                   "sampling.max_new_tokens=4", *extra])


def _block(job, n, extra=None, image=None, question="What colour is it?") -> pa.Table:
    buf = io.BytesIO()
    (image or Image.new("RGB", (224, 224), (30, 30, 200))).save(buf, format="PNG")
    cols = {"id": [f"r{i}" for i in range(n)], "image": [buf.getvalue()] * n, "question": [question] * n,
            KEY_COLUMN: ["k"] * n, ROW_COLUMN: pa.array(range(n), pa.int64()), READ_ERROR_COLUMN: pa.nulls(n, pa.string())}
    cols.update(extra or {})
    return to_block(pa.table(cols), ImageStageConfig.from_job(job))


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_a_rows_own_sampling_settings(scheduler):
    from workers.generate import GlimpseUDF

    job = _job("input.columns.sampling=samp", f"batching.scheduler={scheduler}")
    values = ['{"max_new_tokens": 1}', None, json.dumps({"temperature": 0.7, "top_k": 5}), '{"temperature": -1}', "not json",
              '{"beams": 2}']
    out = GlimpseUDF(job)(_block(job, len(values), {"samp": values})).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "ok", "error", "error", "error"]
    assert out[0]["output_tokens"] == 1 and 1 <= out[1]["output_tokens"] <= 4
    assert "bad sampling settings (temperature: input should be greater than or equal to 0)" in out[3]["error"]
    assert "bad sampling settings" in out[4]["error"] and "beams" in out[5]["error"]


def test_row_sampling_values_are_checked():
    assert row_sampling_value(None, "c") == (None, None)
    assert row_sampling_value({"stop": ["."], "top_p": None}, "c") == ('{"stop":["."]}', None)
    assert row_sampling_value([("max_new_tokens", 3)], "c") == ('{"max_new_tokens":3}', None)  # a map column
    assert "not an object" in row_sampling_value("[1, 2]", "c")[1]


def test_system_prompt_template_and_stop_strings(tmp_path):
    from workers.generate import GlimpseUDF

    plain = GlimpseUDF(_job())
    system = GlimpseUDF(_job("chat.system=Answer with one word."))
    bare_file = tmp_path / "bare.jinja"
    bare_file.write_text(BARE)
    bare = GlimpseUDF(_job(f"chat.template_file={bare_file}"))
    texts = {}
    for name, udf in (("plain", plain), ("system", system), ("bare", bare)):
        from workers.modeling.api import GenerationRequest

        inputs = udf.engine.build_inputs([GenerationRequest(images=(Image.new("RGB", (56, 56)),), prompt="Q?")])
        texts[name] = udf.engine.processor.tokenizer.decode(inputs.input_ids[0])
    assert "Answer with one word." in texts["system"] and "Answer with one word." not in texts["plain"]
    assert texts["bare"].endswith("<|vision_end|>Q?") and "<|im_start|>" not in texts["bare"]
    # a caption row of the model's own world: a multi-word answer whatever the weights, so a stop string can cut it
    sample = next(x for x in generate_samples(dataclasses.replace(load_world(BASE, seed=4711), two_image_share=0.0), 50) if x.qtype == "captioning")
    block = _block(plain.job, 2, image=sample.image, question=sample.question)
    full = plain(block).to_pylist()
    assert full[0]["status"] == "ok" and len(full[0]["answer"]) >= 2, full[0]
    stop = full[0]["answer"][1:]
    cut = GlimpseUDF(_job(f"sampling.stop=[{json.dumps(stop)}]"))(block).to_pylist()
    assert cut[0]["answer"] == full[0]["answer"][:1] and cut[0]["finish_reason"] == "stop"


def test_bad_templates_fail_at_start(tmp_path):
    from workers.generate import GlimpseUDF

    with pytest.raises(ValueError, match="image placeholder"):
        GlimpseUDF(_job("chat.template=\"{{ messages[0]['content'][1]['text'] }}\""))  # quoted: --set values are YAML
    with pytest.raises(JobFileError, match="chat.template_file: cannot read"):
        _job(f"chat.template_file={tmp_path / 'missing.jinja'}")
    with pytest.raises(JobFileError, match="not both"):
        _job("chat.template=x", f"chat.template_file={tmp_path / 'a'}")
    with pytest.raises(JobFileError, match="sampling.repetition_penalty"):
        _job("sampling.repetition_penalty=0")
