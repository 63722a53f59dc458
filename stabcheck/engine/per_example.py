r"""Per-example gradients of the loss and the sums that gradient statistics are built from.

For m examples with loss gradients :math:`g_i = \nabla_\theta \ell_i`, coherence and the
gradient signal-to-noise ratio need only

.. math::

    S = \sum_i g_i, \qquad q_i = \lVert g_i \rVert^2 \text{ (per module)}, \qquad
    Q = \sum_i g_i \odot g_i .

:func:`gradient_sums` computes them in chunks sized to a memory budget. For ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` layers they follow from each layer's input :math:`a_i` and
output gradient :math:`e_i`: a linear layer on one position per example has
:math:`g_i = e_i a_i^\top`, so :math:`\lVert g_i \rVert^2 = \lVert e_i \rVert^2 \lVert a_i
\rVert^2` and :math:`Q = (E \odot E)^\top (A \odot A)` without forming any :math:`g_i`
(Goodfellow 2015, "Efficient Per-Example Gradient Computations"). Layers over sequences and
convolutions form :math:`g_i` from the inputs and output gradients with one ``einsum``, which
still needs no per-example forward pass. Every other parameter gets its per-example gradients
from ``torch.func.vmap`` over ``torch.func.grad``, or from a loop of single-example backward
passes when vmap cannot run the model.

Before a layer rule is trusted, the first chunk checks it. The rule's sum over the batch must
equal autograd's batch gradient, which fails when the weight is also used outside its module.
Rules that form per-example gradients must also match vmap on the first examples, which fails
when the batch dimension is not first. A module that runs more than once per forward pass never
uses its rule. Any module that fails falls back to vmap, with a note. The regularizer is not
part of :math:`\ell_i`, because coupled weight decay adds the same vector to every example's
gradient.

When the objective is split over several processes, each rank computes the sums of its shard,
then :math:`S` and :math:`Q` are added over the ranks and the :math:`q_i` gathered in the order
of the analysis set. A class's gradient sum is added over the ranks as a vector before its norm
is taken, one class at a time, so the memory of the per-class norms stays one vector per rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from stabcheck.engine.distributed import SingleProcess
from stabcheck.engine.hvp import module_blocks
from stabcheck.engine.layer_gradients import (
    LAYER_TYPES,
    Capture,
    LayerRuleError,
    LayerTerms,
    Segments,
    close_within,
    recording_hook,
)
from stabcheck.engine.memory import (
    MemoryBudgetExceeded,
    format_bytes,
    saved_tensor_meter,
)
from stabcheck.engine.objective import Objective
from stabcheck.errors import DataError

METHODS = ("auto", "vmap", "loop")
# Examples of the probe batch that checks the layer rule and measures memory.
PROBE_EXAMPLES = 4
# Agreement that the probe checks require, by dtype.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
# Factor on the measured per-example memory for temporaries that the meter does not see.
MEMORY_SAFETY = 2.0


class CoupledExamplesError(ValueError):
    """The model's output for one example depends on the other examples of its batch."""


COUPLED_MESSAGE = (
    "an example's loss changes with the other examples in its batch, so per-example gradients "
    "are undefined; this happens with BatchNorm in train mode or another layer that mixes the "
    "examples of a batch"
)


