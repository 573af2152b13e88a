"""The work list: every row in exactly one item, within the static bound."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from epsjax.pallas_kernels import work_list

from . import kernel_cases as kc


def test_worked_example():
    # M = 10, block_m = 4 -> tiles [0,4) [4,8) [8,10).  Groups [3, 0, 4] -> rows
    # 0-2 group 0, 3-6 group 2, 7-9 padding.  Items: (tile 0, rows 0-2, slot 0),
    # (tile 0, row 3, slot 2), (tile 1, rows 4-6, slot 2), (tile 1, row 7, pad),
    # (tile 2, rows 8-9, pad); the bound is cdiv(10, 4) + 3 = 6, so one idle item.
    items = work_list.build(jnp.array([3, 0, 4], jnp.int32), jnp.array([0, 1, 2], jnp.int32), 10, 4)
    got = np.stack([items.tile, items.lo, items.hi, items.slot], 1).tolist()
    assert got == [[0, 0, 3, 0], [0, 3, 4, 2], [1, 4, 7, 2], [1, 7, 8, -1], [2, 8, 10, -1], [0, 0, 0, -1]]
    assert int(items.num_active) == 5


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data(), m=st.integers(1, 70), num_groups=st.integers(1, 6), block_m=st.sampled_from([1, 4, 16, 64]))
def test_rows_covered_once(data, m, num_groups, block_m):
    sizes = data.draw(kc.group_sizes(m, num_groups))
    slots = np.arange(num_groups, dtype=np.int32)
    items = work_list.build(jnp.asarray(sizes), jnp.asarray(slots), m, block_m)
    assert items.tile.shape == (work_list.max_items(m, num_groups, block_m),)
    owner = np.full(m, -2)
    ends = np.cumsum(sizes)
    for tile, lo, hi, slot in zip(*(np.asarray(a) for a in (items.tile, items.lo, items.hi, items.slot))):
        if lo == hi:
            continue
        assert tile * block_m <= lo < hi <= (tile + 1) * block_m
        assert np.all(owner[lo:hi] == -2), "row written twice"
        group = int(np.searchsorted(ends, lo, side="right"))
        assert slot == (slots[group] if group < num_groups else -1)
        owner[lo:hi] = slot
    assert np.all(owner != -2), "row never written"
