# One-command setup: `make test` and `make demo` build .venv/ from scratch,
# from the Python 3.10 that tools/find-python.sh finds or fetches (PYTHON=
# names one).
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: venv test demo images bench gpu-kit verify-onnx clean FORCE

venv: $(VENV)/.installed

# Which interpreter .venv/ is made from, chosen afresh on each run; a .venv/
# made from another one (or before this record) is removed and made again.
# Left untouched when unchanged, so that .installed stays up to date.
$(VENV)/.python: FORCE
	@python=$$(PYTHON='$(PYTHON)' sh tools/find-python.sh) || exit 1; \
	echo "Python for $(VENV)/: $$python"; \
	if [ "$$(cat $@ 2>/dev/null)" != "$$python" ]; then \
		rm -rf $(VENV) && mkdir -p $(VENV) && echo "$$python" > $@; \
	fi

$(VENV)/.installed: $(VENV)/.python setup.py constraints.txt
	"$$(cat $(VENV)/.python)" -m venv $(VENV)
	# chainer and chainercv ship sdists whose setup.py imports pkg_resources,
	# so build them against the pinned setuptools, without isolation.
	$(PIP) setuptools wheel numpy
	$(PIP) --no-build-isolation -e '.[experiments,fast,test,distributed]'
	touch $@

test: venv
	$(BIN)/python -m pytest tests

# The main job: fetch MNIST, train both convnets for three short epochs on a
# subset of scaled MNIST and draw where they look (README, "Experiments").
# Each model gets its own directory so that both logs and plots are kept.
DEMO_OUT := experiments/result/demo
DEMO_FLAGS := --epoch 3 --train-size 10000 --test-size 2000 --seed 0

demo: venv
	$(BIN)/python experiments/mnist_data.py
	$(BIN)/python experiments/train_mnist.py --deformable 0 $(DEMO_FLAGS) \
		--out $(DEMO_OUT)/regular
	$(BIN)/python experiments/train_mnist.py --deformable 1 $(DEMO_FLAGS) \
		--out $(DEMO_OUT)/deformable
	$(BIN)/python experiments/test_mnist.py --deformable 1 \
		--resume $(DEMO_OUT)/deformable/model_iter_3 \
		--compare $(DEMO_OUT)/regular/non_deformable_3 \
		--index 0 1 3 4 --out $(DEMO_OUT)/deform_vis.png

# The README's pictures, from the committed 20-epoch models (needs MNIST).
VIS_INDEX := --index 0 1 3 4

images: venv
	$(BIN)/python experiments/mnist_data.py
	$(BIN)/python experiments/test_mnist.py --deformable 1 \
		--resume results/deformable/model_iter_20 $(VIS_INDEX) \
		--out images/deform_vis_1.png
	$(BIN)/python experiments/test_mnist.py --deformable 0 \
		--resume results/regular/non_deformable_20 $(VIS_INDEX) \
		--out images/non_deformable_vis_1.png
	$(BIN)/python experiments/test_mnist.py --deformable 2 \
		--resume results/modulated/modulated_iter_20 $(VIS_INDEX) \
		--out images/modulated_vis_1.png

bench: venv
	$(BIN)/python benchmarks/bench_sampler.py

# What a GPU machine with Python 3.12, NumPy 2 and CuPy 14 (and no network)
# needs to run gpu_checks/: .devkit/ (gpu_checks/build_kit.sh).
gpu-kit: venv
	bash gpu_checks/build_kit.sh

# The committed convnets, exported, in ONNX Runtime (>= 1.32, in .venv-ort/
# from Python >= 3.11) against Chainer (README, "Export to ONNX"; needs
# MNIST), into results/onnx/verify.txt (left as it was if a check fails).
verify-onnx: venv
	PYTHON=$(BIN)/python sh tools/verify_onnx_runtime.sh \
		> results/onnx/verify.txt.new || { cat results/onnx/verify.txt.new; \
		rm results/onnx/verify.txt.new; exit 1; }
	mv results/onnx/verify.txt.new results/onnx/verify.txt
	cat results/onnx/verify.txt

clean:
	rm -rf $(VENV) .venv-ort .devkit .uv-bootstrap .pytest_cache
