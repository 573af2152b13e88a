"""One process of the 2-process test (test_distributed.py): 4 CPU devices each, gloo collectives, one global mesh
of 8. Run as `python -m tests.sharding.distributed_worker PROCESS_ID PORT OUT.npy`."""

import sys

import numpy as np


def main(process_id: int, port: int, out: str) -> None:
    import jax

    from epsjax import sharding
    from epsjax import placement

    sharding.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id,
                                    local_device_count=4)
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.experimental import multihost_utils

    from epsjax.engine import Engine
    from tests.sharding.test_distributed import RULE_SET, SHAPE, config, inputs

    assert jax.device_count() == 8 and jax.local_device_count() == 4, (jax.device_count(), jax.local_device_count())
    mesh = sharding.make_mesh(**SHAPE)
    model = placement.create_sharded_model(config(), mesh, RULE_SET, 0)
    experts = sharding.EPExperts(mesh=mesh, rule_set=RULE_SET, plan=sharding.ExpertPlan(2, "experts"))
    engine = Engine(model, experts=experts, batch_sharding=sharding.batch_sharding(mesh, RULE_SET))
    tokens, mask = inputs()
    logits, _, stats = engine.prefill(tokens, mask, all_logits=True, cache_len=tokens.shape[1])
    logits = multihost_utils.process_allgather(logits, tiled=True)
    if process_id == 0:
        np.save(out, np.asarray(logits))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
