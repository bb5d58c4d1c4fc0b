"""helix-ext microbenchmarks: the roofline runner (`python -m bench`) and pytest-benchmark files."""
