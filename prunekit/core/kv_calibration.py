"""Calibrate a KV cut layer by layer so each layer's attention output matches the original's.

Grouping (mean or similarity) only decides which heads share a merged K/V projection; averaging their weights is
what matching the merged head's K/V *outputs* gives (the least-squares W of sum_h ||X(W_h - W)||² is the mean), and
that ignores how the queries use the keys. Here the target is the attention module's output instead:

0. Alignment, closed form: heads that compute the same thing in different bases merge badly by averaging. Before any
   fit, each merged head starts from the best rank-`head_dim` summary of its group on the calibration data instead of
   the mean: values are the top principal subspace of the group's value outputs (weighted by how o_proj reads each
   head), each head's change of basis folded into its query heads' o_proj columns; keys are merged per RoPE frequency
   (a rotary pair is a complex number, and a complex scale commutes with RoPE), the top singular direction of the
   group's keys at that frequency (weighted by how much the queries read them), each head's complex scale folded into
   its query heads' q_proj rows. Heads that differ only by such bases (identical heads included) merge exactly; the
   mean is one point of what it searches, so the group's keys and values are reconstructed at least as well, and the
   held-out batches decide whether a layer keeps it. Keys stay averaged when the attention normalises q/k per head
   (Qwen3's q_norm / k_norm do not commute with the scales).
1. Teacher forcing: one pass of the original model (eager attention) records every attention module's inputs
   (normed hidden states, rotary embeddings, the 4D mask with padding), so layers are calibrated independently.
   With `sequential`, each layer is fitted instead on what the cut model feeds it (one forward of the cut model,
   stopped at that layer), still towards the original's outputs on the original's inputs.
2. Values, closed form: given the cut model's own attention probabilities P_h, each query head's context is
   P_h X W_v — linear in W_v — so the V weights (and bias) of a merged head are the least-squares fit of the
   original contexts of all query heads in its group, stacked.
3. Queries, keys and values jointly: a short Adam fit of the attention output (after o_proj) to the original's, through
   the layer's own attention forward (RoPE, q_norm/k_norm, GQA, sliding windows stay the model's own code), fp32.
4. o_proj, closed form: least squares from the cut model's contexts to the original attention output.

Every solve is a ridge regression toward the current weights, so directions the calibration data does not see keep
their merged values. Every fourth calibration batch is held out of the fits and judges each step (the ridge strength
of each solve, the Adam iterate kept, whether the layer changes at all), so calibration cannot make a layer worse on
data it did not fit; chat data with a shared system prompt has far fewer distinct tokens than it seems, and plain
least squares overfits it badly. A layer whose merged heads already reproduce the output (identical heads) is left
as it is: the calibrated cut of identical heads is exact.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch

from prunekit import PrunekitError
from prunekit.core.families import ModelFamily, get_module

EXACT_RELATIVE_ERROR = 1e-10   # a layer whose cut already reproduces the output this well is left alone


@dataclass
class CalibrationSettings:
    steps: int = 200               # Adam steps of the joint Q/K/V fit per layer (0: closed-form solves only)
    lr: float = 3e-3               # SmolLM2 3 -> 1: 1e-3 is slow, 1e-2 diverges on some layers
    fit_queries: bool = True       # fit q_proj too: the queries adapt to the merged keys (same parameter count)
    refit_o_proj: bool = True      # least-squares o_proj to the original attention output (same parameter count)
    # ridge strengths toward the current weights (relative to the mean Gram diagonal) tried by every least-squares
    # solve; the held-out calibration batches pick one, or keep the current weights
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    # sequential: each layer is fitted on the inputs the cut model itself gives it (its earlier layers calibrated
    # already) to reproduce the original layer's output on the original's inputs, so it also absorbs some of the
    # error from upstream; one forward of the cut model per layer. SmolLM2 3 -> 1 (8 layers pruned; CPU, 64 rows,
    # 30 steps), right after the cut: general-text NLL 6.89 -> 6.74, token_acc 0.091 either way; fitting to the
    # original's outputs on the cut inputs instead (GPTQ-style) was worse (7.28, 0.079). bench/README.md.
    sequential: bool = False
    # start from the aligned merge (step 0 above) instead of the mean; kept only where it lowers the held-out error
    align: bool = True


@dataclass
class _Batch:
    hidden: torch.Tensor           # [B, T, hidden] fp32: the attention module's input
    kwargs: dict                   # the rest of its call (position embeddings, mask, ...), fp32
    tokens: torch.Tensor           # [B, T] bool: real tokens (padding is excluded from every loss and solve)


def _to_fp32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    return value


@contextlib.contextmanager
def eager_attention(model):
    """Run `model` with eager attention: its masks are then additive 4D tensors and its attention modules return
    their probabilities, both of which calibration needs."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


