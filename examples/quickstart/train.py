"""Predict the cyclomatic complexity of stdlib functions from control-flow-blind AST features.

Data: one sample per function or method (``def`` / ``async def``) in the running
interpreter's standard library (tests, GUIs, codecs and legacy packages excluded; see
``SKIP_DIRS``). The target is the function's McCabe complexity, computed from its AST
(see :func:`decision_points`). The features (``FEATURE_NAMES``) are sizes and counts of
node types that neither branch nor transfer control: no decision nodes, no comparisons,
no ``return`` / ``raise`` / ``break`` / ``continue``, no nesting depth. The model must
infer how much a function branches from what it computes (calls, names, assignments,
literals, ...); a linear model captures part of that, a small MLP more.

The train/validation split is by source file (a hash of its path), so ``val_*`` measures
generalisation to modules the model has never seen.

The model is an MLP with ``--depth`` hidden ReLU layers of ``--width`` units (numpy, Adam,
mini-batches), seeded by ``--seed``. It regresses ``log1p(complexity)``. Metrics:

* ``val_r2``  -- R^2 on the log1p scale (the optimised scale; not dominated by the few
  giant functions),
* ``val_mae`` -- mean absolute error in complexity units (decision points),
* ``train_loss`` -- mean squared error on the standardised log1p target (epoch mean).

Prints one ``METRICS: {...}`` JSON line per epoch; the last line carries the final values
plus ``n_train``, ``n_val``, ``params``, ``train_r2`` (R^2 on the training functions, for
the train-validation gap that shows overfitting) and ``ridge_val_r2`` (closed-form ridge
regression on the same features: the linear reference an MLP has to beat).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import numpy as np

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Tests, GUIs, generated codecs, vendored and legacy code: not ordinary library functions.
SKIP_DIRS = frozenset({
    "__pycache__", "distutils", "encodings", "ensurepip", "idlelib", "lib2to3", "pydoc_data",
    "site-packages", "dist-packages", "test", "tests", "tkinter", "turtledemo", "unittest",
})
VAL_PERCENT = 25
# Standardised features are clipped to +-FEATURE_CLIP: rare node types (await, global, ...)
# otherwise give z-scores of 30+ on a handful of functions, where a ReLU net extrapolates wildly.
FEATURE_CLIP = 3.0

# Node types counted as features (a tuple counts as one feature). None of them is a
# decision point of the target, a comparison, or a transfer of control.
FEATURE_NODES = (
    ast.Call, ast.Name, ast.Attribute, ast.Constant, ast.Subscript, ast.Slice, ast.Starred,
    ast.BinOp, ast.UnaryOp, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Delete,
    ast.Pass, (ast.Yield, ast.YieldFrom), ast.Await, ast.Lambda, (ast.Global, ast.Nonlocal),
    (ast.Import, ast.ImportFrom), ast.Dict, ast.List, ast.Tuple, ast.Set, ast.JoinedStr,
    ast.keyword,
)
STRUCTURE_FEATURES = (
    "lines", "statements", "args", "defaults", "decorators", "has_docstring", "is_method",
    "is_async",
)
FEATURE_NAMES = tuple(
    "n_" + (t[0] if isinstance(t, tuple) else t).__name__ for t in FEATURE_NODES
) + STRUCTURE_FEATURES

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_FEATURE_INDEX = {t: i for i, ts in enumerate(FEATURE_NODES)
                  for t in (ts if isinstance(ts, tuple) else (ts,))}
_DECISIONS = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler,
              ast.With, ast.AsyncWith, ast.Assert, ast.match_case)


def decision_points(node: ast.AST) -> int:
    """Decision points that ``node`` itself adds to the cyclomatic complexity.

    McCabe complexity of a function = 1 + the sum over the nodes inside it, where

    * +1 per ``if`` / ``elif`` and per conditional expression ``a if c else b``,
    * +1 per ``for`` / ``async for`` / ``while`` loop (their ``else`` clauses add nothing),
    * +1 per ``except`` handler,
    * +1 per ``with`` / ``async with`` (``__exit__`` may swallow an exception) and per
      ``assert`` (may raise),
    * +1 per ``for`` and per ``if`` clause inside a comprehension,
    * +(k - 1) per boolean operation with k operands (``a and b or c`` -> +2),
    * +1 per ``case`` of a ``match``.

    Nested functions and classes are not part of the enclosing function (nested
    functions are samples of their own).
    """
    if isinstance(node, _DECISIONS):
        return 1
    if isinstance(node, ast.comprehension):
        return 1 + len(node.ifs)
    if isinstance(node, ast.BoolOp):
        return len(node.values) - 1
    return 0


class _Function:
    """Running tallies for one function while its module's AST is walked."""

    def __init__(self, node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool):
        self.node, self.is_method = node, is_method
        self.counts = [0] * len(FEATURE_NODES)
        self.statements = 0
        self.complexity = 1

    def features(self) -> list[float]:
        """log1p of the node counts and of the STRUCTURE_FEATURES, in FEATURE_NAMES order."""
        a = self.node.args
        structure = [
            self.node.end_lineno - self.node.lineno + 1,
            self.statements,
            len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg),
            len(a.defaults) + sum(d is not None for d in a.kw_defaults),
            len(self.node.decorator_list),
            ast.get_docstring(self.node) is not None,
            self.is_method,
            isinstance(self.node, ast.AsyncFunctionDef),
        ]
        return np.log1p(np.array(self.counts + structure, dtype=float)).tolist()


