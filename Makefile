PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench small-model clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel first, so nothing below resolves to a CUDA build.
	$(BIN)/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m pipeline.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not gpu" tests

bench: $(BIN)/.installed
	$(BIN)/python bench/engine_bench.py

# The shipped small model and its glimpse modules, from scratch (2 CPU cores: ~75 + 8 + 8 + 12 min;
# `--resume` continues a stopped stage). SM=DIR to write elsewhere; copy $(SM)/base and $(SM)/glimpse
# to models/ to ship them. The recipe and why: README "The shipped small model".
SM ?= out/small-model
TRAIN := $(BIN)/python -m workers.training.train_base
FINETUNE := --vision-warmup-steps 0 --start-max-objects 12 --steps 400 --warmup-steps 20 --eval-every 100 \
	--attn-loss-weight 1.0 --attn-layer 2 --attn-heads 2

small-model: $(SM)/eval/eval.md

$(SM)/stage1/model.safetensors: | $(BIN)/.installed
	$(TRAIN) --out $(SM)/stage1 --steps 2250 --vision-warmup-steps 250 --resume
$(SM)/stage2/model.safetensors: $(SM)/stage1/model.safetensors
	$(TRAIN) --out $(SM)/stage2 --init-from $(SM)/stage1 --seed 5 --lr 5e-4 $(FINETUNE) --resume
$(SM)/base/model.safetensors: $(SM)/stage2/model.safetensors
	$(TRAIN) --out $(SM)/base --init-from $(SM)/stage2 --seed 6 --lr 4e-4 $(FINETUNE) \
		--prune-rows 0.5 --prune-layer 2 --prune-extra-max 0.25 --resume
$(SM)/glimpse/new_modules_gp.pt: $(SM)/base/model.safetensors
	$(BIN)/python -m workers.training.glimpse_trainer --base $(SM)/base --out $(SM)/glimpse --synthetic \
		--train-rows 12800 --epochs 1 --batch-size 16 --grad-accum 1 --lr 1e-3 --fuse-size 128 --cond-size 256 --resume
$(SM)/eval/eval.md: $(SM)/glimpse/new_modules_gp.pt
	$(BIN)/python -m workers.training.evaluate --base $(SM)/base --modules $(SM)/glimpse --rows 1000 --out $(SM)/eval

clean-venv:
	rm -rf $(VENV)
