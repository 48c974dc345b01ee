import pytest

from components.config import GateSection
from components.stages.gate import decide

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "candidate, base, champion, passed, reason",
    [
        (0.80, 0.10, None, True, "beats the base"),
        (0.80, 0.10, 0.70, True, "beats the base and the champion"),
        (0.80, 0.10, 0.85, False, "gain over champion -0.0500"),
        (0.105, 0.10, None, False, "gain over base +0.0050 < +0.0100"),
    ],
)
def test_exact_match_gate(candidate, base, champion, passed, reason):
    verdict = decide(GateSection(), candidate, base, champion)
    assert verdict["passed"] is passed and reason in verdict["reason"]


def test_perplexity_gate_treats_lower_as_better():
    cfg = GateSection(metric="perplexity", min_gain_over_base=0.5)
    assert decide(cfg, 2.0, 5.0, None)["gain_over_base"] == pytest.approx(3.0)
    assert not decide(cfg, 4.8, 5.0, None)["passed"]
    assert not decide(cfg, 2.0, 5.0, 1.9)["passed"]  # the champion's perplexity is lower
