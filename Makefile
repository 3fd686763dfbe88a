# Two commands on a fresh machine:  `make run` (the main job) and `make test` (the test suite).
# Both create .venv and install requirements.txt once; a second run installs nothing.
PYTHON ?= python3
TORCH ?= torch==2.13.0
RUN ?= default
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.PHONY: run test bench clean

# The main job: prepare the default data, pretrain the default small model, sample from it,
# fine-tune it on the built-in tasks (judged base vs SFT), train the reward model on judge-ranked samples.
run: $(VENV)/.installed
	$(PY) -m data.prepare --out runs/$(RUN)/data
	$(PY) train_gpt.py train --data runs/$(RUN)/data --out runs/$(RUN)/pretrain
	$(PY) train_gpt.py sample runs/$(RUN)/pretrain/model.pt --prompt "def " --num-samples 2 --max-new-tokens 80
	$(PY) sft.py --init runs/$(RUN)/pretrain/model.pt --out runs/$(RUN)/sft
	$(PY) reward.py --sft runs/$(RUN)/sft/model.pt --out runs/$(RUN)/reward

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs/$(RUN)
