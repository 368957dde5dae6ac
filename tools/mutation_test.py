"""A mutation score you can rerun: small AST mutations of bamboo's source, each run against the tests that cover
its package; a mutant the tests still pass on is a line no test pins down.

    python tools/mutation_test.py --packages bamboo/passes bamboo/ops bamboo/kernels bamboo/onnx \\
        --sample 60 --seed 0 --json mutants.json --jobs 1

Mutants run on a copy of the tree in a temporary directory (the real files are never written: an interrupted run
leaves no mutant behind), without bytecode (a same-size mutant written in the same second would otherwise run a
stale .pyc), with `pytest -x -q` and a timeout. Operators: comparison flips (== !=, < <=, > >=, is, in), and <-> or,
negated conditions, `not x` -> x, numeric constants (0 <-> 1, n -> n + 1, True <-> False), + <-> -, * <-> /,
a statement-level call dropped, and name swaps (min/max, amin/amax, any/all, ...). A line ending in
`# no mutate` is skipped.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = ["bamboo/passes", "bamboo/ops", "bamboo/kernels", "bamboo/onnx"]
# The tests that cover each source path (the longest matching prefix wins); fast files first, since -x stops at the
# first failure and most mutants die early.
TESTS = {
    "bamboo/passes": ["tests/passes", "tests/test_api.py", "tests/test_differential.py"],
    "bamboo/ops": ["tests/ops", "tests/kernels", "tests/test_api.py", "tests/test_differential.py"],
    "bamboo/ops/sparse_ffn_onnx.py": ["tests/onnx/test_sparse_ffn_onnx.py", "tests/onnx/test_optimize.py",
                                      "tests/onnx/test_tensorrt_profile.py", "tests/onnx/test_export_onnx.py"],
    "bamboo/kernels": ["tests/kernels"],
    "bamboo/onnx": ["tests/onnx/test_optimize.py", "tests/onnx/test_tensorrt_profile.py",
                    "tests/onnx/test_sparse_ffn_onnx.py", "tests/onnx/test_export_onnx.py"],
}
SWAPS = {"min": "max", "max": "min", "amin": "amax", "amax": "amin", "minimum": "maximum", "maximum": "minimum",
         "any": "all", "all": "any", "argmin": "argmax", "argmax": "argmin", "clamp_min": "clamp_max",
         "clamp_max": "clamp_min", "zeros": "ones", "ones": "zeros", "zeros_like": "ones_like",
         "ones_like": "zeros_like"}
COMPARE_FLIPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
                 ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BINOP_FLIPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}


@dataclass
class Mutant:
    path: str          # relative to the root
    line: int
    col: int
    end_line: int
    end_col: int
    operator: str
    original: str      # source text of the mutated node
    replacement: str   # its replacement
    status: str = "pending"  # killed | survived | timeout | error
    seconds: float = 0.0

    def describe(self) -> str:
        def short(text):
            first = text.splitlines()[0] if text else text
            return first[:90] + (" ..." if first != text or len(first) > 90 else "")

        return f"{self.path}:{self.line}  [{self.operator}]  {short(self.original)}  ->  {short(self.replacement)}"


def _segment(lines: list[bytes], node) -> str:
    """The node's source (AST columns count UTF-8 bytes)."""
    if node.lineno == node.end_lineno:
        return lines[node.lineno - 1][node.col_offset:node.end_col_offset].decode()
    parts = [lines[node.lineno - 1][node.col_offset:]] + lines[node.lineno:node.end_lineno - 1]
    return b"".join(parts + [lines[node.end_lineno - 1][:node.end_col_offset]]).decode()


def _docstring_nodes(tree) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first))
    return out


def _annotation_nodes(tree) -> set:
    """Nodes inside type annotations: mutating them changes nothing at run time."""
    out = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
            args = node.args
            annotations += [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs]
            annotations += [a.annotation for a in (args.vararg, args.kwarg) if a is not None]
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for a in annotations:
            if a is not None:
                out.update(id(n) for n in ast.walk(a))
    return out


