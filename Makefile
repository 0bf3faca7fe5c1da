# Shortcuts for the project's scripts (each sets up the environment first).
.PHONY: pipeline test bench bench-scale bench-serving bench-label-errors bench-active-learning bench-embeddings

pipeline:  ## set up and run the default pipeline (dvc repro)
	bash scripts/run_pipeline.sh

test:  ## set up and run the test suite
	bash scripts/run_tests.sh

bench:  ## set up and run every benchmark; writes reports/benchmark*.md and README's tables
	bash scripts/bench.sh $(ARGS); a=$$?; bash scripts/bench.sh --serving $(SERVING_ARGS); c=$$?; \
	bash scripts/bench.sh --scale $(SCALE_ARGS); b=$$?; \
	bash scripts/bench.sh --label-errors $(LABEL_ERRORS_ARGS); d=$$?; \
	bash scripts/bench.sh --active-learning $(AL_ARGS); e=$$?; \
	bash scripts/bench.sh --embeddings $(EMBEDDINGS_ARGS); f=$$?; exit $$((a || b || c || d || e || f))

bench-scale:  ## only the data-at-scale benchmark (photo folders up to 100k images)
	bash scripts/bench.sh --scale $(SCALE_ARGS)

bench-serving:  ## only the using-the-model benchmark (batch predict, serving load test); needs dvc repro's outputs
	bash scripts/bench.sh --serving $(SERVING_ARGS)

bench-label-errors:  ## only the label-error benchmark (5% flipped labels in digits and Fashion-MNIST 10k: cv + cleanlab)
	bash scripts/bench.sh --label-errors $(LABEL_ERRORS_ARGS)

bench-active-learning:  ## only the what-to-label-next benchmark (simulated labelling on Fashion-MNIST)
	bash scripts/bench.sh --active-learning $(AL_ARGS)

bench-embeddings:  ## only classical classifiers on embeddings vs the network, and self-training (four data sets)
	bash scripts/bench.sh --embeddings $(EMBEDDINGS_ARGS)