class _Captured(Exception):
    """Raised by the hook of the only layer asked for: the rest of the forward is not needed."""


@torch.no_grad()
def capture_attention_inputs(model, family: ModelFamily, batches: list[dict],
                             only: int | None = None) -> list[list[_Batch]]:
    """One teacher-forced pass of `model`: per text layer, the inputs of its attention module for every batch
    (dicts with input_ids and attention_mask). `only`: that layer's alone (the forward stops there)."""
    layers = get_module(model, family.text_layers)
    captured: list[list[_Batch]] = [[] for _ in layers]
    tokens: list[torch.Tensor] = []

    def recorder(i):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs.update(past_key_values=None, use_cache=False)
            captured[i].append(_Batch(hidden.detach().float(), _to_fp32(kwargs), tokens[-1]))
            if i == only:
                raise _Captured
        return hook

    hooks = [getattr(layer, family.attn_module).register_forward_pre_hook(recorder(i), with_kwargs=True)
             for i, layer in enumerate(layers) if only is None or i == only]
    try:
        with eager_attention(model):
            for batch in batches:
                tokens.append(batch["attention_mask"].bool())
                with contextlib.suppress(_Captured):
                    model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if not batches or not sum(int(t.sum()) for t in tokens):
        raise PrunekitError("--data: the calibration data produced no tokens")
    return captured


def _fp32_eager_copy(attn):
    module = copy.deepcopy(attn).float().eval()
    module.config._attn_implementation = "eager"   # the copy owns its config copy; the model is not touched
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _forward(attn, batch: _Batch, contexts: list | None = None):
    """(attention output after o_proj, attention probabilities); `contexts` collects o_proj's input if given."""
    hook = None
    if contexts is not None:
        hook = attn.o_proj.register_forward_pre_hook(lambda _m, args: contexts.append(args[0].detach()))
    try:
        out, probs = attn(batch.hidden, **batch.kwargs)[:2]
    finally:
        if hook is not None:
            hook.remove()
    return out, probs


def _squared_error(outputs, targets, data: list[_Batch]) -> float:
    return sum(float(((o - y)[b.tokens] ** 2).sum()) for o, y, b in zip(outputs, targets, data))


@dataclass
class _Problem:
    """One layer's calibration: the original's attention outputs and contexts (o_proj inputs, in the cut model's
    query-head order) on the captured inputs; `fit` batches fit the weights, `check` batches (held out from the
    fit) judge every step, so a solve or an Adam iterate that only memorises the calibration tokens is refused."""
    data: list[_Batch]
    targets: list[torch.Tensor]
    contexts: list[torch.Tensor]
    fit: list[int]
    check: list[int]

    def error(self, cut, which: list[int]) -> float:
        with torch.no_grad():
            return sum(float(((_forward(cut, self.data[i])[0] - self.targets[i])[self.data[i].tokens] ** 2).sum())
                       for i in which)

    def energy(self, which: list[int]) -> float:
        return max(sum(float((self.targets[i][self.data[i].tokens] ** 2).sum()) for i in which), 1e-30)


def _split(n: int) -> tuple[list[int], list[int]]:
    """(fit, check) batch indexes: every 4th batch checks (the batches are sorted by length, so both splits see
    short and long conversations); a single batch both fits and checks."""
    if n == 1:
        return [0], [0]
    check = [i for i in range(n) if i % 4 == 3] or [n - 1]
    return [i for i in range(n) if i not in check], check


