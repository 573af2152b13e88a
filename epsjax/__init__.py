"""epsjax: cost-efficient Mixture-of-Experts inference in JAX (EPS-MoE, FinDEP, ExpertFlow).

Importing it keeps freed host memory in the process (epsjax.host_memory) when no jax computation has run yet.
"""

from epsjax.host_memory import keep_freed_memory

keep_freed_memory()
