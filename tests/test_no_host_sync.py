"""No host sync on the hot path.

CPU: an AST check over ``plan.py``, ``ops/``, ``nn/`` and ``kernels/`` for every way Python code makes the host
wait on a device tensor -- ``.item()``, ``bool(t)`` / ``int(t...)`` / ``float(t...)``, ``.tolist()``,
``.cpu()`` / ``.numpy()`` / ``.to("cpu")``, ``nonzero`` / ``argwhere`` / one-argument ``torch.where``,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``, ``torch.equal`` /
``allclose``, ``synchronize``, boolean-mask indexing (``x[ids == m]``, ``x[mask]`` with ``mask`` a comparison),
and tensor reductions used as a condition (``if t.any():``) -- with an explicit allow-list. Bodies of
``@triton.jit`` functions (device code) are not scanned.

GPU: sync-debug mode around a forward and backward, and CUDA-graph capture of ``MoTLinear`` and ``MoTBlock``
forward and backward (capture fails on any sync, including one inside ``sparsemm_kernels._C``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.utils.testing import EPS, Tol, assert_close_verbose

PKG = pathlib.Path(smk.__file__).parent
# The hot path, and utils/checks.py which every op calls (its value checks must stay asynchronous on CUDA).
SCANNED = sorted({PKG / "plan.py", *(PKG / "ops").glob("*.py"), *(PKG / "nn").glob("*.py"),
                  *(PKG / "kernels").rglob("*.py"), PKG / "utils" / "checks.py"})

# Each exception: (file relative to the package, enclosing function, the expression as ast.unparse writes it)
# -> why it is not a device sync. Keyed by name and text, not line numbers, so edits elsewhere do not break it.
ALLOWED = {
    # kernels/cpu.py: launchers of the C++ CPU kernels. Every tensor there is a CPU tensor (checked), and the
    # C++ code trusts what it is given, so values are read on purpose to validate them: no device to wait for.
    ("kernels/cpu.py", "group_plan_cpu", "int(first_bad)"): "a Python int returned by the C++ op",
    ("kernels/cpu.py", "grouped_gemm_cpu", "int(torch.bincount(rows[start:end], minlength=tc).max())"):
        "CPU rows: the one-writer-per-row check before the C++ scatter",
    ("kernels/cpu.py", "grouped_gemm_cpu", "torch.bincount(rows[start:end], minlength=tc)"):
        "CPU rows: the one-writer-per-row check before the C++ scatter",
    ("kernels/cpu.py", "_check_offsets", "int(offsets[0])"): "CPU offsets: bounds for the C++ kernel",
    ("kernels/cpu.py", "_check_offsets", "int(offsets[-1])"): "CPU offsets: bounds for the C++ kernel",
    ("kernels/cpu.py", "_check_offsets", "bool((offsets[1:] < offsets[:-1]).any())"):
        "CPU offsets: the C++ kernel needs them sorted",
    ("kernels/cpu.py", "_check_row_range", "int(used.min())"): "CPU rows: range check before the C++ gather",
    ("kernels/cpu.py", "_check_row_range", "int(used.max())"): "CPU rows: range check before the C++ gather",
    ("kernels/cpu.py", "group_norm_fwd_cpu", "float(eps)"): "a Python float argument, converted for the C++ call",
    ("kernels/cpu.py", "group_norm_fwd_cpu", "bool(is_rms)"): "a Python bool argument, converted for the C++ call",
    ("kernels/cpu.py", "group_norm_bwd_cpu", "bool(is_rms)"): "a Python bool argument, converted for the C++ call",
    # plan.py: the cpu backend's error path; the ids are a CPU tensor there.
    ("plan.py", "_group_plan", "int(ids[first_bad])"): "cpu backend only: one CPU id read to word the ValueError",
    # The torch backend loops over groups on the host (documented: the CPU fast path and the correctness fallback
    # on CUDA, never chosen automatically there); it reads the group bounds once per call.
    ("ops/grouped_linear.py", "_gemm_torch", "_host_offsets(offsets, T, mode).tolist()"):
        "torch backend: group bounds for its host loop",
    ("ops/grouped_linear.py", "_dw_torch", "_host_offsets(offsets, T, mode).tolist()"):
        "torch backend: group bounds for its host loop",
    ("ops/grouped_linears.py", "_multi", "offsets.tolist()"): "torch backend: group bounds for its host loop",
    ("ops/grouped_linears.py", "_multi_bwd", "offsets.tolist()"): "torch backend: group bounds for its host loop",
    ("ops/norms.py", "_grouped_norm_torch",
     "_read_offsets(offsets, x.shape[0], mode).tolist()"):
        "torch backend: group bounds for its host loop",
    ("ops/norms.py", "_grouped_norm_bwd_torch",
     "_read_offsets(offsets, x.shape[0], mode).tolist()"):
        "torch backend: group bounds for its host loop",
    # utils/checks.py: the "eager" branches, taken only for CPU tensors or an explicit validate=True (documented
    # to sync); CUDA's default "async" branch uses torch._assert_async and returns before them.
    ("nn/moe.py", "_check_capacity_factor", "float(capacity_factor)"): "a Python number at construction",
    ("nn/token_choice.py", "TokenChoiceMoE.__init__", "float(lb_coef)"): "a Python number at construction",
    ("nn/token_choice.py", "TokenChoiceMoE._expert_parallel", "send_counts.tolist()"):
        "expert parallelism only: all_to_all split sizes are host ints (documented: one read per forward)",
    ("nn/token_choice.py", "TokenChoiceMoE._expert_parallel", "recv_counts.tolist()"):
        "expert parallelism only: all_to_all split sizes are host ints (documented: one read per forward)",
    ("ops/routing.py", "check_finite_scores", "bool(finite.all())"): "eager mode only (CPU, or validate=True)",
    ("ops/routing.py", "check_finite_scores", "int((~finite).flatten().to(torch.uint8).argmax())"):
        "eager mode only, error message",
    ("ops/routing.py", "check_finite_scores", "float(scores[t, e])"): "eager mode only, error message",
    ("utils/checks.py", "check_ids_values", "bool(bad.any())"): "eager mode only (CPU, or validate=True)",
    ("utils/checks.py", "check_ids_values", "int(bad.flatten().to(torch.uint8).argmax())"):
        "eager mode only, error message",
    ("utils/checks.py", "check_ids_values", "int(ids.flatten()[first])"): "eager mode only, error message",
    ("utils/checks.py", "check_permutation_values", "bool(ok)"): "eager mode only (CPU, or validate=True)",
    ("utils/checks.py", "check_permutation_values", "rows[(rows < 0) | (rows >= n)]"):
        "eager mode only, after the check failed: the error message",
    ("utils/checks.py", "check_permutation_values", "int(bad[0])"): "eager mode only, error message",
    ("utils/checks.py", "check_offsets_values", "int(first)"): "eager mode only (CPU, or validate=True)",
    ("utils/checks.py", "check_offsets_values", "bool(steps_ok)"): "eager mode only (CPU, or validate=True)",
    ("utils/checks.py", "check_offsets_values", "offsets.tolist()"): "eager mode only, error message",
    ("utils/checks.py", "check_offsets_values", "int(last)"): "eager mode only (CPU, or validate=True)",
    # Python numbers that only look like tensors to a syntax check.
    ("ops/norms.py", "check_eps", "float(eps)"): "`eps` is a Python int or float (isinstance-checked just above)",
    ("kernels/triton/norms.py", "modality_norm_fwd", "float(eps)"): "`eps` is a Python float (checked in ops)",
}

_TRITON_DECORATORS = {"jit", "autotune", "heuristics"}
# Methods whose result lives on the host, so calling them on a device tensor waits for it.
_HOST_METHODS = {"item", "tolist", "cpu", "numpy", "synchronize"}
# Methods / torch functions whose *output size* depends on values: computing it reads the device.
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
_BOOL_RESULT = {"equal", "allclose", "is_nonzero"}  # return a Python bool
# Reductions that, used as a condition (`if t.any():`), are converted to a Python bool.
_REDUCERS = {"any", "all", "max", "min", "amax", "amin", "sum", "mean", "prod", "count_nonzero", "norm", "item"}
# Calls whose result is a Python number without reading tensor data: builtins and tensor-metadata methods.
_HOST_BUILTINS = {"len", "min", "max", "abs", "round"}
_HOST_METHODS_NUMBER = {"numel", "dim", "size", "stride", "element_size", "nelement", "data_ptr", "get_device",
                        "storage_offset", "next_power_of_2", "cdiv"}


def _name(node: ast.AST) -> str:
    """Last name of a call target: `x.item` -> "item", `torch.nonzero` -> "nonzero", `int` -> "int"."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _is_torch_call(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch"


