"""Reinforcement learning with verifiable rewards: rollout actors, rewards, advantages, the RL driver."""
