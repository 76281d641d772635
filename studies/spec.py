"""study.yaml: schema and parsing, with the line of every key kept for error messages.

    spec = load_spec("study.yaml")                 # SpecError "study.yaml:12: ..." on any problem
    study = spec.study("ablation_tasks")          # SpecError listing the valid names
    (studies.plan.make_plan resolves a study into its trial configs, blaming bad values on their line)

File shape:
    storage: sqlite:///runs/studies.db      # default --storage
    base: {preset: default, set: {...}}      # every study starts here
    studies:
      NAME:
        kind: ablation | tuning
        description: the question it answers
        paper_table: 3                       # where the paper answers it
        metric: final.miou                   # a result.json leaf: the trial's objective
        stage_metric: val.miou               # per-stage value reported to the pruner / dashboard
        direction: maximize | minimize
        set: {...}                           # study-wide overrides
        # ablation
        seeds: [0, 1, 2]                     # or adaptive (studies.sequential):
        #   seeds: {initial: [0, 1, 2], max: 10, rope: 0.5, alpha: 0.05, method: group-sequential | confseq}
        baseline: ROW                        # deltas in the report are against this row
        columns: [Seg., Cls., Sal.]          # optional check-mark column names
        rows: [{label, set, columns: {Seg.: true, ...}, paper: 56.9 | {key: number}}]
        variants: [{label, set, paper?}]     # optional second axis: grid = rows x variants x seeds
        paper_reference: [{label, ...numbers}]  # optional: the paper's own rows, printed as-is
        # tuning
        seed: 0                              # training seed of every trial
        sampler: tpe | random
        sampler_seed: 0
        n_trials: 20
        pruner: median | successive_halving | hyperband | none
        params: {config.key: {type: float|int|categorical, low, high, log, step, choices}}
        confirm: {top: 3, seeds: {initial: [1, 2, 3], max: 8, rope: 0.5, alpha: 0.05}} | false
                                             # the top sets re-run on fresh seeds against the preset's values
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from core.config import ConfigError, make_config
from core.errors import HarnessError
from studies.db import DEFAULT_URL
from studies.sequential import Method, SeedRule

TOP_KEYS = {"storage", "base", "studies"}
BASE_KEYS = {"preset", "set"}
COMMON_KEYS = {"kind", "description", "paper_table", "metric", "stage_metric", "direction", "set"}
ABLATION_KEYS = COMMON_KEYS | {"seeds", "baseline", "columns", "rows", "variants", "paper_reference"}
TUNING_KEYS = COMMON_KEYS | {"seed", "sampler", "sampler_seed", "n_trials", "pruner", "params", "confirm"}
SEED_KEYS = {"initial", "max", "rope", "alpha", "method"}
CONFIRM_KEYS = {"top", "seeds"}
CONFIRM_TOP = 3  # parameter sets re-run on fresh seeds after a tuning study, unless `confirm: false`
CONFIRM_SEEDS, CONFIRM_MAX = 3, 8  # fresh seeds to start with (the first integers other than `seed`), at most
ROW_KEYS = {"label", "set", "columns", "paper", "description"}
VARIANT_KEYS = ROW_KEYS - {"columns"}
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices"}
METRICS = ("final.miou", "final.miou_post", "initial_pgt.miou", "initial_pgt.precision", "initial_pgt.recall")
STAGE_METRICS = ("val.miou", "val.miou_post", "pgt.miou", "pgt.precision", "pgt.recall")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "hyperband", "none")


class SpecError(HarnessError, ValueError):
    """A bad study.yaml or command line; the message is one line ("file:line: what")."""


# ------------------------------------------------------------------------ YAML with line numbers
def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = path + (k.value,)
            lines[key] = k.start_mark.line + 1
            _index_lines(v, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, path + (i,), lines)


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass
class SourceLines:
    file: str
    lines: dict[tuple, int]

    def err(self, path: tuple, msg: str) -> SpecError:
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        where = f"{self.file}:{line}" if line else self.file
        what = f"{_path_str(path)}: " if path else ""
        return SpecError(f"{where}: {what}{msg}".replace("\n", " "))


# ---------------------------------------------------------------------------------- the schema
class StudyKind(StrEnum):
    """What a study is: a grid (rows x variants x seeds, each point run once) or an Optuna search."""

    ABLATION = "ablation"
    TUNING = "tuning"

    @property
    def is_grid(self) -> bool:
        """Its trials are grid points (row, variant, seed), not sampled parameter sets."""
        return self is StudyKind.ABLATION


@dataclass(frozen=True)
class Row:
    """One row of an ablation table: a labelled set of overrides, its check-mark cells, the paper's figure."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)  # its `set:` mapping
    columns: dict[str, Any] = field(default_factory=dict)
    paper: Any = None
    description: str = ""


