"""The step benchmark's parts (``benchmarks/step_bench.py`` is the command line; the method is in
``benchmarks/STEP_BENCH.md``):

* :mod:`.models`       the architectures, variants and sizes
* :mod:`.worker`       one (architecture, variant) in its own process: build, compile, measure, search
* :mod:`.orchestrate`  the parent: spawns the workers, lends them the GPU one at a time, keeps the budget
* :mod:`.report`       the JSON's table and plot (and merging several JSONs)
"""