def mutations_of_source(source: str, path: str = "<snippet>") -> list[Mutant]:
    """Every mutant of one file's source."""
    tree = ast.parse(source)
    lines = source.encode().splitlines(keepends=True)
    skip = _docstring_nodes(tree) | _annotation_nodes(tree)
    out = []

    def add(node, operator, replacement):
        if node.lineno - 1 < len(lines) and lines[node.lineno - 1].rstrip().endswith(b"# no mutate"):
            return
        original = _segment(lines, node)
        if replacement != original:
            out.append(Mutant(path, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, operator,
                              original, replacement))

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                flip = COMPARE_FLIPS.get(type(op))
                if flip:
                    ops = list(node.ops)
                    ops[i] = flip()
                    add(node, "compare", ast.unparse(ast.Compare(node.left, ops, node.comparators)))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            add(node, "bool_op", ast.unparse(ast.BoolOp(other, node.values)))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_FLIPS:
            if isinstance(node.op, ast.Add) and any(isinstance(v, ast.Constant) and isinstance(v.value, str)
                                                    for v in (node.left, node.right)):
                continue  # string concatenation
            add(node, "arith", ast.unparse(ast.BinOp(node.left, BINOP_FLIPS[type(node.op)](), node.right)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, "drop_not", ast.unparse(node.operand))
        elif isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            test = node.test
            if not (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)):
                add(test, "negate", ast.unparse(ast.UnaryOp(ast.Not(), test)))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str):
            value = node.value
            if isinstance(value, bool):
                add(node, "constant", repr(not value))
            elif isinstance(value, (int, float)) and abs(value) <= 1e6:
                new = {0: 1, 1: 0}.get(value, value + 1) if isinstance(value, int) else \
                    {0.0: 1.0, 1.0: 0.0}.get(value, value * 2 if value else 1.0)
                add(node, "constant", repr(type(value)(new)))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(node, "drop_call", "pass")
        if isinstance(node, ast.Name) and node.id in SWAPS and isinstance(node.ctx, ast.Load):
            add(node, "swap_name", SWAPS[node.id])
        elif isinstance(node, ast.Attribute) and node.attr in SWAPS and isinstance(node.ctx, ast.Load):
            add(node, "swap_name", ast.unparse(ast.Attribute(node.value, SWAPS[node.attr], ast.Load())))
    out.sort(key=lambda m: (m.line, m.col, m.operator, m.replacement))
    return out


def apply(source: str, m: Mutant) -> str:
    lines = source.encode().splitlines(keepends=True)
    start = sum(len(l) for l in lines[:m.line - 1]) + m.col
    end = sum(len(l) for l in lines[:m.end_line - 1]) + m.end_col
    data = source.encode()
    return (data[:start] + m.replacement.encode() + data[end:]).decode()


