# Shortcuts for the project's scripts (each sets up the environment first).
.PHONY: pipeline test bench

pipeline:  ## set up and run the default pipeline (dvc repro)
	bash scripts/run_pipeline.sh

test:  ## set up and run the test suite
	bash scripts/run_tests.sh

bench:  ## set up and run every benchmark; writes reports/benchmark.md and README's table
	bash scripts/bench.sh $(ARGS)
