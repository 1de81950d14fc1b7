"""The role table is declared once per language (llaca_optim/ops/roles.py, csrc/include/llaca/roles.h):
the two must agree, and everything bound by position to it (the op schemas, the C++ kernels'
parameter lists, the Triton address table) must follow its order."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llaca_optim.ops import library, roles

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"kParam": ("param", True), "kEma": ("ema", True), "kFloatSlot": ("float32", False),
         "kBoolSlot": ("bool", False)}
PARTS = {"kTensor": "tensor", "kAdamW": "adamw", "kAmsGrad": "amsgrad", "kLLaCA": "llaca",
         "kDeferral": "deferral"}


def cpp_roles() -> list[tuple[str, str, str]]:
    text = (ROOT / "csrc" / "include" / "llaca" / "roles.h").read_text()
    table = text[text.index("#define LLACA_ROLES(X)"):text.index("enum Role")]
    return re.findall(r"X\((\w+), \w+, [\w\s*]+, Kind::(\w+), Part::(\w+)\)", table)


def test_cpp_and_python_tables_agree():
    rows = cpp_roles()
    assert [name for name, _, _ in rows] == [r.arg for r in roles.OP_ROLES]
    for (name, kind, part), role in zip(rows, roles.OP_ROLES):
        assert KINDS[kind] == (role.dtype, role.shaped), name
        assert PARTS[part] == role.part, name


def test_schemas_list_the_roles_in_table_order():
    for op in roles.OP_NAMES:
        schema = torch._C.parse_schema(f"{library.NAMESPACE}::{library.schema(op)}")
        lists = [a.name for a in schema.arguments if not a.kwarg_only]
        assert lists == [r.arg for r in roles.roles_of(op)], op
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert {r.arg for r in roles.roles_of(op) if r.ops[op] == "w"} <= written, op


def test_cpp_kernels_take_the_lists_in_schema_order():
    """The C++ kernels bind the schema's arguments by position and every list is a TensorList, so
    a reordered role would bind the wrong tensors without any error: their parameter names must
    be the schema's, in its order."""
    sources = {"cpu": (ROOT / "csrc" / "cpu" / "llaca_cpu.cpp").read_text(),
               "cuda": (ROOT / "csrc" / "cuda" / "ops.h").read_text()}
    functions = {"cpu": {"adamw_llaca_": "adamw_llaca_cpu", "llaca_update_": "llaca_update_cpu",
                         "llaca_flush_": "llaca_flush_cpu"},
                 "cuda": {"adamw_llaca_": "adamw_llaca", "llaca_update_": "llaca_update",
                          "llaca_flush_": "llaca_flush"}}
    for backend, text in sources.items():
        for op, function in functions[backend].items():
            signature = re.search(rf"void {function}\(([^)]*)\)", text).group(1)
            names = re.findall(r"TensorList (\w+)", signature)
            assert names == [r.arg for r in roles.roles_of(op)], (backend, op)
            # ... and hand them on, by those names, to the builder of the op's Lists.
            call = re.search(rf"Lists lists = {op[:-1]}_lists\(([^)]*)\)", text).group(1)
            assert [a.strip() for a in call.split(",")] == names, (backend, op)
    checks = (ROOT / "csrc" / "include" / "llaca" / "checks.h").read_text()
    for op in roles.OP_NAMES:
        signature = re.search(rf"Lists {op[:-1]}_lists\(([^)]*)\)", checks).group(1)
        names = re.findall(r"TensorList (\w+)", signature)
        assert names == [r.arg for r in roles.roles_of(op)], op
        body = checks[checks.index(f"Lists {op[:-1]}_lists("):]
        body = body[body.index("return {"):body.index("};")]
        assert re.findall(r"\.(\w+) = (\w+)", body) == [(n, n) for n in names], op


def test_triton_address_table_rows_follow_the_table():
    rows = roles.TABLE_ROWS
    assert sorted(r.arg for r in rows) == sorted(r.arg for r in roles.OP_ROLES)
    assert all(r.shaped for r in rows[: roles.ARRAY_ROWS])
    assert not any(r.shaped for r in rows[roles.ARRAY_ROWS:])


def test_new_state_follows_the_table():
    """Each state entry is made as its row says: dtype, shape, device and first value."""
    from llaca_optim import functional

    p = torch.randn(3, 5, dtype=torch.bfloat16)
    state = functional.new_state(p, amsgrad=True)
    assert list(state) == list(roles.state_keys("adamw", "amsgrad", "llaca"))
    for key, value in state.items():
        role = roles.BY_STATE_KEY[key]
        assert value.dtype == role.dtype_for(p, torch.float32)
        assert value.shape == (p.shape if role.shaped else ())
        expected = p.float() if role.init == "copy" else torch.full_like(value, role.init)
        assert torch.equal(value.to(expected.dtype), expected), key


def test_the_bucket_has_a_list_per_role_in_the_tables_order():
    """Bucket is written out (type checkers see it); its role lists are the table's, in order."""
    from dataclasses import fields

    names = [f.name for f in fields(roles.Bucket)]
    assert names[: len(roles.OP_ROLES)] == [role.arg for role in roles.OP_ROLES]
    assert not set(names[len(roles.OP_ROLES):]) & {role.arg for role in roles.ROLES}


def test_the_python_signatures_take_the_lists_in_schema_order():
    """The reference kernels bind the schema by position, and the public functional API names
    its lists as the table does (the deferral flags are internal: its calls blend at once)."""
    import inspect

    from llaca_optim import functional
    from llaca_optim.ops import reference_kernels

    def lists(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD]

    for op, kernel in reference_kernels.kernels().items():
        if op in roles.OP_NAMES:
            assert lists(kernel) == [r.arg for r in roles.roles_of(op)], op
    public = {roles.ADAMW_LLACA: functional.adamw_llaca, roles.LLACA_UPDATE: functional.llaca_update}
    for op, fn in public.items():
        assert lists(fn) == [r.arg for r in roles.roles_of(op) if r.part != "deferral"], op
