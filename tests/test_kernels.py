"""The merge arithmetic against exact oracles (SPEC §2 limits)."""

import pytest
import torch

from fishmerge import kernels
from fishmerge.kernels import add_fisher_terms, divide_sums, fisher_merge, weighted_average
from fishmerge.workspace import Workspace


def _inputs(m=3, shape=(5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=g) for _ in range(m)]
    fishers = [torch.rand(shape, generator=g) for _ in range(m)]
    return values, fishers


def _formula(values, fishers, weights, damping):
    # SPEC §2 written out, term by term.
    numerator = sum(w * (f + damping) * v.float() for v, f, w in zip(values, fishers, weights))
    return numerator / sum(w * (f + damping) for f, w in zip(fishers, weights))


def test_hand_computed_two_models():
    values = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, -2.0, 4.0])]
    fishers = [torch.tensor([1.0, 0.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    weights = [1.0, 2.0]
    # coordinate 0: (1*1*1 + 2*3*3) / (1*1 + 2*3) = 19/7
    # coordinate 1: (1*0*2 + 2*2*-2) / (0 + 4) = -2
    # coordinate 2: (1*3*0 + 2*1*4) / (3 + 2) = 8/5
    expected = torch.tensor([19 / 7, -2.0, 8 / 5])
    torch.testing.assert_close(fisher_merge(values, fishers, weights, damping=0.0), expected)


def test_equal_fishers_give_the_weighted_average_exactly():
    values, fishers = _inputs()
    same = [fishers[0]] * 3
    weights = [1.0, 3.0, 0.5]
    merged = fisher_merge(values, same, weights, damping=0.0)
    torch.testing.assert_close(merged, weighted_average(values, weights), rtol=1e-6, atol=1e-7)


def test_huge_damping_gives_the_weighted_average():
    values, fishers = _inputs()
    weights = [2.0, 1.0, 1.0]
    merged = fisher_merge(values, fishers, weights, damping=1e9)
    torch.testing.assert_close(merged, weighted_average(values, weights), rtol=1e-5, atol=1e-6)


def test_one_model_gives_itself():
    values, fishers = _inputs(m=1)
    torch.testing.assert_close(fisher_merge(values, fishers, [7.0], damping=1e-8), values[0])


def test_all_zero_fishers_fall_back_to_the_average_with_and_without_damping():
    values, fishers = _inputs()
    for f in fishers:
        f[0, :] = 0.0  # no input has information on row 0
    weights = [1.0, 2.0, 3.0]
    average = weighted_average(values, weights)
    for damping in (0.0, 1e-8):
        merged = fisher_merge(values, fishers, weights, damping=damping)
        torch.testing.assert_close(merged[0], average[0])
        assert torch.isfinite(merged).all()


def test_a_dominant_fisher_takes_its_model():
    values, fishers = _inputs(m=2)
    fishers[0] = torch.full_like(fishers[0], 1e6)
    fishers[1] = torch.full_like(fishers[1], 1e-6)
    torch.testing.assert_close(fisher_merge(values, fishers, [1.0, 1.0], 0.0), values[0], rtol=1e-5, atol=1e-5)


def test_terms_summed_and_divided_equal_the_merge():
    values, fishers = _inputs()
    weights = [1.0, 2.0, 3.0]
    numerator, denominator = torch.zeros(5, 4), torch.zeros(5, 4)
    for v, f, w in zip(values, fishers, weights):
        add_fisher_terms(numerator, denominator, v, f, w, 1e-3)  # one client at a time: the federated path
    expected = _formula(values, fishers, weights, 1e-3)
    torch.testing.assert_close(divide_sums(numerator, denominator), expected)
    torch.testing.assert_close(fisher_merge(values, fishers, weights, 1e-3), expected)


def test_fisher_none_with_damping_is_fedavg_with_a_scalar_denominator():
    values, _ = _inputs()
    weights = [10.0, 20.0, 30.0]
    numerator, denominator = torch.zeros(5, 4), torch.zeros(())
    for v, w in zip(values, weights):
        add_fisher_terms(numerator, denominator, v, None, w, 1.0)
    torch.testing.assert_close(divide_sums(numerator, denominator), weighted_average(values, weights))


def test_divide_sums_gives_the_fallback_or_zero_where_the_denominator_is_zero():
    numerator = torch.tensor([1.0, 0.0])
    denominator = torch.tensor([2.0, 0.0])
    assert divide_sums(numerator, denominator).tolist() == [0.5, 0.0]
    assert divide_sums(numerator, denominator, fallback=torch.tensor([9.0, 7.0])).tolist() == [0.5, 7.0]


def test_bf16_inputs_are_merged_in_fp32():
    values, fishers = _inputs()
    merged = fisher_merge([v.bfloat16() for v in values], fishers, [1.0, 1.0, 1.0], 1e-8)
    assert merged.dtype == torch.float32


@pytest.mark.parametrize("chunk", [3, 1 << 16])  # columns per pass: several uneven chunks, or one
def test_stacked_inputs_and_a_reused_workspace_give_the_formula(chunk, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    values, fishers = _inputs()
    weights = [1.0, 2.0, 3.0]
    workspace = Workspace()
    for _ in range(2):  # the second call runs in the buffers of the first
        merged = fisher_merge(torch.stack(values), torch.stack(fishers), weights, 1e-3, workspace)
        torch.testing.assert_close(merged, _formula(values, fishers, weights, 1e-3))
    small_values, small_fishers = _inputs(m=3, shape=(2, 3), seed=1)  # a smaller block in the same buffers
    merged = fisher_merge([v.bfloat16() for v in small_values], small_fishers, weights, 0.0, workspace)
    torch.testing.assert_close(merged, _formula([v.bfloat16() for v in small_values], small_fishers, weights, 0.0))
    average = weighted_average(torch.stack(values).bfloat16(), weights, workspace)
    torch.testing.assert_close(average, sum(w * v.bfloat16().float() for v, w in zip(values, weights)) / 6.0)
    numerator, denominator = torch.zeros(5, 4), torch.zeros(())
    for v, w in zip(values, weights):  # FedAvg's sums, chunked too
        add_fisher_terms(numerator, denominator, v, None, w, 1.0, workspace)
    torch.testing.assert_close(divide_sums(numerator, denominator), weighted_average(values, weights))


@pytest.mark.parametrize("bad", [dict(weights=[1.0]), dict(weights=[-1.0, 1.0, 1.0]), dict(damping=-1.0)])
def test_bad_arguments_are_refused(bad):
    values, fishers = _inputs()
    kwargs = dict(weights=[1.0, 1.0, 1.0], damping=0.0) | bad
    with pytest.raises(ValueError):
        fisher_merge(values, fishers, **kwargs)
