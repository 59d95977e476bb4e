"""Fixtures shared by the tests of cliplab.generative."""

import pytest
import torch

import cliplab


@pytest.fixture
def one_thread():
    """Small convolutions and training steps: on a busy machine a second torch thread only
    spins, and makes them many times slower.  The caller's thread count is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes_tiny():
    """The bundled model, loaded once per test module."""
    return cliplab.load("shapes-tiny")

