"""The expert pipeline as XLA sees it: PN dispatch and PN return collectives per layer, none of which reads
another stage's collectives (so none waits for another stage's expert GEMMs), for both splits; the GPU
(ragged) program lowers with the same structure on CPU. Whether the backend makes them asynchronous is
reported, not asserted (XLA:CPU keeps all-to-all synchronous)."""

import jax
import jax.numpy as jnp
import pytest

from epsjax import sharding
from epsjax.sharding import hlo_report

E, D, F, K, T = 16, 32, 64, 2, 128


def _args():
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D))
    ids = jax.random.randint(keys[1], (T, K), 0, E)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (T, K)))
    w_gate = jax.random.normal(keys[3], (E, D, F))
    w_down = jax.random.normal(keys[4], (E, F, D))
    return x, ids, weights, w_gate, w_gate, w_down, jnp.ones((T,), bool)


@pytest.mark.parametrize("plan", [sharding.ExpertPlan(2, "experts"), sharding.ExpertPlan(4, "tokens")],
                         ids=lambda p: f"PN{p.pipeline_degree}-{p.split}")
def test_stages_are_independent_collectives(plan):
    experts = sharding.EPExperts(mesh=sharding.make_mesh(data=2, expert=4), plan=plan, transport="padded")
    text = jax.jit(experts).lower(*_args()).compile().as_text()
    report = hlo_report.report(text)
    print(report.summary())
    PN = plan.pipeline_degree
    dispatches = sorted(c for c in report.collectives if c.startswith("all-to-all:ep_dispatch"))
    returns = sorted(c for c in report.collectives if c.startswith("all-to-all:ep_return"))
    assert dispatches == [f"all-to-all:ep_dispatch_{s}" for s in range(PN)]
    assert returns == [f"all-to-all:ep_return_{s}" for s in range(PN)]
    assert report.collectives.count("all-gather:ep_count_exchange") == 1
    assert not report.dispatch_violations and not report.return_violations


def test_ragged_transport_is_refused_on_cpu():
    # XLA:CPU has no ragged all-to-all (tests/aot builds the ragged program for GPU targets instead).
    with pytest.raises(sharding.PlanError, match=r"transport 'ragged' .* needs GPU devices, and the mesh is cpu"):
        sharding.EPExperts(mesh=sharding.make_mesh(data=2, expert=4), plan=sharding.ExpertPlan(2, "experts"),
                           transport="ragged")


def test_report_flags_a_dispatch_that_waits_for_another_stage():
    # A hand-written scheduled entry: stage 1's dispatch reads stage 0's return (a serialised pipeline).
    text = """HloModule m, is_scheduled=true

ENTRY %main (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %a0 = f32[8,4]{1,0} all-to-all(%p), dimensions={0}, metadata={op_name="jit(f)/ep_dispatch_0/all_to_all"}
  %g0 = f32[8,4]{1,0} fusion(%a0), kind=kLoop, calls=%f, metadata={op_name="jit(f)/ep_experts_0/dot"}
  %r0 = f32[8,4]{1,0} all-to-all(%g0), dimensions={0}, metadata={op_name="jit(f)/ep_return_0/all_to_all"}
  %a1 = f32[8,4]{1,0} all-to-all(%r0), dimensions={0}, metadata={op_name="jit(f)/ep_dispatch_1/all_to_all"}
  ROOT %r1 = f32[8,4]{1,0} all-to-all(%a1), dimensions={0}, metadata={op_name="jit(f)/ep_return_1/all_to_all"}
}
"""
    report = hlo_report.report(text)
    assert sorted(report.dispatch_violations) == ["a1 reads a0 (ep_dispatch_0)", "a1 reads r0 (ep_return_0)"]
    assert report.return_violations == []
    assert [c.split(":")[1] for c in report.collectives] == ["ep_dispatch_0", "ep_return_0", "ep_dispatch_1",
                                                             "ep_return_1"]


def test_report_infers_the_scopes_xla_gpu_drops_and_finds_gemms_in_flight():
    # XLA:GPU's ragged all-to-alls carry no metadata. The payload of %r0 was computed in ep_experts_0, so it is
    # stage 0's return; %d1's result is read first in ep_experts_1, so it is stage 1's dispatch. %d1 is in
    # flight across stage 0's GEMM (a fusion around a Mosaic GPU custom call); %r0 across stage 1's.
    text = """HloModule m, is_scheduled=true

%gemm_body (a: bf16[8,4]) -> bf16[8,4] {
  %a = bf16[8,4]{1,0} parameter(0)
  ROOT %k = bf16[8,4]{1,0} custom-call(%a), custom_call_target="mosaic_gpu_v2"
}

ENTRY %main (p: bf16[8,4]) -> bf16[8,4] {
  %p = bf16[8,4]{1,0} parameter(0)
  %d0 = bf16[8,4]{1,0} ragged-all-to-all(%p), channel_id=1
  %g0 = bf16[8,4]{1,0} fusion(%d0), kind=kCustom, calls=%gemm_body, metadata={op_name="jit(f)/ep_experts_0/pallas"}
  %d1s = (bf16[8,4]{1,0}, bf16[8,4]{1,0}) ragged-all-to-all-start(%p), channel_id=2
  %y0 = bf16[8,4]{1,0} fusion(%g0), kind=kLoop, calls=%gemm_body, metadata={op_name="jit(f)/ep_experts_0/scatter"}
  %d1 = bf16[8,4]{1,0} ragged-all-to-all-done(%d1s)
  %r0s = (bf16[8,4]{1,0}, bf16[8,4]{1,0}) ragged-all-to-all-start(%y0), channel_id=3
  %g1 = bf16[8,4]{1,0} fusion(%d1), kind=kCustom, calls=%gemm_body, metadata={op_name="jit(f)/ep_experts_1/pallas"}
  %r0 = bf16[8,4]{1,0} ragged-all-to-all-done(%r0s)
  ROOT %r1 = bf16[8,4]{1,0} ragged-all-to-all(%g1), channel_id=4
}
"""
    report = hlo_report.report(text)
    assert report.collectives == ["ragged-all-to-all:ep_dispatch_0", "ragged-all-to-all-start:ep_dispatch_1",
                                  "ragged-all-to-all-start:ep_return_0", "ragged-all-to-all:ep_return_1"]
    assert report.pair("ep_dispatch_1").gemms_between == ("ep_experts_0",)
    assert report.pair("ep_dispatch_1").overlaps_other_stage_gemm()
    assert report.pair("ep_return_0").gemms_between == ("ep_experts_1",)
    assert report.host_transfers == []
    assert "GEMM kernels of ep_experts_0" in report.summary()
