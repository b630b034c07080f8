# Two commands a new user types (README): `make demo` and `make test`. Each sets up .venv first.
# `make test-detectron2 D2=path/to/detectron2` runs the same suite against a Detectron2 checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision as a matching pair of the index's default builds: the local CPU-only
# torch wheel has no matching torchvision (see ../shared/ENVIRONMENT.md); these run on CPU too.
TORCH_PAIR := torch==2.15.0 torchvision==0.29.2
SAM2 := sam2==1.1.0

.PHONY: demo app test test-detectron2 detectron2-checkout chromium setup clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e ".[test]" $(TORCH_PAIR)
	# sam2 is an sdist that imports torch at build time: build it against the torch above.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation $(SAM2)
	$(PY) -c "import torch, torchvision, sam2, segment_anything, segment_anything_hq, timm, open_clip, fvcore, pycocotools, lvis, faster_coco_eval, gradio, playwright; print('environment ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) tools/demo.py

# The web app on http://127.0.0.1:7860 with the demo's tiny models (run `make demo` first to train
# the tiny SAM; without it the SAM has random weights). ARGS="--port 8000 ..." passes options.
app: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[app]" $(TORCH_PAIR)
	$(PY) tools/app.py --import-config-references $(ARGS)

# The browser test needs Debian's Chromium (no browser download): installed here when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium is missing: install Debian's package (sudo apt-get install chromium) for the browser test" >&2; exit 2; fi; }

test: chromium $(VENV)/.installed
	$(PY) -m pytest -q tests

# Detectron2 is not on the package index: D2 is the folder of its source repository (no build
# needed: the project runs with its pure-Python part on PYTHONPATH).
test-detectron2: detectron2-checkout chromium $(VENV)/.installed
	PYTHONPATH="$(abspath $(D2))$${PYTHONPATH:+:$$PYTHONPATH}" SAMANTICS_D2_BACKEND=detectron2 $(PY) -m pytest -q tests

detectron2-checkout:
	@test -n "$(D2)" || { echo "make test-detectron2: give D2=<folder of a Detectron2 source checkout>, e.g. make test-detectron2 D2=../detectron2" >&2; exit 2; }
	@test -f "$(D2)/detectron2/__init__.py" || { echo "make test-detectron2: D2=$(D2) is not a Detectron2 checkout ($(D2)/detectron2/__init__.py does not exist); clone https://github.com/facebookresearch/detectron2 and pass its folder" >&2; exit 2; }

clean:
	rm -rf $(VENV) output