@dataclass(frozen=True)
class Variant:
    """The grid's second axis (Table 6: baseline / full per saliency model): overrides on top of a row."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)  # its `set:` mapping
    paper: Any = None
    description: str = ""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def distribution(self):
        import optuna.distributions as d

        if self.type == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(list(self.choices))


@dataclass(frozen=True)
class Confirm:
    """A tuning study's confirmation: its `top` best parameter sets re-run on fresh seeds, each paired against
    the preset's own values (the baseline row), under the adaptive rule `rule` (studies.sequential)."""

    top: int
    rule: SeedRule


@dataclass(frozen=True)
class Study:
    name: str
    kind: StudyKind
    description: str
    paper_table: Any
    metric: str
    stage_metric: str
    direction: str
    overrides: dict[str, Any]  # the study's `set:` mapping
    seeds: tuple[int, ...] = ()  # every seed a row may get (adaptive: the initial ones, then up to max)
    adaptive: SeedRule | None = None  # `seeds: {initial, max, ...}`: seeds added per row (studies.sequential)
    baseline: str | None = None
    columns: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    variants: tuple[Variant, ...] = ()
    paper_reference: tuple = ()
    seed: int = 0
    sampler: str = "tpe"
    sampler_seed: int = 0
    n_trials: int = 20
    pruner: str = "median"
    params: tuple[Param, ...] = ()
    confirm: Confirm | None = None  # tuning: the top sets confirmed on fresh seeds (None: `confirm: false`)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the study's YAML mapping
    lines: dict = field(default_factory=dict, compare=False, repr=False)  # YAML path -> line (for blame)


@dataclass(frozen=True)
class Spec:
    path: str
    storage: str
    preset: str
    base_overrides: dict[str, Any]  # base.set
    studies: dict[str, Study]

    def study(self, name: str) -> Study:
        if name not in self.studies:
            raise SpecError(f"{self.path}: unknown study {name!r} (valid: {', '.join(self.studies)})")
        return self.studies[name]


# ------------------------------------------------------------------------------------ parsing
def _expect(ctx: SourceLines, path: tuple, value: Any, typ: type | tuple, what: str) -> Any:
    if not isinstance(value, typ) or (typ in (int, float, (int, float)) and isinstance(value, bool)):
        raise ctx.err(path, f"expected {what}, got {value!r}")
    return value


def _keys(ctx: SourceLines, path: tuple, d: Any, allowed: set[str], required: tuple = ()) -> dict:
    _expect(ctx, path, d, dict, "a mapping")
    for k in d:
        if k not in allowed:
            raise ctx.err(path + (k,), f"unknown key {k!r} (allowed: {', '.join(sorted(allowed))})")
    for k in required:
        if k not in d:
            raise ctx.err(path, f"missing key {k!r}")
    return d


def _set(ctx: SourceLines, path: tuple, d: Any) -> dict[str, Any]:
    if d is None:
        return {}
    _expect(ctx, path, d, dict, "a mapping of config keys to values")
    return {str(k): v for k, v in d.items()}


def _label(ctx: SourceLines, path: tuple, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)) or str(v) == "":
        raise ctx.err(path, f"expected a non-empty label, got {v!r}")
    return str(v)


