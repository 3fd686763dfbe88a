# Two commands on a fresh machine:  `make run` (the main job) and `make test` (the test suite).
# Both create .venv and install requirements.txt once; a second run installs nothing.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# The tests' smoke run sets INSTALL= and PY= to run the pipeline with their own Python.
INSTALL ?= $(VENV)/.installed

# PRESET picks every stage's flags below: cpu (the default without a GPU: the whole pipeline in
# 15–30 minutes on 2 cores, README "Measured"), gpu (one GPU: a larger model and corpus), tiny (a smoke test in
# a minute or two). RUN names the run directory, $(RUNS)/$(RUN)/; stages whose outputs there
# match their configuration are skipped, an interrupted stage resumes.
PRESET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
RUN ?= default
RUNS ?= runs
OUT := $(RUNS)/$(RUN)
ifeq ($(filter $(PRESET),cpu gpu tiny),)
$(error PRESET=$(PRESET): must be cpu, gpu or tiny)
endif

# Each stage's flags per preset. Override or add any flag with STAGE_ARGS, e.g.
#   make run SFT_ARGS="--epochs 5 --lr 2e-3" PPO_ARGS="--beta 0.1"
# (the last occurrence of a flag wins).
# cpu: two task families, reverse and upper, the ones a 1.4M-parameter reward model learns to check
# (on all six its ranking of answers to one prompt barely follows the gold judge, and PPO/DPO
# cannot improve on SFT: README, "Measured"). FAMILIES=arith,count,expr,reverse,sort,upper widens it.
FAMILIES ?= reverse,upper
# 500 pretraining steps + 5 SFT epochs score as 1,000 + 3 did, in less time; k 8 and 3 epochs rank one
# prompt's answers best of the reward-model settings tried (README, "Measured").
cpu_DATA     :=
cpu_PRETRAIN := --n-layer 4 --n-head 4 --n-embd 128 --block-size 256 --max-steps 500
cpu_SFT      := --epochs 5 --lr 3e-3 --families $(FAMILIES) --eval-tasks 300
cpu_REWARD   := --num-prompts 4000 --k 8 --epochs 3 --families $(FAMILIES)
# PPO on r_φ: 256 rollouts an iteration, one epoch of minibatches of 64, and the KL to π_SFT exact in the loss
# (README, "Session 11"): more held-out gold than 64 rollouts × 4 epochs (+0.042 against +0.021) at less KL
cpu_PPO      := --iterations 60 --rollouts 256 --minibatch-size 64 --ppo-epochs 1 --lr 1e-4 --value-lr 3e-4 \
                --kl-penalty exact --beta 0.3 --threads 0 --snapshot-every 10 --families $(FAMILIES) --eval-tasks 0
# PPO on the gold judge: 256 rollouts, minibatches of 64, 1 epoch, lr 1e-4, β 0.01, 190 iterations: 277-344 s on
# session 8's host, whose speed varied (README, "Making RL climb")
cpu_PPO_JUDGE := --iterations 190 --rollouts 256 --minibatch-size 64 --ppo-epochs 1 --lr 1e-4 --value-lr 3e-4 \
                 --beta 0.01 --threads 0 --snapshot-every 10 --families $(FAMILIES) --eval-tasks 0
# DPO in two rounds: round 2 on 700 fresh prompts × 8 samples of round 1's own policy, judged by the same noisy
# labeler, π_ref = round 1 (README, "Session 12"): held-out sampled gold +0.035 / +0.041 / +0.024 on seeds
# 1337 (make run) / 1338 / 1339, where one round gave +0.023 / +0.025 / +0.018
cpu_DPO      := --beta 0.5 --max-steps 700 --rounds 2 --round-prompts 700 --k 8 --families $(FAMILIES) --eval-tasks 0
cpu_BON      := --best-of-n 1,2,4,8,16,32 --eval-prompts 500 --families $(FAMILIES)
# --eval-temperatures: the SFT model sampled at T = 0.8 and 0.7 as rows of the table, what sharpening alone buys
# in sampled gold at a policy's KL (README, "Session 14")
cpu_EVAL     := --families $(FAMILIES) --eval-tasks 1000 --eval-temperatures 0.8,0.7

# gpu: not yet run on a GPU (none was lent while it was written); the stdlib corpus caps the data
# at ~4M tokens, so the model stays mid-sized and uses dropout.
gpu_DATA     := --source code=stdlib-code:0.8 --source prose=stdlib-prose:0.2 --max-bytes 30000000 \
                --task-worksheets 20000 --task-weight 0.1
gpu_PRETRAIN := --n-layer 6 --n-head 6 --n-embd 384 --block-size 512 --micro-batch-size 32 --global-batch-size 64 \
                --max-steps 3000 --lr 1e-3 --warmup-steps 200 --dropout 0.1 --eval-every 250 --checkpoint-every 250
gpu_SFT      := --epochs 3 --num-conversations 50000 --lr 3e-4 --eval-tasks 1000
gpu_REWARD   := --num-prompts 20000 --lr 1e-4
gpu_PPO      := --iterations 200 --rollouts 256 --minibatch-size 64 --snapshot-every 25 --eval-tasks 0
gpu_PPO_JUDGE := $(gpu_PPO)
gpu_DPO      := --eval-tasks 0
gpu_BON      := --best-of-n 1,2,4,8,16,32,64 --eval-prompts 1000
gpu_EVAL     := --eval-tasks 1000 --eval-temperatures 0.8,0.7

