"""On-policy rows for distillation (GKD, Agarwal et al. 2024): part of every micro-batch is answers the student samples
itself, just before the step, so the teacher corrects the student where the student actually goes rather than only
on text someone else wrote.

The loop asks for a step's micro-batches as usual, then `OnPolicyRows.fill` replaces the last `rows` samples of each
with prompt + the student's answer (labels on the answer, EOS included). Decoding costs about the same for 8 rows as
for 400 on a GPU (one forward per new token either way), so the answers of `every` steps are sampled at once, at the
first step of their block, from the weights of that step. The prompts are read in a seeded stream (`DataOrder`) by
global position, so a resumed run asks the same prompts at the same steps and nothing repeats early; sampling is
seeded by (seed, block, rank), and checkpoints fall on block starts (`save_interval` is a multiple of `every`), so a
resumed run writes the same answers from the same weights. Compiled layers run eagerly while sampling (a KV cache
and a new length every token would recompile them until torch gives up). Sharded strategies (FSDP, DeepSpeed) gather
parameters in every forward, so every rank must run the same number of decode steps: there generation ignores EOS
until max_new_tokens and each answer is cut after its first EOS (the answers are the same samples; only the stopping
differs).
"""
from __future__ import annotations

import torch

from prunekit.engine.loop import DataOrder


class OnPolicyRows:
    def __init__(self, prompts: list[list[int]], rows: int, max_new_tokens: int, temperature: float,
                 eos: list[int], pad_id: int, seed: int, every: int = 1):
        self.prompts, self.rows, self.max_new_tokens = prompts, rows, max_new_tokens
        self.temperature, self.eos, self.pad_id, self.seed, self.every = temperature, eos, pad_id, seed, every
        self.order = DataOrder(len(prompts), seed)
        self._block, self._answers = None, {}   # the block sampled last: (step, micro-batch) -> its answers

    def prompts_for(self, step: int, m: int, accum: int, rank: int, world_size: int) -> list[list[int]]:
        start = ((step * accum + m) * world_size + rank) * self.rows
        return [self.prompts[self.order.index(p)] for p in range(start, start + self.rows)]

    def fill(self, model, micro: list[list[dict]], step: int, rank: int, world_size: int, autocast, device,
             fixed_length: bool = False) -> list[list[dict]]:
        """`micro` (one step's micro-batches of this rank) with each one's last `rows` samples replaced by the
        student's answers."""
        accum, block = len(micro), step // self.every
        if block != self._block:
            keys = [(s, m) for s in range(block * self.every, (block + 1) * self.every) for m in range(accum)]
            prompts = [p for s, m in keys for p in self.prompts_for(s, m, accum, rank, world_size)]
            answers = self.generate(model, prompts, self.seed + 1_000_003 * block + rank, fixed_length, autocast,
                                    device)
            self._block = block
            self._answers = {key: answers[i * self.rows:(i + 1) * self.rows] for i, key in enumerate(keys)}
        packed = "position_ids" in micro[0][0]
        out = []
        for m, samples in enumerate(micro):
            new = []
            for prompt, answer in zip(self.prompts_for(step, m, accum, rank, world_size), self._answers[(step, m)]):
                row = {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
                if packed:  # one sequence of a packed row: positions restart at 0
                    row["position_ids"] = list(range(len(row["input_ids"])))
                new.append(row)
            out.append(samples[:len(samples) - self.rows] + new)
        return out

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], seed: int, fixed_length: bool, autocast,
                 device) -> list[list[int]]:
        """The student's answers (token ids up to and including the first EOS) to left-padded `prompts`."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = self.temperature <= 0
        kwargs = dict(do_sample=not greedy, temperature=None if greedy else self.temperature, top_p=None, top_k=None,
                      max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=None if fixed_length else (self.eos or None))
        was_training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), autocast, torch.compiler.set_stance("force_eager"):
                torch.manual_seed(seed)
                new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        finally:
            model.train(was_training)
        eos = set(self.eos)
        answers = []
        for row in new[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
        return answers
