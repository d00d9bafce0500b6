"""`vitpool schedule`: search the pooling schedule that stays closest to the unpooled model at a budget.

The paper took its schedules from PoWER-BERT's learned search; here the search runs on the user's model and
a few unlabelled calibration images. It scores the budget family's schedule (`vitpool.budget`) at the
family's own placement, with the budget's shape (`budget.default_shape`) and the others of `SHAPES`, and without
the family's floor on K (the shape and the floor that keep a model closest depend on the model,
benchmarks/schedule_shape.py), and with 1, 2 and 3 pooling
layers spread evenly (or at the user's `layers`), starts from the best of them, and then moves tokens between
its pooling layers: a move adds `step` tokens to one layer and takes from another as many as keeps the MACs
(pooling layers included) within 1% of the budget, never leaving a layer with every token it receives (such a
layer changes nothing and costs its clustering). Every move of the current step is scored by the mean
KL(unpooled || pooled) on the calibration images (ties: top-1 agreement); the best one is taken while it
improves, then the step halves. Greedy, deterministic, and a few dozen forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vitpool.adapter import apply_pooling, plan_for
from vitpool.budget import TOLERANCE, MacModel, budget_target, default_floor, default_shape, schedule_layers, solve
from vitpool.config import LATE, PoolingConfig, default_layers
from vitpool.errors import VitpoolError
from vitpool.flops import total_macs
from vitpool.evaluate import ImageSet, score

STEPS = (32, 16, 8, 4)
PLACEMENT_COUNTS = (1, 2, 3)  # pooling layers tried, spread as `default_layers` spreads them
SHAPES = (0.8, 1.0, 1.25)  # shapes (`budget.solve`) tried besides the budget's own, at the family's placement
MAX_EVALUATIONS = 80  # checked between rounds of moves: a round is scored whole


@dataclass(frozen=True)
class Scored:
    layers: tuple[int, ...]
    k: tuple[int, ...]
    kl: float
    agreement: float

    def better_than(self, other: "Scored") -> bool:
        return (self.kl, -self.agreement) < (other.kl, -other.agreement)


@dataclass
class SearchResult:
    config: object  # PoolingConfig
    macs: int
    baseline_macs: int
    start: Scored  # the budget family's schedule (`--budget`), or the best placement where it cannot reach the budget
    best: Scored
    evaluations: int
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        c = self.config
        return {
            "method": c.method, "k": list(c.k), "layers": list(c.layers), "iters": c.iters, "output": c.output,
            "proportional": c.proportional, "gmacs": self.macs / 1e9, "mac_ratio": self.macs / self.baseline_macs,
            "baseline_gmacs": self.baseline_macs / 1e9,
            "flags": c.flags(),
            "calibration": {"kl": self.best.kl, "agreement": self.best.agreement},
            "family": {"k": list(self.start.k), "layers": list(self.start.layers), "kl": self.start.kl,
                       "agreement": self.start.agreement},
            "evaluations": self.evaluations, "history": self.history,
        }


def candidate_placements(depth: int, position: str) -> list[tuple[int, ...]]:
    return list(dict.fromkeys(default_layers(min(count, depth - 1), depth, position) for count in PLACEMENT_COUNTS))


def search(model, images: ImageSet, template: PoolingConfig, budget: float | None = None,
           target_gmacs: float | None = None, layers: tuple[int, ...] | None = None,
           on_step: Callable[[str], None] | None = None, family: str = LATE) -> SearchResult:
    """Greedy search over per-layer K within the budget for `template`'s setting (its K and layers are
    ignored), scored on `images` against the unpooled logits, from the best of `family`'s schedule (the budget's
    shape first, then the others of `SHAPES`) and the candidate placements."""
    macs = MacModel(model, template)
    target = budget_target(macs, budget, target_gmacs)
    note = on_step or (lambda text: None)
    scores: dict[tuple[tuple[int, ...], tuple[int, ...]], Scored] = {}

    def evaluate_config(config) -> Scored:
        key = (config.layers, config.k)
        if key not in scores:
            result = score(apply_pooling(model, config), images)
            scores[key] = Scored(config.layers, config.k, result.kl, result.agreement)
            note(f"{len(scores)} schedules scored, K {','.join(map(str, config.k))} after {','.join(map(str, config.layers))}: "
                 f"KL {result.kl:.4f}")
        return scores[key]

    family_placement = schedule_layers(model, template, family, layers)
    placements = [family_placement] if layers else [family_placement] + candidate_placements(macs.depth, template.position)
    own_shape, own_floor = default_shape(family, target / macs.baseline), default_floor(family)
    variants = list(dict.fromkeys([(own_shape, own_floor), *((shape, own_floor) for shape in SHAPES), (own_shape, 0.0)]))
    starts, family_start, problem = [], None, None  # the family schedule at each candidate placement and variant
    for placement in dict.fromkeys(placements):
        for shape, floor in variants if placement == family_placement else variants[:1]:
            try:
                config = solve(model, template, budget, target_gmacs, layers=placement, macs=macs, family=family,
                               shape=shape, floor=floor)[0]
            except VitpoolError as error:  # this placement cannot reach the budget
                problem = error
                continue
            if all(config != earlier for _, earlier, _ in starts):  # a variant that changes nothing, scored once
                starts.append((evaluate_config(config), config, {"shape": shape, "floor": floor}))
            if placement == family_placement and (shape, floor) == variants[0]:
                family_start = starts[-1][0]
    if not starts:
        raise problem
    start, start_config, _ = min(starts, key=lambda scored: (scored[0].kl, -scored[0].agreement))

    def evaluate(k: tuple[int, ...]) -> Scored:
        return evaluate_config(replace(start_config, k=k))

    def valid(k: tuple[int, ...]) -> bool:
        try:
            plan_for(model, replace(start_config, k=k))
        except VitpoolError:
            return False
        return True

    def rebalance(k: list[int], j: int) -> tuple[int, ...] | None:
        """k with k[j] set so that the total comes closest to the target, or None if none lands within 1%; layer j
        keeps fewer tokens than it receives and more than the next layer keeps."""
        options = []
        for value in range(k[j + 1] + 1 if j + 1 < len(k) else 1, k[j - 1] if j else macs.num_patches):
            candidate = tuple(k[:j]) + (value,) + tuple(k[j + 1:])
            if valid(candidate):  # method constraints: tome's half per layer, grid's counts
                options.append(candidate)
        low, high, best = 0, len(options) - 1, None
        while low <= high:  # the total grows with k[j]
            middle = (low + high) // 2
            total = macs.total(replace(start_config, k=options[middle]))
            if best is None or abs(total - target) < abs(best[1] - target):
                best = (options[middle], total)
            if total < target:
                low = middle + 1
            else:
                high = middle - 1
        if best is None or abs(best[1] - target) > TOLERANCE * target:
            return None
        return best[0]

    current = start
    history = [{"k": list(c.k), "layers": list(c.layers), **variant, "kl": scored.kl, "agreement": scored.agreement}
               for scored, c, variant in starts]
    for step in STEPS:
        while len(scores) < MAX_EVALUATIONS:
            moves = []
            for i in range(len(current.k)):
                for j in range(len(current.k)):
                    if i == j:
                        continue
                    k = list(current.k)
                    k[i] += step
                    if k[i] >= (k[i - 1] if i else macs.num_patches):
                        continue
                    moved = rebalance(k, j)
                    if moved is not None and moved != current.k:
                        moves.append(moved)
            candidates = [evaluate(k) for k in dict.fromkeys(moves)]
            best = min(candidates, key=lambda s: (s.kl, -s.agreement), default=None)
            if best is None or not best.better_than(current):
                break
            current = best
            history.append({"k": list(current.k), "layers": list(start_config.layers), "kl": current.kl,
                            "agreement": current.agreement, "step": step})
    config = replace(start_config, k=current.k)
    reached = total_macs(apply_pooling(model, config))
    if abs(reached - target) > TOLERANCE * target:  # the parts model is exact to 0.1%; this guards it
        raise VitpoolError(f"the searched schedule counts {reached / 1e9:.3f} GMACs, not within 1% of {target / 1e9:.3f}")
    return SearchResult(config, reached, macs.baseline, family_start or start, current, len(scores), history)


def calibrate(model, data_dir, template: PoolingConfig, budget: float | None, target_gmacs: float | None,
              family: str = LATE, limit: int = 100, workers: int = 2,
              on_step: Callable[[str], None] | None = None) -> tuple[SearchResult, dict]:
    """`search` on up to `limit` unlabelled images under `data_dir` (a folder of any layout, or a .tar); the result
    and the record of what it was scored on, for the converted model's vitpool.json."""
    from vitpool.data import as_source
    from vitpool.evaluate import load_images

    images = load_images(model, data_dir, limit, workers=workers, labelled=False)
    found = search(model, images, template, budget, target_gmacs, on_step=on_step, family=family)
    record = {"data": as_source(data_dir).location(), "images": len(images.labels), "skipped": images.skipped,
              "budget": budget, "target_gmacs": target_gmacs, "mac_ratio": found.macs / found.baseline_macs,
              "kl": found.best.kl, "agreement": found.best.agreement, "evaluations": found.evaluations,
              "family": {"k": list(found.start.k), "layers": list(found.start.layers), "kl": found.start.kl,
                         "agreement": found.start.agreement}}
    return found, record