tiny_DATA     := --max-bytes 300000 --vocab-size 512 --task-worksheets 200 --task-weight 0.2
tiny_PRETRAIN := --n-layer 2 --n-head 2 --n-embd 32 --block-size 128 --max-steps 40 --warmup-steps 4 \
                 --eval-every 20 --checkpoint-every 20 --eval-windows 8 --log-every 20
tiny_SFT      := --num-conversations 300 --epochs 1 --evals-per-epoch 2 --eval-tasks 24 --log-every 20
tiny_REWARD   := --num-prompts 60 --eval-prompts 12
tiny_PPO      := --iterations 2 --rollouts 16 --minibatch-size 8 --snapshot-every 1 --eval-tasks 0
tiny_PPO_JUDGE := $(tiny_PPO)
tiny_DPO      := --max-steps 6 --eval-tasks 0
tiny_BON      := --best-of-n 1,2,4 --eval-prompts 8
tiny_EVAL     := --eval-tasks 24

# JUDGE=1 adds PPO with the gold judge as its reward (ppo_judge/, the ceiling of RL here) to the run:
# one more PPO stage, a row of the final table and a point on the over-optimisation chart.
JUDGE ?= 0
ifeq ($(JUDGE),1)
JUDGE_MODEL := ppo_judge=$(OUT)/ppo_judge/model.pt
endif

.PHONY: run test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The main job: data → tokenizer → pretraining → SFT → reward model → PPO → DPO → best-of-n → evaluation,
# then $(OUT)/report.md with every stage's numbers and plots.
run: $(INSTALL)
	$(PY) -m data.prepare --out $(OUT)/data $($(PRESET)_DATA) $(DATA_ARGS)
	$(PY) train_gpt.py train --data $(OUT)/data --out $(OUT)/pretrain $($(PRESET)_PRETRAIN) $(PRETRAIN_ARGS)
	$(PY) sft.py --init $(OUT)/pretrain/model.pt --out $(OUT)/sft $($(PRESET)_SFT) $(SFT_ARGS)
	$(PY) reward.py --sft $(OUT)/sft/model.pt --out $(OUT)/reward $($(PRESET)_REWARD) $(REWARD_ARGS)
	$(PY) ppo.py --sft $(OUT)/sft/model.pt --reward-model $(OUT)/reward/model.pt --out $(OUT)/ppo \
		$($(PRESET)_PPO) $(PPO_ARGS)
	$(if $(JUDGE_MODEL),$(PY) ppo.py --sft $(OUT)/sft/model.pt --reward-source judge --out $(OUT)/ppo_judge \
		$($(PRESET)_PPO_JUDGE) $(PPO_JUDGE_ARGS))
	$(PY) dpo.py --sft $(OUT)/sft/model.pt --reward-run $(OUT)/reward --out $(OUT)/dpo $($(PRESET)_DPO) $(DPO_ARGS)
	$(PY) reward.py --sft $(OUT)/sft/model.pt --reward-model $(OUT)/reward/model.pt --out $(OUT)/bon \
		--ppo-run $(OUT)/ppo --policy dpo=$(OUT)/dpo/model.pt $(if $(JUDGE_MODEL),--policy $(JUDGE_MODEL)) \
		$($(PRESET)_BON) $(BON_ARGS)
	$(PY) sft.py --eval base=$(OUT)/pretrain/model.pt sft=$(OUT)/sft/model.pt ppo=$(OUT)/ppo/model.pt \
		dpo=$(OUT)/dpo/model.pt $(JUDGE_MODEL) --reference sft --eval-out $(OUT)/eval $($(PRESET)_EVAL) $(EVAL_ARGS)
	$(PY) -m data.report --run $(OUT) --preset $(PRESET)

test: $(INSTALL)
	$(PY) -m pytest -q tests

bench: $(INSTALL)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(OUT)

# Scaling laws (README, "Scaling laws, measured"): Chinchilla's IsoFLOP sweep of small GPTs, refitted. Its own corpus:
# the same text under a 512-token vocabulary (with 4,096 tokens the embedding is most of every model this small and
# its softmax most of the time). SCALING_ARGS="--budgets 1e11,3e11 --sizes 1:24:2,2:32:2,2:48:3" for another sweep.
.PHONY: scaling
scaling: $(INSTALL)
	$(PY) -m data.prepare --out $(RUNS)/scaling/data --vocab-size 512 $(SCALING_DATA_ARGS)
	$(PY) -m experiments.scaling_laws --data-dir $(RUNS)/scaling/data --run-dir $(RUNS)/scaling $(SCALING_ARGS)

# The seeds' claims about PPO and DPO (README, "The seeds' claims, measured"): six experiments on a finished
# run's SFT model, reward model and comparisons, each ~8 CPU-minutes with the default sizes; the table in
# $(RUNS)/claims/claims.md.  make claims RUN=default [CLAIMS=optimal,noise] [CLAIMS_ARGS="--eval-tasks 1000"]
CLAIMS ?= all
.PHONY: claims
claims: $(INSTALL)
	$(PY) -m experiments.alignment_claims --source-run $(OUT) --run $(RUNS)/claims --experiment $(CLAIMS) $(CLAIMS_ARGS)

# Classroom assignments (README, "For teachers"): a student copy of the project with the marked function
# bodies removed, and the grader's score table.  make student DEST=../hw1 [ASSIGN=get_lr,perplexity]
.PHONY: student grade
student: $(INSTALL)
	$(if $(DEST),,$(error DEST is required: make student DEST=../hw1 [ASSIGN=get_lr,perplexity]))
	$(PY) -m tests.classroom student --out $(DEST) $(if $(ASSIGN),--only $(ASSIGN))

grade: $(INSTALL)
	$(PY) -m tests.classroom grade $(if $(ROOT),--root $(ROOT))