def functions_in(tree: ast.Module) -> list[_Function]:
    """Tally every function of a module in one walk; each node counts for its innermost def."""
    found: list[_Function] = []

    def visit(node: ast.AST, func: _Function | None, in_class: bool) -> None:
        if isinstance(node, _FUNCS):
            func = _Function(node, in_class)
            found.append(func)
        elif isinstance(node, ast.ClassDef):
            func = None
        elif func is not None:
            func.complexity += decision_points(node)
            index = _FEATURE_INDEX.get(type(node))
            if index is not None:
                func.counts[index] += 1
            func.statements += isinstance(node, ast.stmt)
        child_in_class = isinstance(node, ast.ClassDef)
        for field in node._fields:
            value = getattr(node, field, None)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child, func, child_in_class)

    visit(tree, None, False)
    return found


def stdlib_files() -> list[Path]:
    """The stdlib's library .py files, sorted (fixed for a given interpreter version)."""
    return [
        path for path in sorted(STDLIB.rglob("*.py"))
        if not any(p in SKIP_DIRS or p.startswith("config-")
                   for p in path.relative_to(STDLIB).parts[:-1])
    ]


def is_val_file(path: Path) -> bool:
    """Split by file on a hash of its stdlib-relative path: stable across runs and machines."""
    digest = hashlib.sha256(path.relative_to(STDLIB).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VAL_PERCENT


def build_dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (x, complexity, is_val), one row per function; files that fail to parse are skipped."""
    rows, targets, val = [], [], []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        in_val = is_val_file(path)
        for func in functions_in(tree):
            rows.append(func.features())
            targets.append(func.complexity)
            val.append(in_val)
    return np.array(rows), np.array(targets, dtype=float), np.array(val)


def load_dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`build_dataset`, cached in the temp dir.

    Parsing the stdlib takes ~5 s, longer than training; every arm and replicate uses the
    same data, so only the first run per interpreter and version of this file pays for it.
    The cache is written atomically, so concurrent runs at worst both build it.
    """
    key = hashlib.sha256(
        sys.version.encode() + str(STDLIB).encode() + Path(__file__).read_bytes()
    ).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"ratiocinator-quickstart-{key}.npz"
    try:
        with np.load(cache) as saved:
            return saved["x"], saved["y"], saved["is_val"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    x, y, is_val = build_dataset()
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, x=x, y=y, is_val=is_val)
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable temp dir only costs speed
    return x, y, is_val


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))


def ridge_r2(x_tr, y_tr, x_va, y_va, alpha: float = 1.0) -> float:
    """Validation R^2 of closed-form ridge regression (unpenalised intercept)."""
    a = np.hstack([x_tr, np.ones((len(x_tr), 1))])
    reg = alpha * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    coef = np.linalg.solve(a.T @ a + reg, a.T @ y_tr)
    return r2(y_va, np.hstack([x_va, np.ones((len(x_va), 1))]) @ coef)