def _rows(
    ctx: SourceLines, path: tuple, items: Any, columns: tuple[str, ...], variants: bool = False
) -> tuple[Row, ...] | tuple[Variant, ...]:
    _expect(ctx, path, items, list, "a list of {label, set} entries")
    if not items:
        raise ctx.err(path, "needs at least one entry")
    out, seen = [], set()
    for i, r in enumerate(items):
        p = path + (i,)
        _keys(ctx, p, r, VARIANT_KEYS if variants else ROW_KEYS, ("label",))
        label = _label(ctx, p + ("label",), r["label"])
        if label in seen:
            raise ctx.err(p + ("label",), f"duplicate label {label!r}")
        seen.add(label)
        cols = r.get("columns") or {}
        _expect(ctx, p + ("columns",), cols, dict, "a mapping of column name to value")
        for c in cols:
            if columns and c not in columns:
                raise ctx.err(
                    p + ("columns", c), f"unknown column {c!r} (study columns: {', '.join(columns)})"
                )
        paper = r.get("paper")
        if paper is not None and not isinstance(paper, (int, float, dict)) or isinstance(paper, bool):
            raise ctx.err(p + ("paper",), f"expected a number or a mapping of numbers, got {paper!r}")
        if isinstance(paper, dict):  # {0: 64.1} in YAML, {"0": 64.1} once stored as JSON: one form
            paper = {str(k): v for k, v in paper.items()}
        common = dict(
            label=label,
            overrides=_set(ctx, p + ("set",), r.get("set")),
            paper=paper,
            description=str(r.get("description", "")),
        )
        out.append(Variant(**common) if variants else Row(**common, columns=dict(cols)))
    return tuple(out)


def _param(ctx: SourceLines, path: tuple, name: str, d: Any) -> Param:
    _keys(ctx, path, d, PARAM_KEYS, ("type",))
    typ = d["type"]
    if typ not in ("float", "int", "categorical"):
        raise ctx.err(path + ("type",), f"type must be float, int or categorical, got {typ!r}")
    if typ == "categorical":
        ch = d.get("choices")
        if not isinstance(ch, list) or not ch:
            raise ctx.err(path + ("choices",), "categorical needs a non-empty list 'choices'")
        if set(d) - {"type", "choices"}:
            raise ctx.err(path, "categorical takes only 'choices'")
        return Param(name, typ, choices=tuple(ch))
    if "choices" in d:
        raise ctx.err(path + ("choices",), f"'choices' is only for categorical, not {typ}")
    for k in ("low", "high"):
        if k not in d:
            raise ctx.err(path, f"missing key {k!r}")
        _expect(
            ctx,
            path + (k,),
            d[k],
            int if typ == "int" else (int, float),
            "an integer" if typ == "int" else "a number",
        )
        if not math.isfinite(d[k]):
            raise ctx.err(path + (k,), f"must be finite, got {d[k]!r}")
    low, high, log = d["low"], d["high"], d.get("log", False)
    _expect(ctx, path + ("log",), log, bool, "true/false")
    if low >= high:
        raise ctx.err(path, f"low ({low}) must be < high ({high})")
    if log and low <= 0:
        raise ctx.err(path + ("low",), f"log scale needs low > 0, got {low}")
    step = d.get("step")
    if step is not None:
        _expect(ctx, path + ("step",), step, (int, float), "a number")
        if step <= 0:
            raise ctx.err(path + ("step",), f"step must be > 0, got {step}")
        if log:
            raise ctx.err(path + ("step",), "step cannot be combined with log: true")
    return Param(
        name,
        typ,
        float(low) if typ == "float" else int(low),
        float(high) if typ == "float" else int(high),
        bool(log),
        step,
    )


def _seed_list(ctx: SourceLines, path: tuple, seeds: Any, least: int = 1) -> tuple[int, ...]:
    _expect(ctx, path, seeds, list, "a list of integer seeds")
    if len(seeds) < least:
        raise ctx.err(path, f"needs at least {least} seed{'' if least == 1 else 's'}")
    for i, s in enumerate(seeds):
        _expect(ctx, path + (i,), s, int, "an integer seed")
    if len(set(seeds)) != len(seeds):
        raise ctx.err(path, f"duplicate seed in {seeds}")
    return tuple(seeds)


def _seed_rule(ctx: SourceLines, path: tuple, d: Any, default_initial: tuple[int, ...] = ()) -> SeedRule:
    """`{initial: [0, 1, 2], max: 10, rope: 0.5, alpha: 0.05, method: group-sequential}`: rope in percent
    points, alpha family-wise, method group-sequential (default) or confseq."""
    _keys(ctx, path, d, SEED_KEYS, () if default_initial else ("initial", "max"))
    initial = (
        _seed_list(ctx, path + ("initial",), d["initial"], least=2) if "initial" in d else default_initial
    )
    n_max = d.get("max", CONFIRM_MAX)
    _expect(ctx, path + ("max",), n_max, int, "an integer (the most seeds a row gets)")
    if n_max < len(initial):
        raise ctx.err(path + ("max",), f"max ({n_max}) must be >= the {len(initial)} initial seeds")
    rope, alpha = d.get("rope", 0.5), d.get("alpha", 0.05)
    _expect(ctx, path + ("rope",), rope, (int, float), "a number of percent points")
    if not (math.isfinite(rope) and rope > 0):
        raise ctx.err(path + ("rope",), f"rope must be > 0 percent points, got {rope!r}")
    _expect(ctx, path + ("alpha",), alpha, (int, float), "a number")
    if not 0 < alpha < 1:
        raise ctx.err(path + ("alpha",), f"alpha must be in (0, 1), got {alpha!r}")
    method = d.get("method", str(Method.GROUP_SEQUENTIAL))
    if method not in set(Method):
        raise ctx.err(path + ("method",), f"method must be one of {', '.join(Method)}, got {method!r}")
    return SeedRule(initial, n_max, float(rope), float(alpha), Method(method))