def _host_number(node: ast.AST) -> bool:
    """True for expressions that are plainly Python numbers (sizes, constants), never tensor data."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Subscript):  # x.shape[i]
        return isinstance(node.value, ast.Attribute) and node.value.attr == "shape"
    if isinstance(node, ast.Attribute):
        return node.attr in ("shape", "ndim")
    if isinstance(node, ast.Call):
        f = node.func
        known = (isinstance(f, ast.Name) and f.id in _HOST_BUILTINS) or (
            isinstance(f, ast.Attribute) and f.attr in _HOST_METHODS_NUMBER
        )
        return known and all(_host_number(a) for a in node.args)
    if isinstance(node, ast.BinOp):
        return _host_number(node.left) and _host_number(node.right)
    if isinstance(node, ast.UnaryOp):
        return _host_number(node.operand)
    return False


def _is_mask_expr(node: ast.AST, masks: set[str]) -> bool:
    """A boolean-tensor expression: a comparison, ~/&/| of them, or a name assigned one in this function."""
    if isinstance(node, ast.Compare):
        return not any(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn)) for op in node.ops)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return _is_mask_expr(node.operand, masks)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
        return _is_mask_expr(node.left, masks) or _is_mask_expr(node.right, masks)
    if isinstance(node, ast.Name):
        return node.id in masks
    return False


def _implicit_bool(node: ast.AST) -> bool:
    """Does Python take the truth value of a tensor reduction in this condition?"""
    if isinstance(node, ast.BoolOp):
        return any(_implicit_bool(v) for v in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _implicit_bool(node.operand)
    if isinstance(node, ast.Compare):
        return any(_implicit_bool(v) for v in (node.left, *node.comparators))
    if isinstance(node, ast.Subscript):
        return _implicit_bool(node.value)
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCERS
        and not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("math", "builtins"))
    )


class _SyncFinder(ast.NodeVisitor):
    def __init__(self):
        self.stack: list[str] = []
        self.masks: list[set[str]] = [set()]
        self.hits: list[tuple[str, str, int]] = []  # (function, form, line)

    def _hit(self, node: ast.AST, form: str | None = None) -> None:
        text = " ".join((form or ast.unparse(node)).split())
        self.hits.append((".".join(self.stack) or "<module>", text, node.lineno))

    def _scope(self, node, is_function: bool):
        decorators = {_name(d.func if isinstance(d, ast.Call) else d) for d in getattr(node, "decorator_list", [])}
        if is_function and decorators & _TRITON_DECORATORS:
            return  # device code: runs on the GPU, cannot sync the host
        self.stack.append(node.name)
        self.masks.append(set() if is_function else self.masks[-1])
        self.generic_visit(node)
        self.masks.pop()
        self.stack.pop()

    def visit_FunctionDef(self, node):
        self._scope(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._scope(node, False)

    def visit_Assign(self, node):
        if _is_mask_expr(node.value, self.masks[-1]):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    self.masks[-1].add(t.id)
        self.generic_visit(node)

    def visit_Call(self, node):
        name = _name(node.func)
        kwargs = {k.arg for k in node.keywords}
        if name in ("int", "float", "bool", "complex") and isinstance(node.func, ast.Name):
            if node.args and not _host_number(node.args[0]):
                self._hit(node)
        elif name in _HOST_METHODS and isinstance(node.func, ast.Attribute):
            self._hit(node)
        elif name in _DATA_DEPENDENT and (isinstance(node.func, ast.Attribute)):
            self._hit(node)
        elif name in _BOOL_RESULT and isinstance(node.func, ast.Attribute):
            self._hit(node)
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            # `x.repeat_interleave(H // Hkv)`: Python-int repeats (inline arithmetic) size the output without a sync.
            repeats = node.args[0] if node.args and isinstance(node.func.value, ast.Name) else None
            if repeats is None or not (_host_number(repeats) or isinstance(repeats, ast.BinOp)):
                self._hit(node)
        elif name == "where" and _is_torch_call(node) and len(node.args) == 1:
            self._hit(node)
        elif name == "to" and isinstance(node.func, ast.Attribute):
            targets = [*node.args, *(k.value for k in node.keywords if k.arg == "device")]
            if any(isinstance(a, ast.Constant) and a.value == "cpu" for a in targets):
                self._hit(node)
        elif name in ("index_put", "index_put_") and node.args and isinstance(node.args[0], ast.Tuple):
            if any(_is_mask_expr(e, self.masks[-1]) for e in node.args[0].elts):
                self._hit(node)
        self.generic_visit(node)

    def visit_Subscript(self, node):
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if any(_is_mask_expr(p, self.masks[-1]) for p in parts):
            self._hit(node)
        self.generic_visit(node)

    def _condition(self, test: ast.AST, keyword: str) -> None:
        """A tensor reduction whose result Python turns into a bool (explicit int()/bool() are flagged apart)."""
        if _implicit_bool(test):
            self._hit(test, f"{keyword} {ast.unparse(test)}")

    def visit_If(self, node):
        self._condition(node.test, "if")
        self.generic_visit(node)

    def visit_While(self, node):
        self._condition(node.test, "while")
        self.generic_visit(node)

    def visit_Assert(self, node):
        self._condition(node.test, "assert")
        self.generic_visit(node)

    def visit_IfExp(self, node):
        self._condition(node.test, "if")
        self.generic_visit(node)



def find_syncs(source: str) -> list[tuple[str, str, int]]:
    """(function, expression, line) of every host-syncing form in ``source``."""
    finder = _SyncFinder()
    finder.visit(ast.parse(source))
    return finder.hits


def test_hot_path_has_no_host_sync():
    found: dict[tuple[str, str, str], list[int]] = {}
    for path in SCANNED:
        rel = path.relative_to(PKG).as_posix()
        for func, form, line in find_syncs(path.read_text()):
            found.setdefault((rel, func, form), []).append(line)
    new = {k: v for k, v in found.items() if k not in ALLOWED}
    stale = [k for k in ALLOWED if k not in found]
    lines = []
    if new:
        lines.append("host-syncing code on the hot path (fix it, or allow it in tests/test_no_host_sync.py ALLOWED "
                     "with the reason it does not wait on a device):")
        for (rel, func, form), at in sorted(new.items()):
            lines.append(f"    ({rel!r}, {func!r}, {form!r}): \"WHY\",  # line {', '.join(map(str, at))}")
    if stale:
        lines.append("ALLOWED entries that match nothing any more (remove them):")
        lines += [f"    {k!r}" for k in stale]
    assert not lines, "\n".join(lines)


# The checker itself: every form it claims to find, and no false alarm on the usual size arithmetic.
_SYNCING = """
def f(x, ids, t, w, m):
    a = x.item()
    b = bool(t)
    c = int(t.max())
    d = float(t[0])
    e = x.tolist()
    g = torch.nonzero(x)
    h = x.nonzero()
    i = x.cpu()
    j = x[ids == m]
    mask = (ids == m) & (x > 0)
    k = x[mask]
    x[~mask] = 0
    l = torch.bincount(ids)
    n = torch.where(mask)
    o = x.repeat_interleave(ids)
    p = x.to("cpu")
    if t.any():
        pass
    q = torch.equal(x, t)
    r = x.masked_select(mask)
    s = torch.unique(ids)
    torch.cuda.synchronize()
    u = x.index_put((ids == 0,), t)
    v = 1 if (x > 0).all() else 0
    while not x.max() > 3 and w is None:
        pass