class MLP:
    """``depth`` hidden ReLU layers of ``width`` units and a linear output, trained with Adam."""

    def __init__(self, n_in: int, depth: int, width: int, rng: np.random.Generator):
        sizes = [n_in] + [width] * depth + [1]
        # He initialisation keeps activations at unit scale through the ReLU stack.
        # float32 halves the cost of the matrix products and is ample for this model.
        self.weights = [rng.normal(0.0, np.sqrt(2.0 / a), (a, b)).astype(np.float32)
                        for a, b in zip(sizes, sizes[1:])]
        self.biases = [np.zeros(b, dtype=np.float32) for b in sizes[1:]]
        self.params = self.weights + self.biases
        self._m = [np.zeros_like(p) for p in self.params]
        self._v = [np.zeros_like(p) for p in self.params]
        self._t = 0

    @property
    def n_params(self) -> int:
        return sum(p.size for p in self.params)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Return the predictions and the inputs of every layer (needed for backprop)."""
        acts = [x]
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            acts.append(np.maximum(acts[-1] @ w + b, 0.0))
        return (acts[-1] @ self.weights[-1] + self.biases[-1])[:, 0], acts

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, clip: float = 5.0) -> float:
        """One Adam step on the mean squared error; returns the batch loss."""
        pred, acts = self.forward(x)
        err = pred - y
        delta = (2.0 / len(y)) * err[:, None]
        grads_w, grads_b = [], []
        for i in range(len(self.weights) - 1, -1, -1):
            grads_w.append(acts[i].T @ delta)
            grads_b.append(delta.sum(axis=0))
            if i:
                delta = (delta @ self.weights[i].T) * (acts[i] > 0)
        grads = grads_w[::-1] + grads_b[::-1]
        loss = float(np.mean(np.square(err, dtype=np.float64)))
        norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads))
        if not np.isfinite(norm):
            return loss  # an overflowed gradient (absurd --lr) would turn the weights to NaN
        # Global-norm clipping: one batch of outliers must not blow up the weights.
        scale = min(1.0, clip / (norm + 1e-12))
        self._t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for p, g, m, v in zip(self.params, grads, self._m, self._v):
            g = g * scale
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= lr * (m / (1 - b1 ** self._t)) / (np.sqrt(v / (1 - b2 ** self._t)) + eps)
        return loss


def emit(metrics: dict) -> None:
    print("METRICS: " + json.dumps(metrics), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=1, help="hidden layers")
    parser.add_argument("--width", type=int, default=16, help="units per hidden layer")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="", help="where to write predictions.npz")
    args = parser.parse_args(argv)
    if min(args.depth, args.width, args.epochs, args.batch_size) < 1:
        parser.error("--depth, --width, --epochs and --batch-size must be >= 1")

    x, y_raw, is_val = load_dataset()
    y = np.log1p(y_raw)
    x_tr, y_tr, x_va, y_va = x[~is_val], y[~is_val], x[is_val], y[is_val]
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    x_tr = np.clip((x_tr - mu) / sd, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)
    x_va = np.clip((x_va - mu) / sd, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)
    y_mu, y_sd = y_tr.mean(), y_tr.std()
    z_tr = ((y_tr - y_mu) / y_sd).astype(np.float32)

    rng = np.random.default_rng(args.seed)
    model = MLP(x.shape[1], args.depth, args.width, rng)
    n_batches = max(1, len(x_tr) // args.batch_size)
    for epoch in range(1, args.epochs + 1):
        losses = [model.step(x_tr[idx], z_tr[idx], args.lr)
                  for idx in np.array_split(rng.permutation(len(x_tr)), n_batches)]
        # Clipped to the training range: a wild extrapolation (or a diverged net) scores
        # badly instead of producing inf/NaN metrics.
        pred = np.nan_to_num(model.forward(x_va)[0].astype(np.float64) * y_sd + y_mu)
        pred_va = np.clip(pred, y_tr.min(), y_tr.max())
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_mae": float(np.mean(np.abs(np.expm1(pred_va) - y_raw[is_val]))),
            "val_r2": r2(y_va, pred_va),
        }
        if epoch < args.epochs:
            emit(metrics)
    pred_tr = np.clip(np.nan_to_num(model.forward(x_tr)[0].astype(np.float64) * y_sd + y_mu), y_tr.min(), y_tr.max())
    metrics.update(n_train=len(x_tr), n_val=len(x_va), params=model.n_params, train_r2=r2(y_tr, pred_tr),
                   ridge_val_r2=ridge_r2(x_tr, y_tr, x_va, y_va))
    emit(metrics)

    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        np.savez_compressed(
            os.path.join(args.out_dir, "predictions.npz"),
            val_complexity=y_raw[is_val], val_predicted=np.expm1(pred_va),
            feature_names=np.array(FEATURE_NAMES),
            **{f"weight_{i}": w for i, w in enumerate(model.weights)},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
