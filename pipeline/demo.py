"""`make demo`: the demo job end to end on the embedded defaults.

1. writes sample shards from the synthetic world to out/demo/input (once);
2. runs jobs/demo.yaml on a local Ray runtime with the small model the repo ships
   (models/small-qwen2_5_vl-v2 + models/small-qwen2_5_vl-v2-glimpse), on rows drawn from the world
   that model was trained on (its world.json, a seed of the demo's own); if the model is missing, a
   tiny random-weight model is generated instead and the answers are noise (it says so);
3. prints a few rows: question, answer, the generator's answer, keep ratio.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUT = REPO / "out" / "demo" / "input"
SHIPPED = REPO / "models" / "small-qwen2_5_vl-v2"
SHIPPED_GLIMPSE = REPO / "models" / "small-qwen2_5_vl-v2-glimpse"
DEMO_SEED = 2026  # no training or evaluation run uses it


def sample_shards(rows: int = 32) -> None:
    from workers.toyworld import load_world, write_shards

    if not list(INPUT.glob("*.parquet")):
        write_shards(load_world(SHIPPED, seed=DEMO_SEED), rows, INPUT, rows_per_shard=16)


def fallback_model() -> list[str]:
    """A tiny random model (only when the shipped one is absent)."""
    from workers.modeling.glimpse import GlimpseConfig, GlimpseModules
    from workers.modeling.tiny import build_tiny_model, save_tiny_model_dir

    root = REPO / "out" / "demo" / "random-model"
    if not (root / "glimpse" / "new_modules_gp.pt").exists():
        save_tiny_model_dir(root / "base")
        model = build_tiny_model()
        text = model.config.text_config
        cfg = GlimpseConfig(
            hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads,
            num_hidden_layers=text.num_hidden_layers, vision_hidden_size=model.config.vision_config.hidden_size,
            selected_layers=(2,), reduce_layer=2, attn_fuse_size=32, visual_cond_size=32, attn_fuse_num_heads=2,
            selected_visual_layers=(3, 1), le_layers=tuple(range(text.num_hidden_layers)),
        )
        GlimpseModules(cfg).save(root / "glimpse", base_config=model.config.to_dict())
    return [f"model.base={root / 'base'}", f"model.glimpse_modules={root / 'glimpse'}"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sample_shards()
    overrides = [f"input.uri={INPUT}", f"output.uri={REPO / 'out' / 'demo' / 'output'}"]
    if not (SHIPPED / "config.json").exists() or not (SHIPPED_GLIMPSE / "config.json").exists():
        print("NOTE: the shipped small model is missing; using a tiny RANDOM model (answers are noise)")
        overrides += fallback_model()
    from pipeline.__main__ import print_summary
    from pipeline.jobfile import load_job
    from pipeline.run import run_job

    job = load_job(REPO / "jobs" / "demo.yaml", overrides)
    import ray.data

    # A demo on a terminal-less CI log would otherwise print Ray Data's progress as many INFO lines a second.
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = run_job(job)
    show_rows(REPO / "out" / "demo" / "output")
    print_summary(summary)
    return 0


def show_rows(output: Path, limit: int = 12) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("*.parquet"))])
    print(f"\n{'question':<38} {'answer':<28} {'truth':<28} keep")
    for row in table.slice(0, limit).to_pylist():
        answer = row["answer"] if row["status"] == "ok" else f"ERROR: {row['error']}"
        keep = f"{row['keep_ratio']:.2f}" if row["keep_ratio"] is not None else "-"
        print(f"{row['question'][:37]:<38} {str(answer)[:27]:<28} {str(row.get('input_answer'))[:27]:<28} {keep}")
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    if ok and "input_answer" in table.column_names:
        right = sum(r["answer"].strip().lower().rstrip(".") == str(r["input_answer"]).lower() for r in ok)
        print(f"\nexact-match accuracy vs the generator's answers: {right}/{len(ok)}")


if __name__ == "__main__":
    sys.exit(main())
