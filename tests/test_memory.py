"""Training memory counted exactly: the saved-bytes count against a hand-computed network."""

import torch
from torch import nn

from swr.memory import saved_bytes, training_memory


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_saved_bytes_match_a_hand_count():
    x = torch.randn(5, 4)
    model = tiny()
    # only the last layer trains: it saves its input (the ReLU's 5x3 fp32 output), the
    # ReLU saves nothing (no gradient flows below it), the first layer nothing
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert saved_bytes(model, x) == 5 * 3 * 4
    # the first layer trains too: it saves x (5x4); the ReLU saves its output, the same
    # storage the last layer saves, counted once
    for p in model[0].parameters():
        p.requires_grad_(True)
    assert saved_bytes(model, x) == 5 * 4 * 4 + 5 * 3 * 4
    # nothing trains: nothing is saved
    for p in model.parameters():
        p.requires_grad_(False)
    assert saved_bytes(model, x) == 0


def test_training_memory_adds_the_optimizer_state_of_what_trains():
    model = tiny()
    for p in model[0].parameters():
        p.requires_grad_(False)
    m = training_memory(model, torch.randn(5, 4), [p for p in model.parameters()])
    assert m["saved_bytes"] == 60 and m["state_bytes"] == 3 * (3 * 2 + 2) * 4
    assert m["bytes"] == m["saved_bytes"] + m["state_bytes"] and m["batch"] == 5