"""
_NOT_SYNCING = """
@triton.jit
def kernel(x_ptr, n, BLOCK: tl.constexpr):
    v = tl.load(x_ptr).to(tl.float32)
    if v.sum() > 0:
        pass

def g(x, w, eps):
    n = int(x.shape[0])
    k = int(x.numel())
    d = float(2)
    m = x.repeat_interleave(w, output_size=n)
    y = x[:, None]
    z = x[0]
    if x.dim() != 2 or w is None:
        pass
    s = torch.where(x > 0, x, w)
    t = x.to(torch.float32)
"""


def test_checker_finds_every_form():
    forms = [form for _, form, _ in find_syncs(_SYNCING)]
    for expected in ("x.item()", "bool(t)", "int(t.max())", "float(t[0])", "x.tolist()", "torch.nonzero(x)",
                     "x.nonzero()", "x.cpu()", "x[ids == m]", "x[mask]", "x[~mask]", "torch.bincount(ids)",
                     "torch.where(mask)", "x.repeat_interleave(ids)", "x.to('cpu')", "if t.any()",
                     "torch.equal(x, t)", "x.masked_select(mask)", "torch.unique(ids)", "torch.cuda.synchronize()",
                     "x.index_put((ids == 0,), t)", "if (x > 0).all()",
                     "while not x.max() > 3 and w is None"):
        assert expected in forms, f"the checker misses {expected!r}; it found {forms}"
    assert find_syncs(_NOT_SYNCING) == []


# ---- GPU: the same property, observed ------------------------------------------------------------------------

@pytest.mark.gpu
def test_modality_linear_forward_backward_without_sync():
    dev = torch.device("cuda")
    layer = smk.nn.MoTLinear(256, 128, 3, bias=True, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, 3, (4, 100), device=dev)
    x = torch.randn(4, 100, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    layer(x, ids).sum().backward()  # warm-up: compile and autotune (autotuning syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = smk.group_plan(ids, 3)
        layer(x, ids, plan=plan).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _module(kind: str, dev):
    if kind == "linear":
        return smk.nn.MoTLinear(256, 192, 3, bias=True, device=dev, dtype=torch.bfloat16), (4, 100, 256)
    block = smk.nn.MoTBlock(256, 4, 512, 3, qk_norm=True, n_kv_heads=2, device=dev, dtype=torch.bfloat16)
    return block, (2, 128, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "block"])
def test_forward_backward_capture_in_a_cuda_graph(kind):
    """Plan, forward and backward captured in one CUDA graph, then replayed on new inputs.

    Capture raises on any host sync (``.item()``, a blocking copy, ``cudaStreamSynchronize`` inside ``_C``,
    an autotuning benchmark). The replay must match an eager run on the same new inputs: a graph that baked in
    stale values (a plan read on the host, a size from the first inputs) would not.
    """
    dev = torch.device("cuda")
    torch.manual_seed(0)
    module, shape = _module(kind, dev)
    params = list(module.parameters())
    x = torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 3, shape[:-1], device=dev)
    dy = torch.randn(shape[:-1] + (192 if kind == "linear" else shape[-1],), device=dev, dtype=torch.bfloat16)

    def step():
        plan = smk.group_plan(ids, 3, validate=False)
        out = module(x, ids, plan=plan)
        return [out, *torch.autograd.grad(out, [x, *params], dy)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles every kernel
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(0, 3, ids.shape, device=dev))
        dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    # Same kernels on the same inputs; only attention's backward may reorder its sums. A graph on stale inputs
    # is off by about the tensor's own size (ratio ~1), far above 1e-2 of its root mean square.
    for name, got, want in zip(["out", "dx"] + [n for n, _ in module.named_parameters()], captured, eager):
        assert_close_verbose(got, want.double(), torch.bfloat16, f"graph {name}", tol=Tol(rtol=0.0, atol=1e-2))


@pytest.mark.gpu
@pytest.mark.parametrize("batch_level", [False, True], ids=["per-sequence", "batch"])
def test_mixture_of_depths_forward_backward_without_sync(batch_level):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    block = smk.nn.MoTBlock(256, 4, 512, 2, device=dev, dtype=torch.bfloat16)
    layer = smk.nn.MixtureOfDepths(block, 256, capacity=0.25, batch_level=batch_level, device=dev,
                                   dtype=torch.bfloat16)
    ids = torch.randint(0, 2, (2, 128), device=dev)
    x = torch.randn(2, 128, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    def decode():
        layer.eval()
        layer.causal_routing = True
        with torch.no_grad():
            layer(x[:, :1], ids[:, :1])  # one decoding token
        layer.train()
        layer.causal_routing = False

    layer(x, ids).float().square().mean().backward()  # warm-up: compile and autotune (autotuning syncs)
    decode()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, ids).float().square().mean().backward()
        decode()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 8)])
def test_token_choice_forward_backward_without_sync(experts, top_k):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = smk.nn.TokenChoiceMoE(256, 128, experts, top_k=top_k, device=dev, dtype=torch.bfloat16)
    x = torch.randn(512, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    (layer(x).float().square().mean() + layer.aux_loss).backward()  # warm-up: compile and autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (layer(x).float().square().mean() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
@pytest.mark.parametrize("block_size,glu", [(16, False), (64, True)])
def test_avgk_forward_backward_without_sync(strategy, block_size, glu):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = smk.nn.AvgKFeedForward(256, 2048, block_size, 256 // block_size, glu=glu, bias=True, strategy=strategy,
                                   device=dev, dtype=torch.bfloat16)
    x = torch.randn(512, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()  # warm-up: compile and autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _training_model(kind: str, dev):
    if kind == "mot":
        return smk.nn.MoTTransformer(256, 128, 2, 4, 256, 2, device=dev, dtype=torch.bfloat16)
    if kind == "moma":
        return smk.nn.MoMaTransformer(256, 128, 2, 4, 256, (2, 2), device=dev, dtype=torch.bfloat16)
    return smk.nn.MoMaTransformer(256, 128, 2, 4, 256, (2, 2), mod_capacity=0.25, device=dev, dtype=torch.bfloat16)


# Graph replay vs the same step run eagerly on the same inputs and parameters: the same kernels on the same data,
# so equal up to the run-to-run noise of any kernel that reduces in an unfixed order (e.g. SDPA's backward),
# which moves a bf16 result by about one rounding: 2 eps(bf16) * |want| per element, plus 4 eps(bf16) times the
# gradient's root mean square for the small elements that noise carried from other layers lands on. A graph that
# skipped a kernel or read stale inputs is off by O(1) of that scale. The loss (float32, from bf16 logits) gets
# the relative part only; parameters after the update 1 eps(bf16) * rms(p) for elements rounded to near zero.
_GRAPH_LOSS_TOL = Tol(rtol=2 * EPS[torch.bfloat16], atol=0.0)
_GRAPH_GRAD_TOL = Tol(rtol=2 * EPS[torch.bfloat16], atol=4 * EPS[torch.bfloat16])
_GRAPH_PARAM_TOL = Tol(rtol=2 * EPS[torch.bfloat16], atol=EPS[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mot", "moma", "mod-moma"])
def test_training_step_captured_in_a_cuda_graph(kind):
    """A whole training step (loss, backward, SGD update) of a MoT, MoMa and MoD + MoMa model in one CUDA graph.

    Each replay -- on the tokens it was captured with, then on new ones copied into the same static inputs --
    must give the loss and gradients (the graph's static outputs) and the updated parameters of an eager step on
    the same inputs from the same parameters; and the replay on new tokens must give new outputs."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = _training_model(kind, dev)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    tokens = torch.randint(0, 256, (2, 64), device=dev)
    ids = torch.randint(0, 2, (2, 64), device=dev)
    lr = 0.1  # big enough that the update moves many bf16 parameters by at least one ulp (checked below)

    def step():
        logits = model(tokens, ids)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        return [loss.detach(), *grads]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles and autotunes every kernel
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()  # [loss, *grads]: the graph's static outputs, rewritten by every replay

    def replay_matches_eager(what):
        """Replay, then rerun the step eagerly from the same parameters on the same inputs; compare. Returns the
        replay's [loss, *grads] (copies) and leaves the parameters as the eager step left them."""
        start = [p.detach().clone() for p in params]
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in static_out]
        got_params = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        want = step()
        torch.cuda.synchronize()
        assert_close_verbose(got[0], want[0].double(), torch.bfloat16, f"graph {kind} loss ({what})",
                             tol=_GRAPH_LOSS_TOL)
        for name, g, w in zip(names, got[1:], want[1:]):
            assert_close_verbose(g, w.double(), torch.bfloat16, f"graph {kind} d{name} ({what})", tol=_GRAPH_GRAD_TOL)
        moved_graph = moved_eager = 0
        for name, p, g, s in zip(names, params, got_params, start):
            assert_close_verbose(g, p.detach().double(), torch.bfloat16,
                                 f"graph {kind} {name} after the update ({what})", tol=_GRAPH_PARAM_TOL)
            moved_graph += int((g != s).sum())
            moved_eager += int((p.detach() != s).sum())
        # The update is in the graph: it moves the parameters the eager step moves (up to a rare rounding flip).
        assert moved_eager > 0, f"{kind} ({what}): the eager update moved no parameter; raise lr"
        assert moved_graph >= 0.9 * moved_eager, (
            f"{kind} ({what}): the replay moved {moved_graph} parameter elements, the eager step {moved_eager}")
        return got

    first = replay_matches_eager("capture tokens")
    with torch.no_grad():
        tokens.copy_(torch.randint(0, 256, tokens.shape, device=dev))
        ids.copy_(torch.randint(0, 2, ids.shape, device=dev))
    second = replay_matches_eager("new tokens")
    # New inputs, new outputs: a replay that read stale inputs (or wrote nothing) would repeat the first ones.
    assert not torch.equal(first[0], second[0]), f"graph {kind}: the loss did not change with the tokens"
    for name, a, b in zip(names, first[1:], second[1:]):
        if a.any() or b.any():
            assert not torch.equal(a, b), f"graph {kind}: d{name} did not change with the tokens"
