import pytest

from collector_ext.tracestate import parse_ot_sampling

P56 = 2**56


@pytest.mark.parametrize(
    "trace_state, threshold, probability",
    [
        ("ot=th:0", 0, 1.0),
        ("ot=th:8", 2**55, 0.5),
        ("ot=th:c", 3 * 2**54, 0.25),
        ("ot=th:fd70a4", 0xFD70A400000000, None),
        ("vendor=x,ot=th:8;rv:0123456789abcd", 2**55, 0.5),
        ("ot=rv:0123456789abcd;th:c", 3 * 2**54, 0.25),
    ],
)
def test_threshold_follows_the_probability_sampling_spec(trace_state, threshold, probability):
    th, _rv, invalid = parse_ot_sampling(trace_state)
    assert (th, invalid) == (threshold, False)
    if probability is not None:
        assert (P56 - th) / P56 == probability


def test_th_fd70a4_is_about_one_percent():
    th, _, _ = parse_ot_sampling("ot=th:fd70a4")
    assert abs((P56 - th) / P56 - 0.01) < 1e-4


def test_rv_is_read_as_56_bits():
    assert parse_ot_sampling("ot=th:8;rv:ffffffffffffff")[1] == P56 - 1


@pytest.mark.parametrize(
    "trace_state",
    [
        "ot=th:",
        "ot=th:xyz",
        "ot=th:123456789abcdef",
        "ot=th:8;rv:123",
        "ot=th:8;rv:0123456789abcg",
        "ot=th:C",
    ],
)
def test_malformed_values_are_flagged_not_fatal(trace_state):
    th, rv, invalid = parse_ot_sampling(trace_state)
    assert invalid is True
    assert th is None or rv is None


@pytest.mark.parametrize("trace_state", ["", "vendor=abc", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"])
def test_no_ot_entry_means_unknown(trace_state):
    assert parse_ot_sampling(trace_state) == (None, None, False)


@pytest.mark.parametrize(
    "trace_state, threshold",
    [
        ("ot=th:1", 2**52),  # p = 15/16: one digit is the top four bits
        ("ot=th:ffffffffffffff", P56 - 1),  # 14 digits: the smallest probability, 2^-56
        ("ot=th:08", 2**51),  # leading zeros are digits too
        ("congo=t61rcWkgMzE, ot=th:c , rojo=00f067aa0ba902b7", 3 * 2**54),  # vendors on both sides, spaces
        ("ot=th:8;foo:bar", 2**55),  # unknown sub-keys are ignored
    ],
)
def test_threshold_edge_cases(trace_state, threshold):
    assert parse_ot_sampling(trace_state) == (threshold, None, False)


def test_rv_without_th_leaves_the_threshold_unknown():
    th, rv, invalid = parse_ot_sampling("ot=rv:0123456789abcd")
    assert (th, invalid) == (None, False) and rv == 0x0123456789ABCD