def _ridge_toward(gram: torch.Tensor, cross: torch.Tensor, current: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||A W - Y||² + lam ||W - current||² from A^T A (`gram`) and A^T Y (`cross`), in float64: where the
    data says nothing W stays at `current`, and a `current` that already fits exactly does not move."""
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return current + torch.linalg.solve(gram + lam * eye, cross - gram @ current)


def _linear_as_matrix(linear: torch.nn.Linear) -> torch.Tensor:
    """The Linear as an [in (+1 for a bias), out] float64 matrix (y = [x 1] M)."""
    m = linear.weight.T.double()
    return torch.cat([m, linear.bias.double()[None]]) if linear.bias is not None else m


def _set_linear_from_matrix(linear: torch.nn.Linear, m: torch.Tensor) -> None:
    n_in = linear.weight.shape[1]
    linear.weight.data.copy_(m[:n_in].T)
    if linear.bias is not None:
        linear.bias.data.copy_(m[n_in])


def _with_ones(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], -1) if bias else x


def _keep_best_on_check(cut, linear: torch.nn.Linear, candidates: list[torch.Tensor], problem: _Problem) -> None:
    """Set `linear` to the candidate with the lowest held-out error; candidate 0 is the current weights."""
    errors = []
    for m in candidates:
        _set_linear_from_matrix(linear, m)
        errors.append(problem.error(cut, problem.check))
    _set_linear_from_matrix(linear, candidates[min(range(len(errors)), key=errors.__getitem__)])


def _augmented(linear: torch.nn.Linear) -> torch.Tensor:
    """The Linear as an [in + 1, out] float64 matrix, the last row its bias (zeros without one)."""
    m = _linear_as_matrix(linear)
    return m if linear.bias is not None else torch.cat([m, torch.zeros_like(m[:1])])


def _set_augmented(linear: torch.nn.Linear, m: torch.Tensor) -> None:
    _set_linear_from_matrix(linear, m if linear.bias is not None else m[:-1])


def _input_gram(problem: _Problem) -> torch.Tensor:
    """[X 1]^T [X 1] over the real tokens of the fit batches (float64): every second moment of a projection."""
    gram = 0
    for i in problem.fit:
        x = _with_ones(problem.data[i].hidden, True)[problem.data[i].tokens].double()
        gram = gram + x.T @ x
    return gram


def _psd_sqrt(s: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^1/2, S^-1/2) of a symmetric PSD matrix, eigenvalues floored relative to the largest."""
    values, vectors = torch.linalg.eigh(s)
    root = values.clamp_min(floor * float(values.max().clamp_min(1e-300))).sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


@torch.no_grad()
def _align_heads(orig, cut, problem: _Problem, *, heads: int, old_kv: int, kv_heads: int, head_dim: int,
                 query_order: list[int] | None, keys: bool) -> None:
    """Step 0 of the module docstring: set the cut module's K/V (and, to absorb each head's basis, q_proj rows and
    o_proj columns) from the original's weights. `query_order[h]`: the original query head of cut head h."""
    gram = _input_gram(problem)
    source = query_order or list(range(heads))
    kv_of = [source[h] // (heads // old_kv) for h in range(heads)]        # original KV head of each cut query head
    group_of = [h // (heads // kv_heads) for h in range(heads)]
    members = [sorted({kv_of[h] for h in range(heads) if group_of[h] == g}) for g in range(kv_heads)]
    cut_heads = {j: [h for h in range(heads) if kv_of[h] == j] for j in range(old_kv)}
    span = [slice(j * head_dim, (j + 1) * head_dim) for j in range(max(heads, old_kv))]

    w_v, w_o = _augmented(orig.v_proj), orig.o_proj.weight.double()
    new_v = torch.zeros(w_v.shape[0], kv_heads * head_dim, dtype=torch.float64, device=w_v.device)
    new_o = cut.o_proj.weight.double().clone()
    for g, group in enumerate(members):
        # o_proj reads head j's values through the columns of its query heads: weigh the error by that metric
        roots, inverse_roots = zip(*(_psd_sqrt(sum(w_o[:, span[source[h]]].T @ w_o[:, span[source[h]]]
                                                   for h in cut_heads[j])) for j in group))
        z = torch.cat([w_v[:, span[j]] @ root for j, root in zip(group, roots)], 1)   # [in+1, r*hd]
        basis = torch.linalg.eigh(z.T @ gram @ z)[1][:, -head_dim:]                   # top principal directions
        shared = z @ basis
        scale = math.sqrt(sum(float((w_v[:, span[j]].T @ gram @ w_v[:, span[j]]).trace()) for j in group)
                          / len(group) / max(float((shared.T @ gram @ shared).trace()), 1e-300))
        new_v[:, span[g]] = shared * scale
        for k, (j, inverse_root) in enumerate(zip(group, inverse_roots)):
            change = basis[k * head_dim:(k + 1) * head_dim].T @ inverse_root / scale   # V_j ~ V_shared @ change
            for h in cut_heads[j]:
                new_o[:, span[h]] = w_o[:, span[source[h]]] @ change.T
    _set_augmented(cut.v_proj, new_v)
    cut.o_proj.weight.copy_(new_o)
    if not keys:
        return

    half = head_dim // 2
    w_k, w_q = _augmented(orig.k_proj), _augmented(orig.q_proj)

    def complex_rows(w, head):   # a head's rotary pairs (i, i + hd/2) as complex columns [in+1, hd/2]
        return torch.complex(w[:, head * head_dim:head * head_dim + half], w[:, head * head_dim + half:
                                                                               (head + 1) * head_dim])

    gram_c = gram.to(torch.complex128)
    new_k = torch.zeros(w_k.shape[0], kv_heads * head_dim, dtype=torch.float64, device=w_k.device)
    new_q = _augmented(cut.q_proj).clone()
    for g, group in enumerate(members):
        k = torch.stack([complex_rows(w_k, j) for j in group], -1).permute(1, 0, 2)    # [hd/2, in+1, r]
        moments = k.conj().transpose(1, 2) @ gram_c @ k                               # [hd/2, r, r]
        # how much the queries read each head's keys at each frequency
        q_energy = torch.stack([sum(((complex_rows(w_q, source[h]).conj() * (gram_c @ complex_rows(w_q, source[h])))
                                     .sum(0).real) for h in cut_heads[j]) for j in group], -1)   # [hd/2, r]
        weight = (q_energy / q_energy.mean(-1, keepdim=True).clamp_min(1e-300)).clamp_min(1e-6).sqrt()
        weighted = weight[:, :, None] * moments * weight[:, None, :]
        top = torch.linalg.eigh(weighted)[1][:, :, -1]                                # [hd/2, r]
        shared = (k * (weight * top)[:, None, :]).sum(-1)                             # [hd/2, in+1]
        energy = (shared.conj()[:, None, :] @ gram_c @ shared[:, :, None]).real.reshape(-1)
        scale = (moments.diagonal(dim1=1, dim2=2).real.mean(-1) / energy.clamp_min(1e-300)).sqrt()
        shared = shared * scale[:, None]
        new_k[:, g * head_dim:g * head_dim + half] = shared.real.T
        new_k[:, g * head_dim + half:(g + 1) * head_dim] = shared.imag.T
        for k_index, j in enumerate(group):
            factor = top[:, k_index] / (weight[:, k_index] * scale)                  # conj of head j's key scale
            for h in cut_heads[j]:
                q = complex_rows(w_q, source[h]) * factor[None, :]
                new_q[:, h * head_dim:h * head_dim + half] = q.real
                new_q[:, h * head_dim + half:(h + 1) * head_dim] = q.imag
    _set_augmented(cut.k_proj, new_k)
    _set_augmented(cut.q_proj, new_q)


@torch.no_grad()
def _try_alignment(orig, cut, problem: _Problem, check_error: float, **shape) -> bool:
    """Align the cut module's merged heads (`_align_heads`) if that lowers the held-out error; the original contexts
    the value solve fits are then mapped into the aligned heads' bases (through o_proj: T_h = C_h O_h O'_h^+)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    saved = {n: [p.detach().clone() for p in getattr(cut, n).parameters()] for n in names}
    old_kv = orig.k_proj.weight.shape[0] // shape["head_dim"]
    _align_heads(orig, cut, problem, old_kv=old_kv, **shape)
    if problem.error(cut, problem.check) >= check_error:
        for n in names:
            for p, value in zip(getattr(cut, n).parameters(), saved[n]):
                p.copy_(value)
        return False
    heads, head_dim, source = shape["heads"], shape["head_dim"], shape["query_order"] or list(range(shape["heads"]))
    w_o, w_cut = orig.o_proj.weight.double(), cut.o_proj.weight.double()
    maps = torch.block_diag(*[torch.linalg.lstsq(w_cut[:, h * head_dim:(h + 1) * head_dim],
                                                 w_o[:, source[h] * head_dim:(source[h] + 1) * head_dim]).solution.T
                              for h in range(heads)])                     # [H*hd, H*hd], block h: X_h^T
    problem.contexts = [(c.double() @ maps).to(c.dtype) for c in problem.contexts]
    return True


@torch.no_grad()
def _solve_values(cut, problem: _Problem, heads: int, kv_heads: int, head_dim: int, ridges) -> None:
    """Least-squares V of every merged head for the cut model's own attention probabilities: for the query heads
    h of group g, P_h [X 1] W_g ≈ the original context of h, stacked over heads and real tokens."""
    per_group = heads // kv_heads
    bias = cut.v_proj.bias is not None
    n = cut.v_proj.weight.shape[1] + bias
    device = problem.data[0].hidden.device
    grams = torch.zeros(kv_heads, n, n, dtype=torch.float64, device=device)
    crosses = torch.zeros(kv_heads, n, head_dim, dtype=torch.float64, device=device)
    for i in problem.fit:
        batch = problem.data[i]
        _, probs = _forward(cut, batch)
        x = _with_ones(batch.hidden, bias)                                             # [B, T, n]
        target = problem.contexts[i].reshape(*batch.hidden.shape[:2], heads, head_dim)  # [B, T, H, hd]
        for h in range(heads):
            a = (probs[:, h] @ x)[batch.tokens].double()                               # [tokens, n]
            grams[h // per_group] += a.T @ a
            crosses[h // per_group] += a.T @ target[:, :, h][batch.tokens].double()
    current = _linear_as_matrix(cut.v_proj)
    candidates = [current] + [
        torch.cat([_ridge_toward(grams[g], crosses[g], current[:, g * head_dim:(g + 1) * head_dim], r)
                   for g in range(kv_heads)], 1) for r in ridges]
    _keep_best_on_check(cut, cut.v_proj, candidates, problem)


@torch.no_grad()
def _solve_output_projection(cut, problem: _Problem, ridges) -> None:
    """Least-squares o_proj from the cut model's contexts to the original attention output."""
    bias = cut.o_proj.bias is not None
    gram = cross = 0
    for i in problem.fit:
        contexts: list[torch.Tensor] = []
        _forward(cut, problem.data[i], contexts)
        tokens = problem.data[i].tokens
        a = _with_ones(contexts[0], bias)[tokens].double()
        gram, cross = gram + a.T @ a, cross + a.T @ problem.targets[i][tokens].double()
    current = _linear_as_matrix(cut.o_proj)
    _keep_best_on_check(cut, cut.o_proj, [current] + [_ridge_toward(gram, cross, current, r) for r in ridges],
                        problem)


def _fit_projections(cut, problem: _Problem, settings: CalibrationSettings) -> None:
    """Adam on the Q (with `fit_queries`), K and V projections (weights and biases) for the relative
    attention-output error on the fit batches; keeps the iterate with the lowest held-out error, the starting one
    included."""
    fitted = (cut.q_proj, cut.k_proj, cut.v_proj) if settings.fit_queries else (cut.k_proj, cut.v_proj)
    params = [p for lin in fitted for p in lin.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / settings.steps, 1.0))))
    energy = problem.energy(problem.fit)
    best_error, best = math.inf, None
    for step in range(settings.steps + 1):   # the last pass only judges the final iterate
        check_error = problem.error(cut, problem.check)
        if check_error < best_error:
            best_error, best = check_error, [p.detach().clone() for p in params]
        if step == settings.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        for i in problem.fit:
            out, _ = _forward(cut, problem.data[i])
            (((out - problem.targets[i])[problem.data[i].tokens] ** 2).sum() / energy).backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
            p.requires_grad_(False)