def tests_for(path: str) -> list[str]:
    best = max((p for p in TESTS if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
    return TESTS[best] if best else []


def collect(packages: list[str], root: Path = ROOT) -> list[Mutant]:
    mutants = []
    for package in packages:
        base = root / package
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for f in files:
            rel = str(f.relative_to(root))
            mutants += mutations_of_source(f.read_text(), rel)
    return mutants


def _copy_tree(root: Path, into: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of the checkout (no caches, no venv)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        src = root / rel
        if src.is_file() and "__pycache__" not in rel:
            dst = into / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return into


_running: dict[int, subprocess.Popen] = {}


def _run_in_own_group(command, cwd, env, timeout: float) -> int:
    """Run pytest in a process group of its own, so a timeout, an interrupt or a kill of this tool also ends
    the test process and whatever it started (compile workers, subprocess tests)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _running[proc.pid] = proc
    try:
        return proc.wait(timeout=timeout)
    except BaseException:  # TimeoutExpired, KeyboardInterrupt, SystemExit from the SIGTERM handler
        _kill_group(proc)
        raise
    finally:
        _running.pop(proc.pid, None)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _kill_all_and_exit(signum, frame):
    for proc in list(_running.values()):
        _kill_group(proc)
    sys.exit(128 + signum)


def run_mutant(m: Mutant, tree: Path, timeout: float, tests: list[str] | None = None) -> Mutant:
    """Write the mutant into `tree` (a copy), run its tests, restore the file."""
    target = tree / m.path
    original = target.read_text()
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
               *(tests if tests is not None else tests_for(m.path))]
    start = time.monotonic()
    try:
        target.write_text(apply(original, m))
        try:
            code = _run_in_own_group(command, tree, env, timeout)
            # pytest: 0 all passed, 1 a test failed, 2 collection failed (the mutant broke an import), 3 internal
            # error, 4 usage error, 5 no tests collected (a bad map from source to tests); a negative code is a
            # signal: the mutant crashed the test process (a kernel writing out of bounds), which the tests saw
            m.status = "killed" if code in (1, 2) or code < 0 else "survived" if code == 0 else "error"
        except subprocess.TimeoutExpired:
            m.status = "timeout"
    finally:
        target.write_text(original)
    m.seconds = time.monotonic() - start
    return m


def report(mutants: list[Mutant]) -> str:
    rows = {}
    for m in mutants:
        module = m.path
        counts = rows.setdefault(module, {"mutants": 0, "killed": 0, "survived": 0, "timeout": 0, "error": 0})
        counts["mutants"] += 1
        counts[m.status] = counts.get(m.status, 0) + 1
    headers = ["module", "mutants", "killed", "survived", "timeout", "error"]
    body = [[k] + [str(v[h]) for h in headers[1:]] for k, v in sorted(rows.items())]
    total = {h: sum(v[h] for v in rows.values()) for h in headers[1:]}
    body.append(["TOTAL"] + [str(total[h]) for h in headers[1:]])
    widths = [max(len(r[i]) for r in body + [headers]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [headers] + body]
    decided = total["killed"] + total["survived"]
    score = total["killed"] / decided if decided else 0.0
    lines.append(f"\nmutation score: {total['killed']}/{decided} = {score:.1%} (timeouts and errors not counted)")
    survivors = [m for m in mutants if m.status == "survived"]
    if survivors:
        lines.append("\nsurvivors:")
        lines += [f"  {m.describe()}" for m in survivors]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", nargs="+", default=DEFAULT_PACKAGES, help="source folders or files")
    parser.add_argument("--sample", type=int, default=0, help="run a random sample of this many mutants (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (each on its own copy)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("--json", default=None, help="write every mutant and its status here")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    args = parser.parse_args(argv)
    mutants = collect(args.packages)
    print(f"{len(mutants)} mutants in {', '.join(args.packages)}", flush=True)
    if args.sample and args.sample < len(mutants):
        mutants = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: (m.path, m.line))
    if args.list:
        for m in mutants:
            print(f"{m.describe()}  tests: {' '.join(tests_for(m.path))}")
        return 0
    signal.signal(signal.SIGTERM, _kill_all_and_exit)  # a killed run leaves no pytest behind
    with tempfile.TemporaryDirectory(prefix="bamboo-mutants-") as tmp:
        trees = [_copy_tree(ROOT, Path(tmp) / f"tree{i}") for i in range(max(args.jobs, 1))]
        free = list(trees)

        def work(item):
            i, m = item
            tree = free.pop()
            try:
                run_mutant(m, tree, args.timeout)
            finally:
                free.append(tree)
            print(f"[{i + 1}/{len(mutants)}] {m.status:8s} {m.seconds:6.1f}s  {m.describe()}", flush=True)
            if args.json:  # written as it goes: a long run can be read before it ends
                Path(args.json).write_text(json.dumps([asdict(x) for x in mutants], indent=1))
            return m

        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            list(pool.map(work, enumerate(mutants)))
    print(report(mutants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
