"""The one-question command on a saved tiny model + glimpse modules."""
from __future__ import annotations

from PIL import Image

from workers import ask
from workers.modeling.tiny import save_tiny_model_dir

from engine_helpers import patterned_image, random_modules


def test_ask_prints_answer_and_saves_overlay(tmp_path, capsys, tiny_model):
    base = save_tiny_model_dir(tmp_path / "base")
    random_modules(tiny_model, seed=2).save(tmp_path / "gp", base_config=tiny_model.config.to_dict())
    patterned_image(140, 112, 5).save(tmp_path / "img.png")
    code = ask.main([
        "--model", str(base), "--modules", str(tmp_path / "gp"), "--image", str(tmp_path / "img.png"),
        "--question", "What color is the circle?", "--max-new-tokens", "4", "--max-remain-ratio", "0.2",
        "--device", "cpu", "--overlay", str(tmp_path / "ov.png"),
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "answer: " in out and "keep ratio: " in out
    kept, total = out.split("(")[1].split(" visual")[0].split("/")
    assert 1 <= int(kept) <= int(0.2 * int(total))
    overlay = Image.open(tmp_path / "ov.png")
    assert overlay.size == (140, 112)


def test_ask_with_two_images(tmp_path, capsys, tiny_model):
    base = save_tiny_model_dir(tmp_path / "base")
    random_modules(tiny_model, seed=2).save(tmp_path / "gp", base_config=tiny_model.config.to_dict())
    patterned_image(140, 112, 5).save(tmp_path / "a.png")
    patterned_image(112, 112, 9).save(tmp_path / "b.png")
    code = ask.main([
        "--model", str(base), "--modules", str(tmp_path / "gp"), "--image", str(tmp_path / "a.png"),
        "--image", str(tmp_path / "b.png"), "--question", "Second image: What color is the circle?",
        "--max-new-tokens", "2", "--device", "cpu", "--overlay", str(tmp_path / "ov.png"),
    ])
    out = capsys.readouterr().out
    assert code == 0
    kept, total = (int(x) for x in out.split("(")[1].split(" visual")[0].split("/"))
    per_image = [tuple(int(x) for x in part.split(": ")[1].split("/")) for part in out.split("per image: ")[1].splitlines()[0].split(", ")]
    # 140x112 -> 5x4 merged tokens (the processor rounds to 28 px), 112x112 -> 4x4.
    assert [t for _, t in per_image] == [20, 16] and total == 36 and sum(k for k, _ in per_image) == kept
    assert Image.open(tmp_path / "ov.png").size == (140 + 8 + 112, 112)


def test_ask_reports_unreadable_image(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert ask.main(["--model", "x", "--image", str(tmp_path / "bad.png"), "--question", "q"]) == 2
    assert "cannot read image" in capsys.readouterr().err