def _replace_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """New Parameters (in dst's dtype) rather than in-place copies: the cut model built by apply_to_model shares
    the tensors it did not change (o_proj, q_proj) with the original, which must stay intact."""
    for name, p in src.named_parameters(recurse=False):
        old = getattr(dst, name)
        setattr(dst, name, torch.nn.Parameter(p.detach().to(old.dtype).clone(), requires_grad=old.requires_grad))


def calibrate_layer(original_attn, cut_attn, data: list[_Batch], *, heads: int, kv_heads: int, head_dim: int,
                    query_order: list[int] | None, settings: CalibrationSettings,
                    target_data: list[_Batch] | None = None, align_keys: bool = True) -> dict:
    """Calibrate one cut attention module in place against the original; returns its output errors.
    `target_data`: the original's outputs come from these inputs instead of `data` (same batches).
    `align_keys`: the alignment (settings.align) may merge keys by rotary frequency (False: values only)."""
    orig, cut = _fp32_eager_copy(original_attn), _fp32_eager_copy(cut_attn)
    targets, contexts = [], []
    with torch.no_grad():
        for batch in (target_data or data):
            targets.append(_forward(orig, batch, contexts)[0])
    if query_order is not None:   # the cut model's query heads are permuted (similarity grouping)
        columns = torch.arange(heads * head_dim).reshape(heads, head_dim)[query_order].reshape(-1).to(
            contexts[0].device)
        contexts = [c.index_select(-1, columns) for c in contexts]
    problem = _Problem(data, targets, contexts, *_split(len(data)))
    every = list(range(len(data)))
    before, check_before = problem.error(cut, every), problem.error(cut, problem.check)
    after, check_after, aligned = before, check_before, False
    if before / problem.energy(every) > EXACT_RELATIVE_ERROR:
        if settings.align:
            aligned = _try_alignment(orig, cut, problem, check_before, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, query_order=query_order, keys=align_keys)
        _solve_values(cut, problem, heads, kv_heads, head_dim, settings.ridges)
        if settings.steps > 0:
            _fit_projections(cut, problem, settings)
        if settings.refit_o_proj:
            _solve_output_projection(cut, problem, settings.ridges)
        after, check_after = problem.error(cut, every), problem.error(cut, problem.check)
        if check_after < check_before:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _replace_parameters(getattr(cut_attn, name), getattr(cut, name))
        else:
            after, check_after = before, check_before
    n = sum(int(b.tokens.sum()) for b in data) * targets[0].shape[-1]
    energy, check_energy = problem.energy(every), problem.energy(problem.check)
    return {"mse_before": before / n, "mse_after": after / n,
            "relative_error_before": before / energy, "relative_error_after": after / energy,
            "check_relative_error_before": check_before / check_energy,
            "check_relative_error_after": check_after / check_energy, "aligned": aligned}


