"""`custom_op`: a torch.library custom op whose eager calls skip the dispatcher.

torch.compile needs each kernel wrapped as a torch.library op (schema, fake implementation, autograd formula) so
that Dynamo and Inductor can trace around it. In eager mode that wrapper is pure host cost (the dispatcher, Python
autograd glue, a Dynamo-disable frame per call: most of a small op's wall time on a GPU, benchmarks/NOTES.md). So an
`Op` runs its Python implementation straight (under a plain autograd.Function with the op's own
setup_context/backward when a gradient is needed) whenever no compiler is tracing and every tensor argument is a
plain tensor on a real device; fake, meta and functional tensors, and every traced call, take the registered op.

An op whose last argument is its backend's name gives its `table=` (fasttrain._backend.Table): a call for a backend
whose column has a `direct` op goes straight to that op (its own schema, fake implementation and autograd), eager or
traced. It may also give `reference=`: the reference backend's forward, in plain differentiable torch ops, which a
trace then records inline instead of the opaque registered op, so that Inductor fuses it with its neighbours as it
would the user's own torch code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

_PLAIN = (Tensor, nn.Parameter)


class Op:
    """What torch.library.custom_op returns (register_fake, register_autograd, calling it), with the eager fast
    path above. `.op` is the registered op (for torch.library.opcheck and torch.ops.fasttrain.*)."""

    def __init__(self, name: str, fn: Callable, mutates_args: Iterable[str], table=None, reference=None):
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        self._fn, self._name, self._reference = fn, name, reference
        self._direct: dict[str, Callable] = table.direct if table is not None else {}
        self._function: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn, name = self._fn, self._name

        def forward(ctx, *args):  # what torch's generated Function does around the op, without the dispatcher
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(
            name.replace("::", "_") + "_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        # One plain loop over the arguments, not generator expressions: this runs on every eager call.
        if self._direct and (direct := self._direct.get(args[-1])) is not None:
            return direct(*args[:-1])
        if torch.compiler.is_compiling():
            if self._reference is not None and args[-1] == "reference":
                return self._reference(*args[:-1])
            return self.op(*args)
        needs_grad = False
        for a in args:
            if isinstance(a, Tensor):
                if type(a) not in _PLAIN or a.is_meta:  # fake, functional, meta or other subclass: the real op
                    return self.op(*args)
                needs_grad = needs_grad or a.requires_grad
        if needs_grad and self._function is not None and torch.is_grad_enabled():
            return self._function.apply(*args)
        return self._fn(*args)


def reference_gradients(reference: Callable, inputs: tuple, grad_outputs: tuple) -> tuple:
    """The gradients of `reference(*inputs)` (a tensor or a tuple of them) against `grad_outputs`, as a graph.

    What an op's backward returns when autograd builds one (create_graph=True, seen as torch.is_grad_enabled()
    inside the backward): for a double backward (a gradient penalty, a Hessian-vector product). The kernels compute
    their gradients outside autograd, so returned there the second derivative would silently lack the op's terms.
    An input that is not a tensor, or needs no gradient, gets None; so does a grad_output given as None.
    """
    # A view per slot: self-attention may pass one tensor as q, k and v, and a gradient taken with respect to the
    # tensor itself would be the total over the slots, returned once per slot (3x).
    inputs = tuple(t.view_as(t) if isinstance(t, Tensor) and t.requires_grad else t for t in inputs)
    wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    found = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True)
        if pairs and wanted
        else ()
    )
    return tuple(next(found, None) if isinstance(t, Tensor) and t.requires_grad else None for t in inputs)


def custom_op(
    name: str, *, mutates_args: Iterable[str], table=None, reference: Callable | None = None
) -> Callable[[Callable], Op]:
    """Decorator, as torch.library.custom_op(name, mutates_args=...); table= and reference= as in the module
    docstring."""
    return lambda fn: Op(name, fn, mutates_args, table, reference)