def _confirm(ctx: SourceLines, path: tuple, d: Any, seed: int) -> Confirm | None:
    """A tuning study's `confirm`: false, or {top, seeds}; absent = top 3 on 3 fresh seeds, at most 8."""
    if d is False:
        return None
    fresh = tuple(range(seed + 1, seed + 1 + CONFIRM_SEEDS))  # the search trained on `seed` only
    if d is None or d is True:
        return Confirm(CONFIRM_TOP, SeedRule(fresh, CONFIRM_MAX))
    _keys(ctx, path, d, CONFIRM_KEYS)
    top = d.get("top", CONFIRM_TOP)
    _expect(ctx, path + ("top",), top, int, "an integer (parameter sets to confirm)")
    if top < 1:
        raise ctx.err(path + ("top",), f"top must be >= 1, got {top}")
    rule = _seed_rule(ctx, path + ("seeds",), d.get("seeds") or {}, default_initial=fresh)
    if seed in rule.sequence():
        raise ctx.err(path + ("seeds",), f"the search's seed {seed} is not fresh: leave it out of the seeds")
    return Confirm(top, rule)


def _study(ctx: SourceLines, name: str, d: Any) -> Study:
    path = ("studies", name)
    _expect(ctx, path, d, dict, "a mapping")
    if d.get("kind") not in [k.value for k in StudyKind]:
        kinds = " or ".join(f"'{k}'" for k in StudyKind)
        raise ctx.err(path + ("kind",), f"kind must be {kinds}, got {d.get('kind')!r}")
    kind = StudyKind(d["kind"])
    _keys(
        ctx,
        path,
        d,
        ABLATION_KEYS if kind.is_grid else TUNING_KEYS,
        ("rows", "seeds") if kind.is_grid else ("params",),
    )
    metric = d.get("metric", "final.miou")
    if metric not in METRICS:
        raise ctx.err(path + ("metric",), f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    stage_metric = d.get("stage_metric", "val.miou")
    if stage_metric not in STAGE_METRICS:
        raise ctx.err(
            path + ("stage_metric",),
            f"stage_metric must be one of {', '.join(STAGE_METRICS)}, got {stage_metric!r}",
        )
    direction = d.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ctx.err(path + ("direction",), f"direction must be maximize or minimize, got {direction!r}")
    common = dict(
        name=name,
        kind=kind,
        description=str(d.get("description", "")),
        paper_table=d.get("paper_table"),
        metric=metric,
        stage_metric=stage_metric,
        direction=direction,
        overrides=_set(ctx, path + ("set",), d.get("set")),
        raw=dict(d),
        lines=ctx.lines,
    )
    if kind.is_grid:
        adaptive = None
        if isinstance(d["seeds"], dict):
            adaptive = _seed_rule(ctx, path + ("seeds",), d["seeds"])
            seeds = list(adaptive.sequence())
        else:
            seeds = list(_seed_list(ctx, path + ("seeds",), d["seeds"]))
        columns = d.get("columns") or []
        _expect(ctx, path + ("columns",), columns, list, "a list of column names")
        columns = tuple(str(c) for c in columns)
        rows = _rows(ctx, path + ("rows",), d["rows"], columns)
        variants = (
            _rows(ctx, path + ("variants",), d["variants"], (), variants=True) if "variants" in d else ()
        )
        baseline = d.get("baseline", rows[0].label)
        if str(baseline) not in [r.label for r in rows]:
            raise ctx.err(
                path + ("baseline",),
                f"baseline {baseline!r} is not a row label ({', '.join(r.label for r in rows)})",
            )
        ref = d.get("paper_reference") or []
        _expect(ctx, path + ("paper_reference",), ref, list, "a list of mappings")
        if adaptive is not None and (variants or len(rows) < 2):
            why = "a study with variants" if variants else "a single row (nothing to compare)"
            raise ctx.err(path + ("seeds",), f"adaptive seeds ({{initial, max}}) are not supported for {why}")
        return Study(
            **common,
            seeds=tuple(seeds),
            adaptive=adaptive,
            baseline=str(baseline),
            columns=columns,
            rows=rows,
            variants=variants,
            paper_reference=tuple(ref),
        )
    params = _expect(ctx, path + ("params",), d["params"], dict, "a mapping of config key to distribution")
    if not params:
        raise ctx.err(path + ("params",), "needs at least one parameter")
    sampler = d.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ctx.err(path + ("sampler",), f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    pruner = d.get("pruner", "median")
    if pruner not in PRUNERS:
        raise ctx.err(path + ("pruner",), f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    n_trials = d.get("n_trials", 20)
    _expect(ctx, path + ("n_trials",), n_trials, int, "an integer")
    if n_trials < 1:
        raise ctx.err(path + ("n_trials",), f"n_trials must be >= 1, got {n_trials}")
    for k in ("seed", "sampler_seed"):
        _expect(ctx, path + (k,), d.get(k, 0), int, "an integer")
    _expect(ctx, path + ("confirm",), d.get("confirm"), (dict, bool, type(None)), "false or {top, seeds}")
    return Study(
        **common,
        seed=d.get("seed", 0),
        sampler=sampler,
        sampler_seed=d.get("sampler_seed", 0),
        n_trials=n_trials,
        pruner=pruner,
        params=tuple(_param(ctx, path + ("params", str(k)), str(k), v) for k, v in params.items()),
        confirm=_confirm(ctx, path + ("confirm",), d.get("confirm"), d.get("seed", 0)),
    )


def parse_spec(text: str, path: str = "study.yaml") -> Spec:
    """Parse and check the file's shape (config values are checked by Spec.plan)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, ctx_mark = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else (f"{path}:{ctx_mark.line + 1}" if ctx_mark else path)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        if context and ctx_mark is not None and mark is not None and ctx_mark.line != mark.line:
            problem += f" ({context} at line {ctx_mark.line + 1})"
        raise SpecError(f"{where}: malformed YAML: {problem}".replace("\n", " ")) from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    ctx = SourceLines(path, lines)
    if data is None:
        raise SpecError(f"{path}: empty file (expected 'studies:')")
    _keys(ctx, (), data, TOP_KEYS, ("studies",))
    storage = data.get("storage", DEFAULT_URL)
    _expect(ctx, ("storage",), storage, str, "a database URL")
    base = data.get("base") or {}
    _keys(ctx, ("base",), base, BASE_KEYS)
    preset = base.get("preset", "default")
    _expect(ctx, ("base", "preset"), preset, str, "a preset name")
    base_overrides = _set(ctx, ("base", "set"), base.get("set"))
    try:
        make_config(preset, base_overrides)
    except ConfigError as e:
        raise ctx.err(("base", "set") if "preset" not in str(e) else ("base", "preset"), str(e)) from None
    studies = data["studies"]
    _expect(ctx, ("studies",), studies, dict, "a mapping of study name to study")
    if not studies:
        raise ctx.err(("studies",), "no studies defined")
    return Spec(
        path, storage, preset, base_overrides, {str(k): _study(ctx, str(k), v) for k, v in studies.items()}
    )


# What the store adds to a study's mapping (studies.optuna_adapter.study_spec_record and
# studies.plan.confirm_plan): the last run's --set / --study-file and its name ("_" keys), and which
# study a confirmation confirms.
STORED_ONLY_KEYS = {"confirms"}


def study_from_record(name: str, record: dict) -> Study:
    """The Study of a mapping stored with the study in the results store (its study.yaml mapping, as
    studies.run stored it), parsed and defaulted exactly as from the file; SpecError if it no longer parses
    (a store written by an older harness)."""
    d = {k: v for k, v in record.items() if not str(k).startswith("_") and k not in STORED_ONLY_KEYS}
    return _study(SourceLines("its stored definition", {}), name, d)


def load_spec(path: str | Path = "study.yaml") -> Spec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{p}: cannot read study file ({e.strerror})") from None
    return parse_spec(text, str(path))
