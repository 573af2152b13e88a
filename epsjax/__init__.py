"""epsjax: cost-efficient Mixture-of-Experts inference in JAX (EPS-MoE, FinDEP, ExpertFlow).

Importing epsjax (or any of its subpackages) imports nothing else and changes nothing in the process. Host memory
tuning for XLA:CPU is an explicit call made before the first jax computation
(``epsjax.host_memory.keep_freed_memory()``); the `epsjax` command and the benchmark scripts make it.
"""