@dataclass(frozen=True)
class GradientSums:
    """Sums over examples of the per-example loss gradients, in float64.

    ``sum_gradient`` and ``sum_squares`` are flat vectors in the order of the objective's
    parameter layout. ``sq_norms`` contains each example's squared gradient norm in analysis-set
    order, and ``block_sq_norms`` the same per module. ``group_sq_norm_of_sum`` maps each group
    label to the squared norm of the sum of its examples' gradients.
    """

    num_examples: int
    sum_gradient: torch.Tensor
    sum_squares: torch.Tensor
    sq_norms: torch.Tensor
    block_sq_norms: dict[str, torch.Tensor]
    group_sq_norm_of_sum: dict[int, float]
    methods: dict[str, str]
    chunk_size: int
    num_chunks: int
    bytes_per_example: int
    notes: tuple[str, ...] = ()
    # The terms of the only chunk, with each example's row, so that a Gram matrix of some of the
    # examples needs no second pass. None when the examples took several chunks.
    single_chunk: tuple[_ChunkTerms, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class GradientPlan:
    """The method chosen for each parameter, found once per model by :func:`make_plan`.

    ``layer_modules`` maps module names to the module and its parameters (local name to full
    name); those parameters use the layer rule. ``other_params`` use ``other_method`` (vmap or
    loop), and ``unused`` parameters are outside the loss's autograd graph.
    """

    layer_modules: dict[str, tuple[nn.Module, dict[str, str]]] = field(default_factory=dict)
    other_params: list[str] = field(default_factory=list)
    other_method: str = "vmap"
    unused: list[str] = field(default_factory=list)
    # Layer modules whose rule forms each example's weight gradient (convolutions, sequences).
    materialized: set[str] = field(default_factory=set)
    # Bytes that autograd saves for one example in a forward pass, measured on the probe.
    activation_bytes: float = 0.0
    # Losses of the first examples in the probe batch, compared with the first chunk's.
    probe_losses: torch.Tensor | None = None
    # Whether the first chunk has checked the layer rules against autograd.
    verified: bool = False
    notes: list[str] = field(default_factory=list)

    def methods(self) -> dict[str, str]:
        chosen = {name: "layer" for _, names in self.layer_modules.values() for name in names.values()}
        chosen.update({name: self.other_method for name in self.other_params})
        chosen.update({name: "unused" for name in self.unused})
        return chosen


def gradient_sums(
    objective: Objective,
    *,
    groups: torch.Tensor | None = None,
    method: str = "auto",
    memory_budget: int | None = None,
    plan: GradientPlan | None = None,
) -> GradientSums:
    """Compute the per-example gradient sums over the objective's analysis set.

    ``groups`` (one integer per example, such as class labels) adds the squared norm of each
    group's gradient sum. Examples are visited sorted by group, so only the sum of the group
    that crosses a chunk boundary is carried from one chunk to the next. ``method`` is ``auto``
    (layer rule where it applies, vmap elsewhere), ``vmap`` or ``loop``.

    Raises :class:`MemoryBudgetExceeded` when one example does not fit in ``memory_budget``
    bytes, and :class:`CoupledExamplesError` when the model mixes the examples of a batch
    (BatchNorm in train mode, for one), so that per-example gradients are undefined.
    """
    plan = plan or make_plan(objective, method)
    layout = objective.layout
    num_examples = objective.num_samples
    group = objective.group
    bytes_per_example, fixed_bytes = estimate_memory(objective, plan)
    failure: MemoryBudgetExceeded | None = None
    try:
        chunk_size = _chunk_size(num_examples, bytes_per_example, fixed_bytes, memory_budget)
    except MemoryBudgetExceeded as error:
        failure = error
    # Every rank must stop here when one does, or the others would wait in the reductions below.
    if group.any_true(failure is not None):
        raise failure or MemoryBudgetExceeded(
            fixed_bytes + bytes_per_example, memory_budget or 0, "on another process, the gradient statistics of one example"
        )

    if groups is None:
        order = torch.arange(num_examples)
        group_of: list[int] = [0] * num_examples
    else:
        order = torch.sort(groups.cpu(), stable=True).indices
        group_of = groups.cpu()[order].tolist()

    float64 = {"dtype": torch.float64, "device": objective.device}
    sum_gradient = torch.zeros(layout.dim, **float64)
    sum_squares = torch.zeros(layout.dim, **float64)
    param_sq = {name: torch.zeros(num_examples, **float64) for name in layout.names}
    group_sums: dict[int, float] = {}
    carried = torch.zeros(layout.dim, **float64)
    carried_label: int | None = None
    last_terms: _ChunkTerms | None = None
    num_chunks = 0
    reducer = None
    if group.is_distributed and groups is not None:
        global_labels = torch.unique(group.gather_rows(torch.unique(groups.cpu()))).tolist()
        reducer = _GroupSumReducer(group, global_labels, layout.dim, objective.device)

    start = 0
    while start < num_examples:
        stop = min(start + chunk_size, num_examples)
        indices = order[start:stop]
        layer_count = len(plan.layer_modules)
        terms = _verified_terms(objective, plan, indices)
        if len(plan.layer_modules) != layer_count:
            # A layer moved to vmap, which needs more memory per example from the next chunk on.
            bytes_per_example, fixed_bytes = estimate_memory(objective, plan)
            chunk_size = _chunk_size(num_examples, bytes_per_example, fixed_bytes, memory_budget)
        num_chunks += 1
        last_terms = terms
        sum_gradient += layout.flatten(terms.batch_gradient).double()
        sum_squares += layout.flatten(terms.squares())
        for name, values in terms.sq_norms().items():
            param_sq[name][indices.to(objective.device)] = values
        if groups is None:
            start = stop
            continue
        segments = _segments(group_of, start, stop)
        room = None if memory_budget is None else memory_budget - fixed_bytes - len(indices) * bytes_per_example
        if reducer is not None:
            carried = _reduce_segment_sums(terms, layout, segments, start, group_of, num_examples, carried, reducer, room)
            start = stop
            continue
        # A group that goes on from the previous chunk or into the next needs its sum as a
        # vector, carried across chunks. The groups inside the chunk need only the norm.
        head = segments[:1] if carried_label is not None else []
        last_start, last_stop = segments[-1]
        tail = [segments[-1]] if last_stop < num_examples and group_of[last_stop] == group_of[last_start] else []
        inner = [segment for segment in segments if segment not in head and segment not in tail]
        # Norms of up to per_batch groups are computed together, within what the chunk leaves of the budget.
        per_batch = len(inner) if room is None else max(1, room // (8 * layout.dim))
        for first in range(0, len(inner), per_batch):
            batch = inner[first : first + per_batch]
            norms = terms.segment_sq_norms([(a - start, b - start) for a, b in batch])
            for (segment_start, _), value in zip(batch, norms.tolist()):
                group_sums[group_of[segment_start]] = value
        for segment_start, segment_stop in head + [segment for segment in tail if segment not in head]:
            label = group_of[segment_start]
            stacked = terms.segment_sums([(segment_start - start, segment_stop - start)])
            carried += layout.flatten({name: part[0] for name, part in stacked.items()})
            carried_label = label
            if not (segment_stop < num_examples and group_of[segment_stop] == label):
                group_sums[label] = float(torch.dot(carried, carried))
                carried.zero_()
                carried_label = None
        start = stop

    blocks = module_blocks(layout.names)
    block_sq_norms = {block: sum(param_sq[name] for name in names) for block, names in blocks.items()}
    if group.is_distributed:
        if reducer is not None:
            reducer.finish_remaining()
            group_sums = reducer.sq_norms
        group.sum_(sum_gradient)
        group.sum_(sum_squares)
        block_sq_norms = {block: group.gather_rows(values) for block, values in block_sq_norms.items()}
        num_examples = objective.total_samples
    return GradientSums(
        num_examples=num_examples,
        sum_gradient=sum_gradient,
        sum_squares=sum_squares,
        sq_norms=sum(block_sq_norms.values()),
        block_sq_norms=block_sq_norms,
        group_sq_norm_of_sum=group_sums,
        methods=plan.methods(),
        chunk_size=chunk_size,
        num_chunks=num_chunks,
        bytes_per_example=bytes_per_example,
        notes=tuple(plan.notes),
        single_chunk=(last_terms, torch.argsort(order)) if num_chunks == 1 and not group.is_distributed else None,
    )


class _GroupSumReducer:
    """Adds each group's gradient sum over the ranks and keeps its squared norm.

    The ranks visit their examples sorted by group, so every rank reduces the groups in the
    ascending order of ``labels``, the labels of every rank. A group that a rank does not hold
    gets a zero vector from it.
    """

    def __init__(self, group: SingleProcess, labels: list[int], dim: int, device: torch.device) -> None:
        self.group = group
        self.labels = labels
        self.dim = dim
        self.device = device
        self.position = 0
        self.sq_norms: dict[int, float] = {}

    def finish(self, label: int, local_sum: torch.Tensor) -> None:
        """Reduce every group before ``label`` that this rank does not hold, then ``label``'s sum."""
        while self.labels[self.position] != label:
            self._reduce(self.labels[self.position], None)
        self._reduce(label, local_sum.clone())

    def finish_remaining(self) -> None:
        while self.position < len(self.labels):
            self._reduce(self.labels[self.position], None)

    def _reduce(self, label: int, local_sum: torch.Tensor | None) -> None:
        if local_sum is None:
            local_sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        total = self.group.sum_(local_sum)
        self.sq_norms[label] = float(torch.dot(total, total))
        self.position += 1


def _reduce_segment_sums(
    terms: _ChunkTerms,
    layout: Any,
    segments: list[tuple[int, int]],
    start: int,
    group_of: list[int],
    num_examples: int,
    carried: torch.Tensor,
    reducer: _GroupSumReducer,
    room: int | None,
) -> torch.Tensor:
    """Add each segment's gradient sum to ``carried`` and reduce a group's sum where it ends.

    Up to ``room`` bytes of segment sums are formed at once. Returns the vector carried into
    the next chunk, the partial sum of a group that goes on there.
    """
    per_batch = len(segments) if room is None else max(1, room // (8 * layout.dim))
    for first in range(0, len(segments), per_batch):
        batch = segments[first : first + per_batch]
        stacked = terms.segment_sums([(a - start, b - start) for a, b in batch])
        for row, (segment_start, segment_stop) in enumerate(batch):
            carried += layout.flatten({name: part[row] for name, part in stacked.items()})
            label = group_of[segment_start]
            if not (segment_stop < num_examples and group_of[segment_stop] == label):
                reducer.finish(label, carried)
                carried.zero_()
    return carried


def gradient_gram(
    objective: Objective, indices: torch.Tensor, plan: GradientPlan, sums: GradientSums | None = None
) -> torch.Tensor:
    """Return the float64 Gram matrix G_ij = g_i . g_j of the examples at ``indices``.

    When ``sums`` kept the terms of a single chunk, the Gram matrix comes from them. Otherwise
    the examples are processed in one batch, so the caller bounds their number by the memory
    budget (see :func:`gram_bytes_per_example`). Split over several processes, ``indices``
    count in the whole analysis set, and each rank forms the gradients of its own examples,
    which every rank then gathers.
    """
    if objective.group.is_distributed:
        return _gathered_gram(objective, indices, plan)
    if sums is not None and sums.single_chunk is not None:
        terms, row_of = sums.single_chunk
        return terms.gram(row_of[indices.cpu()].to(terms.losses.device))
    terms = _verified_terms(objective, plan, indices)
    return terms.gram(torch.arange(len(indices), device=terms.losses.device))


def _gathered_gram(objective: Objective, indices: torch.Tensor, plan: GradientPlan) -> torch.Tensor:
    """Return the Gram matrix of examples spread over the ranks, from their gathered gradients."""
    group = objective.group
    local = indices.cpu() - objective.sample_offset
    mine = (local >= 0) & (local < objective.num_samples)
    positions = torch.nonzero(mine).flatten()
    if len(positions):
        rows = per_example_gradients(objective, local[mine].to(objective.device), method=plan.other_method).double()
    else:
        rows = torch.zeros(0, objective.dim, dtype=torch.float64, device=objective.device)
    gathered = group.gather_rows(rows)
    order = group.gather_rows(positions.to(objective.device))
    ordered = torch.empty_like(gathered)
    ordered[order] = gathered
    return (ordered @ ordered.T).cpu()


def gram_bytes_per_example(objective: Objective, plan: GradientPlan) -> int:
    """Estimate the bytes that one example adds to :func:`gradient_gram`."""
    bytes_per_example, _ = estimate_memory(objective, plan)
    materialized = sum(
        objective.point[full].numel()
        for module_name in plan.materialized
        for full in plan.layer_modules[module_name][1].values()
    )
    materialized += sum(objective.point[name].numel() for name in plan.other_params)
    return bytes_per_example + 8 * materialized


def per_example_gradients(objective: Objective, indices: torch.Tensor, *, method: str = "vmap") -> torch.Tensor:
    """Return the flat loss gradients of the examples at ``indices`` as rows of a [k, P] matrix.

    ``method`` is ``vmap`` or ``loop``; the result is in the objective's dtype.
    """
    names = list(objective.layout.names)
    inputs, targets = objective.inputs[indices], objective.targets[indices]
    compute = _loop_grads if method == "loop" else _vmap_grads
    grads = compute(objective, names, inputs, targets)
    return torch.cat([grads[name].reshape(len(indices), -1) for name in names], dim=1)


def _chunk_size(num_examples: int, bytes_per_example: int, fixed_bytes: int, budget: int | None) -> int:
    if budget is None:
        return num_examples
    room = budget - fixed_bytes
    if room < bytes_per_example:
        raise MemoryBudgetExceeded(
            fixed_bytes + bytes_per_example,
            budget,
            f"the gradient statistics ({format_bytes(fixed_bytes)} for the sums and "
            f"{format_bytes(bytes_per_example)} per example in a chunk) of one example",
        )
    return max(1, min(num_examples, int(room // bytes_per_example)))


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Return the squared Euclidean norm of each row, without a squared copy of the matrix."""
    return torch.linalg.vector_norm(rows, dim=1).square()


def _segments(group_of: list[int], start: int, stop: int) -> list[tuple[int, int]]:
    """Split positions start..stop of the sorted examples into runs of one group each."""
    runs = []
    run_start = start
    for position in range(start + 1, stop + 1):
        if position == stop or group_of[position] != group_of[run_start]:
            runs.append((run_start, position))
            run_start = position
    return runs


# ---------------------------------------------------------------------------------------------
# Choosing a method per parameter


def make_plan(objective: Objective, method: str = "auto") -> GradientPlan:
    """Choose how each parameter's per-example gradients are computed.

    Forward passes over a probe batch check that the examples are independent and find the
    layer modules that run once on a batch-first input. The first chunk then checks each layer
    rule against autograd before the plan is trusted (see :func:`_verified_terms`).
    """
    if method not in METHODS:
        raise ValueError(f"per-example method {method!r} is unknown; use one of {', '.join(METHODS)}")
    names = list(objective.layout.names)
    plan = GradientPlan(other_params=names)
    candidates = _layer_candidates(objective) if method == "auto" else {}
    records = _probe_forward(objective, plan, candidates)
    if method == "loop":
        plan.other_method = "loop"
        return plan

    probe_size = min(PROBE_EXAMPLES, objective.num_samples)
    for module_name, (module, param_names) in candidates.items():
        record = records[module_name]
        if record.calls == 0:
            plan.unused.extend(param_names.values())
        elif record.calls != 1 or record.inputs is None or record.inputs.shape[0] != probe_size:
            first = None if record.inputs is None else record.inputs.shape[0]
            plan.notes.append(
                f"module {module_name!r} ran {record.calls} times on inputs with first dimension {first} "
                f"for a batch of {probe_size}, so its per-example gradients come from vmap"
            )
        else:
            plan.layer_modules[module_name] = (module, param_names)
            if not (isinstance(module, nn.Linear) and record.inputs.dim() == 2):
                plan.materialized.add(module_name)
    _update_other_params(plan, objective)
    return plan


def _update_other_params(plan: GradientPlan, objective: Objective) -> None:
    covered = {full for _, param_names in plan.layer_modules.values() for full in param_names.values()}
    covered.update(plan.unused)
    plan.other_params = [name for name in objective.layout.names if name not in covered]
    if not plan.other_params or plan.other_method == "loop":
        return
    probe = torch.arange(min(PROBE_EXAMPLES, objective.num_samples))
    try:
        _vmap_grads(objective, plan.other_params, objective.inputs[probe], objective.targets[probe])
    except (RuntimeError, ValueError, NotImplementedError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        plan.other_method = "loop"
        plan.notes.append(
            f"torch.func.vmap cannot run this model ({first_line}), so per-example gradients come "
            "from a loop of single-example backward passes, which is slower"
        )


def _probe_forward(
    objective: Objective, plan: GradientPlan, candidates: dict[str, tuple[nn.Module, dict[str, str]]]
) -> dict[str, Capture]:
    """Check that examples are independent, measure activation bytes and record layer calls.

    The first example's loss must be the same alone as in a batch of PROBE_EXAMPLES; the first
    chunk later repeats the check for the probe examples in a larger batch. BatchNorm in train
    mode, or any layer that mixes the examples of a batch, fails it. The bytes that autograd
    saves in the probe's forward pass, less the parameters and buffers, give the activation
    memory per example. Returns each candidate module's calls in the probe.
    """
    size = min(PROBE_EXAMPLES, objective.num_samples)
    params = {name: objective.point[name].detach().requires_grad_(True) for name in objective.layout.names}
    records = {name: Capture() for name in candidates}
    handles = [
        module.register_forward_hook(recording_hook(records[name], keep_output_grad=False))
        for name, (module, _) in candidates.items()
    ]
    stored = [*objective.point.values(), *objective.frozen.values(), *objective.buffers.values(), objective.inputs]
    try:
        with saved_tensor_meter(exclude=stored) as total:
            losses = objective.per_example_losses(params, objective.inputs[:size], objective.targets[:size]).detach()
    finally:
        for handle in handles:
            handle.remove()
    plan.activation_bytes = total[0] / size
    plan.probe_losses = losses

    try:
        with torch.no_grad():
            alone = objective.per_example_losses(objective.point, objective.inputs[:1], objective.targets[:1])
    except DataError as error:
        # When a single example fails where a larger batch works (BatchNorm in train mode), the
        # examples depend on each other too.
        raise CoupledExamplesError(f"{COUPLED_MESSAGE} ({error})") from None
    if not close_within(alone, losses[:1], PROBE_RTOL.get(objective.dtype, 1e-4)):
        raise CoupledExamplesError(COUPLED_MESSAGE)
    return records


def _layer_candidates(objective: Objective) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    """Find the Linear and Conv modules whose trainable parameters belong to them alone."""
    trainable = set(objective.layout.names)
    owners: dict[int, int] = {}
    for module in objective.model.modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                owners[id(parameter)] = owners.get(id(parameter), 0) + 1

    candidates: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for module_name, module in objective.model.named_modules():
        # Exact types only, because a subclass may override forward.
        if type(module) not in LAYER_TYPES:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            continue
        param_names: dict[str, str] = {}
        shared = False
        for local, parameter in module._parameters.items():
            if parameter is None:
                continue
            shared = shared or owners[id(parameter)] > 1
            full = f"{module_name}.{local}" if module_name else local
            if full in trainable:
                param_names[local] = full
        if param_names and not shared:
            candidates[module_name] = (module, param_names)
    return candidates


def _verified_terms(objective: Objective, plan: GradientPlan, indices: torch.Tensor) -> _ChunkTerms:
    """Compute a chunk's terms, checking the plan's layer rules against autograd the first time.

    A layer module fails the check when its rule's batch sum differs from autograd's batch
    gradient, which happens when its weight is also used outside the module. A rule that forms
    per-example gradients also fails when its norms differ from vmap's on the first examples. A
    parameter taken as unused fails when the loss reaches it. Whatever fails moves to vmap with a
    note, and the chunk is computed again.
    """
    terms, failures = _chunk_terms(objective, plan, indices)
    if plan.verified:
        if failures:
            raise RuntimeError("; ".join(failures.values()))
        return terms
    rtol = PROBE_RTOL.get(objective.dtype, 1e-4)
    count = len(indices)
    if plan.probe_losses is not None:
        in_probe = indices < len(plan.probe_losses)
        if not close_within(terms.losses[in_probe.to(terms.losses.device)], plan.probe_losses[indices[in_probe]], rtol):
            raise CoupledExamplesError(COUPLED_MESSAGE)
    check = indices[: min(PROBE_EXAMPLES, count)]
    for module_name, (module, param_names) in plan.layer_modules.items():
        if module_name in failures:
            continue
        # The module's largest gradient entry is the least scale of every check on it.
        module_scale = max(float(terms.batch_gradient[full].abs().max()) for full in param_names.values())
        for local, full in param_names.items():
            layer_terms, _ = terms.layers[full]
            if not layer_terms.batch_sum_matches(local, terms.batch_gradient[full].double(), rtol, module_scale):
                failures[module_name] = (
                    f"module {module_name!r}: the batch sum of its per-example gradients differs from "
                    "autograd's batch gradient (is its weight also used outside the module?)"
                )
                break
        if module_name in failures or module_name not in plan.materialized:
            continue
        reference = _vmap_grads(objective, list(param_names.values()), objective.inputs[check], objective.targets[check])
        expected_norms = {
            full: _squared_norms(reference[full].double().reshape(len(check), -1)) for full in param_names.values()
        }
        norm_scale = max(float(norms.abs().max()) for norms in expected_norms.values())
        for local, full in param_names.items():
            layer_terms, _ = terms.layers[full]
            if not close_within(layer_terms.sq_norms(local)[: len(check)], expected_norms[full], rtol, norm_scale):
                failures[module_name] = (
                    f"module {module_name!r}: its per-example gradients from inputs and output gradients "
                    "differ from vmap's (is the batch dimension of its input not first?)"
                )
                break
    plan.verified = True
    if not failures:
        return terms
    for key, reason in failures.items():
        plan.notes.append(f"{reason}, so they come from {plan.other_method} instead")
        plan.layer_modules.pop(key, None)
        plan.materialized.discard(key)
        if key in plan.unused:
            plan.unused.remove(key)
    _update_other_params(plan, objective)
    terms, failures = _chunk_terms(objective, plan, indices)
    if failures:
        raise RuntimeError("; ".join(failures.values()))
    return terms


# ---------------------------------------------------------------------------------------------
# One chunk of examples


@dataclass
class _ChunkTerms:
    """Per-example gradient terms of one chunk for every parameter."""

    batch_gradient: dict[str, torch.Tensor]
    layers: dict[str, tuple[LayerTerms, str]]  # full parameter name -> (layer terms, local name)
    others: dict[str, torch.Tensor]  # full parameter name -> [k, *shape] float64
    unused: dict[str, torch.Tensor]  # full parameter name -> zeros shaped like the parameter
    count: int
    losses: torch.Tensor

    def sq_norms(self) -> dict[str, torch.Tensor]:
        result = {name: terms.sq_norms(local) for name, (terms, local) in self.layers.items()}
        result.update({name: _squared_norms(g.reshape(self.count, -1)) for name, g in self.others.items()})
        result.update({name: torch.zeros(self.count, dtype=torch.float64, device=z.device) for name, z in self.unused.items()})
        return result

    def squares(self) -> dict[str, torch.Tensor]:
        result = {name: terms.squares(local) for name, (terms, local) in self.layers.items()}
        result.update({name: (g * g).sum(0) for name, g in self.others.items()})
        result.update(self.unused)
        return result

    def segment_sq_norms(self, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Return the squared norm of the gradient sum over each of the consecutive segments ``bounds``."""
        segments = Segments.from_bounds(bounds, self.losses.device)
        total = torch.zeros(segments.count, dtype=torch.float64, device=self.losses.device)
        for terms, local in self.layers.values():
            total += terms.segment_sq_norms(local, segments)
        for g in self.others.values():
            sums = torch.zeros((segments.count, *g.shape[1:]), dtype=g.dtype, device=g.device)
            sums.index_add_(0, segments.segment_of, g[segments.span])
            total += _squared_norms(sums.reshape(segments.count, -1))
        return total

    def segment_sums(self, bounds: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Return each parameter's gradient sums over consecutive segments ``bounds`` of the chunk,
        stacked along a new first dimension."""
        segments = Segments.from_bounds(bounds, self.losses.device)
        result = {name: terms.segment_sums(local, segments) for name, (terms, local) in self.layers.items()}
        for name, g in self.others.items():
            total = torch.zeros((segments.count, *g.shape[1:]), dtype=g.dtype, device=g.device)
            result[name] = total.index_add_(0, segments.segment_of, g[segments.span])
        for name, zeros in self.unused.items():
            result[name] = zeros.unsqueeze(0).expand(segments.count, *zeros.shape)
        return result

    def gram(self, rows: torch.Tensor) -> torch.Tensor:
        """Return the Gram matrix of the per-example gradients at ``rows`` of this chunk."""
        total = torch.zeros(len(rows), len(rows), dtype=torch.float64)
        for terms, local in self.layers.values():
            total = total + terms.gram(local, rows).cpu()
        for g in self.others.values():
            flat = g[rows].reshape(len(rows), -1)
            total = total + (flat @ flat.T).cpu()
        return total


def _chunk_terms(objective: Objective, plan: GradientPlan, indices: torch.Tensor) -> tuple[_ChunkTerms, dict[str, str]]:
    """Compute a chunk's terms, and the layer modules or unused parameters whose rule failed."""
    inputs, targets = objective.inputs[indices], objective.targets[indices]
    count = len(indices)
    names = objective.layout.names
    captured, batch, unreached, losses = _batch_pass(objective, plan, inputs, targets)
    failures: dict[str, str] = {}
    layers: dict[str, tuple[LayerTerms, str]] = {}
    for module_name, (module, param_names) in plan.layer_modules.items():
        try:
            terms = LayerTerms.from_capture(module, captured[module_name], count)
        except LayerRuleError as error:
            failures[module_name] = f"module {module_name!r} {error}"
            continue
        layers.update({full: (terms, local) for local, full in param_names.items()})
    unused = {}
    for name in plan.unused:
        if name in unreached:
            unused[name] = torch.zeros(objective.point[name].shape, dtype=torch.float64, device=objective.device)
        else:
            failures[name] = f"parameter {name!r} belongs to a module that never ran, but the loss depends on it"
    others: dict[str, torch.Tensor] = {}
    if plan.other_params and not failures:
        compute = _loop_grads if plan.other_method == "loop" else _vmap_grads
        others = {name: g.double() for name, g in compute(objective, plan.other_params, inputs, targets).items()}
    return _ChunkTerms(dict(zip(names, batch)), layers, others, unused, count, losses), failures


def _batch_pass(
    objective: Objective, plan: GradientPlan, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, Capture], list[torch.Tensor], set[str], torch.Tensor]:
    """Run one forward and backward pass over a batch, recording each layer module's input and
    output gradient.

    Returns the captures, the batch gradient (summed over examples), the names of the
    parameters that the loss does not depend on, and the per-example losses.
    """
    names = list(objective.layout.names)
    params = {name: objective.point[name].detach().requires_grad_(True) for name in names}
    captured: dict[str, Capture] = {name: Capture() for name in plan.layer_modules}
    handles = [
        module.register_forward_hook(recording_hook(captured[name])) for name, (module, _) in plan.layer_modules.items()
    ]
    try:
        losses = objective.per_example_losses(params, inputs, targets)
        grads = torch.autograd.grad(losses.sum(), [params[name] for name in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    batch = [g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)]
    unreached = {name for name, g in zip(names, grads) if g is None}
    return captured, batch, unreached, losses.detach()


def _vmap_grads(objective: Objective, names: Sequence[str], inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``names`` by vmap over grad, each shaped [k, *parameter shape]."""
    chosen = set(names)
    fixed = {name: t.detach() for name, t in objective.point.items() if name not in chosen}
    selected = {name: objective.point[name].detach() for name in names}

    def example_loss(params: dict[str, torch.Tensor], example_input: torch.Tensor, example_target: torch.Tensor) -> torch.Tensor:
        outputs = objective.outputs({**fixed, **params}, example_input.unsqueeze(0))
        return objective.loss_fn(outputs, example_target.unsqueeze(0)).sum()

    return vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="error")(selected, inputs, targets)


def _loop_grads(objective: Objective, names: Sequence[str], inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``names`` by one backward pass per example."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    chosen = set(names)
    for index in range(inputs.shape[0]):
        params = {name: t.detach().requires_grad_(name in chosen) for name, t in objective.point.items()}
        loss = objective.per_example_losses(params, inputs[index : index + 1], targets[index : index + 1]).sum()
        grads = torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)
        for name, g in zip(names, grads):
            rows[name].append(g if g is not None else torch.zeros_like(params[name]))
    return {name: torch.stack(rows[name]) for name in names}


def estimate_memory(objective: Objective, plan: GradientPlan) -> tuple[int, int]:
    """Estimate the bytes per example of a chunk and the bytes that do not grow with the chunk."""
    itemsize = torch.finfo(objective.dtype).bits // 8
    activations = max(plan.activation_bytes, 0.0)
    # Saved tensors, the gradients flowing back through them, and the float64 copies of the
    # layer inputs and output gradients.
    per_example = 4 * activations
    for module_name in plan.materialized:
        _, param_names = plan.layer_modules[module_name]
        per_example += 2 * 8 * sum(objective.point[full].numel() for full in param_names.values())
    if plan.other_params and plan.other_method == "vmap":
        other = sum(objective.point[name].numel() for name in plan.other_params)
        per_example += (itemsize + 2 * 8) * other + 2 * activations
    dim = objective.layout.dim
    fixed = 4 * 8 * dim + 2 * itemsize * dim + 8 * objective.num_samples * len(objective.layout.names)
    return math.ceil(MEMORY_SAFETY * per_example), int(fixed)
