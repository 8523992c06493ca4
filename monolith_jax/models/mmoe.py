"""MMoE, Multi-gate Mixture-of-Experts (Ma et al., 2018): multi-task learning.

x = [v_1..v_F, dense]
e_i = Expert_i(x)                          n_experts shared ReLU MLPs, each (B, E)
g_t = softmax(W_t x + b_t)                 one gate per task, (B, n_experts)
logit_t = Tower_t(sum_i g_t,i e_i)         one MLP tower per task, (B,)

`__call__` returns {task name: logits (B,)} in the order of `tasks`: train
it with a job's heads of the same names (`monolith_jax.heads`). single_task=True
(one task only) returns that task's (B,) logits as one array instead, for
a trainer without heads. The
parameters are the same either way (paths like "towers/<task>/out/kernel").
"""

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from monolith_jax.models.checks import dense_input, pooled_fields
from monolith_jax.models.mlp import MLP


class MMoE(nnx.Module):
    def __init__(self, fields: Sequence[str], embed_dim: int, n_dense: int = 0, n_experts: int = 4,
                 expert_hidden: Sequence[int] = (64,), tower_hidden: Sequence[int] = (32,), *,
                 tasks: Sequence[str], single_task: bool = False, rngs: nnx.Rngs):
        """tasks: the task names (the keys of the output dict), e.g.
        ["click", "like"]; single_task: with one task, return its logits as
        one (B,) array, not a dict."""
        if isinstance(tasks, str):
            raise TypeError(f"MMoE: tasks must be a sequence of task names, got the string {tasks!r} "
                            f"(for one task: tasks=[{tasks!r}], single_task=True)")
        self.tasks = tuple(tasks)
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks) \
                or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"MMoE: tasks must be distinct non-empty names, got {list(self.tasks)}")
        if single_task and len(self.tasks) != 1:
            raise ValueError(f"MMoE: single_task=True returns one task's logits, but tasks are "
                             f"{list(self.tasks)}; give one task or leave single_task=False for a dict")
        if n_experts < 1 or not expert_hidden:
            raise ValueError("MMoE: needs n_experts >= 1 and at least one expert_hidden layer")
        self.fields = tuple(fields)
        self.embed_dim = embed_dim
        self.n_dense = n_dense
        self.single_task = bool(single_task)
        d = len(self.fields) * embed_dim + n_dense
        self.experts = nnx.List([MLP(d, expert_hidden, rngs=rngs) for _ in range(n_experts)])
        self.gates = nnx.Dict({t: nnx.Linear(d, n_experts, rngs=rngs) for t in self.tasks})
        self.towers = nnx.Dict({t: MLP(expert_hidden[-1], tower_hidden, 1, rngs=rngs) for t in self.tasks})

    def _input(self, fields: dict, dense):
        x = jnp.concatenate(pooled_fields(self, fields, self.fields, self.embed_dim,
                                          f"embed_dim = {self.embed_dim}"), axis=-1)
        dense = dense_input(self, dense, self.n_dense)
        return jnp.concatenate([x, dense], axis=-1) if self.n_dense else x

    def gate_weights(self, fields: dict, dense=None) -> dict:
        """{task: the gate's softmax weights over the experts (B, n_experts)}."""
        x = self._input(fields, dense)
        return {t: nnx.softmax(self.gates[t](x), axis=-1) for t in self.tasks}

    def task_logits(self, fields: dict, dense=None) -> dict:
        """{task: logits (B,)}, whatever single_task says."""
        x = self._input(fields, dense)
        experts = jnp.stack([e(x) for e in self.experts], axis=1)          # (B, n_experts, E)
        out = {}
        for t in self.tasks:
            g = nnx.softmax(self.gates[t](x), axis=-1)                     # (B, n_experts)
            out[t] = self.towers[t](jnp.einsum("bn,bne->be", g, experts))[:, 0]
        return out

    def __call__(self, fields: dict, dense=None):
        logits = self.task_logits(fields, dense)
        return logits[self.tasks[0]] if self.single_task else logits
