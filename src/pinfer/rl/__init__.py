"""Rollout API for RL training loops: token ids in and out, float32 logprobs, live weight updates."""

from pinfer.rl.rollout import Rollout, RolloutEngine

__all__ = ["Rollout", "RolloutEngine"]
