import pytest

from tasks.register import decide_promotion


@pytest.mark.parametrize(
    "candidate, base, champion, direction, margin, promote",
    [
        (0.9, 0.0, None, "max", 0.0, True),
        (0.0, 0.0, None, "max", 0.0, False),  # equal to base is not better
        (0.9, 0.0, 0.9, "max", 0.0, False),  # equal to champion is not better
        (0.8, 0.0, 0.9, "max", 0.0, False),  # worse than champion
        (0.95, 0.0, 0.9, "max", 0.1, False),  # better, but not by the margin
        (1.0, 0.0, 0.85, "max", 0.1, True),
        (2.0, 3.0, None, "min", 0.0, True),  # lower loss is better
        (3.5, 3.0, None, "min", 0.0, False),
        (2.0, 3.0, 1.9, "min", 0.0, False),
    ],
)
def test_promotion_rule(candidate, base, champion, direction, margin, promote):
    decision = decide_promotion(candidate, base, champion, direction, margin)
    assert decision.promote is promote
    assert decision.reason
