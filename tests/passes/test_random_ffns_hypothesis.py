"""Property: for any FFN built from the supported spellings, the compiled module computes what the original does:
against an fp64 reference it is as accurate as the original module in the same dtype."""
import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bamboo
from tests.ffn_zoo import KINDS, LINEAR_SPELLINGS, RELU_SPELLINGS, ZooFFN

DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-6)).item()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), relu=st.sampled_from(RELU_SPELLINGS), up_relu=st.sampled_from(RELU_SPELLINGS),
       linear=st.sampled_from(LINEAR_SPELLINGS), weights_as=st.sampled_from(["parameter", "buffer"]),
       gate_first=st.booleans(), bias=st.booleans(), hidden=st.integers(1, 24), intermediate=st.integers(1, 40),
       out=st.integers(1, 12), lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       dtype=st.sampled_from(list(DTYPE_TOL)), seed=st.integers(0, 2**16))
def test_compiled_random_ffn_equals_original(kind, relu, up_relu, linear, weights_as, gate_first, bias, hidden,
                                             intermediate, out, lead, dtype, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    module = ZooFFN(kind, relu, linear, weights_as, gate_first, bias, hidden, intermediate, out, up_relu).to(dtype)
    compiled = bamboo.compile(module)
    x = torch.randn(*lead, hidden, dtype=dtype)
    with torch.no_grad():
        expected, actual = module(x), compiled(x)
        reference = copy.deepcopy(module).double()(x.double())
    assert actual.shape == expected.shape and not actual.isnan().any()
    assert rel_err(actual, reference) <= max(2 * rel_err(expected, reference), DTYPE_TOL[dtype])
    assert len(compiled.bamboo_report.sites) == 1
