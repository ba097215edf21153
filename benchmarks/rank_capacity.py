"""Rank capacity: how much of a full-rank target PLoRA's sum of rank-r updates can represent.

What it measures (and what it does not): the teacher's difference from the student is a
full-rank Gaussian perturbation, so LoRA's share is capped by construction at the best possible
rank-r fit (printed beside it, ``lora_best_possible_rank{r}``), and PLoRA's is what its T rank-r
unloads can accumulate. It shows that PLoRA can build rank beyond r; it says nothing about
learning a real task better (that is ``benchmarks/learning_real.py``).

Setup (CPU, fp32, seeded, one thread). The student is a tiny LLaMA (hidden 64, one block, its seven
linear targets); the teacher is the same model with a full-rank Gaussian perturbation P
added to every target weight (std = ``perturb`` x the weight's own std), so a rank-r adapter cannot
represent the difference but a sum of T rank-r updates can.

The loss is **layer-wise feature distillation**: the teacher runs on random token sequences and
forward hooks record, for every target linear, its input X and output Y = (W + P)·X. The student's
layer (the real peft LoRA layer, or for full fine-tuning the trainable weight) maps the same X,
and the loss is the mean over target layers of ||student(X) - Y||² / ||P·X||², each layer's squared
error normalised by its own initial error on the training pool (so L0 = 1 on that pool, and the
teacher's floor is exactly 0: ΔW = P). Why not the logits: a randomly initialised tiny LLaMA
predicts near-uniform distributions, so the KL of a weight perturbation is tiny (0.004 nats
measured), and an end-to-end output loss lets 7 rank-r adapters jointly mimic the effect of a
full-rank change on a 64-dim output, which hides the per-layer capacity the method is about.
Per-layer regression makes full rank vs low rank matter in every layer, and costs no attention
pass per step (the LLaMA runs once to record X and Y), so the benchmark runs in minutes on a
loaded CPU.

Methods, same steps and the same minibatches: full fine-tuning of the target weights, LoRA rank r,
PLoRA rank r with momentum 0 and 0.1 (unload every ``unload_every`` steps: T = steps /
unload_every unloads, with T·r >= 64 = min(out, in) of every target at rank 1; constant LR, Adam
state reset at each unload, as the method says).

LR: each method's LR is picked by a sweep over ``lr_grid`` (the same grid for every method; with
``--quick`` PLoRA m = 0 reuses the LR chosen for m = 0.1) that is part of the run: the LR with
the lowest loss on a *validation* pool (other sequences) wins; the figures below are on a third,
*test* pool. The whole sweep is in the JSON (``sweep``).

Figures:
* ``gap_closed`` = (L0 - L_final) / (L0 - L_teacher_floor), L_teacher_floor = 0 (the JSON names
  the loss and the floor under ``loss``), on the test pool.
* ``plora_over_lora_rank{r}`` = gap_closed(PLoRA, m = 0.1, the default momentum) /
  gap_closed(LoRA, rank r); the m = 0 ratio is reported beside it.
* ``plora_delta_rank_fraction`` = mean over target layers of effective_rank(ΔW) /
  min(T·r, min(out, in)) for PLoRA (m = 0.1) at rank 1 (where T·r vs d is the point), with
  ``effective_rank`` and the threshold of ``PLoRAConfig().rank_threshold`` (0.01 · σ_max), the one
  definition used everywhere; ΔW is the layer's total learnt update: the backbone's change
  W_now - W_0 plus what the adapter holds now (for LoRA only the adapter). The rank-8 fraction is
  reported beside it.
* ``lora_best_possible_rank{r}``: the gap closed by the optimal rank-r update of each layer,
  computed here, not trained: the loss of a layer is ||(ΔW - P)·X||², so its minimiser of rank r
  is Eckart-Young applied to P·X^T (X^T = U·S·V^T: the best rank-r M_r of M = P·U·S, then
  ΔW = M_r·S^-1·U^T), fitted on the training pool and scored on the test pool like the runs.
  ``lora_eckart_young_P_rank{r}`` is the plain rank-r truncation of P itself, scored the same way
  (the optimum when X is white). LoRA's measured share can at most reach the former.
* ``model_kl_gap_closed`` per run (secondary, end to end): 1 - KL(teacher || student)_final /
  KL_initial of next-token distributions of the whole student model on held-out sequences.
"""

from __future__ import annotations

import copy
import time
from typing import Any, cast

import torch
import torch.nn.functional as F