@torch.no_grad()
def attention_output_errors(original, cut, family: ModelFamily, batches: list[dict]) -> list[float]:
    """Per text layer, the relative error ||cut - original||² / ||original||² of the attention output (after
    o_proj, so query-head permutations do not matter) on `batches`, each layer fed the original model's inputs
    (teacher forcing)."""
    captured = capture_attention_inputs(original, family, batches)
    errors = []
    for o_layer, c_layer, data in zip(get_module(original, family.text_layers), get_module(cut, family.text_layers),
                                      captured):
        orig = _fp32_eager_copy(getattr(o_layer, family.attn_module))
        cut_attn = _fp32_eager_copy(getattr(c_layer, family.attn_module))
        targets = [_forward(orig, b)[0] for b in data]
        energy = max(sum(float((y[b.tokens] ** 2).sum()) for y, b in zip(targets, data)), 1e-30)
        errors.append(_squared_error([_forward(cut_attn, b)[0] for b in data], targets, data) / energy)
    return errors


def calibrate_kv_cut(original, cut, family: ModelFamily, batches: list[dict],
                     settings: CalibrationSettings | None = None, query_orders: dict[int, list[int]] | None = None,
                     progress=None) -> dict:
    """Calibrate every text layer of `cut` (the KV-cut model built from `original`) in place on `batches`
    (dicts with input_ids and attention_mask; right padding is fine). `query_orders[layer]` lists, for each query
    head of the cut model, the original query head it came from (similarity grouping). Returns the provenance
    record: samples, tokens, settings and per-layer attention-output MSE before/after."""
    settings = settings or CalibrationSettings()
    heads, kv_heads, head_dim = family.attention_shape(cut.config.to_dict())
    captured = capture_attention_inputs(original, family, batches)
    original_layers = get_module(original, family.text_layers)
    cut_layers = get_module(cut, family.text_layers)
    per_layer = []
    for i, (o_layer, c_layer) in enumerate(zip(original_layers, cut_layers)):
        own = capture_attention_inputs(cut, family, batches, only=i)[i] if settings.sequential else None
        cut_attn = getattr(c_layer, family.attn_module)
        stats = calibrate_layer(getattr(o_layer, family.attn_module), cut_attn,
                                own or captured[i], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                query_order=(query_orders or {}).get(i), settings=settings,
                                target_data=captured[i] if own else None,
                                align_keys=not any(getattr(cut_attn, n, None) is not None for n in family.head_norms))
        per_layer.append({"layer": i, **stats})
        captured[i] = []   # free this layer's inputs
        if progress is not None:
            progress(i, stats)
    return {"samples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "steps": settings.steps, "lr": settings.lr, "fit_queries": settings.fit_queries,
            "refit_o_proj": settings.refit_o_proj, "align": settings.align, "ridges": list(settings.ridges),
            "sequential": settings.sequential,
            "layers": per_layer}
