"""A user's reward term and reward function, imported by class path in tests/test_reward_terms.py (the example of
docs/rewards.md)."""

from lrl.rewards.terms import RewardTerm


class ShortAnswers(RewardTerm):
    """−tokens / 100: shorter responses score higher (z-scored within each group by default)."""

    name = "short"

    def raw(self, batch):
        return -batch.response_lengths.double() / 100


def mentions_answer(batch):
    """1 where the response contains its group's ground truth, else 0."""
    return [float(batch.ground_truths[int(g)] in t) for t, g in zip(batch.texts, batch.group_index)]
