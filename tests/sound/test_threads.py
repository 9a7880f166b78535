"""Computing sound bounds runs its small LAPACK problems on one MKL thread without changing
the process's thread settings (gloro_fast._mkl): torch.set_num_threads would leave MKL's
dynamic threading off, which makes every later vector-math call (torch.sqrt) wake MKL's
thread team."""
import pytest
import torch

from gloro_fast._mkl import mkl_function
from gloro_fast.models import cnn_2C2F
from gloro_fast.sound import psd

needs_mkl = pytest.mark.skipif(mkl_function("MKL_Set_Num_Threads_Local") is None,
                               reason="torch without MKL: _one_thread uses torch.set_num_threads")


@needs_mkl
def test_one_thread_limits_mkl_on_this_thread_only(monkeypatch):
    max_threads = mkl_function("MKL_Get_Max_Threads", argtypes=())
    before, torch_before = max_threads(), torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    with psd._one_thread():
        assert max_threads() == 1
        assert torch.get_num_threads() == torch_before
    assert max_threads() == before and torch.get_num_threads() == torch_before
    entered = []
    one_thread = psd._one_thread

    def counting():
        entered.append(1)
        return one_thread()

    monkeypatch.setattr(psd, "_one_thread", counting)
    model = cnn_2C2F(input_shape=(1, 28, 28), num_classes=10)
    model.sound_bounds()
    assert entered           # its eigenproblems ran on one thread
    assert calls == []       # and nothing was set for the process
    assert max_threads() == before


def test_mkl_function_is_none_for_an_unknown_name():
    assert mkl_function("MKL_No_Such_Function") is None


def test_one_thread_without_mkl_restores_torch_threads(monkeypatch):
    monkeypatch.setattr(psd, "mkl_function", lambda name: None)
    before = torch.get_num_threads()
    with psd._one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