from benchmarks.common import parse_args, print_table, write_result
from plora_ray.config import (
    LLAMA_LINEAR_TARGETS,
    LoraConfig,
    ModelConfig,
    PLoRAConfig,
    TinyModelConfig,
)
from plora_ray.model import load_model
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora, effective_rank, lora_pairs

VOCAB = 256
LOSS_NAME = "layerwise_normalised_mse"


def settings(quick: bool) -> dict[str, Any]:
    """Benchmark settings; ``quick`` halves the steps per stage (T = 64 unloads either way)."""
    return {
        "seed": 0,
        "hidden": 64,
        "intermediate": 176,
        "layers": 1,
        "length": 32,
        "train_seqs": 48,
        "val_seqs": 16,
        "test_seqs": 16,
        "batch_tokens": 256,
        # T = steps / unload_every = 64 unloads: T·r >= 64 = d at rank 1.
        "steps": 768 if quick else 1536,
        "unload_every": 12 if quick else 24,
        "perturb": 0.5,
        "ranks": [1, 8],
        # One grid for every method, so no method gets a finer search than another.
        "lr_grid": {m: [1e-3, 3e-3, 1e-2, 3e-2] for m in ("full", "lora", "plora")},
    }


def target_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The target linears of a (non-peft) LLaMA, in registration order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEAR_TARGETS
    ]


def make_teacher(base: torch.nn.Module, perturb: float, seed: int) -> torch.nn.Module:
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in target_linears(teacher):
            w = mod.weight
            w.add_(torch.randn(w.shape, generator=g) * perturb * w.std())
    return teacher.eval()


def tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def record_layers(
    teacher: torch.nn.Module, x: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(X, Y) of every target linear of the teacher on token batch ``x``, rows = tokens."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = []
    for _, mod in target_linears(teacher):

        def hook(m: torch.nn.Module, args: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
            out.append((args[0].detach().flatten(0, 1).clone(), y.detach().flatten(0, 1).clone()))

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        teacher(input_ids=x)
    for h in hooks:
        h.remove()
    return out


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student_logits, -1).flatten(0, 1),
        F.log_softmax(teacher_logits, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )


class Task:
    """The pools (train / val / test) of per-layer (X, Y), the normalisers and the eval tokens."""

    def __init__(self, s: dict[str, Any]) -> None:
        tiny = TinyModelConfig(
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"],
        )
        self.base = load_model(
            ModelConfig(tiny=tiny, dtype="float32"), seed=s["seed"], vocab_size=VOCAB
        ).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.teacher = make_teacher(self.base, s["perturb"], s["seed"] + 1)
        # The perturbation P of every target layer: what a student's ΔW would have to be.
        self.perturbations = [
            t.weight.detach() - b.weight.detach()
            for (_, t), (_, b) in zip(target_linears(self.teacher), target_linears(self.base))
        ]
        L = s["length"]
        self.pools = {
            name: record_layers(self.teacher, tokens(n, L, s["seed"] + 10 + i))
            for i, (name, n) in enumerate(
                (("train", s["train_seqs"]), ("val", s["val_seqs"]), ("test", s["test_seqs"]))
            )
        }
        base_w = [m.weight for _, m in target_linears(self.base)]
        # Normaliser per layer: the initial (ΔW = 0) mean squared error on the training pool.
        self.norm = [
            float((y - x @ w.T).pow(2).mean()) for (x, y), w in zip(self.pools["train"], base_w)
        ]
        self.eval_x = tokens(s["test_seqs"], L, s["seed"] + 99)
        with torch.no_grad():
            self.eval_t = self.teacher(input_ids=self.eval_x).logits
        self.rows = self.pools["train"][0][0].shape[0]

    def loss(
        self, layers: list[torch.nn.Module], pool: str, idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        total = torch.zeros(())
        for layer, (x, y), n in zip(layers, self.pools[pool], self.norm):
            if idx is not None:
                x, y = x[idx], y[idx]
            total = total + (layer(x) - y).pow(2).mean() / n
        return total / len(layers)


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart-Young: the best rank-``rank`` approximation of ``matrix`` in Frobenius norm."""
    u, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * sv[:rank]) @ vh[:rank]


def best_rank_r_update(p: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` ΔW minimising ||(ΔW - P)·X^T||_F for inputs ``x`` (rows = tokens).

    With X^T = U·S·V^T (thin SVD), ||(ΔW - P)·X^T||_F = ||(ΔW - P)·U·S||_F, so the optimum is
    M_r·S^-1·U^T with M_r the Eckart-Young truncation of M = P·U·S (S is invertible when there
    are at least ``in`` independent input rows, which the training pool has).
    """
    u, sv, _ = torch.linalg.svd(x.T.double(), full_matrices=False)
    m = p.double() @ u * sv
    return (truncate(m, rank) / sv @ u.T).to(p.dtype)


def fitted_gap_closed(task: Task, updates: list[torch.Tensor]) -> float:
    """Test-pool gap closed by adding ``updates`` (one ΔW per target layer) to the base weights."""
    layers: list[torch.nn.Module] = []
    for (_, mod), d in zip(target_linears(task.base), updates):
        layer = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
        with torch.no_grad():
            layer.weight.copy_(mod.weight + d)
        layers.append(layer)
    with torch.no_grad():
        l0 = float(task.loss([m for _, m in target_linears(task.base)], "test"))
        return (l0 - float(task.loss(layers, "test"))) / (l0 - 0.0)


def run_method(
    task: Task, s: dict[str, Any], method: str, rank: int, momentum: float, lr: float
) -> dict[str, Any]:
    """Train one method; its loss on the val and test pools before/after, and its ΔW ranks."""
    torch.manual_seed(s["seed"])  # peft draws the initial A from the global RNG
    model = copy.deepcopy(task.base)
    if method == "full":
        linears = [m for _, m in target_linears(model)]
        layers: list[torch.nn.Module] = list(linears)
        params: list[torch.Tensor] = [m.weight for m in linears]
        for p in params:
            p.requires_grad_(True)
        w0 = [p.detach().clone() for p in params]
    else:
        model = attach_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank), "lora")
        pairs = lora_pairs(model)
        # peft's LoraLayer is typed as a mixin; every LoRA layer here is a module.
        layers = [cast(torch.nn.Module, p.layer) for p in pairs]
        params = [t for p in pairs for t in (p.A, p.B)]
        w0 = [p.base.detach().clone() for p in pairs]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    plora = None
    if method == "plora":
        cfg = PLoRAConfig(
            unload_every=s["unload_every"],
            unload_unit="steps",
            momentum=momentum,
            rank_sample_layers=0,
        )
        plora = PLoRA(model, cfg, s["batch_tokens"], s["seed"], TorchParamAccess(opt))

    def eval_loss() -> dict[str, float]:
        with torch.no_grad():
            return {pool: float(task.loss(layers, pool)) for pool in ("val", "test")}

    def eval_kl() -> float:
        with torch.no_grad():
            return float(kl(model(input_ids=task.eval_x).logits, task.eval_t))

    l0, k0 = eval_loss(), eval_kl()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(s["seed"] + 7)  # the same minibatches for every method
    for step in range(s["steps"]):
        idx = torch.randint(0, task.rows, (s["batch_tokens"],), generator=g)
        task.loss(layers, "train", idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if plora is not None and plora.due(step + 1, (step + 1) * s["batch_tokens"]):
            plora.unload(step + 1, (step + 1) * s["batch_tokens"])
    seconds = time.perf_counter() - t0
    l1, k1 = eval_loss(), eval_kl()
    thr = PLoRAConfig().rank_threshold
    ranks, dims = [], []
    if method == "full":
        for p, w in zip(params, w0):
            ranks.append(effective_rank(p.detach() - w, thr))
            dims.append(min(p.shape))
    else:
        for pair, w in zip(lora_pairs(model), w0):
            total = pair.base.detach() - w + pair.scaling * pair.B.detach() @ pair.A.detach()
            ranks.append(effective_rank(total, thr))
            dims.append(min(total.shape))
    unloads = plora.num_unloads if plora is not None else 0
    cap = [min(d, max(1, unloads) * rank) if method != "full" else d for d in dims]
    return {
        "method": method,
        "rank": rank if method != "full" else None,
        "momentum": momentum if method == "plora" else None,
        "lr": lr,
        "loss_initial": l0["test"],
        "loss_final": l1["test"],
        # The teacher's floor of this loss is 0 (ΔW = P reproduces Y exactly).
        "gap_closed": (l0["test"] - l1["test"]) / (l0["test"] - 0.0),
        "val_gap_closed": (l0["val"] - l1["val"]) / (l0["val"] - 0.0),
        "model_kl_initial": k0,
        "model_kl_final": k1,
        "model_kl_gap_closed": 1 - k1 / k0,
        "unloads": unloads,
        "mean_effective_rank": sum(ranks) / len(ranks),
        "rank_fraction": sum(r / c for r, c in zip(ranks, cap)) / len(ranks),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    started = time.time()
    s = settings(args.quick)
    task = Task(s)
    configs: list[tuple[str, int, float]] = [("full", 0, 0.0)]
    for r in s["ranks"]:
        configs += [("lora", r, 0.0), ("plora", r, 0.1), ("plora", r, 0.0)]
    sweep: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for method, r, m in configs:
        grid = s["lr_grid"][method]
        if args.quick and method == "plora" and m == 0.0:
            # --quick: the m = 0 variant (not a headline figure) reuses the LR the sweep chose
            # for m = 0.1 at this rank, which saves a quarter of the runs.
            grid = [next(x["lr"] for x in rows if x["method"] == "plora" and x["rank"] == r)]
        trials = [run_method(task, s, method, r, m, lr) for lr in grid]
        for t in trials:
            print(
                f"  {method} r={r} m={m} lr={t['lr']:g}: val gap_closed "
                f"{t['val_gap_closed']:.3f}, test {t['gap_closed']:.3f} ({t['seconds']:.0f} s)",
                flush=True,
            )
        sweep += trials
        # Selected on the validation pool; the figures reported are the test pool's.
        rows.append(max(trials, key=lambda t: t["val_gap_closed"]))
    print_table(
        f"rank capacity (gap_closed = (L0 - L_final) / (L0 - 0), {LOSS_NAME}, test)",
        [
            {
                k: row[k]
                for k in (
                    "method",
                    "rank",
                    "momentum",
                    "lr",
                    "gap_closed",
                    "model_kl_gap_closed",
                    "mean_effective_rank",
                    "rank_fraction",
                    "seconds",
                )
            }
            for row in rows
        ],
    )

    def pick(method: str, r: int | None, m: float | None) -> dict[str, Any]:
        return next(
            x for x in rows if x["method"] == method and x["rank"] == r and x["momentum"] == m
        )

    headline: dict[str, Any] = {}
    for r in s["ranks"]:
        headline[f"plora_over_lora_rank{r}"] = (
            pick("plora", r, 0.1)["gap_closed"] / pick("lora", r, None)["gap_closed"]
        )
    for r in s["ranks"]:
        headline[f"plora_m0_over_lora_rank{r}"] = (
            pick("plora", r, 0.0)["gap_closed"] / pick("lora", r, None)["gap_closed"]
        )
    headline["plora_delta_rank_fraction"] = pick("plora", 1, 0.1)["rank_fraction"]
    headline["plora_delta_rank_fraction_rank8"] = pick("plora", 8, 0.1)["rank_fraction"]
    for r in s["ranks"]:
        headline[f"lora_gap_closed_rank{r}"] = pick("lora", r, None)["gap_closed"]
        headline[f"plora_gap_closed_rank{r}"] = pick("plora", r, 0.1)["gap_closed"]
    headline["full_ft_gap_closed"] = pick("full", None, None)["gap_closed"]
    # LoRA's ceiling: the optimal rank-r ΔW of every layer, computed rather than trained.
    ceiling = []
    for r in s["ranks"]:
        best = fitted_gap_closed(
            task,
            [
                best_rank_r_update(p, x, r)
                for p, (x, _) in zip(task.perturbations, task.pools["train"])
            ],
        )
        plain = fitted_gap_closed(task, [truncate(p, r) for p in task.perturbations])
        headline[f"lora_best_possible_rank{r}"] = best
        headline[f"lora_eckart_young_P_rank{r}"] = plain
        ceiling.append(
            {
                "rank": r,
                "lora_measured": headline[f"lora_gap_closed_rank{r}"],
                "lora_best_possible": best,
                "eckart_young_P": plain,
                "plora_measured": headline[f"plora_gap_closed_rank{r}"],
            }
        )
    print_table("LoRA's measured share beside the best possible rank-r fit (test pool)", ceiling)
    details = {
        "loss": {
            "name": LOSS_NAME,
            "teacher_floor": 0.0,
            "gap_closed": "(L0 - L_final) / (L0 - teacher_floor) on the test pool",
        },
        "settings": s,
        "runs": rows,
        "sweep": sweep,
    }
    return write_result("rank_capacity", args.quick, headline, details, args.out, started)


if __name__ == "__main__":
    main()
