"""Fidelity cells (``kind = "fidelity"``): a method's gradient against its reference's, on identical weights and
batches, with no optimizer step.

For a method M, an architecture, a dataset and T, the cell takes the weights at initialisation (epoch 0: the
model M builds from the cell's seed, which is the one M's train cell starts from) and at the epochs a train cell
kept (``save_weights_at``, -1 for the last epoch; the train cell of ``trained_by``, default M, with the same architecture, dataset, T,
seed, neuron and architecture options, found among the results folder's rows), draws ``steps`` fixed batches (the
first batches of the training set's first epoch), and computes M's gradient and the reference's
(``reference``, default ``Method.fidelity_reference``: bptt_m, or bptt_s for single-step methods) from the same
weights, BN running statistics included (methods/fidelity.py). M's gradient is scaled by
``Method.gradient_scale()`` (T for rate-BP, whose objective is the loss / T), the reference's by its own, before
they are compared.

Stored: per weights epoch, batch and weight tensor, and over all of them, the cosine similarity and the norm
ratio (DETAILS["fidelity"]); in the row, their means over the batches at initialisation and at the last epoch.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from methods import METHODS, MethodConfig
from methods.fidelity import compare_gradients, method_gradient, weight_names

from reports.results import load_results

from .checkpoint import WEIGHTS, weights_path
from .data import dataset_info, get_loaders
from .cell import LAST_EPOCH, Cell
from .rows import PartClock


class WeightsMissing(RuntimeError):
    """The trained weights a fidelity cell compares at are not (or not unambiguously) in the results folder."""


# what the search for a train cell's weights reads of every stored row
LOOKUP_COLUMNS = ["kind", "status", "method", "arch", "dataset", "T", "seed", "neuron", "train_subset", "arch_options",
                  "key", "epochs"]


def stored_cells(out: Path):
    """What ``trained_weights`` searches: ``LOOKUP_COLUMNS`` of every row stored in ``out``, one file read per cell
    (what a fidelity cell's lookup costs grows with the folder; bench/plan.py predicts it so)."""
    return load_results(out, "cells", columns=LOOKUP_COLUMNS)


def trained_weights(out: Path | None, cell: Cell) -> dict[int, Path]:
    """epoch -> the weights file of the train cell that ``cell`` compares at, for its epochs > 0 (-1: that cell's
    last epoch)."""
    asked = sorted(e for e in cell.weights_at if e != 0)
    if not asked:
        return {}
    trainer = cell.trained_by or cell.method
    named = ", ".join("its last" if e == LAST_EPOCH else str(e) for e in asked)
    want = (f"the weights of the train cell of {trainer} {cell.arch} {cell.dataset} T={cell.T} seed={cell.seed} "
            f"at epoch(s) {named} (save_weights_at)")
    if out is None:
        raise WeightsMissing(f"{want} are read from the results folder: run the cell through run_bench.py")
    same = {"kind": "train", "status": "ok", "method": trainer, "arch": cell.arch, "dataset": cell.dataset,
            "T": cell.T, "seed": cell.seed, "neuron": cell.neuron, "train_subset": cell.train_subset,
            "arch_options": json.dumps(cell.arch_options, sort_keys=True)}
    rows = stored_cells(out)
    if rows.empty:
        raise WeightsMissing(f"{want}: no cell is stored in {out}: run that train cell first")
    sel = rows
    for k, v in same.items():
        sel = sel[sel[k] == v] if k in sel else sel.iloc[0:0]
    found = []
    for key, last in zip(sel["key"], sel["epochs"]):
        epochs = sorted({int(last) if e == LAST_EPOCH else e for e in asked})
        paths = {e: weights_path(out, key, e) for e in epochs}
        if all(p.is_file() for p in paths.values()):
            found.append(paths)
    if not found:
        raise WeightsMissing(f"{want} are not in {Path(out) / WEIGHTS}: run that train cell first, with those epochs "
                             "in its save_weights_at (it runs before the fidelity cells of the same grid)")
    if len(found) > 1:
        raise WeightsMissing(f"{want}: {len(found)} stored train cells match ({', '.join(sorted(sel['key']))}); "
                             "keep one, or give the fidelity cell its own results folder")
    return found[0]


def run_fidelity(cell: Cell, device: torch.device, data_root: str | None, row: dict, out: Path | None,
                 progress=lambda d: None, clock: PartClock | None = None) -> dict[str, list[dict]]:
    """Fill the row's gradient columns; return the cell's details ({"fidelity": rows}). ``clock``: where the time
    goes (the gradients are the cell's measured steps)."""
    clock = clock or PartClock()
    with clock.part("data"):
        info = dataset_info(cell.dataset)  # the caller seeded as a train cell does: the same initial weights
    with clock.part("model"):
        method = METHODS[cell.method](MethodConfig(T=cell.T, neuron=cell.neuron, options=dict(cell.method_options)))
        ref_name = cell.reference or method.fidelity_reference
        reference = METHODS[ref_name](MethodConfig(T=cell.T, neuron=cell.neuron))
        build = dict(num_classes=info.num_classes, in_channels=info.shape[0], input_shape=info.shape,
                     **cell.arch_options)
        model = method.build(cell.arch, **build).to(device)
        states = {0: {k: v.detach().clone() for k, v in model.state_dict().items()}}
    with clock.part("data"):
        train, _ = get_loaders(cell.dataset, cell.batch_size, cell.eval_batch_size, cell.seed, str(device), data_root,
                               cell.train_subset, cell.T, method.event_encoding)
    with clock.part("model"):
        ref_model = reference.build(cell.arch, **build).to(device)
    with clock.part("checkpoint"):
        for e, path in trained_weights(out, cell).items():
            states[e] = torch.load(path, map_location=device, weights_only=True)
    names = weight_names(model)
    if weight_names(ref_model) != names:
        raise ValueError(f"{cell.method}'s and {ref_name}'s models of {cell.arch} differ in their weights: "
                         "their gradients cannot be compared layer by layer")
    with clock.part("data"):
        batches = list(itertools.islice(train.batches(0, 0), cell.steps))
    row.update(fidelity_reference=ref_name, measured_steps=len(batches))
    scale = method.gradient_scale() / reference.gradient_scale()  # both on BPTT's scale
    details, epochs = [], sorted(states) if 0 in cell.weights_at else sorted(e for e in states if e)
    total, done = len(epochs) * len(batches), 0
    for e in epochs:
        for b, (x, y) in enumerate(batches):
            with clock.part("steps"):
                x, y = x.to(device), y.to(device)
                grads = []
                for m, mod in ((method, model), (reference, ref_model)):
                    try:
                        mod.load_state_dict(states[e])
                    except RuntimeError as err:
                        raise ValueError(f"the weights at epoch {e} do not fit {m.name}'s model of {cell.arch}: "
                                         f"{str(err).splitlines()[0]}") from None
                    grads.append(method_gradient(m, mod, x, y))
                details += [{"epoch": e, "batch": b, **r} for r in compare_gradients(grads[0], grads[1], names, scale)]
            done += 1
            progress({"epoch": e, "epochs": max(epochs), "step": done, "steps": total})
    for suffix, e in (("init", 0 if 0 in epochs else None), ("trained", max((e for e in epochs if e > 0), default=None))):
        if e is None:
            continue
        alls = [d for d in details if d["epoch"] == e and d["layer"] == -1]
        for col in ("cosine", "norm_ratio"):
            vals = [d[col] for d in alls if not math.isnan(d[col])]
            row[f"grad_{col}_{suffix}"] = sum(vals) / len(vals) if vals else None
    return {"fidelity": details}
