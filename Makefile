# The two commands of the README, and a few more. Each sets itself up (idempotently).
.PHONY: demo test bench cmake clean

demo:  ## the main job
	scripts/demo.sh

test:  ## the whole test suite (GPU tests skip, with the reason, where there is no GPU)
	scripts/test.sh

bench:  ## the roofline benchmark report (bench/results/)
	scripts/setup_env.sh && .venv/bin/python -m bench

cmake:  ## the CMake build of the same library, loaded and smoke-tested
	scripts/setup_env.sh && scripts/cmake_check.sh

clean:
	rm -rf build helix_ext/_C*.so helix_ext/_simt*.so *.egg-info
