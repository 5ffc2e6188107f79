"""Read a MONAI bundle config as data: ``@`` references and a pure-data subset of ``$`` expressions.

MONAI's ``ConfigParser`` evaluates ``$`` strings with Python ``eval`` and imports any ``_target_``;
this resolver does neither. ``@id`` (``#``-separated, ``@#sibling`` relative) is replaced by the
referenced value. A ``$`` expression is parsed with :mod:`ast` and interpreted here only when it is
plain data (literals, references, ``a if cond else b``, comparisons, ``and``/``or``/``not``, ``+ - * /``
on numbers, list concatenation, constant indexing), as in ``"$[1.5, 1.5, 1.5] if @highres else [3.0, 3.0, 3.0]"``;
any call, attribute, import or name is refused with the config key that holds it. ``%`` macros
(other files) are refused. Only the keys the bundle source asks for are resolved, so code elsewhere
in the file (``"imports"``, ``"datalist"``, ``"network": "$@network_def.to(@device)"``) is never read.
"""
from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path
from typing import Any

from ...core.errors import ModelError

SEP = "#"
_REF = re.compile(r"@(#*[\w#:]+)")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_MAX_SEQUENCE = 10_000  # list * int stays small


def read_config(path: Path) -> dict[str, Any]:
    """Parse JSON/YAML (``yaml.safe_load``) into a mapping; every problem is a :class:`ModelError`."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # parse failures are user-facing
        raise ModelError(f"Bundle config '{path}' cannot be read as {path.suffix.lstrip('.').upper()}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ModelError(f"Bundle config '{path}' must be a mapping of ids to values, got {type(data).__name__}.")
    return data


def key_name(path: tuple) -> str:
    return SEP.join(str(p) for p in path)


class BundleConfig:
    """The parsed ``configs/inference.*``; :meth:`get` resolves one id without running any code."""

    def __init__(self, data: dict[str, Any], file: Path):
        self.data, self.file = data, file
        self._resolving: list[tuple] = []

    def has(self, id_: str) -> bool:
        try:
            self._lookup(tuple(id_.split(SEP)), ())
        except ModelError:
            return False
        return True

    def get(self, id_: str) -> Any:
        path = tuple(id_.split(SEP))
        return self.resolve(self._lookup(path, ()), path)

    def _lookup(self, path: tuple, where: tuple) -> Any:
        node: Any = self.data
        for i, part in enumerate(path):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            else:
                at = f" (referenced from '{key_name(where)}')" if where else ""
                raise ModelError(f"Bundle config '{self.file.name}' has no '{key_name(path[:i + 1])}'{at}.")
        return node

    def node(self, value: Any, path: tuple) -> tuple[Any, tuple]:
        """Follow ``@`` references to a raw value (children left unresolved) and the key it lives at."""
        seen = set()
        while isinstance(value, str) and value.startswith("@"):
            target = self._target_path(value[1:], path)
            if target in seen:
                raise ModelError(f"Bundle config '{self.file.name}': reference '{value}' at '{key_name(path)}' is circular.")
            seen.add(target)
            value, path = self._lookup(target, path), target
        if isinstance(value, dict) and self.resolve(value.get("_disabled_", False), path + ("_disabled_",)) in (
                True, "true", "True"):
            return None, path
        return value, path

    @staticmethod
    def _target_path(ref: str, where: tuple) -> tuple:
        ref = ref.replace("::", SEP)
        depth = len(ref) - len(ref.lstrip(SEP))  # "@#x" is a sibling of the referring key, "@##x" one level up
        return tuple(where[:len(where) - depth]) + tuple(ref.lstrip(SEP).split(SEP)) if depth else tuple(ref.split(SEP))

    def _reference(self, ref: str, where: tuple) -> Any:
        path = self._target_path(ref, where)
        if path in self._resolving:
            raise ModelError(f"Bundle config '{self.file.name}': reference '@{ref}' at '{key_name(where)}' is circular.")
        self._resolving.append(path)
        try:
            return self.resolve(self._lookup(path, where), path)
        finally:
            self._resolving.pop()

    def resolve(self, value: Any, path: tuple) -> Any:
        if isinstance(value, str):
            if value.startswith("@"):
                return self._reference(value[1:], path)
            if value.startswith("$"):
                return self._expression(value[1:], path)
            if value.startswith("%"):
                raise ModelError(f"Bundle config key '{key_name(path)}' is a '%' macro ({value!r}) pointing into "
                                 "another file; this tool reads configs/inference only. Replace it by its value.")
            return value
        if isinstance(value, dict):
            if value.get("_disabled_") in (True, "true", "True"):
                return None
            mode = value.get("_mode_", "default")
            if mode != "default":
                raise ModelError(f"Bundle config key '{key_name(path)}' has _mode_ '{mode}'; only plain components "
                                 "can be read.")
            return {k: self.resolve(v, path + (k,)) for k, v in value.items()
                    if k == "_target_" or not (k.startswith("_") and k.endswith("_"))}
        if isinstance(value, list):
            items = [self.resolve(v, path + (str(i),)) for i, v in enumerate(value)]
            return [v for v, raw in zip(items, value) if v is not None or raw is None]
        return value

    def _expression(self, text: str, path: tuple) -> Any:
        bound: dict[str, Any] = {}

        def bind(match: re.Match) -> str:
            name = f"__ref{len(bound)}__"
            bound[name] = self._reference(match.group(1), path)
            return name

        refuse = (f"Bundle config key '{key_name(path)}' holds the Python expression '${text.strip()}', which this "
                  "tool does not run (it reads bundles as data; only literals, @references and 'a if cond else b' "
                  f"are understood). Replace it by its value in configs/{self.file.name}")
        try:
            tree = ast.parse(_REF.sub(bind, text.strip()), mode="eval")
        except SyntaxError:
            raise ModelError(refuse + ".") from None
        try:
            return _evaluate(tree.body, bound)
        except _Unsafe as exc:
            raise ModelError(f"{refuse} ({exc}).") from None


class _Unsafe(Exception):
    pass


def _evaluate(node: ast.AST, bound: dict[str, Any]) -> Any:
    """Interpret a data-only expression tree; anything that could run code raises :class:`_Unsafe`."""
    def ev(n: ast.AST) -> Any:
        return _evaluate(n, bound)

    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in bound:
        return bound[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [ev(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.BoolOp):  # Python's semantics: short-circuit, the deciding operand is the value
        value = None
        for operand in node.values:
            value = ev(operand)
            if bool(value) != isinstance(node.op, ast.And):
                return value
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        value = ev(node.operand)
        if isinstance(node.op, ast.Not):
            return not value
        _plain_number(value)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = ev(right_node)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Add) and type(left) is type(right) and isinstance(left, (list, str)):
            if len(left) + len(right) > _MAX_SEQUENCE:
                raise _Unsafe("result too long")
            return left + right
        if isinstance(node.op, ast.Mult) and isinstance(left, list) and isinstance(right, int):
            if len(left) * right > _MAX_SEQUENCE:
                raise _Unsafe("list repetition too long")
            return left * right
        _plain_number(left), _plain_number(right)
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
        return ev(node.value)[ev(node.slice)]
    what = {ast.Call: "a function call", ast.Attribute: "an attribute", ast.Name: "a name",
            ast.Lambda: "a lambda"}.get(type(node), type(node).__name__)
    raise _Unsafe(f"it contains {what}")


def _plain_number(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unsafe(f"arithmetic on {type(value).__name__}")
