"""A shared contract for the ops: every subclass gets the same
dtype x layout x device x gradient x opcheck matrix (after torchvision's RoIOpTester).

A test module subclasses OpContract as ``class Test...(OpContract)``, fills in the hooks, and
imports ``pytest_generate_tests`` from here so that ``dtype``, ``layout`` and ``device``
are parametrized from the class attributes::

    from op_contract import OpContract, pytest_generate_tests  # noqa: F401

Hooks (all take a torch.Generator so that inputs are drawn fresh from the test's seed):
  sample(dtype, layout, device, gen) -> tuple of positional inputs of ``run``
  gradcheck_sample(layout, device, gen) -> small float64 inputs (default: sample)
  run(*inputs, **kw) -> Tensor        the public Python entry point
  reference(*inputs) -> Tensor        an independent implementation, evaluated on float64 copies
  differentiable: indices of the inputs that get gradients
  op_calls(*inputs) -> [(OpOverload, args)]  the registered ops and their arguments, for opcheck

Every comparison checks every element; outputs of the kernels are poisoned (NaN-filled
``torch.empty``) in ``test_every_element_is_written``.
"""
import pytest
import torch
import torch.utils.deterministic
from torch.library import opcheck

from _helpers import cpu_and_cuda

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Comparison tolerances against a float64 reference, by dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is None or not issubclass(cls, OpContract):
        return
    for name in ("dtype", "layout", "device"):
        if name in metafunc.fixturenames:
            values = {"dtype": cls.dtypes, "layout": cls.layouts, "device": cls.devices()}[name]
            ids = [str(v).replace("torch.", "") if not hasattr(v, "values") else None for v in values]
            metafunc.parametrize(name, values, ids=ids)


class OpContract:
    dtypes = ALL_DTYPES
    layouts = ("contiguous",)
    differentiable = ()

    @staticmethod
    def devices():
        return cpu_and_cuda()

    # -- hooks -------------------------------------------------------------
    def sample(self, dtype, layout, device, gen):
        raise NotImplementedError

    def gradcheck_sample(self, layout, device, gen):
        """Float64 inputs small enough for gradcheck and gradgradcheck (default: sample)."""
        return self.sample(torch.float64, layout, device, gen)

    def run(self, *inputs, **kw):
        raise NotImplementedError

    def reference(self, *inputs):
        raise NotImplementedError

    def op_calls(self, *inputs):
        return []

    def tolerance(self, dtype):
        return TOL[dtype]

    # -- helpers -----------------------------------------------------------
    @staticmethod
    def _gen(seed, device="cpu"):
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def _as64(inputs):
        return tuple(t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in inputs)

    @staticmethod
    def _cpu(inputs):
        return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs)

    # -- the matrix ----------------------------------------------------------
    def test_matches_reference(self, seed, dtype, layout, device):
        inputs = self.sample(dtype, layout, device, self._gen(seed))
        out = self.run(*inputs)
        ref = self.reference(*self._as64(self._cpu(inputs)))
        assert out.dtype == dtype and out.device.type == device
        tol = self.tolerance(dtype)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)

    def test_gradients_match_reference(self, seed, dtype, layout, device):
        if not self.differentiable:
            pytest.skip("not differentiable")
        inputs = list(self.sample(dtype, layout, device, self._gen(seed)))
        for i in self.differentiable:
            inputs[i] = inputs[i].detach().requires_grad_()
        out = self.run(*inputs)
        g = torch.randn(out.shape, generator=self._gen(seed + 1), dtype=torch.float64)
        grads = torch.autograd.grad(out, [inputs[i] for i in self.differentiable], g.to(device, dtype))
        ref_inputs = list(self._as64(self._cpu(inputs)))
        for i in self.differentiable:
            ref_inputs[i] = ref_inputs[i].requires_grad_()
        ref = self.reference(*ref_inputs)
        ref_grads = torch.autograd.grad(ref, [ref_inputs[i] for i in self.differentiable], g.to(dtype).double())
        for i, a, b in zip(self.differentiable, grads, ref_grads):
            assert a.dtype == inputs[i].dtype and a.shape == inputs[i].shape
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            tol = self.tolerance(dtype) * scale
            torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol, msg=lambda m: f"input {i}: {m}")

    def test_every_element_is_written(self, seed, dtype, device):
        """fill_uninitialized_memory makes torch.empty NaN-filled: an element a kernel
        forgot to write shows up as NaN (inputs are finite)."""
        prev = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
        inputs = list(self.sample(dtype, self.layouts[0], device, self._gen(seed)))
        for i in self.differentiable:
            inputs[i] = inputs[i].detach().requires_grad_()
        try:
            torch.use_deterministic_algorithms(True)
            torch.utils.deterministic.fill_uninitialized_memory = True
            out = self.run(*inputs)
            grads = (torch.autograd.grad(out, [inputs[i] for i in self.differentiable], torch.ones_like(out))
                     if self.differentiable else ())
        finally:
            torch.use_deterministic_algorithms(prev[0])
            torch.utils.deterministic.fill_uninitialized_memory = prev[1]
        assert not out.isnan().any()
        for g in grads:
            assert not g.isnan().any()

    def test_gradcheck(self, seed, layout, device):
        if not self.differentiable:
            pytest.skip("not differentiable")
        inputs = list(self.gradcheck_sample(layout, device, self._gen(seed)))

        def f(*diff):
            args = list(inputs)
            for i, t in zip(self.differentiable, diff):
                args[i] = t
            return self.run(*args)

        diff = [inputs[i].detach().requires_grad_() for i in self.differentiable]
        assert torch.autograd.gradcheck(f, diff)
        assert torch.autograd.gradgradcheck(f, diff)

    def test_opcheck(self, seed, dtype, layout, device):
        if dtype in (torch.float16, torch.bfloat16):
            pytest.skip("opcheck's numerical comparisons are too tight for half types")
        inputs = self.sample(dtype, layout, device, self._gen(seed))
        calls = self.op_calls(*inputs)
        assert calls, "op_calls must name the registered ops"
        for op, args in calls:
            opcheck(op, args)
